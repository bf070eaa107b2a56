"""``waterdoctor up``: the whole pipeline on one machine, with a live terminal view.

Embedded Valkey (data and AOF under ``--data-dir``) and Mosquitto start where ``WD_REDIS_URL`` / ``WD_MQTT_URL`` are
unset; then every crew as its own process, a simulated fleet, and a live view of each stage. Ctrl-C stops
everything: crews first (they finish or leave pending what they hold), then the fleet, the broker and the server.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import orjson
import redis
from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from handoff import keys
from handoff.settings import Settings
from waterdoctor.supervisor import DEFAULT_METRICS_PORTS, Pipeline

logger = logging.getLogger(__name__)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("up", help="the whole pipeline on one machine, with a live view")
    p.add_argument(
        "--data-dir", type=Path, default=Path(".wd-data"), help="embedded servers' data and crew logs"
    )
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--sensors", type=int, default=10, help="sensors per site")
    p.add_argument("--rate", type=float, default=300.0, help="simulated readings/s")
    p.add_argument("--batch", type=int, default=10, help="readings per gateway message (1: single readings)")
    p.add_argument("--anomaly-rate", type=float, default=0.01, help="share of readings in anomaly episodes")
    p.add_argument(
        "--duration", type=float, default=0.0, help="stop after this many seconds (0: until Ctrl-C)"
    )
    p.add_argument("--no-view", action="store_true", help="log lines instead of the live view")
    p.set_defaults(func=run)


class Rates:
    """Per-second rates of monotonic counters, between two refreshes."""

    def __init__(self) -> None:
        self.last: dict[str, tuple[float, float]] = {}

    def rate(self, key: str, value: float) -> float:
        now = time.monotonic()
        prev = self.last.get(key)
        self.last[key] = (now, value)
        if prev is None or now <= prev[0]:
            return 0.0
        return max(0.0, (value - prev[1]) / (now - prev[0]))


def snapshot(r: redis.Redis, rates: Rates) -> dict[str, Any]:
    """Everything the view shows, read from Redis in one pipelined round trip."""
    pipe = r.pipeline(transaction=False)
    for stream in keys.STREAMS:
        pipe.exists(stream)
    exists = pipe.execute()
    pipe = r.pipeline(transaction=False)
    present = [s for s, e in zip(keys.STREAMS, exists, strict=True) if e]
    for stream in present:
        pipe.xinfo_stream(stream)
        pipe.xinfo_groups(stream)
    pipe.xrevrange(keys.ANOMALIES, count=6)
    replies = pipe.execute()
    out: dict[str, Any] = {"streams": {}, "recent": replies[-1]}
    for i, stream in enumerate(present):
        info, groups = replies[2 * i], replies[2 * i + 1]
        added = int(info.get("entries-added") or info["length"])
        out["streams"][stream] = {
            "length": int(info["length"]),
            "rate": rates.rate(stream, added),
            "groups": [
                {
                    "name": g["name"].decode(),
                    "lag": g.get("lag"),
                    "pending": g["pending"],
                    "consumers": g["consumers"],
                }
                for g in groups
            ],
        }
    return out


def render(snap: dict[str, Any], crews: dict[str, bool], sms_lines: deque[str]) -> Group:
    t = Table(title="WaterDoctor pipeline", expand=True)
    for col in ("stream", "entries/s", "length", "group", "consumers", "lag", "pending"):
        t.add_column(col, justify="right" if col not in ("stream", "group") else "left")
    for stream in keys.STREAMS:
        s = snap["streams"].get(stream)
        if s is None:
            t.add_row(stream, "-", "0", "", "", "", "")
            continue
        groups = s["groups"] or [{"name": "", "lag": "", "pending": "", "consumers": ""}]
        for j, g in enumerate(groups):
            t.add_row(
                stream if j == 0 else "",
                f"{s['rate']:,.0f}" if j == 0 else "",
                f"{s['length']:,}" if j == 0 else "",
                g["name"], str(g["consumers"]), str(g["lag"]), str(g["pending"]),
            )  # fmt: skip
    a = Table(title="latest anomalies", expand=True)
    for col in ("alert_id", "severity", "score", "explanation"):
        a.add_column(col)
    for _id, fields in snap["recent"]:
        an = orjson.loads(fields[b"payload"])
        expl = ", ".join(
            f"{e['metric']} {e['direction']} ({e['value']:.4g})" for e in an.get("explanation", [])
        )
        a.add_row(Text(an["alert_id"]), an["severity"], f"{an['score']:.3f}", Text(expl))
    status = "  ".join(f"[{'green' if ok else 'red'}]{name}[/]" for name, ok in crews.items())
    sms = "\n".join(sms_lines) or "(none yet)"
    return Group(
        t,
        a,
        # Text, not markup: a log line's "[dry-run SMS]" (or a sensor id with brackets) is not a style tag.
        Panel(Text(sms), title="SMS (dry run unless Twilio is configured)"),
        Panel(status + "   Ctrl-C to stop"),
    )


def tail_sms(path: Path, pos: int, lines: deque[str]) -> int:
    """Collect new SMS lines from the alerting crew's log."""
    if not path.exists():
        return pos
    with open(path, "rb") as fh:
        fh.seek(pos)
        for raw in fh:
            text = raw.decode("utf-8", "replace").rstrip()
            if "SMS" in text:
                # From the "[dry-run SMS] to ...: body" marker on (log prefixes are noise here), cut at the end.
                start = max(0, text.find("[dry-run SMS]"))
                lines.append(text[start : start + 200])
        return fh.tell()


