"""The audit trail: one row per tool step (run, proposed, executed, rejected, cancelled, expired,
failed...), written through the tenant-scoped session like every other CRM row.

`record` raises if the insert fails; the runner catches that, logs it loudly and still returns
the tool's result, because losing the caller's booking over a log line would be worse.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic_core import to_jsonable_python
from sqlalchemy import String, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tools.db.models import AuditLog
from tools.db.tenancy import tenant_session


def _fit(column: str, value: str | None) -> str | None:
    """Clip a value to its column (a model may send a 10 kB tool name; PostgreSQL would refuse)."""
    kind = AuditLog.__table__.c[column].type
    if value is None or not isinstance(kind, String) or kind.length is None:
        return value
    return value[: kind.length]


MAX_RAW_CHARS = 4000


def _json(value: Any) -> Any:
    return to_jsonable_python(value, fallback=repr)


def _raw(arguments: Any) -> str:
    text = arguments if isinstance(arguments, str) else repr(arguments)
    return text[:MAX_RAW_CHARS]


async def record(
    db: async_sessionmaker[AsyncSession],
    *,
    tenant: str,
    channel: str,
    conversation_id: str,
    caller: str | None,
    tool: str,
    arguments: Any,
    outcome: str,
    detail: dict[str, Any],
    latency_ms: float,
    confirmation_id: str | None = None,
) -> None:
    row = AuditLog(
        at=datetime.now(UTC),
        channel=_fit("channel", channel),
        conversation_id=_fit("conversation_id", conversation_id),
        caller=_fit("caller", caller),
        tool=_fit("tool", tool),
        # Arguments that never parsed are kept as text: what the model sent is the evidence.
        arguments=_json(arguments) if isinstance(arguments, dict) else {"raw": _raw(arguments)},
        outcome=_fit("outcome", outcome),
        detail=_json(detail),
        latency_ms=latency_ms,
        confirmation_id=_fit("confirmation_id", confirmation_id),
    )
    async with tenant_session(db, tenant) as session:
        session.add(row)
        await session.commit()


async def history(
    db: async_sessionmaker[AsyncSession],
    tenant: str,
    *,
    conversation_id: str | None = None,
    confirmation_id: str | None = None,
) -> list[AuditLog]:
    """A tenant's audit rows, oldest first, optionally for one conversation or confirmation."""
    query = select(AuditLog).order_by(AuditLog.at, AuditLog.id)
    if conversation_id is not None:
        query = query.where(AuditLog.conversation_id == conversation_id)
    if confirmation_id is not None:
        query = query.where(AuditLog.confirmation_id == confirmation_id)
    async with tenant_session(db, tenant) as session:
        return list(await session.scalars(query))
