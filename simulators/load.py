"""The load proof: drive the pipeline at a target rate and check every reading against the streams.

``run_load`` publishes a seeded fleet over MQTT QoS 1 for ``duration_s``, waits for the pipeline to drain, then
reads ``wd:readings:v1`` and ``wd:anomalies:v1`` back and reports, without assuming anything:

* ``sent`` (readings whose message the broker acknowledged), ``stored`` (distinct readings found in the stream),
  ``lost`` (acknowledged but not stored), ``duplicated`` (stored more than once);
* ``offered_rate`` (the fleet's nominal rate) and ``achieved_rate`` (readings acknowledged by the broker per second
  of publishing);
* ``latency_ms`` p50/p95/p99 from a reading's publish to its anomaly arriving on ``wd:alerts:v1``;
* ``anomalies_injected`` / ``anomalies_detected`` and precision and recall per anomaly class;
* ``host_speed``: how fast the host ran a fixed piece of work during the measured run against the fastest it ran it
  in the whole run (:mod:`simulators.hostspeed`), to read latencies by; with ``self_contained`` also the embedded
  server's own stalls (``redis_stalls``) and the commands of its slow log (``slow_commands``).

With ``self_contained`` it starts private servers and every crew itself (:class:`waterdoctor.supervisor.Pipeline`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis

from handoff import keys
from handoff.settings import MqttEndpoint
from simulators import hostspeed
from simulators.fleet import ANOMALY_CLASSES, Fleet
from simulators.publisher import Publisher, PublishLog, PublishStats

logger = logging.getLogger(__name__)


@dataclass
class LoadConfig:
    rate: float = 1000.0
    duration_s: float = 30.0
    sites: int = 4
    sensors: int = 25
    batch: int = 10
    anomaly_rate: float = 0.002
    seed: int = 1
    drain_timeout_s: float = 60.0
    min_rate_ratio: float = 0.95
    #: Readings per sensor published flat out (with past timestamps) before the measured run, so that every
    #: sensor has a model when measuring starts; they count for loss and duplicates, not for detection.
    warmup_readings: int = 300
    model_wait_s: float = 60.0
    #: After the warm-up, seconds of live publishing that are not measured: the transition out of the warm-up
    #: (sensors back from the silence the model fitting imposed on them, their buffered readings) is not steady.
    lead_in_s: float = 1.0
    redis_kind: str = "redis"
    #: Self-contained runs send real SMS through the official twilio package to a local fake of the Twilio
    #: Messages API, one phone per site, and report reading-publish-to-SMS-accepted latency.
    sms: bool = True
    crew_args: dict[str, list[str]] = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return round(ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo), 3)


class AlertListener:
    """Records when each ``alert_id`` first arrives on the Pub/Sub channel (:mod:`simulators.listen`, a child process)."""

    def __init__(self, url: str, folder: Path) -> None:
        self.out = Path(folder) / "alert-arrivals.tsv"
        self.proc = _start_recorder(["simulators.listen", url, str(self.out)], "alert listener")

    def collect(self) -> dict[str, float]:
        """Stop listening and return ``{alert_id: first arrival, epoch ms}``."""
        self.close()
        arrivals: dict[str, float] = {}
        if self.out.exists():
            for line in self.out.read_text().splitlines():
                alert_id, _, at = line.partition("\t")
                with contextlib.suppress(ValueError):
                    arrivals.setdefault(alert_id, float(at))
        return arrivals

    def close(self) -> None:
        _stop_recorder(self.proc)


class HostSpeedMeter:
    """Samples the host's speed through the run (:mod:`simulators.hostspeed`, a child process)."""

    def __init__(self, folder: Path) -> None:
        self.out = Path(folder) / "host-speed.tsv"
        self.proc = _start_recorder(["simulators.hostspeed", str(self.out)], "host speed meter")

    def summary(self, since_s: float, until_s: float) -> dict[str, Any] | None:
        return hostspeed.summarize(hostspeed.read(self.out), since_s, until_s)

    def close(self) -> None:
        _stop_recorder(self.proc)


def _start_recorder(args: list[str], what: str) -> subprocess.Popen[str]:
    """``python -m <args>``, once it has printed ``READY``."""
    proc = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "READY":
        _stop_recorder(proc)
        raise RuntimeError(f"{what} did not start: {line!r}")
    return proc


