"""The alerting crew end to end: Pub/Sub and the stream both deliver, one SMS per alert and phone, backfill."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aredis

from alerting.crew import AlertingConfig, StreamHandler, run_alerting
from alerting.routing import Routing
from alerting.sms import DryRunSender, TwilioSender
from handoff import keys
from handoff.worker import Ack, Entry, WorkerConfig
from simulators.twilio_fake import TwilioFake
from tests.alerting.conftest import (
    BASIC_ROUTING,
    FROM,
    PHONE_A,
    PHONE_B,
    DispatcherFactory,
    HangingSender,
    anomaly,
)

ROOT = Path(__file__).resolve().parents[2]


async def emit(r: aredis.Redis, seqs: range, distinct_sensors: bool = False) -> None:
    """What the analytics crew does for each anomaly: append to the stream and publish."""
    for seq in seqs:
        # Distinct sensors keep the production defaults from folding repeats of one sensor into one SMS.
        data = orjson.dumps(anomaly(seq, sensor=f"s-{seq}") if distinct_sensors else anomaly(seq))
        async with r.pipeline(transaction=True) as pipe:
            pipe.xadd(keys.ANOMALIES, {"payload": data})
            pipe.publish(keys.ALERTS_CHANNEL, data)
            await pipe.execute()


async def settled(r: aredis.Redis) -> bool:
    groups = await r.xinfo_groups(keys.ANOMALIES)
    return bool(groups) and groups[0]["pending"] == 0 and groups[0]["lag"] == 0


async def test_pubsub_and_stream_both_deliver_but_each_sms_goes_once(
    r: aredis.Redis,
    fake: TwilioFake,
    sender: TwilioSender,
    routing: Routing,
    make_dispatcher: DispatcherFactory,
) -> None:
    stop = asyncio.Event()
    config = AlertingConfig(worker=WorkerConfig(batch_size=50, block_ms=20, retry_ms=100))
    task = asyncio.create_task(
        run_alerting(r, make_dispatcher(sender, routing), stop, config, consumer="al-1")
    )
    await asyncio.sleep(0.3)  # subscribed
    await emit(r, range(50))
    async with asyncio.timeout(20):
        while len(fake.accepted) < 100 or not await settled(r):
            await asyncio.sleep(0.05)
    # The outage: alerting stops; anomalies keep coming and Pub/Sub drops them on the floor.
    stop.set()
    await asyncio.wait_for(task, 10)
    await emit(r, range(50, 80))
    await asyncio.sleep(0.2)
    assert len(fake.accepted) == 100
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_alerting(r, make_dispatcher(sender, routing), stop, config, consumer="al-1")
    )
    async with asyncio.timeout(20):
        while len(fake.accepted) < 160 or not await settled(r):
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.wait_for(task, 10)
    per_key = fake.accepted_by_key()
    assert set(per_key.values()) == {1}  # never two accepted SMS for one alert and phone
    assert {aid for aid, _ in per_key} == {f"plant-7:s-0042:{i}" for i in range(80)}
    assert {phone for _, phone in per_key} == {PHONE_A, PHONE_B}
    # The backfill went oldest first: an alert starts only when at most window - 1 others are in flight, so every
    # alert at least `window` older than it was sent before it. (It may be sent later than its turn: one slow
    # request lets the rest of the window go by, so lateness has no bound.)
    backfilled = [int(a.alert_id.rsplit(":", 1)[1]) for a in fake.accepted[100:] if a.to == PHONE_A]
    assert sorted(backfilled) == list(range(50, 80))
    window = config.stream_concurrency
    assert all(seq - (50 + i) < window for i, seq in enumerate(backfilled)), backfilled


async def test_the_command_runs_with_twilio_settings_and_stops_cleanly(
    redis_url: str, r: aredis.Redis, fake: TwilioFake, tmp_path: Path
) -> None:
    routing_file = tmp_path / "routing.toml"
    routing_file.write_text(BASIC_ROUTING)
    env = {
        **os.environ,
        "WD_REDIS_URL": redis_url,
        "TWILIO_ACCOUNT_SID": fake.account_sid,
        "TWILIO_AUTH_TOKEN": fake.auth_token,
        "WD_SMS_FROM": FROM,
        "WD_TWILIO_BASE_URL": fake.base_url,
        "WD_ROUTING_FILE": str(routing_file),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "waterdoctor.cli", "alerting", "--metrics-port", "0", "--consumer", "al-cli",
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        await emit(r, range(5), distinct_sensors=True)  # before it subscribed: only the stream brings these
        async with asyncio.timeout(30):
            while len(fake.accepted) < 10:
                await asyncio.sleep(0.05)
            await emit(r, range(5, 10), distinct_sensors=True)
            while len(fake.accepted) < 20:
                await asyncio.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert Counter(fake.accepted_by_key().values()) == Counter({1: 20})
    assert fake.auth_token not in err.decode()  # secrets never logged
    assert PHONE_A not in err.decode()  # phone numbers masked in logs


def test_a_bad_routing_file_is_refused_at_start(redis_url: str, tmp_path: Path) -> None:
    routing_file = tmp_path / "routing.toml"
    routing_file.write_text('[[route]]\nsites = ["plant-*"]\nphones = ["555-1234"]\n')
    env = {**os.environ, "WD_REDIS_URL": redis_url, "WD_ROUTING_FILE": str(routing_file)}
    proc = subprocess.run(
        [sys.executable, "-m", "waterdoctor.cli", "alerting", "--metrics-port", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "phones" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "bad", [["--per-number-rate", "0"], ["--per-number-burst", "0.5"], ["--send-rate", "-1"]]
)
def test_bad_send_rates_are_refused_at_start(redis_url: str, bad: list[str]) -> None:
    env = {**os.environ, "WD_REDIS_URL": redis_url}
    proc = subprocess.run(
        [sys.executable, "-m", "waterdoctor.cli", "alerting", "--metrics-port", "0", *bad],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--per-number" in proc.stderr and "Traceback" not in proc.stderr


async def test_the_stream_path_leaves_a_young_entry_to_pubsub_for_its_grace(
    make_dispatcher: DispatcherFactory, routing: Routing
) -> None:
    out = io.StringIO()
    handler = StreamHandler(make_dispatcher(DryRunSender(out), routing), grace_s=0.4)

    def entry(seq: int, age_s: float) -> Entry:
        return Entry(keys.ANOMALIES, f"{int((time.time() - age_s) * 1000)}-0", orjson.dumps(anomaly(seq)))

    started = time.monotonic()
    old = entry(1, age_s=10.0)
    assert isinstance((await handler([old]))[old.id], Ack)
    old_s = time.monotonic() - started
    started = time.monotonic()
    young = entry(2, age_s=0.1)
    outcomes = await handler([young])
    young_s = time.monotonic() - started
    assert isinstance(outcomes[young.id], Ack)
    assert "plant-7:s-0042:1" in out.getvalue() and "plant-7:s-0042:2" in out.getvalue()  # both sent
    assert old_s < 0.25  # an entry past the grace (a backfill) goes at once
    assert young_s >= 0.25  # 0.1 s old: waited until 0.4 s old


async def test_a_cancelled_crew_leaves_no_pubsub_dispatch_running(
    r: aredis.Redis, routing: Routing, make_dispatcher: DispatcherFactory
) -> None:
    # The run loop cancels the crew when it overruns its stop grace; the crew's command then closes the sender
    # and the Redis client. A Pub/Sub dispatch left running past that (it was a task of its own, not a child)
    # failed later against closed clients, at whatever point it had reached.
    sender = HangingSender()
    config = AlertingConfig(worker=WorkerConfig(batch_size=50, block_ms=20, retry_ms=100), stream_grace_s=5.0)
    task = asyncio.create_task(run_alerting(r, make_dispatcher(sender, routing), asyncio.Event(), config))
    await asyncio.sleep(0.3)  # subscribed
    await emit(r, range(1))
    await asyncio.wait_for(sender.started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    left = [
        t
        for t in asyncio.all_tasks()
        if getattr(t.get_coro(), "__qualname__", "").startswith("listen_pubsub.")
    ]
    assert left == []
