"""Durable records of conversations: calls (with transcript and tool calls), Twilio status
callbacks, and text messages.

Twilio retries webhooks and delivers them out of order, so every write here is idempotent:
a repeated callback or message is recognised by its natural key and reported as a duplicate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tools.db.models import TERMINAL_CALL_STATUSES, Call, CallEvent, Direction, Message, utcnow
from tools.db.tenancy import tenant_session

_T = TypeVar("_T")

# How far along a text message is; a late callback never moves a message backwards.
_MESSAGE_PROGRESS = {
    "accepted": 0,
    "scheduled": 0,
    "queued": 0,
    "sending": 1,
    "sent": 2,
    "receiving": 2,
    "received": 3,
    "delivered": 3,
    "undelivered": 3,
    "failed": 3,
    "canceled": 3,
    "partially_delivered": 3,
    "read": 4,
}


@dataclass(slots=True)
class CallRecord:
    call_sid: str
    tenant: str
    from_number: str | None
    to_number: str | None
    persona: str | None
    started_at: datetime | None
    ended_at: datetime | None
    status: str | None
    transcript: list[dict[str, Any]] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, Any] = field(default_factory=dict)
    direction: Direction = "inbound"
    summary: str | None = None


async def save_call(db: async_sessionmaker[AsyncSession], record: CallRecord) -> None:
    """Insert or update the call (key: tenant + CallSid) with everything the bridge knows."""
    for attempt in range(2):
        async with tenant_session(db, record.tenant) as session:
            call = await _call(session, record.call_sid)
            if call is None:
                call = Call(call_sid=record.call_sid, status=record.status)
                session.add(call)
            elif not _is_terminal(call.status):
                call.status = record.status
            call.direction = record.direction
            call.from_number = record.from_number or call.from_number
            call.to_number = record.to_number or call.to_number
            call.persona = record.persona or call.persona
            call.started_at = record.started_at or call.started_at
            call.ended_at = record.ended_at or call.ended_at
            call.transcript = list(record.transcript)
            call.tool_calls = list(record.tool_calls)
            call.usage = dict(record.usage)
            call.summary = record.summary or call.summary
            # Twilio's own CallDuration (from the status callback) wins over our clock.
            if call.duration_s is None and call.started_at and call.ended_at:
                call.duration_s = (call.ended_at - call.started_at).total_seconds()
            try:
                await session.commit()
                return
            except IntegrityError:
                # A status callback created the row between our read and our insert.
                if attempt:
                    raise


async def record_call_status(
    db: async_sessionmaker[AsyncSession], tenant: str | None, form: dict[str, str]
) -> bool:
    """Store one call (or stream) status callback; False if it was already stored.

    `tenant` comes from the profile answering the callback's To (inbound) or From (outbound)
    number; None keeps the event without a tenant. Also moves the call's status forward
    (never back from a terminal status) and creates the call row if the bridge has not yet.
    """
    call_sid = (form.get("CallSid") or "").strip()
    status = (form.get("CallStatus") or form.get("StreamEvent") or "").strip()
    if not call_sid or not status:
        raise ValueError("status callback needs CallSid and CallStatus (or StreamEvent)")
    for attempt in range(2):
        event = CallEvent(
            tenant=tenant,
            call_sid=call_sid,
            status=status,
            sequence_number=_int_or(form.get("SequenceNumber"), -1),
            raw=dict(form),
        )
        session_scope = tenant_session(db, tenant) if tenant else db()
        async with session_scope as session:
            session.add(event)
            try:
                await session.flush()
            except IntegrityError:
                await session.rollback()
                return False
            if tenant and "CallStatus" in form:
                await _apply_call_status(session, call_sid, status, form)
            try:
                await session.commit()
                return True
            except IntegrityError:
                # Either the same callback was stored by a parallel request (the retry then
                # finds it and reports a duplicate) or save_call created the call row first.
                await session.rollback()
                if attempt:
                    raise
    raise AssertionError("unreachable")


async def _apply_call_status(
    session: AsyncSession, call_sid: str, status: str, form: dict[str, str]
) -> None:
    call = await _call(session, call_sid)
    if call is None:
        outbound = form.get("Direction", "").startswith("outbound")
        call = Call(
            call_sid=call_sid,
            direction="outbound" if outbound else "inbound",
            from_number=form.get("From"),
            to_number=form.get("To"),
        )
        session.add(call)
    if _is_terminal(call.status):
        return
    call.status = status
    if status in TERMINAL_CALL_STATUSES:
        call.ended_at = call.ended_at or _twilio_time(form.get("Timestamp")) or utcnow()
        duration = _int_or(form.get("CallDuration"), None)
        if duration is not None:
            call.duration_s = float(duration)


async def save_message(
    db: async_sessionmaker[AsyncSession],
    tenant: str,
    *,
    direction: Direction,
    from_number: str,
    to_number: str,
    body: str,
    message_sid: str | None = None,
    status: str | None = None,
    media: list[dict[str, Any]] | None = None,
    conversation_id: str | None = None,
    reason: str | None = None,
    error_code: str | None = None,
) -> bool:
    """Store a text message; False (and only a status update) if its MessageSid is known.

    The conversation key defaults to "sms:{tenant}:{customer number}", as in ToolContext.
    """
    customer = from_number if direction == "inbound" else to_number
    async with tenant_session(db, tenant) as session:
        if message_sid is not None:
            existing = await session.scalar(
                select(Message).where(Message.message_sid == message_sid)
            )
            if existing is not None:
                _advance_message(existing, status, error_code)
                await session.commit()
                return False
        session.add(
            Message(
                message_sid=message_sid,
                direction=direction,
                from_number=from_number,
                to_number=to_number,
                body=body,
                status=status,
                media=list(media or []),
                conversation_id=conversation_id or f"sms:{tenant}:{customer}",
                reason=reason,
                error_code=error_code,
            )
        )
        try:
            await session.commit()
        except IntegrityError:
            await session.rollback()
            return False
    return True


async def record_message_status(
    db: async_sessionmaker[AsyncSession], tenant: str | None, form: dict[str, str]
) -> bool:
    """Apply an SMS status callback (MessageSid, MessageStatus, ErrorCode); False if the
    message is unknown or the status would move it backwards."""
    sid = (form.get("MessageSid") or form.get("SmsSid") or "").strip()
    status = (form.get("MessageStatus") or form.get("SmsStatus") or "").strip()
    if not sid or not status:
        raise ValueError("message status callback needs MessageSid and MessageStatus")
    session_scope = tenant_session(db, tenant) if tenant else db()
    async with session_scope as session:
        message = await session.scalar(select(Message).where(Message.message_sid == sid))
        if message is None or not _advance_message(message, status, form.get("ErrorCode")):
            return False
        await session.commit()
    return True


def _advance_message(message: Message, status: str | None, error_code: str | None) -> bool:
    if status is None:
        return False
    current = _MESSAGE_PROGRESS.get(message.status or "", -1)
    if _MESSAGE_PROGRESS.get(status, current) < current:
        return False
    message.status = status
    message.error_code = error_code or message.error_code
    return True


async def _call(session: AsyncSession, call_sid: str) -> Call | None:
    return await session.scalar(select(Call).where(Call.call_sid == call_sid))


def _is_terminal(status: str | None) -> bool:
    return status in TERMINAL_CALL_STATUSES


def _int_or(value: str | None, default: _T) -> int | _T:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def _twilio_time(value: str | None) -> datetime | None:
    # Status callbacks carry RFC 2822 UTC timestamps ("Tue, 21 Nov 2023 18:00:00 +0000").
    if not value:
        return None
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return parsed if parsed.tzinfo is not None else None