def _stop_recorder(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def read_stream(r: redis.Redis, stream: str, chunk: int = 5000, start: str = "-") -> list[tuple[str, bytes]]:
    """Every entry from ``start`` (inclusive) to the end, as ``(id, payload)``, read ``chunk`` entries at a time."""
    out: list[tuple[str, bytes]] = []
    while True:
        items: Any = r.xrange(stream, min=start, max="+", count=chunk)
        if not items:
            break
        for entry_id, fields in items:
            out.append((entry_id.decode(), fields.get(b"payload", b"")))
        if len(items) < chunk:
            break
        ms, seq = items[-1][0].decode().split("-")
        start = f"{ms}-{int(seq) + 1}"
    return out


def stored_counts(
    r: redis.Redis,
    first_stored_ms: dict[tuple[str, str, int], int] | None = None,
    received_ms: dict[tuple[str, str, int], int] | None = None,
) -> Counter[tuple[str, str, int]]:
    """How often each reading is in ``wd:readings:v1``; fills ``first_stored_ms`` (entry id time) and
    ``received_ms`` (when ingest took the message from the broker, by its clock) if given."""
    counts: Counter[tuple[str, str, int]] = Counter()
    for entry_id, payload in read_stream(r, keys.READINGS):
        at = int(entry_id.split("-", 1)[0]) if first_stored_ms is not None else 0
        for reading in orjson.loads(payload)["readings"]:
            key = (reading["site"], reading["sensor_id"], reading["seq"])
            counts[key] += 1
            if first_stored_ms is not None:
                first_stored_ms.setdefault(key, at)
            if received_ms is not None and "received_ms" in reading:
                received_ms.setdefault(key, reading["received_ms"])
    return counts


def wait_for_metrics(ports: list[int], timeout_s: float = 60.0) -> None:
    """Wait until every crew answers on its metrics port: it has started and connected."""
    deadline = time.monotonic() + timeout_s
    for port in ports:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no crew answered on metrics port {port}") from None
                time.sleep(0.2)


def wait_for_gauge(port: int, name: str, at_least: float, timeout_s: float = 60.0) -> bool:
    """Wait until a crew's metric ``name`` (no labels) reaches ``at_least``; False on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as resp:
                for line in resp.read().decode().splitlines():
                    if line.startswith(name + " ") and float(line.split()[-1]) >= at_least:
                        return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def metric_sum(port: int, name: str, labels: str = "") -> float | None:
    """The sum of a crew's metric samples named ``name`` whose label text contains ``labels``; None if unreachable."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    total = 0.0
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if (head == name or head.startswith(name + "{")) and labels in head:
            total += float(value)
    return total


class StoredTally:
    """Readings in ``wd:readings:v1``, counted incrementally: each :meth:`update` reads only the entries added since
    the last one. (Reading the whole stream on every poll held Redis for ~70 ms per 5,000 entries, over and over,
    once it held a million readings: the pipeline being measured stalled with it.)"""

    def __init__(self) -> None:
        self._next = "-"
        self.total = 0
        self.last_id = ""  # the newest entry counted

    def update(self, r: redis.Redis) -> int:
        entries = read_stream(r, keys.READINGS, chunk=200, start=self._next)
        for _entry_id, payload in entries:
            self.total += len(orjson.loads(payload or b'{"readings": []}')["readings"])
        if entries:
            self.last_id = entries[-1][0]
            ms, seq = self.last_id.split("-")
            self._next = f"{ms}-{int(seq) + 1}"
        return self.total


def wait_drained(
    r: redis.Redis, acked: int, timeout_s: float, tally: StoredTally | None = None
) -> float | None:
    """Until analytics has no lag or pending on the readings stream and the stream holds what was acknowledged.

    Returns the ``time.monotonic()`` at which analytics was seen idle in the check that ended the wait (before
    counting the stored readings, which takes a while after a long run), or None on timeout.
    """
    tally = tally or StoredTally()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        seen = time.monotonic()
        try:
            groups = {g["name"].decode(): g for g in r.xinfo_groups(keys.READINGS)}
        except redis.ResponseError:
            groups = {}
        g = groups.get(keys.GROUP_ANALYTICS)
        idle = g is not None and g["pending"] == 0 and g.get("lag") in (0, None)
        # Idle at ``seen`` counts only if analytics had then been handed the newest entry the count finds.
        if g is not None and idle and tally.update(r) >= acked:
            delivered = g["last-delivered-id"]
            delivered = delivered.decode() if isinstance(delivered, bytes) else str(delivered)
            if tally.last_id in ("", delivered):
                return seen
        time.sleep(0.05)
    return None


def build_report(
    cfg: LoadConfig,
    stats: PublishStats,
    log: PublishLog,
    r: redis.Redis,
    arrivals: dict[str, float],
    exclude: set[tuple[str, str, int]] | None = None,
    rewrites: list[tuple[float, float]] | None = None,
) -> dict[str, Any]:
    """The contract's report. ``exclude`` (warm-up readings) counts for loss and duplicates only; given the AOF
    ``rewrites`` of the run (see :func:`aof_rewrites`), each of the slowest anomalies says if it met one."""
    warm = exclude or set()
    stored_at: dict[tuple[str, str, int], int] = {}
    received_at: dict[tuple[str, str, int], int] = {}
    counts = stored_counts(r, stored_at, received_at)
    all_acked = log.acked_keys()
    all_sent = log.sent_keys()
    acked_keys = all_acked - warm
    sent_keys = all_sent - warm
    stored_keys = set(counts)
    lost = sorted(all_acked - stored_keys)
    duplicated = sum(c - 1 for c in counts.values() if c > 1)
    publish_ms = log.publish_ms()
    labels = log.labels()
    # Publish -> stored for every reading of the measured run (not only those that raised an anomaly).
    store_delays = [stored_at[k] - publish_ms[k] for k in acked_keys if k in stored_at and k in publish_ms]
    receive_delays = [
        received_at[k] - publish_ms[k] for k in acked_keys if k in received_at and k in publish_ms
    ]

    all_anomalies = [orjson.loads(p) for _i, p in read_stream(r, keys.ANOMALIES)]
    duplicate_alerts = sum(c - 1 for c in Counter(a["alert_id"] for a in all_anomalies).values() if c > 1)
    # Detection is judged on the measured run only (warm-up readings are left out).
    anomalies = [a for a in all_anomalies if (a["site"], a["sensor_id"], a["seq"]) in sent_keys]
    detected_ids: Counter[str] = Counter(a["alert_id"] for a in anomalies)
    latencies = []
    # (latency, alert id, rule, ms after the run's first publish, stages) of every anomaly, for the five slowest
    slowest: list[tuple[float, str, str, float, tuple[float, ...]]] = []
    t0 = min((publish_ms[k] for k in sent_keys if k in publish_ms), default=0.0)
    # "received" (publish -> ingest took the message from the broker, by ingest's clock) is part of "stored".
    stages: dict[str, list[float]] = {"received": [], "stored": [], "scoring": [], "pubsub": []}
    detected_labels: Counter[str] = Counter()
    false_alerts = 0
    for a in anomalies:
        key = (a["site"], a["sensor_id"], a["seq"])
        if key not in sent_keys:
            continue
        label = labels.get(key)
        if label is None:
            false_alerts += 1
        else:
            detected_labels[label] += 1
        t_pub = publish_ms.get(key)
        t_arr = arrivals.get(a["alert_id"], a["detected_ms"])
        if t_pub is not None:
            latencies.append(max(0.0, t_arr - t_pub))
            # Where the time went: publish -> stored (the reading's entry id is the server's clock at the XADD),
            # stored -> its scoring batch started (``detected_ms``), and batch start -> arrival on Pub/Sub.
            stored_ms = _entry_ms(a.get("reading_entry_id"))
            split: tuple[float, ...] = ()
            if (
                stored_ms is not None
                and "detected_ms" in a
                and a["alert_id"] in arrivals
                and key in received_at
            ):
                split = (
                    received_at[key] - t_pub,
                    stored_ms - t_pub,
                    a["detected_ms"] - stored_ms,
                    arrivals[a["alert_id"]] - a["detected_ms"],
                )
                for name, ms in zip(stages, split, strict=True):
                    stages[name].append(ms)
            slowest.append((t_arr - t_pub, a["alert_id"], a.get("rule", "?"), t_pub - t0, split))
    injected = Counter(labels[k] for k in sent_keys if k in labels)
    per_class = {}
    for cls in ANOMALY_CLASSES:
        n = injected.get(cls, 0)
        per_class[cls] = {
            "injected": n,
            "detected": detected_labels.get(cls, 0),
            "recall": round(detected_labels.get(cls, 0) / n, 3) if n else None,
        }
    n_detected = len(detected_ids)
    true_alerts = sum(detected_labels.values())
    elapsed = stats.elapsed_s or cfg.duration_s
    return {
        # Offered: what the fleet actually sent per second (its devices go silent now and then, so this is a
        # little under the nominal rate); achieved: readings the broker took and the stream holds, per second.
        "offered_rate": round(len(sent_keys) / max(cfg.duration_s, 1e-9), 1),
        "nominal_rate": round(stats.offered_rate or cfg.rate, 1),
        "achieved_rate": round(len(acked_keys & stored_keys) / max(cfg.duration_s, 1e-9), 1),
        "publish_elapsed_s": round(elapsed, 2),
        "sent": len(all_acked),
        "sent_unacked": len(all_sent - all_acked),
        "stored": len(stored_keys & all_sent),
        "warmup_readings": len(warm),
        "lost": len(lost),
        "lost_sample": [":".join(map(str, k)) for k in lost[:10]],
        "duplicated": duplicated,
        "duplicate_alert_ids": duplicate_alerts,
        "latency_ms": {
            "p50": percentile(latencies, 0.50),
            "p95": percentile(latencies, 0.95),
            "p99": percentile(latencies, 0.99),
            "n": len(latencies),
        },
        # The five slowest anomalies: where a tail comes from (a rule, a moment of the run).
        "slowest": [
            {
                "ms": round(ms), "alert_id": aid, "rule": rule, "at_s": round(at / 1000, 1),
                "published": _utc_ms(t0 + at),
                "stages_ms": dict(zip(stages, (round(x) for x in split), strict=True)) if split else None,
                **_rewrite_flag(rewrites, t0 + at, ms),
            }
            for ms, aid, rule, at, split in sorted(slowest, reverse=True)[:5]
        ],
        # Publish -> ingest took the message from the broker (publisher, broker and ingest's MQTT thread).
        "received_ms": {
            "p50": percentile(receive_delays, 0.50),
            "p99": percentile(receive_delays, 0.99),
            "max": max(receive_delays, default=None),
        },
        "stored_ms": {
            "p50": percentile(store_delays, 0.50),
            "p99": percentile(store_delays, 0.99),
            "max": max(store_delays, default=None),
        },
        "stages_ms": {
            name: {"p50": percentile(v, 0.50), "p99": percentile(v, 0.99)} for name, v in stages.items()
        },
        "anomalies_injected": sum(injected.values()),
        "anomalies_detected": n_detected,
        "true_alerts": true_alerts,
        "false_alerts": false_alerts,
        "precision": round(true_alerts / n_detected, 3) if n_detected else None,
        "recall": round(true_alerts / sum(injected.values()), 3) if injected else None,
        "per_class": per_class,
        "config": {
            "rate": cfg.rate, "duration_s": cfg.duration_s, "sites": cfg.sites, "sensors": cfg.sensors,
            "batch": cfg.batch, "anomaly_rate": cfg.anomaly_rate, "seed": cfg.seed,
        },
    }  # fmt: skip


#: The embedded server's ``latency-monitor-threshold`` during a self-contained run.
REDIS_LATENCY_THRESHOLD_MS = 5
#: Slow-log entries kept by a self-contained run's server (``slowlog-max-len``), read back by :func:`slow_commands`.
SLOWLOG_KEPT = 1024


def redis_stalls(r: redis.Redis, since_s: float, until_s: float | None = None) -> dict[str, dict[str, Any]]:
    """Redis's own latency events (``LATENCY HISTORY``: fork, aof-write, command, ...) from ``since_s`` to
    ``until_s`` (epoch s, whole seconds as the server records them): per event, how many and the longest in ms, and
    the UTC times of the longest three."""
    out: dict[str, dict[str, Any]] = {}
    last = math.inf if until_s is None else until_s
    for row in r.latency_latest() or []:
        event = row[0].decode() if isinstance(row[0], bytes) else str(row[0])
        samples = [
            (int(at), int(ms)) for at, ms in r.latency_history(event) if int(since_s) <= int(at) <= last
        ]
        if samples:
            worst = sorted(samples, key=lambda s: -s[1])[:3]
            out[event] = {
                "count": len(samples),
                "max_ms": max(ms for _at, ms in samples),
                "worst_at": [f"{time.strftime('%H:%M:%S', time.gmtime(at))} {ms} ms" for at, ms in worst],
            }
    return out


_REWRITE_EVENT = re.compile(
    r"^\d+:M (\d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2}\.\d{3}) \* "
    r"(Background append only file rewriting started|Background AOF rewrite (?:finished|terminated))"
)


def aof_rewrites(server_log: Path, since_s: float, until_s: float) -> list[tuple[float, float]]:
    """AOF rewrites the server's log shows running between ``since_s`` and ``until_s`` (epoch s), as (start, end).

    A rewrite child serializes the whole dataset (a core for a second or more once the streams hold hundreds of MB);
    a rewrite still running at ``until_s`` ends there. Times are the server's local time, as this process reads it.
    """
    out: list[tuple[float, float]] = []
    start: float | None = None
    try:
        lines = server_log.read_text(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        m = _REWRITE_EVENT.match(line)
        if m is None:
            continue
        at = time.mktime(time.strptime(m.group(1)[:-4], "%d %b %Y %H:%M:%S")) + int(m.group(1)[-3:]) / 1000
        if m.group(2).endswith("started"):
            start = at
        elif start is not None:
            if at >= since_s and start <= until_s:
                out.append((start, at))
            start = None
    if start is not None and start <= until_s:
        out.append((start, until_s))
    return out


def _rewrite_flag(
    rewrites: list[tuple[float, float]] | None, published_ms: float, ms: float
) -> dict[str, bool]:
    """``{"in_rewrite": ...}``: did the way from ``published_ms`` (epoch ms) to ``ms`` later overlap an AOF rewrite
    (epoch s windows)? Nothing when the rewrites are unknown."""
    if rewrites is None:
        return {}
    start, end = published_ms / 1000, (published_ms + ms) / 1000
    return {"in_rewrite": any(r0 <= end and start <= r1 for r0, r1 in rewrites)}


def slow_commands(r: redis.Redis, since_s: float, until_s: float | None = None) -> dict[str, dict[str, Any]]:
    """Which commands made the server's ``command`` stalls: ``SLOWLOG`` entries from ``since_s`` to ``until_s``
    (epoch s), per command name and client name (for a script, the start of its sha), how many and the longest in
    ms, with the UTC time of the longest."""
    last = math.inf if until_s is None else until_s
    out: dict[str, dict[str, Any]] = {}
    for row in r.slowlog_get(SLOWLOG_KEPT):
        at, us = int(row["start_time"]), int(row["duration"])
        if not int(since_s) <= at <= last:
            continue
        words = [
            w.decode(errors="replace") if isinstance(w, bytes) else str(w) for w in row["command"].split()[:2]
        ]
        name = words[0].upper() if words else "?"
        if name in ("EVALSHA", "EVAL", "FCALL") and len(words) > 1:
            name = f"{name} {words[1][:12]}"
        client = row.get("client_name") or b""
        client = client.decode(errors="replace") if isinstance(client, bytes) else str(client)
        if client:
            name = f"{name} ({client})"
        ms = round(us / 1000, 1)
        stat = out.setdefault(name, {"count": 0, "max_ms": 0.0, "worst_at": ""})
        stat["count"] += 1
        if ms > stat["max_ms"]:
            stat["max_ms"] = ms
            stat["worst_at"] = time.strftime("%H:%M:%S", time.gmtime(at))
    return out


def _copy_logs(tmp: Path, dest: Path) -> None:
    """The crews' logs (``logs/``) and the embedded servers' (``<server>/<server>.log``) into ``dest``."""
    shutil.copytree(tmp / "logs", dest, dirs_exist_ok=True)
    for log in tmp.glob("*/*.log"):
        if log.parent.name != "logs":
            shutil.copy2(log, dest / log.name)


def _entry_ms(entry_id: str | None) -> int | None:
    """The millisecond part of a stream entry id (``"1718000000000-3"``), or None."""
    if not entry_id:
        return None
    head = entry_id.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def run_load(
    cfg: LoadConfig,
    *,
    redis_url: str | None,
    mqtt_url: str | None,
    self_contained: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run one load test and return the report (see module docstring)."""
    say = progress or (lambda _msg: None)
    stack = contextlib.ExitStack()
    fake: Any = None
    rewrites: list[tuple[float, float]] | None = None  # known for an embedded server only
    warm_fit_args: list[str] = []
    pipeline: Any = None
    with stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="wd-load-")))
        if self_contained:
            from waterdoctor.supervisor import Pipeline

            extra_env: dict[str, str] = {}
            if cfg.sms:
                from simulators.twilio_fake import TwilioFakeProcess

                # Its own process: acceptance times must not wait for this process's GIL (the publisher's).
                fake = stack.enter_context(TwilioFakeProcess(tmp))
                extra_env = sms_env(fake.account_sid, fake.auth_token, fake.base_url, cfg.sites, tmp)
            crew_args = dict(cfg.crew_args)
            if cfg.warmup_readings:
                # Fit the warm-up's models quickly (two fit processes, no rate bound): the measured run should
                # start with every sensor modelled.
                warm_fit_args = ["--fits-per-s", "1000", "--refit-workers", "2", "--refit-nice", "0"]
                crew_args["analytics"] = [
                    *crew_args.get("analytics", []),
                    *warm_fit_args,
                ]  # the last flag wins
            pipeline = Pipeline(
                data_dir=tmp,
                redis_kind=cfg.redis_kind,
                crew_args=crew_args,
                crews=("ingest", "analytics", "alerting"),
                extra_env=extra_env,
            )
            keep_logs = os.environ.get("WD_LOAD_LOGS")
            # Copy the crews' and the servers' logs out of the temporary folder when the run ends.
            if keep_logs:
                stack.callback(_copy_logs, tmp, Path(keep_logs))
            stack.callback(pipeline.stop)
            pipeline.start()
            say(f"started private servers ({pipeline.redis_url}, {pipeline.mqtt_url}) and crews")
            wait_for_metrics([c.metrics_port for c in pipeline.processes.values()])
            redis_url, mqtt_url = pipeline.redis_url, pipeline.mqtt_url
        if not redis_url or not mqtt_url:
            raise ValueError("load needs WD_REDIS_URL and WD_MQTT_URL, or --self-contained")
        r = redis.Redis.from_url(redis_url)
        stack.callback(r.close)
        if self_contained:  # our own server: record its stalls of 5 ms or more (LATENCY HISTORY, per event)
            r.config_set("latency-monitor-threshold", REDIS_LATENCY_THRESHOLD_MS)
            # ... and which commands they were (the slow log's threshold is in microseconds)
            r.config_set("slowlog-log-slower-than", REDIS_LATENCY_THRESHOLD_MS * 1000)
            r.config_set("slowlog-max-len", SLOWLOG_KEPT)
        listener = AlertListener(redis_url, tmp)
        stack.callback(listener.close)
        speed = HostSpeedMeter(tmp)
        stack.callback(speed.close)
        interval_s = cfg.sites * cfg.sensors / cfg.rate
        warm_ms = round(cfg.warmup_readings * interval_s * 1000)
        fleet = Fleet.for_rate(
            cfg.rate, sites=cfg.sites, sensors_per_site=cfg.sensors, anomaly_rate=cfg.anomaly_rate,
            seed=cfg.seed, start_ms=int(time.time() * 1000) - warm_ms, seq_start=int(time.time()),
        )  # fmt: skip
        log = PublishLog()
        tally = StoredTally()
        publisher = Publisher(MqttEndpoint.parse(mqtt_url), batch=cfg.batch, log=log)
        publisher.start()
        warm_keys: set[tuple[str, str, int]] = set()
        warm_mark = 0

        def model_fits() -> float | None:
            # Looked up each time: the warm-up restarts analytics on another port.
            port = pipeline.processes["analytics"].metrics_port if pipeline is not None else 0
            return metric_sum(port, "wd_analytics_model_fits_total", 'outcome="ok"')

        fits_before: float | None = None
        if cfg.warmup_readings:
            say(f"warm-up: {cfg.warmup_readings} readings per sensor ({warm_ms / 1000:.0f}s of fleet time)")
            n_sensors = cfg.sites * cfg.sensors
            deadline = time.monotonic() + cfg.model_wait_s
            last, last_change = -1, time.monotonic()
            publisher.publish(fleet.step(int(time.time() * 1000)))  # the warm-up readings, then live ones
            publisher.flush()
            while True:
                # Let the pipeline drain and the models be fitted. Meanwhile the fleet's clock follows the wall
                # clock, but only sensors still without a model get their readings published (the others look
                # silent): publishing everything made every round longer than the last at high rates (fits and
                # scoring on the same cores) and the warm-up never ended. The detector restarts a sensor's
                # baseline after a silence, so the measured run starts clean.
                publisher.drain(60)
                wait_drained(r, log.first_sends_acked, 60, tally)
                modelled = {
                    f.decode() if isinstance(f, bytes) else f for f in r.hkeys(keys.MODEL_GENERATIONS)
                }
                publisher.publish(
                    [
                        x
                        for x in fleet.step(int(time.time() * 1000))
                        if f"{x.site}:{x.sensor_id}" not in modelled
                    ]
                )
                publisher.flush()
                ready = len(modelled)
                if ready != last:
                    last, last_change = ready, time.monotonic()
                # Sensors that were silent through the warm-up get no model yet: stop once the count settles.
                settled = ready > 0 and time.monotonic() - last_change > 15.0
                if ready >= n_sensors or settled or time.monotonic() > deadline:
                    break
                time.sleep(1.0)
            say(f"models ready for {ready}/{n_sensors} sensors")
            if self_contained and warm_fit_args:
                # The fast warm-up fit rate would go on refitting through the measured run and take a core the
                # pipeline needs: restart analytics as configured; it loads the stored models.
                pipeline.stop_crew("analytics")
                del pipeline.processes["analytics"]
                pipeline.crew_args["analytics"] = list(cfg.crew_args.get("analytics", []))
                port = pipeline.start_crew("analytics").metrics_port
                wait_for_metrics([port])
                wait_for_gauge(port, "wd_analytics_models", ready)  # it loads every stored model first
                fleet.step(int(time.time() * 1000))  # dropped, as above
            # Catch the fleet up with the wall clock (fits and the restart took a while) until a catch-up round is
            # short: the measured run must start in a steady state, not behind a burst of the fleet's backlog.
            for _ in range(20):
                started = time.monotonic()
                publisher.publish(fleet.step(int(time.time() * 1000)))
                publisher.flush()
                publisher.drain(60)
                wait_drained(r, log.first_sends_acked, 60, tally)
                if time.monotonic() - started < 0.1:
                    break
            # Live publishing before measuring (``lead_in_s``): the sensors whose readings were dropped while the
            # models were fitted come back from a silence (a baseline restart each), and late readings buffered
            # through that wait arrive now. What was sent so far is warm-up (its keys are taken after the run).
            # The fit count is read here, not at the start of the measured window: building the metrics page holds
            # the crew's GIL for a moment.
            fits_before = model_fits()
            publisher.run(fleet, cfg.lead_in_s)
            warm_mark = log.readings_sent
        say(f"publishing {cfg.rate:,.0f} readings/s for {cfg.duration_s:.0f}s (batch {cfg.batch})")

        def on_progress(s: PublishStats) -> None:
            say(
                f"  t={s.elapsed_s:5.1f}s sent={s.readings_sent:,} acked={s.readings_acked:,} unacked_msgs={s.messages_unacked}"
            )

        if not cfg.warmup_readings:
            fits_before = model_fits()
        measured_from_s = time.time()
        stats = publisher.run(fleet, cfg.duration_s, on_progress=on_progress, progress_every_s=5.0)
        stats = publisher.close(drain_timeout_s=30)
        say(f"published {stats.readings_sent:,} readings; waiting for the pipeline to drain")
        t_drain = time.monotonic()
        idle_at = wait_drained(r, len(log.acked_keys()), cfg.drain_timeout_s, tally)
        drained = idle_at is not None
        counted_s = time.monotonic() - t_drain
        fits_after = model_fits()  # from the lead-in to the drain
        if warm_mark:
            warm_keys = log.sent_keys(stop=warm_mark)
        drain_s = (idle_at - t_drain) if idle_at is not None else counted_s
        say(f"drained in {drain_s:.1f}s" if drained else "NOT drained")
        time.sleep(1.0)  # let the last Pub/Sub alerts arrive
        arrivals = listener.collect()
        measured_until_s = time.time()  # before the report reads the whole streams (a stall of its own)
        server = pipeline.redis_server if pipeline is not None else None
        if server is not None:  # our own server: its log tells the AOF rewrites
            rewrites = aof_rewrites(server.data_dir / f"{server.name}.log", measured_from_s, measured_until_s)
        report = build_report(cfg, stats, log, r, arrivals, exclude=warm_keys, rewrites=rewrites)
        if rewrites is not None:
            report["aof_rewrites"] = [
                {"start": _utc_ms(start * 1000), "s": round(end - start, 2)} for start, end in rewrites
            ]
        if self_contained:
            report["redis_stalls"] = redis_stalls(r, measured_from_s, measured_until_s)
            report["slow_commands"] = slow_commands(r, measured_from_s, measured_until_s)
        # The host's own speed meanwhile (other guests, clock): the same code is slower when the host is.
        report["host_speed"] = speed.summary(measured_from_s, measured_until_s)
        report["drained"] = drained
        # Seconds from the last publish until analytics had scored everything (polled every 50 ms): a pipeline
        # that keeps up drains in about a second; one that falls behind carries its backlog here. Up to session 8
        # this included counting the stored readings (the runner reading the measured run's entries back: 0.3 to
        # 0.4 s after 30 s at 10,000/s): ``drain_counted_s`` is that older figure, kept to compare with.
        report["drain_s"] = round(drain_s, 1)
        report["drain_counted_s"] = round(counted_s, 1)
        report["publisher_stalls"] = {"max_s": round(stats.max_stall_s, 3), "over_100ms": stats.stalls}
        if fits_before is not None and fits_after is not None:
            # Refits keep models current as data drifts: they must go on under load, not starve.
            report["model_fits"] = int(fits_after - fits_before)
        if fake is not None:
            time.sleep(2.0)  # the last SMS of the run
            report["sms"] = sms_report(
                [(a.alert_id, a.to, a.at) for a in fake.accepted()], log, warm_keys, arrivals, rewrites
            )
        return report


def sms_env(sid: str, token: str, base_url: str, sites: int, folder: Path) -> dict[str, str]:
    """Environment for an alerting crew that texts one phone per site through the Twilio API at ``base_url``."""
    routing = folder / "routing.toml"
    routing.write_text(
        "".join(
            f'[[route]]\nsites = ["plant-{i + 1}"]\nphones = ["+1555100{i + 1:04d}"]\n\n'
            for i in range(sites)
        )
    )
    return {
        "TWILIO_ACCOUNT_SID": sid,
        "TWILIO_AUTH_TOKEN": token,
        "WD_SMS_FROM": "+15550000000",
        "WD_TWILIO_BASE_URL": base_url,
        "WD_ROUTING_FILE": str(routing),
    }


def sms_report(
    accepted: list[tuple[str | None, str, float]],
    log: PublishLog,
    exclude: set[tuple[str, str, int]],
    arrivals: dict[str, float] | None = None,
    rewrites: list[tuple[float, float]] | None = None,
) -> dict[str, Any]:
    """SMS accepted by the Twilio fake: count, duplicates per (alert, phone), latency from the reading's publish,
    and (given the alerts' Pub/Sub ``arrivals``) the alerting crew's share: alert on Pub/Sub -> SMS accepted;
    given the AOF ``rewrites``, each of the slowest SMS says if it met one."""
    publish_ms = log.publish_ms()
    per_key = Counter((alert_id, to) for alert_id, to, _at in accepted)
    latencies = []
    hop = []
    # (ms, alert_id, published, Pub/Sub arrival), times in epoch ms
    slowest: list[tuple[float, str, float, float | None]] = []
    for alert_id, _to, at in accepted:
        if alert_id is None:
            continue
        site, sensor_id, seq = alert_id.rsplit(":", 2)
        key = (site, sensor_id, int(seq)) if seq.isdigit() else None
        if key is None or key in exclude or key not in publish_ms:
            continue
        latencies.append(max(0.0, at * 1000 - publish_ms[key]))
        arrived = arrivals.get(alert_id) if arrivals else None
        if arrived is not None:
            hop.append(at * 1000 - arrived)
        slowest.append((latencies[-1], alert_id, publish_ms[key], arrived))
    return {
        "accepted": len(accepted),
        "duplicates": sum(c - 1 for c in per_key.values() if c > 1),
        "latency_ms": {
            "p50": percentile(latencies, 0.50),
            "p95": percentile(latencies, 0.95),
            "p99": percentile(latencies, 0.99),
            "n": len(latencies),
        },
        "alerting_hop_ms": {
            "p50": percentile(hop, 0.50),
            "p99": percentile(hop, 0.99),
            "max": max(hop, default=None),
        },
        # The five slowest SMS: when the reading was published, and how long it took to reach Pub/Sub and then
        # the fake (the alerting crew's hop).
        "slowest": [
            {
                "ms": round(ms),
                "alert_id": alert_id,
                "published": _utc_ms(published),
                "to_pubsub_ms": None if arrived is None else round(arrived - published),
                "hop_ms": None if arrived is None else round(ms - (arrived - published)),
                **_rewrite_flag(rewrites, published, ms),
            }
            for ms, alert_id, published, arrived in sorted(slowest, reverse=True)[:5]
        ],
    }


def _utc_ms(epoch_ms: float) -> str:
    """``HH:MM:SS.mmm`` (UTC) of an epoch-milliseconds time: to line a moment up with logs."""
    return time.strftime("%H:%M:%S", time.gmtime(epoch_ms / 1000)) + f".{int(epoch_ms) % 1000:03d}"


def verdict(report: dict[str, Any], cfg: LoadConfig, strict: bool = False) -> list[str]:
    """Why the run failed (empty: it passed): any loss, or the rate not reached; ``strict`` adds duplicates."""
    problems = []
    if strict and report["duplicated"]:
        problems.append(f"{report['duplicated']} readings stored twice")
    if strict and report["duplicate_alert_ids"]:
        problems.append(f"{report['duplicate_alert_ids']} duplicate alert ids in the anomaly stream")
    if report["lost"]:
        problems.append(f"{report['lost']} readings lost")
    if report["achieved_rate"] < cfg.min_rate_ratio * report["offered_rate"]:
        problems.append(f"achieved {report['achieved_rate']}/s of {report['offered_rate']}/s offered")
    if strict and report.get("sms", {}).get("duplicates"):
        problems.append(f"{report['sms']['duplicates']} SMS sent twice to one phone for one alert")
    if not report.get("drained", True):
        problems.append("the pipeline did not drain in time")
    return problems


__all__ = ["LoadConfig", "build_report", "run_load", "verdict"]
