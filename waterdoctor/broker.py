"""A small asyncio MQTT broker (MQTT 5.0 and 3.1.1, QoS 0 and 1): the fallback of ``waterdoctor up`` without mosquitto.

Run it as ``python -m waterdoctor.broker --host 127.0.0.1 --port 1883 [--data-dir DIR]``; SIGTERM or SIGINT stop it
(exit code 0). It is meant for one machine and a few thousand messages per second, not for production.

Supported (what ingest and the simulators rely on):

* MQTT 5.0 and 3.1.1 clients; anonymous access (user names and passwords are accepted and ignored); no TLS.
* QoS 0 and 1 in both directions. CONNACK announces ``Maximum QoS`` 1: a QoS 2 PUBLISH from an MQTT 5 client gets
  DISCONNECT 0x9B (QoS not supported); one from a 3.1.1 client is received exactly once (PUBREC/PUBREL/PUBCOMP) and
  delivered at QoS 1 at most. SUBSCRIBE grants ``min(requested, 1)``.
* Wildcards ``+`` and ``#`` (``$``-topics are not matched by a leading wildcard) and shared subscriptions
  ``$share/<group>/<filter>``: each message goes to one member of the group, round robin, preferring connected
  members with room under their Receive Maximum, then connected ones, then a disconnected member's session. A
  member's unacknowledged and queued messages wait for it to reconnect; when its session ends (disconnect with
  Session Expiry 0, expiry, clean start) they go to another member of the group, or, with no member left, are
  discarded with a warning in the log.
* Sessions: clean start / clean session, MQTT 5 Session Expiry Interval (also updated by DISCONNECT), 3.1.1
  ``clean_session=0`` sessions never expire while the broker runs, ``session present``, QoS 1 messages queued for
  offline sessions (QoS 0 ones are dropped, as mosquitto does by default), unacknowledged messages resent with DUP
  and their packet ids on reconnect, session takeover (the older connection is closed).
* Receive Maximum: never more than the client's Receive Maximum unacknowledged QoS 1 messages (1000 for 3.1.1
  clients); the rest wait in the session queue, so a client that holds its PUBACKs holds the flow.
* MQTT 5 extras: assigned client ids, subscription identifiers, no local, retain as published, retain handling,
  message expiry, the client's Maximum Packet Size, forwarded user properties / content type / response topic /
  correlation data. Topic aliases are not supported (``Topic Alias Maximum`` 0); neither is enhanced authentication.
* Retained messages, and Will messages (with MQTT 5 Will Delay Interval).
* Keep alive (1.5 times the client's value), a 1 MiB maximum packet size, malformed packets closing only the
  connection that sent them (logged as a warning).
* Slow subscribers: past 2 MiB of unsent bytes to one connection, its QoS 1 messages wait in its session queue
  and its QoS 0 messages are dropped (counted in a warning) until it has read down to 512 KiB.

Persistence: with ``--data-dir``, a clean stop (SIGTERM/SIGINT) saves every persistent session (subscriptions,
queued and unacknowledged messages) and the retained messages to ``<data-dir>/broker-state.json``, and the next
start loads them, then deletes the file, so queued messages survive a restart as with mosquitto. There is no
periodic save: a crash (SIGKILL, power loss) loses everything held in memory, i.e. every message queued for an
offline or slow subscriber (never replays an older state). Pending Will messages are not saved. A state file that
cannot be read is moved to ``broker-state.bad`` and the broker starts empty, with a warning.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import logging
import math
import os
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

logger = logging.getLogger(__name__)

__all__ = ["Broker", "serve"]

MAX_PACKET_SIZE: Final = 1024 * 1024
V3_RECEIVE_MAXIMUM: Final = 1000  # a 3.1.1 client cannot say how many unacknowledged messages it takes
MAX_QUEUED: Final = 2_000_000  # per session, as in our mosquitto.conf
CONNECT_TIMEOUT_S: Final = 10.0
PROTOCOL_MAX_PACKET: Final = 1 + 4 + 268_435_455  # a client without Maximum Packet Size takes any packet
# Per connection: above WRITE_HIGH bytes unsent (a subscriber that reads slower than it is sent to) the broker stops
# writing to it: QoS 1 messages wait in its session queue, QoS 0 ones are dropped; it resumes below WRITE_LOW.
WRITE_HIGH: Final = 2 * 1024 * 1024
WRITE_LOW: Final = 512 * 1024
NEVER: Final = 0xFFFFFFFF
STATE_FILE: Final = "broker-state.json"

# Packet types (upper nibble of the first byte).
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = 8, 9, 10, 11, 12, 13, 14, 15

# MQTT 5 reason codes used here.
RC_MALFORMED: Final = 0x81
RC_PROTOCOL_ERROR: Final = 0x82
RC_UNSUPPORTED_VERSION: Final = 0x84
RC_BAD_AUTH_METHOD: Final = 0x8C
RC_SERVER_SHUTTING_DOWN: Final = 0x8B
RC_KEEP_ALIVE_TIMEOUT: Final = 0x8D
RC_SESSION_TAKEN_OVER: Final = 0x8E
RC_TOPIC_FILTER_INVALID: Final = 0x8F
RC_TOPIC_NAME_INVALID: Final = 0x90
RC_PACKET_TOO_LARGE: Final = 0x95
RC_TOPIC_ALIAS_INVALID: Final = 0x94
RC_QOS_NOT_SUPPORTED: Final = 0x9B

# MQTT 5 property ids and their wire types.
_BYTE, _U16, _U32, _VARINT, _STR, _BIN, _PAIR = range(7)
_PROP_TYPES: Final = {
    0x01: _BYTE, 0x02: _U32, 0x03: _STR, 0x08: _STR, 0x09: _BIN, 0x0B: _VARINT, 0x11: _U32, 0x12: _STR,
    0x13: _U16, 0x15: _STR, 0x16: _BIN, 0x17: _BYTE, 0x18: _U32, 0x19: _BYTE, 0x1A: _STR, 0x1C: _STR,
    0x1F: _STR, 0x21: _U16, 0x22: _U16, 0x23: _U16, 0x24: _BYTE, 0x25: _BYTE, 0x26: _PAIR, 0x27: _U32,
    0x28: _BYTE, 0x29: _BYTE, 0x2A: _BYTE,
}  # fmt: skip
# PUBLISH properties passed on unchanged to subscribers: payload format, content type, response topic,
# correlation data, user properties. Message expiry is rewritten; topic alias and subscription ids are per hop.
_FORWARDED: Final = frozenset({0x01, 0x03, 0x08, 0x09, 0x26})
P_MESSAGE_EXPIRY, P_SUB_ID, P_SESSION_EXPIRY, P_AUTH_METHOD = 0x02, 0x0B, 0x11, 0x15
P_WILL_DELAY, P_RECEIVE_MAXIMUM, P_TOPIC_ALIAS, P_USER, P_MAX_PACKET = 0x18, 0x21, 0x23, 0x26, 0x27


class MqttError(Exception):
    """A packet broke the protocol: the connection that sent it is closed (with ``reason`` for MQTT 5)."""

    def __init__(self, message: str, reason: int = RC_PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.reason = reason


class Malformed(MqttError):
    def __init__(self, message: str) -> None:
        super().__init__(message, RC_MALFORMED)


# --- wire encoding ----------------------------------------------------------------------------------------------


def varint(n: int) -> bytes:
    if n < 128:
        return bytes((n,))
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def utf8(s: str) -> bytes:
    b = s.encode()
    return len(b).to_bytes(2, "big") + b


def packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + varint(len(body)) + body


class Reader:
    """Reads the fields of one packet body; anything short or invalid raises :class:`Malformed`."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise Malformed("packet shorter than its fields")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def varint(self) -> int:
        value = 0
        for shift in (0, 7, 14, 21):
            b = self.u8()
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
        raise Malformed("variable byte integer longer than 4 bytes")

    def binary(self) -> bytes:
        return self.take(self.u16())

    def string(self) -> str:
        raw = self.binary()
        try:
            s = raw.decode()
        except UnicodeDecodeError as exc:
            raise Malformed("invalid UTF-8 string") from exc
        if "\x00" in s:
            raise Malformed("U+0000 in a string")
        return s

    def properties(self) -> tuple[dict[int, Any], bytes]:
        """MQTT 5 properties: ``({id: value}, forwarded raw bytes)``; user properties are a list of pairs."""
        end = self.varint() + self.pos
        if end > len(self.data):
            raise Malformed("properties longer than the packet")
        props: dict[int, Any] = {}
        forwarded = bytearray()
        while self.pos < end:
            start = self.pos
            pid = self.varint()
            kind = _PROP_TYPES.get(pid)
            value: Any
            if kind is None:
                raise Malformed(f"unknown property 0x{pid:02x}")
            if kind == _BYTE:
                value = self.u8()
            elif kind == _U16:
                value = self.u16()
            elif kind == _U32:
                value = self.u32()
            elif kind == _VARINT:
                value = self.varint()
            elif kind == _STR:
                value = self.string()
            elif kind == _BIN:
                value = self.binary()
            else:
                value = (self.string(), self.string())
            if pid == P_USER:
                props.setdefault(pid, []).append(value)
            elif pid in props:
                raise MqttError(f"property 0x{pid:02x} given twice")
            else:
                props[pid] = value
            if pid in _FORWARDED:
                forwarded += self.data[start : self.pos]
        if self.pos != end:
            raise Malformed("property overruns the property length")
        return props, bytes(forwarded)


