"""Correlation ids: which call or message a log line belongs to, without passing them around.

A webhook or media socket binds its CallSid (or MessageSid) once; every log line written later
in the same asyncio task, and in the tasks it starts (the call's pumps, tool runs), carries it,
because asyncio copies context variables into new tasks. Uvicorn runs each request and each
WebSocket in a task of its own, so one request's ids never leak into another's lines.
"""

from __future__ import annotations

from contextvars import ContextVar

_call_sid: ContextVar[str | None] = ContextVar("call_sid", default=None)
_message_sid: ContextVar[str | None] = ContextVar("message_sid", default=None)


def bind(*, call_sid: str | None = None, message_sid: str | None = None) -> None:
    """Tag this task's later log lines (and those of tasks it starts) with these ids."""
    if call_sid:
        _call_sid.set(call_sid)
    if message_sid:
        _message_sid.set(message_sid)


def current_ids() -> dict[str, str]:
    """The ids bound in this context, for the log formatter."""
    ids: dict[str, str] = {}
    if (call_sid := _call_sid.get()) is not None:
        ids["call_sid"] = call_sid
    if (message_sid := _message_sid.get()) is not None:
        ids["message_sid"] = message_sid
    return ids
