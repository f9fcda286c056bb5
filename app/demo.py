"""`switchboard demo`: one complete simulated call on this machine, nothing else needed.

The server, the local Realtime emulator (playing the `demo` scenario) and a simulated Twilio
caller run in this process on loopback. The server is the real one: signed webhooks, a
one-time stream token, the media socket, the tools and the confirmation protocol, the SQL
store (an SQLite file by default) and the in-process Redis stand-in.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from sqlalchemy import select

from app.embedded import bind_loopback, running_server, wait_until
from app.settings import Settings
from bridge.sim.caller import DEMO_SCRIPT, CallerScript, CallReport, place_call
from bridge.sim.emulator import run_emulator

DEMO_CALLER = "+15005550123"


@dataclass(slots=True)
class DemoResult:
    report: CallReport
    call: dict[str, Any] | None
    leads: list[dict[str, Any]]
    audit: list[dict[str, Any]]


async def run_demo(
    *,
    settings: Settings | None = None,
    scenario: str = "demo",
    script: CallerScript = DEMO_SCRIPT,
    pace: float = 1.0,
    record_wav: Path | None = None,
    caller_number: str = DEMO_CALLER,
) -> DemoResult:
    """Place one simulated call through a real server; return what the stores now hold.

    `pace` scales time for the caller and the emulator alike (1 = real time, 0.25 = four
    times faster, 0 = as fast as possible).
    """
    base = settings or Settings()
    token = base.twilio_auth_token or SecretStr(secrets.token_urlsafe(24))
    speed = 0.0 if pace == 0 else 1.0 / pace  # the emulator counts speed, not time
    async with run_emulator(scenario, speed=speed) as emulator:
        sock = bind_loopback()
        port = sock.getsockname()[1]
        configured = base.model_copy(
            update={
                "public_url": f"http://127.0.0.1:{port}",
                "openai_realtime_url": emulator.url,
                "openai_api_key": None,
                "twilio_auth_token": token,
            }
        )
        async with running_server(configured, sock) as server:
            services = server.app.state.services
            profile = services.profiles.default
            started = time.time()
            report = await place_call(
                server_url=server.url,
                auth_token=token.get_secret_value(),
                to=profile.numbers[0],
                from_=caller_number,
                script=script,
                pace=pace,
                record_wav=record_wav,
            )
            with contextlib.suppress(TimeoutError):  # a stuck call still gets reported
                await wait_until(lambda: not services.calls, timeout_s=10.0)
            return DemoResult(
                report=report,
                call=await _call_row(services, report.call_sid),
                leads=await _leads_since(services, profile.id, started),
                audit=await _audit_rows(services, report.call_sid),
            )


async def _call_row(services: Any, call_sid: str) -> dict[str, Any] | None:
    from tools.db.models import Call

    async with services.db() as session:
        row = (await session.execute(select(Call).where(Call.call_sid == call_sid))).scalar()
        return None if row is None else _as_dict(row)


async def _leads_since(services: Any, tenant: str, since: float) -> list[dict[str, Any]]:
    from datetime import UTC, datetime

    from tools.db.models import Lead

    cutoff = datetime.fromtimestamp(since - 1, UTC)
    async with services.db() as session:
        rows = (
            await session.execute(
                select(Lead).where(Lead.tenant == tenant, Lead.created_at >= cutoff)
            )
        ).scalars()
        return [_as_dict(row) for row in rows]


async def _audit_rows(services: Any, conversation_id: str) -> list[dict[str, Any]]:
    from tools.db.models import AuditLog

    async with services.db() as session:
        rows = (
            await session.execute(
                select(AuditLog)
                .where(AuditLog.conversation_id == conversation_id)
                .order_by(AuditLog.id)
            )
        ).scalars()
        return [_as_dict(row) for row in rows]


def _as_dict(row: Any) -> dict[str, Any]:
    return {column.key: getattr(row, column.key) for column in row.__mapper__.column_attrs}


def print_result(result: DemoResult, echo: Callable[[str], None] = print) -> None:
    report, call = result.report, result.call
    echo(f"Simulated call {report.call_sid}")
    echo(
        f"  audio: caller spoke {report.audio_sent_ms / 1000:.1f} s, heard "
        f"{report.audio_played_ms / 1000:.1f} s of the agent; {len(report.marks_echoed)} marks "
        f"acknowledged; {len(report.violations)} protocol violations"
    )
    if call is None:
        echo("  no call record was saved (see the log above)")
        return
    echo(f"  ended: {call.get('status')} after {call.get('duration_s') or 0:.1f} s\n")
    echo("Conversation:")
    for turn in call.get("transcript") or []:
        who = "Agent " if turn.get("role") == "agent" else "Caller"
        echo(f"  {who}: {turn.get('text')}")
    echo("\nTool calls:")
    for tool_call in call.get("tool_calls") or []:
        name, arguments = tool_call.get("name"), tool_call.get("arguments")
        echo(f"  {name}({arguments}) -> {tool_call.get('status')}")
    echo("\nAudit trail:")
    for row in result.audit:
        echo(f"  {row.get('tool')}: {row.get('outcome')}")
    echo("\nLead saved:" if result.leads else "\nNo lead was saved.")
    for lead in result.leads:
        fields = ("name", "phone", "job_type", "address", "urgency", "status", "source")
        echo("  " + ", ".join(f"{k}={lead.get(k)}" for k in fields if lead.get(k) is not None))


def main(pace: float = 1.0, audio_mode: str | None = None) -> int:
    from app.logging_setup import configure_logging

    configure_logging("WARNING")
    settings = Settings()
    if audio_mode is not None:
        settings = settings.model_copy(update={"audio_mode": audio_mode})
    print(
        f"Switchboard demo: server + Realtime emulator + simulated caller on loopback "
        f"(audio {settings.audio_mode}, database {settings.database_url}).\n"
        "The call plays in real time and takes about half a minute...\n"
    )
    result = asyncio.run(run_demo(settings=settings, pace=pace))
    print_result(result)
    ok = bool(result.leads) and not result.report.violations
    return 0 if ok else 1
