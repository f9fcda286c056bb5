"""PostgreSQL stops in the middle of a call, then comes back on the same port with its data.

Injected: our own PostgreSQL server (not the session one other tests share) is stopped (fast
shutdown: open sessions are cut) while a call is live, before the caller asks for anything.
Kept: the caller's confirmed lead and the call record are spooled on local disk; the call goes
on normally; /readyz stays ready and reports the database degraded and what is spooled. When
the server is started again the flusher writes both, exactly once, and the spool empties.
"""

from __future__ import annotations

import asyncio
import functools
import shlex
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from app.embedded import wait_until
from app.metrics import metric_sample
from bridge.sim.caller import DEMO_SCRIPT, place_call
from tests.e2e import (
    AUTH_TOKEN,
    BUSINESS_NUMBER,
    CALLER_NUMBER,
    call_stack,
    wait_until_idle,
)
from tests.servers import PostgresServer, ServerBinaries
from tools.db.models import Call, Lead

pytestmark = pytest.mark.postgres


class RestartablePostgres(PostgresServer):
    """A PostgresServer that can be stopped and started again, keeping its data directory."""

    def halt(self) -> None:
        self._run("pg_ctl", "stop", "--wait", "--pgdata", str(self.datadir), "-m", "fast")

    def resume(self) -> None:
        options = [
            "-c", f"listen_addresses={self.host}", "-p", str(self.port),
            "-c", "unix_socket_directories=",
        ]  # fmt: skip
        self._run(
            "pg_ctl", "start", "--wait", "--timeout", "60", "--pgdata", str(self.datadir),
            "--log", str(self.logfile), "--options", shlex.join(options),
        )  # fmt: skip

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://{self.user}@{self.host}:{self.port}/{self.maintenance_dbname}"


@pytest.fixture
def own_postgres(server_binaries: ServerBinaries) -> Iterator[RestartablePostgres]:
    with RestartablePostgres(server_binaries.postgres_bindir) as server:
        yield server


# Counters not yet incremented are absent from the exposition: they count as 0.
sample = functools.partial(metric_sample, absent=0.0)


async def test_database_outage_mid_call_spools_then_replays_exactly_once(
    own_postgres: RestartablePostgres, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "spool"
    async with call_stack(
        "demo",
        database_url=own_postgres.url,
        spool_dir=spool_dir,
        spool_flush_interval_s=0.2,
    ) as stack:
        services = stack.services
        placing = asyncio.create_task(
            place_call(
                server_url=stack.url,
                auth_token=AUTH_TOKEN,
                to=BUSINESS_NUMBER,
                from_=CALLER_NUMBER,
                script=DEMO_SCRIPT,
                pace=0.25,  # 4x real time: the store is down well before the lead is asked for
            )
        )
        await wait_until(lambda: services.calls or placing.done(), 20)
        assert services.calls, "the call never went live"
        await asyncio.to_thread(own_postgres.halt)

        report = await asyncio.wait_for(placing, 60)
        await wait_until_idle(stack)
        spooled = sorted(p.name.split("-")[1] for p in spool_dir.glob("*.json"))
        async with httpx.AsyncClient(base_url=stack.url) as http:
            during = await http.get("/readyz")

            await asyncio.to_thread(own_postgres.resume)
            await wait_until(lambda: not list(spool_dir.glob("*.json")), 30)
            after = await http.get("/readyz")
            metrics = (await http.get("/metrics")).text
        async with services.db() as db:
            leads = (await db.execute(select(Lead))).scalars().all()
            calls = (await db.execute(select(Call))).scalars().all()
            n_calls = await db.scalar(select(func.count()).select_from(Call))
        (session,) = stack.emulator.sessions

    print(f"injected: PostgreSQL stopped mid-call {report.call_sid}, restarted after it ended")
    print(f"spooled while down: {spooled}; readyz during: {during.json()}")
    # The call itself was untouched by the outage: the lead was confirmed and read back.
    assert report.violations == []
    assert [t.name for t in session.tool_calls] == ["capture_lead", "confirm_action", "end_call"]
    confirmed = session.tool_calls[1].output or ""
    assert '"status":"executed"' in confirmed and '"saved":"queued"' in confirmed
    assert spooled == ["call", "lead"]
    assert during.status_code == 200
    assert any(d.startswith("database: ") for d in during.json()["degraded"])
    assert during.json()["spooled"] == 2

    # Replayed: one lead, one call record, nothing left on disk, nothing set aside.
    (lead,) = leads
    assert (lead.name, lead.address, lead.conversation_id) == (
        "Jamie Rivera",
        "12 Elm Street",
        report.call_sid,
    )
    assert n_calls == 1
    (call,) = calls
    assert call.call_sid == report.call_sid
    assert [t["name"] for t in call.tool_calls] == ["capture_lead", "confirm_action", "end_call"]
    assert not (spool_dir / "failed").exists()
    assert after.status_code == 200 and "degraded" not in after.json()
    assert sample(metrics, "switchboard_spool_events_total", event="spooled", kind="lead") == 1
    assert sample(metrics, "switchboard_spool_events_total", event="replayed", kind="call") == 1
    assert sample(metrics, "switchboard_spooled_records") == 0
    print(f"kept: lead {lead.id} and call {call.call_sid} written once after the restart")
