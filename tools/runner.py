"""`run(name, arguments, ctx)`: the one door through which the model acts, voice or text.

* Reads, and conversation control (hang up, transfer), run at once.
* Writes never run on the model's word: the runner validates the arguments, stores them as a
  pending action (`tools.pending`) and answers `confirmation_required` with a summary for the
  caller. Only `confirm_action` runs it: the *stored* arguments, once, and only after the
  caller said yes (`tools.confirmation` judges; `tools.conversation` holds their words).
* Nothing raises out of `run` (except cancellation): every failure is a result the model can
  act on, and every run leaves an audit row.

Outcomes in the audit trail (and passed to observers): ok, proposed, executed, rejected,
cancelled, expired, failed, timeout, invalid_arguments, unknown_tool, interrupted (the
conversation's task was cancelled mid-run), unavailable (Redis, which holds pending
confirmations, is down: the change is refused politely).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import BaseModel, ValidationError
from pydantic_core import to_jsonable_python
from redis.exceptions import RedisError

from tools import audit
from tools.confirmation import (
    REASON_MESSAGES,
    Judgement,
    Party,
    PendingAction,
    Reason,
    Replies,
    State,
    judge_replies,
    precheck,
)
from tools.conversation import ConversationLog
from tools.pending import PendingStore, new_confirmation_id
from tools.registry import REGISTRY, Tool, get_tool

if TYPE_CHECKING:
    from tools.context import ToolContext

log = logging.getLogger(__name__)

CONFIRM_TOOL = "confirm_action"
CANCEL_TOOL = "cancel_action"
INSTRUCTIONS = (
    "Read the summary to the caller and ask them to confirm. "
    "Call confirm_action only after they agree."
)
HIGH_RISK_INSTRUCTIONS = (
    " This one needs an explicit yes, such as 'yes, go ahead' or 'I confirm'; "
    "a bare 'ok' or 'sure' is not enough."
)
FAILED_MESSAGE = (
    "That did not work because of a problem on our side. Tell the caller you could not "
    "complete it and offer to take a message or have someone call back."
)
TIMEOUT_MESSAGE = "That took too long and was stopped. Tell the caller and offer another way."
UNAVAILABLE_MESSAGE = (
    "Changes cannot be made right now (a system is down). Say: \"I can't make changes right "
    "now, I'll have the owner call you.\" Do not retry; answering questions still works."
)
# An audit insert stuck on a locked database must not hold the conversation hostage.
AUDIT_TIMEOUT_S = 5.0
# Room for the store round trips around a handler, so that the handler's own timeout (with
# the confirmed tool's name in the audit row) fires before the backstop.
STORE_SLACK_S = 2.0

Observer = Callable[[str, str, float], None]
_observers: list[Observer] = []


def add_observer(observer: Observer) -> None:
    """Call `observer(tool, outcome, latency_s)` after every run (metrics); must not block."""
    _observers.append(observer)


def remove_observer(observer: Observer) -> None:
    """Stop calling `observer` (an app shutting down); unknown observers are ignored."""
    with contextlib.suppress(ValueError):
        _observers.remove(observer)


class _Outcome(Exception):
    """A finished run: its result for the model and its audit row. Raised to unwind early."""

    def __init__(
        self,
        outcome: str,
        result: dict[str, Any],
        *,
        tool: str,
        arguments: Any,
        detail: dict[str, Any] | None = None,
        confirmation_id: str | None = None,
    ) -> None:
        super().__init__(outcome)
        self.outcome = outcome
        self.result = result
        self.tool = tool
        self.arguments = arguments
        self.detail = detail or {}
        self.confirmation_id = confirmation_id


async def run(name: str, arguments: str | dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
    """Run (or propose) tool `name` for the conversation in `ctx`. Never raises."""
    started = time.perf_counter()
    try:
        async with asyncio.timeout(ctx.tool_timeout_s + ctx.transcript_wait_s + STORE_SLACK_S):
            done = await _dispatch(name, arguments, ctx)
    except _Outcome as early:
        done = early
    except asyncio.CancelledError:
        # The conversation went away mid-run (caller hung up). Leave a trace, then go.
        interrupted = _Outcome("interrupted", {}, tool=name, arguments=arguments)
        latency_ms = (time.perf_counter() - started) * 1000
        await asyncio.shield(_audit(ctx, interrupted, latency_ms))
        raise
    except RedisError as error:
        # Pending confirmations live in Redis: without it no change can be proposed or
        # confirmed safely. Refuse politely (reads never get here: they need no Redis).
        log.warning("tool %s: refused, Redis unavailable: %s", name, error)
        done = _Outcome("unavailable", _unavailable(), tool=name, arguments=arguments)
    except TimeoutError:
        # The backstop: a stuck store, not a slow handler (those have their own timeout).
        log.error("tool %s: run timed out outside its handler", name)
        done = _Outcome("timeout", _timeout(), tool=name, arguments=arguments)
    except Exception:
        log.exception("tool %s: runner failure", name)
        done = _Outcome("failed", _failed(), tool=name, arguments=arguments)
    latency_s = time.perf_counter() - started
    await _audit(ctx, done, latency_s * 1000)
    _observe(done.tool, done.outcome, latency_s)
    return done.result


async def _dispatch(name: str, arguments: str | dict[str, Any], ctx: ToolContext) -> _Outcome:
    tool = _lookup(name, ctx.persona)
    if tool is None:
        return _Outcome(
            "unknown_tool",
            {
                "status": "error",
                "error": "unknown_tool",
                "message": f"There is no tool named {name[:64]!r} here.",
            },
            tool=name,
            arguments=arguments,
        )
    args = _validate(tool, arguments)
    if tool.name == CONFIRM_TOOL:
        return await _confirm(args.confirmation_id, ctx)  # type: ignore[attr-defined]
    if tool.name == CANCEL_TOOL:
        return await _cancel(args.confirmation_id, ctx)  # type: ignore[attr-defined]
    if tool.needs_confirmation:
        return await _propose(tool, args, ctx)
    result = await _execute(tool, args, ctx, dumped := args.model_dump(mode="json"))
    return _Outcome("ok", result, tool=tool.name, arguments=dumped)


def _lookup(name: str, persona: str) -> Tool | None:
    # The protocol tools register themselves on import; import here, not at module top,
    # because their handlers call back into this module.
    import tools.handlers.confirm  # noqa: F401

    tool = get_tool(name)
    if tool is None:
        return None
    if tool.name in (CONFIRM_TOOL, CANCEL_TOOL):
        # Offered to every persona that has something to confirm (see handlers/confirm.py).
        allowed = persona in tool.personas or any(
            t.needs_confirmation and persona in t.personas for t in REGISTRY.values()
        )
    else:
        allowed = persona in tool.personas
    return tool if allowed else None


def _validate(tool: Tool, arguments: str | dict[str, Any]) -> BaseModel:
    try:
        if isinstance(arguments, str):
            # Realtime sends "" for a call without arguments.
            return tool.args.model_validate_json(arguments.strip() or "{}")
        return tool.args.model_validate(arguments)
    except ValidationError as exc:
        errors = [
            {"field": ".".join(str(p) for p in e["loc"]) or None, "message": e["msg"]}
            for e in exc.errors(include_url=False, include_input=False)
        ]
        raise _Outcome(
            "invalid_arguments",
            {
                "status": "invalid_arguments",
                "errors": errors,
                "message": "Fix the fields listed in errors (ask the caller if needed), "
                "then call the tool again.",
            },
            tool=tool.name,
            arguments=arguments,
            detail={"errors": errors},
        ) from None


async def _execute(
    tool: Tool,
    args: BaseModel,
    ctx: ToolContext,
    arguments: dict[str, Any],
    *,
    confirmation_id: str | None = None,
    detail: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The handler under its timeout; failures become outcomes. Returns its JSON-safe result."""
    common: dict[str, Any] = {
        "tool": tool.name,
        "arguments": arguments,
        "confirmation_id": confirmation_id,
    }
    try:
        async with asyncio.timeout(ctx.tool_timeout_s):
            result = await tool.handler(args, ctx)
        if not isinstance(result, dict):
            raise TypeError(f"handler returned {type(result).__name__}, not dict")
        return to_jsonable_python(result)
    except TimeoutError:
        log.warning("tool %s timed out after %.1fs", tool.name, ctx.tool_timeout_s)
        raise _Outcome("timeout", _timeout(), **common, detail=detail) from None
    except Exception as exc:
        log.exception("tool %s failed", tool.name)
        raise _Outcome(
            "failed", _failed(), **common, detail={**(detail or {}), "exception": repr(exc)[:500]}
        ) from None


