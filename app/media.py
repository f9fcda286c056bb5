"""WS /media-stream: authenticate Twilio's media socket, then hand it to a CallSession.

Nothing upstream is opened before the stream proves itself: the `start` message must arrive
in time and carry the one-time token minted for this CallSid by /voice/incoming. Strangers
get close code 1008 and cost us no OpenAI session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from starlette.datastructures import URL
from starlette.websockets import WebSocketDisconnect

from app import correlation
from app.call_followup import caller_said, follow_up_call
from app.fallback import fall_back
from bridge import realtime as rt
from bridge import twilio_media as tw
from bridge.call import CallSession, CallSetup, CallSummary, TwilioSocket
from bridge.upstream import Backoff, UpstreamUnavailable, Verdict, connect_with_retry
from prompts.personas import render_instructions
from tools import ToolContext
from tools.conversation import ConversationLog
from tools.registry import realtime_tools
from tools.spool import SPOOL_KEY

if TYPE_CHECKING:
    from app.services import Services
    from app.stream_tokens import StreamGrant

log = logging.getLogger("switchboard.media")

POLICY_VIOLATION = 1008
MAX_FRAMES_BEFORE_START = 10


class MediaSocket(TwilioSocket, Protocol):
    """The socket this handler runs on: app.media_websocket's under our uvicorn config,
    Starlette's WebSocket under any other server. Disconnects raise WebSocketDisconnect."""

    @property
    def app(self) -> Any: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def url(self) -> URL: ...
    async def accept(self) -> None: ...
    async def receive_text(self) -> str: ...


async def media_stream(websocket: MediaSocket) -> None:
    services: Services = websocket.app.state.services
    settings = services.settings
    metrics = services.metrics

    from app.security import validate_ws_upgrade

    problem = validate_ws_upgrade(settings, websocket.headers, websocket.url.path)
    if problem is not None:
        log.warning("media socket refused before accept: %s", problem)
        metrics.webhook_rejections.labels(reason="ws_signature").inc()
        await websocket.close(code=POLICY_VIOLATION)
        return
    await websocket.accept()

    try:
        start = await asyncio.wait_for(_wait_for_start(websocket), settings.start_timeout_s)
    except (TimeoutError, WebSocketDisconnect) as exc:
        reason = "no start message in time" if isinstance(exc, TimeoutError) else "closed early"
        await _refuse(websocket, services, reason)
        return
    if start is None:
        await _refuse(websocket, services, "no valid start message")
        return

    correlation.bind(call_sid=start.call_sid)  # every later log line of this call carries it
    token = start.custom_parameters.get("token", "")
    grant = await services.tokens.burn(token, start.call_sid)
    if grant is None:
        await _refuse(websocket, services, f"bad or reused stream token for {start.call_sid}")
        return
    profile = services.profiles.by_id(grant.tenant)
    if profile is None:
        await _refuse(websocket, services, f"unknown profile {grant.tenant}")
        return

    def session_for(persona: str) -> dict[str, Any]:
        return rt.session_update(
            instructions=render_instructions(persona, profile),
            tools=realtime_tools(persona),
            audio_mode=settings.audio_mode,
            voice=settings.realtime_voice,
            transcription_model=settings.transcription_model,
        )

    def connect_upstream(open_timeout_s: float) -> Awaitable[rt.RealtimeConnection]:
        return rt.RealtimeConnection.connect(
            settings.openai_realtime_url,
            settings.realtime_model,
            services.openai_api_key,
            open_timeout=open_timeout_s,
        )

    def connect_failed(attempt: int, error: BaseException, verdict: Verdict) -> None:
        metrics.upstream_errors.inc()
        log.warning(
            "call %s: realtime connect attempt %d failed (%s): %s: %s",
            start.call_sid,
            attempt,
            verdict,
            type(error).__name__,
            error,
        )

    async def assistant_unavailable(why: str) -> None:
        await fall_back(
            settings=settings,
            db=services.db,
            notifier=services.notifier,
            profile=profile,
            call_sid=start.call_sid,
            caller=grant.caller,
            why=why,
        )

    try:  # connect failures: DNS, refused, 4xx/5xx handshake, timeout: retried within budget
        upstream = await connect_with_retry(
            connect_upstream,
            Backoff(budget_s=settings.realtime_retry_budget_s),
            on_failure=connect_failed,
        )
    except UpstreamUnavailable as error:
        why = f"realtime connect failed: {error}"
        await assistant_unavailable(why)
        await _save_missed_call(services, start, grant, why)
        with contextlib.suppress(RuntimeError):  # the caller may have hung up meanwhile
            await websocket.close(code=1011)
        return

    ctx = ToolContext(
        tenant=profile.id,
        profile=profile,
        channel="voice",
        conversation_id=start.call_sid,
        caller=grant.caller,
        persona=profile.persona,
        db=services.db,
        kv=services.kv,
        conversation=ConversationLog(services.kv, start.call_sid),
        notifier=getattr(services, "notifier", None),
        tool_timeout_s=settings.tool_timeout_s,
        confirmation_ttl_s=settings.confirmation_ttl_s,
        transcript_wait_s=settings.transcript_wait_s,
        # With the database down, a confirmed lead waits on local disk (tools.spool).
        extra={SPOOL_KEY: services.spool} if services.spool is not None else {},
    )
    setup = CallSetup(
        call_sid=start.call_sid,
        stream_sid=start.stream_sid,
        tenant=profile.id,
        caller=grant.caller,
        called=grant.called,
        persona=profile.persona,
        audio_mode=settings.audio_mode,
        session_for=session_for,
        greeting=profile.greeting or None,
        operator_pin=profile.operator_pin if grant.caller in profile.owner_numbers else None,
        max_frame_bytes=settings.max_frame_bytes,
        max_frames_per_s=settings.max_frames_per_s,
        frame_burst=settings.frame_burst,
        max_call_s=settings.max_call_s,
        end_call_grace_s=settings.end_call_grace_s,
        tool_timeout_s=settings.tool_timeout_s,
        reconnect_budget_s=settings.realtime_retry_budget_s,
        session_renew_after_s=settings.realtime_session_renew_s or None,
    )
    session = CallSession(
        setup,
        websocket,
        upstream,
        ctx,
        on_finished=lambda s: _save_call(services, s),
        connect_upstream=connect_upstream,
        on_upstream_lost=assistant_unavailable,
        on_caller_said=lambda text: caller_said(services, ctx, text),  # escalation backstop
    )
    services.calls[start.call_sid] = session
    metrics.active_calls.inc()
    try:
        summary = await session.run()
    finally:
        metrics.active_calls.dec()
        services.calls.pop(start.call_sid, None)
    stats = summary.stats
    metrics.frames_in.inc(stats.frames_in)
    metrics.frames_out.inc(stats.frames_out)
    metrics.barge_ins.inc(stats.barge_ins)
    metrics.upstream_errors.inc(summary.upstream.recoverable_errors)
    reconnects = getattr(metrics, "upstream_reconnects", None)
    if reconnects is not None:
        reconnects.inc(summary.upstream.restores)
    for reason, count in stats.frames_dropped.items():
        metrics.frames_dropped.labels(reason=reason).inc(count)
    # Sampled by the bridge (a few per second, not per frame), once it records them.
    for seconds in getattr(stats, "added_latency_s", ()):
        metrics.added_latency.observe(seconds)
    for seconds in getattr(stats, "barge_in_reaction_s", ()):
        metrics.barge_in_reaction.observe(seconds)
    log.info(
        "call %s ended (%s) after %.1fs: %d frames in, %d out, %d dropped, %d tool calls",
        summary.call_sid,
        summary.end_reason,
        summary.duration_s,
        stats.frames_in,
        stats.frames_out,
        sum(stats.frames_dropped.values()),
        len(summary.tool_calls),
    )
    follow_up_call(services, ctx, summary)  # lead webhook, owner summary, "Reply YES" texts


