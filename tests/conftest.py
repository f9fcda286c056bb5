"""Shared fixtures: real redis-server and PostgreSQL (started once per run), fakeredis, SQLite.

Servers start lazily, the first time a test asks for them, so `pytest tests/test_audio.py` starts
nothing. If redis-server or PostgreSQL is missing, the run installs them with apt when it runs as
root (as CI does) and otherwise fails with a message naming what to install.

Fixtures (names are a contract):
- `redis_url` (session): URL of a real redis-server on 127.0.0.1.
- `real_kv`: `redis.asyncio.Redis` on that server (decode_responses=True), flushed before the test.
- `fake_kv`: `fakeredis.FakeAsyncRedis` (decode_responses=True) on a fresh in-memory server.
- `kv`: both of the above, parametrized as `kv[fake]` and `kv[real]`.
- `postgres_url`: a fresh empty database per test, `postgresql+asyncpg://user@host:port/db`.
- `sqlite_url`: a fresh file database per test, `sqlite+aiosqlite:////tmp/.../test.db`.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import fakeredis
import pytest
from pytest_postgresql import factories as postgresql_factories
from pytest_postgresql.executors import NoopExecutor
from pytest_redis.executor import RedisExecutor
from redis.asyncio import Redis
from websockets.asyncio.server import serve

from tests.servers import (
    PostgresServer,
    ServerBinaries,
    ensure_server_binaries,
    free_port,
    fresh_postgres_database,
)

# Fixture modules owned by other areas; listed only once they exist so this file never breaks.
pytest_plugins = [
    f"tests.{name}" for name in ("db_fixtures",) if (Path(__file__).parent / f"{name}.py").exists()
]


# --- servers (session) ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def server_binaries(pytestconfig: pytest.Config) -> ServerBinaries:
    """redis-server and PostgreSQL binaries, installed with apt first if missing (root only)."""
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    reporter = pytestconfig.pluginmanager.getplugin("terminalreporter")

    def log(message: str) -> None:
        if reporter is not None:
            reporter.write_line(f"[test servers] {message}")

    # apt's progress goes straight to the terminal instead of into a captured test's output.
    with capture.global_and_fixture_disabled():
        return ensure_server_binaries(log)


@pytest.fixture(scope="session")
def sigterm_tears_down() -> Iterator[None]:
    """Let SIGTERM (`timeout`, CI cancel) end the run like Ctrl-C does, stopping the servers.

    By default SIGTERM kills Python on the spot, and our servers live in their own sessions, so
    they would keep running. The handler is installed only while servers run, and only over the
    default one.
    """

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.fixture(scope="session")
def redis_proc(
    server_binaries: ServerBinaries,
    sigterm_tears_down: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RedisExecutor]:
    """redis-server started by pytest-redis's executor (this overrides the plugin's fixture)."""
    executor = RedisExecutor(
        executable=str(server_binaries.redis_server),
        databases=16,
        redis_timeout=0,  # never drop idle clients: pools in long tests stay usable
        loglevel="notice",
        host="127.0.0.1",
        port=free_port(),
        save="",  # no snapshots: the data is throwaway
        datadir=tmp_path_factory.mktemp("redis"),
        startup_timeout=60,
    )
    with executor:
        yield executor


@pytest.fixture(scope="session")
def postgresql_server(
    server_binaries: ServerBinaries, sigterm_tears_down: None
) -> Iterator[PostgresServer]:
    """A PostgreSQL cluster of our own (owned by an unprivileged account when we are root)."""
    with PostgresServer(server_binaries.postgres_bindir) as server:
        yield server


# pytest-postgresql takes over from here: a template database on our server, from which the
# plugin's `postgresql` (psycopg connection) fixture and our `postgres_url` clone databases.
postgresql_noproc = postgresql_factories.postgresql_noproc(depends_on="postgresql_server")
postgresql = postgresql_factories.postgresql("postgresql_noproc")


# --- Redis clients --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url(redis_proc: RedisExecutor) -> str:
    return f"redis://{redis_proc.host}:{redis_proc.port}/0"


@pytest.fixture
async def real_kv(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    await client.flushall()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def fake_kv() -> AsyncIterator[fakeredis.FakeAsyncRedis]:
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(), decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(params=["fake", "real"])
def kv(request: pytest.FixtureRequest) -> Redis:
    """The same test against fakeredis (the embedded default) and a real redis-server."""
    return request.getfixturevalue(f"{request.param}_kv")


# --- SQL databases --------------------------------------------------------------------------------


@pytest.fixture
def postgres_url(postgresql_noproc: NoopExecutor) -> Iterator[str]:
    """A fresh, empty database for this test alone; dropped afterwards (open sessions are cut)."""
    with fresh_postgres_database(postgresql_noproc) as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path}/test.db"


# A websockets server on loopback playing the Realtime API (tests of the client socket).
@pytest.fixture
async def realtime_server() -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """`await start(handler, **serve_kwargs)` -> the ws:// URL of a websockets server."""
    servers = []

    async def start(handler: Callable[[Any], Awaitable[None]], **kwargs: Any) -> str:
        # Some handlers stop reading on purpose: do not wait 10 s for them at teardown.
        kwargs.setdefault("close_timeout", 0.2)
        server = await serve(handler, "127.0.0.1", 0, **kwargs)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}/v1/realtime"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()
