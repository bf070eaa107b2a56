"""``waterdoctor simulate``: publishes to WD_MQTT_URL, prints a summary, stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.simulators.conftest import Subscriber
from waterdoctor.cli import main
from waterdoctor.embedded import MosquittoBroker


def test_simulate_publishes_and_summarises(
    mosquitto: MosquittoBroker,
    subscriber: Subscriber,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("WD_MQTT_URL", mosquitto.url)
    argv = [
        "simulate",
        "--sites",
        "2",
        "--sensors",
        "5",
        "--rate",
        "200",
        "--duration",
        "1.5",
        "--batch",
        "10",
    ]
    rc = main([*argv, "--anomaly-rate", "0.2", "--seed", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "unacked 0 messages" in out and "anomalies injected" in out and "offered 200/s" in out
    sent = int(out.split("simulate: ")[1].split(" readings")[0])
    assert 150 <= sent <= 450
    subscriber.wait_for(1)
    time.sleep(0.3)
    got = subscriber.readings()
    assert len({(r.site, r.sensor_id, r.seq) for r in got}) == len(
        {(r.site, r.sensor_id, r.seq) for r in got}
    )
    assert {r.site for r in got} == {"plant-1", "plant-2"}
    assert sum(len(r.metrics) for r in got) == 7 * len(got)


def test_simulate_without_broker_url_says_what_to_set(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("WD_MQTT_URL", raising=False)
    assert main(["simulate", "--duration", "1"]) == 2
    assert "WD_MQTT_URL" in capsys.readouterr().err


def test_simulate_stops_cleanly_on_sigterm(mosquitto: MosquittoBroker, subscriber: Subscriber) -> None:
    env = {**os.environ, "WD_MQTT_URL": mosquitto.url}
    proc = subprocess.Popen(
        [sys.executable, "-m", "waterdoctor.cli", "simulate", "--rate", "300", "--duration", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        subscriber.wait_for(50, timeout=20)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    assert "simulate:" in text and "unacked 0 messages" in text
    sent = int(text.split("simulate: ")[1].split(" readings")[0])
    got = subscriber.wait_readings(sent)
    time.sleep(0.2)
    assert (
        len(subscriber.readings()) == len(got) == sent
    )  # everything published before the stop arrived, nothing after
