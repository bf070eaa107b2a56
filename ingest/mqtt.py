"""MQTT intake: paho-mqtt 2 with MQTT 5, a persistent session, a shared subscription and late (manual) PUBACKs.

Why paho-mqtt: the contract requires the PUBACK to leave only after the readings are in Redis. aiomqtt acknowledges
on receipt, before our code runs, and has no switch for it; paho-mqtt 2 has ``manual_ack=True`` and a public
``Client.ack(mid, qos)``, is the most used Python MQTT client, and implements MQTT 5 session expiry, clean start and
receive maximum. gmqtt can also acknowledge late but is far less maintained. Measured on this machine a bare paho
subscriber receives and acknowledges about 15k QoS 1 messages/s, above what ingest needs per process.

Threads: paho's own network thread (``loop_start``) reads the socket and calls :meth:`_on_message`, which only
appends to a lock-protected inbox; the crew takes messages from it on its own thread, writes them, then calls
:meth:`MqttIntake.ack`. ``Client.ack`` is safe from another thread while ``loop_start`` runs: it appends the PUBACK
to a deque and wakes the network thread through paho's socket pair, and never writes the socket itself then.

Connection generations: every connect and disconnect bumps a generation number, and a message is acknowledged only on
the connection that delivered it. After a reconnect the broker redelivers every unacknowledged message of the
session (possibly under a packet id that now names another message), so acknowledging an old packet id on a new
connection could acknowledge the wrong message. The old copy is written anyway (harmless, deduplicated) and the
redelivered one is acknowledged when its own turn comes.

Shared subscription and sessions (measured on Mosquitto 2.0.11): the broker keeps handing a disconnected member its
share of the messages and holds them in that member's session until the same client id returns. So the client id
must be stable per instance (the default is host + instance index): a restarted ingest resumes its session and its
backlog; an id that never returns loses its backlog when the session expires.

Flow control: the broker sends at most ``receive_maximum`` unacknowledged messages (MQTT 5 Receive Maximum; measured:
Mosquitto 2.0.11 stops at exactly that many and queues the rest in the session). Holding acknowledgements is therefore
all it takes to make messages wait at the broker: that is how backpressure, Redis outages and shutdown work.
Known broker bug (measured on Mosquitto 2.0.11, Debian 12's): it honours the window only until the first PUBACK, then
sends up to ``receive_maximum`` more per PUBACK (10, 20, 30, 40 delivered after 0, 1, 2, 3 single PUBACKs with a
window of 10). Holding PUBACKs still stops it, so nothing is lost, but after an outage a session backlog can arrive
in this process's memory faster than the window suggests. WaterDoctor's built-in broker honours the window exactly.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from handoff.settings import MqttEndpoint
from ingest import metrics

logger = logging.getLogger(__name__)

__all__ = ["SHARE_GROUP", "TOPICS", "Incoming", "MqttIntake", "default_client_id"]

SHARE_GROUP: Final = "ingest"
TOPICS: Final = ("wd/+/+/telemetry", "wd/+/+/batch")


def default_client_id(index: int = 0) -> str:
    """A stable client id: the same host and instance index resume the same broker session after a restart."""
    host = socket.gethostname().split(".")[0] or "host"
    return f"wd-ingest-{host}-{index}"[:64]


@dataclass(slots=True)
class Incoming:
    """One received message, waiting to be written and acknowledged."""

    mid: int
    qos: int
    topic: str
    payload: bytes
    received_ms: int
    generation: int


class MqttIntake:
    """Receives from the shared subscription into an inbox; acknowledges on request, on the right connection.

    ``on_ready(full)`` is called from paho's thread when the inbox goes from empty to one message (``full`` False)
    and when it first becomes :meth:`full` (``full`` True): it holds ``wake_at`` messages, or one message of at
    least ``wake_bytes`` (a gateway batch that amortizes a flush by itself; 0: no such bound). The crew uses it to
    wake its flusher without a call per message.
    """

    def __init__(
        self,
        endpoint: MqttEndpoint,
        client_id: str,
        *,
        share_group: str = SHARE_GROUP,
        topics: tuple[str, ...] = TOPICS,
        session_expiry_s: int = 86_400,
        receive_maximum: int = 1000,
        keepalive_s: int = 30,
        wake_at: int = 500,
        wake_bytes: int = 0,
        on_ready: Callable[[bool], None] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.client_id = client_id
        self.subscriptions = [(f"$share/{share_group}/{t}", 1) for t in topics]
        self.session_expiry_s = session_expiry_s
        self.receive_maximum = receive_maximum
        self.keepalive_s = keepalive_s
        self.wake_at = wake_at
        self.wake_bytes = wake_bytes
        self.on_ready = on_ready
        self._lock = threading.Lock()  # inbox, big, signalled, generation, connected, accepting
        self._inbox: list[Incoming] = []
        self._big = False  # the inbox holds a message of at least wake_bytes
        self._signalled = False  # on_ready(True) was called since the last take()
        self._generation = 0
        self._connected = False
        self._accepting = True
        self.connected_event = threading.Event()
        self.subscribed_event = threading.Event()
        self.redelivered = 0
        self._client = self._make_client()

    # --- lifecycle ---------------------------------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        if self.endpoint.username:
            password = self.endpoint.password.get_secret_value() if self.endpoint.password else None
            client.username_pw_set(self.endpoint.username, password)
        if self.endpoint.tls:
            client.tls_set_context(ssl.create_default_context())
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._jitter_reconnect(client)
        return client

    @staticmethod
    def _jitter_reconnect(client: mqtt.Client) -> None:
        # paho doubles the delay from min_delay up to max_delay after each failed attempt; a random start per
        # outage spreads the reconnects of many ingest processes after a broker restart.
        client.reconnect_delay_set(min_delay=random.uniform(0.2, 1.0), max_delay=5)  # type: ignore[arg-type]

    def start(self) -> None:
        """Connect in the background (retrying with backoff until it works) and start paho's network thread."""
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.session_expiry_s
        props.ReceiveMaximum = self.receive_maximum
        self._client.connect_async(
            self.endpoint.host,
            self.endpoint.port,
            keepalive=self.keepalive_s,
            clean_start=False,  # resume the session: unacknowledged and queued messages wait for us
            properties=props,
        )
        self._client.loop_start()

    def stop_accepting(self) -> None:
        """Ignore messages from now on: they stay unacknowledged, and the broker redelivers them next session."""
        with self._lock:
            self._accepting = False

    def close(self, timeout_s: float = 2.0) -> None:
        """Let queued PUBACKs go out, then disconnect (the session and its subscription stay) and stop the thread."""
        deadline = time.monotonic() + timeout_s
        client = self._client
        while client.want_write() and time.monotonic() < deadline:
            time.sleep(0.005)
        client.disconnect()
        client.loop_stop()
        with self._lock:
            self._connected = False
            self._generation += 1
        metrics.MQTT_CONNECTED.set(0)

    # --- the crew's side ---------------------------------------------------------------------------------------

    def held(self) -> int:
        """Messages in the inbox."""
        return len(self._inbox)

    def full(self) -> bool:
        """Whether the inbox holds ``wake_at`` messages or one of ``wake_bytes``: worth a flush now."""
        return self._big or len(self._inbox) >= self.wake_at

    def take(self, limit: int) -> list[Incoming]:
        """Up to ``limit`` messages, oldest first."""
        with self._lock:
            batch = self._inbox[:limit]
            del self._inbox[:limit]
            if self._big:
                big = self.wake_bytes
                self._big = any(len(m.payload) >= big for m in self._inbox)
            self._signalled = False
        return batch

    def ack(self, messages: list[Incoming]) -> tuple[int, int]:
        """PUBACK every message delivered on the current connection; returns ``(acked, skipped)``.

        Skipped messages came on a connection that is gone: the broker redelivers them.
        """
        acked = skipped = 0
        client = self._client
        # Hold the lock so a disconnect cannot slip between the generation check and the PUBACK being queued.
        with self._lock:
            generation = self._generation if self._connected else -1
            for m in messages:
                if m.qos == 0:
                    continue
                if m.generation == generation:
                    client.ack(m.mid, m.qos)
                    acked += 1
                else:
                    skipped += 1
        return acked, skipped

    @property
    def connected(self) -> bool:
        return self._connected

    # --- paho callbacks (network thread) -----------------------------------------------------------------------

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags, reason: Any, props: Any
    ) -> None:
        if reason.is_failure:
            logger.warning("broker refused the connection: %s", reason)
            return
        with self._lock:
            self._generation += 1
            self._connected = True
        metrics.MQTT_CONNECTED.set(1)
        logger.info(
            "connected to mqtt %s:%d as %s (session %s)",
            self.endpoint.host,
            self.endpoint.port,
            self.client_id,
            "resumed" if flags.session_present else "new",
        )
        self.connected_event.set()
        # Subscribing again on a resumed session is harmless and repairs a session that lost its subscriptions.
        client.subscribe(self.subscriptions)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        failed = [r for r in reasons if r.is_failure]
        if failed:
            logger.error("subscription refused by the broker: %s", failed)
        else:
            self.subscribed_event.set()

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: mqtt.DisconnectFlags, reason: Any, props: Any
    ) -> None:
        with self._lock:
            was_connected = self._connected
            self._connected = False
            self._generation += 1
        metrics.MQTT_CONNECTED.set(0)
        self.connected_event.clear()
        if was_connected and self._accepting:
            logger.warning("disconnected from mqtt (%s): reconnecting", reason)
        self._jitter_reconnect(client)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        logger.warning("cannot connect to mqtt %s:%d: retrying", self.endpoint.host, self.endpoint.port)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        received_ms = int(time.time() * 1000)
        try:
            topic = message.topic
        except UnicodeDecodeError:  # brokers refuse such topics; never crash the network thread on one
            topic = repr(message._topic)
        if message.dup:
            self.redelivered += 1
        with self._lock:
            if not self._accepting:
                return
            payload = bytes(message.payload)
            self._inbox.append(
                Incoming(message.mid, message.qos, topic, payload, received_ms, self._generation)
            )
            if 0 < self.wake_bytes <= len(payload):
                self._big = True
            first = len(self._inbox) == 1
            full = not self._signalled and self.full()
            if full:
                self._signalled = True
        if self.on_ready is not None and (first or full):
            self.on_ready(full)
