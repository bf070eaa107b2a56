"""The contract metrics (CONTRACT.md section 7) as a real Prometheus server sees them.

A :class:`~waterdoctor.supervisor.Pipeline` runs every crew as its own process on free metrics ports, with an
embedded Valkey and Mosquitto; a private ``prometheus`` (own TSDB in ``tmp_path``, free port, 1 s scrapes) scrapes
them. Known traffic goes in over MQTT (readings, two pH 15 readings that must become critical anomalies and dry-run
SMS, a repeat, two malformed messages), and every contract series is read back through ``/api/v1/query`` and
compared with what Redis holds. The deployed alert rules (deploy/rules.yml) are loaded too: they must evaluate
without error and stay silent on the healthy pipeline. Then one malformed readings entry must be counted in
``wd_dead_letters_total``. At the end every crew must exit 0 on SIGTERM.

Prometheus comes from Debian's ``prometheus`` package: ``scripts/ensure-prometheus.sh`` installs it. Without it
these tests fail (they do not skip): a metrics contract that was never scraped is not proven.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from handoff import keys
from simulators.load import wait_for_metrics
from tests.ingest.mqtt_tools import publish
from waterdoctor.supervisor import CREWS, Pipeline

REPO = Path(__file__).resolve().parents[2]
DEPLOY_RULES = REPO / "deploy" / "rules.yml"
ENSURE = "scripts/ensure-prometheus.sh"
SITE = "plant-m"
GATEWAY = "gw-1"
SENSORS = ("s-1", "s-2", "s-3", "s-4")
PER_SENSOR = 25
BATCH = 10
#: (sensor, index) of the readings published with pH 15: above the hard limit, so critical even during warm-up.
OUT_OF_RANGE = {("s-1", PER_SENSOR - 1), ("s-3", PER_SENSOR - 1)}
SERIES_TIMEOUT_S = 25.0
#: Environment that would change what the crews do (real Twilio, routes) or where they connect.
_ISOLATE_ENV = (
    "TWILIO_ACCOUNT_SID",
    "TWILIO_AUTH_TOKEN",
    "WD_SMS_FROM",
    "WD_TWILIO_BASE_URL",
    "WD_ROUTING_FILE",
    "WD_REDIS_URL",
    "WD_MQTT_URL",
)

Series = list[tuple[dict[str, str], float]]


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"`{name}` is not on PATH: these tests scrape the crews with a real Prometheus. "
            f"Install it with `sudo sh {ENSURE}` (Debian package `prometheus`; `make env` runs it).",
            pytrace=False,
        )
    return path


# -- Prometheus ----------------------------------------------------------------------------------------------


@dataclass
class Prometheus:
    """A private Prometheus server and a minimal client of its HTTP API."""

    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/{path}``: its ``data``."""
        qs = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{qs}", timeout=5) as resp:
            body: dict[str, Any] = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> Series:
        """Instant query: ``[(labels, value), ...]``."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return [(s["metric"], float(s["value"][1])) for s in data["result"]]

    def wait(
        self, expr: str, ok: Callable[[Series], bool], what: str, timeout_s: float = SERIES_TIMEOUT_S
    ) -> Series:
        """Query ``expr`` until ``ok(result)``; fail with the last result seen."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(expr)
            if ok(result):
                return result
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: `{expr}` never satisfied in {timeout_s:.0f}s; last result: {result}")
            time.sleep(0.5)

    def wait_rules(self, n: int, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """The loaded alert rules, once ``n`` of them have been evaluated at least once."""
        deadline = time.monotonic() + timeout_s
        while True:
            rules = [rule for g in self.api("rules")["groups"] for rule in g["rules"]]
            if len(rules) >= n and all(rule["health"] != "unknown" for rule in rules):
                return rules
            if time.monotonic() > deadline:
                pytest.fail(f"{n} rules of {DEPLOY_RULES} not all evaluated in {timeout_s:.0f}s: {rules}")
            time.sleep(0.5)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def scrape_config(ports: dict[str, int], rules: Path) -> str:
    """A Prometheus config scraping each crew every second, each target labelled with its ``crew``, and
    evaluating the deployed alert rules every second."""
    targets = "".join(
        f'      - targets: ["127.0.0.1:{port}"]\n        labels: {{crew: {crew}}}\n'
        for crew, port in ports.items()
    )
    return (
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {json.dumps(str(rules))}\n"
        "scrape_configs:\n  - job_name: waterdoctor\n    static_configs:\n" + targets
    )


@contextlib.contextmanager
def running_prometheus(tmp_path: Path, ports: dict[str, int]) -> Iterator[Prometheus]:
    """Start ``prometheus`` on a free port with its own TSDB under ``tmp_path``; stop it (by its pid) after."""
    binary = _binary("prometheus")
    config = tmp_path / "prometheus.yml"
    config.write_text(scrape_config(ports, DEPLOY_RULES))
    check = subprocess.run(
        [_binary("promtool"), "check", "config", str(config)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    port = listen_ports(1)[0]
    log_path = tmp_path / "prometheus.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited with {proc.returncode}:\n{prom.log_tail()}")
            try:
                with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except (OSError, urllib.error.HTTPError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus not ready in 20s:\n{prom.log_tail()}")
            time.sleep(0.1)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rule_names() -> list[str]:
    """Alert names in deploy/rules.yml (read as text: no YAML library is a dependency)."""
    return [
        line.split(":", 1)[1].strip() for line in DEPLOY_RULES.read_text().splitlines() if "- alert:" in line
    ]


# -- traffic -------------------------------------------------------------------------------------------------


def _ts(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _reading(sensor: str, i: int, t0_ms: int) -> dict[str, Any]:
    # Values move a little from reading to reading: a flat line would be a "stuck" sensor, not a normal one.
    ph = 15.0 if (sensor, i) in OUT_OF_RANGE else 7.1 + 0.01 * (i % 7)
    return {
        "site": SITE,
        "sensor_id": sensor,
        "seq": 1000 + i,
        "ts": _ts(t0_ms + i * 1000),
        "metrics": {"ph": ph, "turbidity_ntu": 0.4 + 0.003 * (i % 5), "chlorine_mg_l": 1.0 + 0.002 * (i % 3)},
    }


def traffic(t0_ms: int) -> tuple[list[tuple[str, bytes]], int]:
    """Messages to publish and the number of distinct readings among them.

    Gateway batches of every sensor's readings (two with pH 15), one repeat of a reading already sent (stored
    once), one message that is not JSON and one reading with no metrics (quarantined as ``invalid_json`` and
    ``schema``).
    """
    readings = [_reading(s, i, t0_ms) for i in range(PER_SENSOR) for s in SENSORS]
    messages = [
        (
            f"wd/{SITE}/{GATEWAY}/batch",
            orjson.dumps({"gateway_id": GATEWAY, "readings": readings[k : k + BATCH]}),
        )
        for k in range(0, len(readings), BATCH)
    ]
    messages.append((f"wd/{SITE}/s-2/telemetry", orjson.dumps(readings[5])))  # a repeat: stored once
    messages.append((f"wd/{SITE}/s-2/telemetry", b'{"site": "plant-m", "sensor_id": "s-2", '))  # invalid_json
    no_metrics = {**_reading("s-4", PER_SENSOR, t0_ms), "metrics": {}}
    messages.append((f"wd/{SITE}/s-4/telemetry", orjson.dumps(no_metrics)))  # schema
    return messages, len(readings)


def publish_until_stored(mqtt_url: str, r: redis.Redis, timeout_s: float = 20.0) -> int:
    """Publish canary readings until ingest stores one: it has subscribed. Returns canaries stored."""
    deadline = time.monotonic() + timeout_s
    seq = 0
    while True:
        seq += 1
        reading = {
            "site": SITE,
            "sensor_id": "canary",
            "seq": seq,
            "ts": _ts(int(time.time() * 1000)),
            "metrics": {"ph": 7.0 + 0.01 * seq},
        }
        publish(mqtt_url, [(f"wd/{SITE}/canary/telemetry", orjson.dumps(reading))], client_id="wd-canary")
        step = time.monotonic() + 1.0
        while time.monotonic() < step:
            n = sum(1 for reading in stored(r) if reading["sensor_id"] == "canary")
            if n:
                return n
            time.sleep(0.05)
        if time.monotonic() > deadline:
            pytest.fail("ingest stored no canary reading: it never subscribed to the broker")


# -- ground truth from Redis ---------------------------------------------------------------------------------


def entries(r: redis.Redis, stream: str) -> list[dict[str, Any]]:
    rows: Any = r.xrange(stream)
    return [orjson.loads(fields[keys.PAYLOAD_FIELD.encode()]) for _id, fields in rows]


def stored(r: redis.Redis) -> list[dict[str, Any]]:
    return [reading for entry in entries(r, keys.READINGS) for reading in entry["readings"]]


def group_info(r: redis.Redis, stream: str, group: str) -> dict[str, Any] | None:
    groups: Any = r.xinfo_groups(stream)
    for g in groups:
        name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
        if name == group:
            return dict(g)
    return None


def drained(r: redis.Redis, stream: str, group: str) -> bool:
    g = group_info(r, stream, group)
    return g is not None and g["pending"] == 0 and g.get("lag") == 0


def by_crew(series: Series) -> dict[str, float]:
    return {labels.get("crew", "?"): value for labels, value in series}


def single(series: Series, what: str) -> float:
    values = set(by_crew(series).values())
    assert len(values) == 1, f"{what}: crews disagree or no series: {series}"
    return values.pop()


def listen_ports(n: int) -> list[int]:
    """``n`` distinct ports that are free now, below the kernel's ephemeral range.

    The crews bind their metrics port only after importing their libraries (seconds, more on a loaded machine).
    A port from ``free_port`` (bind to 0) lies in the ephemeral range, where any outgoing connection of any process
    may take it in the meantime; a port below that range is handed out only to whoever asks for it by number.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    ports: list[int] = []
    for port in random.sample(range(20000, max(low, 20000 + 100)), 200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("0.0.0.0", port))  # the crews listen on every address
            except OSError:
                continue
        ports.append(port)
        if len(ports) == n:
            return ports
    raise RuntimeError(f"no {n} free ports below {low}")


def crew_logs(pipeline: Pipeline, lines: int = 15) -> str:
    out = []
    for crew in pipeline.processes.values():
        text = crew.log_path.read_text(errors="replace") if crew.log_path.exists() else ""
        out.append(f"--- {crew.name} ---\n" + "\n".join(text.splitlines()[-lines:]))
    return "\n".join(out)


# -- tests ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rules", "config"])
def test_deploy_files_pass_promtool(kind: str) -> None:
    """deploy/rules.yml and deploy/prometheus.yml (which loads the rules) are what Prometheus accepts."""
    path = REPO / "deploy" / ("rules.yml" if kind == "rules" else "prometheus.yml")
    done = subprocess.run(
        [_binary("promtool"), "check", kind, str(path)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


def test_contract_metrics_scraped_by_real_prometheus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _binary("prometheus")  # fail first, before starting anything, when Prometheus is missing
    for var in _ISOLATE_ENV:
        monkeypatch.delenv(var, raising=False)
    ports = dict(zip(CREWS, listen_ports(len(CREWS)), strict=True))
    pipeline = Pipeline(
        data_dir=tmp_path / "wd",
        crews=CREWS,
        metrics_ports=ports,
        # Retention publishes its stream gauges once per pass: every second here, not every minute.
        crew_args={"retention": ["--interval", "1s"]},
    )
    codes: dict[str, int | None] | None = None
    started = time.monotonic()
    try:
        pipeline.start()
        # Prometheus starts while the crews import their libraries (analytics: scikit-learn, seconds).
        with running_prometheus(tmp_path, ports) as prom:
            wait_for_metrics(list(ports.values()), timeout_s=45)
            assert not pipeline.check(), f"crews exited: {pipeline.check()}\n{crew_logs(pipeline)}"
            assert pipeline.redis_url and pipeline.mqtt_url
            r = redis.Redis.from_url(pipeline.redis_url)
            prom.wait('up{job="waterdoctor"} == 1', lambda s: len(s) == len(CREWS), "every crew scraped")

            canaries = publish_until_stored(pipeline.mqtt_url, r)
            t0_ms = int(time.time() * 1000) - (PER_SENSOR - 1) * 1000  # the last readings are stamped "now"
            messages, n_readings = traffic(t0_ms)
            publish(pipeline.mqtt_url, messages, client_id="wd-traffic")
            published_ms = time.time() * 1000

            # Quiet: everything stored and quarantined, analytics and alerting caught up on their streams.
            deadline = time.monotonic() + SERIES_TIMEOUT_S
            while not (
                len(stored(r)) == n_readings + canaries
                and len(entries(r, keys.QUARANTINE)) == 2
                and drained(r, keys.READINGS, keys.GROUP_ANALYTICS)
                and len(entries(r, keys.ANOMALIES)) >= len(OUT_OF_RANGE)
                and drained(r, keys.ANOMALIES, keys.GROUP_ALERTING)
            ):
                assert not pipeline.check(), f"crews exited: {pipeline.check()}\n{crew_logs(pipeline)}"
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"pipeline not quiet: stored {len(stored(r))}/{n_readings + canaries}, quarantined "
                        f"{len(entries(r, keys.QUARANTINE))}, anomalies {len(entries(r, keys.ANOMALIES))}, "
                        f"analytics {group_info(r, keys.READINGS, keys.GROUP_ANALYTICS)}, "
                        f"alerting {group_info(r, keys.ANOMALIES, keys.GROUP_ALERTING)}\n{crew_logs(pipeline)}"
                    )
                time.sleep(0.2)

            readings = stored(r)
            assert len({(x["site"], x["sensor_id"], x["seq"]) for x in readings}) == len(readings)
            anomalies = entries(r, keys.ANOMALIES)
            flagged = {(a["sensor_id"], a["seq"] - 1000) for a in anomalies}
            assert flagged >= OUT_OF_RANGE, anomalies
            severities = Counter(a["severity"] for a in anomalies)
            reasons = Counter(q["reason"] for q in entries(r, keys.QUARANTINE))
            assert reasons == {"invalid_json": 1, "schema": 1}, reasons
            n_entries = int(r.xlen(keys.READINGS))

            # Ingest: readings stored (after dedupe) and quarantined messages, by reason.
            # Commands import their crew only when they run, so only the ingest process exports this counter.
            prom.wait(
                "wd_ingest_readings_total",
                lambda s: by_crew(s) == {"ingest": len(readings)},
                f"wd_ingest_readings_total == {len(readings)} readings in {keys.READINGS}",
            )
            prom.wait(
                "wd_quarantined_total",
                lambda s: (
                    {x["reason"]: v for x, v in s if v} == dict(reasons)  # every reason exported from 0
                    and {x["crew"] for x, _ in s} == {"ingest"}
                ),
                f"wd_quarantined_total{{reason}} == {dict(reasons)}",
            )

            # Analytics: anomalies by severity, entries acknowledged on the readings stream.
            prom.wait(
                "wd_anomalies_total",
                # Both severities are exported from the start (at 0), so compare the non-zero ones.
                lambda s: (
                    {x["severity"]: v for x, v in s if v} == dict(severities)
                    and {x["crew"] for x, _ in s} == {"analytics"}
                ),
                f"wd_anomalies_total{{severity}} == {dict(severities)}",
            )
            assert severities["critical"] >= len(OUT_OF_RANGE)
            read_sel = f'{{stream="{keys.READINGS}",group="{keys.GROUP_ANALYTICS}"}}'
            prom.wait(
                f"wd_acked_total{read_sel}",
                lambda s: by_crew(s) == {"analytics": n_entries},
                f"wd_acked_total{read_sel} == {n_entries} entries of {keys.READINGS}",
            )

            # Alerting: one dry-run SMS per anomaly (no routing file, no Twilio), each with its latency.
            n_sms = len(anomalies)
            prom.wait(
                "wd_sms_total",
                lambda s: (
                    {x["outcome"]: v for x, v in s if v}
                    == {"dry_run": n_sms}  # every outcome exported from 0
                    and {x["crew"] for x, _ in s} == {"alerting"}
                ),
                f'wd_sms_total{{outcome="dry_run"}} == {n_sms}',
            )
            anom_sel = f'{{stream="{keys.ANOMALIES}",group="{keys.GROUP_ALERTING}"}}'
            prom.wait(
                f"wd_acked_total{anom_sel}",
                lambda s: by_crew(s) == {"alerting": len(anomalies)},
                f"wd_acked_total{anom_sel} == {len(anomalies)} anomalies",
            )
            count = single(
                prom.wait("wd_alert_latency_seconds_count", bool, "latency count"), "latency count"
            )
            assert count == n_sms
            inf = single(prom.query('wd_alert_latency_seconds_bucket{le="+Inf"}'), "+Inf bucket")
            assert inf == count
            total = single(prom.query("wd_alert_latency_seconds_sum"), "latency sum")
            # Reading ts to SMS printed: the out-of-range readings were stamped about when they were published.
            newest_ts_ms = t0_ms + (PER_SENSOR - 1) * 1000
            bound_s = (time.time() * 1000 - newest_ts_ms) / 1000
            assert 0 < total / count <= bound_s, (total, count, bound_s, published_ms - newest_ts_ms)

            # Stream gauges: every crew that reports a (stream, group) says the pipeline is drained.
            for name in ("wd_stream_lag", "wd_stream_pending", "wd_stream_oldest_pending_seconds"):
                for sel, crew in ((read_sel, "analytics"), (anom_sel, "alerting")):
                    series = prom.wait(
                        f"{name}{sel}",
                        lambda s: bool(s) and all(v == 0 for _, v in s),
                        f"{name}{sel} == 0 once drained",
                    )
                    assert crew in by_crew(series), f"{name}{sel} not exported by {crew}: {series}"

            # Over the whole run, not only now: the gauges never went negative, the oldest pending entry was
            # never older than the run, and lag and pending never exceeded what the stream ever held.
            run_s = time.monotonic() - started
            window = f"[{int(run_s) + 5}s]"
            for sel, length in ((read_sel, n_entries), (anom_sel, len(anomalies))):
                for name, upper in (
                    ("wd_stream_lag", length),
                    ("wd_stream_pending", length),
                    ("wd_stream_oldest_pending_seconds", run_s),
                ):
                    low = prom.query(f"min(min_over_time({name}{sel}{window}))")
                    high = prom.query(f"max(max_over_time({name}{sel}{window}))")
                    assert low and low[0][1] >= 0, (name, sel, low)
                    assert high and high[0][1] <= upper, (name, sel, high, upper)

            # Dead letters: none in this run. prometheus_client exports a labelled counter only once a label set
            # is used, so the series may be absent; when present it must say zero.
            dead = prom.query("wd_dead_letters_total")
            assert all(v == 0 for _, v in dead), dead
            assert int(r.xlen(keys.DEAD)) == 0

            # The deployed alert rules evaluate against the real series without error, and none fires on a
            # healthy pipeline.
            groups = prom.wait_rules(len(rule_names()))
            health = {rule["name"]: (rule["health"], rule.get("lastError", "")) for rule in groups}
            assert all(h == "ok" for h, _ in health.values()), health
            firing = [a for a in prom.api("alerts")["alerts"] if a["state"] == "firing"]
            assert not firing, firing

            # A malformed entry on the readings stream: analytics dead-letters it at once (a permanent failure).
            dead_sel = f'{{stream="{keys.READINGS}",group="{keys.GROUP_ANALYTICS}"}}'
            preinitialised = bool(prom.query(f"wd_dead_letters_total{dead_sel}"))
            r.xadd(keys.READINGS, {keys.PAYLOAD_FIELD: b"not json"})
            prom.wait(
                f"wd_dead_letters_total{dead_sel}",
                lambda s: by_crew(s) == {"analytics": 1},
                f"wd_dead_letters_total{dead_sel} == 1",
            )
            assert int(r.xlen(keys.DEAD)) == 1
            if preinitialised:
                # With the series at 0 before, increase() sees the step and the deployed alert fires. Without
                # it (a series that first appears at 1), increase() sees no change and the first dead letters
                # go unnoticed: why the label sets should be pre-initialised.
                prom.wait(
                    'ALERTS{alertname="WaterDoctorDeadLetters",alertstate="firing"}',
                    bool,
                    "WaterDoctorDeadLetters fires on the first dead letter",
                    timeout_s=10,
                )

            assert not pipeline.check(), f"crews exited: {pipeline.check()}\n{crew_logs(pipeline)}"
            r.close()
        codes = pipeline.stop()
    finally:
        if codes is None:
            pipeline.stop()
    assert codes == dict.fromkeys(CREWS, 0), f"exit codes on SIGTERM: {codes}\n{crew_logs(pipeline)}"
