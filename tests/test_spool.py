"""The local spool: durable files, replay in order, idempotent writes, outages vs bad records.

The store outage here is real: a database URL on a port nothing listens on (connection
refused, as when PostgreSQL is stopped). `tests/test_outage_sql.py` stops a real server.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fakeredis
import orjson
import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from prompts.profiles import load_profiles
from tests.servers import free_port
from tools import ToolContext, run
from tools.conversation import ConversationLog
from tools.db.engine import make_engine, make_sessionmaker, migrate
from tools.db.models import Call, Lead
from tools.records import CallRecord
from tools.spool import (
    CALL,
    LEAD,
    SPOOL_KEY,
    Spool,
    call_record_from_payload,
    call_record_payload,
    is_store_outage,
    store_replayers,
)

TENANT = "acme-plumbing"
CALLER = "+15005550199"
PROFILES = load_profiles(None)
LEAD_ARGS = {
    "name": "Jamie Rivera",
    "job_type": "leaking kitchen sink",
    "address": "12 Elm Street",
    "urgency": "urgent",
    "callback_number": "555 555 0142",
}


@pytest.fixture
async def db(sqlite_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    await migrate(sqlite_url)
    engine = make_engine(sqlite_url)
    try:
        yield make_sessionmaker(engine)
    finally:
        await engine.dispose()


@pytest.fixture
async def down_db() -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """A PostgreSQL URL nobody answers: every session fails to connect."""
    engine = make_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/none")
    try:
        yield make_sessionmaker(engine)
    finally:
        await engine.dispose()


@pytest.fixture
def kv() -> fakeredis.FakeAsyncRedis:
    return fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(), decode_responses=True)


def call_record(call_sid: str = "CA" + "1" * 32, status: str = "caller hung up") -> CallRecord:
    return CallRecord(
        call_sid=call_sid,
        tenant=TENANT,
        from_number=CALLER,
        to_number="+15005550006",
        persona="dispatcher",
        started_at=datetime(2026, 1, 2, 10, 0, tzinfo=UTC),
        ended_at=datetime(2026, 1, 2, 10, 3, tzinfo=UTC),
        status=status,
        transcript=[{"role": "caller", "text": "hello", "at": 1.0, "item": "i1"}],
        tool_calls=[{"name": "capture_lead", "status": "executed"}],
        usage={"total_tokens": 42},
    )


def context(db: async_sessionmaker[AsyncSession], kv: Any, spool: Spool | None) -> ToolContext:
    profile = PROFILES.by_id(TENANT)
    assert profile is not None
    return ToolContext(
        tenant=TENANT,
        profile=profile,
        channel="voice",
        conversation_id="CA" + "2" * 32,
        caller=CALLER,
        persona="dispatcher",
        db=db,
        kv=kv,
        conversation=ConversationLog(kv, "CA" + "2" * 32),
        transcript_wait_s=0.2,
        extra={SPOOL_KEY: spool} if spool is not None else {},
    )


async def count(db: async_sessionmaker[AsyncSession], model: type) -> int:
    async with db() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


# -- the files --------------------------------------------------------------------------------


async def test_put_writes_one_whole_file_per_record_in_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    assert len(spool) == 0 and spool.entries() == []  # no directory yet: nothing spooled
    first = await spool.put(CALL, {"n": 1})
    second = await spool.put(LEAD, {"n": 2})
    assert [p.stem for p in spool.entries()] == [first, second]
    assert orjson.loads(spool.entries()[0].read_bytes()) == {"kind": CALL, "payload": {"n": 1}}
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []  # nothing left half-written


def test_call_records_survive_the_round_trip_through_json() -> None:
    record = call_record()
    payload = orjson.loads(orjson.dumps(call_record_payload(record)))
    assert call_record_from_payload(payload) == record


def test_what_counts_as_an_outage() -> None:
    assert is_store_outage(ConnectionRefusedError(111, "refused"))
    assert is_store_outage(TimeoutError())
    assert is_store_outage(OperationalError("SELECT 1", {}, Exception("server closed")))
    wrapped = RuntimeError("while saving")
    wrapped.__cause__ = ConnectionResetError()
    assert is_store_outage(wrapped)
    assert not is_store_outage(IntegrityError("INSERT", {}, Exception("duplicate key")))
    assert not is_store_outage(ValueError("bad data"))


# -- replay ------------------------------------------------------------------------------------


async def test_replay_writes_records_once_even_when_replayed_twice(
    tmp_path: Path, db: async_sessionmaker[AsyncSession], kv: Any
) -> None:
    spool = Spool(tmp_path / "spool")
    replayers = store_replayers(db, kv, PROFILES.by_id)
    record = call_record()
    await spool.put(CALL, call_record_payload(record))
    lead_payload = {
        "tenant": TENANT,
        "conversation_id": "CA" + "2" * 32,
        "channel": "voice",
        "caller": CALLER,
        "persona": "dispatcher",
        "arguments": {**LEAD_ARGS, "callback_number": "+15555550142"},
    }
    await spool.put(LEAD, lead_payload)
    # A crash between the commit and the delete replays the same files again.
    copies = [(p.name, p.read_bytes()) for p in spool.entries()]

    report = await spool.replay(replayers)
    assert (report.written, report.failed, report.remaining) == (2, 0, 0)
    for name, data in copies:
        (tmp_path / "spool" / name).write_bytes(data)
    again = await spool.replay(replayers)

    assert again.written == 2 and len(spool) == 0
    assert await count(db, Call) == 1
    assert await count(db, Lead) == 1
    async with db() as session:
        call = await session.scalar(select(Call))
        lead = await session.scalar(select(Lead))
    assert call is not None and call.transcript == record.transcript
    assert call.usage["total_tokens"] == 42
    assert lead is not None and (lead.name, lead.phone, lead.source) == (
        "Jamie Rivera",
        "+15555550142",
        "voice",
    )


async def test_replay_stops_at_an_outage_and_keeps_everything(
    tmp_path: Path, down_db: async_sessionmaker[AsyncSession], kv: Any
) -> None:
    spool = Spool(tmp_path / "spool")
    await spool.put(CALL, call_record_payload(call_record("CA" + "3" * 32)))
    await spool.put(CALL, call_record_payload(call_record("CA" + "4" * 32)))
    report = await spool.replay(store_replayers(down_db, kv, PROFILES.by_id))
    assert report.outage and report.remaining == 2 and report.written == 0
    assert len(spool) == 2


async def test_a_record_the_store_refuses_is_kept_aside_not_retried_forever(
    tmp_path: Path, db: async_sessionmaker[AsyncSession], kv: Any
) -> None:
    spool = Spool(tmp_path / "spool")
    events: list[tuple[str, str]] = []
    spool.observers.append(lambda event, kind: events.append((event, kind)))
    await spool.put(LEAD, {"tenant": TENANT, "conversation_id": "c", "arguments": {"name": ""}})
    await spool.put("mystery", {"x": 1})
    (spool.directory / "0-garbage-x.json").write_bytes(b"{not json")
    await spool.put(CALL, call_record_payload(call_record()))

    report = await spool.replay(store_replayers(db, kv, PROFILES.by_id))

    assert (report.written, report.failed) == (1, 3)
    assert len(spool) == 0
    kept = sorted(p.name for p in spool.failed_directory.iterdir() if p.suffix == ".json")
    assert len(kept) == 3
    assert len(list(spool.failed_directory.glob("*.error.txt"))) == 3
    assert await count(db, Call) == 1
    assert events.count(("replayed", CALL)) == 1
    assert sum(1 for event, _ in events if event == "failed") == 3


# -- capture_lead while the database is down ------------------------------------------------------


async def test_a_confirmed_lead_is_spooled_when_the_database_is_down(
    tmp_path: Path,
    db: async_sessionmaker[AsyncSession],
    down_db: async_sessionmaker[AsyncSession],
    kv: Any,
) -> None:
    spool = Spool(tmp_path / "spool")
    ctx = context(down_db, kv, spool)
    proposed = await run("capture_lead", LEAD_ARGS, ctx)
    assert proposed["status"] == "confirmation_required"
    await ctx.conversation.caller_texted("Yes please")
    done = await run("confirm_action", {"confirmation_id": proposed["confirmation_id"]}, ctx)

    assert done["status"] == "executed", done
    result = done["result"]
    assert result["saved"] == "queued" and result["lead"]["id"] is None
    assert result["lead"]["reference"]
    assert len(spool) == 1

    # The store is back: the flusher's replay writes it, once.
    report = await spool.replay(store_replayers(db, kv, PROFILES.by_id))
    assert report.written == 1
    async with db() as session:
        (lead,) = (await session.execute(select(Lead))).scalars().all()
    assert (lead.name, lead.job_type, lead.conversation_id) == (
        "Jamie Rivera",
        "leaking kitchen sink",
        ctx.conversation_id,
    )


async def test_without_a_spool_the_lead_failure_is_reported(
    down_db: async_sessionmaker[AsyncSession], kv: Any
) -> None:
    ctx = context(down_db, kv, None)
    proposed = await run("capture_lead", LEAD_ARGS, ctx)
    await ctx.conversation.caller_texted("Yes please")
    done = await run("confirm_action", {"confirmation_id": proposed["confirmation_id"]}, ctx)
    assert done["status"] == "error" and done["error"] == "tool_failed"


async def test_spool_files_are_fsynced_and_renamed_into_place(tmp_path: Path, monkeypatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    spool = Spool(tmp_path / "spool")
    await spool.put(CALL, {"n": 1})
    assert len(synced) >= 2  # the file, then its directory entry


# -- the operator's view: `switchboard spool` ---------------------------------------------------


def test_the_spool_command_lists_and_replays(tmp_path: Path, monkeypatch) -> None:
    import asyncio

    from typer.testing import CliRunner

    from app.cli import cli
    from app.settings import get_settings

    url = f"sqlite+aiosqlite:///{tmp_path}/cli.db"
    asyncio.run(migrate(url))
    spool_dir = tmp_path / "spool"
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("SPOOL_DIR", str(spool_dir))
    get_settings.cache_clear()
    spool = Spool(spool_dir)
    asyncio.run(spool.put(CALL, call_record_payload(call_record())))
    runner = CliRunner()
    try:
        listed = runner.invoke(cli, ["spool"])
        replayed = runner.invoke(cli, ["spool", "--replay"])
        empty = runner.invoke(cli, ["spool"])
    finally:
        get_settings.cache_clear()

    assert listed.exit_code == 0 and "call" in listed.output and "waiting" in listed.output
    assert replayed.exit_code == 0 and "written: 1" in replayed.output
    assert "is empty" in empty.output

    async def stored() -> int:
        engine = make_engine(url)
        try:
            return await count(make_sessionmaker(engine), Call)
        finally:
            await engine.dispose()

    assert asyncio.run(stored()) == 1