def run(args: argparse.Namespace, settings: Settings) -> int:
    pipeline = Pipeline(
        data_dir=args.data_dir.resolve(),
        redis_url=settings.redis_url,
        mqtt_url=settings.mqtt_url,
        metrics_ports=DEFAULT_METRICS_PORTS,
        # A demo should show alerts within a minute: models after 100 readings per sensor, not 200.
        crew_args={"analytics": ["--warmup", "100"]},
    )
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    sim = None
    try:
        pipeline.start()
        sim_argv = [
            sys.executable, "-m", "waterdoctor.cli", "simulate",
            "--sites", str(args.sites), "--sensors", str(args.sensors), "--rate", str(args.rate),
            "--batch", str(args.batch), "--anomaly-rate", str(args.anomaly_rate), "--duration", "0",
        ]  # fmt: skip
        import subprocess

        with open(pipeline.data_dir / "logs" / "simulate.log", "ab") as log:
            sim = subprocess.Popen(sim_argv, env=pipeline.env, stdout=log, stderr=subprocess.STDOUT)
        assert pipeline.redis_url is not None
        r = redis.Redis.from_url(pipeline.redis_url)
        rates = Rates()
        sms_lines: deque[str] = deque(maxlen=6)
        pos = 0
        started = time.monotonic()
        with contextlib.ExitStack() as stack:
            live = None
            if not args.no_view:
                live = stack.enter_context(Live(refresh_per_second=2, screen=False))
            while not stop:
                if args.duration and time.monotonic() - started > args.duration:
                    break
                crews = {name: c.running for name, c in pipeline.processes.items()}
                crews["simulate"] = sim.poll() is None
                pos = tail_sms(pipeline.data_dir / "logs" / "alerting.log", pos, sms_lines)
                try:
                    snap = snapshot(r, rates)
                except redis.RedisError as exc:
                    logger.warning("status unavailable: %s", exc)
                    time.sleep(1)
                    continue
                if live is not None:
                    live.update(render(snap, crews, sms_lines))
                else:
                    logger.info(
                        "reading entries=%s anomalies=%s crews=%s",
                        snap["streams"].get(keys.READINGS, {}).get("length", 0),
                        snap["streams"].get(keys.ANOMALIES, {}).get("length", 0),
                        crews,
                    )
                time.sleep(1)
        r.close()
    finally:
        if sim is not None and sim.poll() is None:
            sim.send_signal(signal.SIGTERM)
            with contextlib.suppress(Exception):
                sim.wait(10)
            if sim.poll() is None:
                sim.kill()
        codes = pipeline.stop()
        for s, h in old.items():
            signal.signal(s, h)
    bad = {k: v for k, v in codes.items() if v not in (0, None)}
    if bad:
        print(f"crews exited with errors: {bad} (logs in {pipeline.data_dir / 'logs'})", file=sys.stderr)
        return 1
    print("stopped cleanly")
    return 0
