"""The built-in MQTT broker (waterdoctor.broker) against real paho-mqtt 2 clients, MQTT 5 and 3.1.1, and raw sockets;
plus the real ingest crew on top of it, killed and restarted mid-run."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import psutil
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.ingest.corpus import reading
from tests.ingest.mqtt_tools import publish, stored_readings, wait_until
from tests.ingest.test_crash import (
    PacedPublisher,
    expected_keys,
    kill_and_restart,
    start_ingest,
    wait_connected,
)
from waterdoctor.embedded import (
    BuiltinBroker,
    MosquittoBroker,
    broker_kind,
    embedded_broker,
    mosquitto_binary,
)

V5, V311 = "v5", "v311"


class Client:
    """A paho-mqtt 2 client connected to a local broker, recording what it receives."""

    def __init__(
        self,
        port: int,
        client_id: str = "",
        *,
        version: str = V5,
        clean: bool = True,
        expiry: int | None = None,
        receive_maximum: int | None = None,
        manual_ack: bool = False,
    ) -> None:
        v5 = version == V5
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else clean,
            manual_ack=manual_ack,
        )
        self.messages: list[mqtt.MQTTMessage] = []
        self.session_present: bool | None = None
        self.disconnected = threading.Event()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda _c, _u, m: self.messages.append(m)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_disconnect = lambda *_: self.disconnected.set()
        props = None
        if v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            if expiry is not None:
                props.SessionExpiryInterval = expiry
            if receive_maximum is not None:
                props.ReceiveMaximum = receive_maximum
            self.client.connect("127.0.0.1", port, clean_start=clean, properties=props)
        else:
            self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._connected.wait(5), "no CONNACK"

    def _on_connect(self, _c: Any, _u: Any, flags: mqtt.ConnectFlags, reason: Any, _p: Any) -> None:
        self.session_present = flags.session_present
        self._connected.set()

    def subscribe(self, *filters: tuple[str, int]) -> None:
        self._subscribed.clear()
        self.client.subscribe(list(filters))
        assert self._subscribed.wait(5), "no SUBACK"

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(5)
        assert info.is_published()

    def wait_count(self, n: int, timeout: float = 5.0) -> bool:
        return wait_until(lambda: len(self.messages) >= n, timeout, 0.01)

    def ack(self, messages: list[mqtt.MQTTMessage]) -> None:
        for m in messages:
            self.client.ack(m.mid, m.qos)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def payloads(client: Client) -> list[bytes]:
    return [bytes(m.payload) for m in client.messages]


def numbered(n: int, start: int = 0) -> list[tuple[str, bytes]]:
    return [("q/t", str(i).encode()) for i in range(start, start + n)]


@pytest.fixture(params=["builtin", "mosquitto"])
def any_broker(request: pytest.FixtureRequest) -> MosquittoBroker | BuiltinBroker:
    broker: MosquittoBroker | BuiltinBroker = request.getfixturevalue(
        "builtin_broker" if request.param == "builtin" else "mosquitto"
    )
    return broker


# --- raw sockets ----------------------------------------------------------------------------------------------


def _utf8(s: bytes) -> bytes:
    return struct.pack("!H", len(s)) + s


def raw_connect(port: int, client_id: bytes, keepalive: int = 60) -> socket.socket:
    """An MQTT 5 clean-start connection on a plain socket, CONNACK read."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    body = _utf8(b"MQTT") + b"\x05\x02" + struct.pack("!H", keepalive) + b"\x00" + _utf8(client_id)
    sock.sendall(b"\x10" + bytes([len(body)]) + body)
    head = sock.recv(2)
    assert head[0] == 0x20, head
    connack = sock.recv(head[1])
    assert connack[1] == 0, connack
    return sock


