"""Retention on Redis 7.0 and Valkey 8: windows per stream, never past a live group's work, the idle cap."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson
import pytest
import redis
import redis.asyncio as aredis
from prometheus_client import REGISTRY

from handoff import keys
from handoff.settings import Settings
from handoff.stats import server_time_ms
from retention import Retention, RetentionConfig, default_policies, parse_duration
from retention.policy import DAY_MS, HOUR_MS, RetentionPolicy, format_duration
from waterdoctor.cli import main
from waterdoctor.embedded import free_port

EXACT = RetentionConfig(exact=True, idle_cap_ms=None)
ACL_FILE = Path(__file__).resolve().parents[2] / "deploy" / "redis-users.acl"


async def add_at(r: aredis.Redis, stream: str, *ages_ms: int, now: int | None = None) -> list[str]:
    """Entries whose IDs say they were added ``age`` ms ago (by the server clock), oldest first."""
    now = now if now is not None else await server_time_ms(r)
    ids = []
    for i, age in enumerate(sorted(ages_ms, reverse=True)):
        ids.append(
            (await r.xadd(stream, {"payload": orjson.dumps({"age": age})}, id=f"{now - age}-{i}")).decode()
        )
    return ids


async def ids_of(r: aredis.Redis, stream: str) -> list[str]:
    return [i.decode() for i, _ in await r.xrange(stream)]


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def policies() -> list[RetentionPolicy]:
    return list(default_policies(Settings()))


async def test_entries_older_than_the_window_go_and_younger_ones_stay(r: aredis.Redis) -> None:
    now = await server_time_ms(r)
    readings = await add_at(r, keys.READINGS, 48 * HOUR_MS, 25 * HOUR_MS, 23 * HOUR_MS, HOUR_MS, now=now)
    anomalies = await add_at(r, keys.ANOMALIES, 31 * DAY_MS, 29 * DAY_MS, now=now)
    quarantine = await add_at(r, keys.QUARANTINE, 8 * DAY_MS, 6 * DAY_MS, now=now)
    dead = await add_at(r, keys.DEAD, 31 * DAY_MS, 30 * DAY_MS + 60_000, 29 * DAY_MS, now=now)
    trimmed_before = sample("wd_retention_trimmed_total", stream=keys.READINGS)

    reports = {rep.stream: rep for rep in await Retention(r, policies(), EXACT).run_once()}

    assert await ids_of(r, keys.READINGS) == readings[2:]
    assert await ids_of(r, keys.ANOMALIES) == anomalies[1:]
    assert await ids_of(r, keys.QUARANTINE) == quarantine[1:]
    assert await ids_of(r, keys.DEAD) == dead[2:]
    assert reports[keys.READINGS].trimmed == 2 and reports[keys.READINGS].length_after == 2
    assert reports[keys.DEAD].trimmed == 2
    assert sample("wd_retention_trimmed_total", stream=keys.READINGS) - trimmed_before == 2
    age = sample("wd_stream_oldest_entry_age_seconds", stream=keys.READINGS)
    assert 23 * 3600 <= age < 23 * 3600 + 60
    assert sample("wd_stream_memory_bytes", stream=keys.READINGS) > 0
    assert sample("wd_stream_length", stream=keys.READINGS) == 2
    # A second pass has nothing left to do.
    assert all(rep.trimmed == 0 for rep in await Retention(r, policies(), EXACT).run_once())


async def test_missing_streams_are_fine(r: aredis.Redis) -> None:
    reports = await Retention(r, policies(), EXACT).run_once()
    assert [rep.exists for rep in reports] == [False] * 4
    assert not await r.exists(*keys.STREAMS)  # retention never creates a stream


async def test_approximate_trimming_removes_whole_nodes_and_nothing_young(r: aredis.Redis) -> None:
    now = await server_time_ms(r)
    async with r.pipeline(transaction=False) as pipe:
        for i in range(2_000):  # 1,000 entries 2 days old, then 1,000 entries 1 hour old
            age = 2 * DAY_MS if i < 1_000 else HOUR_MS
            pipe.xadd(keys.READINGS, {"payload": b"{}"}, id=f"{now - age}-{i}")
        await pipe.execute()
    config = RetentionConfig(exact=False, limit=300, idle_cap_ms=None)
    (rep,) = await Retention(r, [RetentionPolicy(keys.READINGS, DAY_MS)], config).run_once()
    left = await ids_of(r, keys.READINGS)
    old_left = [i for i in left if int(i.split("-")[0]) < now - DAY_MS]
    assert len(left) - len(old_left) == 1_000  # every young entry stays
    assert len(old_left) < 100  # at most part of one radix-tree node (stream-node-max-entries 100)
    assert rep.trimmed == 1_000 - len(old_left)


async def test_trimming_waits_for_a_slow_live_group_and_stops_waiting_past_the_cap(
    r: aredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    now = await server_time_ms(r)
    old = await add_at(r, keys.READINGS, *(DAY_MS + (10 - i) * 60_000 for i in range(10)), now=now)
    young = await add_at(r, keys.READINGS, HOUR_MS, now=now)
    await r.xgroup_create(keys.READINGS, keys.GROUP_ANALYTICS, id="0")
    # The slow consumer got the first four old entries and acknowledged only the first.
    await r.xreadgroup(keys.GROUP_ANALYTICS, "slow-1", {keys.READINGS: ">"}, count=4)
    await r.xack(keys.READINGS, keys.GROUP_ANALYTICS, old[0])
    policy = [RetentionPolicy(keys.READINGS, DAY_MS)]
    retention = Retention(r, policy, RetentionConfig(exact=True, idle_cap_ms=1_000))

    (rep,) = await retention.run_once()
    assert rep.held_back_by == (keys.GROUP_ANALYTICS,) and rep.ignored == ()
    assert await ids_of(r, keys.READINGS) == old[1:] + young  # the oldest pending entry bounds trimming
    held = {"stream": keys.READINGS, "group": keys.GROUP_ANALYTICS}
    assert sample("wd_retention_held_back", **held) == 1

    # Pending work done: now the undelivered entries bound trimming.
    await r.xack(keys.READINGS, keys.GROUP_ANALYTICS, *old[1:4])
    await retention.run_once()
    assert await ids_of(r, keys.READINGS) == old[4:] + young

    # The consumer goes quiet past the cap: retention stops waiting, loudly.
    await asyncio.sleep(1.2)
    with caplog.at_level(logging.WARNING, logger="retention.trimmer"):
        (rep,) = await retention.run_once()
    assert rep.ignored == (keys.GROUP_ANALYTICS,) and rep.held_back_by == ()
    assert await ids_of(r, keys.READINGS) == young
    assert sample("wd_retention_group_ignored", **held) == 1
    assert sample("wd_retention_held_back", **held) == 0
    assert any("no longer holds trimming back" in m for m in caplog.messages)

    # It comes back (re-reads its own pending list): it counts as live again and the flag clears.
    await r.xreadgroup(keys.GROUP_ANALYTICS, "slow-1", {keys.READINGS: "0"})
    (rep,) = await retention.run_once()
    assert rep.ignored == () and rep.trimmed == 0
    assert sample("wd_retention_group_ignored", **held) == 0


async def test_a_group_without_consumers_holds_back_until_watched_past_the_cap(r: aredis.Redis) -> None:
    await add_at(r, keys.READINGS, 2 * DAY_MS, 2 * DAY_MS - 1)
    await r.xgroup_create(keys.READINGS, keys.GROUP_ANALYTICS, id="0")  # nobody has read yet
    retention = Retention(
        r, [RetentionPolicy(keys.READINGS, DAY_MS)], RetentionConfig(exact=True, idle_cap_ms=400)
    )
    (rep,) = await retention.run_once()
    assert rep.trimmed == 0 and rep.held_back_by == (keys.GROUP_ANALYTICS,)
    await asyncio.sleep(0.5)
    (rep,) = await retention.run_once()
    assert rep.trimmed == 2 and rep.ignored == (keys.GROUP_ANALYTICS,)


async def test_anomaly_stream_stays_within_30_days_while_alerting_is_active(r: aredis.Redis) -> None:
    now = await server_time_ms(r)
    await r.xgroup_create(keys.ANOMALIES, keys.GROUP_ALERTING, id="0", mkstream=True)
    retention = Retention(r, policies(), RetentionConfig(exact=True, idle_cap_ms=6 * HOUR_MS))
    # 45 days of history, one anomaly a day (each a minute younger than a whole number of days).
    await add_at(r, keys.ANOMALIES, *(day * DAY_MS - 60_000 for day in range(1, 46)), now=now)

    async def alerting_keeps_up() -> None:
        got = await r.xreadgroup(keys.GROUP_ALERTING, "alerting-1", {keys.ANOMALIES: ">"})
        if got:
            await r.xack(keys.ANOMALIES, keys.GROUP_ALERTING, *[i for i, _ in got[0][1]])

    for _ in range(3):  # new anomalies keep arriving and alerting keeps reading them
        await alerting_keeps_up()
        await retention.run_once()
        ids = await ids_of(r, keys.ANOMALIES)
        assert now - int(ids[0].split("-")[0]) <= 30 * DAY_MS
        await r.xadd(keys.ANOMALIES, {"payload": b"{}"})
    await alerting_keeps_up()
    await retention.run_once()
    assert await r.xlen(keys.ANOMALIES) == 30 + 3  # days 1..30 of history plus the three new ones
    (group,) = await r.xinfo_groups(keys.ANOMALIES)
    assert group["pending"] == 0 and group["lag"] == 0


def test_retention_once_through_the_cli(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    r = redis.Redis.from_url(redis_url)
    sec, usec = r.time()
    now = sec * 1000 + usec // 1000
    r.xadd(keys.READINGS, {"payload": b"{}"}, id=f"{now - 3 * HOUR_MS}-0")
    r.xadd(keys.READINGS, {"payload": b"{}"}, id=f"{now - 90 * 60_000}-0")
    monkeypatch.setenv("WD_REDIS_URL", redis_url)
    assert main(["retention", "--once", "--exact", "--readings-window", "2h"]) == 0
    lines = [orjson.loads(x) for x in capsys.readouterr().out.splitlines()]
    by_stream = {x["stream"]: x for x in lines}
    assert set(by_stream) == set(keys.STREAMS)
    assert by_stream[keys.READINGS]["trimmed"] == 1
    assert r.xlen(keys.READINGS) == 1
    r.close()


def test_retention_crew_serves_metrics_and_stops_cleanly_on_signals(redis_only_url: str) -> None:
    env = {**os.environ, "WD_REDIS_URL": redis_only_url}
    for sig in (signal.SIGTERM, signal.SIGINT):
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "waterdoctor.cli",
            "retention",
            "--interval",
            "200ms",
            "--metrics-port",
            str(port),
        ]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            body = ""
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and 'wd_retention_runs_total{outcome="ok"}' not in body:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as resp:
                        body = resp.read().decode()
                except OSError:
                    time.sleep(0.1)
            assert 'wd_retention_runs_total{outcome="ok"}' in body
            assert 'wd_stream_length{stream="wd:readings:v1"}' in body
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err.decode()
        assert b"Traceback" not in err


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("90s", 90_000),
        ("15m", 900_000),
        ("2h", 7_200_000),
        ("7d", 7 * DAY_MS),
        ("1h30m", 5_400_000),
        ("1500ms", 1500),
        ("2.5", 2500),
        ("1w", 7 * DAY_MS),
    ],
)
def test_parse_duration(text: str, ms: int) -> None:
    assert parse_duration(text) == ms


@pytest.mark.parametrize("bad", ["", "h", "2x", "2h-", "abc", "1h 2"])
def test_parse_duration_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_format_duration() -> None:
    assert [format_duration(x) for x in (None, 950, 42_000, 200_000, 5 * HOUR_MS + 120_000, 12 * DAY_MS)] == [
        "-",
        "950ms",
        "42s",
        "3m20s",
        "5h02m",
        "12d00h",
    ]


async def test_retention_works_with_the_deployed_acl_user(redis_url: str, r: aredis.Redis) -> None:
    """The least-privilege ``retention`` user of deploy/redis-users.acl (no scripting, no INFO) is enough."""
    line = next(x for x in ACL_FILE.read_text().splitlines() if x.startswith("user retention "))
    rules = [">pw" if rule.startswith(">") else rule for rule in line.split()[2:]]
    await r.execute_command("ACL", "SETUSER", "retention", "reset", *rules)
    limited = aredis.Redis.from_url(redis_url, username="retention", password="pw")
    try:
        now = await server_time_ms(r)
        ids = await add_at(r, keys.READINGS, *(2 * DAY_MS - i for i in range(10)), HOUR_MS, now=now)
        await r.xgroup_create(keys.READINGS, keys.GROUP_ANALYTICS, id="0")
        await r.xreadgroup(keys.GROUP_ANALYTICS, "a-1", {keys.READINGS: ">"}, count=4)
        await r.xdel(keys.READINGS, ids[6])  # the server's lag becomes nil: retention's stats must count
        retention = Retention(limited, [RetentionPolicy(keys.READINGS, DAY_MS)], RetentionConfig(exact=True))
        (rep,) = await retention.run_once()
        assert rep.held_back_by == (keys.GROUP_ANALYTICS,)
        assert await ids_of(r, keys.READINGS) == [i for i in ids if i != ids[6]]  # all four pending stay
        assert sample("wd_stream_lag", stream=keys.READINGS, group=keys.GROUP_ANALYTICS) == 6
    finally:
        await limited.aclose()
        await r.execute_command("ACL", "DELUSER", "retention")
