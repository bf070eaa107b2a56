"""``waterdoctor ingest`` as real processes: SIGKILL during a publish, two processes on one shared subscription,
and a clean stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import orjson

from tests.ingest.corpus import reading
from tests.ingest.mqtt_tools import publish, stored_readings, wait_until
from waterdoctor.embedded import MosquittoBroker, free_port

ROOT = Path(__file__).resolve().parents[2]


# The CLI imports a crew only when its command runs, so it starts quickly; the SIGTERM test runs the console script.
PYTHON_M_INGEST = [sys.executable, "-m", "waterdoctor.cli", "ingest"]
CONSOLE_SCRIPT = [str(Path(sys.executable).parent / "waterdoctor"), "ingest"]


def start_ingest(
    redis_url: str,
    mqtt_url: str,
    client_id: str,
    log: Path,
    metrics_port: int = 0,
    command: list[str] = PYTHON_M_INGEST,
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "WD_REDIS_URL": redis_url, "WD_MQTT_URL": mqtt_url}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [*command, "--client-id", client_id, "--metrics-port", str(metrics_port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip


def wait_connected(log: Path, times: int = 1, timeout: float = 60.0) -> None:
    assert wait_until(lambda: log.read_text().count("connected to mqtt") >= times, timeout), log.read_text()
    time.sleep(0.2)  # SUBACK


class PacedPublisher:
    """Publishes ``msgs`` from a thread in chunks with a pause between them, so crash tests kill ingest mid-publish."""

    def __init__(self, url: str, msgs: list[tuple[str, bytes]], *, chunk: int, client_id: str) -> None:
        self.done = threading.Event()
        self.errors: list[BaseException] = []
        self._args = (url, msgs, chunk, client_id)
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        url, msgs, chunk, client_id = self._args
        try:
            for start in range(0, len(msgs), chunk):
                publish(url, msgs[start : start + chunk], client_id=client_id)
                time.sleep(0.1)
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            self.done.set()

    def join(self) -> None:
        self._thread.join()
        assert not self.errors, self.errors


def kill_and_restart(
    proc: subprocess.Popen[bytes], redis_url: str, mqtt_url: str, client_id: str, log: Path, starts: int
) -> subprocess.Popen[bytes]:
    """SIGKILL ingest and start it again with the same client id (same session); ``starts``: starts so far."""
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc = start_ingest(redis_url, mqtt_url, client_id, log)
    wait_connected(log, starts + 1)
    return proc


def messages(now_ms: int) -> list[tuple[str, bytes]]:
    """20,000 readings: 10,000 single-reading messages and 100 gateway batches of 100."""
    out = []
    for i in range(10_000):
        sensor = f"s{i % 50}"
        out.append((f"wd/p1/{sensor}/telemetry", orjson.dumps(reading(sensor, i // 50, now_ms))))
    for b in range(100):
        batch = [reading(f"g{j}", b, now_ms) for j in range(100)]
        out.append((f"wd/p1/gw{b % 5}/batch", orjson.dumps({"gateway_id": f"gw{b % 5}", "readings": batch})))
    return out


def expected_keys(msgs: list[tuple[str, bytes]]) -> set[tuple[str, int]]:
    keys: set[tuple[str, int]] = set()
    for _, payload in msgs:
        doc = orjson.loads(payload)
        for x in doc.get("readings", [doc]):
            keys.add((x["sensor_id"], x["seq"]))
    return keys


def test_sigkill_during_publish_stores_every_reading_exactly_once(
    redis_only_url: str, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    log = tmp_path / "ingest.log"
    msgs = messages(int(time.time() * 1000))
    proc = start_ingest(redis_only_url, mosquitto.url, "crash-1", log)
    wait_connected(log)
    # Paced (about 4 s at least) so that several kills land in the middle of the publish.
    pub = PacedPublisher(mosquitto.url, msgs, chunk=250, client_id="crash-pub")
    kills = kills_during_publish = 0
    try:
        while not pub.done.is_set() or kills < 3:
            time.sleep(0.3)
            kills_during_publish += not pub.done.is_set()
            proc = kill_and_restart(proc, redis_only_url, mosquitto.url, "crash-1", log, kills + 1)
            kills += 1
        pub.join()
        assert wait_until(lambda: len(stored_readings(redis_only_url)) >= 20_000, 60)
        time.sleep(0.5)  # anything stored twice would show up now
    finally:
        proc.terminate()
        proc.wait(20)
    stored = [(x["sensor_id"], x["seq"]) for x in stored_readings(redis_only_url)]
    assert kills_during_publish >= 3, kills_during_publish
    dupes = [k for k, n in Counter(stored).items() if n > 1]
    assert dupes == []
    assert set(stored) == expected_keys(msgs)
    assert len(stored) == 20_000


def _scrape(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def test_two_processes_split_the_load_without_storing_twice(
    redis_only_url: str, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    ports = [free_port(), free_port()]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [start_ingest(redis_only_url, mosquitto.url, f"pair-{i}", logs[i], ports[i]) for i in range(2)]
    try:
        for log in logs:
            wait_connected(log)
        now = int(time.time() * 1000)
        msgs = [(f"wd/p1/s{i % 20}/telemetry", orjson.dumps(reading(f"s{i % 20}", i // 20, now)))
                for i in range(6000)]  # fmt: skip
        # Two publishers at once, so both subscribers are busy.
        threads = [
            threading.Thread(
                target=publish, args=(mosquitto.url, msgs[k::2]), kwargs={"client_id": f"pub{k}"}
            )
            for k in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert wait_until(lambda: len(stored_readings(redis_only_url)) >= 6000, 60)
        handled = [_scrape(port, "wd_ingest_messages_total") for port in ports]
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(20) for p in procs]
    stored = [(x["sensor_id"], x["seq"]) for x in stored_readings(redis_only_url)]
    assert len(stored) == len(set(stored)) == 6000
    assert sum(handled) == 6000
    assert min(handled) > 6000 * 0.2, handled  # the broker spreads the shared subscription over both
    assert codes == [0, 0]


def test_sigterm_stops_cleanly_and_the_session_keeps_what_came_meanwhile(
    redis_only_url: str, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    log = tmp_path / "ingest.log"
    proc = start_ingest(redis_only_url, mosquitto.url, "term-1", log, command=CONSOLE_SCRIPT)
    wait_connected(log)
    now = int(time.time() * 1000)
    publish(mosquitto.url, [("wd/p1/s/telemetry", orjson.dumps(reading("s", i, now))) for i in range(100)])
    assert wait_until(lambda: len(stored_readings(redis_only_url)) == 100, 20)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert "ingest stopped" in log.read_text()
    # Published while ingest is down: waits in the persistent session, delivered on restart.
    publish(
        mosquitto.url, [("wd/p1/s/telemetry", orjson.dumps(reading("s", i, now))) for i in range(100, 200)]
    )
    proc = start_ingest(redis_only_url, mosquitto.url, "term-1", log)
    try:
        assert wait_until(lambda: len(stored_readings(redis_only_url)) == 200, 20)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    assert sorted(x["seq"] for x in stored_readings(redis_only_url)) == list(range(200))