def read_until_closed(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk


# --- tests ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [V5, V311])
def test_qos0_and_qos1_with_wildcards(builtin_broker: BuiltinBroker, version: str) -> None:
    port = builtin_broker.port
    plus = Client(port, version=version)
    plus.subscribe(("t/+/x", 1))
    hash_qos0 = Client(port, version=version)
    hash_qos0.subscribe(("t/#", 0))
    everything = Client(port, version=version)
    everything.subscribe(("#", 1))
    dollar = Client(port, version=version)
    dollar.subscribe(("$sys/#", 1))
    pub = Client(port, version=version)
    pub.publish("t/1/x", b"a", qos=1)
    pub.publish("t/2/y", b"b", qos=0)
    pub.publish("t", b"c", qos=1)  # "t/#" matches its parent level too
    pub.publish("$sys/t", b"d", qos=1)
    pub.publish("t/1/x/deeper", b"e", qos=1)
    assert (
        hash_qos0.wait_count(4) and everything.wait_count(4) and dollar.wait_count(1) and plus.wait_count(1)
    )
    time.sleep(0.2)
    assert [(m.topic, m.qos) for m in plus.messages] == [("t/1/x", 1)]
    assert payloads(hash_qos0) == [b"a", b"b", b"c", b"e"]
    assert {m.qos for m in hash_qos0.messages} == {0}
    assert payloads(everything) == [b"a", b"b", b"c", b"e"]  # "#" never matches a $-topic
    assert [(m.qos, m.retain) for m in everything.messages] == [
        (1, False),
        (0, False),
        (1, False),
        (1, False),
    ]
    assert payloads(dollar) == [b"d"]
    for c in (plus, hash_qos0, everything, dollar, pub):
        c.close()


def test_retained_message_and_v311_qos2_publish(builtin_broker: BuiltinBroker) -> None:
    pub = Client(builtin_broker.port, version=V311)
    pub.publish("r/1", b"kept", qos=1, retain=True)
    sub = Client(builtin_broker.port)
    sub.subscribe(("r/#", 1))
    assert sub.wait_count(1)
    assert (sub.messages[0].payload, sub.messages[0].retain) == (b"kept", True)
    pub.publish("r/2", b"exactly once", qos=2)  # 3.1.1 may send QoS 2: received once, delivered at QoS 1
    assert sub.wait_count(2)
    time.sleep(0.2)
    assert [(bytes(m.payload), m.qos, m.retain) for m in sub.messages[1:]] == [(b"exactly once", 1, False)]
    pub.close()
    sub.close()


def test_shared_subscription_splits_without_loss_or_duplicates(builtin_broker: BuiltinBroker) -> None:
    port = builtin_broker.port
    members = [Client(port, f"member-{i}", version=v) for i, v in enumerate((V5, V5))]
    for m in members:
        m.subscribe(("$share/g/s/#", 1))
    plain = Client(port)
    plain.subscribe(("s/#", 1))
    publish(builtin_broker.url, [(f"s/{i % 7}", str(i).encode()) for i in range(600)])
    assert wait_until(lambda: sum(len(m.messages) for m in members) >= 600, 10)
    assert plain.wait_count(600)
    time.sleep(0.2)
    got = payloads(members[0]) + payloads(members[1])
    assert Counter(got) == Counter(str(i).encode() for i in range(600))
    assert min(len(m.messages) for m in members) >= 200, [len(m.messages) for m in members]
    assert len(plain.messages) == 600
    for c in (*members, plain):
        c.close()


@pytest.mark.parametrize("version", [V5, V311])
def test_persistent_session_keeps_messages_while_offline(builtin_broker: BuiltinBroker, version: str) -> None:
    sub = Client(builtin_broker.port, "keeper", version=version, clean=False, expiry=60)
    assert sub.session_present is False
    sub.subscribe(("q/#", 1))
    sub.close()
    publish(builtin_broker.url, numbered(50))
    sub = Client(builtin_broker.port, "keeper", version=version, clean=False, expiry=60)
    assert sub.session_present is True
    assert sub.wait_count(50)
    assert payloads(sub) == [p for _, p in numbered(50)]
    sub.close()


def test_clean_start_discards_the_session(builtin_broker: BuiltinBroker) -> None:
    sub = Client(builtin_broker.port, "fresh", clean=False, expiry=60)
    sub.subscribe(("q/#", 1))
    sub.close()
    publish(builtin_broker.url, numbered(5))
    sub = Client(builtin_broker.port, "fresh", clean=True, expiry=60)
    assert sub.session_present is False
    publish(builtin_broker.url, numbered(5, 5))  # no subscription left either
    time.sleep(0.5)
    assert sub.messages == []
    sub.close()


def test_session_expires_after_its_interval(builtin_broker: BuiltinBroker) -> None:
    sub = Client(builtin_broker.port, "brief", clean=False, expiry=1)
    sub.subscribe(("q/#", 1))
    sub.close()
    publish(builtin_broker.url, numbered(3))
    time.sleep(2.0)
    sub = Client(builtin_broker.port, "brief", clean=False, expiry=1)
    assert sub.session_present is False
    time.sleep(0.3)
    assert sub.messages == []
    sub.close()


def test_unacknowledged_messages_come_back_with_dup(builtin_broker: BuiltinBroker) -> None:
    sub = Client(builtin_broker.port, "forgetful", clean=False, expiry=60, manual_ack=True)
    sub.subscribe(("q/#", 1))
    publish(builtin_broker.url, numbered(5))
    assert sub.wait_count(5)
    assert not any(m.dup for m in sub.messages)
    sub.close()  # without acknowledging anything
    sub = Client(builtin_broker.port, "forgetful", clean=False, expiry=60, manual_ack=True)
    assert sub.session_present is True
    assert sub.wait_count(5)
    time.sleep(0.2)
    assert payloads(sub) == [p for _, p in numbered(5)]
    assert all(m.dup for m in sub.messages)
    sub.ack(sub.messages)
    time.sleep(0.2)
    sub.close()
    sub = Client(builtin_broker.port, "forgetful", clean=False, expiry=60, manual_ack=True)
    time.sleep(0.3)
    assert sub.messages == []  # acknowledged: gone
    sub.close()


def test_receive_maximum_is_honoured_exactly(any_broker: MosquittoBroker | BuiltinBroker) -> None:
    sub = Client(any_broker.port, "slow", clean=False, expiry=60, receive_maximum=10, manual_ack=True)
    sub.subscribe(("q/#", 1))
    publish(any_broker.url, numbered(50))
    assert sub.wait_count(10)
    time.sleep(0.5)
    assert len(sub.messages) == 10  # the other 40 wait at the broker
    if isinstance(any_broker, BuiltinBroker):
        # Each PUBACK frees exactly one slot. (Mosquitto 2.0.11 does not keep this count: measured, every single
        # PUBACK after the first window releases up to another Receive Maximum of messages.)
        sub.ack(sub.messages[:4])
        assert sub.wait_count(14)
        time.sleep(0.3)
        assert len(sub.messages) == 14
    acked = 4 if isinstance(any_broker, BuiltinBroker) else 0
    deadline = time.monotonic() + 10
    while len(sub.messages) < 50 and time.monotonic() < deadline:
        got = len(sub.messages)
        sub.ack(sub.messages[acked:got])
        acked = got
        wait_until(lambda g=got: len(sub.messages) > g, 2, 0.01)
    assert payloads(sub) == [p for _, p in numbered(50)]
    sub.close()


def test_malformed_packets_close_only_their_connection(builtin_broker: BuiltinBroker) -> None:
    port = builtin_broker.port
    bystander = Client(port, "bystander")
    bystander.subscribe(("q/#", 1))
    # Garbage instead of CONNECT.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"\x00\x00\xff\xff")
        assert read_until_closed(sock) == b""
    # A remaining length longer than four bytes after a good CONNECT: DISCONNECT 0x81 (malformed), then closed.
    with raw_connect(port, b"bad-1") as sock:
        sock.sendall(b"\x30\xff\xff\xff\xff\x01")
        assert read_until_closed(sock) == b"\xe0\x02\x81\x00"
    # Truncated string inside a PUBLISH.
    with raw_connect(port, b"bad-2") as sock:
        sock.sendall(b"\x32\x04\x00\x09ab")
        assert read_until_closed(sock).startswith(b"\xe0\x02")
    # QoS 2 from an MQTT 5 client: the broker announced Maximum QoS 1, so DISCONNECT 0x9B.
    with raw_connect(port, b"bad-3") as sock:
        sock.sendall(b"\x34\x07\x00\x02q/\x00\x01\x00x")
        assert read_until_closed(sock) == b"\xe0\x02\x9b\x00"
    publish(builtin_broker.url, numbered(3))
    assert bystander.wait_count(3)
    assert not bystander.disconnected.is_set()
    assert builtin_broker.running
    log = (builtin_broker.data_dir / "wd-broker.log").read_text()
    assert "closing MQTT connection" in log and "Traceback" not in log
    bystander.close()


def test_keep_alive_timeout_and_session_takeover(builtin_broker: BuiltinBroker) -> None:
    port = builtin_broker.port
    with raw_connect(port, b"sleepy", keepalive=1) as sock:
        start = time.monotonic()
        assert read_until_closed(sock) == b"\xe0\x02\x8d\x00"  # keep alive timeout
        assert 1.4 < time.monotonic() - start < 3.5
    with raw_connect(port, b"twin") as first:
        second = Client(port, "twin")
        assert read_until_closed(first) == b"\xe0\x02\x8e\x00"  # session taken over
        assert not second.disconnected.is_set()
        second.close()


def test_state_survives_sigterm_and_restart(builtin_broker: BuiltinBroker) -> None:
    sub = Client(builtin_broker.port, "durable", clean=False, expiry=3600, receive_maximum=5, manual_ack=True)
    sub.subscribe(("q/#", 1))
    Client(builtin_broker.port).publish("r/x", b"retained", retain=True)
    publish(builtin_broker.url, numbered(20))
    assert sub.wait_count(5)  # 5 in flight, unacknowledged; 15 queued
    sub.close()
    builtin_broker.stop()  # SIGTERM: saves the state
    assert (builtin_broker.data_dir / "broker-state.json").exists()
    builtin_broker.start()
    sub = Client(builtin_broker.port, "durable", clean=False, expiry=3600, manual_ack=True)
    assert sub.session_present is True
    assert sub.wait_count(5)
    assert all(m.dup for m in sub.messages[:5])
    sub.ack(sub.messages[:5])
    assert sub.wait_count(20)
    assert payloads(sub) == [p for _, p in numbered(20)]
    sub.subscribe(("r/#", 1))
    assert sub.wait_count(21)
    assert (sub.messages[20].payload, sub.messages[20].retain) == (b"retained", True)
    sub.close()


def test_broker_choice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WD_EMBEDDED_BROKER", "builtin")
    assert broker_kind() == "builtin"
    assert isinstance(embedded_broker(tmp_path), BuiltinBroker)
    monkeypatch.setenv("WD_EMBEDDED_BROKER", "mosquitto")
    assert isinstance(embedded_broker(tmp_path), MosquittoBroker)
    monkeypatch.delenv("WD_EMBEDDED_BROKER")
    assert broker_kind() == ("mosquitto" if mosquitto_binary() else "builtin")
    assert broker_kind("builtin") == "builtin"


# --- adversarial review: each of these failed before its fix in waterdoctor/broker.py -------------------------


def test_crash_after_a_restart_does_not_replay_acknowledged_messages(builtin_broker: BuiltinBroker) -> None:
    sub = Client(builtin_broker.port, "replay", clean=False, expiry=3600, manual_ack=True)
    sub.subscribe(("q/#", 1))
    sub.close()
    publish(builtin_broker.url, numbered(5))
    builtin_broker.stop()  # clean stop: the 5 queued messages are saved
    builtin_broker.start()
    sub = Client(builtin_broker.port, "replay", clean=False, expiry=3600, manual_ack=True)
    assert sub.wait_count(5)
    sub.ack(sub.messages)
    time.sleep(0.3)
    sub.close()
    builtin_broker.kill()  # a crash must lose state, never bring back the old state file's acknowledged messages
    builtin_broker.start()
    sub = Client(builtin_broker.port, "replay", clean=False, expiry=3600, manual_ack=True)
    time.sleep(0.5)
    assert sub.messages == []
    sub.close()


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b'{"version": 1, "sessions": [{"id": "x"',
        b"\xff\xfe\x00garbage",
        b"[]",
        b'{"version":1,"retained":[],"sessions":[{"id":"x","expiry":9,"disconnected_at":0,"next_pid":1,'
        b'"inflight":[],"queue":[],"qos2":[],"subs":[]}]}',
        b'{"version":1,"retained":[{"t":7,"p":"","q":1,"r":true,"x":"","e":null}],"sessions":[]}',
    ],
    ids=["empty", "truncated", "binary", "list", "subs-not-object", "topic-not-string"],
)
def test_corrupt_state_file_starts_empty_with_a_warning(
    builtin_broker: BuiltinBroker, content: bytes
) -> None:
    builtin_broker.stop()
    (builtin_broker.data_dir / "broker-state.json").write_bytes(content)
    builtin_broker.start()
    sub = Client(builtin_broker.port, "after-corruption")
    sub.subscribe(("q/#", 1))
    publish(builtin_broker.url, numbered(3))
    assert sub.wait_count(3)
    sub.close()
    assert builtin_broker.running
    log = (builtin_broker.data_dir / "wd-broker.log").read_text()
    assert "starting empty" in log and "Traceback" not in log


