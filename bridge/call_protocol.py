"""The state of one live call, without I/O: what to send where when something happens.

`CallProtocol` is fed Twilio events, Realtime events and tool results, and queues the frames
to send to Twilio and to the Realtime session plus the tool calls to start (the style of the
`websockets` library: `receive_*` in, `*_to_send()` out). The asyncio layer in `bridge.call`
only moves those frames and runs the tools.

The audio hot path (one Twilio media frame in, one model audio delta out) is a few method
calls and string operations here: no parsing beyond what the event parsers already did, no
logging, no pydantic.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pybase64 import b64encode_as_string

from bridge import realtime as rt
from bridge import twilio_media as tw
from bridge.audio import InboundTranscoder, OutboundTranscoder
from bridge.playback import Playback

AudioMode = Literal["pcm16", "g711"]
MAX_DTMF_DIGITS = 16  # longer than any PIN (profiles allow 4 to 12 digits)
MAX_LATENCY_SAMPLES = 4096


@dataclass(slots=True, frozen=True)
class ToolRequest:
    """A function call the model made; the I/O layer runs it and reports back."""

    call_id: str
    name: str
    arguments: str


@dataclass(slots=True)
class CallStats:
    frames_in: int = 0
    frames_out: int = 0
    frames_dropped: dict[str, int] = field(default_factory=dict)
    barge_ins: int = 0
    upstream_errors: int = 0
    unknown_events: int = 0
    fast_path_frames: int = 0  # messages handled in a socket callback, without waking a pump
    # Sampled (not per frame) seconds from a model audio frame arriving to its Twilio frame
    # leaving; bounded so an hour-long call keeps a fixed-size record.
    added_latency_s: list[float] = field(default_factory=list)
    # Seconds from the model's speech_started arriving to the `clear` handed to the Twilio
    # socket, per barge-in that cut audio (bounded like the latency samples).
    barge_in_reaction_s: list[float] = field(default_factory=list)

    def dropped(self, reason: str) -> None:
        self.frames_dropped[reason] = self.frames_dropped.get(reason, 0) + 1

    def latency_sample(self, seconds: float) -> None:
        if len(self.added_latency_s) < MAX_LATENCY_SAMPLES:
            self.added_latency_s.append(seconds)

    def barge_in_reaction(self, seconds: float) -> None:
        if len(self.barge_in_reaction_s) < MAX_LATENCY_SAMPLES:
            self.barge_in_reaction_s.append(seconds)


class CallProtocol:
    def __init__(
        self,
        *,
        stream_sid: str,
        audio_mode: AudioMode,
        max_frame_bytes: int = 64 * 1024,
        clock: Any = time.time,
        max_frames_per_s: int = 100,
        frame_burst: int = 1000,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream_sid = stream_sid
        self.audio_mode = audio_mode
        self.max_payload_chars = max_frame_bytes
        self._clock = clock
        # Twilio sends 50 media frames a second; a stream sending far more for long is broken
        # or hostile. A token bucket (refilled at max_frames_per_s, holding up to frame_burst)
        # lets catch-up bursts after a network stall through and drops a sustained flood as
        # "rate_limited". Per frame: one clock read and a few float operations.
        self.max_frames_per_s = max_frames_per_s
        self.frame_burst = frame_burst
        self._monotonic = monotonic
        self._frame_tokens = float(frame_burst)
        self._tokens_at = monotonic()
        self._inbound = InboundTranscoder() if audio_mode == "pcm16" else None
        self._outbound = OutboundTranscoder() if audio_mode == "pcm16" else None
        self.playback = Playback(monotonic)

        self.active_response: str | None = None
        self._speaking: tuple[str, str] | None = None  # (response, item) of the latest audio
        self._cut_responses: set[str] = set()
        self._cut_items: set[str] = set()
        self._tools_running: dict[str, str] = {}
        self._response_wanted = False

        self.hang_up_requested = False
        self.finished: str | None = None  # why the call ended, once it has

        self.transcript: list[dict[str, Any]] = []
        self.tool_calls: list[dict[str, Any]] = []
        self.usage: dict[str, int] = {}
        self.dtmf_digits = ""
        self.stats = CallStats()

        self._to_twilio: list[str] = []
        self._to_realtime: list[str] = []
        self._tool_requests: list[ToolRequest] = []

    # -- outputs ---------------------------------------------------------------------------
    def twilio_frames_to_send(self) -> list[str]:
        frames, self._to_twilio = self._to_twilio, []
        return frames

    def realtime_frames_to_send(self) -> list[str]:
        frames, self._to_realtime = self._to_realtime, []
        return frames

    def tools_to_run(self) -> list[ToolRequest]:
        requests, self._tool_requests = self._tool_requests, []
        return requests

    @property
    def ready_to_hang_up(self) -> bool:
        """end_call was asked for and the goodbye has been generated and heard."""
        return (
            self.hang_up_requested
            and self.active_response is None
            and not self._tools_running
            and self.playback.queued_ms == 0
        )

    # -- session start ---------------------------------------------------------------------
    def start_session(self, session_update: dict[str, Any], greeting: str | None) -> None:
        """Configure the model, then have it speak first (it waits for us otherwise)."""
        self._to_realtime.append(rt.encode(session_update))
        self.request_response(f"Greet the caller with: {greeting}" if greeting else None)

    def update_session(self, session_update: dict[str, Any]) -> None:
        self._to_realtime.append(rt.encode(session_update))

    def request_response(self, instructions: str | None = None) -> None:
        """Ask the model to speak now, or as soon as its current response is done."""
        if self.active_response is not None:
            self._response_wanted = True
            return
        self._to_realtime.append(rt.encode(rt.response_create(instructions=instructions)))

    def upstream_replaced(self) -> bool:
        """A new Realtime session replaces a lost one: forget the old session's state.

        The old session's response will never finish and its item ids mean nothing to the new
        one. Audio of an unfinished response still queued at Twilio is cleared (the model
        answers again); audio of a finished one plays out, but its marks no longer tie it to an
        item, so no truncate can name an item the new session does not have. Frames queued for
        the old session are dropped: the replayed conversation carries what matters.
        Returns whether a response was cut off (the caller is owed an answer).
        """
        interrupted = self.active_response is not None
        if interrupted and self.playback.queued_ms:
            self._to_twilio.append(tw.clear_frame(self.stream_sid))
        self.playback.cleared()
        if interrupted and self._outbound is not None:
            self._outbound = OutboundTranscoder()
        self.active_response = None
        self._speaking = None
        self._cut_responses.clear()
        self._cut_items.clear()
        self._response_wanted = False
        self._to_realtime.clear()
        return interrupted

    # -- Twilio -> model -------------------------------------------------------------------
    def receive_twilio(self, event: tw.TwilioEvent) -> None:
        if type(event) is tw.Media:
            self._caller_audio(event)
        elif type(event) is tw.Mark:
            self.playback.acked(event.name)
        elif type(event) is tw.Dtmf:
            # Only the latest digits can complete a PIN; a caller pressing keys all call long
            # must not grow this without bound.
            self.dtmf_digits = (self.dtmf_digits + event.digit)[-MAX_DTMF_DIGITS:]
        elif type(event) is tw.Stop:
            self.finished = self.finished or "caller hung up"
        elif type(event) is tw.Malformed:
            self.stats.dropped("malformed")
        elif type(event) is tw.Unknown:
            self.stats.dropped("unknown_event")
        # connected/start after the start: harmless repeats, nothing to do.

    def _caller_audio(self, event: tw.Media) -> None:
        now = self._monotonic()
        tokens = self._frame_tokens + (now - self._tokens_at) * self.max_frames_per_s
        self._tokens_at = now
        if tokens < 1.0:
            self._frame_tokens = tokens
            self.stats.dropped("rate_limited")
            return
        self._frame_tokens = min(tokens, self.frame_burst) - 1.0
        payload = event.payload
        if len(payload) > self.max_payload_chars:
            self.stats.dropped("oversized")
            return
        self.stats.frames_in += 1
        if self._inbound is None:
            self._to_realtime.append(rt.append_audio(payload))
            return
        ulaw = event.audio  # decoded (and so validated) by tw.parse_frame
        if ulaw is None:
            try:
                ulaw = base64.b64decode(payload, validate=True)
            except ValueError:
                self.stats.dropped("bad_base64")
                return
        pcm = self._inbound.process(ulaw)
        # pybase64 (SIMD) encodes the 960 bytes in ~0.26 µs, base64.b64encode + decode in ~1.3.
        self._to_realtime.append(rt.append_audio(b64encode_as_string(pcm)))

    # -- model -> Twilio -------------------------------------------------------------------
    def receive_realtime(self, event: rt.ServerEvent) -> None:
        kind = type(event)
        if kind is rt.AudioDelta:
            self._model_audio(event)
        elif kind is rt.SpeechStarted:
            self._barge_in()
        elif kind is rt.ResponseCreated:
            self.active_response = event.response_id
        elif kind is rt.ResponseDone:
            self._response_done(event)
        elif kind is rt.FunctionCallDone:
            self._function_call(event)
        elif kind is rt.InputTranscriptDone:
            self._say("caller", event.transcript, item_id=event.item_id)
        elif kind is rt.OutputTranscriptDone:
            self._say("agent", event.transcript, item_id=event.item_id)
        elif kind is rt.ErrorEvent:
            self.stats.upstream_errors += 1
        elif kind is rt.Malformed:
            self.stats.unknown_events += 1

    def _model_audio(self, event: rt.AudioDelta) -> None:
        if event.response_id in self._cut_responses or event.item_id in self._cut_items:
            return  # late audio of a response the caller talked over
        audio = event.audio  # decoded (and so validated) by rt.parse_server_event
        if self._outbound is None:
            payload = event.delta_b64
            nbytes = _b64_decoded_len(payload) if audio is None else len(audio)
        else:
            if audio is None:
                audio = base64.b64decode(event.delta_b64)
            ulaw = self._outbound.process(audio)
            if not ulaw:
                return
            nbytes = len(ulaw)
            payload = b64encode_as_string(ulaw)  # pybase64, as in _caller_audio
        self._speaking = (event.response_id, event.item_id)
        playback, out = self.playback, self._to_twilio
        # Marks are sparse (see bridge.playback): one may close another item's audio before
        # this chunk, and one may be due after it.
        mark = playback.mark_before(event.item_id)
        if mark is not None:
            out.append(tw.mark_frame(self.stream_sid, mark))
        out.append(tw.media_frame(self.stream_sid, payload))
        mark = playback.sent(event.item_id, nbytes)
        if mark is not None:
            out.append(tw.mark_frame(self.stream_sid, mark))
        self.stats.frames_out += 1

    def _barge_in(self) -> None:
        responding = self.active_response is not None
        item = self.playback.playing_item
        if item is None and responding and self._speaking is not None:
            # Generation at real-time pace can leave Twilio's queue empty between chunks:
            # the item being spoken is still the one to cut.
            response, speaking_item = self._speaking
            if response == self.active_response:
                item = speaking_item
        if item is None and not responding:
            return  # the caller spoke into silence: nothing to interrupt
        self.stats.barge_ins += 1
        # Order matters: stop the caller hearing old audio first (the latency they notice),
        # then stop generation, then tell the model how much of its answer was really heard.
        self._to_twilio.append(tw.clear_frame(self.stream_sid))
        if responding:
            self._to_realtime.append(rt.encode(rt.response_cancel()))
            self._cut_responses.add(self.active_response)  # type: ignore[arg-type]
        if item is not None:
            # Before `cleared()`: the estimate between marks counts only until the clear.
            heard = self.playback.heard_ms(item)
            self._cut_items.add(item)
            self._to_realtime.append(rt.encode(rt.truncate(item, heard)))
        self.playback.cleared()
        if self._outbound is not None:
            self._outbound = OutboundTranscoder()  # drop resampler history of the cut audio

    def _response_done(self, event: rt.ResponseDone) -> None:
        # The response's last chunks may be unmarked: their echo is what says it was all heard
        # (ready_to_hang_up). `response.output_audio.done` comes a little earlier, but nothing
        # reads playback before the response is done (hang-up, renewal, restore all wait for
        # it), and a barge-in between the two clears the unmarked audio just the same.
        mark = self.playback.mark()
        if mark is not None:
            self._to_twilio.append(tw.mark_frame(self.stream_sid, mark))
        if self.active_response == event.response_id or event.response_id is None:
            self.active_response = None
        for key, value in (event.usage or {}).items():
            if isinstance(value, int):
                self.usage[key] = self.usage.get(key, 0) + value
        self._maybe_respond()

    def _function_call(self, event: rt.FunctionCallDone) -> None:
        self._tools_running[event.call_id] = event.name
        self._tool_requests.append(ToolRequest(event.call_id, event.name, event.arguments))

    def tool_finished(self, request: ToolRequest, output: str, result: dict[str, Any]) -> None:
        """The tool's result goes back to the model; a reply is asked for once it may be."""
        self._tools_running.pop(request.call_id, None)
        self.tool_calls.append(
            {
                "at": self._clock(),
                "name": request.name,
                "arguments": request.arguments,
                "status": result.get("status", "ok"),
                "result": result,
            }
        )
        self._to_realtime.append(rt.encode(rt.function_call_output(request.call_id, output)))
        if not self.hang_up_requested:
            self._response_wanted = True
        self._maybe_respond()

    def _maybe_respond(self) -> None:
        # response.create while a response is active is an error upstream
        # (conversation_already_has_active_response); tool outputs of one turn share one reply.
        if self._response_wanted and self.active_response is None and not self._tools_running:
            self._response_wanted = False
            self._to_realtime.append(rt.encode(rt.response_create()))

    def _say(self, role: str, text: str, *, item_id: str | None) -> None:
        if text:
            self.transcript.append(
                {"role": role, "text": text, "at": self._clock(), "item": item_id}
            )


def _b64_decoded_len(b64: str) -> int:
    return len(b64) * 3 // 4 - b64.count("=", -2)
