"""``waterdoctor status``: one screen for the engineer on call.

Every stream of the contract with its length, memory and the age of its oldest and newest entries; every consumer
group with its consumers, idle times, lag, pending count and the age of its oldest pending entry; the depth of the
dead-letter and quarantine streams with their most frequent errors and reasons. ``--json`` prints the same as one
JSON document for scripts. An unreachable Redis is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from handoff import keys
from handoff.errors import RedisUnavailable
from handoff.settings import Settings
from retention.policy import format_duration

if (
    TYPE_CHECKING
):  # redis and rich are imported when the command runs: the CLI builds every parser on each start
    import redis.asyncio as aredis
    from rich.console import Console

#: Consumers idle longer than this are shown as suspect (the worker claims from them after ``claim_idle_ms``).
_IDLE_WARN_MS = 60_000


def add_parser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "status",
        help="streams, groups, consumers, lag, pending, dead letters and quarantine at a glance",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    p.add_argument(
        "--scan",
        type=int,
        default=1_000,
        help="latest dead letters / quarantined entries scanned for reasons",
    )
    p.add_argument("--top", type=int, default=5, help="how many top reasons to show (default 5)")
    p.add_argument(
        "--memory-samples", type=int, default=5, help="MEMORY USAGE SAMPLES (0: exact, slower on big streams)"
    )
    p.add_argument(
        "--lag-cap",
        type=int,
        default=1_000_000,
        help="entries counted at most per group to compute an exact lag (default 1000000)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    url = settings.require_redis_url()
    report = asyncio.run(_collect_from(url, args))
    if args.json:
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        from rich.console import Console

        render(report, Console(file=sys.stdout, width=None if sys.stdout.isatty() else 160))
    return 0


async def _collect_from(url: str, args: argparse.Namespace) -> dict[str, Any]:
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from handoff.connection import connect

    r = await connect(url, name="status", attempts=1, socket_connect_timeout=3, socket_timeout=10)
    try:
        return await collect_status(
            r,
            scan=args.scan,
            top=args.top,
            memory_samples=args.memory_samples,
            lag_count_cap=args.lag_cap,
        )
    except (RedisConnectionError, RedisTimeoutError) as exc:
        raise RedisUnavailable(f"lost the connection to Redis: {exc}") from exc
    finally:
        await r.aclose()


def _dead_error(payload: dict[str, Any]) -> str:
    error = str(payload.get("error", "?")).strip().splitlines()
    return (error[0] if error else "?")[:120]


def _quarantine_reason(payload: dict[str, Any]) -> str:
    return str(payload.get("reason", "?"))


async def scan_reasons(
    r: aredis.Redis, stream: str, reason: Callable[[dict[str, Any]], str], scan: int, top: int
) -> tuple[int, list[tuple[str, int]], Counter[str]]:
    """Read the latest ``scan`` entries of ``stream``; returns (entries scanned, top reasons, origins).

    Origins count ``stream/group`` of dead letters (empty for other payloads). Unparsable payloads count as
    ``unreadable payload`` rather than failing the whole screen.
    """
    rows = (await r.xrevrange(stream, count=scan) or []) if scan > 0 else []
    reasons: Counter[str] = Counter()
    origins: Counter[str] = Counter()
    for _id, fields in rows:
        raw = (fields or {}).get(b"payload", (fields or {}).get(keys.PAYLOAD_FIELD))
        try:
            payload = orjson.loads(raw) if raw is not None else None
        except orjson.JSONDecodeError:
            payload = None
        if not isinstance(payload, dict):
            reasons["unreadable payload"] += 1
            continue
        reasons[reason(payload)] += 1
        if "stream" in payload and "group" in payload:
            origins[f"{payload['stream']}/{payload['group']}"] += 1
    return len(rows), reasons.most_common(top), origins


async def collect_status(
    r: aredis.Redis,
    *,
    streams: tuple[str, ...] = keys.STREAMS,
    scan: int = 1_000,
    top: int = 5,
    memory_samples: int = 5,
    lag_count_cap: int = 1_000_000,
) -> dict[str, Any]:
    """Everything ``status`` shows, as a JSON-ready dict (the ``--json`` output)."""
    from handoff.stats import StreamStats, stream_stats

    info = await r.info("server")
    stats: list[StreamStats] = [
        await stream_stats(r, s, memory_samples=memory_samples, lag_count_cap=lag_count_cap) for s in streams
    ]
    by_name = {s.name: s for s in stats}
    dead_scanned, dead_top, dead_origins = await scan_reasons(r, keys.DEAD, _dead_error, scan, top)
    q_scanned, q_top, _ = await scan_reasons(r, keys.QUARANTINE, _quarantine_reason, scan, top)
    dead = by_name.get(keys.DEAD)
    quarantine = by_name.get(keys.QUARANTINE)
    return {
        "server": {
            "version": info.get("valkey_version") or info.get("redis_version"),
            "kind": "valkey" if "valkey_version" in info or info.get("server_name") == "valkey" else "redis",
        },
        "server_time_ms": max((s.server_time_ms for s in stats), default=0),
        "streams": [s.to_json() for s in stats],
        "dead_letters": {
            "depth": dead.length if dead else 0,
            "scanned": dead_scanned,
            "top_errors": [{"error": e, "count": n} for e, n in dead_top],
            "by_origin": [
                {"stream": o.split("/", 1)[0], "group": o.split("/", 1)[1], "count": n}
                for o, n in dead_origins.most_common()
            ],
        },
        "quarantine": {
            "depth": quarantine.length if quarantine else 0,
            "scanned": q_scanned,
            "top_reasons": [{"reason": e, "count": n} for e, n in q_top],
        },
    }


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def render(report: dict[str, Any], console: Console) -> None:
    """Draw the report as rich tables."""
    from rich.table import Table
    from rich.text import Text

    server = report["server"]
    console.print(
        Text.assemble(
            ("WaterDoctor status", "bold"),
            f"  {server['kind']} {server['version']}  ",
            ("server time ", "dim"),
            datetime.fromtimestamp(report["server_time_ms"] / 1000, UTC).isoformat(timespec="seconds"),
        )
    )

    streams = Table(title="Streams", title_justify="left")
    for col in ("stream", "length", "memory", "oldest entry", "newest entry", "groups"):
        streams.add_column(col, justify="left" if col == "stream" else "right")
    for s in report["streams"]:
        if not s["exists"]:
            streams.add_row(s["name"], Text("absent", style="dim"), "-", "-", "-", "0")
            continue
        streams.add_row(
            s["name"],
            f"{s['length']:,}",
            _bytes(s["memory_bytes"]),
            format_duration(s["first_entry_age_ms"]),
            format_duration(s["last_entry_age_ms"]),
            str(len(s["groups"])),
        )
    console.print(streams)

    groups = Table(title="Consumer groups", title_justify="left")
    for col in (
        "stream",
        "group",
        "consumers",
        "lag",
        "pending",
        "oldest pending",
        "deliveries",
        "last delivered",
    ):
        groups.add_column(col, justify="left" if col in ("stream", "group", "last delivered") else "right")
    consumers = Table(title="Consumers", title_justify="left")
    for col in ("stream", "group", "consumer", "pending", "idle", "inactive"):
        consumers.add_column(col, justify="left" if col in ("stream", "group", "consumer") else "right")
    any_group = False
    for s in report["streams"]:
        for g in s["groups"]:
            any_group = True
            lag = Text(f"{g['lag']:,}" + ("" if g["lag_source"] == "exact" else " ~"))
            if g["lag"]:
                lag.stylize("yellow")
            groups.add_row(
                s["name"],
                g["name"],
                str(len(g["consumers"])),
                lag,
                f"{g['pending']:,}",
                format_duration(g["oldest_pending_age_ms"]),
                "-" if g["oldest_pending_deliveries"] is None else str(g["oldest_pending_deliveries"]),
                g["last_delivered_id"],
            )
            for c in g["consumers"]:
                idle = Text(
                    format_duration(c["idle_ms"]), style="red" if c["idle_ms"] > _IDLE_WARN_MS else ""
                )
                consumers.add_row(
                    s["name"],
                    g["name"],
                    c["name"],
                    f"{c['pending']:,}",
                    idle,
                    format_duration(c["inactive_ms"]),
                )
    if any_group:
        console.print(groups)
        if consumers.row_count:
            console.print(consumers)
    else:
        console.print(Text("No consumer groups.", style="dim"))

    dead = report["dead_letters"]
    quarantine = report["quarantine"]
    problems = Table(title="Dead letters and quarantine", title_justify="left")
    problems.add_column("stream")
    problems.add_column("depth", justify="right")
    problems.add_column(f"top reasons (latest {max(dead['scanned'], quarantine['scanned'])} scanned)")
    problems.add_row(
        keys.DEAD,
        Text(f"{dead['depth']:,}", style="red" if dead["depth"] else ""),
        "\n".join(f"{e['count']:>5}  {e['error']}" for e in dead["top_errors"]) or "-",
    )
    problems.add_row(
        keys.QUARANTINE,
        Text(f"{quarantine['depth']:,}", style="yellow" if quarantine["depth"] else ""),
        "\n".join(f"{e['count']:>5}  {e['reason']}" for e in quarantine["top_reasons"]) or "-",
    )
    console.print(problems)
    if dead["by_origin"]:
        console.print(
            "dead letters by origin: "
            + ", ".join(f"{o['stream']}/{o['group']} {o['count']}" for o in dead["by_origin"])
        )