@pytest.mark.parametrize("expiry", [None, 1], ids=["session-ends-at-disconnect", "session-expires"])
def test_shared_member_whose_session_ends_hands_its_messages_to_the_group(
    builtin_broker: BuiltinBroker, expiry: int | None
) -> None:
    port = builtin_broker.port
    holder = Client(port, "holder", clean=expiry is None, expiry=expiry, receive_maximum=3, manual_ack=True)
    holder.subscribe(("$share/g/q/#", 1))
    publish(builtin_broker.url, numbered(10))  # the only member: 3 in flight (unacknowledged), 7 queued
    assert holder.wait_count(3)
    other = Client(port, "other")
    other.subscribe(("$share/g/q/#", 1))
    holder.close()  # without acknowledging: its session ends now, or a second later
    assert other.wait_count(10, timeout=5)
    time.sleep(0.2)
    assert payloads(other) == [p for _, p in numbered(10)]
    other.close()


def test_a_subscriber_that_stops_reading_does_not_grow_broker_memory(builtin_broker: BuiltinBroker) -> None:
    port = builtin_broker.port
    with socket.socket() as stuck:
        _stop_reading(stuck, port)
        broker = psutil.Process(builtin_broker.proc.pid)  # type: ignore[union-attr]
        before = broker.memory_info().rss
        chunk = b"x" * 512 * 1024
        # QoS 1 in (acknowledged by the broker once routed), QoS 0 out to the stuck subscriber only: unbounded,
        # its connection's write buffer would hold all 150 MiB; bounded, the broker drops what it cannot send.
        publish(builtin_broker.url, [(f"big/{i}", chunk) for i in range(300)])
        time.sleep(0.5)
        grown = broker.memory_info().rss - before
    assert grown < 50 * 1024 * 1024, f"broker grew by {grown >> 20} MiB for a subscriber that does not read"


