"""``waterdoctor replay``: publish stored anomalies on ``wd:alerts:v1`` again, for the "why did this alert fire" dispute.

The message is the exact payload stored in ``wd:anomalies:v1`` (the one that was scored and sent), byte for byte,
with ``"replayed": true`` appended (and ``"resend": true`` with ``--resend``). The alerting dispatcher does not send
an SMS for a replayed alert unless ``resend`` is set, so a replay is safe to run against production.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from handoff import keys
from handoff.settings import Settings
from retention.policy import parse_duration

if TYPE_CHECKING:  # redis is imported when the command runs: the CLI builds every parser on each start
    import redis.asyncio as aredis

_PAGE = 1_000


@dataclass(frozen=True, slots=True)
class StoredAnomaly:
    """One entry of ``wd:anomalies:v1``: its ID, the verbatim payload and the decoded document."""

    entry_id: str
    payload: bytes
    doc: dict[str, Any]


def add_parser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "replay",
        help="re-publish stored anomalies on wd:alerts:v1 (marked replayed)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--alert-id", action="append", default=[], metavar="ID", help="an alert_id to replay (repeatable)"
    )
    p.add_argument(
        "--since", help="replay anomalies stored since this time: ISO 8601 (UTC if no offset) or 2h"
    )
    p.add_argument("--until", help="... and up to this time (same forms; default now)")
    p.add_argument(
        "--resend", action="store_true", help="mark them resend: the dispatcher sends the SMS again"
    )
    p.add_argument("--dry-run", action="store_true", help="show what would be replayed; publish nothing")
    p.add_argument("--limit", type=int, default=1_000, help="replay at most this many (default 1000)")
    p.add_argument("--json", action="store_true", help="print one JSON line per replayed anomaly")
    p.set_defaults(func=run)


def parse_when(text: str, now_ms: int) -> int:
    """``2h`` (that long before ``now_ms``) or an ISO 8601 time (UTC when it has no offset) -> epoch ms."""
    try:
        return now_ms - parse_duration(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise ValueError(f"not a time or duration: {text!r} (use 2026-12-01T07:00:00Z or 2h)") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def mark_replayed(stored: bytes, *, resend: bool = False) -> bytes:
    """The stored anomaly JSON with ``"replayed": true`` (and ``"resend": true``) appended.

    Every byte of the stored payload is kept (number formatting included) by splicing the flags in before the
    closing brace; only a payload that already carries one of the flags is re-encoded.
    """
    doc = orjson.loads(stored)
    if not isinstance(doc, dict):
        raise ValueError("an anomaly payload must be a JSON object")
    flags: dict[str, bool] = {"replayed": True}
    if resend:
        flags["resend"] = True
    if any(k in doc for k in flags):
        doc.update(flags)
        return orjson.dumps(doc)
    inner = stored.rstrip()[:-1].rstrip()
    sep = b"" if inner.endswith(b"{") else b","
    return inner + sep + orjson.dumps(flags)[1:]


async def find_anomalies(
    r: aredis.Redis,
    *,
    alert_ids: Iterable[str] = (),
    since_ms: int | None = None,
    until_ms: int | None = None,
    limit: int | None = None,
) -> list[StoredAnomaly]:
    """Anomalies in ``wd:anomalies:v1`` (oldest first) within the time range and, if given, with those alert ids.

    Without an index the stream is paged through; a cheap byte test on the JSON-encoded id skips most entries
    before parsing, and the scan stops once every asked-for id was found (the contract promises one anomaly entry
    per alert id).
    """
    wanted = set(alert_ids)
    needles = [orjson.dumps(a) for a in wanted]
    start = "-" if since_ms is None else f"{since_ms}-0"
    end = "+" if until_ms is None else f"{until_ms}-18446744073709551615"
    found: list[StoredAnomaly] = []
    seen: set[str] = set()
    while True:
        rows = await r.xrange(keys.ANOMALIES, start, end, count=_PAGE)
        if not rows:
            break
        for raw_id, fields in rows:
            fields = fields or {}
            payload = fields.get(b"payload", fields.get(keys.PAYLOAD_FIELD))
            if not isinstance(payload, bytes):
                continue
            if needles and not any(n in payload for n in needles):
                continue
            try:
                doc = orjson.loads(payload)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(doc, dict) or (wanted and doc.get("alert_id") not in wanted):
                continue
            entry_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            found.append(StoredAnomaly(entry_id, payload, doc))
            seen.add(str(doc.get("alert_id")))
            if limit is not None and len(found) >= limit:
                return found
        if wanted and seen >= wanted:
            break
        last = rows[-1][0]
        start = "(" + (last.decode() if isinstance(last, bytes) else str(last))
    return found


async def publish_replays(r: aredis.Redis, anomalies: Iterable[StoredAnomaly], *, resend: bool) -> list[int]:
    """PUBLISH each anomaly, marked replayed, on ``wd:alerts:v1``; returns the receiver count of each."""
    async with r.pipeline(transaction=False) as pipe:
        for a in anomalies:
            pipe.publish(keys.ALERTS_CHANNEL, mark_replayed(a.payload, resend=resend))
        return [int(n) for n in await pipe.execute()]


def run(args: argparse.Namespace, settings: Settings) -> int:
    if not args.alert_id and not args.since:
        print("waterdoctor replay: give --alert-id (repeatable) or --since", file=sys.stderr)
        return 2
    return asyncio.run(_replay(settings.require_redis_url(), args))


async def _replay(url: str, args: argparse.Namespace) -> int:
    from handoff.connection import connect
    from handoff.stats import id_ms, server_time_ms

    r = await connect(url, name="replay", attempts=3)
    try:
        now = await server_time_ms(r)
        try:
            since = parse_when(args.since, now) if args.since else None
            until = parse_when(args.until, now) if args.until else None
        except ValueError as exc:
            print(f"waterdoctor replay: {exc}", file=sys.stderr)
            return 2
        found = await find_anomalies(
            r, alert_ids=args.alert_id, since_ms=since, until_ms=until, limit=args.limit + 1
        )
        capped = len(found) > args.limit
        found = found[: args.limit]
        receivers = [0] * len(found) if args.dry_run else await publish_replays(r, found, resend=args.resend)
    finally:
        await r.aclose()

    verb = "would replay" if args.dry_run else "replayed"
    for a, n in zip(found, receivers, strict=True):
        if args.json:
            line = {"entry_id": a.entry_id, **a.doc, "receivers": n, "dry_run": args.dry_run}
            sys.stdout.write(orjson.dumps(line).decode() + "\n")
            continue
        detected = datetime.fromtimestamp(int(a.doc.get("detected_ms", id_ms(a.entry_id))) / 1000, UTC)
        print(
            f"{verb} {a.entry_id}  {a.doc.get('alert_id')}  {a.doc.get('severity')}  "
            f"score={a.doc.get('score')}  detected={detected.isoformat(timespec='milliseconds')}"
            + ("" if args.dry_run else f"  receivers={n}")
        )
    missing = sorted(set(args.alert_id) - {str(a.doc.get("alert_id")) for a in found})
    if not args.json:
        flags = "replayed" + (", resend" if args.resend else "")
        print(
            f"{len(found)} anomal{'y' if len(found) == 1 else 'ies'} {verb} on {keys.ALERTS_CHANNEL} ({flags})"
        )
    if capped:
        print(f"waterdoctor replay: stopped at --limit {args.limit}; more anomalies match", file=sys.stderr)
    if missing:
        print(f"waterdoctor replay: not found in {keys.ANOMALIES}: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0
