"""Real-server fixtures: private redis-server, Valkey 8 and mosquitto on free ports, thrown away after use.

Nothing here touches the shared servers on the default ports. Session-scoped servers are flushed before each test
that asks for a client, so state never leaks between tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis
import redis.asyncio as aredis

from waterdoctor.embedded import BuiltinBroker, MosquittoBroker, RedisServer

DEFAULT_PORTS = {6379, 1883}


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer("redis") as server:
        assert server.port not in DEFAULT_PORTS
        yield server


@pytest.fixture(scope="session")
def valkey_server() -> Iterator[RedisServer]:
    with RedisServer("valkey") as server:
        assert server.port not in DEFAULT_PORTS
        yield server


@pytest.fixture(params=["redis", "valkey"])
def any_server(request: pytest.FixtureRequest) -> RedisServer:
    """Parametrises a test over Redis 7.0 and Valkey 8."""
    server: RedisServer = request.getfixturevalue(f"{request.param}_server")
    return server


@pytest.fixture
def redis_url(any_server: RedisServer) -> Iterator[str]:
    """URL of a freshly flushed server (Redis 7.0 and Valkey 8 in turn)."""
    client = redis.Redis.from_url(any_server.url)
    client.flushall()
    client.close()
    yield any_server.url


@pytest.fixture
def redis_only_url(redis_server: RedisServer) -> str:
    """URL of the flushed Redis 7.0 server, for tests that need not run on both servers."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
async def r(redis_url: str) -> AsyncIterator[aredis.Redis]:
    client = aredis.Redis.from_url(redis_url, decode_responses=False)
    yield client
    await client.aclose()


@pytest.fixture
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis of its own for a test that kills or restarts it (AOF on, so it keeps data across restarts)."""
    with RedisServer("redis", data_dir=tmp_path_factory.mktemp("redis"), appendonly=True) as server:
        yield server


@pytest.fixture(scope="session")
def mosquitto_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    with MosquittoBroker(data_dir=tmp_path_factory.mktemp("mosq")) as broker:
        assert broker.port not in DEFAULT_PORTS
        yield broker


@pytest.fixture
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """A broker of its own per test (sessions and retained state do not leak between tests)."""
    with MosquittoBroker(data_dir=tmp_path_factory.mktemp("mosq")) as broker:
        assert broker.port not in DEFAULT_PORTS
        yield broker


@pytest.fixture
def builtin_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BuiltinBroker]:
    """The built-in pure-Python broker (waterdoctor.broker), one per test, persisting to its own folder."""
    with BuiltinBroker(data_dir=tmp_path_factory.mktemp("wdbroker")) as broker:
        assert broker.port not in DEFAULT_PORTS
        yield broker