def _stop_reading(stuck: socket.socket, port: int) -> None:
    """Connects ``stuck`` with a tiny receive buffer, subscribes to big/# at QoS 0, and reads nothing more."""
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(("127.0.0.1", port))
    body = _utf8(b"MQTT") + b"\x05\x02\x00\x00\x00" + _utf8(b"stuck")
    stuck.sendall(b"\x10" + bytes([len(body)]) + body)
    assert stuck.recv(64)[0] == 0x20
    sub = _utf8(b"big/#") + b"\x00"  # QoS 0
    stuck.sendall(b"\x82" + bytes([3 + len(sub)]) + b"\x00\x01\x00" + sub)
    time.sleep(0.3)  # SUBACK sent; from now on nothing is read


@pytest.mark.parametrize("version", [V5, V311])
def test_message_of_the_maximum_packet_size_reaches_clients_without_a_limit(
    builtin_broker: BuiltinBroker, version: str
) -> None:
    sub = Client(builtin_broker.port, version=version)
    if version == V5:
        props = Properties(PacketTypes.SUBSCRIBE)  # type: ignore[no-untyped-call]
        props.SubscriptionIdentifier = 200_000  # 3 more bytes on the way out
        sub._subscribed.clear()
        sub.client.subscribe("big/#", qos=1, properties=props)
        assert sub._subscribed.wait(5)
    else:
        sub.subscribe(("big/#", 1))
    # An MQTT 5 QoS 1 PUBLISH of exactly 1 MiB: 1 + 3 (remaining length) + 6 (topic) + 2 (id) + 1 (properties).
    payload = b"y" * (1024 * 1024 - 13)
    pub = Client(builtin_broker.port)
    pub.publish("big/", payload, qos=1)
    pub.close()
    assert sub.wait_count(1), "the broker accepted the message but never delivered it"
    assert len(sub.messages[0].payload) == len(payload)
    sub.close()


