"""Every crew's real code path, end to end, as its least-privilege user of deploy/redis-users.acl.

Each test loads the user's line from the file (``ACL SETUSER name reset <rules>``, with a test password), runs the
crew with a client authenticated as that user, and checks two things besides the crew's own results: the server's
``ACL LOG`` holds no denial for the user, and no log line mentions one. Crews swallow some errors on purpose (the
ingest backpressure check and the stream metrics log them at debug level and carry on), so a missing permission
would otherwise leave a silently blind crew. The file itself must load as an ``aclfile`` on both servers (which
rules out comment lines: the server refuses to start on one).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import pytest
import redis
import redis.asyncio as aredis
from prometheus_client import REGISTRY

from alerting.body import ack_code
from alerting.crew import AlertingConfig, run_alerting
from alerting.dispatcher import AckResult, DispatchConfig, Dispatcher
from alerting.ratelimit import RedisSendRateLimiter
from alerting.routing import parse_routing
from alerting.sms import TwilioSender
from analytics.crew import AnalyticsConfig, run_analytics
from analytics.detector import DetectorConfig
from handoff import keys
from handoff.connection import connect
from handoff.metrics import STREAM_LAG, STREAM_PENDING, refresh_stream_metrics
from handoff.producer import StreamProducer
from handoff.worker import WorkerConfig
from ingest.crew import read_pressure
from retention.policy import RetentionPolicy
from retention.trimmer import Retention, RetentionConfig
from simulators.twilio_fake import TwilioFake
from tests.alerting.conftest import BASIC_ROUTING, FROM, PHONE_A, PHONE_B, anomaly
from tests.analytics.test_crew import normal_series, reading
from tests.ingest import corpus
from tests.ingest.mqtt_tools import publish, quarantined, stored_readings
from tests.ingest.test_crew import running, wait_for
from tests.retention.test_replay import anomaly as stored_anomaly
from waterdoctor.cli import main
from waterdoctor.embedded import MosquittoBroker, RedisServer, ServerKind

ACL_FILE = Path(__file__).resolve().parents[2] / "deploy" / "redis-users.acl"
PASSWORD = "pw"
DAY_MS = 86_400_000

#: What each test below exercises. A user added to the file without a test here fails the first test.
TESTED_USERS = {"ingest", "analytics", "alerting", "retention", "ops"}

#: redis-py sends CLIENT SETINFO on every connection and ignores a refusal. Redis 7.0 has no such command, so the
#: file (which must load on 7.0 too) cannot grant it; Valkey logs the refusal, which changes nothing.
HARMLESS_DENIALS = {"client|setinfo"}

#: Refusals a crew is built to expect: retention has no scripting on purpose and counts a group's lag by paging
#: XRANGE when EVALSHA is refused (handoff.stats.count_entries).
EXPECTED_DENIALS = {"retention": {"evalsha"}}

Denials = Callable[[], Awaitable[list[str]]]


def acl_lines() -> dict[str, list[str]]:
    """User name -> its rules, from the deployed file."""
    out: dict[str, list[str]] = {}
    for line in ACL_FILE.read_text().splitlines():
        words = line.split()
        if words[:1] == ["user"]:
            out[words[1]] = words[2:]
    return out


def with_credentials(url: str, user: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{user}:{PASSWORD}@{parts.hostname}:{parts.port}"))


async def load_user(admin: aredis.Redis, user: str) -> None:
    rules = [f">{PASSWORD}" if rule.startswith(">") else rule for rule in acl_lines()[user]]
    await admin.execute_command("ACL", "SETUSER", user, "reset", *rules)


@pytest.fixture
async def as_user(
    r: aredis.Redis, redis_url: str, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[Callable[[str], Awaitable[tuple[str, Denials]]]]:
    """``url, denials = await as_user("ingest")``: a URL authenticating as the deployed user, and a function
    listing what the server refused that user since then (``ACL LOG``) plus log lines that mention a refusal."""
    caplog.set_level(logging.DEBUG)  # refusals some loops swallow are logged at debug level only
    # Gauges are process-wide: start from a value no crew sets, so a test sees only what its crew reported.
    for stream, group in ((keys.READINGS, keys.GROUP_ANALYTICS), (keys.ANOMALIES, keys.GROUP_ALERTING)):
        STREAM_LAG.labels(stream, group).set(-1)
        STREAM_PENDING.labels(stream, group).set(-1)
    loaded: list[str] = []

    async def make(user: str) -> tuple[str, Denials]:
        await load_user(r, user)
        loaded.append(user)
        await r.execute_command("ACL", "LOG", "RESET")

        async def denials() -> list[str]:
            found = []
            for entry in await r.execute_command("ACL", "LOG", "128"):
                e = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
                obj = e["object"].decode()
                if e["username"].decode() == user and obj not in HARMLESS_DENIALS | EXPECTED_DENIALS.get(
                    user, set()
                ):
                    found.append(f"{e['reason'].decode()} {obj} ({e['context'].decode()})")
            found += [rec.getMessage() for rec in caplog.records if _refusal(rec.getMessage())]
            return found

        return with_credentials(redis_url, user), denials

    yield make
    for user in loaded:
        await r.execute_command("ACL", "DELUSER", user)


def _refusal(message: str) -> bool:
    text = message.lower()
    return "noperm" in text or "no permissions" in text or "can't run this command" in text


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


async def group_settled(r: aredis.Redis, stream: str) -> bool:
    groups = await r.xinfo_groups(stream)
    return bool(groups) and groups[0]["pending"] == 0 and groups[0]["lag"] == 0


async def until(cond: Callable[[], Awaitable[bool]], timeout: float = 8.0) -> None:
    async with asyncio.timeout(timeout):
        while not await cond():
            await asyncio.sleep(0.02)


# --- the file itself -------------------------------------------------------------------------------------------


def test_every_user_is_tested_and_stays_least_privilege() -> None:
    users = acl_lines()
    # Nobody gets in without a password: the default user is off and can run nothing; ``admin`` (for operators'
    # administration) is the one user with every key and command, behind a password.
    assert users.pop("default") == ["off", "resetpass", "-@all"]
    assert users.pop("admin") == ["on", ">change-me-admin", "~*", "&*", "+@all"]
    assert set(users) == TESTED_USERS
    for user, rules in users.items():
        assert rules[0] == "on" and rules[1].startswith(">change-me"), user  # placeholder password only
        assert "~*" not in rules and "allkeys" not in rules and "+@all" not in rules, user
        assert "-@dangerous" in rules, user
        # Only the one dangerous command a crew needs may follow (INFO, for ingest's memory backpressure).
        assert rules[rules.index("-@dangerous") + 1 :] in ([], ["+info"]), user
    # The operator commands get named commands only, no category, and may not write the quarantine (ingest's).
    ops = users["ops"]
    assert not [rule for rule in ops if rule.startswith("+@")], ops
    assert "%R~wd:quarantine:v1" in ops and "~wd:quarantine:v1" not in ops


@pytest.mark.parametrize("kind", ["redis", "valkey"])
def test_the_file_loads_as_an_aclfile(kind: ServerKind, tmp_path: Path) -> None:
    """The server refuses to start on a line it cannot parse (a comment, a command unknown to Redis 7.0)."""
    acl = tmp_path / "users.acl"
    shutil.copy(ACL_FILE, acl)
    with RedisServer(kind, data_dir=tmp_path, extra=["--aclfile", str(acl)]) as server:
        for user, rules in acl_lines().items():
            if user == "default":
                continue
            client = redis.Redis.from_url(server.url, username=user, password=rules[1][1:])
            try:
                assert client.ping()
            finally:
                client.close()
        anonymous = redis.Redis.from_url(server.url)
        as_default = redis.Redis.from_url(server.url, username="default", password="")
        try:
            with pytest.raises(redis.AuthenticationError):
                anonymous.ping()
            with pytest.raises(redis.AuthenticationError):  # not even a read
                anonymous.xlen(keys.READINGS)
            # ``default`` has no password that could let anyone in, and admin administers.
            with pytest.raises(redis.AuthenticationError):
                as_default.ping()
        finally:
            anonymous.close()
            as_default.close()
        admin = redis.Redis.from_url(server.url, username="admin", password="change-me-admin")
        try:
            assert admin.acl_whoami() in (b"admin", "admin")
            assert admin.config_get("appendonly")
        finally:
            admin.close()


# --- ingest ----------------------------------------------------------------------------------------------------


async def test_ingest_stores_dedupes_quarantines_and_reads_backpressure_as_its_user(
    r: aredis.Redis, as_user: Any, mosquitto: MosquittoBroker
) -> None:
    url, denials = await as_user("ingest")
    # One entry from before, then the analytics group positioned after it: the lag of what ingest writes next
    # lies inside the stream, so the backpressure check has to count it (XINFO, XPENDING, the counting script).
    await r.xadd(keys.READINGS, {keys.PAYLOAD_FIELD: b'{"readings":[]}'})
    await r.xgroup_create(keys.READINGS, keys.GROUP_ANALYTICS, id="$")
    now = int(time.time() * 1000)
    msgs = [
        (f"wd/{corpus.SITE}/a/telemetry", orjson.dumps(corpus.reading("a", 1, now))),
        (f"wd/{corpus.SITE}/b/telemetry", orjson.dumps(corpus.reading("b", 1, now))),
        (f"wd/{corpus.SITE}/a/telemetry", orjson.dumps(corpus.reading("a", 2, now))),
        (f"wd/{corpus.SITE}/a/telemetry", orjson.dumps(corpus.reading("a", 1, now))),  # duplicate
        (f"wd/{corpus.SITE}/b/telemetry", b"{not json"),
    ]
    async with running(url, mosquitto.url, client_id="acl-ingest") as crew:
        await asyncio.to_thread(publish, mosquitto.url, msgs)
        await wait_for(lambda: crew.stats.acked == len(msgs), timeout=8)
        lag = lambda: sample("wd_stream_lag", stream=keys.READINGS, group=keys.GROUP_ANALYTICS)  # noqa: E731
        await wait_for(lambda: lag() == 3, timeout=5, what=lag)  # the crew's own pressure check saw the lag
        limited = aredis.Redis.from_url(url)
        try:
            pressure = await read_pressure(limited)
        finally:
            await limited.aclose()
    assert pressure.lag == 3 and pressure.used_memory > 0  # INFO memory answered
    assert sorted((x["sensor_id"], x["seq"]) for x in stored_readings(str(url))) == [
        ("a", 1),
        ("a", 2),
        ("b", 1),
    ]
    assert crew.stats.duplicates == 1
    assert [q["reason"] for q in quarantined(str(url))] == ["invalid_json"]
    assert crew.stats.redis_errors == 0 and not crew.backpressure
    assert await denials() == []


# --- analytics -------------------------------------------------------------------------------------------------


async def test_analytics_scores_saves_and_reloads_models_and_reports_lag_as_its_user(
    r: aredis.Redis, as_user: Any
) -> None:
    url, denials = await as_user("analytics")
    config = AnalyticsConfig(
        worker=WorkerConfig(batch_size=50, block_ms=2, claim_idle_ms=200, claim_interval_s=0.1),
        detector=DetectorConfig(warmup=100, window=512, refit_every=4096),
        registry_refresh_s=0.1,  # also exercise the generations refresh (HMGET) within the test
    )
    producer = StreamProducer(r, keys.READINGS)
    series = normal_series(300)
    await producer.add_many([{"readings": series[i : i + 10]} for i in range(0, len(series), 10)])
    await r.xadd(keys.READINGS, {keys.PAYLOAD_FIELD: b"{not json"})  # to dead letters
    # An entry another consumer took and died with: claimed (XAUTOCLAIM) and scored by ours.
    await r.xgroup_create(keys.READINGS, keys.GROUP_ANALYTICS, id="0")
    await r.xreadgroup(keys.GROUP_ANALYTICS, "dead-1", {keys.READINGS: ">"}, count=1)
    pubsub = r.pubsub()
    await pubsub.subscribe(keys.ALERTS_CHANNEL)

    async def run_until(cond: Callable[[], Awaitable[bool]]) -> Any:
        client = await connect(url, name="analytics", attempts=1)
        stop = asyncio.Event()
        task = asyncio.create_task(run_analytics(client, config, stop, consumer="acl-analytics"))
        try:
            await until(cond)
            await refresh_stream_metrics(client, keys.READINGS, keys.GROUP_ANALYTICS)  # what the CLI polls
        finally:
            stop.set()
            handler = await asyncio.wait_for(task, 10)
            await client.aclose()
        return handler

    async def fitted() -> bool:
        return await group_settled(r, keys.READINGS) and await r.hlen(keys.MODEL_GENERATIONS) == 1

    await run_until(fitted)
    assert await r.exists(keys.MODELS_PREFIX + "plant-1:s-1")
    assert await r.xlen(keys.DEAD) == 1
    # A restart loads the saved model (MGET) and catches a spike with no warm-up; anomaly and alert both go out.
    await producer.add_many([{"readings": [reading(300, 7.21), reading(301, 4.1), reading(302, 7.19)]}])
    loaded = sample("wd_analytics_models_loaded_total") or 0.0
    handler = await run_until(lambda: group_settled(r, keys.READINGS))
    assert (sample("wd_analytics_models_loaded_total") or 0.0) > loaded
    assert handler.bank.sensor("plant-1", "s-1").model is not None
    found = [orjson.loads(f[b"payload"]) for _, f in await r.xrange(keys.ANOMALIES)]
    assert [a["seq"] for a in found] == [301]
    msg = None
    async with asyncio.timeout(5):
        while msg is None:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
    assert orjson.loads(msg["data"])["alert_id"] == "plant-1:s-1:301"
    await pubsub.aclose()
    assert sample("wd_stream_lag", stream=keys.READINGS, group=keys.GROUP_ANALYTICS) == 0
    assert await denials() == []


# --- alerting --------------------------------------------------------------------------------------------------


@pytest.fixture
async def fake() -> AsyncIterator[TwilioFake]:
    async with TwilioFake() as f:
        yield f


async def test_alerting_sends_once_per_phone_from_pubsub_stream_and_claims_as_its_user(
    r: aredis.Redis, as_user: Any, fake: TwilioFake
) -> None:
    url, denials = await as_user("alerting")
    client = await connect(url, name="alerting", attempts=1)
    sender = TwilioSender(fake.account_sid, fake.auth_token, FROM, base_url=fake.base_url, read_timeout=2.0)
    # Production dispatch settings (folding, throttling) and the Redis-shared rate limiter, global bucket too.
    dispatcher = Dispatcher(
        client,
        sender,
        parse_routing(BASIC_ROUTING),
        config=DispatchConfig(scheduler_interval_s=0.05),
        limiter=RedisSendRateLimiter(client, 100.0, 100.0, global_rate=100.0, global_burst=100.0),
    )
    config = AlertingConfig(
        worker=WorkerConfig(batch_size=50, block_ms=20, retry_ms=100, claim_idle_ms=200, claim_interval_s=0.1)
    )
    # Before the crew starts: an entry a dead consumer holds (claimed by ours) and one only in the stream.
    await r.xadd(keys.ANOMALIES, {keys.PAYLOAD_FIELD: orjson.dumps(anomaly(1, sensor="s-1"))})
    await r.xgroup_create(keys.ANOMALIES, keys.GROUP_ALERTING, id="0")
    await r.xreadgroup(keys.GROUP_ALERTING, "dead-1", {keys.ANOMALIES: ">"}, count=1)
    await r.xadd(keys.ANOMALIES, {keys.PAYLOAD_FIELD: orjson.dumps(anomaly(2, sensor="s-2"))})
    stop = asyncio.Event()
    task = asyncio.create_task(run_alerting(client, dispatcher, stop, config, consumer="acl-alerting"))
    try:
        await asyncio.sleep(0.3)  # subscribed
        # Pub/Sub only (the stream path never sees it), then both, as analytics writes it.
        await r.publish(keys.ALERTS_CHANNEL, orjson.dumps(anomaly(3, sensor="s-3")))
        data = orjson.dumps(anomaly(4, sensor="s-4"))
        async with r.pipeline(transaction=True) as pipe:
            pipe.xadd(keys.ANOMALIES, {keys.PAYLOAD_FIELD: data})
            pipe.publish(keys.ALERTS_CHANNEL, data)
            await pipe.execute()
        async with asyncio.timeout(8):
            while len(fake.accepted) < 8:
                await asyncio.sleep(0.02)
        await until(lambda: group_settled(r, keys.ANOMALIES))
        await refresh_stream_metrics(client, keys.ANOMALIES, keys.GROUP_ALERTING)  # what the CLI polls
        # An operator's ACK reply (the webhook's path).
        alert_id = "plant-7:s-4:4"
        assert await dispatcher.acknowledge(ack_code(alert_id), PHONE_A) == (AckResult.ACKED, alert_id)
        await asyncio.sleep(0.3)  # the scheduler polls the due set a few times
    finally:
        stop.set()
        worker = await asyncio.wait_for(task, 10)
        await dispatcher.aclose()
        await client.aclose()
    per_key = fake.accepted_by_key()
    assert set(per_key.values()) == {1}
    assert set(per_key) == {(f"plant-7:s-{i}:{i}", p) for i in range(1, 5) for p in (PHONE_A, PHONE_B)}
    assert worker.stats.claimed >= 1 and worker.stats.acked == 3
    assert await r.exists(keys.SMS_RATE_PREFIX + PHONE_A) and await r.exists(keys.SMS_RATE_PREFIX + "*")
    assert sample("wd_stream_pending", stream=keys.ANOMALIES, group=keys.GROUP_ALERTING) == 0
    assert await denials() == []


# --- retention -------------------------------------------------------------------------------------------------


async def test_retention_trims_every_contract_stream_as_its_user(r: aredis.Redis, as_user: Any) -> None:
    url, denials = await as_user("retention")
    sec, _ = await r.time()
    now = int(sec) * 1000
    for stream in keys.STREAMS:
        for i in range(3):
            await r.xadd(stream, {keys.PAYLOAD_FIELD: b"{}"}, id=f"{now - 2 * DAY_MS + i}-0")
        await r.xadd(stream, {keys.PAYLOAD_FIELD: b"{}"}, id=f"{now - 1000}-0")
    # Live groups that owe nothing retention would trim, so they hold nothing back; their stats are read. The
    # analytics one has its position inside the stream: its lag is counted (by paging, without scripting).
    await r.xgroup_create(keys.ANOMALIES, keys.GROUP_ALERTING, id="$")
    await r.xreadgroup(keys.GROUP_ALERTING, "al-1", {keys.ANOMALIES: ">"})
    await r.xgroup_create(keys.READINGS, keys.GROUP_ANALYTICS, id=f"{now - 2 * DAY_MS + 2}-0")
    client = await connect(url, name="retention", attempts=1)
    try:
        retention = Retention(
            client, [RetentionPolicy(s, DAY_MS) for s in keys.STREAMS], RetentionConfig(exact=True)
        )
        reports = await retention.run_once()
    finally:
        await client.aclose()
    assert {rep.stream: rep.trimmed for rep in reports} == dict.fromkeys(keys.STREAMS, 3)
    for stream in keys.STREAMS:
        assert await r.xlen(stream) == 1
    assert sample("wd_stream_lag", stream=keys.READINGS, group=keys.GROUP_ANALYTICS) == 1
    assert await denials() == []


# --- ops: the operator commands (status, replay, dlq) ----------------------------------------------------------


@pytest.fixture
def cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[[str, list[str]], Awaitable[tuple[int, str, str]]]:
    """``rc, out, err = await cli(url, ["status", "--json"])``: the console script in-process, as the tests of
    these commands run it, on a thread (each command runs its own event loop) with ``WD_REDIS_URL`` set to ``url``."""

    async def run(url: str, argv: list[str]) -> tuple[int, str, str]:
        monkeypatch.setenv("WD_REDIS_URL", url)
        capsys.readouterr()
        rc = await asyncio.to_thread(main, argv)
        captured = capsys.readouterr()
        return rc, captured.out, captured.err

    return run


async def test_ops_status_text_and_json_as_its_user(r: aredis.Redis, as_user: Any, cli: Any) -> None:
    url, denials = await as_user("ops")
    for i in range(5):
        await r.xadd(keys.READINGS, {keys.PAYLOAD_FIELD: orjson.dumps({"readings": [], "i": i})})
    await r.xgroup_create(keys.READINGS, keys.GROUP_ANALYTICS, id="0")
    await r.xreadgroup(keys.GROUP_ANALYTICS, "a-1", {keys.READINGS: ">"}, count=2)  # pending 2, lag 3
    await r.xadd(keys.ANOMALIES, {keys.PAYLOAD_FIELD: b"{}"})
    await r.xgroup_create(keys.ANOMALIES, keys.GROUP_ALERTING, id="$")
    for reason in ("schema", "schema", "clock_skew"):
        await r.xadd(keys.QUARANTINE, {keys.PAYLOAD_FIELD: orjson.dumps({"reason": reason})})
    dead = {
        "stream": keys.READINGS,
        "group": keys.GROUP_ANALYTICS,
        "entry_id": "1-0",
        "deliveries": 5,
        "error": "ValueError: bad reading\ntraceback",
        "payload": "{}",
    }
    await r.xadd(keys.DEAD, {keys.PAYLOAD_FIELD: orjson.dumps(dead)})
    await r.script_flush()  # the lag count loads its script (SCRIPT LOAD) as the user, then runs it (EVALSHA)

    rc, out, err = await cli(url, ["status", "--json"])
    assert rc == 0, err
    doc = orjson.loads(out)
    info = await r.info("server")
    assert doc["server"]["version"] == (info.get("valkey_version") or info["redis_version"])  # INFO answered
    streams = {s["name"]: s for s in doc["streams"]}
    assert {n: s["length"] for n, s in streams.items()} == {
        keys.READINGS: 5,
        keys.ANOMALIES: 1,
        keys.QUARANTINE: 3,
        keys.DEAD: 1,
    }
    assert all(s["memory_bytes"] for s in streams.values())  # MEMORY USAGE answered (a refusal reads as None)
    (analytics,) = streams[keys.READINGS]["groups"]
    assert (analytics["pending"], analytics["lag"], analytics["lag_source"]) == (2, 3, "exact")
    assert [(c["name"], c["pending"]) for c in analytics["consumers"]] == [("a-1", 2)]
    assert analytics["oldest_pending_id"] == (await r.xrange(keys.READINGS, count=1))[0][0].decode()
    (alerting,) = streams[keys.ANOMALIES]["groups"]
    assert (alerting["pending"], alerting["lag"]) == (0, 0)
    assert doc["quarantine"]["top_reasons"] == [
        {"reason": "schema", "count": 2},
        {"reason": "clock_skew", "count": 1},
    ]
    assert doc["dead_letters"]["top_errors"] == [{"error": "ValueError: bad reading", "count": 1}]
    assert doc["dead_letters"]["by_origin"] == [
        {"stream": keys.READINGS, "group": keys.GROUP_ANALYTICS, "count": 1}
    ]

    rc, out, err = await cli(url, ["status"])
    assert rc == 0, err
    for text in ("Consumer groups", "a-1", keys.DEAD, "ValueError: bad reading", "schema"):
        assert text in out, text
    assert await denials() == []


async def test_ops_replay_by_id_and_since_with_and_without_resend_as_its_user(
    r: aredis.Redis, as_user: Any, cli: Any
) -> None:
    url, denials = await as_user("ops")
    sec, usec = await r.time()
    now = int(sec) * 1000 + int(usec) // 1000
    stored = []
    for i, age in enumerate((3 * 3_600_000, 90 * 60_000, 10 * 60_000)):
        body = orjson.dumps(stored_anomaly(1000 + i, now - age))
        await r.xadd(keys.ANOMALIES, {keys.PAYLOAD_FIELD: body}, id=f"{now - age}-0")
        stored.append(body)
    ids = [orjson.loads(b)["alert_id"] for b in stored]
    pubsub = r.pubsub()
    await pubsub.subscribe(keys.ALERTS_CHANNEL)
    assert (await pubsub.get_message(timeout=2))["type"] == "subscribe"

    async def received(n: int) -> list[bytes]:
        out: list[bytes] = []
        async with asyncio.timeout(5):
            while len(out) < n:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                if msg is not None:
                    out.append(msg["data"])
        assert await pubsub.get_message(timeout=0.2) is None  # nothing more
        return out

    def replayed(body: bytes, resend: bool = False) -> bytes:
        return body[:-1] + (b',"replayed":true,"resend":true}' if resend else b',"replayed":true}')

    try:
        rc, out, err = await cli(url, ["replay", "--alert-id", ids[0]])
        assert rc == 0, err
        assert await received(1) == [replayed(stored[0])]
        assert ids[0] in out and "receivers=1" in out and "1 anomaly replayed" in out

        rc, out, err = await cli(url, ["replay", "--alert-id", ids[1], "--resend"])
        assert rc == 0, err
        assert await received(1) == [replayed(stored[1], resend=True)]
        assert "(replayed, resend)" in out

        rc, out, err = await cli(url, ["replay", "--since", "2h"])
        assert rc == 0, err
        assert await received(2) == [replayed(b) for b in stored[1:]]
        assert "2 anomalies replayed" in out

        rc, out, err = await cli(url, ["replay", "--since", "2h", "--resend"])
        assert rc == 0, err
        assert await received(2) == [replayed(b, resend=True) for b in stored[1:]]
    finally:
        await pubsub.aclose()
    assert await r.xlen(keys.ANOMALIES) == 3  # replay only reads the stream
    assert await denials() == []


async def test_ops_dlq_list_retry_and_purge_as_its_user(r: aredis.Redis, as_user: Any, cli: Any) -> None:
    url, denials = await as_user("ops")
    sec, _ = await r.time()
    now = int(sec) * 1000

    async def add_dead(age_ms: int, stream: str, group: str, n: int) -> str:
        body = {
            "stream": stream,
            "group": group,
            "entry_id": "1-0",
            "deliveries": 5,
            "error": f"ValueError: bad {n}",
            "payload": orjson.dumps({"n": n}).decode(),
        }
        entry_id = f"{now - age_ms}-0"
        await r.xadd(keys.DEAD, {keys.PAYLOAD_FIELD: orjson.dumps(body)}, id=entry_id)
        return entry_id

    old = await add_dead(40 * DAY_MS, keys.READINGS, keys.GROUP_ANALYTICS, 1)
    from_anomalies = await add_dead(31 * DAY_MS, keys.ANOMALIES, keys.GROUP_ALERTING, 2)
    from_readings = await add_dead(3_600_000, keys.READINGS, keys.GROUP_ANALYTICS, 3)
    newest = await add_dead(600_000, keys.READINGS, keys.GROUP_ANALYTICS, 4)
    await r.xadd(keys.ANOMALIES, {keys.PAYLOAD_FIELD: b"{}"})  # wd:readings:v1 does not exist yet

    async def dead_ids() -> list[str]:
        return [i.decode() for i, _ in await r.xrange(keys.DEAD)]

    rc, out, err = await cli(url, ["dlq", "list", "--json"])
    assert rc == 0, err
    rows = [orjson.loads(line) for line in out.splitlines()]
    assert [(x["id"], x["stream"], x["error"]) for x in rows] == [
        (newest, keys.READINGS, "ValueError: bad 4"),
        (from_readings, keys.READINGS, "ValueError: bad 3"),
        (from_anomalies, keys.ANOMALIES, "ValueError: bad 2"),
        (old, keys.READINGS, "ValueError: bad 1"),
    ]
    assert 0 < rows[0]["age_ms"] < 3_600_000 < rows[1]["age_ms"]  # aged on the server clock (TIME)
    rc, out, err = await cli(url, ["dlq", "list"])
    assert rc == 0, err
    assert "4 dead letters" in out and "ValueError: bad 3" in out

    # The origin stream is absent: not recreated, the letter stays (the pipeline UNWATCHes on the way out).
    rc, out, err = await cli(url, ["dlq", "retry", "--id", from_readings, "--yes"])
    assert rc == 1 and "does not exist" in err
    assert not await r.exists(keys.READINGS) and len(await dead_ids()) == 4

    await r.xadd(keys.READINGS, {keys.PAYLOAD_FIELD: b"{}"})
    for entry_id, stream, n in ((from_readings, keys.READINGS, 3), (from_anomalies, keys.ANOMALIES, 2)):
        rc, out, err = await cli(url, ["dlq", "retry", "--id", entry_id, "--yes"])
        assert rc == 0, err
        new_id, fields = (await r.xrevrange(stream, count=1))[0]
        assert fields[keys.PAYLOAD_FIELD.encode()] == orjson.dumps({"n": n})
        assert f"retried {entry_id} -> {stream} {new_id.decode()}" in out
    assert await dead_ids() == [old, newest]

    rc, out, err = await cli(url, ["dlq", "purge", "--older-than", "30d", "--yes"])
    assert rc == 0, err
    assert "purged 1 dead letter(s)" in out and await dead_ids() == [newest]
    rc, out, err = await cli(url, ["dlq", "purge", "--id", newest, "--yes"])
    assert rc == 0, err
    assert "purged 1 dead letter(s)" in out and await dead_ids() == []
    assert await denials() == []
