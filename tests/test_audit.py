"""The audit trail, on SQLite and PostgreSQL: rows as written, and one for every tool outcome."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import fakeredis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.test_runner import CALLER, TENANT, make_ctx, propose, say
from tools import audit, run
from tools.db.models import AuditLog

Db = async_sessionmaker[AsyncSession]


async def test_record_writes_every_column(db: Db) -> None:
    before = datetime.now(UTC)
    await audit.record(
        db,
        tenant=TENANT,
        channel="sms",
        conversation_id="sms:acme:+15551230001",
        caller=CALLER,
        tool="create_booking",
        arguments={"day": "2030-01-02", "budget": Decimal("1500.50")},
        outcome="executed",
        detail={"reply": "yes", "at": datetime(2030, 1, 2, tzinfo=UTC)},
        latency_ms=12.5,
        confirmation_id="cf_abc",
    )
    [row] = await audit.history(db, TENANT)
    assert isinstance(row, AuditLog)
    assert row.tenant == TENANT
    assert before <= row.at <= datetime.now(UTC)
    assert (row.channel, row.conversation_id, row.caller) == (
        "sms",
        "sms:acme:+15551230001",
        CALLER,
    )
    assert (row.tool, row.outcome, row.latency_ms, row.confirmation_id) == (
        "create_booking",
        "executed",
        12.5,
        "cf_abc",
    )
    # Values JSON cannot hold are stored in their JSON form, not refused.
    assert row.arguments == {"day": "2030-01-02", "budget": "1500.50"}
    assert row.detail == {"reply": "yes", "at": "2030-01-02T00:00:00Z"}


async def test_history_is_per_tenant_and_filterable(db: Db) -> None:
    common = {"channel": "voice", "caller": CALLER, "arguments": {}, "detail": {}}
    await audit.record(
        db, tenant="acme", conversation_id="CA1", tool="t", outcome="ok", latency_ms=1, **common
    )
    await audit.record(
        db,
        tenant="acme",
        conversation_id="CA2",
        tool="t",
        outcome="proposed",
        latency_ms=1,
        confirmation_id="cf_1",
        **common,
    )
    await audit.record(
        db, tenant="globex", conversation_id="CA1", tool="t", outcome="ok", latency_ms=1, **common
    )
    assert [r.conversation_id for r in await audit.history(db, "acme")] == ["CA1", "CA2"]
    assert [r.tenant for r in await audit.history(db, "globex")] == ["globex"]
    assert [r.outcome for r in await audit.history(db, "acme", conversation_id="CA2")] == [
        "proposed"
    ]
    assert [r.outcome for r in await audit.history(db, "acme", confirmation_id="cf_1")] == [
        "proposed"
    ]


async def test_oversized_and_unparsed_values_are_kept_within_bounds(db: Db) -> None:
    await audit.record(
        db,
        tenant=TENANT,
        channel="voice",
        conversation_id="C" * 500,
        caller="+1" * 100,
        tool="t" * 1000,
        arguments='{"not": valid json' + "x" * 10_000,
        outcome="invalid_arguments",
        detail={},
        latency_ms=0.1,
    )
    [row] = await audit.history(db, TENANT)
    assert row.tool == "t" * 64
    assert len(row.conversation_id) == 128 and len(row.caller or "") == 64
    assert row.arguments["raw"].startswith('{"not": valid json')
    assert len(row.arguments["raw"]) == audit.MAX_RAW_CHARS


async def test_every_outcome_leaves_a_row(db: Db) -> None:
    kv = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(), decode_responses=True)
    ctx = make_ctx(kv, db, conversation_id="CA-audit", tool_timeout_s=0.3)
    expired_ctx = make_ctx(kv, db, conversation_id="CA-audit", confirmation_ttl_s=0)

    await run("runner_test_lookup", {"callback_number": "+15551230002", "name": "A"}, ctx)
    await run("no_such_tool", "{}", ctx)
    await run("runner_test_lookup", "{oops", ctx)
    await run("runner_test_boom", "{}", ctx)
    await run("runner_test_slow", "{}", ctx)
    booked = await propose(ctx, ref=1)
    await say(ctx, "wait")
    await run("confirm_action", {"confirmation_id": booked}, ctx)
    await say(ctx, "yes")
    await run("confirm_action", {"confirmation_id": booked}, ctx)
    dropped = await propose(ctx, ref=2)
    await run("cancel_action", {"confirmation_id": dropped}, ctx)
    stale = await propose(expired_ctx, ref=3)
    await run("confirm_action", {"confirmation_id": stale}, ctx)
    await kv.aclose()

    rows = await audit.history(db, TENANT, conversation_id="CA-audit")
    assert [(r.tool, r.outcome) for r in rows] == [
        ("runner_test_lookup", "ok"),
        ("no_such_tool", "unknown_tool"),
        ("runner_test_lookup", "invalid_arguments"),
        ("runner_test_boom", "failed"),
        ("runner_test_slow", "timeout"),
        ("runner_test_book", "proposed"),
        ("runner_test_book", "rejected"),
        ("runner_test_book", "executed"),
        ("runner_test_book", "proposed"),
        ("runner_test_book", "cancelled"),
        ("runner_test_book", "proposed"),
        ("runner_test_book", "expired"),
    ]
    for row in rows:
        assert (row.tenant, row.channel, row.caller) == (TENANT, "voice", CALLER)
        assert row.latency_ms is not None and row.latency_ms >= 0
    by_outcome = {r.outcome: r for r in rows}
    assert by_outcome["rejected"].detail["reply"] == "wait"
    assert by_outcome["rejected"].detail["verdict"] == "hesitant"
    assert by_outcome["executed"].confirmation_id == booked
    assert by_outcome["executed"].arguments == {"ref": 1, "note": None}
    assert by_outcome["cancelled"].confirmation_id == dropped
    assert by_outcome["expired"].confirmation_id == stale
    assert by_outcome["invalid_arguments"].detail["errors"][0]["field"] is None


async def test_audit_rows_are_confined_to_their_tenant(db: Db) -> None:
    kv = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(), decode_responses=True)
    acme = make_ctx(kv, db, conversation_id="CA-x")
    globex = make_ctx(kv, db, conversation_id="CA-x", tenant="globex")
    await run("runner_test_lookup", {"callback_number": "+15551230002", "name": "A"}, acme)
    await run("runner_test_lookup", {"callback_number": "+15551230002", "name": "G"}, globex)
    await kv.aclose()
    assert [r.arguments["name"] for r in await audit.history(db, TENANT)] == ["A"]
    assert [r.arguments["name"] for r in await audit.history(db, "globex")] == ["G"]
