"""Redis stops in the middle of a call, then comes back on the same port.

Injected: our own redis-server (not the session one other tests share) is stopped while a
call is live, just after the call authenticated and before the caller asks for anything.
Kept: the call goes on to a clean goodbye; the lead the caller asked for is refused politely
(no confirmation can be stored) and the refusal is audited with what they asked; /readyz
reports degraded; the call record is written. When redis-server is restarted, /readyz is ready
again and the next call takes and confirms a lead as usual, with no restart of ours.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import BaseModel, Field
from pytest_redis.executor import RedisExecutor
from redis.asyncio import Redis
from sqlalchemy import select

from app.embedded import wait_until
from app.metrics import metric_sample
from bridge.sim.caller import DEMO_SCRIPT, place_call
from prompts.profiles import BusinessProfile
from tests.e2e import (
    AUTH_TOKEN,
    BUSINESS_NUMBER,
    CALLER_NUMBER,
    call_stack,
    simulated_call,
    wait_until_idle,
)
from tests.servers import ServerBinaries, free_port
from tools import ToolContext, run
from tools.conversation import ConversationLog
from tools.db.engine import make_engine, make_sessionmaker, migrate
from tools.db.models import AuditLog, Call, Lead
from tools.registry import tool
from tools.runner import add_observer, remove_observer

pytestmark = pytest.mark.redis


# Counters not yet incremented are absent from the exposition: they count as 0.
sample = functools.partial(metric_sample, absent=0.0)


@pytest.fixture
def own_redis(server_binaries: ServerBinaries, tmp_path: Path) -> Iterator[RedisExecutor]:
    """A redis-server of this test's own, so stopping it cannot disturb any other test."""
    executor = RedisExecutor(
        executable=str(server_binaries.redis_server),
        databases=1,
        redis_timeout=0,
        loglevel="warning",
        host="127.0.0.1",
        port=free_port(),
        save="",
        datadir=tmp_path,
        startup_timeout=60,
    )
    with executor:
        yield executor


async def test_redis_outage_mid_call_then_recovery(
    own_redis: RedisExecutor, sqlite_url: str, tmp_path: Path
) -> None:
    redis_url = f"redis://{own_redis.host}:{own_redis.port}/0"
    async with call_stack(
        "demo", database_url=sqlite_url, redis_url=redis_url, spool_dir=tmp_path / "spool"
    ) as stack:
        services = stack.services
        first = asyncio.create_task(
            place_call(
                server_url=stack.url,
                auth_token=AUTH_TOKEN,
                to=BUSINESS_NUMBER,
                from_=CALLER_NUMBER,
                script=DEMO_SCRIPT,
                pace=0.25,  # 4x real time: the store is down well before the lead is asked for
            )
        )
        # The call is live (its stream token was burned in Redis): now take Redis away.
        await wait_until(lambda: services.calls or first.done(), 20)
        assert services.calls, "the call never went live"
        await asyncio.to_thread(own_redis.stop)
        async with httpx.AsyncClient(base_url=stack.url) as http:
            during = await http.get("/readyz")
            health = await http.get("/healthz")

        report = await asyncio.wait_for(first, 60)
        await wait_until_idle(stack)

        # Back on the same port, empty (no persistence): we recover without a restart.
        await asyncio.to_thread(own_redis.start)
        async with httpx.AsyncClient(base_url=stack.url) as http:
            for _ in range(100):
                after = await http.get("/readyz")
                if "degraded" not in after.json():
                    break
                await asyncio.sleep(0.1)
            second = await simulated_call(stack, DEMO_SCRIPT)
            metrics = (await http.get("/metrics")).text
        async with services.db() as db:
            calls = {c.call_sid: c for c in (await db.execute(select(Call))).scalars()}
            leads = (await db.execute(select(Lead))).scalars().all()
            audit = (await db.execute(select(AuditLog).order_by(AuditLog.id))).scalars().all()
        outage_session, recovered_session = stack.emulator.sessions

    print(
        f"injected: redis-server stopped mid-call ({report.call_sid}), restarted before "
        f"{second.call_sid}; readyz during: {during.status_code} {during.json()}"
    )
    # Alive throughout; not taking new calls while Redis is gone, and saying why.
    assert health.status_code == 200
    assert during.status_code == 200  # degraded, still taking calls (to answer them politely)
    assert any(d.startswith("redis: ") for d in during.json()["degraded"])
    assert during.json()["live_calls"] == 1

    # The first call went on: the write was refused politely, the agent said goodbye and hung up.
    assert report.violations == []
    assert report.closed_by == "server"
    outcome = [(t.name, t.output) for t in outage_session.tool_calls]
    assert [name for name, _ in outcome] == ["capture_lead", "end_call"]
    refused = outcome[0][1] or ""
    assert '"status":"unavailable"' in refused
    assert "I can't make changes right now, I'll have the owner call you." in refused
    record = calls[report.call_sid]
    (lead_call, goodbye) = record.tool_calls
    assert lead_call["status"] == "unavailable"
    assert goodbye["name"] == "end_call" and goodbye["status"] not in ("error", "unavailable")
    # What the caller asked for is in the audit trail, for the owner's call back.
    (unavailable,) = [a for a in audit if a.outcome == "unavailable"]
    assert unavailable.tool == "capture_lead" and unavailable.arguments["name"] == "Jamie Rivera"

    # Recovered: ready again, and a lead is proposed, confirmed and stored on the next call.
    assert after.status_code == 200 and "degraded" not in after.json()
    assert second.violations == []
    assert [t.name for t in recovered_session.tool_calls] == [
        "capture_lead",
        "confirm_action",
        "end_call",
    ]
    (lead,) = leads
    assert lead.conversation_id == second.call_sid
    assert (
        sample(metrics, "switchboard_tool_calls_total", tool="capture_lead", outcome="unavailable")
        == 1
    )
    assert sample(metrics, "switchboard_confirmations_total", outcome="unavailable") == 1
    assert sample(metrics, "switchboard_confirmations_total", outcome="executed") == 1
    print(f"kept: call {report.call_sid} ended cleanly, refusal audited; lead {lead.id} stored")