# --- the real ingest crew -------------------------------------------------------------------------------------


@pytest.fixture
def ingest_log(tmp_path: Path) -> Iterator[Path]:
    log = tmp_path / "ingest.log"
    log.touch()
    yield log


def test_ingest_stores_each_reading_once_across_sigkills(
    redis_only_url: str, builtin_broker: BuiltinBroker, ingest_log: Path
) -> None:
    now = int(time.time() * 1000)
    msgs = [
        (f"wd/p1/s{i % 20}/telemetry", orjson.dumps(reading(f"s{i % 20}", i // 20, now))) for i in range(3000)
    ]
    msgs += [
        (f"wd/p1/gw{b}/batch", orjson.dumps({"gateway_id": f"gw{b}", "readings": [reading(f"g{j}", b, now) for j in range(50)]}))
        for b in range(20)
    ]  # fmt: skip
    proc = start_ingest(redis_only_url, builtin_broker.url, "wdb-1", ingest_log)
    wait_connected(ingest_log)
    # Paced (3 s at least) so that both kills land mid-publish.
    pub = PacedPublisher(builtin_broker.url, msgs, chunk=100, client_id="wdb-pub")
    kills = kills_during_publish = 0
    try:
        while kills < 2:
            time.sleep(0.3)
            kills_during_publish += not pub.done.is_set()
            proc = kill_and_restart(proc, redis_only_url, builtin_broker.url, "wdb-1", ingest_log, kills + 1)
            kills += 1
        pub.join()
        assert wait_until(lambda: len(stored_readings(redis_only_url)) >= 4000, 30)
        time.sleep(0.5)  # anything stored twice would show up now
    finally:
        proc.terminate()
        proc.wait(20)
    stored = [(x["sensor_id"], x["seq"]) for x in stored_readings(redis_only_url)]
    assert kills_during_publish == 2
    assert [k for k, n in Counter(stored).items() if n > 1] == []
    assert set(stored) == expected_keys(msgs)
    assert len(stored) == 4000
