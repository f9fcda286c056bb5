"""The CRM store: migrations, schema parity with the models, portable types, call records."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, func, inspect, select
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tools.db.engine import async_url, downgrade, make_engine, make_sessionmaker, migrate
from tools.db.models import Base, Booking, Call, CallEvent, Contact, Lead, Message, Opportunity
from tools.db.tenancy import tenant_session
from tools.records import (
    CallRecord,
    record_call_status,
    record_message_status,
    save_call,
    save_message,
)


def _schema_diff(connection: Connection) -> list[object]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return compare_metadata(context, Base.metadata)


async def test_migrations_build_exactly_the_models(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        async with engine.connect() as connection:
            diff = await connection.run_sync(_schema_diff)
            tables = await connection.run_sync(lambda c: set(inspect(c).get_table_names()))
    finally:
        await engine.dispose()
    assert diff == []
    assert set(Base.metadata.tables) <= tables
    assert "alembic_version" in tables


async def test_migrate_twice_is_a_no_op(db_url: str) -> None:
    await migrate(db_url)
    engine = make_engine(db_url)
    try:
        async with engine.connect() as connection:
            assert await connection.run_sync(_schema_diff) == []
    finally:
        await engine.dispose()


async def test_downgrade_to_base_removes_everything(db_url: str) -> None:
    await downgrade(db_url)
    engine = make_engine(db_url)
    try:
        async with engine.connect() as connection:
            tables = await connection.run_sync(lambda c: set(inspect(c).get_table_names()))
    finally:
        await engine.dispose()
    assert not set(Base.metadata.tables) & tables


def test_async_url_fills_in_the_driver() -> None:
    assert async_url("sqlite:///x.db") == "sqlite+aiosqlite:///x.db"
    assert async_url("postgres://u:p@h/d") == "postgresql+asyncpg://u:p@h/d"
    assert async_url("postgresql+psycopg://u@h/d") == "postgresql+asyncpg://u@h/d"
    with pytest.raises(ValueError, match="unsupported"):
        async_url("mysql://u@h/d")


async def test_timestamps_come_back_aware_utc(db: async_sessionmaker[AsyncSession]) -> None:
    local = datetime(2030, 5, 6, 9, 30, tzinfo=timezone(timedelta(hours=-4)))
    async with tenant_session(db, "t1") as session:
        booking = Booking(
            customer_name="Ann", service="cleaning", starts_at=local, ends_at=local + timedelta(1)
        )
        session.add(booking)
        await session.commit()
        booking_id = booking.id
    async with tenant_session(db, "t1") as session:
        loaded = await session.get(Booking, booking_id)
        assert loaded is not None
        assert loaded.starts_at == local
        assert loaded.starts_at.tzinfo is not None
        assert loaded.starts_at.utcoffset() == timedelta(0)
        assert loaded.starts_at.hour == 13
        # Range queries compare instants, not wall-clock text.
        hits = await session.scalars(
            select(Booking.id).where(Booking.starts_at >= datetime(2030, 5, 6, 13, tzinfo=UTC))
        )
        assert list(hits) == [booking_id]


async def test_naive_datetimes_are_refused(db: async_sessionmaker[AsyncSession]) -> None:
    async with tenant_session(db, "t1") as session:
        naive = datetime(2030, 1, 1, 9)
        session.add(Booking(customer_name="A", service="x", starts_at=naive, ends_at=naive))
        with pytest.raises(StatementError, match="naive datetime"):
            await session.flush()


async def test_vocabularies_are_enforced(db: async_sessionmaker[AsyncSession]) -> None:
    async with tenant_session(db, "t1") as session:
        session.add(Lead(name="A", status="archived"))
        with pytest.raises(StatementError):
            await session.flush()


async def test_check_constraints_hold(db: async_sessionmaker[AsyncSession]) -> None:
    async with tenant_session(db, "t1") as session:
        session.add(Lead(name="A", score=101))
        with pytest.raises(IntegrityError):
            await session.flush()


async def test_foreign_keys_are_enforced(db_url: str) -> None:
    # The tenant guard would refuse this first; a plain session shows the database does too.
    engine = make_engine(db_url)
    try:
        async with make_sessionmaker(engine)() as session:
            session.add(Contact(tenant="t1", name="X", company_id=424242))
            with pytest.raises(IntegrityError):
                await session.flush()
    finally:
        await engine.dispose()


async def test_money_and_json_round_trip(db: async_sessionmaker[AsyncSession]) -> None:
    async with tenant_session(db, "t1") as session:
        opp = Opportunity(title="Kitchen", value=Decimal("12345.67"))
        lead = Lead(name="B", photos=["https://x/1.jpg"])
        session.add_all([opp, lead])
        await session.commit()
        ids = opp.id, lead.id
    async with tenant_session(db, "t1") as session:
        loaded = await session.get(Opportunity, ids[0])
        assert loaded is not None and loaded.value == Decimal("12345.67")
        assert loaded.stage == "new-lead"
        lead_loaded = await session.get(Lead, ids[1])
        assert lead_loaded is not None and lead_loaded.photos == ["https://x/1.jpg"]


# -- records -------------------------------------------------------------------------------


def _record(**overrides: object) -> CallRecord:
    values: dict[str, object] = {
        "call_sid": "CA" + "1" * 32,
        "tenant": "t1",
        "from_number": "+15550001111",
        "to_number": "+15005550006",
        "persona": "dispatcher",
        "started_at": datetime(2030, 1, 1, 15, tzinfo=UTC),
        "ended_at": datetime(2030, 1, 1, 15, 3, 30, tzinfo=UTC),
        "status": "completed",
        "transcript": [{"role": "user", "text": "hi", "at": "2030-01-01T15:00:01Z"}],
        "tool_calls": [{"name": "capture_lead", "outcome": "executed"}],
        "usage": {"input_tokens": 10},
    }
    values.update(overrides)
    return CallRecord(**values)  # type: ignore[arg-type]


async def test_save_call_upserts_by_tenant_and_sid(db: async_sessionmaker[AsyncSession]) -> None:
    await save_call(db, _record(status="in-progress", ended_at=None, transcript=[]))
    await save_call(db, _record())
    await save_call(db, _record(tenant="t2", persona="receptionist"))
    async with tenant_session(db, "t1") as session:
        calls = list(await session.scalars(select(Call)))
    assert len(calls) == 1
    call = calls[0]
    assert call.status == "completed"
    assert call.duration_s == 210.0
    assert call.transcript[0]["text"] == "hi"
    assert call.tool_calls[0]["name"] == "capture_lead"
    assert call.usage == {"input_tokens": 10}
    async with tenant_session(db, "t2") as session:
        other = list(await session.scalars(select(Call)))
    assert [c.persona for c in other] == ["receptionist"]


def _status_form(status: str, seq: str, **extra: str) -> dict[str, str]:
    return {
        "CallSid": "CA" + "1" * 32,
        "CallStatus": status,
        "SequenceNumber": seq,
        "To": "+15005550006",
        "From": "+15550001111",
        **extra,
    }


async def test_status_callbacks_are_idempotent(db: async_sessionmaker[AsyncSession]) -> None:
    await save_call(db, _record(status="in-progress", ended_at=None))
    assert await record_call_status(db, "t1", _status_form("ringing", "0")) is True
    assert await record_call_status(db, "t1", _status_form("ringing", "0")) is False
    done = _status_form("completed", "2", CallDuration="42")
    assert await record_call_status(db, "t1", done) is True
    # A late, out-of-order progress event must not undo the terminal status.
    assert await record_call_status(db, "t1", _status_form("in-progress", "1")) is True
    assert await record_call_status(db, "t1", done) is False
    async with tenant_session(db, "t1") as session:
        events = list(await session.scalars(select(CallEvent).order_by(CallEvent.sequence_number)))
        call = (await session.scalars(select(Call))).one()
    assert [(e.status, e.sequence_number) for e in events] == [
        ("ringing", 0),
        ("in-progress", 1),
        ("completed", 2),
    ]
    assert events[2].raw["CallDuration"] == "42"
    assert call.status == "completed"
    assert call.duration_s == 42.0


async def test_status_callback_without_tenant_is_kept(db: async_sessionmaker[AsyncSession]) -> None:
    form = _status_form("completed", "0")
    assert await record_call_status(db, None, form) is True
    assert await record_call_status(db, None, form) is False
    async with tenant_session(db, "t1") as session:
        assert list(await session.scalars(select(CallEvent))) == []
    async with db() as session:
        count = await session.scalar(select(func.count()).select_from(CallEvent))
    assert count == 1


async def test_malformed_status_callbacks_are_rejected(
    db: async_sessionmaker[AsyncSession],
) -> None:
    with pytest.raises(ValueError, match="CallSid"):
        await record_call_status(db, "t1", {"CallStatus": "completed"})
    # A garbage sequence number is treated as absent rather than crashing the webhook.
    form = _status_form("ringing", "not-a-number")
    assert await record_call_status(db, "t1", form) is True
    assert await record_call_status(db, "t1", form) is False


async def test_save_message_dedupes_by_sid_and_updates_status(
    db: async_sessionmaker[AsyncSession],
) -> None:
    first = await save_message(
        db,
        "t1",
        direction="inbound",
        from_number="+15550001111",
        to_number="+15005550006",
        body="my sink is leaking",
        message_sid="SM" + "a" * 32,
        status="received",
        media=[{"url": "https://x/y.jpg", "content_type": "image/jpeg"}],
    )
    again = await save_message(
        db,
        "t1",
        direction="inbound",
        from_number="+15550001111",
        to_number="+15005550006",
        body="my sink is leaking",
        message_sid="SM" + "a" * 32,
        status="received",
    )
    assert first is True and again is False
    async with tenant_session(db, "t1") as session:
        rows = list(await session.scalars(select(Message)))
    assert len(rows) == 1
    assert rows[0].conversation_id == "sms:t1:+15550001111"
    assert rows[0].media[0]["content_type"] == "image/jpeg"


async def test_status_callback_before_the_bridge_saves_the_call(
    db: async_sessionmaker[AsyncSession],
) -> None:
    done = _status_form("completed", "3", CallDuration="95", Direction="outbound-api")
    done["Timestamp"] = "Tue, 01 Jan 2030 15:05:00 +0000"
    assert await record_call_status(db, "t1", done) is True
    # The bridge's own record arrives later; it fills in the conversation but the terminal
    # status and Twilio's billed duration stay.
    await save_call(db, _record(status="in-progress"))
    async with tenant_session(db, "t1") as session:
        call = (await session.scalars(select(Call))).one()
    assert call.direction == "inbound"  # the bridge knows best what it answered
    assert call.status == "completed"
    assert call.duration_s == 95.0
    assert call.ended_at == datetime(2030, 1, 1, 15, 3, 30, tzinfo=UTC)
    assert call.transcript[0]["text"] == "hi"


async def test_message_status_moves_forward_only(db: async_sessionmaker[AsyncSession]) -> None:
    sid = "SM" + "b" * 32
    await save_message(
        db,
        "t1",
        direction="outbound",
        from_number="+15005550006",
        to_number="+15550001111",
        body="Your link",
        message_sid=sid,
        status="queued",
        reason="photo_link",
    )
    form = {"MessageSid": sid, "MessageStatus": "delivered"}
    assert await record_message_status(db, "t1", form) is True
    assert await record_message_status(db, "t1", {**form, "MessageStatus": "sent"}) is False
    assert await record_message_status(db, "t2", form) is False  # another tenant's message
    unknown = {"MessageSid": "SM" + "c" * 32, "MessageStatus": "failed", "ErrorCode": "30003"}
    assert await record_message_status(db, None, unknown) is False
    async with tenant_session(db, "t1") as session:
        message = (await session.scalars(select(Message))).one()
    assert (message.status, message.conversation_id) == ("delivered", "sms:t1:+15550001111")
