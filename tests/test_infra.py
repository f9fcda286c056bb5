"""The shared fixtures give real servers, and both key-value stores speak the commands we use."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from pathlib import Path

import asyncpg
import fakeredis
import psycopg
import pytest
import redis
from pytest_redis.executor import RedisExecutor
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from tests import servers
from tests.servers import MissingServerError, PostgresServer, free_port, fresh_postgres_database

# --- redis-server -------------------------------------------------------------------------------


def _process_name(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


async def test_redis_url_points_at_a_real_redis_server(
    redis_url: str, redis_proc: RedisExecutor
) -> None:
    client = Redis.from_url(redis_url)
    try:
        info = await client.info("server")
    finally:
        await client.aclose()
    assert info["redis_version"]
    assert info["tcp_port"] == redis_proc.port
    assert info["process_id"] == redis_proc.process.pid
    assert _process_name(info["process_id"]).startswith("redis-server")


def test_real_kv_starts_flushed(redis_url: str, request: pytest.FixtureRequest) -> None:
    with redis.Redis.from_url(redis_url) as raw:
        raw.set("left-over-from-another-test", "x")
        request.getfixturevalue("real_kv")  # set up only now, after the write above
        assert raw.dbsize() == 0


async def test_fake_kv_is_isolated_from_other_fakeredis_clients(fake_kv: Redis) -> None:
    await fake_kv.set("mine", "1")
    default_client = fakeredis.FakeAsyncRedis(decode_responses=True)
    try:
        assert await default_client.get("mine") is None
    finally:
        await default_client.aclose()


# --- the commands the application relies on, on fakeredis and on redis-server -------------------


async def test_kv_decodes_responses_to_str(kv: Redis) -> None:
    await kv.set("greeting", "héllo")
    assert await kv.get("greeting") == "héllo"


async def test_kv_set_nx_ex_claims_a_key_once(kv: Redis) -> None:
    assert await kv.set("idem:abc", "first", nx=True, ex=60) is True
    assert await kv.set("idem:abc", "second", nx=True, ex=60) is None
    assert await kv.get("idem:abc") == "first"
    assert 0 < await kv.ttl("idem:abc") <= 60


async def test_kv_getdel_returns_and_removes(kv: Redis) -> None:
    await kv.set("pending", "payload")
    assert await kv.getdel("pending") == "payload"
    assert await kv.exists("pending") == 0
    assert await kv.getdel("pending") is None


COMPARE_AND_DELETE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


async def test_kv_eval_runs_lua(kv: Redis) -> None:
    await kv.set("lock", "owner-a")
    assert await kv.eval(COMPARE_AND_DELETE, 1, "lock", "owner-b") == 0
    assert await kv.get("lock") == "owner-a"
    assert await kv.eval(COMPARE_AND_DELETE, 1, "lock", "owner-a") == 1
    assert await kv.exists("lock") == 0


async def test_kv_pipeline_runs_commands_in_order(kv: Redis) -> None:
    async with kv.pipeline(transaction=True) as pipe:
        pipe.rpush("history", "a", "b")
        pipe.expire("history", 60)
        pipe.lrange("history", 0, -1)
        pipe.incr("counter")
        results = await pipe.execute()
    assert results == [2, True, ["a", "b"], 1]


async def test_kv_key_expires_after_its_px(kv: Redis) -> None:
    async with kv.pipeline(transaction=True) as pipe:  # atomic: PTTL sees the fresh key
        pipe.set("short-lived", "v", px=50)
        pipe.pttl("short-lived")
        stored, remaining_ms = await pipe.execute()
    assert stored is True
    assert 0 < remaining_ms <= 50
    await asyncio.sleep(0.2)  # well past the 50 ms; expiry is checked when the key is read
    assert await kv.get("short-lived") is None
    assert await kv.exists("short-lived") == 0


# --- PostgreSQL ---------------------------------------------------------------------------------


def _asyncpg_dsn(sqlalchemy_url: str) -> str:
    return make_url(sqlalchemy_url).set(drivername="postgresql").render_as_string()


async def test_postgres_url_is_an_empty_database_on_a_real_server(postgres_url: str) -> None:
    url = make_url(postgres_url)
    assert url.drivername == "postgresql+asyncpg"
    connection = await asyncpg.connect(_asyncpg_dsn(postgres_url))
    try:
        assert (await connection.fetchval("select version()")).startswith("PostgreSQL ")
        assert await connection.fetchval("select current_database()") == url.database
        tables = await connection.fetchval(
            "select count(*) from pg_tables where schemaname not in ('pg_catalog', "
            "'information_schema')"
        )
        assert tables == 0
    finally:
        await connection.close()


async def test_postgres_url_works_with_sqlalchemy(postgres_url: str) -> None:
    engine = create_async_engine(postgres_url)
    try:
        async with engine.begin() as connection:
            await connection.execute(text("create table lead (id serial primary key, name text)"))
            await connection.execute(text("insert into lead (name) values ('Ada')"))
        async with engine.connect() as connection:
            assert (await connection.execute(text("select name from lead"))).scalar_one() == "Ada"
    finally:
        await engine.dispose()


def _database_exists(server: PostgresServer, dbname: str) -> bool:
    async def query() -> bool:
        connection = await asyncpg.connect(
            host=server.host, port=server.port, user=server.user, database="postgres"
        )
        try:
            found = await connection.fetchval(
                "select 1 from pg_database where datname = $1", dbname
            )
        finally:
            await connection.close()
        return found == 1

    return asyncio.run(query())


def test_fresh_postgres_databases_are_separate_and_dropped_even_if_left_open(
    postgresql_server: PostgresServer,
) -> None:
    async def leave_a_table_and_an_open_connection(url: str) -> asyncpg.Connection:
        connection = await asyncpg.connect(_asyncpg_dsn(url))
        await connection.execute("create table leftover (id int)")
        return connection

    with fresh_postgres_database(postgresql_server) as first_url:
        first_db = make_url(first_url).database
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(leave_a_table_and_an_open_connection(first_url))
            with fresh_postgres_database(postgresql_server) as second_url:
                second_db = make_url(second_url).database
                assert second_db != first_db
                assert _database_exists(postgresql_server, second_db)
        finally:
            loop.close()  # the leaked connection is never closed by the client
    assert not _database_exists(postgresql_server, first_db)
    assert not _database_exists(postgresql_server, second_db)


def test_pytest_postgresql_client_fixture_uses_our_server(
    postgresql: psycopg.Connection, postgresql_server: PostgresServer
) -> None:
    assert postgresql.info.port == postgresql_server.port
    assert postgresql.execute("select 40 + 2").fetchone() == (42,)


def test_postgres_never_runs_as_root(postgresql_server: PostgresServer) -> None:
    postmaster_pid = int((postgresql_server.datadir / "postmaster.pid").read_text().split()[0])
    owner_uid = Path(f"/proc/{postmaster_pid}").stat().st_uid
    assert _process_name(postmaster_pid) in {"postgres", "postmaster"}
    assert owner_uid != 0
    if os.geteuid() != 0:
        assert owner_uid == os.geteuid()


# --- SQLite -------------------------------------------------------------------------------------


async def test_sqlite_url_creates_a_file_database(sqlite_url: str, tmp_path: Path) -> None:
    engine = create_async_engine(sqlite_url)
    try:
        async with engine.begin() as connection:
            await connection.execute(text("create table call (sid text primary key)"))
            await connection.execute(text("insert into call values ('CA1')"))
    finally:
        await engine.dispose()
    assert make_url(sqlite_url).database == str(tmp_path / "test.db")
    assert (tmp_path / "test.db").stat().st_size > 0


# --- helpers ------------------------------------------------------------------------------------


def test_free_port_can_be_bound_on_loopback() -> None:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
    assert 1024 <= port <= 65535


def test_missing_servers_without_root_fail_with_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(servers, "find_redis_server", lambda: None)
    monkeypatch.setattr(servers, "find_postgres_bindir", lambda: None)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(MissingServerError, match="missing: redis-server, postgresql"):
        servers.ensure_server_binaries(log=lambda message: None)


def test_found_servers_are_not_installed_again(
    server_binaries: servers.ServerBinaries, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse_install(packages: list[str], log: object) -> None:
        raise AssertionError(f"tried to install {packages}")

    monkeypatch.setattr(servers, "install_debian_packages", refuse_install)
    assert servers.ensure_server_binaries(log=lambda message: None) == server_binaries


def test_apt_is_kept_from_starting_system_daemons(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = tmp_path / "policy-rc.d"
    monkeypatch.setattr(servers, "POLICY_RC_D", policy)
    with servers.system_services_not_started():
        assert subprocess.run([str(policy)], check=False).returncode == 101  # "forbidden"
    assert not policy.exists()


def test_an_existing_apt_policy_is_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = tmp_path / "policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 0\n")
    monkeypatch.setattr(servers, "POLICY_RC_D", policy)
    with servers.system_services_not_started():
        pass
    assert policy.read_text() == "#!/bin/sh\nexit 0\n"
