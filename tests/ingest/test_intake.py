"""The MQTT inbox's wake-up signals, fed paho message objects directly (no broker: the signals are local logic)."""

from __future__ import annotations

from paho.mqtt.client import MQTTMessage

from handoff.settings import MqttEndpoint
from ingest.mqtt import MqttIntake


def _message(mid: int, size: int) -> MQTTMessage:
    m = MQTTMessage(mid=mid, topic=b"wd/p1/s1/telemetry")
    m.payload = b"x" * size
    m.qos = 1
    return m


def test_the_flusher_is_woken_on_the_first_message_and_once_when_full() -> None:
    calls: list[bool] = []
    intake = MqttIntake(
        MqttEndpoint.parse("mqtt://127.0.0.1:1"), "t", wake_at=3, wake_bytes=1000, on_ready=calls.append
    )
    for mid in (1, 2):
        intake._on_message(intake._client, None, _message(mid, 100))
    assert calls == [False] and not intake.full()  # small messages: only the first one wakes it
    intake._on_message(intake._client, None, _message(3, 100))
    assert calls == [False, True] and intake.full()  # wake_at messages
    intake._on_message(intake._client, None, _message(4, 100))
    assert calls == [False, True]  # full already signalled
    assert [m.mid for m in intake.take(10)] == [1, 2, 3, 4]
    assert not intake.full()

    intake._on_message(intake._client, None, _message(5, 100))
    intake._on_message(intake._client, None, _message(6, 1000))  # a gateway batch: full by itself
    assert calls == [False, True, False, True] and intake.full()
    intake._on_message(intake._client, None, _message(7, 100))
    assert [m.mid for m in intake.take(1)] == [5]
    assert intake.full()  # the large message is still held
    assert [m.mid for m in intake.take(1)] == [6]
    assert not intake.full()  # only a small one is left


def test_no_byte_bound_when_wake_bytes_is_zero() -> None:
    calls: list[bool] = []
    intake = MqttIntake(
        MqttEndpoint.parse("mqtt://127.0.0.1:1"), "t", wake_at=3, wake_bytes=0, on_ready=calls.append
    )
    intake._on_message(intake._client, None, _message(1, 100_000))
    assert calls == [False] and not intake.full()