# --- the confirmation protocol ------------------------------------------------------------------


async def _propose(tool: Tool, args: BaseModel, ctx: ToolContext) -> _Outcome:
    now = time.time()
    action = PendingAction(
        id=new_confirmation_id(),
        tool=tool.name,
        arguments=args.model_dump(mode="json"),
        tenant=ctx.tenant,
        conversation_id=ctx.conversation_id,
        channel=ctx.channel,
        caller=ctx.caller,
        persona=ctx.persona,
        risk=tool.risk,
        summary=tool.spoken_summary(args),
        created_at=now,
        expires_at=now + ctx.confirmation_ttl_s,
    )
    try:
        await PendingStore(ctx.kv).add(action)
    except RedisError as error:
        # Refused like any Redis outage (see `run`), but the audit row keeps what the caller
        # asked for, validated, so the owner's call back can start from it.
        log.warning("tool %s: not proposed, Redis unavailable: %s", tool.name, error)
        raise _Outcome(
            "unavailable", _unavailable(), tool=tool.name, arguments=action.arguments
        ) from None
    instructions = INSTRUCTIONS + (HIGH_RISK_INSTRUCTIONS if action.risk == "high" else "")
    return _Outcome(
        "proposed",
        {
            "status": "confirmation_required",
            "confirmation_id": action.id,
            "summary": action.summary,
            "risk": action.risk,
            "expires_in_s": ctx.confirmation_ttl_s,
            "instructions": instructions,
        },
        tool=tool.name,
        arguments=action.arguments,
        detail={"summary": action.summary, "risk": action.risk},
        confirmation_id=action.id,
    )


