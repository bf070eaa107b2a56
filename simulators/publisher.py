"""Publish a :class:`~simulators.fleet.Fleet` over MQTT QoS 1 (paho-mqtt 2.x, MQTT v5), live-paced or flat out.

One paho client runs its network loop in a thread (``loop_start``); the caller's thread encodes and publishes without
waiting for each PUBACK, but never has more than ``max_inflight`` messages unacknowledged (a semaphore released by
``on_publish``). When the broker goes away, paho reconnects (``reconnect_delay_set``) and re-sends every QoS 1
message that was not yet acknowledged, with the DUP flag, so a broker restart may yield duplicates but no loss
from this side; whatever is still unacknowledged at the end is counted.

Every reading sent is recorded in a :class:`PublishLog` with its wall-clock publish time and whether the broker
acknowledged its message, so that a load runner can count loss and duplicates against the streams and measure
latency from publish to anomaly.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, NamedTuple, Self

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from handoff.errors import HandoffError
from handoff.settings import MqttEndpoint
from simulators.fleet import _LABEL_NAMES, ANOMALY_CLASSES, AnomalyClass, Fleet, LabelledReading, ReadingKey

__all__ = [
    "PublishError",
    "PublishLog",
    "PublishStats",
    "PublishedReading",
    "Publisher",
    "batch_topic",
    "encode_batch",
    "encode_reading",
    "single_topic",
]

logger = logging.getLogger(__name__)

MAX_BATCH: Final = 1000  # CONTRACT.md section 2: a gateway batch holds 1 to 1000 readings
_LABEL_CODE: Final[dict[AnomalyClass | None, int]] = {c: i for i, c in enumerate(ANOMALY_CLASSES)} | {
    None: -1
}


class PublishError(HandoffError):
    """The publisher could not connect, or paho refused a message."""


def single_topic(site: str, sensor_id: str) -> str:
    """``wd/{site}/{sensor_id}/telemetry`` (CONTRACT.md section 2)."""
    return f"wd/{site}/{sensor_id}/telemetry"


def batch_topic(site: str, gateway_id: str) -> str:
    """``wd/{site}/{gateway_id}/batch`` (CONTRACT.md section 2)."""
    return f"wd/{site}/{gateway_id}/batch"


def encode_reading(reading: LabelledReading) -> tuple[str, bytes]:
    """Topic and JSON payload of one reading on its single-reading topic (the label stays out)."""
    return f"wd/{reading.site}/{reading.sensor_id}/telemetry", orjson.dumps(reading.payload())


def encode_batch(site: str, gateway_id: str, readings: Sequence[LabelledReading]) -> tuple[str, bytes]:
    """Topic and JSON payload of a gateway batch; every reading must belong to ``site``."""
    if not 1 <= len(readings) <= MAX_BATCH:
        raise ValueError(f"a batch holds 1 to {MAX_BATCH} readings")
    return (
        f"wd/{site}/{gateway_id}/batch",
        orjson.dumps({"gateway_id": gateway_id, "readings": [r.payload() for r in readings]}),
    )


class PublishedReading(NamedTuple):
    """One reading as sent: its key, ground truth, wall-clock publish time (epoch ms) and broker acknowledgement."""

    site: str
    sensor_id: str
    seq: int
    publish_ms: float
    acked: bool
    label: AnomalyClass | None
    repeat: bool
    message: int  # index of the MQTT message that carried it, in send order


class PublishLog:
    """What a publisher sent, one compact row per reading (a few tens of bytes, so millions fit).

    Thread-safe: the publishing thread appends, paho's network thread marks messages acknowledged.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sensor_ids: dict[tuple[str, str], int] = {}
        self._sensor_names: list[tuple[str, str]] = []
        self._sensor = array("i")
        self._seq = array("q")
        self._publish_ms = array("d")
        self._message = array("i")
        self._label = array("b")
        self._repeat = array("b")
        self._msg_state = (
            bytearray()
        )  # 0 in flight, 1 acknowledged, 2 rejected by the broker (reason code >= 0x80)
        self._msg_size = array("i")
        self._msg_first = array("i")  # readings of the message that are not a repeated send
        self.messages_acked = 0
        self.messages_rejected = 0
        self.readings_acked = 0
        #: Acknowledged readings that were not a repeated send: about the distinct readings the broker has, at
        #: no cost (``len(acked_keys())`` walks every record: seconds once there are millions).
        self.first_sends_acked = 0

    # -- written by the publisher ---------------------------------------------------------------------------

    def record(self, readings: Sequence[LabelledReading], publish_ms: float) -> int:
        """Record a message about to be published; returns its index."""
        with self._lock:
            msg = len(self._msg_state)
            self._msg_state.append(0)
            self._msg_size.append(len(readings))
            self._msg_first.append(sum(1 for r in readings if not r.repeat))
            ids = self._sensor_ids
            for r in readings:
                name = (r.site, r.sensor_id)
                sid = ids.get(name)
                if sid is None:
                    sid = ids[name] = len(self._sensor_names)
                    self._sensor_names.append(name)
                self._sensor.append(sid)
                self._seq.append(r.seq)
                self._publish_ms.append(publish_ms)
                self._message.append(msg)
                self._label.append(_LABEL_CODE[r.label])
                self._repeat.append(r.repeat)
            return msg

    def settle(self, message: int, ok: bool) -> None:
        """Mark a message acknowledged (``ok``) or rejected by the broker."""
        with self._lock:
            if self._msg_state[message]:
                return
            self._msg_state[message] = 1 if ok else 2
            if ok:
                self.messages_acked += 1
                self.readings_acked += self._msg_size[message]
                self.first_sends_acked += self._msg_first[message]
            else:
                self.messages_rejected += 1

    # -- read by load runners and tests ---------------------------------------------------------------------

    @property
    def messages_sent(self) -> int:
        return len(self._msg_state)

    @property
    def readings_sent(self) -> int:
        return len(self._seq)

    @property
    def messages_unacked(self) -> int:
        """Messages neither acknowledged nor rejected (yet)."""
        with self._lock:
            return len(self._msg_state) - self.messages_acked - self.messages_rejected

    def entries(self, start: int = 0, stop: int | None = None) -> Iterator[PublishedReading]:
        """Every reading sent, in send order (a repeated reading appears once per send); ``start``/``stop``
        select by position, as in a slice (``readings_sent`` before a phase marks where it begins)."""
        with self._lock:
            n = len(self._seq) if stop is None else min(stop, len(self._seq))
            names = list(self._sensor_names)
            state = bytes(self._msg_state)
        for i in range(start, n):
            site, sensor_id = names[self._sensor[i]]
            msg = self._message[i]
            yield PublishedReading(
                site,
                sensor_id,
                self._seq[i],
                self._publish_ms[i],
                state[msg] == 1,
                _LABEL_NAMES[self._label[i]],
                bool(self._repeat[i]),
                msg,
            )

    def sent_keys(self, start: int = 0, stop: int | None = None) -> set[ReadingKey]:
        """Distinct ``(site, sensor_id, seq)`` sent: what the pipeline must store exactly once."""
        return {(e.site, e.sensor_id, e.seq) for e in self.entries(start, stop)}

    def acked_keys(self) -> set[ReadingKey]:
        """Distinct keys of which at least one send was acknowledged by the broker."""
        return {(e.site, e.sensor_id, e.seq) for e in self.entries() if e.acked}

    def unacked_keys(self) -> set[ReadingKey]:
        """Keys sent but never acknowledged: the broker may or may not have them."""
        return self.sent_keys() - self.acked_keys()

    def publish_ms(self) -> dict[ReadingKey, float]:
        """Wall-clock time (epoch ms) of each key's first send, for publish-to-anomaly latency."""
        out: dict[ReadingKey, float] = {}
        for e in self.entries():
            out.setdefault((e.site, e.sensor_id, e.seq), e.publish_ms)
        return out

    def labels(self) -> dict[ReadingKey, AnomalyClass]:
        """Ground truth of the labelled readings sent."""
        return {(e.site, e.sensor_id, e.seq): e.label for e in self.entries() if e.label is not None}

    def anomalies_by_class(self) -> Counter[AnomalyClass]:
        """Distinct labelled readings sent, per anomaly class."""
        return Counter(self.labels().values())


