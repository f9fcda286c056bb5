"""tools.run: validation, containment, timeouts, and the confirmation protocol end to end.

Runs against fakeredis and a real redis-server (`kv`) and a migrated SQLite file (audit rows).
The tools are registered here, for persona "test", so the catalogue is not needed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import fakeredis
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from prompts.profiles import BusinessProfile
from tools import ToolContext, audit, run
from tools.conversation import ConversationLog
from tools.db.engine import make_engine, make_sessionmaker, migrate
from tools.pending import PendingStore
from tools.registry import tool

PERSONA = "test"
TENANT = "acme"
CALLER = "+15551230001"
PROFILE = BusinessProfile(id=TENANT, name="Acme Plumbing", numbers=["+15550000000"])
Db = async_sessionmaker[AsyncSession]


# --- tools for these tests ---------------------------------------------------------------------


class Window(BaseModel):
    days: int = Field(ge=1, le=30)


class LookupArgs(BaseModel):
    callback_number: str = Field(pattern=r"^\+[1-9][0-9]{6,14}$")
    name: str
    window: Window = Window(days=7)


class RefArgs(BaseModel):
    ref: int = Field(ge=1)
    note: str | None = None


class NoArgs(BaseModel):
    pass


def executed_key(ref: int) -> str:
    return f"runner-test:executed:{ref}"


async def _book(args: RefArgs, ctx: ToolContext) -> dict[str, Any]:
    await ctx.kv.incr(executed_key(args.ref))
    await ctx.kv.rpush("runner-test:notes", args.note or "")
    return {"booked": args.ref, "at": datetime(2030, 1, 2, 15, tzinfo=UTC)}


@tool("runner_test_lookup", args=LookupArgs, risk="read", personas={PERSONA, "test_reader"})
async def runner_test_lookup(args: LookupArgs, ctx: ToolContext) -> dict[str, Any]:
    """Look someone up."""
    return {
        "found": args.name,
        "window": args.window.days,
        "since": datetime(2030, 1, 1, tzinfo=UTC),
    }


@tool(
    "runner_test_book",
    args=RefArgs,
    risk="medium",
    personas={PERSONA},
    summary=lambda a: f"I'll book job {a.ref} for you.",
)
async def runner_test_book(args: RefArgs, ctx: ToolContext) -> dict[str, Any]:
    """Book a job."""
    return await _book(args, ctx)


@tool(
    "runner_test_wipe",
    args=RefArgs,
    risk="high",
    personas={PERSONA},
    summary=lambda a: f"I'll permanently wipe record {a.ref}.",
)
async def runner_test_wipe(args: RefArgs, ctx: ToolContext) -> dict[str, Any]:
    """Wipe a record."""
    return await _book(args, ctx)


@tool("runner_test_broken_write", args=RefArgs, risk="low", personas={PERSONA})
async def runner_test_broken_write(args: RefArgs, ctx: ToolContext) -> dict[str, Any]:
    """A write whose handler fails."""
    raise RuntimeError("database password is hunter2")


@tool("runner_test_slow_write", args=RefArgs, risk="low", personas={PERSONA})
async def runner_test_slow_write(args: RefArgs, ctx: ToolContext) -> dict[str, Any]:
    """A write that hangs once confirmed."""
    await ctx.kv.incr("runner-test:slow-write-started")
    await asyncio.sleep(3600)
    return {}


@tool("runner_test_slow", args=NoArgs, risk="read", personas={PERSONA})
async def runner_test_slow(args: NoArgs, ctx: ToolContext) -> dict[str, Any]:
    """Takes forever."""
    await asyncio.sleep(3600)
    return {}


@tool("runner_test_boom", args=NoArgs, risk="read", personas={PERSONA})
async def runner_test_boom(args: NoArgs, ctx: ToolContext) -> dict[str, Any]:
    """Always fails."""
    raise ValueError("internal detail: SELECT * FROM secrets")


@tool("runner_test_odd", args=NoArgs, risk="read", personas={PERSONA})
async def runner_test_odd(args: NoArgs, ctx: ToolContext) -> dict[str, Any]:
    """Returns the wrong type."""
    return ["not", "a", "dict"]  # type: ignore[return-value]


@tool(
    "runner_test_hang_up",
    args=NoArgs,
    risk="low",
    personas={PERSONA},
    conversation_control=True,
)
async def runner_test_hang_up(args: NoArgs, ctx: ToolContext) -> dict[str, Any]:
    """End the call."""
    await ctx.kv.incr("runner-test:hung-up")
    return {"status": "ending"}


# --- helpers -----------------------------------------------------------------------------------


def make_ctx(
    kv: Redis,
    db: Db,
    *,
    conversation_id: str = "CA-runner",
    caller: str = CALLER,
    tenant: str = TENANT,
    channel: Literal["voice", "sms"] = "voice",
    persona: str = PERSONA,
    **overrides: Any,
) -> ToolContext:
    return ToolContext(
        tenant=tenant,
        profile=PROFILE,
        channel=channel,
        conversation_id=conversation_id,
        caller=caller,
        persona=persona,
        db=db,
        kv=kv,
        conversation=ConversationLog(kv, conversation_id),
        **overrides,
    )


async def say(ctx: ToolContext, text: str) -> None:
    """The caller says (on a call) or texts (by SMS) `text`."""
    if ctx.channel == "sms":
        await ctx.conversation.caller_texted(text)
    else:
        item = f"item_{uuid.uuid4().hex}"
        await ctx.conversation.caller_audio_committed(item)
        await ctx.conversation.caller_transcribed(item, text)


async def executions(kv: Redis, ref: int) -> int:
    return int(await kv.get(executed_key(ref)) or 0)


async def outcomes(db: Db, ctx: ToolContext) -> list[str]:
    rows = await audit.history(db, ctx.tenant, conversation_id=ctx.conversation_id)
    return [row.outcome for row in rows]


@pytest.fixture
async def db(sqlite_url: str) -> AsyncIterator[Db]:
    """Audit rows go to SQLite here; test_audit.py runs them against PostgreSQL too."""
    await migrate(sqlite_url)
    engine = make_engine(sqlite_url)
    try:
        yield make_sessionmaker(engine)
    finally:
        await engine.dispose()


@pytest.fixture
def ctx(kv: Redis, db: Db) -> ToolContext:
    return make_ctx(kv, db)


# --- running tools at once ---------------------------------------------------------------------


async def test_read_tool_runs_at_once(ctx: ToolContext, db: Db) -> None:
    result = await run(
        "runner_test_lookup", '{"callback_number": "+15551230002", "name": "Ann"}', ctx
    )
    assert result == {"found": "Ann", "window": 7, "since": "2030-01-01T00:00:00Z"}
    assert await outcomes(db, ctx) == ["ok"]
    [row] = await audit.history(db, TENANT)
    assert row.tool == "runner_test_lookup"
    assert row.arguments == {
        "callback_number": "+15551230002",
        "name": "Ann",
        "window": {"days": 7},
    }
    assert row.channel == "voice" and row.caller == CALLER and row.confirmation_id is None
    assert row.latency_ms is not None and row.latency_ms >= 0


async def test_arguments_may_come_as_a_dict(ctx: ToolContext) -> None:
    result = await run("runner_test_lookup", {"callback_number": "+15551230002", "name": "B"}, ctx)
    assert result["found"] == "B"


async def test_empty_arguments_mean_none(ctx: ToolContext) -> None:
    assert await run("runner_test_hang_up", "", ctx) == {"status": "ending"}


async def test_conversation_control_runs_without_confirmation(ctx: ToolContext, db: Db) -> None:
    assert await run("runner_test_hang_up", "{}", ctx) == {"status": "ending"}
    assert await ctx.kv.get("runner-test:hung-up") in ("1", b"1")
    assert await outcomes(db, ctx) == ["ok"]


@pytest.mark.parametrize("name", ["no_such_tool", "", "x" * 500, "runner_test_lookup "])
async def test_unknown_tool(ctx: ToolContext, db: Db, name: str) -> None:
    result = await run(name, "{}", ctx)
    assert result["status"] == "error"
    assert result["error"] == "unknown_tool"
    assert await outcomes(db, ctx) == ["unknown_tool"]


async def test_tool_of_another_persona_is_unknown(kv: Redis, db: Db) -> None:
    ctx = make_ctx(kv, db, persona="dispatcher")
    result = await run(
        "runner_test_lookup", '{"callback_number": "+15551230002", "name": "A"}', ctx
    )
    assert result["error"] == "unknown_tool"


async def test_confirm_action_needs_a_persona_with_writes(kv: Redis, db: Db) -> None:
    reader = make_ctx(kv, db, persona="test_reader")
    result = await run("confirm_action", '{"confirmation_id": "cf_0"}', reader)
    assert result["error"] == "unknown_tool"


# --- bad arguments -----------------------------------------------------------------------------


async def test_invalid_json_is_reported(ctx: ToolContext, db: Db) -> None:
    result = await run("runner_test_lookup", '{"callback_number": "+1555', ctx)
    assert result["status"] == "invalid_arguments"
    [error] = result["errors"]
    assert error["field"] is None
    assert "JSON" in error["message"]
    assert await outcomes(db, ctx) == ["invalid_arguments"]
    [row] = await audit.history(db, TENANT)
    assert row.arguments == {"raw": '{"callback_number": "+1555'}


@pytest.mark.parametrize("arguments", ["[1, 2]", '"text"', "null", "42"])
async def test_arguments_must_be_an_object(ctx: ToolContext, arguments: str) -> None:
    result = await run("runner_test_lookup", arguments, ctx)
    assert result["status"] == "invalid_arguments"
    assert result["errors"][0]["field"] is None


async def test_each_bad_field_is_named(ctx: ToolContext) -> None:
    result = await run(
        "runner_test_lookup", '{"callback_number": "555-1234", "window": {"days": 0}}', ctx
    )
    assert result["status"] == "invalid_arguments"
    by_field = {e["field"]: e["message"] for e in result["errors"]}
    assert set(by_field) == {"callback_number", "name", "window.days"}
    assert "pattern" in by_field["callback_number"]
    assert by_field["name"] == "Field required"
    assert "greater than or equal to 1" in by_field["window.days"]


async def test_write_with_bad_arguments_is_not_proposed(ctx: ToolContext, db: Db) -> None:
    result = await run("runner_test_book", '{"ref": "soon"}', ctx)
    assert result["status"] == "invalid_arguments"
    assert result["errors"][0]["field"] == "ref"
    assert await outcomes(db, ctx) == ["invalid_arguments"]


# --- failures are contained --------------------------------------------------------------------


async def test_handler_exception_is_contained_and_logged(
    ctx: ToolContext, db: Db, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="tools.runner"):
        result = await run("runner_test_boom", "{}", ctx)
    assert result["status"] == "error"
    assert result["error"] == "tool_failed"
    assert "SELECT" not in result["message"]  # nothing internal reaches the model
    [record] = [r for r in caplog.records if r.exc_info]
    assert record.exc_info is not None and isinstance(record.exc_info[1], ValueError)
    assert await outcomes(db, ctx) == ["failed"]


async def test_handler_returning_a_non_dict_is_a_failure(ctx: ToolContext) -> None:
    result = await run("runner_test_odd", "{}", ctx)
    assert result["error"] == "tool_failed"


async def test_slow_handler_times_out(kv: Redis, db: Db) -> None:
    ctx = make_ctx(kv, db, tool_timeout_s=0.2)
    result = await run("runner_test_slow", "{}", ctx)
    assert result["status"] == "error"
    assert result["error"] == "timeout"
    assert await outcomes(db, ctx) == ["timeout"]


async def test_cancellation_propagates_and_is_audited(ctx: ToolContext, db: Db) -> None:
    task = asyncio.create_task(run("runner_test_slow", "{}", ctx))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await outcomes(db, ctx) == ["interrupted"]


async def test_audit_failure_does_not_lose_the_result(
    kv: Redis, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path}/no-tables.db")  # never migrated
    try:
        ctx = make_ctx(kv, make_sessionmaker(engine))
        with caplog.at_level(logging.CRITICAL, logger="tools.runner"):
            proposal = await run("runner_test_book", '{"ref": 5}', ctx)
            await say(ctx, "yes")
            result = await run(
                "confirm_action", {"confirmation_id": proposal["confirmation_id"]}, ctx
            )
    finally:
        await engine.dispose()
    assert result["status"] == "executed"
    assert result["result"]["booked"] == 5
    assert await executions(kv, 5) == 1
    failures = [r for r in caplog.records if "AUDIT WRITE FAILED" in r.getMessage()]
    assert len(failures) == 2 and all(r.levelno == logging.CRITICAL for r in failures)


# --- proposing a write -------------------------------------------------------------------------


async def test_write_is_proposed_not_run(ctx: ToolContext, db: Db) -> None:
    result = await run("runner_test_book", '{"ref": 1, "note": "side door"}', ctx)
    assert result["status"] == "confirmation_required"
    assert result["summary"] == "I'll book job 1 for you."
    assert result["risk"] == "medium"
    assert result["instructions"].startswith(
        "Read the summary to the caller and ask them to confirm. "
        "Call confirm_action only after they agree."
    )
    assert await executions(ctx.kv, 1) == 0
    stored = await PendingStore(ctx.kv).load(result["confirmation_id"])
    assert stored is not None
    action = stored.action
    assert action.tool == "runner_test_book"
    assert action.arguments == {"ref": 1, "note": "side door"}
    assert (action.tenant, action.conversation_id, action.channel, action.caller) == (
        TENANT,
        "CA-runner",
        "voice",
        CALLER,
    )
    assert action.risk == "medium"
    assert action.expires_at == pytest.approx(action.created_at + ctx.confirmation_ttl_s)
    [row] = await audit.history(db, TENANT)
    assert (row.outcome, row.confirmation_id, row.tool) == (
        "proposed",
        action.id,
        "runner_test_book",
    )


async def test_high_risk_proposal_asks_for_an_explicit_yes(ctx: ToolContext) -> None:
    result = await run("runner_test_wipe", '{"ref": 1}', ctx)
    assert result["risk"] == "high"
    assert "explicit" in result["instructions"]


# --- confirming --------------------------------------------------------------------------------


async def propose(ctx: ToolContext, name: str = "runner_test_book", ref: int = 1) -> str:
    result = await run(name, {"ref": ref}, ctx)
    assert result["status"] == "confirmation_required", result
    return result["confirmation_id"]


async def confirm(ctx: ToolContext, confirmation_id: str, **extra: Any) -> dict[str, Any]:
    return await run("confirm_action", {"confirmation_id": confirmation_id, **extra}, ctx)


async def test_confirmed_write_runs_once_with_the_stored_arguments(
    ctx: ToolContext, db: Db
) -> None:
    cid = await propose(ctx, ref=7)
    await say(ctx, "Yes, please.")
    # The model cannot slip in other arguments: only the confirmation id is read.
    result = await confirm(ctx, cid, ref=8, note="hacked")
    assert result == {
        "status": "executed",
        "confirmation_id": cid,
        "result": {"booked": 7, "at": "2030-01-02T15:00:00Z"},
    }
    assert await executions(ctx.kv, 7) == 1
    assert await executions(ctx.kv, 8) == 0
    again = await confirm(ctx, cid)
    assert again["status"] == "rejected" and again["reason"] == "already_executed"
    assert await executions(ctx.kv, 7) == 1
    assert await outcomes(db, ctx) == ["proposed", "executed", "rejected"]
    executed = (await audit.history(db, TENANT, confirmation_id=cid))[1]
    assert executed.tool == "runner_test_book"
    assert executed.arguments == {"ref": 7, "note": None}
    assert executed.detail["reply"] == "Yes, please."
    assert executed.detail["result"] == {"booked": 7, "at": "2030-01-02T15:00:00Z"}


async def test_no_reply_is_no_confirmation(ctx: ToolContext, db: Db) -> None:
    cid = await propose(ctx)
    result = await confirm(ctx, cid)
    assert result["status"] == "rejected"
    assert result["reason"] == "not_affirmed"
    assert result["verdict"] == "no_reply"
    assert await executions(ctx.kv, 1) == 0
    assert await outcomes(db, ctx) == ["proposed", "rejected"]


async def test_a_yes_before_the_proposal_does_not_count(ctx: ToolContext) -> None:
    await say(ctx, "yes")
    cid = await propose(ctx)
    assert (await confirm(ctx, cid))["verdict"] == "no_reply"
    assert await executions(ctx.kv, 1) == 0


@pytest.mark.parametrize("reply", ["no", "wait", "not yet", "yes... actually no", "hmm", "thanks"])
async def test_anything_but_a_yes_is_rejected(ctx: ToolContext, reply: str) -> None:
    cid = await propose(ctx)
    await say(ctx, reply)
    result = await confirm(ctx, cid)
    assert result["status"] == "rejected" and result["reason"] == "not_affirmed"
    assert await executions(ctx.kv, 1) == 0


async def test_after_hesitating_a_yes_confirms(ctx: ToolContext) -> None:
    cid = await propose(ctx)
    await say(ctx, "wait, what was that?")
    assert (await confirm(ctx, cid))["verdict"] == "hesitant"
    await say(ctx, "ok, yes")
    assert (await confirm(ctx, cid))["status"] == "executed"


async def test_after_refusing_a_yes_does_not_revive_the_proposal(ctx: ToolContext) -> None:
    cid = await propose(ctx, ref=1)
    await say(ctx, "No, make it job 2.")
    cid2 = await propose(ctx, ref=2)
    await say(ctx, "Yes.")
    assert (await confirm(ctx, cid))["verdict"] == "refused_earlier"
    assert (await confirm(ctx, cid2))["status"] == "executed"
    assert (await executions(ctx.kv, 1), await executions(ctx.kv, 2)) == (0, 1)


async def test_high_risk_needs_an_explicit_yes(ctx: ToolContext) -> None:
    cid = await propose(ctx, "runner_test_wipe")
    await say(ctx, "yeah")
    result = await confirm(ctx, cid)
    assert (result["reason"], result["verdict"]) == ("not_affirmed", "not_explicit")
    await say(ctx, "Yes, wipe it.")
    assert (await confirm(ctx, cid))["status"] == "executed"
    assert await executions(ctx.kv, 1) == 1


async def test_the_wait_covers_a_transcript_still_on_its_way(ctx: ToolContext) -> None:
    cid = await propose(ctx)
    await ctx.conversation.caller_audio_committed("item_yes")

    async def transcript_arrives() -> None:
        await asyncio.sleep(0.2)
        await ctx.conversation.caller_transcribed("item_yes", "yes go ahead")

    arriving = asyncio.create_task(transcript_arrives())
    result = await confirm(ctx, cid)
    await arriving
    assert result["status"] == "executed"


async def test_untranscribed_words_block_confirmation(kv: Redis, db: Db) -> None:
    ctx = make_ctx(kv, db, transcript_wait_s=0.1)
    cid = await propose(ctx)
    await say(ctx, "yes")
    await ctx.conversation.caller_audio_committed("item_maybe_no")
    result = await confirm(ctx, cid)
    assert result["verdict"] == "untranscribed"
    assert await executions(kv, 1) == 0


async def test_unknown_confirmation(ctx: ToolContext, db: Db) -> None:
    result = await confirm(ctx, "cf_doesnotexist")
    assert (result["status"], result["reason"]) == ("rejected", "unknown_confirmation")
    [row] = await audit.history(db, TENANT)
    assert (row.tool, row.outcome, row.arguments) == (
        "confirm_action",
        "rejected",
        {"confirmation_id": "cf_doesnotexist"},
    )


async def test_malformed_confirmation_id_is_an_argument_error(ctx: ToolContext) -> None:
    result = await run("confirm_action", '{"confirmation_id": "a b\\nc"}', ctx)
    assert result["status"] == "invalid_arguments"
    assert result["errors"][0]["field"] == "confirmation_id"


async def test_expired_proposal_cannot_be_confirmed(kv: Redis, db: Db) -> None:
    ctx = make_ctx(kv, db, confirmation_ttl_s=0)
    cid = await propose(ctx)
    await say(ctx, "yes")
    result = await confirm(ctx, cid)
    assert (result["status"], result["reason"]) == ("rejected", "expired")
    assert await executions(kv, 1) == 0
    assert await outcomes(db, ctx) == ["proposed", "expired"]
    assert (await cancel(ctx, cid))["reason"] == "expired"


async def test_failed_execution_is_reported_and_not_retried(ctx: ToolContext, db: Db) -> None:
    cid = await propose(ctx, "runner_test_broken_write")
    await say(ctx, "yes")
    result = await confirm(ctx, cid)
    assert result["error"] == "tool_failed"
    assert "hunter2" not in str(result)
    again = await confirm(ctx, cid)
    assert again["reason"] == "previously_failed"
    assert await outcomes(db, ctx) == ["proposed", "failed", "rejected"]
    failed = (await audit.history(db, TENANT, confirmation_id=cid))[1]
    assert failed.tool == "runner_test_broken_write"


async def test_confirmed_write_times_out(kv: Redis, db: Db) -> None:
    ctx = make_ctx(kv, db, tool_timeout_s=0.2)
    cid = await propose(ctx, "runner_test_slow_write", ref=3)
    await say(ctx, "yes")
    result = await confirm(ctx, cid)
    assert result["error"] == "timeout"
    assert await kv.get("runner-test:slow-write-started") in ("1", b"1")
    assert await outcomes(db, ctx) == ["proposed", "timeout"]
    [_, row] = await audit.history(db, TENANT, confirmation_id=cid)
    assert row.tool == "runner_test_slow_write"
    assert (await confirm(ctx, cid))["reason"] == "previously_failed"


# --- cancelling --------------------------------------------------------------------------------


async def cancel(ctx: ToolContext, confirmation_id: str) -> dict[str, Any]:
    return await run("cancel_action", {"confirmation_id": confirmation_id}, ctx)


async def test_cancelled_action_never_runs(ctx: ToolContext, db: Db) -> None:
    cid = await propose(ctx)
    result = await cancel(ctx, cid)
    assert result == {
        "status": "cancelled",
        "confirmation_id": cid,
        "summary": "I'll book job 1 for you.",
    }
    await say(ctx, "yes")
    assert (await confirm(ctx, cid))["reason"] == "cancelled"
    assert (await cancel(ctx, cid))["reason"] == "cancelled"
    assert await executions(ctx.kv, 1) == 0
    assert await outcomes(db, ctx) == ["proposed", "cancelled", "rejected", "rejected"]


async def test_executed_action_cannot_be_cancelled(ctx: ToolContext) -> None:
    cid = await propose(ctx)
    await say(ctx, "yes")
    await confirm(ctx, cid)
    assert (await cancel(ctx, cid))["reason"] == "already_executed"


# --- whose proposal is it ----------------------------------------------------------------------


async def test_a_call_proposal_can_be_confirmed_by_text(kv: Redis, db: Db) -> None:
    call = make_ctx(kv, db, conversation_id="CA-call")
    sms = make_ctx(kv, db, conversation_id=f"sms:{TENANT}:{CALLER}", channel="sms")
    cid = await propose(call, ref=4)
    await say(sms, "Yes, go ahead")
    result = await confirm(sms, cid)
    assert result["status"] == "executed"
    assert await executions(kv, 4) == 1
    [row] = [r for r in await audit.history(db, TENANT) if r.outcome == "executed"]
    assert (row.channel, row.conversation_id) == ("sms", sms.conversation_id)
    assert row.detail["proposed_in"] == "CA-call"


async def test_a_refusal_on_the_call_stands_against_a_later_text(kv: Redis, db: Db) -> None:
    call = make_ctx(kv, db, conversation_id="CA-call")
    sms = make_ctx(kv, db, conversation_id=f"sms:{TENANT}:{CALLER}", channel="sms")
    cid = await propose(call)
    await say(call, "no, don't")
    await say(sms, "yes")
    assert (await confirm(sms, cid))["verdict"] == "refused_earlier"


async def test_a_yes_on_the_call_does_not_confirm_from_the_text_thread(kv: Redis, db: Db) -> None:
    call = make_ctx(kv, db, conversation_id="CA-call")
    sms = make_ctx(kv, db, conversation_id=f"sms:{TENANT}:{CALLER}", channel="sms")
    cid = await propose(call)
    await say(call, "yes")
    # The yes must come from the conversation that asks to confirm.
    assert (await confirm(sms, cid))["verdict"] == "no_reply"
    assert (await confirm(call, cid))["status"] == "executed"


async def test_another_caller_cannot_confirm(kv: Redis, db: Db) -> None:
    call = make_ctx(kv, db, conversation_id="CA-call")
    stranger = make_ctx(kv, db, conversation_id="CA-other", caller="+15559999999")
    cid = await propose(call)
    await say(stranger, "yes")
    assert (await confirm(stranger, cid))["reason"] == "other_conversation"
    assert (await cancel(stranger, cid))["reason"] == "other_conversation"
    [row] = [r for r in await audit.history(db, TENANT) if r.conversation_id == "CA-other"][:1]
    # Nothing of the other caller's proposal is copied into the stranger's audit rows.
    assert row.tool == "confirm_action" and row.arguments == {"confirmation_id": cid}


async def test_another_tenant_does_not_see_the_proposal(kv: Redis, db: Db) -> None:
    call = make_ctx(kv, db, conversation_id="CA-call")
    other = make_ctx(kv, db, conversation_id="CA-call", tenant="globex")
    cid = await propose(call)
    await say(other, "yes")
    assert (await confirm(other, cid))["reason"] == "unknown_confirmation"
    assert await executions(kv, 1) == 0


async def test_withheld_number_cannot_confirm_elsewhere(kv: Redis, db: Db) -> None:
    call = make_ctx(kv, db, conversation_id="CA-anon", caller="anonymous")
    later = make_ctx(kv, db, conversation_id="CA-anon-2", caller="anonymous")
    cid = await propose(call)
    await say(later, "yes")
    assert (await confirm(later, cid))["reason"] == "other_conversation"


async def test_confirming_needs_the_tool_to_be_allowed_here(kv: Redis, db: Db) -> None:
    call = make_ctx(kv, db, conversation_id="CA-call")
    # Same caller by text, but in a persona that may not run this tool.
    sms = make_ctx(
        kv, db, conversation_id=f"sms:{TENANT}:{CALLER}", channel="sms", persona="dispatcher"
    )
    cid = await propose(call)
    await say(sms, "yes")
    assert (await confirm(sms, cid))["reason"] == "not_allowed"
    assert await executions(kv, 1) == 0


# --- random conversations (hypothesis) ---------------------------------------------------------

# What the caller may say, and what it means for the proposals of each risk.
REPLIES: dict[str, tuple[bool, bool, bool]] = {
    # text: (yes for medium, yes for high, refusal)
    "yes": (True, False, False),
    "ok": (True, False, False),
    "yes, go ahead": (True, True, False),
    "I confirm": (True, True, False),
    "no": (False, False, True),
    "yes... actually no": (False, False, True),
    "wait": (False, False, False),
    "hmm, what time?": (False, False, False),
    "thanks": (False, False, False),
}
CONVERSATIONS = {
    "call": ("CA-h", CALLER, "voice"),
    "sms": (f"sms:{TENANT}:{CALLER}", CALLER, "sms"),
    "stranger": ("CA-stranger", "+15559999999", "voice"),
}


@dataclass
class Said:
    seq: int
    conversation: str
    text: str | None  # None: committed audio whose transcript has not come yet
    item: str = ""


@dataclass
class Proposal:
    seq: int
    cid: str
    risk: Literal["medium", "high"]
    ref: int
    state: str = "pending"


@dataclass
class Model:
    """What the caller said and what should have happened, by the rules in the docstring of
    tools.confirmation, written out independently of it."""

    said: list[Said] = field(default_factory=list)
    proposals: list[Proposal] = field(default_factory=list)
    seq: int = 0

    def tick(self) -> int:
        self.seq += 1
        return self.seq

    def replies(self, conversation: str, since: int) -> list[Said]:
        return [s for s in self.said if s.conversation == conversation and s.seq > since]

    def may_act(self, proposal: Proposal, conversation: str) -> bool:
        return conversation != "stranger"

    def should_execute(self, proposal: Proposal, conversation: str) -> bool:
        here = self.replies(conversation, proposal.seq)
        if not here or any(s.text is None for s in here):
            return False
        heard = [s for s in self.replies("call", proposal.seq) if s.text is not None]
        if conversation != "call":
            heard += here
        latest = max(here, key=lambda s: s.seq)
        yes_medium, yes_high, _ = REPLIES[latest.text or ""]
        refused = any(REPLIES[s.text or ""][2] for s in heard if s is not latest)
        return (yes_high if proposal.risk == "high" else yes_medium) and not refused


# A conversation that mostly proposes, talks and confirms, with the odd cancellation, expiry,
# untranscribed audio ("mumble", transcribed later or never) and made-up confirmation id.
# Repeats weight the choice.
KINDS = (
    ["propose"] * 3
    + ["say"] * 4
    + ["confirm"] * 3
    + ["agree"] * 2
    + ["mumble", "transcribe", "cancel", "expire", "confirm_unknown"]
)
SPEAKERS = ["call", "call", "sms", "stranger"]
AGREEMENTS = [text for text, (yes, _, _) in REPLIES.items() if yes]


@st.composite
def conversation_ops(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    ops: list[tuple[Any, ...]] = []
    for _ in range(draw(st.integers(3, 30))):
        kind = draw(st.sampled_from(KINDS))
        if kind == "propose":
            ops.append((kind, draw(st.sampled_from(["medium", "high"]))))
        elif kind == "say":
            conversation = draw(st.sampled_from(SPEAKERS))
            ops.append((kind, conversation, draw(st.sampled_from(list(REPLIES)))))
        elif kind == "agree":  # a yes, then the model confirms the newest proposal
            conversation = draw(st.sampled_from(SPEAKERS))
            ops.append(("say", conversation, draw(st.sampled_from(AGREEMENTS))))
            ops.append(("confirm", -1, conversation))
        elif kind == "transcribe":
            ops.append((kind, draw(st.sampled_from(list(REPLIES)))))
        elif kind in ("confirm", "cancel"):
            ops.append((kind, draw(st.integers(0, 5)), draw(st.sampled_from(SPEAKERS))))
        elif kind == "expire":
            ops.append((kind, draw(st.integers(0, 5))))
        else:
            ops.append((kind,))
    return ops


@pytest.mark.parametrize("backend", ["fake", "real"])
@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=conversation_ops())
async def test_protocol_under_random_conversations(
    backend: str, request: pytest.FixtureRequest, db: Db, ops: list[tuple[Any, ...]]
) -> None:
    """Executes at most once, only after the caller's own yes since the proposal, never after
    a cancellation or expiry, never for a stranger; and does execute whenever it should."""
    if backend == "real":
        kv: Redis = Redis.from_url(request.getfixturevalue("redis_url"), decode_responses=True)
        await kv.flushdb()
    else:
        kv = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(), decode_responses=True)
    ctxs = {
        name: make_ctx(
            kv, db, conversation_id=conv, caller=caller, channel=channel, transcript_wait_s=0
        )
        for name, (conv, caller, channel) in CONVERSATIONS.items()
    }
    model = Model()
    refs = iter(range(1, 1000))
    try:
        for op in ops:
            await _apply(op, model, ctxs, refs)
        for proposal in model.proposals:
            expected = 1 if proposal.state == "executed" else 0
            assert await executions(kv, proposal.ref) == expected
        # Shown by --hypothesis-show-statistics: the examples must reach every ending.
        for state in sorted({p.state for p in model.proposals}):
            event(f"a proposal ended {state}")
    finally:
        await kv.aclose()


async def _apply(
    op: tuple[Any, ...], model: Model, ctxs: dict[str, ToolContext], refs: Any
) -> None:
    kind = op[0]
    call = ctxs["call"]
    if kind == "propose":
        risk = op[1]
        ref = next(refs)
        name = "runner_test_wipe" if risk == "high" else "runner_test_book"
        cid = await propose(call, name, ref)
        model.proposals.append(Proposal(model.tick(), cid, risk, ref))
    elif kind == "say":
        _, conversation, text = op
        await say(ctxs[conversation], text)
        model.said.append(Said(model.tick(), conversation, text))
    elif kind == "mumble":
        item = f"item_{uuid.uuid4().hex}"
        await call.conversation.caller_audio_committed(item)
        model.said.append(Said(model.tick(), "call", None, item))
    elif kind == "transcribe":
        waiting = [s for s in model.said if s.text is None]
        if waiting:
            waiting[0].text = op[1]
            await call.conversation.caller_transcribed(waiting[0].item, op[1])
    elif kind in ("confirm", "cancel") and model.proposals:
        proposal = model.proposals[op[1] % len(model.proposals)]
        conversation = op[2]
        ctx = ctxs[conversation]
        if kind == "confirm":
            result = await confirm(ctx, proposal.cid)
            expected = _expected_confirm(model, proposal, conversation)
        else:
            result = await cancel(ctx, proposal.cid)
            expected = _expected_cancel(proposal, conversation)
        event(f"{kind} -> {result['status']} {result.get('reason')} {result.get('verdict')}")
        assert (result["status"], result.get("reason")) == expected, (op, result)
        if result["status"] in ("executed", "cancelled"):
            proposal.state = result["status"]
    elif kind == "expire" and model.proposals:
        proposal = model.proposals[op[1] % len(model.proposals)]
        store = PendingStore(call.kv)
        stored = await store.load(proposal.cid)
        assert stored is not None
        await store.add(dataclasses.replace(stored.action, expires_at=time.time() - 1))
        if proposal.state == "pending":
            proposal.state = "expired"
    elif kind == "confirm_unknown":
        result = await confirm(call, "cf_never_proposed")
        assert result["reason"] == "unknown_confirmation"


def _settled(proposal: Proposal) -> tuple[str, str] | None:
    return {
        "executed": ("rejected", "already_executed"),
        "cancelled": ("rejected", "cancelled"),
        "expired": ("rejected", "expired"),
    }.get(proposal.state)


def _expected_confirm(model: Model, proposal: Proposal, conversation: str) -> tuple[str, Any]:
    if not model.may_act(proposal, conversation):
        return ("rejected", "other_conversation")
    if settled := _settled(proposal):
        return settled
    if model.should_execute(proposal, conversation):
        return ("executed", None)
    return ("rejected", "not_affirmed")


def _expected_cancel(proposal: Proposal, conversation: str) -> tuple[str, Any]:
    if conversation == "stranger":
        return ("rejected", "other_conversation")
    return _settled(proposal) or ("cancelled", None)
