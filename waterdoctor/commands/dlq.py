"""``waterdoctor dlq list|retry|purge``: inspect, retry and purge the dead letters of ``wd:dead:v1``.

* ``list``: the latest dead letters with their origin (stream, group, entry id), deliveries, error and age.
* ``retry``: put dead letters back on their original stream (XADD of the original payload; every group of that
  stream, the one that gave up included, receives it as a new entry) and delete them from ``wd:dead:v1``, both
  in one MULTI/EXEC so a dead letter is never both retried and kept, nor lost.
* ``purge``: delete dead letters older than a duration (``--older-than``) or by ID (``--id``).

``retry`` and ``purge`` ask for confirmation unless ``--yes`` is given; anything but ``y``/``yes`` (or no input
at all) aborts with exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import ValidationError

from handoff import keys
from handoff.models import DeadLetter
from handoff.settings import Settings
from retention.policy import format_duration, parse_duration

if TYPE_CHECKING:  # redis is imported when the command runs: the CLI builds every parser on each start
    import redis.asyncio as aredis

_PAGE = 1_000
_WATCH_RETRIES = 20


@dataclass(frozen=True, slots=True)
class DeadEntry:
    """One entry of ``wd:dead:v1``: its ID and the parsed contract payload (``None`` if unreadable)."""

    id: str
    letter: DeadLetter | None
    raw: bytes

    def to_json(self, now_ms: int) -> dict[str, Any]:
        from handoff.stats import id_ms

        base: dict[str, Any] = {"id": self.id, "age_ms": max(0, now_ms - id_ms(self.id))}
        if self.letter is None:
            return {**base, "unreadable": self.raw.decode("utf-8", "replace")[:200]}
        return {**base, **self.letter.model_dump()}


def add_parser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "dlq",
        help="list, retry or purge dead letters (wd:dead:v1)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")

    ls = sub.add_parser("list", help="show the latest dead letters")
    ls.add_argument("--count", type=int, default=50, help="how many, newest first (default 50)")
    _filters(ls)
    ls.add_argument("--json", action="store_true", help="one JSON line per dead letter")

    retry = sub.add_parser("retry", help="put dead letters back on their original stream")
    target = retry.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--id", action="append", default=[], metavar="ID", help="a dead letter ID (repeatable)"
    )
    target.add_argument("--all", action="store_true", help="every dead letter (matching the filters)")
    _filters(retry)
    retry.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")

    purge = sub.add_parser("purge", help="delete dead letters by age or ID")
    what = purge.add_mutually_exclusive_group(required=True)
    what.add_argument("--older-than", metavar="DURATION", help="dead letters older than this (e.g. 7d, 12h)")
    what.add_argument("--id", action="append", default=[], metavar="ID", help="a dead letter ID (repeatable)")
    purge.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=run)


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stream", help="only dead letters that came from this stream")
    p.add_argument("--group", help="only dead letters given up by this group")


def confirm(question: str, assume_yes: bool) -> bool:
    """Ask on the terminal; ``--yes`` skips the question. No input (EOF) means no."""
    if assume_yes:
        return True
    print(f"{question} [y/N] ", end="", flush=True)
    try:
        answer = input()
    except EOFError:
        print()
        return False
    return answer.strip().lower() in ("y", "yes")


def _parse(entry_id: Any, fields: Any) -> DeadEntry:
    fields = fields or {}
    raw = fields.get(b"payload", fields.get(keys.PAYLOAD_FIELD, b""))
    raw = raw if isinstance(raw, bytes) else str(raw).encode()
    eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    try:
        letter: DeadLetter | None = DeadLetter.model_validate_json(raw)
    except ValidationError:
        letter = None
    return DeadEntry(eid, letter, raw)


def _matches(e: DeadEntry, stream: str | None, group: str | None) -> bool:
    if stream is None and group is None:
        return True
    if e.letter is None:
        return False
    return (stream is None or e.letter.stream == stream) and (group is None or e.letter.group == group)


async def list_dead(
    r: aredis.Redis, *, count: int, stream: str | None = None, group: str | None = None
) -> list[DeadEntry]:
    """The newest ``count`` dead letters matching the filters, newest first."""
    out: list[DeadEntry] = []
    end = "+"
    while len(out) < count:
        rows = await r.xrevrange(keys.DEAD, end, "-", count=_PAGE)
        if not rows:
            break
        out += [e for e in (_parse(i, f) for i, f in rows) if _matches(e, stream, group)]
        end = "(" + _parse(*rows[-1]).id
    return out[:count]


async def select_dead(
    r: aredis.Redis, *, ids: Iterable[str] = (), stream: str | None = None, group: str | None = None
) -> tuple[list[DeadEntry], list[str]]:
    """Dead letters by ID (or all, oldest first, when no ID is given) matching the filters; and IDs not found."""
    ids = list(ids)
    found: list[DeadEntry] = []
    missing: list[str] = []
    if ids:
        for i in ids:
            rows = await r.xrange(keys.DEAD, i, i)
            if rows:
                found.append(_parse(*rows[0]))
            else:
                missing.append(i)
        return [e for e in found if _matches(e, stream, group)], missing
    start = "-"
    while True:
        rows = await r.xrange(keys.DEAD, start, "+", count=_PAGE)
        if not rows:
            break
        found += [e for e in (_parse(i, f) for i, f in rows) if _matches(e, stream, group)]
        start = "(" + _parse(*rows[-1]).id
    return found, missing


async def retry_one(r: aredis.Redis, dead: DeadEntry) -> str:
    """XADD the original payload back to its stream and XDEL the dead letter, atomically; returns the new ID.

    WATCH on the dead-letter stream makes two operators retrying the same letter at once produce one retry, not
    two. Raises ``LookupError`` if the letter is gone and ``ValueError`` if it cannot be retried.
    """
    from redis.exceptions import WatchError

    letter = dead.letter
    if letter is None:
        raise ValueError("payload is not a dead letter of the contract")
    async with r.pipeline(transaction=True) as pipe:
        for _ in range(_WATCH_RETRIES):
            try:
                await pipe.watch(keys.DEAD)
                if not await pipe.xrange(keys.DEAD, dead.id, dead.id):
                    raise LookupError(f"dead letter {dead.id} is gone (retried or purged meanwhile)")
                kind = await pipe.type(letter.stream)
                if kind not in (b"stream", "stream"):
                    raise ValueError(f"stream {letter.stream} does not exist (type {kind!r}); not retried")
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.xadd(letter.stream, {keys.PAYLOAD_FIELD: letter.payload.encode()})
                pipe.xdel(keys.DEAD, dead.id)
                new_id, _ = await pipe.execute()
                return new_id.decode() if isinstance(new_id, bytes) else str(new_id)
            except WatchError:
                continue
    raise RuntimeError(f"dead letter {dead.id}: the dead-letter stream kept changing; try again")


async def purge_older_than(r: aredis.Redis, max_age_ms: int) -> tuple[int, str]:
    """How many dead letters are older than ``max_age_ms`` (server clock) and the MINID that removes them."""
    from handoff.stats import count_entries, server_time_ms

    cutoff = f"{await server_time_ms(r) - max_age_ms}-0"
    n, _, _ = await count_entries(r, keys.DEAD, "-", "(" + cutoff, 10**12)
    return n, cutoff


def run(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_run(settings.require_redis_url(), args))


async def _run(url: str, args: argparse.Namespace) -> int:
    from handoff.connection import connect

    r = await connect(url, name="dlq", attempts=3)
    try:
        if args.dlq_command == "list":
            return await _list(r, args)
        if args.dlq_command == "retry":
            return await _retry(r, args)
        return await _purge(r, args)
    finally:
        await r.aclose()


async def _list(r: aredis.Redis, args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from handoff.stats import id_ms, server_time_ms

    now = await server_time_ms(r)
    entries = await list_dead(r, count=args.count, stream=args.stream, group=args.group)
    depth = await r.xlen(keys.DEAD)
    if args.json:
        for e in entries:
            sys.stdout.write(orjson.dumps(e.to_json(now)).decode() + "\n")
        return 0
    table = Table(
        title=f"{keys.DEAD}: {depth} dead letters (newest {len(entries)} shown)", title_justify="left"
    )
    for col in ("id", "age", "stream", "group", "entry id", "deliveries", "error"):
        table.add_column(col, justify="right" if col in ("age", "deliveries") else "left")
    for e in entries:
        age = format_duration(now - id_ms(e.id))
        if e.letter is None:
            table.add_row(e.id, age, "?", "?", "?", "?", "unreadable payload")
            continue
        error = (e.letter.error.strip().splitlines() or [""])[0][:100]
        table.add_row(
            e.id, age, e.letter.stream, e.letter.group, e.letter.entry_id, str(e.letter.deliveries), error
        )
    Console(file=sys.stdout, width=None if sys.stdout.isatty() else 200).print(table)
    return 0


async def _retry(r: aredis.Redis, args: argparse.Namespace) -> int:
    entries, missing = await select_dead(r, ids=args.id, stream=args.stream, group=args.group)
    for i in missing:
        print(f"waterdoctor dlq retry: no dead letter {i}", file=sys.stderr)
    if not entries:
        print("nothing to retry")
        return 1 if missing else 0
    targets = sorted({e.letter.stream for e in entries if e.letter is not None})
    if not confirm(f"Retry {len(entries)} dead letter(s), back onto {', '.join(targets) or '?'}?", args.yes):
        print("aborted")
        return 1
    failed = len(missing)
    for e in entries:
        try:
            new_id = await retry_one(r, e)
        except (LookupError, ValueError, RuntimeError) as exc:
            failed += 1
            print(f"waterdoctor dlq retry: {e.id}: {exc}", file=sys.stderr)
            continue
        assert e.letter is not None
        print(
            f"retried {e.id} -> {e.letter.stream} {new_id} (was {e.letter.entry_id}, group {e.letter.group})"
        )
    return 1 if failed else 0


async def _purge(r: aredis.Redis, args: argparse.Namespace) -> int:
    if args.older_than:
        try:
            max_age = parse_duration(args.older_than)
        except ValueError as exc:
            print(f"waterdoctor dlq purge: {exc}", file=sys.stderr)
            return 2
        n, cutoff = await purge_older_than(r, max_age)
        if n == 0:
            print(f"no dead letters older than {args.older_than}")
            return 0
        if not confirm(f"Purge {n} dead letter(s) older than {args.older_than}?", args.yes):
            print("aborted")
            return 1
        # Exact MINID: every entry below the cut-off goes and nothing newer, whatever arrived meanwhile.
        removed = int(await r.xtrim(keys.DEAD, minid=cutoff, approximate=False))
        print(f"purged {removed} dead letter(s) older than {args.older_than}")
        return 0
    entries, missing = await select_dead(r, ids=args.id)
    for i in missing:
        print(f"waterdoctor dlq purge: no dead letter {i}", file=sys.stderr)
    if entries:
        if not confirm(f"Purge {len(entries)} dead letter(s)?", args.yes):
            print("aborted")
            return 1
        removed = int(await r.xdel(keys.DEAD, *[e.id for e in entries]))
        print(f"purged {removed} dead letter(s)")
    return 1 if missing else 0
