"""MQTT helpers for ingest tests and benchmarks: a paho publisher that waits for every PUBACK, a raw-socket
publisher fast enough not to be the bottleneck, and a reader of what ingest stored."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import redis
from paho.mqtt.enums import CallbackAPIVersion

from handoff import keys
from handoff.settings import MqttEndpoint


def publish(
    url: str, messages: Iterable[tuple[str, bytes]], *, client_id: str = "test-pub", timeout: float = 60.0
) -> int:
    """Publish with QoS 1 and wait until the broker acknowledged every message; returns the count."""
    ep = MqttEndpoint.parse(url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(ep.host, ep.port)
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
        deadline = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            if not info.is_published():
                raise TimeoutError("broker did not acknowledge every message")
        return len(infos)
    finally:
        client.disconnect()
        client.loop_stop()


def stored_readings(url: str) -> list[dict[str, Any]]:
    """Every normalized reading in wd:readings:v1, in stream order."""
    r = redis.Redis.from_url(url)
    try:
        out: list[dict[str, Any]] = []
        last = "-"
        while True:
            rows = r.xrange(keys.READINGS, min=last, count=5000)
            if last != "-":
                rows = rows[1:]
            if not rows:
                return out
            for _, fields in rows:
                out += orjson.loads(fields[keys.PAYLOAD_FIELD.encode()])["readings"]
            last = rows[-1][0].decode()
    finally:
        r.close()


def quarantined(url: str) -> list[dict[str, Any]]:
    r = redis.Redis.from_url(url)
    try:
        return [orjson.loads(f[keys.PAYLOAD_FIELD.encode()]) for _, f in r.xrange(keys.QUARANTINE)]
    finally:
        r.close()


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


# --- raw-socket MQTT 5 QoS 1 publisher ------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(s: bytes) -> bytes:
    return struct.pack("!H", len(s)) + s


def publish_packet(topic: str, payload: bytes, packet_id: int) -> bytes:
    """An MQTT 5 PUBLISH, QoS 1, no properties."""
    body = _utf8(topic.encode()) + struct.pack("!H", packet_id) + b"\x00" + payload
    return b"\x32" + _varint(len(body)) + body


class FastPublisher:
    """Sends pre-encoded QoS 1 PUBLISH packets in chunks, keeping at most the broker's Receive Maximum in flight.

    paho publishes about 5k QoS 1 messages/s on this machine, less than one subscriber receives: a benchmark with
    it would measure the publisher. This one costs a few microseconds per message.
    """

    def __init__(self, url: str, client_id: str = "fast-pub") -> None:
        ep = MqttEndpoint.parse(url)
        self.sock = socket.create_connection((ep.host, ep.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        var = _utf8(b"MQTT") + b"\x05\x02" + struct.pack("!H", 60) + b"\x00"  # v5, clean start, keepalive 60
        body = var + _utf8(client_id.encode())
        self.sock.sendall(b"\x10" + _varint(len(body)) + body)
        self.receive_maximum = self._read_connack()
        self.acked = 0
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("broker closed the connection")
            buf += chunk
        return buf

    def _read_connack(self) -> int:
        head = self._recv_exact(1)[0]
        mult, n = 1, 0
        while True:
            b = self._recv_exact(1)[0]
            n += (b & 0x7F) * mult
            mult *= 128
            if not b & 0x80:
                break
        body = self._recv_exact(n)
        if head != 0x20 or body[1] != 0:
            raise ConnectionError(f"connection refused: {body!r}")
        i, mult, plen = 2, 1, 0
        while True:
            b = body[i]
            plen += (b & 0x7F) * mult
            mult *= 128
            i += 1
            if not b & 0x80:
                break
        props, j = body[i : i + plen], 0
        sizes = {0x24: 1, 0x25: 1, 0x28: 1, 0x29: 1, 0x2A: 1, 0x13: 2, 0x22: 2, 0x23: 2, 0x11: 4, 0x27: 4}
        while j < len(props):
            pid = props[j]
            j += 1
            if pid == 0x21:
                return int(struct.unpack("!H", props[j : j + 2])[0])
            if pid in sizes:
                j += sizes[pid]
            elif pid in (0x12, 0x1A, 0x1C, 0x1F, 0x15, 0x16):
                j += 2 + struct.unpack("!H", props[j : j + 2])[0]
            else:
                break
        return 65_535

    def _read(self) -> None:
        buf = b""
        try:
            while True:
                data = self.sock.recv(65_536)
                if not data:
                    return
                buf += data
                count, i, size = 0, 0, len(buf)
                while i + 2 <= size:
                    mult, n, k = 1, 0, i + 1
                    complete = False
                    while k < size:
                        b = buf[k]
                        n += (b & 0x7F) * mult
                        mult *= 128
                        k += 1
                        if not b & 0x80:
                            complete = True
                            break
                    if not complete or k + n > size:
                        break
                    if buf[i] & 0xF0 == 0x40:
                        count += 1
                    i = k + n
                buf = buf[i:]
                if count:
                    with self._cond:
                        self.acked += count
                        self._cond.notify_all()
        except OSError:
            return

    def publish_all(self, packets: Sequence[bytes], chunk: int = 200, timeout: float = 120.0) -> None:
        """Send every packet and wait for every PUBACK."""
        window = self.receive_maximum
        base = self.acked
        sent, total = 0, len(packets)
        deadline = time.monotonic() + timeout
        while sent < total:
            with self._cond:
                while sent - (self.acked - base) >= window:
                    if not self._cond.wait(max(0.0, deadline - time.monotonic())):
                        raise TimeoutError("broker stopped acknowledging")
                room = min(window - (sent - (self.acked - base)), chunk, total - sent)
            self.sock.sendall(b"".join(packets[sent : sent + room]))
            sent += room
        with self._cond:
            while self.acked - base < total:
                if not self._cond.wait(max(0.0, deadline - time.monotonic())):
                    raise TimeoutError("broker stopped acknowledging")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT
        self.sock.close()


def packets_for(messages: Sequence[tuple[str, bytes]]) -> list[bytes]:
    """Pre-encode messages; packet ids cycle through 1..65535."""
    return [publish_packet(t, p, (i % 65_535) + 1) for i, (t, p) in enumerate(messages)]
