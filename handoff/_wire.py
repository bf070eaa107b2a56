"""Raw Redis calls for the hand-off hot paths: commands packed in C, replies as the parser returns them.

Why this exists: ``redis.asyncio`` packs every command argument in Python (measured about 2-3 us per argument,
re-joining a growing buffer), and only the synchronous client uses hiredis' C packer. For a 1,000-entry XACK or
commit script that packing cost more than Redis spent executing the command. Per-reply overhead is the other
cost: a pipeline of N commands reads N replies, each through its own timeout context and response callback.

:class:`RawRedis` borrows a connection from the client's own pool the way ``execute_command`` does (the client's
retry policy, disconnect on error, release to the pool, the single-connection lock), sends bytes packed once with
``hiredis.pack_command`` (falling back to the connection's own packer for arguments hiredis refuses, or when the
client does not encode as UTF-8), and returns the replies without response callbacks: callers parse them.
Replies are decoded according to the client's ``decode_responses``, exactly as redis-py would hand them over.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import hiredis
import redis.asyncio as aredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import NoScriptError, ResponseError

logger = logging.getLogger(__name__)

Packed = bytes | list[bytes]


class RawRedis:
    """Pre-packed commands and raw replies on top of a ``redis.asyncio.Redis`` client (and its pool)."""

    def __init__(self, redis: aredis.Redis) -> None:
        self.redis = redis
        self._packer: AbstractConnection | None = None
        kwargs = redis.connection_pool.connection_kwargs
        self._c_packer = (
            kwargs.get("encoding", "utf-8").lower().replace("_", "-") in ("utf-8", "utf8")
            and kwargs.get("encoding_errors", "strict") == "strict"
        )

    def pack(self, args: Sequence[Any]) -> Packed:
        """One command in RESP. Arguments are str, bytes, int or float, as for ``execute_command``."""
        if self._c_packer:
            try:
                packed: bytes = hiredis.pack_command(args if type(args) is tuple else tuple(args))
                return packed
            except TypeError:
                pass  # e.g. a bool or memoryview: redis-py's packer raises its usual error or handles it
        if self._packer is None:
            # Never connected: only its pack_command is used, which depends on the pool's class and encoder.
            pool = self.redis.connection_pool
            self._packer = pool.connection_class(**pool.connection_kwargs)
        chunks: list[bytes] = self._packer.pack_command(*args)
        return chunks

    async def call(
        self,
        *packed: Packed,
        raise_on_error: bool = True,
        on_retry: Callable[[], None] | None = None,
        on_sent: Callable[[], None] | None = None,
    ) -> list[Any]:
        """Send the packed commands in one write and return one reply per command.

        Every reply is read before an error reply is raised (as a pipeline does), so the connection stays in
        step; with ``raise_on_error=False`` error replies are returned in place instead. Connection errors get
        the client's retry policy, as in ``execute_command``: the whole write is sent again. A retried command
        may have run the first time with its reply lost: ``on_retry`` is called before each retry so that a
        caller whose commands deliver something (XREADGROUP) can go and collect it. ``on_sent`` is called once the
        write is handed to the socket, before the replies are awaited (each time, on a retry).
        """

        async def failed(_error: BaseException) -> None:
            if on_retry is not None:
                on_retry()
            await conn.disconnect()

        async with self._connection() as conn:
            replies: list[Any] = await conn.retry.call_with_retry(
                lambda: self._send_read(conn, packed, on_sent), failed
            )
        if raise_on_error:
            for reply in replies:
                if isinstance(reply, ResponseError):
                    raise reply
        return replies

    async def evalsha(
        self,
        script: Script,
        keys: Sequence[Any],
        calls: Sequence[Sequence[Any]],
        *,
        then: Sequence[Packed] = (),
        on_retry: Callable[[], None] | None = None,
        on_sent: Callable[[], None] | None = None,
    ) -> list[Any]:
        """Run ``script`` once per argument list in ``calls``, then the commands ``then``, all in one write.

        Returns every reply in order. Calls answered NOSCRIPT (a restarted or flushed server) did nothing; the
        script is loaded and only they are sent again. ``on_retry`` and ``on_sent`` as for :meth:`call`.
        """
        head = ("EVALSHA", script.sha, len(keys), *keys)
        packed = [*(self.pack((*head, *args)) for args in calls), *then]
        replies = await self.call(*packed, raise_on_error=False, on_retry=on_retry, on_sent=on_sent)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            logger.info("loading script %s on the server", script.sha[:12])
            await self.call(self.pack(("SCRIPT", "LOAD", script.body)))
            again = await self.call(*(packed[i] for i in missing), raise_on_error=False)
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, ResponseError):
                raise reply
        return replies

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[AbstractConnection]:
        r = self.redis
        await r.initialize()
        pool = r.connection_pool
        conn = r.connection or await pool.get_connection()  # type: ignore[no-untyped-call]
        lock = r._single_conn_lock if r.single_connection_client else None
        if lock is not None:
            await lock.acquire()
        try:
            yield conn
        finally:
            if lock is not None:
                lock.release()
            if not r.connection:
                await pool.release(conn)

    @staticmethod
    async def _send_read(
        conn: AbstractConnection, packed: Sequence[Packed], on_sent: Callable[[], None] | None = None
    ) -> list[Any]:
        if len(packed) == 1:
            await conn.send_packed_command(packed[0])
            if on_sent is not None:
                on_sent()
            try:
                return [await conn.read_response()]
            except ResponseError as exc:
                return [exc]
        chunks: list[bytes] = []
        for p in packed:
            if isinstance(p, bytes):
                chunks.append(p)
            else:
                chunks.extend(p)
        await conn.send_packed_command(chunks)
        if on_sent is not None:
            on_sent()
        replies: list[Any] = []
        for _ in packed:
            try:
                replies.append(await conn.read_response())
            except ResponseError as exc:
                replies.append(exc)  # keep reading: the replies after it are already on the wire
        return replies


class Script:
    """A Lua script known by its SHA1 (computed locally; loaded on first NOSCRIPT)."""

    def __init__(self, body: str) -> None:
        self.body = body
        self.sha = hashlib.sha1(body.encode()).hexdigest()