# --- topics ---------------------------------------------------------------------------------------------------


def valid_topic_name(topic: str) -> bool:
    return bool(topic) and "+" not in topic and "#" not in topic and len(topic.encode()) <= 65535


def valid_filter(f: str) -> bool:
    if not f:
        return False
    levels = f.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def split_shared(f: str) -> tuple[str | None, str] | None:
    """``(group, filter)`` of a subscription; None when it is not a valid filter."""
    if f.startswith("$share/"):
        parts = f.split("/", 2)
        if len(parts) < 3 or not parts[1] or "+" in parts[1] or "#" in parts[1] or not valid_filter(parts[2]):
            return None
        return parts[1], parts[2]
    return (None, f) if valid_filter(f) else None


def topic_matches(levels: list[str], topic_levels: list[str], dollar: bool) -> bool:
    if dollar and levels[0] in ("+", "#"):
        return False
    n = len(topic_levels)
    for i, level in enumerate(levels):
        if level == "#":
            return True
        if i >= n or (level != "+" and level != topic_levels[i]):
            return False
    return len(levels) == n


# --- data -----------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    props: bytes = b""  # forwarded MQTT 5 properties, encoded
    expires_at: float | None = None  # wall clock, from the Message Expiry Interval
    topic_b: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.topic_b = utf8(self.topic)

    def to_json(self) -> dict[str, Any]:
        return {
            "t": self.topic,
            "p": base64.b64encode(self.payload).decode(),
            "q": self.qos,
            "r": self.retain,
            "x": base64.b64encode(self.props).decode(),
            "e": self.expires_at,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Message:
        return cls(d["t"], base64.b64decode(d["p"]), d["q"], d["r"], base64.b64decode(d["x"]), d["e"])


@dataclass(slots=True)
class Delivery:
    """One message on its way to one session, at the QoS and with the flags of the matching subscription(s)."""

    msg: Message
    qos: int
    retain: bool
    sub_ids: tuple[int, ...] = ()
    share: tuple[str, str] | None = None  # (filter, group) of the shared subscription that chose this session

    def to_json(self) -> dict[str, Any]:
        return {
            "m": self.msg.to_json(),
            "q": self.qos,
            "r": self.retain,
            "s": list(self.sub_ids),
            "g": self.share,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Delivery:
        g = d.get("g")
        return cls(Message.from_json(d["m"]), d["q"], d["r"], tuple(d["s"]), (g[0], g[1]) if g else None)


@dataclass(slots=True)
class SubOptions:
    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0
    sub_id: int | None = None

    def to_json(self) -> list[Any]:
        return [self.qos, self.no_local, self.retain_as_published, self.retain_handling, self.sub_id]


@dataclass(slots=True)
class Will:
    msg: Message
    delay_s: int


class SharedGroup:
    __slots__ = ("members", "next", "order")

    def __init__(self) -> None:
        self.members: dict[str, SubOptions] = {}
        self.order: list[str] = []
        self.next = 0

    def pick(self, sessions: dict[str, Session]) -> str:
        """Round robin over members with room first, then connected ones, then any."""
        n = len(self.order)
        start = self.next
        fallback: str | None = None
        for k in range(n):
            i = (start + k) % n
            s = sessions[self.order[i]]
            if s.conn is not None:
                if s.has_room():
                    self.next = i + 1
                    return s.client_id
                if fallback is None:
                    fallback = s.client_id
        if fallback is None:
            fallback = self.order[start % n]
        self.next = self.order.index(fallback) + 1
        return fallback


class FilterEntry:
    """Everyone subscribed to one topic filter: plain subscribers and shared groups."""

    __slots__ = ("filter", "groups", "levels", "plain")

    def __init__(self, f: str) -> None:
        self.filter = f
        self.levels = f.split("/")
        self.plain: dict[str, SubOptions] = {}
        self.groups: dict[str, SharedGroup] = {}

    def empty(self) -> bool:
        return not self.plain and not self.groups


class Session:
    """State kept for a client id across connections."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.conn: Connection | None = None
        self.expiry_s = 0
        self.disconnected_at = time.time()
        self.subscriptions: dict[str, SubOptions] = {}
        self.queue: deque[Delivery] = deque()
        self.inflight: dict[int, Delivery] = {}  # packet id -> message not yet acknowledged, in send order
        self.sent_now: set[int] = set()  # packet ids sent on the current connection and not acknowledged
        self.resend: deque[int] = deque()  # in-flight packet ids to resend (DUP) on the current connection
        self.inbound_qos2: set[int] = set()  # 3.1.1 QoS 2 packet ids received, awaiting PUBREL
        self.receive_maximum = V3_RECEIVE_MAXIMUM
        self.next_pid = 1
        self.pending_will: asyncio.TimerHandle | None = None
        self.dropped = 0

    def has_room(self) -> bool:
        conn = self.conn
        return (
            conn is not None
            and not conn.paused
            and not self.queue
            and not self.resend
            and len(self.sent_now) < self.receive_maximum
        )

    def _alloc_pid(self) -> int:
        pid = self.next_pid
        while pid in self.inflight:
            pid = pid % 65535 + 1
        self.next_pid = pid % 65535 + 1
        return pid

    def deliver(self, d: Delivery) -> None:
        conn = self.conn
        if d.qos == 0:
            if conn is not None:
                if conn.paused:
                    conn.dropped_qos0 += 1
                    if conn.dropped_qos0 in (1, 1000) or conn.dropped_qos0 % 100_000 == 0:
                        logger.warning(
                            "%s does not read what it is sent: dropped %d QoS 0 messages",
                            self.client_id,
                            conn.dropped_qos0,
                        )
                else:
                    conn.send_publish(d, 0, False)
            return
        if conn is not None and self.has_room():
            if not conn.fits(d):
                return
            pid = self._alloc_pid()
            self.inflight[pid] = d
            self.sent_now.add(pid)
            conn.send_publish(d, pid, False)
            return
        if len(self.queue) >= MAX_QUEUED:
            self.dropped += 1
            if self.dropped in (1, 1000) or self.dropped % 100_000 == 0:
                logger.warning(
                    "session %s holds %d queued messages: dropped %d",
                    self.client_id,
                    MAX_QUEUED,
                    self.dropped,
                )
            return
        self.queue.append(d)

    def pump(self) -> None:
        """Send resends and queued messages while the client's Receive Maximum allows."""
        conn = self.conn
        if conn is None:
            return
        now = time.time()
        while len(self.sent_now) < self.receive_maximum and not conn.paused:
            if self.resend:
                pid = self.resend.popleft()
                d = self.inflight.get(pid)
                if d is not None:
                    self.sent_now.add(pid)
                    conn.send_publish(d, pid, True)
            elif self.queue:
                d = self.queue.popleft()
                if d.msg.expires_at is not None and d.msg.expires_at <= now:
                    continue
                if not conn.fits(d):
                    continue
                pid = self._alloc_pid()
                self.inflight[pid] = d
                self.sent_now.add(pid)
                conn.send_publish(d, pid, False)
            else:
                return

    def acked(self, pid: int) -> None:
        if self.inflight.pop(pid, None) is not None:
            self.sent_now.discard(pid)
            if self.queue or self.resend:
                self.pump()

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.client_id,
            "expiry": self.expiry_s,
            "disconnected_at": self.disconnected_at,
            "next_pid": self.next_pid,
            "subs": {f: o.to_json() for f, o in self.subscriptions.items()},
            "inflight": [[pid, d.to_json()] for pid, d in self.inflight.items()],
            "queue": [d.to_json() for d in self.queue],
            "qos2": sorted(self.inbound_qos2),
        }


# --- the broker -----------------------------------------------------------------------------------------------


class Broker:
    """Sessions, the subscription index and retained messages; connections call into it from the event loop."""

    def __init__(self, data_dir: Path | None = None) -> None:
        self.data_dir = data_dir
        self.sessions: dict[str, Session] = {}
        self.connections: set[Connection] = set()
        self.exact: dict[str, FilterEntry] = {}
        self.wild: dict[str, FilterEntry] = {}
        self.retained: dict[str, Message] = {}
        self.closing = False
        self._match_cache: dict[str, list[FilterEntry]] = {}
        self._ids = itertools.count(1)

    # subscriptions

    def subscribe(self, session: Session, key: str, opts: SubOptions) -> bool:
        """Adds or replaces a subscription; returns whether it existed."""
        parsed = split_shared(key)
        assert parsed is not None
        group, f = parsed
        existed = key in session.subscriptions
        session.subscriptions[key] = opts
        wildcard = "+" in f or "#" in f
        index = self.wild if wildcard else self.exact
        entry = index.get(f)
        if entry is None:
            entry = index[f] = FilterEntry(f)
            if wildcard:
                self._match_cache.clear()
        cid = session.client_id
        if group is None:
            entry.plain[cid] = opts
        else:
            g = entry.groups.get(group)
            if g is None:
                g = entry.groups[group] = SharedGroup()
            if cid not in g.members:
                g.order.append(cid)
            g.members[cid] = opts
        return existed

    def unsubscribe(self, session: Session, key: str) -> bool:
        if session.subscriptions.pop(key, None) is None:
            return False
        parsed = split_shared(key)
        assert parsed is not None
        group, f = parsed
        wildcard = "+" in f or "#" in f
        index = self.wild if wildcard else self.exact
        entry = index.get(f)
        if entry is None:
            return True
        cid = session.client_id
        if group is None:
            entry.plain.pop(cid, None)
        else:
            g = entry.groups.get(group)
            if g is not None and g.members.pop(cid, None) is not None:
                g.order.remove(cid)
                if not g.members:
                    del entry.groups[group]
        if entry.empty():
            del index[f]
            if wildcard:
                self._match_cache.clear()
        return True

    def _match(self, topic: str) -> list[FilterEntry]:
        hits = self._match_cache.get(topic)
        if hits is None:
            levels = topic.split("/")
            dollar = topic.startswith("$")
            hits = [e for e in self.wild.values() if topic_matches(e.levels, levels, dollar)]
            if len(self._match_cache) >= 50_000:
                self._match_cache.clear()
            self._match_cache[topic] = hits
        exact = self.exact.get(topic)
        return [*hits, exact] if exact is not None else hits

    # messages

    def publish(self, msg: Message, sender: str | None) -> None:
        if msg.retain:
            if msg.payload:
                self.retained[msg.topic] = msg
            else:
                self.retained.pop(msg.topic, None)
        entries = self._match(msg.topic)
        if not entries:
            return
        sessions = self.sessions
        targets: dict[str, Delivery] = {}
        for entry in entries:
            for cid, o in entry.plain.items():
                if o.no_local and cid == sender:
                    continue
                qos = msg.qos if msg.qos < o.qos else o.qos
                d = targets.get(cid)
                if d is None:
                    targets[cid] = Delivery(
                        msg, qos, msg.retain and o.retain_as_published, (o.sub_id,) if o.sub_id else ()
                    )
                else:  # overlapping subscriptions of one client: one copy, highest QoS, every identifier
                    d.qos = max(d.qos, qos)
                    d.retain = d.retain or (msg.retain and o.retain_as_published)
                    if o.sub_id:
                        d.sub_ids += (o.sub_id,)
            for name, g in entry.groups.items():
                self._deliver_shared(g, msg, (entry.filter, name))
        for cid, d in targets.items():
            sessions[cid].deliver(d)

    def _deliver_shared(self, g: SharedGroup, msg: Message, share: tuple[str, str]) -> None:
        cid = g.pick(self.sessions)
        o = g.members[cid]
        qos = msg.qos if msg.qos < o.qos else o.qos
        self.sessions[cid].deliver(Delivery(msg, qos, False, (o.sub_id,) if o.sub_id else (), share))

    def retained_for(self, f: str) -> list[Message]:
        levels = f.split("/")
        return [m for t, m in self.retained.items() if topic_matches(levels, t.split("/"), t.startswith("$"))]

    # sessions

    def assign_id(self) -> str:
        return f"wd-auto-{os.getpid()}-{next(self._ids)}"

    def drop_session(self, session: Session) -> None:
        """End a session. Its unacknowledged and queued QoS 1 messages that a shared subscription chose it for go
        to another member of that group (MQTT 5 4.8.2); the others are discarded, with a warning."""
        for key in list(session.subscriptions):
            self.unsubscribe(session, key)
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
        pending = [*session.inflight.values(), *session.queue]
        session.inflight.clear()
        session.queue.clear()
        lost = 0
        for d in pending:
            if d.share is not None:
                f, name = d.share
                entry = (self.wild if "+" in f or "#" in f else self.exact).get(f)
                g = entry.groups.get(name) if entry is not None else None
                if g is not None:
                    self._deliver_shared(g, d.msg, d.share)
                    continue
            lost += 1
        if lost:
            logger.warning(
                "session %s ended with %d unacknowledged or queued QoS 1 messages: discarded",
                session.client_id,
                lost,
            )

    def detach(self, conn: Connection) -> None:
        """The connection is gone: keep its session for its expiry interval, or drop it now."""
        self.connections.discard(conn)
        session = conn.session
        conn.session = None
        if session is None or session.conn is not conn:
            return
        session.conn = None
        session.sent_now.clear()
        session.resend.clear()
        session.disconnected_at = time.time()
        if conn.will is not None and not self.closing:
            self._schedule_will(session, conn.will)
        conn.will = None
        if session.expiry_s == 0:
            self.drop_session(session)

    def _schedule_will(self, session: Session, will: Will) -> None:
        delay = min(will.delay_s, session.expiry_s)
        if delay <= 0:
            self.publish(will.msg, None)
            return

        def fire() -> None:
            session.pending_will = None
            self.publish(will.msg, None)

        session.pending_will = asyncio.get_running_loop().call_later(delay, fire)

    def housekeeping(self) -> None:
        now = time.monotonic()
        for conn in list(self.connections):
            conn.check_timeouts(now)
        wall = time.time()
        for s in list(self.sessions.values()):
            if s.conn is None and s.expiry_s != NEVER and wall - s.disconnected_at >= s.expiry_s:
                self.drop_session(s)

    # persistence

    @property
    def state_path(self) -> Path | None:
        return self.data_dir / STATE_FILE if self.data_dir is not None else None

    def save(self) -> None:
        path = self.state_path
        if path is None:
            return
        state = {
            "version": 1,
            "saved_at": time.time(),
            "sessions": [s.to_json() for s in self.sessions.values() if s.expiry_s > 0],
            "retained": [m.to_json() for m in self.retained.values()],
        }
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as fh:
            json.dump(state, fh, separators=(",", ":"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def load(self) -> None:
        path = self.state_path
        if path is None or not path.exists():
            return
        try:
            state = json.loads(path.read_text())
            for m in state["retained"]:
                msg = Message.from_json(m)
                self.retained[msg.topic] = msg
            for d in state["sessions"]:
                s = Session(d["id"])
                s.expiry_s = d["expiry"]
                s.disconnected_at = d["disconnected_at"]
                s.next_pid = d["next_pid"]
                s.inflight = {int(pid): Delivery.from_json(x) for pid, x in d["inflight"]}
                s.queue = deque(Delivery.from_json(x) for x in d["queue"])
                s.inbound_qos2 = set(d["qos2"])
                self.sessions[s.client_id] = s
                for key, (qos, nl, rap, rh, sid) in d["subs"].items():
                    if split_shared(key) is not None:
                        self.subscribe(s, key, SubOptions(qos, nl, rap, rh, sid))
            # Loaded: the file now describes the past. Left in place, a crash (no save) would bring its sessions
            # and messages back at the next start, though they may have been delivered and acknowledged since.
            with contextlib.suppress(OSError):
                path.unlink()
        except Exception as exc:  # any damage: truncated, not JSON, or JSON of the wrong shape
            logger.warning("cannot load %s (%r): starting empty", path, exc)
            self.sessions.clear()
            self.exact.clear()
            self.wild.clear()
            self.retained.clear()
            self._match_cache.clear()
            with contextlib.suppress(OSError):
                os.replace(path, path.with_suffix(".bad"))

    def shutdown(self) -> None:
        """Close every connection (MQTT 5 clients get DISCONNECT 0x8B) and save the state."""
        self.closing = True
        for conn in list(self.connections):
            conn.close(RC_SERVER_SHUTTING_DOWN)
        for s in self.sessions.values():
            if s.pending_will is not None:
                s.pending_will.cancel()
        self.save()


# --- one connection -------------------------------------------------------------------------------------------


class Connection(asyncio.Protocol):
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.session: Session | None = None
        self.version = 0  # 4 (3.1.1) or 5 after CONNECT
        self.keepalive = 0
        self.started = self.last_rx = time.monotonic()
        self.will: Will | None = None
        self.max_out = PROTOCOL_MAX_PACKET  # the client's Maximum Packet Size
        self.closed = False
        self.paused = False  # the transport holds more than WRITE_HIGH unsent bytes
        self.dropped_qos0 = 0
        self._out: list[bytes] = []
        self.peer = "?"

    # transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
        self.peer = str(transport.get_extra_info("peername"))
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(6, 1, 1)  # IPPROTO_TCP, TCP_NODELAY: PUBACKs must not wait for Nagle
        self.broker.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.broker.detach(self)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        session = self.session
        if session is not None and session.conn is self:
            session.pump()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_rx = time.monotonic()
        buf = self.buf
        buf += data
        pos, n = 0, len(buf)
        try:
            while n - pos >= 2:
                length, shift, i, complete = 0, 0, pos + 1, False
                while i < n:
                    b = buf[i]
                    i += 1
                    length |= (b & 0x7F) << shift
                    if not b & 0x80:
                        complete = True
                        break
                    shift += 7
                    if shift > 21:
                        raise Malformed("remaining length longer than 4 bytes")
                if not complete:
                    break
                if length + (i - pos) > MAX_PACKET_SIZE:
                    raise MqttError(f"packet of {length} bytes exceeds the maximum", RC_PACKET_TOO_LARGE)
                end = i + length
                if end > n:
                    break
                first = buf[pos]
                body = bytes(buf[i:end])
                pos = end
                self.handle(first, body)
                if self.closed:
                    return
        except MqttError as exc:
            logger.warning("closing MQTT connection %s (%s): %s", self.client_label(), self.peer, exc)
            self.close(exc.reason)
            return
        except Exception:
            logger.exception("closing MQTT connection %s (%s) after an error", self.client_label(), self.peer)
            self.close(0x83)  # implementation specific error
            return
        finally:
            if not self.closed:
                del buf[:pos]

    # output

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(data)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if out and not self.closed and self.transport is not None:
            self.transport.write(b"".join(out))

    def fits(self, d: Delivery) -> bool:
        """Whether the message fits the client's Maximum Packet Size (rough but safe upper bound)."""
        return len(d.msg.payload) + len(d.msg.topic_b) + len(d.msg.props) + 32 <= self.max_out

    def send_publish(self, d: Delivery, pid: int, dup: bool) -> None:
        msg = d.msg
        first = 0x30 | (d.qos << 1) | (0x08 if dup else 0) | (0x01 if d.retain else 0)
        parts = [msg.topic_b]
        if d.qos:
            parts.append(pid.to_bytes(2, "big"))
        if self.version == 5:
            props = msg.props
            if msg.expires_at is not None:
                left = max(1, math.ceil(msg.expires_at - time.time()))
                props += b"\x02" + left.to_bytes(4, "big")
            for sid in d.sub_ids:
                props += b"\x0b" + varint(sid)
            parts.append(varint(len(props)))
            parts.append(props)
        parts.append(msg.payload)
        body = b"".join(parts)
        self.write(bytes((first,)) + varint(len(body)) + body)

    def close(self, reason: int | None = None) -> None:
        """Close the connection; MQTT 5 clients get a DISCONNECT with ``reason`` first."""
        if self.closed:
            return
        if reason is not None and self.version == 5 and self.session is not None:
            self.write(packet(0xE0, bytes((reason,)) + b"\x00"))
        self._flush()
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        self.broker.detach(self)

    def check_timeouts(self, now: float) -> None:
        if self.session is None:
            if now - self.started > CONNECT_TIMEOUT_S:
                logger.warning("closing %s: no CONNECT within %.0fs", self.peer, CONNECT_TIMEOUT_S)
                self.close()
        elif self.keepalive and now - self.last_rx > 1.5 * self.keepalive:
            logger.warning("closing MQTT connection %s: keep alive timed out", self.client_label())
            self.close(RC_KEEP_ALIVE_TIMEOUT)

    def client_label(self) -> str:
        return self.session.client_id if self.session is not None else "(not connected)"

    # packets

    def handle(self, first: int, body: bytes) -> None:
        kind, flags = first >> 4, first & 0x0F
        if self.session is None:
            if kind != CONNECT:
                raise MqttError(f"packet type {kind} before CONNECT")
            if flags:
                raise Malformed("CONNECT with flags")
            self.on_connect(Reader(body))
            return
        if kind == PUBLISH:
            self.on_publish(flags, body)
        elif kind == PUBACK:
            if flags:
                raise Malformed("PUBACK with flags")
            if len(body) < 2:
                raise Malformed("short PUBACK")
            self.session.acked(int.from_bytes(body[:2], "big"))
        elif kind == PINGREQ:
            if flags or body:
                raise Malformed("bad PINGREQ")
            self.write(b"\xd0\x00")
        elif kind == SUBSCRIBE:
            if flags != 0x02:
                raise Malformed("SUBSCRIBE flags must be 0010")
            self.on_subscribe(Reader(body))
        elif kind == UNSUBSCRIBE:
            if flags != 0x02:
                raise Malformed("UNSUBSCRIBE flags must be 0010")
            self.on_unsubscribe(Reader(body))
        elif kind == PUBREL:
            if flags != 0x02 or len(body) < 2:
                raise Malformed("bad PUBREL")
            pid = int.from_bytes(body[:2], "big")
            known = pid in self.session.inbound_qos2
            self.session.inbound_qos2.discard(pid)
            if self.version == 5 and not known:
                self.write(packet(0x70, body[:2] + b"\x92"))  # packet identifier not found
            else:
                self.write(b"\x70\x02" + body[:2])
        elif kind == DISCONNECT:
            self.on_disconnect(flags, Reader(body))
        elif kind == CONNECT:
            raise MqttError("second CONNECT")
        else:
            raise MqttError(f"unexpected packet type {kind}")

    def on_connect(self, r: Reader) -> None:
        name = r.string()
        level = r.u8()
        if name != "MQTT" or level not in (4, 5):
            # 3.1 clients ("MQIsdp", level 3) and unknown versions: refuse in the form a 3.1.1 client reads.
            logger.warning("refusing %s: protocol %r level %d", self.peer, name, level)
            if level == 5:
                self.write(packet(0x20, b"\x00" + bytes((RC_UNSUPPORTED_VERSION,)) + b"\x00"))
            else:
                self.write(b"\x20\x02\x00\x01")
            self._flush()
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            self.broker.detach(self)
            return
        self.version = level
        v5 = level == 5
        cflags = r.u8()
        if cflags & 0x01:
            raise Malformed("reserved CONNECT flag set")
        clean = bool(cflags & 0x02)
        will_flag = bool(cflags & 0x04)
        will_qos = (cflags >> 3) & 0x03
        will_retain = bool(cflags & 0x20)
        if not will_flag and (will_qos or will_retain):
            raise Malformed("will QoS/retain without a will")
        if will_qos == 3:
            raise Malformed("will QoS 3")
        self.keepalive = r.u16()
        props: dict[int, Any] = {}
        if v5:
            props, _ = r.properties()
        client_id = r.string()
        will: Will | None = None
        if will_flag:
            wprops: dict[int, Any] = {}
            wfwd = b""
            if v5:
                wprops, wfwd = r.properties()
            wtopic = r.string()
            wpayload = r.binary()
            if not valid_topic_name(wtopic):
                raise MqttError("invalid will topic", RC_TOPIC_NAME_INVALID)
            expiry = wprops.get(P_MESSAGE_EXPIRY)
            wmsg = Message(
                wtopic,
                wpayload,
                min(will_qos, 1),
                will_retain,
                wfwd,
                time.time() + expiry if expiry is not None else None,
            )
            will = Will(wmsg, int(wprops.get(P_WILL_DELAY, 0)))
        if cflags & 0x80:
            r.string()  # user name: accepted, not checked
        if cflags & 0x40:
            r.binary()  # password: accepted, not checked
        if r.left():
            raise Malformed("bytes after the CONNECT payload")
        if will_qos == 2 and v5:
            self._refuse(RC_QOS_NOT_SUPPORTED)
            return
        if P_AUTH_METHOD in props:
            self._refuse(RC_BAD_AUTH_METHOD)
            return

        assigned = None
        if not client_id:
            if not v5 and not clean:
                self.write(b"\x20\x02\x00\x02")  # identifier rejected
                self.close()
                return
            client_id = assigned = self.broker.assign_id()
        if v5:
            expiry_s = int(props.get(P_SESSION_EXPIRY, 0))
            receive_maximum = int(props.get(P_RECEIVE_MAXIMUM, 65535))
            if receive_maximum == 0:
                raise MqttError("Receive Maximum 0")
            self.max_out = int(props.get(P_MAX_PACKET, PROTOCOL_MAX_PACKET))
            if self.max_out == 0:
                raise MqttError("Maximum Packet Size 0")
        else:
            expiry_s = 0 if clean else NEVER
            receive_maximum = V3_RECEIVE_MAXIMUM

        broker = self.broker
        session = broker.sessions.get(client_id)
        if session is not None and session.conn is not None:
            old = session.conn
            # The older connection's will goes out, unless the new one resumes the session and the will is delayed.
            if old.will is not None and not clean and old.will.delay_s > 0:
                old.will = None
            old.close(RC_SESSION_TAKEN_OVER)  # detaches: may drop a session with expiry 0
            session = broker.sessions.get(client_id)
        if session is not None and session.pending_will is not None:
            session.pending_will.cancel()
            session.pending_will = None
        if session is not None and clean:
            broker.drop_session(session)
            session = None
        present = session is not None
        if session is None:
            session = broker.sessions[client_id] = Session(client_id)
        session.conn = self
        session.expiry_s = expiry_s
        session.receive_maximum = receive_maximum
        session.sent_now.clear()
        session.resend = deque(session.inflight)
        self.session = session
        self.will = will

        if v5:
            cprops = bytearray()
            cprops += b"\x24\x01"  # Maximum QoS 1
            cprops += b"\x25\x01"  # Retain Available
            cprops += b"\x27" + MAX_PACKET_SIZE.to_bytes(4, "big")
            cprops += b"\x22\x00\x00"  # Topic Alias Maximum 0
            cprops += b"\x28\x01\x29\x01\x2a\x01"  # wildcard, subscription identifiers, shared subscriptions
            if assigned is not None:
                cprops += b"\x12" + utf8(assigned)
            self.write(packet(0x20, bytes((int(present), 0)) + varint(len(cprops)) + bytes(cprops)))
        else:
            self.write(bytes((0x20, 0x02, int(present), 0)))
        session.pump()

    def _refuse(self, reason: int) -> None:
        self.write(packet(0x20, b"\x00" + bytes((reason,)) + b"\x00"))
        self._flush()
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        self.broker.detach(self)

    def on_publish(self, flags: int, body: bytes) -> None:
        session = self.session
        assert session is not None
        qos = (flags >> 1) & 0x03
        if qos == 3:
            raise Malformed("PUBLISH QoS 3")
        if qos == 0 and flags & 0x08:
            raise Malformed("DUP on a QoS 0 PUBLISH")
        r = Reader(body)
        topic = r.string()
        pid = 0
        if qos:
            pid = r.u16()
            if pid == 0:
                raise Malformed("packet identifier 0")
        fwd = b""
        expires_at = None
        if self.version == 5:
            props, fwd = r.properties()
            if P_TOPIC_ALIAS in props:
                raise MqttError("topic alias (Topic Alias Maximum is 0)", RC_TOPIC_ALIAS_INVALID)
            if P_SUB_ID in props:
                raise MqttError("subscription identifier in a client PUBLISH")
            if P_MESSAGE_EXPIRY in props:
                expires_at = time.time() + props[P_MESSAGE_EXPIRY]
        if not valid_topic_name(topic):
            raise MqttError(f"invalid topic name {topic!r}", RC_TOPIC_NAME_INVALID)
        if qos == 2:
            if self.version == 5:
                raise MqttError("QoS 2 PUBLISH (Maximum QoS is 1)", RC_QOS_NOT_SUPPORTED)
            # 3.1.1 clients cannot learn our maximum: receive exactly once, deliver at QoS 1 at most.
            if pid not in session.inbound_qos2:
                session.inbound_qos2.add(pid)
                self.broker.publish(
                    Message(topic, body[r.pos :], 2, bool(flags & 0x01), fwd, expires_at), session.client_id
                )
            self.write(b"\x50\x02" + pid.to_bytes(2, "big"))
            return
        self.broker.publish(
            Message(topic, body[r.pos :], qos, bool(flags & 0x01), fwd, expires_at), session.client_id
        )
        if qos:
            self.write(b"\x40\x02" + pid.to_bytes(2, "big"))

    def on_subscribe(self, r: Reader) -> None:
        session = self.session
        assert session is not None
        pid = r.u16()
        sub_id = None
        if self.version == 5:
            props, _ = r.properties()
            sub_id = props.get(P_SUB_ID)
            if sub_id == 0:
                raise MqttError("subscription identifier 0")
        if not r.left():
            raise MqttError("SUBSCRIBE without a topic filter")
        codes = bytearray()
        retained: list[Delivery] = []
        while r.left():
            key = r.string()
            options = r.u8()
            if options & 0xC0 or (self.version == 4 and options & 0xFC):
                raise Malformed("reserved subscription option bits set")
            qos = options & 0x03
            if qos == 3:
                raise Malformed("subscription QoS 3")
            opts = SubOptions(
                min(qos, 1), bool(options & 0x04), bool(options & 0x08), (options >> 4) & 0x03, sub_id
            )
            if opts.retain_handling == 3:
                raise Malformed("retain handling 3")
            parsed = split_shared(key)
            if parsed is None:
                codes.append(RC_TOPIC_FILTER_INVALID if self.version == 5 else 0x80)
                continue
            group, f = parsed
            if group is not None and opts.no_local:
                raise MqttError("no local on a shared subscription")
            existed = self.broker.subscribe(session, key, opts)
            codes.append(opts.qos)
            if group is None and (opts.retain_handling == 0 or (opts.retain_handling == 1 and not existed)):
                retained += [
                    Delivery(m, min(m.qos, opts.qos), True, (sub_id,) if sub_id else ())
                    for m in self.broker.retained_for(f)
                ]
        head = pid.to_bytes(2, "big") + (b"\x00" if self.version == 5 else b"")
        self.write(packet(0x90, head + bytes(codes)))
        for d in retained:
            session.deliver(d)

    def on_unsubscribe(self, r: Reader) -> None:
        session = self.session
        assert session is not None
        pid = r.u16()
        if self.version == 5:
            r.properties()
        if not r.left():
            raise MqttError("UNSUBSCRIBE without a topic filter")
        codes = bytearray()
        while r.left():
            key = r.string()
            codes.append(0x00 if self.broker.unsubscribe(session, key) else 0x11)
        if self.version == 5:
            self.write(packet(0xB0, pid.to_bytes(2, "big") + b"\x00" + bytes(codes)))
        else:
            self.write(b"\xb0\x02" + pid.to_bytes(2, "big"))

    def on_disconnect(self, flags: int, r: Reader) -> None:
        session = self.session
        assert session is not None
        if flags:
            raise Malformed("DISCONNECT with flags")
        reason = 0
        if self.version == 5 and r.left():
            reason = r.u8()
            if r.left():
                props, _ = r.properties()
                if P_SESSION_EXPIRY in props:
                    if session.expiry_s == 0 and props[P_SESSION_EXPIRY] != 0:
                        raise MqttError("session expiry set on DISCONNECT after 0 on CONNECT")
                    session.expiry_s = int(props[P_SESSION_EXPIRY])
        if reason != 0x04:  # 0x04: disconnect with will message
            self.will = None
        self.close()


# --- entry point ----------------------------------------------------------------------------------------------


async def serve(
    host: str, port: int, data_dir: Path | None = None, stop: asyncio.Event | None = None
) -> None:
    """Run a broker until ``stop`` is set (or SIGTERM/SIGINT when ``stop`` is None), then save its state."""
    loop = asyncio.get_running_loop()
    broker = Broker(data_dir)
    broker.load()
    own_signals = stop is None
    stop = stop or asyncio.Event()
    if own_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(lambda: Connection(broker), host, port, reuse_address=True)
    logger.info("MQTT broker listening on %s:%d (%d sessions loaded)", host, port, len(broker.sessions))

    async def housekeeping() -> None:
        while True:
            await asyncio.sleep(0.5)
            try:
                broker.housekeeping()
            except Exception:
                logger.exception("broker housekeeping failed")

    task = asyncio.create_task(housekeeping(), name="broker-housekeeping")
    try:
        await stop.wait()
    finally:
        task.cancel()
        server.close()
        broker.shutdown()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if own_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m waterdoctor.broker", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--data-dir", type=Path, default=None, help="where to save sessions on a clean stop")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.data_dir is not None:
        args.data_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(serve(args.host, args.port, args.data_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
