"""One live call: the asyncio layer that moves frames between Twilio, the model and the tools.

All decisions are made by `CallProtocol`; this module only reads sockets, feeds the protocol,
sends what it queues, runs tools off the audio path, and ends the call cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from bridge import realtime as rt
from bridge import twilio_media as tw
from bridge.call_protocol import AudioMode, CallProtocol, CallStats, ToolRequest
from tools import ToolContext, run

log = logging.getLogger("switchboard.call")

OPERATOR_PERSONA = "crm_operator"


class TwilioSocket(Protocol):
    """The server side of the Media Streams socket (Starlette's WebSocket satisfies it)."""

    async def receive(self) -> dict[str, Any]: ...
    async def send_text(self, data: str) -> None: ...
    async def close(self, code: int = 1000, reason: str | None = None) -> None: ...


class Upstream(Protocol):
    """The Realtime session (bridge.realtime.RealtimeConnection satisfies it)."""

    async def send(self, text: str) -> None: ...
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
    max_call_s: float = 3600.0
    end_call_grace_s: float = 10.0
    tool_timeout_s: float = 10.0


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
    ) -> None:
        self.setup = setup
        self._twilio = twilio
        self._upstream = upstream
        self._ctx = tool_ctx
        self._on_finished = on_finished
        self._on_caller_said = on_caller_said  # e.g. escalation rules over what callers say
        self.protocol = CallProtocol(
            stream_sid=setup.stream_sid,
            audio_mode=setup.audio_mode,
            max_frame_bytes=setup.max_frame_bytes,
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
        await self._flush_realtime()
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
            for task in [*pumps, *self._tool_tasks]:
                task.cancel()
            await asyncio.gather(*pumps, *self._tool_tasks, return_exceptions=True)
            await self._close_sockets()
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
        )
        if self._on_finished is not None:
            try:
                await self._on_finished(summary)
            except Exception:
                log.exception("call %s: saving the call record failed", self.setup.call_sid)
        return summary

    async def _twilio_pump(self) -> str:
        protocol, receive, send = self.protocol, self._twilio.receive, self._upstream.send
        while True:
            message = await receive()
            frame = message.get("text")
            if frame is None:
                frame = message.get("bytes")
                if frame is None:  # websocket.disconnect
                    return protocol.finished or "twilio socket closed"
            event = tw.parse_frame(frame)
            protocol.receive_twilio(event)
            for out in protocol.realtime_frames_to_send():
                await send(out)
            if protocol.hang_up_requested:
                self._note_progress()
            if type(event) is tw.Dtmf:
                await self._check_operator_pin()
            elif type(event) is tw.Stop:
                return protocol.finished or "caller hung up"

    async def _realtime_pump(self) -> str:
        protocol, send = self.protocol, self._twilio.send_text
        async for frame in self._upstream:
            event = rt.parse_server_event(frame)
            protocol.receive_realtime(event)
            for out in protocol.twilio_frames_to_send():
                await send(out)
            if protocol._to_realtime:
                await self._flush_realtime()
            kind = type(event)
            if kind is rt.AudioDelta:
                continue
            if protocol.hang_up_requested:
                self._note_progress()
            if kind is rt.FunctionCallDone:
                for request in protocol.tools_to_run():
                    self._start_tool(request)
            elif kind is rt.InputAudioCommitted:
                await self._conversation("caller_audio_committed", event.item_id)
            elif kind is rt.InputTranscriptDone:
                await self._conversation("caller_transcribed", event.item_id, event.transcript)
                if self._on_caller_said is not None and event.transcript:
                    self._start_background(self._on_caller_said(event.transcript), "caller-said")
            elif kind is rt.ErrorEvent:
                log.warning(
                    "call %s: realtime error %s: %s", self.setup.call_sid, event.code, event.message
                )
        return "model session closed"

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
        self.protocol.tool_finished(request, output, result)
        self._note_progress()
        await self._flush_realtime()

    async def _flush_realtime(self) -> None:
        for out in self.protocol.realtime_frames_to_send():
            await self._upstream.send(out)

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
        with contextlib.suppress(Exception):
            await self._upstream.close()
        with contextlib.suppress(Exception):
            await self._twilio.close(1000)
