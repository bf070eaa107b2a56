"""A claim whose reply is lost on the way back: the server ran it, the connection dropped, redis-py sent it again.

The network between the dispatcher and Redis is the one part faked here: a TCP proxy that forwards everything and,
once armed, closes the client's connection instead of forwarding the reply to one command. Redis and redis-py's own
retry (on by default) are real, and so is the Twilio client talking to the fake.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aredis

from alerting.dispatcher import Dispatcher
from alerting.ledger import Ledger, alert_key, phone_field
from alerting.ratelimit import RedisSendRateLimiter
from alerting.routing import Routing
from alerting.sms import TwilioSender
from simulators.twilio_fake import TwilioFake
from tests.alerting.conftest import PHONE_A, PHONE_B, PLAIN, anomaly, fast_limiter


class ReplyDropper:
    """TCP proxy to Redis that can lose the reply to the ``nth`` command (from now on) containing ``marker``."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.marker: bytes | None = None
        self.nth = 0
        self.dropped = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def arm(self, marker: bytes, nth: int = 1) -> None:
        self.marker, self.nth = marker, nth

    async def __aenter__(self) -> ReplyDropper:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.close()
        await self._server.wait_closed()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(*self.target)
        self._writers |= {client_w, server_w}
        drop_next_reply = asyncio.Event()

        async def upstream() -> None:
            while data := await client_r.read(1 << 16):
                if self.marker is not None and self.marker in data:
                    self.nth -= 1
                    if self.nth == 0:
                        self.marker = None
                        drop_next_reply.set()
                server_w.write(data)
                await server_w.drain()

        async def downstream() -> None:
            while data := await server_r.read(1 << 16):
                if drop_next_reply.is_set():  # the server ran it; the client never hears back
                    self.dropped += 1
                    client_w.transport.abort()
                    return
                client_w.write(data)
                await client_w.drain()

        tasks = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        try:
            with contextlib.suppress(ConnectionError, OSError):
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for w in (client_w, server_w):
                w.close()
                self._writers.discard(w)
                with contextlib.suppress(ConnectionError, OSError):
                    await w.wait_closed()


@pytest.fixture
async def dropper(redis_url: str) -> AsyncIterator[ReplyDropper]:
    parts = urlsplit(redis_url)
    assert parts.hostname is not None and parts.port is not None
    async with ReplyDropper(parts.hostname, parts.port) as proxy:
        yield proxy


@pytest.mark.parametrize(
    "nth",
    [
        1,  # the shared limiter: the admission script claims the phones; lose its reply
        2,  # an in-process limiter: admission decides, then a compare-and-set claims each phone; lose the first's
    ],
)
async def test_a_claim_whose_reply_was_lost_is_still_sent_once(
    dropper: ReplyDropper,
    fake: TwilioFake,
    sender: TwilioSender,
    routing: Routing,
    nth: int,
) -> None:
    # The dispatcher's Redis traffic goes through the faulty network.
    via_proxy = aredis.Redis(host="127.0.0.1", port=dropper.port)
    shared = RedisSendRateLimiter(via_proxy, 100_000, 100_000)
    d = Dispatcher(via_proxy, sender, routing, config=PLAIN, limiter=shared if nth == 1 else fast_limiter())
    try:
        assert await d.dispatch(anomaly(1, severity="critical"))  # scripts loaded, connections made
        dropper.arm(b"plant-7:s-0042:2", nth)
        assert await d.dispatch(anomaly(2, severity="critical"))
        records = await d.ledger.phone_records("plant-7:s-0042:2")
    finally:
        await via_proxy.aclose()
    assert dropper.dropped == 1  # the fault really happened
    per_key = fake.accepted_by_key()
    assert per_key[("plant-7:s-0042:2", PHONE_A)] == 1 and per_key[("plant-7:s-0042:2", PHONE_B)] == 1
    assert {records[phone_field("", p)]["s"] for p in (PHONE_A, PHONE_B)} == {"accepted"}


async def test_a_mark_whose_reply_was_lost_is_still_the_callers(
    dropper: ReplyDropper, r: aredis.Redis
) -> None:
    # An escalation is counted by the one process whose mark (HSETNX) lands; redis-py resends the command when the
    # reply is lost, and the resend finds the field set: the mark is still recognized as this caller's.
    via_proxy = aredis.Redis(host="127.0.0.1", port=dropper.port)
    ledger = Ledger(via_proxy, ttl_s=60)
    try:
        await via_proxy.ping()
        dropper.arm(b"HSETNX")
        assert await ledger.first_to_mark("plant-7:s-0042:1", "x:0")
        assert not await ledger.first_to_mark("plant-7:s-0042:1", "x:0")  # anyone after: not theirs
    finally:
        await via_proxy.aclose()
    assert dropper.dropped == 1  # the fault really happened
    assert await r.hexists(alert_key("plant-7:s-0042:1"), "x:0")