async def _wait_for_start(websocket: MediaSocket) -> tw.Start | None:
    """Read until `start`; tolerate `connected` and a few stray frames, no more."""
    for _ in range(MAX_FRAMES_BEFORE_START):
        event = tw.parse_frame(await websocket.receive_text())
        if type(event) is tw.Start:
            return event
        if type(event) is tw.Stop:
            return None
    return None


async def _refuse(websocket: MediaSocket, services: Services, reason: str) -> None:
    log.warning("media socket refused: %s", reason)
    services.metrics.webhook_rejections.labels(reason="stream_token").inc()
    try:
        await websocket.close(code=POLICY_VIOLATION, reason=reason[:120])
    except RuntimeError:
        pass  # already closed by the peer


async def _save_missed_call(
    services: Services, start: tw.Start, grant: StreamGrant, why: str
) -> None:
    """The call record of a call no Realtime session could take."""
    now = time.time()
    summary = CallSummary(
        call_sid=start.call_sid,
        tenant=grant.tenant,
        caller=grant.caller,
        called=grant.called,
        persona=grant.persona,
        started_at=now,
        ended_at=now,
        end_reason=f"assistant unavailable: {why}",
        transcript=[],
        tool_calls=[],
        usage={},
    )
    try:
        await _save_call(services, summary)
    except Exception:
        log.exception("call %s: could not save the missed call's record", start.call_sid)


async def _save_call(services: Services, summary: CallSummary) -> None:
    from tools.records import CallRecord, save_call
    from tools.spool import CALL, call_record_payload, is_store_outage

    def at(ts: float) -> datetime:
        return datetime.fromtimestamp(ts, UTC)

    record = CallRecord(
        call_sid=summary.call_sid,
        tenant=summary.tenant,
        from_number=summary.caller,
        to_number=summary.called,
        persona=summary.persona,
        started_at=at(summary.started_at),
        ended_at=at(summary.ended_at),
        status=summary.end_reason,
        transcript=summary.transcript,
        tool_calls=summary.tool_calls,
        usage=summary.usage,
    )
    try:
        await save_call(services.db, record)
    except Exception as error:
        if services.spool is None or not is_store_outage(error):
            raise
        # Not one record lost: it waits on disk and the flusher writes it once the store is back.
        await services.spool.put(CALL, call_record_payload(record))