async def _confirm(confirmation_id: str, ctx: ToolContext) -> _Outcome:
    store = PendingStore(ctx.kv)
    action = await _claimable(store, confirmation_id, ctx, attempt=CONFIRM_TOOL)
    tool = get_tool(action.tool)
    if tool is None or ctx.persona not in tool.personas:
        raise _rejection(Reason.NOT_ALLOWED, action)
    judgement = judge_replies(
        await _replies_since(action, ctx),
        risk=action.risk,
        context=action.summary,
        action=tool.name,
    )
    heard = {"reply": judgement.reply, "verdict": judgement.verdict.value}
    if not judgement.affirmed:
        raise _not_affirmed(action, judgement)
    if not await store.claim(action, State.EXECUTING):
        await _lost_race(store, action, ctx, detail=heard)
    if time.time() >= action.expires_at:  # the wait for the transcript may have crossed it
        await store.settle(action, State.EXPIRED)
        raise _rejection(Reason.EXPIRED, action, outcome="expired", detail=heard)
    detail = {**heard, "proposed_in": action.conversation_id}
    try:
        args = _stored_arguments(tool, action, detail)
        result = await _execute(
            tool, args, ctx, action.arguments, confirmation_id=action.id, detail=detail
        )
    except BaseException:
        await _settle_quietly(store, action, State.FAILED)
        raise
    await _settle_quietly(store, action, State.EXECUTED)
    return _Outcome(
        "executed",
        {"status": "executed", "confirmation_id": action.id, "result": result},
        tool=tool.name,
        arguments=action.arguments,
        detail={**detail, "result": result},
        confirmation_id=action.id,
    )


def _stored_arguments(tool: Tool, action: PendingAction, detail: dict[str, Any]) -> BaseModel:
    try:
        # Back through JSON, the form they were proposed in, so strict fields validate alike.
        return tool.args.model_validate_json(orjson.dumps(action.arguments))
    except ValidationError:
        # Only if the tool's arguments changed between proposal and confirmation (a deploy).
        log.exception("confirmation %s: stored arguments no longer valid", action.id)
        raise _Outcome(
            "failed",
            _failed(),
            tool=tool.name,
            arguments=action.arguments,
            detail={**detail, "exception": "stored arguments no longer valid"},
            confirmation_id=action.id,
        ) from None


async def _cancel(confirmation_id: str, ctx: ToolContext) -> _Outcome:
    store = PendingStore(ctx.kv)
    action = await _claimable(store, confirmation_id, ctx, attempt=CANCEL_TOOL)
    if not await store.claim(action, State.CANCELLED):
        await _lost_race(store, action, ctx, detail={})
    return _Outcome(
        "cancelled",
        {"status": "cancelled", "confirmation_id": action.id, "summary": action.summary},
        tool=action.tool,
        arguments=action.arguments,
        detail={"via": CANCEL_TOOL, "proposed_in": action.conversation_id},
        confirmation_id=action.id,
    )


async def _claimable(
    store: PendingStore, confirmation_id: str, ctx: ToolContext, *, attempt: str
) -> PendingAction:
    """The stored action if this conversation may still confirm or cancel it."""
    stored = await store.load(confirmation_id)
    party = Party(ctx.tenant, ctx.conversation_id, ctx.caller)
    action = stored.action if stored is not None else None
    reason = precheck(action, stored.state if stored else None, party, time.time())
    if reason is None and action is not None:
        return action
    if action is None or reason in (Reason.UNKNOWN, Reason.OTHER_CONVERSATION):
        # Nothing of another conversation goes into this one's audit row or result.
        raise _Outcome(
            "rejected",
            _rejected(reason or Reason.UNKNOWN, confirmation_id),
            tool=attempt,
            arguments={"confirmation_id": confirmation_id},
            detail={"reason": (reason or Reason.UNKNOWN).value},
        )
    if reason is Reason.EXPIRED:
        await store.claim(action, State.EXPIRED)  # record it; losing to a settled state is fine
        raise _rejection(reason, action, outcome="expired")
    raise _rejection(reason, action)