# -- the runner with Redis gone (no server needed: nothing listens on the port) -----------------


class _NoArgs(BaseModel):
    pass


class _Amount(BaseModel):
    amount: int = Field(ge=1)


@tool("outage_test_read", args=_NoArgs, risk="read", personas={"outage_test"})
async def outage_test_read(args: _NoArgs, ctx: ToolContext) -> dict[str, Any]:
    """A read: needs the database at most, never Redis."""
    return {"opening_hours": "8-5"}


@tool("outage_test_write", args=_Amount, risk="low", personas={"outage_test"})
async def outage_test_write(args: _Amount, ctx: ToolContext) -> dict[str, Any]:
    """A write: needs a confirmation, which lives in Redis."""
    raise AssertionError("must not run without a confirmation")


async def test_reads_run_and_writes_are_refused_politely_without_redis(sqlite_url: str) -> None:
    await migrate(sqlite_url)
    engine = make_engine(sqlite_url)
    kv = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", decode_responses=True)
    seen: list[tuple[str, str]] = []
    add_observer(observer := lambda tool_name, outcome, _: seen.append((tool_name, outcome)))
    ctx = ToolContext(
        tenant="acme",
        profile=BusinessProfile(id="acme", name="Acme", numbers=["+15550000001"]),
        channel="voice",
        conversation_id="CA" + "7" * 32,
        caller="+15550000002",
        persona="outage_test",
        db=make_sessionmaker(engine),
        kv=kv,
        conversation=ConversationLog(kv, "CA" + "7" * 32),
        transcript_wait_s=0.1,
    )
    try:
        read = await run("outage_test_read", {}, ctx)
        write = await run("outage_test_write", {"amount": 5}, ctx)
        confirm = await run("confirm_action", {"confirmation_id": "cf_0123456789abcdef"}, ctx)
        cancel = await run("cancel_action", {"confirmation_id": "cf_0123456789abcdef"}, ctx)
        async with ctx.db() as session:
            audit = (await session.execute(select(AuditLog).order_by(AuditLog.id))).scalars().all()
    finally:
        remove_observer(observer)
        await kv.aclose()
        await engine.dispose()

    assert read == {"opening_hours": "8-5"}
    for refused in (write, confirm, cancel):
        assert refused["status"] == "unavailable" and refused["error"] == "store_unavailable"
        assert "I can't make changes right now, I'll have the owner call you." in refused["message"]
    assert [a.outcome for a in audit] == ["ok", "unavailable", "unavailable", "unavailable"]
    assert audit[1].arguments == {"amount": 5}  # validated, for the owner's call back
    assert seen == [
        ("outage_test_read", "ok"),
        ("outage_test_write", "unavailable"),
        ("confirm_action", "unavailable"),
        ("cancel_action", "unavailable"),
    ]