@dataclass(frozen=True, slots=True)
class PublishStats:
    """Counters of a publisher; ``achieved_rate`` counts readings the broker acknowledged per second."""

    elapsed_s: float
    offered_rate: float
    readings_sent: int
    messages_sent: int
    readings_acked: int
    messages_acked: int
    messages_rejected: int
    messages_unacked: int
    disconnects: int
    #: Of :meth:`Publisher.run`: the longest time between two rounds of the publishing loop, and how many rounds
    #: came more than 100 ms late. A stalled publisher sends what it owes at once: the load downstream is burstier
    #: than the fleet's own.
    max_stall_s: float = 0.0
    stalls: int = 0

    @property
    def achieved_rate(self) -> float:
        return self.readings_acked / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def sent_rate(self) -> float:
        return self.readings_sent / self.elapsed_s if self.elapsed_s > 0 else 0.0


class Publisher:
    """A paho MQTT v5 client that publishes :class:`LabelledReading` at QoS 1, singly or in gateway batches.

    Args:
        endpoint: the broker (``Settings().require_mqtt()``).
        batch: readings per gateway message (1 to 1000); 1 publishes each reading on its telemetry topic.
        max_inflight: most messages sent but not yet acknowledged; publishing blocks beyond it.
        max_batch_delay_s: a partial gateway batch is sent once its oldest reading waited this long.
        client_id: MQTT client id (default: unique per process).
        log: where sends are recorded (default: a new :class:`PublishLog`).
        reconnect_delay_s: (min, max) backoff between reconnect attempts.
        respect_receive_maximum: lower the window to the broker's MQTT 5 Receive Maximum (the spec's rule).

    Use as a context manager or call :meth:`start` / :meth:`close`. :meth:`publish` sends readings as fast as the
    in-flight window allows; :meth:`run` paces a fleet on the wall clock.
    """

    def __init__(
        self,
        endpoint: MqttEndpoint,
        *,
        batch: int = 1,
        max_inflight: int = 1000,
        max_batch_delay_s: float = 0.2,
        client_id: str | None = None,
        log: PublishLog | None = None,
        reconnect_delay_s: tuple[int, int] = (1, 8),
        connect_timeout_s: float = 10.0,
        respect_receive_maximum: bool = True,
    ) -> None:
        if not 1 <= batch <= MAX_BATCH:
            raise ValueError(f"batch must be 1 to {MAX_BATCH}")
        if max_inflight < 1 or max_inflight > 60_000:
            raise ValueError("max_inflight must be 1 to 60000 (MQTT packet ids are 16-bit)")
        self.endpoint = endpoint
        self.batch = batch
        self.max_inflight = max_inflight
        self.max_batch_delay_s = max_batch_delay_s
        self.client_id = client_id or f"wd-sim-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.log = log if log is not None else PublishLog()
        self.connect_timeout_s = connect_timeout_s
        self.respect_receive_maximum = respect_receive_maximum
        self.disconnects = 0
        # The in-flight window: a counter under a condition rather than a semaphore, because the broker's Receive
        # Maximum (known only at CONNACK) may lower the limit.
        self._window = threading.Condition()
        self._outstanding = 0
        self._limit = max_inflight
        self._lock = threading.Lock()
        self._inflight: dict[int, int] = {}  # mid -> message index
        self._early: dict[int, bool] = {}  # PUBACKs that beat our bookkeeping of the mid
        self._connected = threading.Event()
        self._closed = False
        self._buffers: dict[tuple[str, str], list[LabelledReading]] = {}
        self._buffer_since: dict[tuple[str, str], float] = {}
        self._started_at: float | None = None
        self._offered_rate = 0.0
        self._max_stall_s = 0.0
        self._stalls = 0

        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            reconnect_on_failure=True,
        )
        if endpoint.username:
            client.username_pw_set(
                endpoint.username, endpoint.password.get_secret_value() if endpoint.password else None
            )
        if endpoint.tls:
            client.tls_set()
        # paho's own in-flight limit is off (0): with a limit, every PUBACK walks all outstanding messages
        # (Client._update_inflight), which made 1,000 in flight three times slower than 100. Our window bounds
        # what is outstanding instead, and paho's queue is unbounded because nothing waits in it.
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(*reconnect_delay_s)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self._client = client

    # -- lifecycle --------------------------------------------------------------------------------------------

    def start(self) -> Self:
        """Connect and start paho's network thread; raises :class:`PublishError` if no CONNACK in time."""
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600  # keep the session across a reconnect: paho re-sends unacked QoS 1
        try:
            self._client.connect(
                self.endpoint.host,
                self.endpoint.port,
                keepalive=30,
                clean_start=mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                properties=props,
            )
        except OSError as exc:
            raise PublishError(
                f"cannot reach MQTT broker {self.endpoint.host}:{self.endpoint.port}: {exc}"
            ) from exc
        self._client.loop_start()
        if not self._connected.wait(self.connect_timeout_s):
            self._client.loop_stop()
            raise PublishError(f"no CONNACK from {self.endpoint.host}:{self.endpoint.port}")
        self._started_at = time.monotonic()
        return self

    def close(self, drain_timeout_s: float = 10.0) -> PublishStats:
        """Send partial batches, wait up to ``drain_timeout_s`` for acknowledgements, disconnect."""
        if self._closed:
            return self.stats()
        self.flush()
        self.drain(drain_timeout_s)
        stats = self.stats()
        self._closed = True
        self._client.disconnect()
        self._client.loop_stop()
        return stats

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- publishing -------------------------------------------------------------------------------------------

    def publish(self, readings: Iterable[LabelledReading], stop: threading.Event | None = None) -> int:
        """Send readings now (batched per site and gateway when ``batch`` > 1); returns messages sent.

        Blocks while ``max_inflight`` messages are unacknowledged; returns early when ``stop`` is set.
        """
        sent = 0
        if self.batch == 1:
            for r in readings:
                topic, payload = encode_reading(r)
                if not self._send(topic, payload, (r,), stop):
                    break
                sent += 1
            return sent
        now = time.monotonic()
        for r in readings:
            key = (r.site, r.gateway_id)
            buf = self._buffers.get(key)
            if buf is None:
                buf = self._buffers[key] = []
                self._buffer_since[key] = now
            buf.append(r)
            if len(buf) >= self.batch:
                if not self._send_batch(key, stop):
                    break
                sent += 1
        return sent

    def flush(self, older_than_s: float | None = None, stop: threading.Event | None = None) -> int:
        """Send partial gateway batches (all, or those whose oldest reading waited ``older_than_s``)."""
        now = time.monotonic()
        sent = 0
        for key in list(self._buffers):
            if older_than_s is None or now - self._buffer_since[key] >= older_than_s:
                if not self._send_batch(key, stop):
                    break
                sent += 1
        return sent

    def drain(self, timeout_s: float) -> bool:
        """Wait until every message sent is acknowledged (or rejected); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self.log.messages_unacked:
            if time.monotonic() >= deadline:
                logger.warning(
                    "%d messages still unacknowledged after %.1fs", self.log.messages_unacked, timeout_s
                )
                return False
            time.sleep(0.01)
        return True

    def run(
        self,
        fleet: Fleet,
        duration_s: float | None,
        stop: threading.Event | None = None,
        on_progress: Callable[[PublishStats], None] | None = None,
        progress_every_s: float = 1.0,
    ) -> PublishStats:
        """Publish ``fleet`` live for ``duration_s`` (None: until ``stop``): its simulated clock is the wall clock.

        Readings go out when their device emits them (``emit_ms``), so late and buffered readings carry an older
        ``ts``. The fleet must start near now (``Fleet(start_ms=now)``) so that ``ts`` is within the contract's
        window. Partial batches are sent at the end; acknowledgements are not awaited (see :meth:`close`).
        """
        stop = stop or threading.Event()
        now_ms = _wall_ms()
        if abs(now_ms - fleet.now_ms) > 60_000:
            raise ValueError("the fleet's clock is not near the wall clock: build it with start_ms=now")
        self._offered_rate = fleet.rate
        start = time.monotonic()
        end_ms = now_ms + (round(duration_s * 1000) if duration_s is not None else 10**15)
        next_progress = start + progress_every_s
        tick_s = 0.005
        last_round = time.monotonic()
        while not stop.is_set():
            t_round = time.monotonic()
            late = t_round - last_round - tick_s
            last_round = t_round
            self._max_stall_s = max(self._max_stall_s, late)
            self._stalls += late > 0.1
            now_ms = min(_wall_ms(), end_ms)
            if now_ms > fleet.now_ms:
                self.publish(fleet.step(now_ms), stop)
            if self.batch > 1:
                self.flush(self.max_batch_delay_s, stop)
            if now_ms >= end_ms:
                break
            t = time.monotonic()
            if on_progress is not None and t >= next_progress:
                next_progress = t + progress_every_s
                on_progress(self.stats())
            # Sleep to the next tick only when the step was quick; when behind, catch up at once.
            stop.wait(max(0.0, tick_s - (time.monotonic() - t)))
        self.flush(stop=stop)
        return self.stats()

    def stats(self) -> PublishStats:
        log = self.log
        elapsed = time.monotonic() - self._started_at if self._started_at is not None else 0.0
        return PublishStats(
            elapsed_s=elapsed,
            offered_rate=self._offered_rate,
            readings_sent=log.readings_sent,
            messages_sent=log.messages_sent,
            readings_acked=log.readings_acked,
            messages_acked=log.messages_acked,
            messages_rejected=log.messages_rejected,
            messages_unacked=log.messages_unacked,
            disconnects=self.disconnects,
            max_stall_s=self._max_stall_s,
            stalls=self._stalls,
        )

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # -- internals ------------------------------------------------------------------------------------------

    def _send_batch(self, key: tuple[str, str], stop: threading.Event | None) -> bool:
        readings = self._buffers.pop(key)
        del self._buffer_since[key]
        topic, payload = encode_batch(key[0], key[1], readings)
        return self._send(topic, payload, readings, stop)

    def _send(
        self, topic: str, payload: bytes, readings: Sequence[LabelledReading], stop: threading.Event | None
    ) -> bool:
        if self._closed:
            raise PublishError("publisher is closed")
        # Bounded in flight: wait for a PUBACK to free a slot, but stay responsive to ``stop``.
        with self._window:
            while self._outstanding >= self._limit:
                if stop is not None and stop.is_set():
                    return False
                self._window.wait(0.1)
            self._outstanding += 1
        msg = self.log.record(readings, time.time() * 1000.0)
        info = self._client.publish(topic, payload, qos=1)
        # NO_CONN is fine: paho keeps the QoS 1 message and sends it after the reconnect.
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            self._settle(msg, ok=False)
            raise PublishError(f"paho refused a message on {topic}: {mqtt.error_string(info.rc)}")
        with self._lock:
            early = self._early.pop(info.mid, None)
            if early is None:
                self._inflight[info.mid] = msg
        if early is not None:
            self._settle(msg, early)
        return True

    def _settle(self, msg: int, ok: bool) -> None:
        self.log.settle(msg, ok)
        with self._window:
            self._outstanding -= 1
            self._window.notify()

    # paho callbacks (network thread). on_publish runs under paho's message lock: never call into paho from it.

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_code: ReasonCode, properties: Properties
    ) -> None:
        ok = not reason_code.is_failure
        if not ok:
            logger.warning("broker rejected message %d: %s", mid, reason_code)
        with self._lock:
            msg = self._inflight.pop(mid, None)
            if msg is None:  # PUBACK arrived before _send recorded the mid
                self._early[mid] = ok
                return
        self._settle(msg, ok)

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            logger.error("broker refused the connection: %s", reason_code)
            return
        # Honour the broker's Receive Maximum (MQTT 5): never more unacknowledged messages than it allows, or a
        # strict broker disconnects us (Mosquitto 2.0 advertises it but tolerates more for QoS 1).
        receive_max = getattr(properties, "ReceiveMaximum", None)
        if self.respect_receive_maximum and receive_max is not None and receive_max < self._limit:
            logger.info(
                "broker Receive Maximum is %d: in-flight window lowered from %d", receive_max, self._limit
            )
            with self._window:
                self._limit = int(receive_max)
        if self.disconnects:
            logger.info("reconnected to %s:%d", self.endpoint.host, self.endpoint.port)
        self._connected.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connected.clear()
        if not self._closed:
            self.disconnects += 1
            logger.warning(
                "disconnected from %s:%d (%s); paho reconnects",
                self.endpoint.host,
                self.endpoint.port,
                reason_code,
            )


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000