async def _replies_since(action: PendingAction, ctx: ToolContext) -> Replies:
    """What the caller said since the proposal, here; plus any refusal where it was proposed.

    A caller who said "no" on the call cannot have that proposal confirmed by text later.
    """
    here = await ctx.conversation.caller_replies(
        since=action.created_at, wait_s=ctx.transcript_wait_s
    )
    if action.conversation_id == ctx.conversation_id:
        return here
    there = await ConversationLog(ctx.kv, action.conversation_id).caller_replies(
        since=action.created_at, wait_s=0
    )
    # Earlier replies only count as possible refusals; the latest must be from here.
    return Replies(texts=(*there.texts, *here.texts) if here.texts else (), complete=here.complete)


async def _lost_race(
    store: PendingStore, action: PendingAction, ctx: ToolContext, *, detail: dict[str, Any]
) -> None:
    """Another process confirmed, cancelled or expired it between our read and our claim."""
    stored = await store.load(action.id)
    party = Party(ctx.tenant, ctx.conversation_id, ctx.caller)
    reason = precheck(action, stored.state if stored else State.EXPIRED, party, time.time())
    raise _rejection(reason or Reason.ALREADY_EXECUTED, action, detail=detail)


async def _settle_quietly(store: PendingStore, action: PendingAction, state: State) -> None:
    # The claim already guarantees at-most-once; the final state is bookkeeping, and a store
    # hiccup here must not turn an executed booking into a reported failure.
    try:
        await store.settle(action, state)
    except Exception:
        log.exception("confirmation %s: could not record state %s", action.id, state)


def _rejection(
    reason: Reason,
    action: PendingAction,
    *,
    outcome: str = "rejected",
    detail: dict[str, Any] | None = None,
) -> _Outcome:
    return _Outcome(
        outcome,
        _rejected(reason, action.id),
        tool=action.tool,
        arguments=action.arguments,
        detail={"reason": reason.value, **(detail or {})},
        confirmation_id=action.id,
    )


def _not_affirmed(action: PendingAction, judgement: Judgement) -> _Outcome:
    result = _rejected(Reason.NOT_AFFIRMED, action.id)
    result |= {"verdict": judgement.verdict.value, "message": judgement.message}
    return _Outcome(
        "rejected",
        result,
        tool=action.tool,
        arguments=action.arguments,
        detail={
            "reason": Reason.NOT_AFFIRMED.value,
            "verdict": judgement.verdict.value,
            "reply": judgement.reply,
        },
        confirmation_id=action.id,
    )


def _rejected(reason: Reason, confirmation_id: str) -> dict[str, Any]:
    return {
        "status": "rejected",
        "confirmation_id": confirmation_id,
        "reason": reason.value,
        "message": REASON_MESSAGES[reason],
    }


def _failed() -> dict[str, Any]:
    return {"status": "error", "error": "tool_failed", "message": FAILED_MESSAGE}


def _unavailable() -> dict[str, Any]:
    return {"status": "unavailable", "error": "store_unavailable", "message": UNAVAILABLE_MESSAGE}


def _timeout() -> dict[str, Any]:
    return {"status": "error", "error": "timeout", "message": TIMEOUT_MESSAGE}


# --- side effects that must never cost the result -----------------------------------------------


async def _audit(ctx: ToolContext, done: _Outcome, latency_ms: float) -> None:
    try:
        async with asyncio.timeout(AUDIT_TIMEOUT_S):
            await audit.record(
                ctx.db,
                tenant=ctx.tenant,
                channel=ctx.channel,
                conversation_id=ctx.conversation_id,
                caller=ctx.caller,
                tool=done.tool,
                arguments=done.arguments,
                outcome=done.outcome,
                detail=done.detail,
                latency_ms=latency_ms,
                confirmation_id=done.confirmation_id,
            )
    except Exception:
        log.critical(
            "AUDIT WRITE FAILED: tenant=%s conversation=%s tool=%s outcome=%s confirmation=%s",
            ctx.tenant,
            ctx.conversation_id,
            done.tool,
            done.outcome,
            done.confirmation_id,
            exc_info=True,
        )
        _observe(done.tool, "audit_failed", 0.0)


def _observe(tool: str, outcome: str, latency_s: float) -> None:
    for observer in _observers:
        try:
            observer(tool, outcome, latency_s)
        except Exception:
            log.exception("run observer failed")
