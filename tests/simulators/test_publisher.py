"""The publisher against a real Mosquitto: every reading arrives, singly and batched, and survives a broker restart."""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import datetime

import pytest

from handoff.models import SensorReading
from handoff.settings import MqttEndpoint
from simulators.fleet import Fleet, LabelledReading
from simulators.publisher import Publisher, PublishError
from tests.simulators.conftest import CuttableProxy, Subscriber
from waterdoctor.embedded import MosquittoBroker, free_port


def _fleet(**kw: object) -> Fleet:
    params: dict[str, object] = {"sites": 3, "sensors_per_site": 8, "anomaly_rate": 0.02, "seed": 4}
    params.update(kw)
    return Fleet.for_rate(2000.0, start_ms=time.time_ns() // 1_000_000 - 120_000, **params)  # type: ignore[arg-type]


def _keys(readings: list[SensorReading]) -> Counter[tuple[str, str, int]]:
    return Counter((r.site, r.sensor_id, r.seq) for r in readings)


@pytest.mark.parametrize("batch", [1, 50])
def test_every_reading_arrives(mosquitto: MosquittoBroker, subscriber: Subscriber, batch: int) -> None:
    fleet = _fleet()
    readings = fleet.simulate(15)  # two minutes ago: ts stays within the contract window
    assert any(r.repeat for r in readings)  # repeats are sent twice, as a device would
    with Publisher(MqttEndpoint.parse(mosquitto.url), batch=batch, max_inflight=200) as pub:
        pub.publish(readings)
        pub.flush()
        assert pub.drain(20)
        stats = pub.stats()
    assert stats.readings_sent == len(readings) == stats.readings_acked
    assert stats.messages_unacked == 0 and stats.messages_rejected == 0
    if batch == 1:
        assert stats.messages_sent == len(readings)
    else:
        assert len(readings) / batch <= stats.messages_sent < len(readings) / 10

    subscriber.wait_for(stats.messages_sent)
    got = subscriber.readings()
    sent = Counter(r.key for r in readings)
    assert _keys(got) == sent  # every send arrived exactly once (QoS 1 on a healthy broker)
    by_key = {r.key: r for r in readings}
    for r in got[:500]:
        want = by_key[(r.site, r.sensor_id, r.seq)]
        assert r.metrics == want.metrics
        assert datetime.fromisoformat(str(r.ts)).timestamp() * 1000 == pytest.approx(want.ts_ms)

    log = pub.log
    assert log.sent_keys() == set(sent) == log.acked_keys()
    assert not log.unacked_keys()
    assert log.labels() == {r.key: r.label for r in readings if r.label is not None}
    assert sum(log.anomalies_by_class().values()) == sum(fleet.injected.values()) > 0
    assert all(e.publish_ms > 0 for e in log.entries())


def test_run_paces_on_the_wall_clock(mosquitto: MosquittoBroker, subscriber: Subscriber) -> None:
    now = time.time_ns() // 1_000_000
    fleet = Fleet.for_rate(400.0, sites=2, sensors_per_site=10, anomaly_rate=0.05, seed=1, start_ms=now)
    with Publisher(MqttEndpoint.parse(mosquitto.url), batch=20) as pub:
        stats = pub.run(fleet, duration_s=1.5)
        assert pub.drain(10)
    assert stats.offered_rate == pytest.approx(400.0)
    assert 0 < pub.log.readings_sent <= 400 * 1.6 + 50
    entries = {(e.site, e.sensor_id, e.seq): e for e in pub.log.entries()}
    subscriber.wait_for(pub.log.messages_sent)
    got = subscriber.readings()
    assert set(_keys(got)) == set(entries)
    for r in got:
        ts_ms = datetime.fromisoformat(str(r.ts)).timestamp() * 1000
        # A reading is never sent before it was taken; its ts is within the contract window of the publish time.
        sent_at = entries[(r.site, r.sensor_id, r.seq)].publish_ms
        assert ts_ms <= sent_at + 1
        assert sent_at - ts_ms < 7 * 86_400_000


def test_run_refuses_a_fleet_far_from_now(mosquitto: MosquittoBroker) -> None:
    with Publisher(MqttEndpoint.parse(mosquitto.url)) as pub, pytest.raises(ValueError, match="start_ms=now"):
        pub.run(Fleet(), 1.0)


def test_stop_event_ends_run(mosquitto: MosquittoBroker) -> None:
    fleet = Fleet.for_rate(200.0, start_ms=time.time_ns() // 1_000_000)
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    with Publisher(MqttEndpoint.parse(mosquitto.url)) as pub:
        t = time.monotonic()
        pub.run(fleet, duration_s=None, stop=stop)
        assert time.monotonic() - t < 5
        assert pub.log.readings_sent > 0


def test_connection_cut_loses_nothing(mosquitto: MosquittoBroker, subscriber: Subscriber) -> None:
    """The link between publisher and broker drops mid-stream: paho reconnects and re-sends what was unacked."""
    fleet = _fleet(quirk_rate=0.0)
    readings = fleet.simulate(8)
    first, rest = readings[:2000], readings[2000:]
    with (
        CuttableProxy(mosquitto.port) as proxy,
        Publisher(MqttEndpoint.parse(proxy.url), batch=1, reconnect_delay_s=(1, 1)) as pub,
    ):
        pub.publish(first)
        # Cut while messages are in flight: some were sent but their PUBACK is lost with the connection.
        sender = threading.Thread(target=pub.publish, args=(rest,))
        sender.start()
        time.sleep(0.05)
        proxy.cut()
        time.sleep(0.5)
        proxy.restore()
        sender.join(30)
        assert pub.drain(30)
        stats = pub.stats()
    assert stats.disconnects >= 1
    assert stats.readings_acked == len(readings) and stats.messages_unacked == 0
    # QoS 1: at least once. Re-sent ones may come twice, so wait for distinct readings, not a count that the
    # duplicates could reach before the last readings arrive.
    got = _keys(subscriber.wait_distinct(len(readings)))
    assert set(got) == {r.key for r in readings}


def test_broker_restart_publisher_resends(mosquitto: MosquittoBroker) -> None:
    """A broker restart: what paho held while the broker was away is sent and acknowledged after the reconnect."""
    readings = _fleet(quirk_rate=0.0).simulate(4)
    first, rest = readings[:1000], readings[1000:]
    with Publisher(MqttEndpoint.parse(mosquitto.url), batch=1, reconnect_delay_s=(1, 1)) as pub:
        pub.publish(first)
        assert pub.drain(10)
        mosquitto.stop()
        sender = threading.Thread(target=pub.publish, args=(rest,))
        sender.start()
        time.sleep(0.5)
        assert not pub.connected
        mosquitto.start()
        sender.join(30)
        assert pub.drain(30)
        stats = pub.stats()
    assert stats.disconnects >= 1
    assert stats.readings_acked == len(readings) and stats.messages_unacked == 0


def test_unreachable_broker_is_a_clear_error() -> None:
    with pytest.raises(PublishError, match="cannot reach"):
        Publisher(MqttEndpoint.parse(f"mqtt://127.0.0.1:{free_port()}")).start()


def test_labels_never_published(mosquitto: MosquittoBroker, subscriber: Subscriber) -> None:
    readings: list[LabelledReading] = [r for r in _fleet(anomaly_rate=0.3).simulate(5) if r.label][:50]
    with Publisher(MqttEndpoint.parse(mosquitto.url)) as pub:
        pub.publish(readings)
        assert pub.drain(10)
    subscriber.wait_for(len(readings))
    with subscriber.lock:
        payloads = [p for _, p in subscriber.messages]
    assert len(payloads) == len(readings)
    assert not any(b"label" in p or b"spike" in p or b"emit" in p for p in payloads)
