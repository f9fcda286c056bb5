"""One live call: the asyncio layer that moves frames between Twilio, the model and the tools.

All decisions are made by `CallProtocol`; this module only reads sockets, feeds the protocol,
sends what it queues, runs tools off the audio path, and ends the call cleanly.

Two pumps read the sockets. Where a socket offers it (the picows ones: app.media_websocket,
bridge.realtime_connection), the hot messages (caller media and marks, model audio deltas)
skip the pump: a fast-path handler takes them in the socket's frame callback while the pump
is parked, which spares a future, a task wakeup and a coroutine resume per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from websockets.exceptions import ConnectionClosed

from bridge import realtime as rt
from bridge import twilio_media as tw
from bridge.call_protocol import AudioMode, CallProtocol, CallStats, ToolRequest
from bridge.restore import ConversationHistory
from bridge.upstream import (
    Backoff,
    UpstreamUnavailable,
    Verdict,
    classify_close,
    classify_error_event,
    connect_with_retry,
)
from tools import ToolContext, run

log = logging.getLogger("switchboard.call")

OPERATOR_PERSONA = "crm_operator"
LATENCY_SAMPLE_EVERY = 25  # model frames between added-latency samples (~1 s of audio)
# Session renewal waits for a quiet moment (nobody speaking, no tool running); it looks
# this often.
QUIET_POLL_S = 0.25
# A renewal that could not connect is tried again this much later.
RENEW_RETRY_S = 30.0
# More restores than this within RESTORE_WINDOW_S means the upstream accepts and then drops
# every session: stop trying and fall back rather than loop.
MAX_RESTORES_IN_WINDOW = 5
RESTORE_WINDOW_S = 60.0
# Closing a dead upstream must not hold anything up.
CLOSE_OLD_UPSTREAM_S = 2.0

# Opens a new Realtime session; the argument is the handshake timeout in seconds.
ConnectUpstream = Callable[[float], Awaitable["Upstream"]]


class TwilioSocket(Protocol):
    """The server side of the Media Streams socket (Starlette's WebSocket satisfies it)."""

    async def receive(self) -> dict[str, Any]: ...
    async def send_text(self, data: str) -> None: ...
    async def close(self, code: int = 1000, reason: str | None = None) -> None: ...


class FastTwilioSocket(TwilioSocket, Protocol):
    """A Twilio socket with a fast path (app.media_websocket.MediaWebSocket); optional."""

    @property
    def writable(self) -> bool: ...  # a send now would not wait
    # False once the socket is not open; its receive() then yields the disconnect as well.
    def send_text_nowait(self, data: str) -> bool: ...
    # The handler gets whole text messages while receive() is parked (see CallSession).
    def set_fast_path(self, handler: Callable[[str], bool] | None) -> None: ...


class Upstream(Protocol):
    """The Realtime session (bridge.realtime.RealtimeConnection satisfies it).

    Optionally (RealtimeConnection has it) `set_fast_path(handler: Callable[[bytes], bool] |
    None)`: the handler gets whole messages while the iterator is parked (see CallSession).
    """

    async def send(self, text: str) -> None: ...
    def send_nowait(self, text: str) -> bool: ...  # never waits; False: closed, nothing sent
    @property
    def writable(self) -> bool: ...  # open and not backed up: a send now would not wait
    def __aiter__(self) -> Any: ...
    async def close(self) -> None: ...


@dataclass(slots=True)
class CallSetup:
    call_sid: str
    stream_sid: str
    tenant: str
    caller: str
    called: str
    persona: str
    audio_mode: AudioMode
    # persona -> the session.update event for it (instructions and tools of that persona)
    session_for: Callable[[str], dict[str, Any]]
    greeting: str | None = None
    operator_pin: str | None = None  # set only when the caller's number is an owner number
    max_frame_bytes: int = 64 * 1024
    max_frames_per_s: int = 100  # Twilio sends 50 (20 ms frames); more is a flood
    frame_burst: int = 1000
    max_call_s: float = 3600.0
    end_call_grace_s: float = 10.0
    tool_timeout_s: float = 10.0
    # A lost Realtime session is replaced within this budget (retries with backoff), else
    # the call falls back (apology, callback promise).
    reconnect_budget_s: float = 3.0
    # Replace the Realtime session at a quiet moment after this long, before the server's
    # 60-minute cap ends it mid-sentence; None: never.
    session_renew_after_s: float | None = None


@dataclass(slots=True)
class UpstreamStats:
    """What happened to the Realtime side of one call."""

    sessions: int = 1  # Realtime sessions used (1 + restores)
    restores: int = 0  # sessions replaced after a drop, a session-ending error or the cap
    renewals: int = 0  # of which planned (session age), at a quiet moment
    recoverable_errors: int = 0  # `error` events the session survived
    connect_failures: int = 0  # failed connection attempts while restoring or renewing
    items_replayed: int = 0  # conversation items sent to new sessions
    duplicate_tool_calls: int = 0  # function calls not run because their call_id already was
    restore_ms: list[float] = field(default_factory=list)  # loss noticed -> replay sent, each
    gave_up: str | None = None  # why the call fell back, if it did


@dataclass(slots=True)
class CallSummary:
    call_sid: str
    tenant: str
    caller: str
    called: str
    persona: str
    started_at: float
    ended_at: float
    end_reason: str
    transcript: list[dict[str, Any]]
    tool_calls: list[dict[str, Any]]
    usage: dict[str, int]
    stats: CallStats = field(default_factory=CallStats)
    upstream: UpstreamStats = field(default_factory=UpstreamStats)

    @property
    def duration_s(self) -> float:
        return self.ended_at - self.started_at


class CallSession:
    def __init__(
        self,
        setup: CallSetup,
        twilio: TwilioSocket,
        upstream: Upstream,
        tool_ctx: ToolContext,
        *,
        on_finished: Callable[[CallSummary], Awaitable[None]] | None = None,
        on_caller_said: Callable[[str], Awaitable[None]] | None = None,
        connect_upstream: ConnectUpstream | None = None,
        on_upstream_lost: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.setup = setup
        self._twilio = twilio
        self._upstream = upstream
        self._ctx = tool_ctx
        self._on_finished = on_finished
        self._on_caller_said = on_caller_said  # e.g. escalation rules over what callers say
        # Without `connect_upstream` a lost session ends the call (nothing to reconnect with);
        # `on_upstream_lost` is the fallback when no session can be had (apology, callback).
        self._connect_upstream = connect_upstream
        self._on_upstream_lost = on_upstream_lost
        self.history = ConversationHistory()
        self.upstream_stats = UpstreamStats()
        # True while the Realtime session is being replaced: caller audio is dropped (the
        # caller hears silence) and nothing is sent upstream until the replay is out.
        self._restoring = False
        self._next_upstream: Upstream | None = None  # a renewal's session, connected early
        self._session_started = time.monotonic()
        self._restored_at: deque[float] = deque(maxlen=MAX_RESTORES_IN_WINDOW)
        self._caller_speaking = False
        # The Twilio socket while the fast paths are on (it has them, and none has failed).
        self._fast_twilio: FastTwilioSocket | None = None
        self._latency_countdown = LATENCY_SAMPLE_EVERY  # model frames to the next sample
        self.protocol = CallProtocol(
            stream_sid=setup.stream_sid,
            audio_mode=setup.audio_mode,
            max_frame_bytes=setup.max_frame_bytes,
            max_frames_per_s=setup.max_frames_per_s,
            frame_burst=setup.frame_burst,
        )
        self._tool_tasks: set[asyncio.Task[None]] = set()
        self._hang_up_asked = asyncio.Event()
        self._goodbye_heard = asyncio.Event()
        self._started = time.time()
        tool_ctx.call = self

    # -- CallControl (what tools may do to the call) -----------------------------------------
    async def hang_up(self) -> None:
        self.protocol.hang_up_requested = True
        self._hang_up_asked.set()
        self._note_progress()

    async def transfer(self, number: str) -> None:
        # Bridging to a person needs Twilio's REST API (redirect the live call to <Dial>);
        # the app installs that as ctx.extra["redirect_call"]. Without it we say so and end.
        redirect = self._ctx.extra.get("redirect_call")
        if callable(redirect):
            await redirect(self.setup.call_sid, number)
        await self.hang_up()

    # -- the call ---------------------------------------------------------------------------
    async def run(self) -> CallSummary:
        protocol = self.protocol
        protocol.start_session(self.setup.session_for(self.setup.persona), self.setup.greeting)
        self._session_started = time.monotonic()
        await self._flush_realtime()
        if self._connect_upstream is not None and self.setup.session_renew_after_s is not None:
            self._start_background(self._renew_sessions(), "session-renewal")
        self._start_fast_paths()
        pumps = [
            asyncio.create_task(self._twilio_pump(), name="twilio-pump"),
            asyncio.create_task(self._realtime_pump(), name="realtime-pump"),
            asyncio.create_task(self._hang_up_when_heard(), name="hang-up"),
        ]
        reason = "max duration reached"
        try:
            done, _ = await asyncio.wait(
                pumps, timeout=self.setup.max_call_s, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                error = task.exception()
                if error is None:
                    reason = task.result()
                else:
                    log.error(
                        "call %s: %s failed", self.setup.call_sid, task.get_name(), exc_info=error
                    )
                    reason = f"{task.get_name()} failed: {type(error).__name__}"
        finally:
            self._stop_fast_paths()  # nothing is handled once the call is over
            for task in [*pumps, *self._tool_tasks]:
                task.cancel()
            await asyncio.gather(*pumps, *self._tool_tasks, return_exceptions=True)
            await self._close_sockets()
            # No tool runs any more: drop the context's way back to this session, a cycle
            # that would keep the whole call (transcoders, transcript, stats) in memory until
            # a full garbage collection.
            self._ctx.call = None
        protocol.finished = protocol.finished or reason
        summary = CallSummary(
            call_sid=self.setup.call_sid,
            tenant=self.setup.tenant,
            caller=self.setup.caller,
            called=self.setup.called,
            persona=self._ctx.persona,
            started_at=self._started,
            ended_at=time.time(),
            end_reason=protocol.finished,
            transcript=protocol.transcript,
            tool_calls=protocol.tool_calls,
            usage=protocol.usage,
            stats=protocol.stats,
            upstream=self.upstream_stats,
        )
        if self._on_finished is not None:
            try:
                await self._on_finished(summary)
            except Exception:
                log.exception("call %s: saving the call record failed", self.setup.call_sid)
        return summary

    async def _twilio_pump(self) -> str:
        protocol, receive = self.protocol, self._twilio.receive
        while True:
            message = await receive()
            frame = message.get("text")
            if frame is None:
                frame = message.get("bytes")
                if frame is None:  # websocket.disconnect
                    return protocol.finished or "twilio socket closed"
            event = tw.parse_frame(frame)
            if self._restoring and type(event) is tw.Media:
                # No session to hear it: the caller's audio is dropped, they hear silence.
                protocol.stats.dropped("upstream_restoring")
                continue
            protocol.receive_twilio(event)
            if protocol._to_realtime:
                await self._flush_realtime()
            if protocol.hang_up_requested:
                self._note_progress()
            if type(event) is tw.Dtmf:
                await self._check_operator_pin()
            elif type(event) is tw.Stop:
                return protocol.finished or "caller hung up"

    async def _realtime_pump(self) -> str:
        """Pump the current Realtime session; replace it when it is lost, while we can."""
        while True:
            verdict, why = await self._pump_session(self._upstream)
            if self.protocol.finished:
                return self.protocol.finished
            if self._connect_upstream is None:
                return "model session closed"
            if verdict is not Verdict.FATAL and await self._restore(why):
                continue
            return await self._give_up(why)

    async def _pump_session(self, upstream: Upstream) -> tuple[Verdict, str]:
        """Frames of one Realtime session until it ends; why it ended and what that means."""
        protocol, send = self.protocol, self._twilio.send_text
        history = self.history
        set_fast_path = getattr(upstream, "set_fast_path", None)
        if set_fast_path is not None and self._fast_twilio is not None:
            set_fast_path(self._realtime_fast_path)
        try:
            async for frame in upstream:
                started = self._latency_start()
                event = rt.parse_server_event(frame)
                kind = type(event)
                if kind is rt.FunctionCallDone and history.known(event.call_id):
                    # Already dispatched (answered or running): a tool never runs twice.
                    self.upstream_stats.duplicate_tool_calls += 1
                    continue
                if kind is rt.SpeechStarted:
                    # It arrived no earlier than the oldest message still queued did.
                    arrived = getattr(upstream, "queued_since", None) or time.perf_counter()
                    barge_ins = protocol.stats.barge_ins
                protocol.receive_realtime(event)
                try:
                    for out in protocol.twilio_frames_to_send():
                        await send(out)
                except Exception as gone:  # Starlette's WebSocketDisconnect, a reset socket...
                    return Verdict.FATAL, self._twilio_gone(type(gone).__name__)
                if kind is rt.SpeechStarted:
                    self._speech_started_handled(barge_ins, arrived)
                self._latency_end(kind, started)
                if protocol._to_realtime:
                    await self._flush_realtime()
                if kind is rt.AudioDelta:
                    continue
                if protocol.hang_up_requested:
                    self._note_progress()
                if kind is rt.FunctionCallDone:
                    history.tool_called(event.call_id, event.name, event.arguments)
                    for request in protocol.tools_to_run():
                        self._start_tool(request)
                elif kind is rt.InputAudioCommitted:
                    history.caller_committed(event.item_id)
                    await self._conversation("caller_audio_committed", event.item_id)
                elif kind is rt.InputTranscriptDone:
                    history.caller_said(event.item_id, event.transcript)
                    await self._conversation("caller_transcribed", event.item_id, event.transcript)
                    if self._on_caller_said is not None and event.transcript:
                        self._start_background(
                            self._on_caller_said(event.transcript), "caller-said"
                        )
                elif kind is rt.OutputTranscriptDone:
                    history.agent_said(event.item_id, event.transcript)
                elif kind is rt.SpeechStopped:
                    self._caller_speaking = False
                elif kind is rt.ErrorEvent:
                    verdict = classify_error_event(event.code, event.type)
                    log.warning(
                        "call %s: realtime error %s (%s, %s): %s",
                        self.setup.call_sid,
                        event.code,
                        event.type,
                        verdict,
                        event.message,
                    )
                    if verdict is Verdict.RECOVERABLE:
                        self.upstream_stats.recoverable_errors += 1
                    else:
                        return verdict, f"realtime error {event.code or event.type}"
        except ConnectionClosed as closed:
            # The peer's close code, else ours: when we failed the connection (a frame too big,
            # a flood) no answer is awaited, and our code says what a new session would meet.
            frame = closed.rcvd if closed.rcvd is not None else closed.sent
            code = frame.code if frame is not None else None
            return classify_close(code), f"realtime socket dropped (close code {code})"
        finally:
            if set_fast_path is not None:
                set_fast_path(None)  # a session no longer pumped is handled nowhere
        code = getattr(upstream, "close_code", None)
        if self._next_upstream is not None:
            return Verdict.RETRY, "session renewal"
        return classify_close(code), f"realtime session closed (close code {code})"

    def _twilio_gone(self, why: str) -> str:
        # The caller hung up while audio was on its way: a normal end, not a fault.
        log.info("call %s: twilio socket gone (%s)", self.setup.call_sid, why)
        reason = self.protocol.finished = self.protocol.finished or "twilio socket closed"
        return reason

    def _latency_start(self) -> float | None:
        """The clock at a model frame's arrival, read for one frame in LATENCY_SAMPLE_EVERY
        (a clock read per frame would cost more than the samples are worth)."""
        return time.perf_counter() if self._latency_countdown <= 1 else None

    def _latency_end(self, kind: type, started: float | None) -> None:
        """The frame's output is sent: count it, and sample it if it was the one timed."""
        if started is None:
            self._latency_countdown -= 1
            return
        self._latency_countdown = LATENCY_SAMPLE_EVERY
        if kind is rt.AudioDelta:
            self.protocol.stats.latency_sample(time.perf_counter() - started)

    # -- the fast paths -----------------------------------------------------------------------
    # 50 caller media frames and 50 model audio deltas a second: handed to a pump, each costs
    # a future, a task wakeup and a coroutine resume, more than the handling itself. Sockets
    # that can (see FastTwilioSocket, Upstream) call these handlers in their frame callback
    # instead, only while the pump is parked on that socket: every earlier message has then
    # been handled, so order is kept. A handler does what the pump would do for the message,
    # synchronously, or declines it (False) BEFORE changing anything (restoring, a socket that
    # would make a send wait, any other kind of event) and the pump handles it as always.
    # Never raising into the socket's callback: an unexpected error is logged once and the
    # call goes on without fast paths.

    def _start_fast_paths(self) -> None:
        set_fast_path = getattr(self._twilio, "set_fast_path", None)
        if set_fast_path is None:  # Starlette's WebSocket, test fakes: the pumps do it all
            return
        self._fast_twilio = self._twilio  # type: ignore[assignment]  # has the fast path API
        set_fast_path(self._twilio_fast_path)
        # The Realtime side is installed per session, by _pump_session.

    def _stop_fast_paths(self) -> None:
        if self._fast_twilio is None:
            return
        self._fast_twilio.set_fast_path(None)
        self._fast_twilio = None  # and no later session gets one
        set_fast_path = getattr(self._upstream, "set_fast_path", None)
        if set_fast_path is not None:
            set_fast_path(None)

    def _fast_path_failed(self) -> None:
        log.exception(
            "call %s: fast path failed; the pumps handle every message from now on",
            self.setup.call_sid,
        )
        self._stop_fast_paths()

    def _twilio_fast_path(self, frame: str) -> bool:
        """`_twilio_pump` for caller media and marks, in the Twilio socket's frame callback."""
        try:
            # The pump waits out a restore (media is dropped then) and a full upstream.
            if self._restoring or not self._upstream.writable:
                return False
            event = tw.parse_frame(frame)
            kind = type(event)
            if kind is not tw.Media and kind is not tw.Mark:
                return False  # the rest is rare, and some has work to await (a PIN, a stop)
        except Exception:
            self._fast_path_failed()
            return False  # nothing has changed: the pump handles it
        try:
            protocol = self.protocol
            protocol.receive_twilio(event)
            if protocol._to_realtime:
                self._flush_realtime_nowait()
            if protocol.hang_up_requested:
                self._note_progress()
        except Exception:
            # The call's state has changed: the message counts as handled (True), since the
            # pump handling it again could send its audio twice.
            self._fast_path_failed()
        self.protocol.stats.fast_path_frames += 1
        return True

    def _realtime_fast_path(self, frame: bytes) -> bool:
        """`_pump_session` for model audio deltas, the caller's speech starting and stopping
        (a barge-in's `clear` then leaves without waiting for a pump) and the events the pump
        only passes over, in the Realtime socket's frame callback."""
        try:
            twilio = self._fast_twilio
            if self._restoring or twilio is None or not twilio.writable:
                return False  # the pump waits for room (or finds the socket gone)
            started = self._latency_start()
            event = rt.parse_server_event(frame)
            kind = type(event)
            # Other: transcript deltas and the like, as frequent as the audio and nothing to
            # do; a pump woken for them would make the next delta queue behind them.
            if kind is not rt.AudioDelta and kind is not rt.Other:
                if kind is not rt.SpeechStarted and kind is not rt.SpeechStopped:
                    return False
                if not self._upstream.writable:
                    return False  # a barge-in's cancel and truncate would have to wait
        except Exception:
            self._fast_path_failed()
            return False  # nothing has changed: the pump handles it
        try:
            protocol = self.protocol
            if kind is rt.SpeechStarted:
                arrived = time.perf_counter()  # its parse (~1 µs) is not counted
                barge_ins = protocol.stats.barge_ins
            protocol.receive_realtime(event)
            if self._send_to_twilio_nowait(twilio):
                self._latency_end(kind, started)
                if protocol._to_realtime:
                    self._flush_realtime_nowait()
                if kind is not rt.AudioDelta:
                    if kind is rt.SpeechStarted:
                        self._speech_started_handled(barge_ins, arrived)
                    elif kind is rt.SpeechStopped:
                        self._caller_speaking = False
                    if protocol.hang_up_requested:
                        self._note_progress()
        except Exception:
            # The call's state has changed: the message counts as handled (True), since the
            # pump handling it again could send its audio twice.
            self._fast_path_failed()
        self.protocol.stats.fast_path_frames += 1
        return True

    def _speech_started_handled(self, barge_ins: int, arrived: float) -> None:
        """The caller started speaking, and what that sent to Twilio has been handed to its
        socket: if it was a barge-in (a `clear`), how long after `arrived` that was."""
        self._caller_speaking = True
        stats = self.protocol.stats
        if stats.barge_ins != barge_ins:
            stats.barge_in_reaction(time.perf_counter() - arrived)

    def _send_to_twilio_nowait(self, twilio: FastTwilioSocket) -> bool:
        """What the protocol queued for Twilio, sent now; False if the socket is gone.

        Then the call ends as when _pump_session's send fails, though no pump returns from
        here: the Twilio socket has queued its disconnect, and the Twilio pump that reads it
        ends the call with the reason set here.
        """
        send = twilio.send_text_nowait
        for out in self.protocol.twilio_frames_to_send():
            if not send(out):
                self._twilio_gone("closed")
                return False
        return True

    def _flush_realtime_nowait(self) -> None:
        """`_flush_realtime` for the fast paths, which checked that no send has to wait."""
        send = self._upstream.send_nowait
        for out in self.protocol.realtime_frames_to_send():
            if not send(out):
                return  # closed: the realtime pump sees the drop; the replay carries the rest

    # -- losing and restoring the Realtime session ------------------------------------------
    async def _restore(self, why: str) -> bool:
        """Replace the lost session: same instructions and tools, the conversation replayed.

        False when no new session could be had within the budget (or sessions keep dying).
        """
        call_sid, protocol, stats = self.setup.call_sid, self.protocol, self.upstream_stats
        now = time.monotonic()
        if (
            len(self._restored_at) == MAX_RESTORES_IN_WINDOW
            and now - self._restored_at[0] < RESTORE_WINDOW_S
        ):
            log.error("call %s: realtime sessions keep failing (%s): giving up", call_sid, why)
            return False
        self._restoring = True
        # The old session stays the current one until a new one is connected; nothing is
        # sent to it meanwhile (`_restoring`), and it is closed off the call's path.
        self._start_background(_close_quietly(self._upstream), "close-old-upstream")
        started = time.monotonic()
        try:
            upstream = self._next_upstream
            self._next_upstream = None
            if upstream is None:
                log.warning("call %s: %s; reconnecting", call_sid, why)
                try:
                    upstream = await connect_with_retry(
                        self._connect_upstream,  # type: ignore[arg-type]
                        Backoff(budget_s=self.setup.reconnect_budget_s),
                        on_failure=self._connect_failed,
                    )
                except UpstreamUnavailable as error:
                    log.error("call %s: no new realtime session: %s", call_sid, error)
                    return False
            self._upstream = upstream
            # From here to the end of the replay nothing may await between reading the state
            # and queueing the events built from it, except the sends themselves.
            interrupted = protocol.upstream_replaced()
            events = [self.setup.session_for(self._ctx.persona), *self.history.replay_events()]
            owed = interrupted or self.history.awaits_reply
            if owed and not self.history.pending_calls and not protocol.hang_up_requested:
                events.append(rt.response_create())
            for out in protocol.twilio_frames_to_send():
                await self._twilio.send_text(out)
            try:
                for event in events:
                    await upstream.send(rt.encode(event))
            except ConnectionClosed:
                pass  # died already: the pump sees it at once and tries again
        finally:
            self._restoring = False
        self._restored_at.append(time.monotonic())
        self._session_started = time.monotonic()
        stats.sessions += 1
        stats.restores += 1
        stats.items_replayed += len(events) - 1 - (events[-1]["type"] == "response.create")
        stats.restore_ms.append((time.monotonic() - started) * 1000)
        log.info(
            "call %s: realtime session restored in %.0f ms (%d items replayed, %s)",
            call_sid,
            stats.restore_ms[-1],
            len(events) - 1,
            why,
        )
        await self._flush_realtime()  # tool outputs that arrived during the replay
        self._note_progress()
        return True

    def _connect_failed(self, attempt: int, error: BaseException, verdict: Verdict) -> None:
        self.upstream_stats.connect_failures += 1
        log.warning(
            "call %s: realtime connect attempt %d failed (%s): %s: %s",
            self.setup.call_sid,
            attempt,
            verdict,
            type(error).__name__,
            error,
        )

    async def _give_up(self, why: str) -> str:
        """No Realtime session: fall back (apology and callback promise), then end the call."""
        reason = f"assistant unavailable: {why}"
        self.protocol.finished = self.protocol.finished or reason
        self.upstream_stats.gave_up = why
        log.error("call %s: %s; falling back", self.setup.call_sid, why)
        if self._on_upstream_lost is not None:
            try:
                await self._on_upstream_lost(why)
            except Exception:
                log.exception("call %s: the fallback failed", self.setup.call_sid)
        return reason

    def _quiet(self) -> bool:
        """Nobody is speaking or about to: a session can be swapped unnoticed."""
        protocol = self.protocol
        return (
            not self._restoring
            and not self._caller_speaking
            and protocol.active_response is None
            and protocol.playback.queued_ms == 0
            and not self.history.pending_calls
        )

    async def _renew_sessions(self) -> None:
        """Replace the session before the server's cap ends it, at a quiet moment."""
        after = self.setup.session_renew_after_s
        assert after is not None and self._connect_upstream is not None
        while True:
            await asyncio.sleep(max(0.0, self._session_started + after - time.monotonic()))
            if time.monotonic() - self._session_started < after:
                continue  # a restore replaced the session meanwhile
            while not self._quiet():  # noqa: ASYNC110 - quiet is several pumps' state
                await asyncio.sleep(QUIET_POLL_S)
            try:
                upstream = await connect_with_retry(
                    self._connect_upstream,
                    Backoff(budget_s=self.setup.reconnect_budget_s),
                    on_failure=self._connect_failed,
                )
            except UpstreamUnavailable as error:
                log.warning("call %s: session renewal postponed: %s", self.setup.call_sid, error)
                self._session_started = time.monotonic() - after + RENEW_RETRY_S
                continue
            # Held ready (and closed with the call if it never gets swapped in); if the old
            # session dies meanwhile, the restore takes this one at once.
            self._next_upstream = upstream
            while not self._quiet() and self._next_upstream is upstream:  # noqa: ASYNC110
                await asyncio.sleep(QUIET_POLL_S)
            if self._next_upstream is not upstream:
                continue  # a restore already used it
            log.info("call %s: renewing the realtime session", self.setup.call_sid)
            self.upstream_stats.renewals += 1
            self._restoring = True  # from now on caller audio waits for the new session
            # Closing the old session ends its pump, which restores onto `upstream`. Not
            # bounded here: websockets gives up on a silent peer after its close timeout and
            # aborts the connection, which ends the pump just the same.
            with contextlib.suppress(Exception):
                await self._upstream.close()

    async def _conversation(self, method: str, *args: str) -> None:
        # The confirmation protocol reads what the caller said from here; a store hiccup
        # must not end the call, only leave confirmations unanswerable (they fail safe).
        try:
            await getattr(self._ctx.conversation, method)(*args)
        except Exception:
            log.exception("call %s: conversation log %s failed", self.setup.call_sid, method)

    def _start_tool(self, request: ToolRequest) -> None:
        self._start_background(self._run_tool(request), f"tool:{request.name}")

    def _start_background(self, work: Awaitable[None], name: str) -> None:
        # Off the audio path; cancelled with the call, failures logged (never raised into it).
        async def guarded() -> None:
            try:
                await work
            except Exception:
                log.exception("call %s: %s failed", self.setup.call_sid, name)

        task = asyncio.create_task(guarded(), name=name)
        self._tool_tasks.add(task)
        task.add_done_callback(self._tool_tasks.discard)

    async def _run_tool(self, request: ToolRequest) -> None:
        try:
            result = await asyncio.wait_for(
                run(request.name, request.arguments, self._ctx),
                timeout=self.setup.tool_timeout_s + 1.0,
            )
        except TimeoutError:
            result = {"status": "error", "error": "timeout"}
        output = orjson.dumps(result, default=str).decode()
        # Both at once (no await between): a session restore sees the output in exactly one
        # place, the replay or the frames still to send.
        self.protocol.tool_finished(request, output, result)
        self.history.tool_answered(request.call_id, output)
        self._note_progress()
        await self._flush_realtime()

    async def _flush_realtime(self) -> None:
        if self._restoring:
            return  # queued frames go to the new session once its replay is out
        try:
            for out in self.protocol.realtime_frames_to_send():
                await self._upstream.send(out)
        except ConnectionClosed:
            pass  # the realtime pump sees the drop; the replay carries what was lost here

    async def _check_operator_pin(self) -> None:
        pin = self.setup.operator_pin
        if pin is None or self._ctx.persona == OPERATOR_PERSONA:
            return
        if not self.protocol.dtmf_digits.endswith(pin):
            return
        self.protocol.dtmf_digits = ""
        self._ctx.persona = OPERATOR_PERSONA
        log.info(
            "call %s: operator PIN accepted, switching to the CRM operator", self.setup.call_sid
        )
        self.protocol.update_session(self.setup.session_for(OPERATOR_PERSONA))
        self.protocol.request_response(
            "The owner has unlocked CRM operator mode with their PIN. "
            "Greet them briefly and ask what they need."
        )
        await self._flush_realtime()

    def _note_progress(self) -> None:
        if self.protocol.ready_to_hang_up:
            self._goodbye_heard.set()

    async def _hang_up_when_heard(self) -> str:
        await self._hang_up_asked.wait()
        # The goodbye may still be generating or playing; give it a bounded time to finish.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._goodbye_heard.wait(), self.setup.end_call_grace_s)
        return "agent ended the call"

    async def _close_sockets(self) -> None:
        if self._next_upstream is not None:  # a renewal's session never swapped in
            await _close_quietly(self._next_upstream)
        with contextlib.suppress(Exception):
            await self._upstream.close()
        with contextlib.suppress(Exception):
            await self._twilio.close(1000)


async def _close_quietly(upstream: Upstream) -> None:
    # A dead peer may never answer the closing handshake; a bounded wait, errors ignored.
    with contextlib.suppress(Exception):
        await asyncio.wait_for(upstream.close(), CLOSE_OLD_UPSTREAM_S)
