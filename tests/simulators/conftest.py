"""Shared helpers for the simulator tests: a validating QoS 1 subscriber on a private Mosquitto."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Self

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from handoff.models import GatewayBatch, SensorReading
from waterdoctor.embedded import MosquittoBroker


class Subscriber:
    """A QoS 1 subscriber on ``wd/#`` that validates and keeps every message (persistent session)."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self.lock = threading.Lock()
        self.messages: list[tuple[str, bytes]] = []
        self.ready = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="test-sub", protocol=MQTTProtocolVersion.MQTTv5
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 2)
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 600
        self.client.connect(broker.host, broker.port, clean_start=False, properties=props)
        self.client.loop_start()
        assert self.ready.wait(10)

    def _on_connect(self, client: mqtt.Client, *_: object) -> None:
        client.subscribe("wd/#", qos=1)
        self.ready.set()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def readings(self) -> list[SensorReading]:
        out: list[SensorReading] = []
        with self.lock:
            messages = list(self.messages)
        for topic, payload in messages:
            parts = topic.split("/")
            if parts[3] == "telemetry":
                r = SensorReading.model_validate_json(payload)
                assert (parts[1], parts[2]) == (r.site, r.sensor_id)
                out.append(r)
            else:
                assert parts[3] == "batch"
                batch = GatewayBatch.model_validate_json(payload)
                assert batch.gateway_id == parts[2]
                assert all(r.site == parts[1] for r in batch.readings)
                out.extend(batch.readings)
        return out

    def wait_for(self, n: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.messages) >= n:
                    return
            time.sleep(0.02)

    def wait_readings(self, n: int, timeout: float = 20.0) -> list[SensorReading]:
        """Wait until ``n`` readings arrived (or the timeout), then return them all."""
        deadline = time.monotonic() + timeout
        got = self.readings()
        while len(got) < n and time.monotonic() < deadline:
            time.sleep(0.05)
            got = self.readings()
        return got

    def wait_distinct(self, n: int, timeout: float = 20.0) -> list[SensorReading]:
        """Wait until ``n`` distinct readings arrived (QoS 1 re-sends may repeat some), then return them all."""
        deadline = time.monotonic() + timeout
        got = self.readings()
        while len({(r.site, r.sensor_id, r.seq) for r in got}) < n and time.monotonic() < deadline:
            time.sleep(0.05)
            got = self.readings()
        return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class CuttableProxy:
    """A TCP proxy to a local port whose connections can be cut (and new ones refused) to fake a network failure."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._open = True
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            if not self._open:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Drop every connection now and refuse new ones until :meth:`restore`."""
        self._open = False
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def restore(self) -> None:
        self._open = True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cut()
        self._listener.close()


@pytest.fixture
def subscriber(mosquitto: MosquittoBroker) -> Iterator[Subscriber]:
    sub = Subscriber(mosquitto)
    yield sub
    sub.close()
