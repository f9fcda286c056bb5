"""A local stand-in for the OpenAI Realtime API (GA) over WebSocket.

It speaks the GA protocol closely enough that the bridge cannot tell it from OpenAI: the same
handshake (`/v1/realtime?model=...`, `Authorization: Bearer ...`, 401 without it), the same
events in the same order, the same errors for the same mistakes (`response.create` during a
response, truncating past the generated audio, unknown events), server VAD on the audio it is
sent, paced audio out, function calls that wait for their output, and barge-in.

What it says and does comes from a `Scenario` (bridge/sim/scenario.py); its voice is the
deterministic synthetic speech of bridge/sim/voice.py. Every connection leaves a
`SessionRecord` (events both ways, what was spoken, caller turns, tool calls, truncations)
so tests can assert on what the bridge did.

Layout: `EmulatorSession` is the protocol, sans-I/O (frames in, frames out, one paced output
step at a time); `Emulator` / `run_emulator` / `serve` are the thin websockets server.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import itertools
import logging
import math
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import numpy as np
import orjson
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from bridge.audio import Downsampler24to8, Upsampler8to24
from bridge.sim import voice
from bridge.sim.scenario import BUILTINS, CallPlan, Scenario, ScriptRun, SpeakPlan, load_scenario
from bridge.sim.voice import AudioFormat
from bridge.twilio_media import is_base64_text

log = logging.getLogger("switchboard.emulator")

REALTIME_PATH = "/v1/realtime"
DEFAULT_MODEL = "gpt-realtime"
CHUNK_MS = 40  # audio per response.output_audio.delta
ARGUMENT_CHUNK_CHARS = 24  # function-call arguments per delta
ECHO_TAIL_MS = 1000  # echo mode: this much digital silence ends the echoed utterance
MAX_FRAME_BYTES = 16 * 1024 * 1024  # OpenAI accepts up to 15 MiB of audio per append
VAD_FRAME_MS = 10
VAD_MIN_SPEECH_MS = 30  # shorter bursts (clicks) do not start a turn
MIN_COMMIT_MS = 100  # OpenAI refuses to commit less audio than this

CLIENT_EVENT_TYPES = (
    "session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
    "conversation.item.create",
    "conversation.item.retrieve",
    "conversation.item.truncate",
    "conversation.item.delete",
    "response.create",
    "response.cancel",
    "output_audio_buffer.clear",
)

_SESSION_KEYS = frozenset(
    {
        "type",
        "model",
        "instructions",
        "output_modalities",
        "audio",
        "tools",
        "tool_choice",
        "max_output_tokens",
        "parallel_tool_calls",
        "reasoning",
        "truncation",
        "tracing",
        "prompt",
        "include",
    }
)
_AUDIO_INPUT_KEYS = frozenset({"format", "noise_reduction", "transcription", "turn_detection"})
_AUDIO_OUTPUT_KEYS = frozenset({"format", "voice", "speed"})
_TOOL_KEYS = frozenset({"type", "name", "description", "parameters"})
_SERVER_VAD_DEFAULTS: dict[str, Any] = {
    "threshold": 0.5,
    "prefix_padding_ms": 300,
    "silence_duration_ms": 500,
    "idle_timeout_ms": None,
    "create_response": True,
    "interrupt_response": True,
}
_SEMANTIC_VAD_DEFAULTS: dict[str, Any] = {
    "eagerness": "auto",
    "create_response": True,
    "interrupt_response": True,
}
# semantic_vad waits longer for the end of a turn the less eager it is.
_SEMANTIC_SILENCE_MS = {"high": 300, "medium": 600, "auto": 600, "low": 1000}
_RESPONSE_OPTION_KEYS = frozenset(
    {
        "conversation",
        "input",
        "instructions",
        "tools",
        "tool_choice",
        "output_modalities",
        "audio",
        "max_output_tokens",
        "metadata",
        "prompt",
        "parallel_tool_calls",
        "reasoning",
    }
)
_USER_PART_KEYS = ("type", "text", "audio", "transcript", "image_url", "detail")


def default_session(model: str) -> dict[str, Any]:
    """The configuration a new session starts with (what OpenAI announces in session.created)."""
    return {
        "type": "realtime",
        "model": model,
        "output_modalities": ["audio"],
        "instructions": "",
        "tools": [],
        "tool_choice": "auto",
        "max_output_tokens": "inf",
        "tracing": None,
        "truncation": "auto",
        "prompt": None,
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "transcription": None,
                "noise_reduction": None,
                "turn_detection": {"type": "server_vad", **_SERVER_VAD_DEFAULTS},
            },
            "output": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "voice": "marin",
                "speed": 1.0,
            },
        },
    }


class ClientError(Exception):
    """A client mistake, reported as an `error` event (the connection stays open)."""

    def __init__(self, message: str, *, code: str | None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


# --- what a session leaves behind -------------------------------------------------------------


@dataclass(slots=True)
class SpokenItem:
    """One assistant audio item: what was generated and how much of it was sent."""

    item_id: str
    response_id: str
    text: str
    format: AudioFormat
    utterance: voice.Utterance | None  # None for echoed audio
    audio: bytearray = field(repr=False)  # all audio generated for the item so far
    sent_bytes: int = 0
    cancelled: bool = False
    truncated_at_ms: int | None = None

    @property
    def bytes_per_ms(self) -> int:
        return voice.bytes_per_ms(self.format)

    @property
    def sent_ms(self) -> float:
        return self.sent_bytes / self.bytes_per_ms

    @property
    def total_ms(self) -> float:
        return len(self.audio) / self.bytes_per_ms

    @property
    def sent_audio(self) -> bytes:
        return bytes(self.audio[: self.sent_bytes])

    @property
    def words_sent(self) -> list[str]:
        if self.utterance is None:
            return []
        return [s.word for s in self.utterance.segments if s.start_ms < self.sent_ms]


@dataclass(slots=True)
class UserTurn:
    item_id: str
    audio_start_ms: int
    audio_end_ms: int
    transcript: str
    scripted: bool  # the scenario was waiting for this turn (a `hear` step)


@dataclass(slots=True)
class ToolCallRecord:
    call_id: str
    item_id: str
    name: str
    arguments: str
    output: str | None = None


@dataclass(slots=True)
class SessionRecord:
    """Everything one connection did, for assertions."""

    index: int
    model: str
    scenario: str
    client_events: list[dict[str, Any]] = field(default_factory=list, repr=False)
    server_events: list[dict[str, Any]] = field(default_factory=list, repr=False)
    spoken: list[SpokenItem] = field(default_factory=list)
    user_turns: list[UserTurn] = field(default_factory=list)
    tool_calls: list[ToolCallRecord] = field(default_factory=list)
    truncations: list[tuple[str, int]] = field(default_factory=list)
    script_errors: list[str] = field(default_factory=list)
    session: dict[str, Any] = field(default_factory=dict)
    input_audio_ms: float = 0.0
    closed: bool = False
    close_code: int | None = None

    def sent(self, event_type: str) -> list[dict[str, Any]]:
        """Server events of one type, in order."""
        return [e for e in self.server_events if e["type"] == event_type]

    def received(self, event_type: str) -> list[dict[str, Any]]:
        """Client events of one type, in order."""
        return [e for e in self.client_events if e.get("type") == event_type]

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [e["error"] for e in self.server_events if e["type"] == "error"]


# --- server VAD -------------------------------------------------------------------------------


class EnergyVad:
    """Turn detection on signal energy, timed by samples received (never by the wall clock).

    A 10 ms frame is speech when its RMS reaches `threshold_rms`; 30 ms of speech starts a
    turn, `silence_ms` of non-speech ends it. Times are ms of input audio since the session
    started, like OpenAI's `audio_start_ms` / `audio_end_ms`.
    """

    def __init__(self, rate: int, *, threshold_rms: float, silence_ms: int, origin_ms: int) -> None:
        self._frame = rate * VAD_FRAME_MS // 1000
        self._threshold_sq = threshold_rms * threshold_rms
        self._silence_frames = max(1, silence_ms // VAD_FRAME_MS)
        self._min_speech_frames = VAD_MIN_SPEECH_MS // VAD_FRAME_MS
        self._pending = np.zeros(0, dtype=np.int16)
        self._frames_done = 0
        self._origin_ms = origin_ms
        self.in_speech = False
        self._speech_run = 0
        self._silence_run = 0

    def feed(self, samples: np.ndarray) -> list[tuple[str, int]]:
        """Add samples; returns ("start", ms of the first speech frame) / ("stop", ms now)."""
        if len(self._pending):
            samples = np.concatenate((self._pending, samples))
        whole = len(samples) // self._frame
        self._pending = samples[whole * self._frame :].copy()
        if whole == 0:
            return []
        frames = samples[: whole * self._frame].astype(np.float64).reshape(whole, self._frame)
        loud = np.mean(frames * frames, axis=1) >= self._threshold_sq
        changes: list[tuple[str, int]] = []
        for is_speech in loud.tolist():
            self._frames_done += 1
            if is_speech:
                self._speech_run += 1
                self._silence_run = 0
                if not self.in_speech and self._speech_run >= self._min_speech_frames:
                    self.in_speech = True
                    first = self._frames_done - self._speech_run
                    changes.append(("start", self._origin_ms + first * VAD_FRAME_MS))
            else:
                self._speech_run = 0
                if self.in_speech:
                    self._silence_run += 1
                    if self._silence_run >= self._silence_frames:
                        self.in_speech = False
                        self._silence_run = 0
                        changes.append(("stop", self._origin_ms + self._frames_done * VAD_FRAME_MS))
        return changes

    def reset(self) -> None:
        self.in_speech = False
        self._speech_run = 0
        self._silence_run = 0


def threshold_rms(threshold: float) -> float:
    """Map OpenAI's 0..1 VAD threshold onto a level: 0.5 is -35 dBFS, each 0.1 is 5 dB."""
    return 32768.0 * 10.0 ** ((-60.0 + 50.0 * threshold) / 20.0)


# --- the protocol -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Response:
    id: str
    conversation_id: str | None
    output_format: dict[str, Any]
    voice_name: Any
    modalities: list[str]
    metadata: dict[str, str] | None
    max_output_tokens: Any
    plan_outputs: list[SpeakPlan | CallPlan]
    output: list[dict[str, Any]] = field(default_factory=list)
    begun: int = 0  # outputs that have started
    open_item: SpokenItem | None = None
    open_output_index: int = 0
    steps: Iterator[float] | None = None
    audio_ms: float = 0.0
    text_chars: int = 0
    echo: bool = False  # an echo-mode response: appended audio flows back into it
    echo_quiet_ms: float = 0.0


class EmulatorSession:
    """One Realtime connection, sans-I/O.

    Feed client frames to `receive`; send what `data_to_send` returns; while `has_output`,
    call `step_output` and wait the milliseconds it returns before the next call (that is the
    audio pacing). `close_request` is set when the server wants to close the socket.
    """

    def __init__(
        self,
        scenario: Scenario,
        record: SessionRecord,
        *,
        keep_events: bool = True,
        chunk_ms: int = CHUNK_MS,
        echo: bool = False,
    ) -> None:
        self.record = record
        self._keep = keep_events
        self._chunk_ms = chunk_ms
        self._echo = echo or scenario.echo
        self._run = ScriptRun(scenario)
        record.script_errors = self._run.errors
        self._tag = secrets.token_hex(4)
        self._counter = itertools.count(1)
        self._outbox: list[bytes] = []
        self.close_request: tuple[int, str] | None = None

        self._session = default_session(record.model)
        record.session = self._session
        self._conversation_id = self._new_id("conv")
        self._items: dict[str, dict[str, Any]] = {}  # conversation items, in order
        self._audio_items: dict[str, SpokenItem] = {}
        self._calls: dict[str, ToolCallRecord] = {}
        self._voice_locked = False
        self._response: _Response | None = None
        self._last_input_tokens = 0

        self._input_ms = 0.0
        self._buffer_ms = 0.0
        self._odd_byte = b""
        self._echo_resampler: Upsampler8to24 | Downsampler24to8 | None = None
        self._vad: EnergyVad | None = None
        self._speech_item: str | None = None
        self._speech_start_ms = 0
        self._configure_vad()

    # -- public surface --------------------------------------------------------------------
    def open(self, *, beta_header: bool = False) -> None:
        """The socket is open: announce the session (or refuse a beta client like OpenAI)."""
        if beta_header:
            self._emit_error(
                "The Realtime Beta API is no longer supported. Please use /v1/realtime for "
                "the GA API.",
                code="beta_api_shape_disabled",
            )
            self.close_request = (4000, "beta_api_shape_disabled")
            return
        self._emit({"type": "session.created", "session": copy.deepcopy(self._session)})

    def receive(self, frame: str | bytes) -> None:
        try:
            event = orjson.loads(frame)
        except orjson.JSONDecodeError as exc:
            self._emit_error(f"Invalid JSON in client event: {exc}", code="invalid_json")
            return
        if type(event) is not dict:
            self._emit_error("A client event must be a JSON object.", code="invalid_json")
            return
        if self._keep:
            self.record.client_events.append(event)
        kind = event.get("type")
        # The hot path first: 50 appends a second per call, everything else is rare.
        if kind == "input_audio_buffer.append" and self._echo:
            self._echo_append(event)
            return
        handler = self._HANDLERS.get(kind) if type(kind) is str else None
        event_id = event.get("event_id")
        if event_id is not None and type(event_id) is not str:
            self._emit_error("Invalid type for 'event_id': expected a string.", code="invalid_type")
            return
        if handler is None:
            if kind is None:
                error = ClientError(
                    "Missing required parameter: 'type'.",
                    code="missing_required_parameter",
                    param="type",
                )
            else:
                supported = ", ".join(f"'{t}'" for t in CLIENT_EVENT_TYPES)
                error = ClientError(
                    f"Invalid value: {kind!r}. Supported values are: {supported}.",
                    code="invalid_value",
                    param="type",
                )
            self._emit_error(error.message, code=error.code, param=error.param, event_id=event_id)
            return
        try:
            handler(self, event)
        except ClientError as error:
            self._emit_error(error.message, code=error.code, param=error.param, event_id=event_id)

    def data_to_send(self) -> list[bytes]:
        frames, self._outbox = self._outbox, []
        return frames

    @property
    def has_output(self) -> bool:
        return self._response is not None and self._response.steps is not None

    def step_output(self) -> float | None:
        """Advance the active response by one step; the ms to wait before the next step."""
        response = self._response
        if response is None or response.steps is None:
            return None
        try:
            return next(response.steps)
        except StopIteration:
            return 0.0

    def connection_closed(self, code: int | None) -> None:
        if self._response is not None and self._response.steps is not None:
            self._response.steps.close()
        self._response = None
        self.record.closed = True
        self.record.close_code = code

    # -- ids and emission ------------------------------------------------------------------
    def _new_id(self, prefix: str) -> str:
        return f"{prefix}_{self._tag}{next(self._counter):06d}"

    def _emit(self, event: dict[str, Any]) -> None:
        event["event_id"] = self._new_id("event")
        self._outbox.append(orjson.dumps(event))
        if self._keep:
            self.record.server_events.append(event)

    def _emit_error(
        self,
        message: str,
        *,
        code: str | None,
        param: str | None = None,
        event_id: str | None = None,
    ) -> None:
        self._emit(
            {
                "type": "error",
                "error": {
                    "type": "invalid_request_error",
                    "code": code,
                    "message": message,
                    "param": param,
                    "event_id": event_id,
                },
            }
        )

    # -- session ---------------------------------------------------------------------------
    @property
    def _input_format(self) -> AudioFormat:
        return self._session["audio"]["input"]["format"]["type"]

    @property
    def _output_format(self) -> AudioFormat:
        return self._session["audio"]["output"]["format"]["type"]

    @property
    def _turn_detection(self) -> dict[str, Any] | None:
        return self._session["audio"]["input"]["turn_detection"]

    def _on_session_update(self, event: dict[str, Any]) -> None:
        update = _require(event, "session", dict)
        if "type" not in update:
            raise ClientError(
                "Missing required parameter: 'session.type'.",
                code="missing_required_parameter",
                param="session.type",
            )
        if update["type"] != "realtime":
            raise ClientError(
                f"Invalid value: {update['type']!r}. This session is a 'realtime' session.",
                code="invalid_value",
                param="session.type",
            )
        _reject_unknown(update, _SESSION_KEYS, "session")
        merged = copy.deepcopy(self._session)
        for key, value in update.items():
            if key == "audio":
                _merge_audio(merged["audio"], _typed(value, dict, "session.audio"))
            elif key == "model":
                if value != merged["model"]:
                    raise ClientError(
                        "Cannot update a session's model.",
                        code="invalid_value",
                        param="session.model",
                    )
            elif key == "tools":
                merged["tools"] = [
                    _check_tool(t, i) for i, t in enumerate(_typed(value, list, "session.tools"))
                ]
            elif key == "instructions":
                merged["instructions"] = _typed(value, str, "session.instructions")
            elif key == "output_modalities":
                modalities = _typed(value, list, "session.output_modalities")
                if modalities not in (["audio"], ["text"]):
                    raise ClientError(
                        "Invalid value for 'session.output_modalities': use ['audio'] or ['text'].",
                        code="invalid_value",
                        param="session.output_modalities",
                    )
                merged["output_modalities"] = modalities
            elif key == "max_output_tokens":
                if value != "inf" and not (type(value) is int and 1 <= value <= 4096):
                    raise ClientError(
                        "Invalid 'session.max_output_tokens': an integer 1-4096 or 'inf'.",
                        code="invalid_value",
                        param="session.max_output_tokens",
                    )
                merged["max_output_tokens"] = value
            elif key != "type":
                merged[key] = copy.deepcopy(value)
        voice_after = merged["audio"]["output"].get("voice")
        if self._voice_locked and voice_after != self._session["audio"]["output"].get("voice"):
            raise ClientError(
                "Cannot update a conversation's voice if assistant audio is present.",
                code="cannot_update_voice",
                param="session.audio.output.voice",
            )
        input_format_before = self._input_format
        turn_detection_before = self._turn_detection
        self._session = merged
        self.record.session = merged
        if (
            self._input_format != input_format_before
            or self._turn_detection != turn_detection_before
        ):
            self._configure_vad()
        self._emit({"type": "session.updated", "session": copy.deepcopy(merged)})

    def _configure_vad(self) -> None:
        detection = self._turn_detection
        self._odd_byte = b""
        if detection is None or self._echo:
            self._vad = None
            return
        if detection["type"] == "server_vad":
            silence_ms = detection.get("silence_duration_ms") or 500
            threshold = detection.get("threshold")
        else:
            silence_ms = _SEMANTIC_SILENCE_MS[detection.get("eagerness") or "auto"]
            threshold = None
        self._vad = EnergyVad(
            voice.sample_rate(self._input_format),
            threshold_rms=threshold_rms(0.5 if threshold is None else threshold),
            silence_ms=silence_ms,
            origin_ms=round(self._input_ms),
        )
        self._speech_item = None

    # -- audio in --------------------------------------------------------------------------
    def _on_append(self, event: dict[str, Any]) -> None:
        audio = _require(event, "audio", str)
        try:
            data = binascii.a2b_base64(audio, strict_mode=True)
        except binascii.Error as exc:
            raise ClientError(
                f"Invalid 'audio': expected base64-encoded audio bytes ({exc}).",
                code="invalid_value",
                param="audio",
            ) from exc
        fmt = self._input_format
        if fmt == "audio/pcm" and (self._odd_byte or len(data) % 2):
            data = self._odd_byte + data
            self._odd_byte = data[-1:] if len(data) % 2 else b""
            data = data[: len(data) - len(self._odd_byte)]
        ms = len(data) / voice.bytes_per_ms(fmt)
        self._input_ms += ms
        self._buffer_ms += ms
        self.record.input_audio_ms = self._input_ms
        if self._vad is None or not data:
            return
        for change, at_ms in self._vad.feed(voice.decode_to_pcm16(data, fmt)):
            if change == "start":
                self._speech_started(at_ms)
            else:
                self._speech_stopped(at_ms)

    def _speech_started(self, at_ms: int) -> None:
        detection = self._turn_detection or {}
        prefix = detection.get("prefix_padding_ms") or 0
        self._speech_item = self._new_id("item")
        self._speech_start_ms = max(0, at_ms - prefix)
        self._emit(
            {
                "type": "input_audio_buffer.speech_started",
                "audio_start_ms": self._speech_start_ms,
                "item_id": self._speech_item,
            }
        )
        if self._response is not None and detection.get("interrupt_response", True):
            self._cancel_response("turn_detected")

    def _speech_stopped(self, at_ms: int) -> None:
        item_id = self._speech_item or self._new_id("item")
        self._speech_item = None
        self._emit(
            {"type": "input_audio_buffer.speech_stopped", "audio_end_ms": at_ms, "item_id": item_id}
        )
        detection = self._turn_detection or {}
        self._commit(
            item_id, self._speech_start_ms, at_ms, respond=detection.get("create_response", True)
        )

    def _on_commit(self, event: dict[str, Any]) -> None:
        if self._buffer_ms < MIN_COMMIT_MS:
            raise ClientError(
                "Error committing input audio buffer: buffer too small. Expected at least "
                f"{MIN_COMMIT_MS}ms of audio, but buffer only has {self._buffer_ms:.2f}ms of "
                "audio.",
                code="input_audio_buffer_commit_empty",
            )
        item_id = self._speech_item or self._new_id("item")
        self._speech_item = None
        if self._vad is not None:
            self._vad.reset()
        end = round(self._input_ms)
        self._commit(item_id, round(end - self._buffer_ms), end, respond=False)

    def _on_clear(self, event: dict[str, Any]) -> None:
        self._buffer_ms = 0.0
        self._speech_item = None
        if self._vad is not None:
            self._vad.reset()
        self._emit({"type": "input_audio_buffer.cleared"})

    def _commit(self, item_id: str, start_ms: int, end_ms: int, *, respond: bool) -> None:
        self._buffer_ms = 0.0
        transcript, scripted = self._run.caller_turn()
        self.record.user_turns.append(UserTurn(item_id, start_ms, end_ms, transcript, scripted))
        previous = self._last_item_id()
        self._emit(
            {
                "type": "input_audio_buffer.committed",
                "item_id": item_id,
                "previous_item_id": previous,
            }
        )
        item = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "status": "completed",
            "role": "user",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        self._add_item(item, previous)
        after_created: list[dict[str, Any]] = []
        # OpenAI transcribes only when the session asks for it (audio.input.transcription).
        if self._session["audio"]["input"]["transcription"] is not None:
            audio_tokens = max(1, (end_ms - start_ms) // 100)
            text_tokens = max(1, math.ceil(len(transcript) / 4))
            after_created.append(
                {
                    "type": "conversation.item.input_audio_transcription.completed",
                    "item_id": item_id,
                    "content_index": 0,
                    "transcript": transcript,
                    "usage": {
                        "type": "tokens",
                        "input_tokens": audio_tokens,
                        "output_tokens": text_tokens,
                        "total_tokens": audio_tokens + text_tokens,
                        "input_token_details": {"audio_tokens": audio_tokens, "text_tokens": 0},
                    },
                }
            )
        if respond and self._response is None:
            # Transcription runs alongside the response, so it lands after response.created.
            self._start_response({}, after_created=after_created)
        else:
            for event in after_created:
                self._emit(event)

    # -- echo mode -------------------------------------------------------------------------
    def _echo_append(self, event: dict[str, Any]) -> None:
        audio = event.get("audio")
        if type(audio) is not str or not audio or not is_base64_text(audio):
            self._emit_error(
                "Invalid 'audio': expected base64-encoded audio bytes.",
                code="invalid_value",
                param="audio",
                event_id=event.get("event_id"),
            )
            return
        # Digital silence is one repeated base64 symbol ("/" for mu-law 0xFF, "A" for PCM
        # zeros); a padded last group (at most two samples) is left out of the check.
        whole = len(audio) - 4 if audio[-1] == "=" else len(audio)
        silent = audio.count(audio[0], 0, whole) == whole
        in_bytes = len(audio) * 3 // 4 - audio.count("=", -2)
        self._input_ms += in_bytes / voice.bytes_per_ms(self._input_format)
        response = self._response
        if response is None:
            if silent:
                return
            response = self._open_echo_response()
        elif not response.echo:
            return  # a scripted response is running (asked for with response.create)
        spoken = response.open_item
        assert spoken is not None
        if self._output_format != self._input_format:
            audio = self._transcode_echo(audio)
            in_bytes = len(audio) * 3 // 4 - audio.count("=", -2)
        ms = in_bytes / spoken.bytes_per_ms
        spoken.sent_bytes += in_bytes
        response.audio_ms += ms
        if self._keep:
            spoken.audio += base64.b64decode(audio)
        self._emit(
            {
                "type": "response.output_audio.delta",
                "response_id": response.id,
                "item_id": spoken.item_id,
                "output_index": 0,
                "content_index": 0,
                "delta": audio,
            }
        )
        response.echo_quiet_ms = response.echo_quiet_ms + ms if silent else 0.0
        if response.echo_quiet_ms >= ECHO_TAIL_MS:
            self._close_speech(response, spoken, "completed")
            self._finish_response(response, "completed")

    def _open_echo_response(self) -> _Response:
        response = self._new_response({})
        response.echo = True
        self._emit(
            {"type": "response.created", "response": self._response_object(response, "in_progress")}
        )
        spoken = SpokenItem(
            item_id=self._new_id("item"),
            response_id=response.id,
            text="",
            format=self._output_format,
            utterance=None,
            audio=bytearray(),
        )
        self._begin_speech(response, spoken, 0)
        self._response = response
        return response

    def _transcode_echo(self, audio: str) -> str:
        # Only when the client asked for different input and output formats: not the load-test
        # path, which uses one format both ways and sends the client's own base64 back.
        pcm = voice.decode_to_pcm16(base64.b64decode(audio), self._input_format).tobytes()
        rate_in = voice.sample_rate(self._input_format)
        rate_out = voice.sample_rate(self._output_format)
        if rate_in != rate_out:
            if self._echo_resampler is None:
                self._echo_resampler = (
                    Upsampler8to24() if rate_in < rate_out else Downsampler24to8()
                )
            pcm = self._echo_resampler.process(pcm)
        out = voice.encode_pcm16(np.frombuffer(pcm, dtype="<i2"), self._output_format)
        return base64.b64encode(out).decode("ascii")

    # -- conversation items ----------------------------------------------------------------
    def _last_item_id(self) -> str | None:
        return next(reversed(self._items), None)

    def _add_item(self, item: dict[str, Any], previous: str | None) -> None:
        self._items[item["id"]] = item
        self._emit(
            {
                "type": "conversation.item.added",
                "item": copy.deepcopy(item),
                "previous_item_id": previous,
            }
        )
        self._emit(
            {
                "type": "conversation.item.done",
                "item": copy.deepcopy(item),
                "previous_item_id": previous,
            }
        )

    def _on_item_create(self, event: dict[str, Any]) -> None:
        raw = _require(event, "item", dict)
        previous = event.get("previous_item_id")
        if previous is not None and previous != "root" and previous not in self._items:
            raise ClientError(
                f"Previous item with id {previous!r} not found in the conversation.",
                code="invalid_value",
                param="previous_item_id",
            )
        kind = raw.get("type")
        item_id = raw.get("id") or self._new_id("item")
        if type(item_id) is not str:
            raise ClientError(
                "Invalid type for 'item.id': expected a string.",
                code="invalid_type",
                param="item.id",
            )
        if item_id in self._items:
            raise ClientError(
                f"Item with id {item_id!r} already exists.", code="invalid_value", param="item.id"
            )
        if kind == "function_call_output":
            call_id = _require(raw, "call_id", str, "item.call_id")
            output = _require(raw, "output", str, "item.output")
            call = self._calls.get(call_id)
            if call is None:
                raise ClientError(
                    f"Tool call ID {call_id!r} not found in conversation.",
                    code="invalid_value",
                    param="item.call_id",
                )
            item = {
                "id": item_id,
                "object": "realtime.item",
                "type": "function_call_output",
                "status": "completed",
                "call_id": call_id,
                "output": output,
            }
            call.output = output
            self._run.tool_output(output)
        elif kind == "function_call":
            item = {
                "id": item_id,
                "object": "realtime.item",
                "type": "function_call",
                "status": "completed",
                "call_id": _require(raw, "call_id", str, "item.call_id"),
                "name": _require(raw, "name", str, "item.name"),
                "arguments": _require(raw, "arguments", str, "item.arguments"),
            }
            # A client-created call (a restored conversation) can be answered later, as with
            # OpenAI: the output of a tool still running when the session was replaced.
            self._calls[item["call_id"]] = ToolCallRecord(
                item["call_id"], item_id, item["name"], item["arguments"]
            )
        elif kind == "message":
            role = raw.get("role")
            if role not in ("user", "system", "assistant"):
                raise ClientError(
                    f"Invalid value: {role!r}. Supported values are: 'user', 'system', "
                    "'assistant'.",
                    code="invalid_value",
                    param="item.role",
                )
            content = _require(raw, "content", list, "item.content")
            parts = []
            for index, part in enumerate(content):
                if type(part) is not dict or type(part.get("type")) is not str:
                    raise ClientError(
                        f"Invalid 'item.content[{index}]': expected an object with a 'type'.",
                        code="invalid_type",
                        param=f"item.content[{index}]",
                    )
                parts.append({k: part[k] for k in _USER_PART_KEYS if k in part and k != "audio"})
            item = {
                "id": item_id,
                "object": "realtime.item",
                "type": "message",
                "status": "completed",
                "role": role,
                "content": parts,
            }
        else:
            raise ClientError(
                f"Invalid value: {kind!r}. Supported values are: 'message', 'function_call', "
                "'function_call_output'.",
                code="invalid_value",
                param="item.type",
            )
        self._add_item(item, previous if previous is not None else self._last_item_id())

    def _on_item_truncate(self, event: dict[str, Any]) -> None:
        item_id = _require(event, "item_id", str)
        content_index = _require(event, "content_index", int)
        audio_end_ms = _require(event, "audio_end_ms", int)
        spoken = self._audio_items.get(item_id)
        if spoken is None:
            if item_id in self._items:
                raise ClientError(
                    "Only assistant messages with audio can be truncated.",
                    code="invalid_value",
                    param="item_id",
                )
            raise ClientError(
                f"Item with item_id {item_id!r} not found.", code="invalid_value", param="item_id"
            )
        if content_index != 0:
            raise ClientError(
                f"Invalid 'content_index': item {item_id} has no audio content at index "
                f"{content_index}.",
                code="invalid_value",
                param="content_index",
            )
        if audio_end_ms < 0:
            raise ClientError(
                "Invalid 'audio_end_ms': must not be negative.",
                code="invalid_value",
                param="audio_end_ms",
            )
        if audio_end_ms > spoken.sent_ms:
            raise ClientError(
                f"Audio content of {int(spoken.sent_ms)}ms is already shorter than "
                f"{audio_end_ms}ms",
                code="invalid_value",
                param="audio_end_ms",
            )
        spoken.truncated_at_ms = audio_end_ms
        self.record.truncations.append((item_id, audio_end_ms))
        self._emit(
            {
                "type": "conversation.item.truncated",
                "item_id": item_id,
                "content_index": 0,
                "audio_end_ms": audio_end_ms,
            }
        )

    def _on_item_delete(self, event: dict[str, Any]) -> None:
        item_id = _require(event, "item_id", str)
        if self._items.pop(item_id, None) is None:
            raise ClientError(
                f"Item with item_id {item_id!r} not found.", code="invalid_value", param="item_id"
            )
        self._emit({"type": "conversation.item.deleted", "item_id": item_id})

    def _on_item_retrieve(self, event: dict[str, Any]) -> None:
        item_id = _require(event, "item_id", str)
        item = self._items.get(item_id)
        if item is None:
            raise ClientError(
                f"Item with item_id {item_id!r} not found.", code="invalid_value", param="item_id"
            )
        item = copy.deepcopy(item)
        spoken = self._audio_items.get(item_id)
        if spoken is not None and item["content"]:
            item["content"][0]["audio"] = base64.b64encode(spoken.sent_audio).decode("ascii")
        self._emit({"type": "conversation.item.retrieved", "item": item})

    # -- responses -------------------------------------------------------------------------
    def _on_response_create(self, event: dict[str, Any]) -> None:
        options = event.get("response", {})
        if type(options) is not dict:
            raise ClientError(
                "Invalid type for 'response': expected an object.",
                code="invalid_type",
                param="response",
            )
        _reject_unknown(options, _RESPONSE_OPTION_KEYS, "response")
        if self._response is not None:
            raise ClientError(
                f"Conversation already has an active response in progress: {self._response.id}. "
                "Wait until the response is finished before creating a new one.",
                code="conversation_already_has_active_response",
            )
        self._start_response(options)

    def _on_response_cancel(self, event: dict[str, Any]) -> None:
        wanted = event.get("response_id")
        active = self._response
        if active is None or (wanted is not None and wanted != active.id):
            raise ClientError(
                "Cancellation failed: no active response found", code="response_cancel_not_active"
            )
        self._cancel_response("client_cancelled")

    def _on_output_buffer_clear(self, event: dict[str, Any]) -> None:
        raise ClientError(
            "output_audio_buffer.clear is only supported for WebRTC and SIP connections.",
            code="invalid_value",
            param="type",
        )

    def _new_response(self, options: dict[str, Any]) -> _Response:
        out = self._session["audio"]["output"]
        audio_options = (options.get("audio") or {}).get("output") or {}
        fmt = out["format"]
        if "format" in audio_options:
            fmt = _check_format(audio_options["format"], "response.audio.output.format")
        return _Response(
            id=self._new_id("resp"),
            conversation_id=None
            if options.get("conversation") == "none"
            else self._conversation_id,
            output_format=copy.deepcopy(fmt),
            voice_name=audio_options.get("voice") or out["voice"],
            modalities=list(options.get("output_modalities") or self._session["output_modalities"]),
            metadata=options.get("metadata"),
            max_output_tokens=options.get("max_output_tokens", self._session["max_output_tokens"]),
            plan_outputs=[],
        )

    def _start_response(
        self, options: dict[str, Any], *, after_created: list[dict[str, Any]] | None = None
    ) -> None:
        response = self._new_response(options)
        plan = self._run.next_response()
        response.plan_outputs = list(plan.outputs)
        self._emit(
            {"type": "response.created", "response": self._response_object(response, "in_progress")}
        )
        self._emit(
            {
                "type": "rate_limits.updated",
                "rate_limits": [
                    {
                        "name": "requests",
                        "limit": 20000,
                        "remaining": 19999,
                        "reset_seconds": 0.003,
                    },
                    {
                        "name": "tokens",
                        "limit": 4000000,
                        "remaining": 3995904,
                        "reset_seconds": 0.061,
                    },
                ],
            }
        )
        for event in after_created or ():
            self._emit(event)
        response.steps = self._play(response, plan.trailing_ms)
        self._response = response

    def _play(self, response: _Response, trailing_ms: int) -> Iterator[float]:
        for index, output in enumerate(response.plan_outputs):
            if output.lead_in_ms:
                yield float(output.lead_in_ms)
            response.begun = index + 1
            if isinstance(output, SpeakPlan):
                yield from self._speak(response, index, output.text)
            else:
                self._function_call(response, index, output)
        if trailing_ms:
            yield float(trailing_ms)
        self._finish_response(response, "completed")

    def _begin_speech(self, response: _Response, spoken: SpokenItem, output_index: int) -> None:
        item = _assistant_item(spoken.item_id, "in_progress", [])
        previous = self._last_item_id()
        self._emit(
            {
                "type": "response.output_item.added",
                "response_id": response.id,
                "output_index": output_index,
                "item": copy.deepcopy(item),
            }
        )
        if response.conversation_id is not None:
            self._items[spoken.item_id] = item
            self._emit(
                {
                    "type": "conversation.item.added",
                    "item": copy.deepcopy(item),
                    "previous_item_id": previous,
                }
            )
        part_type = "audio" if "audio" in response.modalities else "text"
        self._emit(
            {
                "type": "response.content_part.added",
                "response_id": response.id,
                "item_id": spoken.item_id,
                "output_index": output_index,
                "content_index": 0,
                "part": {"type": part_type, "transcript": ""}
                if part_type == "audio"
                else {"type": "text", "text": ""},
            }
        )
        response.open_item = spoken
        response.open_output_index = output_index
        self.record.spoken.append(spoken)
        self._audio_items[spoken.item_id] = spoken
        self._voice_locked = True

    def _speak(self, response: _Response, output_index: int, text: str) -> Iterator[float]:
        fmt: AudioFormat = response.output_format.get("type", self._output_format)
        utterance, audio = voice.synthesize(text, fmt)
        spoken = SpokenItem(
            item_id=self._new_id("item"),
            response_id=response.id,
            text=utterance.text,
            format=fmt,
            utterance=utterance,
            audio=bytearray(audio),
        )
        self._begin_speech(response, spoken, output_index)
        ids = {
            "response_id": response.id,
            "item_id": spoken.item_id,
            "output_index": output_index,
            "content_index": 0,
        }
        if "audio" not in response.modalities:
            for n, segment in enumerate(utterance.segments):
                self._emit(
                    {
                        "type": "response.output_text.delta",
                        **ids,
                        "delta": segment.word if n == 0 else " " + segment.word,
                    }
                )
            spoken.sent_bytes = len(spoken.audio)
            response.text_chars += len(utterance.text)
            self._close_speech(response, spoken, "completed")
            return
        step = self._chunk_ms * spoken.bytes_per_ms
        segments = utterance.segments
        words = 0
        for offset in range(0, len(audio), step):
            chunk = audio[offset : offset + step]
            end_ms = (offset + len(chunk)) / spoken.bytes_per_ms
            while words < len(segments) and segments[words].start_ms < end_ms:
                word = segments[words].word
                self._emit(
                    {
                        "type": "response.output_audio_transcript.delta",
                        **ids,
                        "delta": word if words == 0 else " " + word,
                    }
                )
                words += 1
            self._emit(
                {
                    "type": "response.output_audio.delta",
                    **ids,
                    "delta": base64.b64encode(chunk).decode("ascii"),
                }
            )
            spoken.sent_bytes += len(chunk)
            ms = len(chunk) / spoken.bytes_per_ms
            response.audio_ms += ms
            yield ms
        self._close_speech(response, spoken, "completed")

    def _close_speech(self, response: _Response, spoken: SpokenItem, status: str) -> None:
        index = response.open_output_index
        ids = {
            "response_id": response.id,
            "item_id": spoken.item_id,
            "output_index": index,
            "content_index": 0,
        }
        if "audio" in response.modalities:
            transcript = " ".join(spoken.words_sent) if spoken.utterance is not None else ""
            response.text_chars += len(transcript)
            self._emit({"type": "response.output_audio.done", **ids})
            self._emit(
                {"type": "response.output_audio_transcript.done", **ids, "transcript": transcript}
            )
            part = {"type": "audio", "transcript": transcript}
            content = [{"type": "output_audio", "transcript": transcript}]
        else:
            transcript = spoken.text
            self._emit({"type": "response.output_text.done", **ids, "text": transcript})
            part = {"type": "text", "text": transcript}
            content = [{"type": "output_text", "text": transcript}]
        self._emit({"type": "response.content_part.done", **ids, "part": part})
        item = _assistant_item(spoken.item_id, status, content)
        self._emit(
            {
                "type": "response.output_item.done",
                "response_id": response.id,
                "output_index": index,
                "item": copy.deepcopy(item),
            }
        )
        if response.conversation_id is not None:
            previous = self._previous_of(spoken.item_id)
            self._items[spoken.item_id] = item
            self._emit(
                {
                    "type": "conversation.item.done",
                    "item": copy.deepcopy(item),
                    "previous_item_id": previous,
                }
            )
        response.output.append(item)
        response.open_item = None

    def _previous_of(self, item_id: str) -> str | None:
        previous = None
        for key in self._items:
            if key == item_id:
                return previous
            previous = key
        return previous

    def _function_call(self, response: _Response, output_index: int, plan: CallPlan) -> None:
        item_id, call_id = self._new_id("item"), self._new_id("call")
        item: dict[str, Any] = {
            "id": item_id,
            "object": "realtime.item",
            "type": "function_call",
            "status": "in_progress",
            "name": plan.name,
            "call_id": call_id,
            "arguments": "",
        }
        previous = self._last_item_id()
        self._emit(
            {
                "type": "response.output_item.added",
                "response_id": response.id,
                "output_index": output_index,
                "item": copy.deepcopy(item),
            }
        )
        if response.conversation_id is not None:
            self._items[item_id] = item
            self._emit(
                {
                    "type": "conversation.item.added",
                    "item": copy.deepcopy(item),
                    "previous_item_id": previous,
                }
            )
        ids = {
            "response_id": response.id,
            "item_id": item_id,
            "output_index": output_index,
            "call_id": call_id,
        }
        for start in range(0, len(plan.arguments), ARGUMENT_CHUNK_CHARS):
            delta = plan.arguments[start : start + ARGUMENT_CHUNK_CHARS]
            self._emit({"type": "response.function_call_arguments.delta", **ids, "delta": delta})
        self._emit(
            {
                "type": "response.function_call_arguments.done",
                **ids,
                "name": plan.name,
                "arguments": plan.arguments,
            }
        )
        item = {**item, "status": "completed", "arguments": plan.arguments}
        self._emit(
            {
                "type": "response.output_item.done",
                "response_id": response.id,
                "output_index": output_index,
                "item": copy.deepcopy(item),
            }
        )
        if response.conversation_id is not None:
            self._items[item_id] = item
            self._emit(
                {
                    "type": "conversation.item.done",
                    "item": copy.deepcopy(item),
                    "previous_item_id": previous,
                }
            )
        response.output.append(item)
        response.text_chars += len(plan.arguments)
        record = ToolCallRecord(call_id, item_id, plan.name, plan.arguments)
        self._calls[call_id] = record
        self.record.tool_calls.append(record)

    def _cancel_response(self, reason: str) -> None:
        response = self._response
        assert response is not None
        if response.steps is not None:
            response.steps.close()
        spoken = response.open_item
        if spoken is not None:
            spoken.cancelled = True
            del spoken.audio[spoken.sent_bytes :]  # what was never generated does not exist
            self._close_speech(response, spoken, "incomplete")
        # Outputs the model never began are still to come in a later response.
        unstarted = response.plan_outputs[response.begun :]
        if unstarted:
            self._run.rewind(unstarted[0].step_index)
        self._finish_response(response, "cancelled", reason)

    def _finish_response(self, response: _Response, status: str, reason: str | None = None) -> None:
        self._response = None
        response.steps = None
        self._emit(
            {"type": "response.done", "response": self._response_object(response, status, reason)}
        )

    def _response_object(
        self, response: _Response, status: str, reason: str | None = None
    ) -> dict[str, Any]:
        done = status != "in_progress"
        return {
            "object": "realtime.response",
            "id": response.id,
            "status": status,
            "status_details": (
                {"type": "cancelled", "reason": reason} if status == "cancelled" else None
            ),
            "output": copy.deepcopy(response.output) if done else [],
            "conversation_id": response.conversation_id,
            "output_modalities": list(response.modalities),
            "max_output_tokens": response.max_output_tokens,
            "audio": {
                "output": {
                    "format": copy.deepcopy(response.output_format),
                    "voice": response.voice_name,
                }
            },
            "usage": self._usage(response) if done else None,
            "metadata": response.metadata,
        }

    def _usage(self, response: _Response) -> dict[str, Any]:
        # OpenAI's units: caller audio 1 token per 100 ms, model audio 1 per 50 ms, text ~4
        # characters a token; the whole conversation is input to every response.
        earlier_speech_ms = sum(
            s.sent_ms for s in self._audio_items.values() if s.response_id != response.id
        )
        audio_in = round(self._input_ms / 100 + earlier_speech_ms / 50)
        text_chars = len(self._session["instructions"]) + len(orjson.dumps(self._session["tools"]))
        text_chars += sum(_text_chars(item) for item in self._items.values())
        text_in = math.ceil(text_chars / 4)
        input_tokens = audio_in + text_in
        cached = min(self._last_input_tokens, input_tokens) // 64 * 64
        self._last_input_tokens = input_tokens
        cached_audio = min(cached, audio_in)
        audio_out = round(response.audio_ms / 50)
        text_out = math.ceil(response.text_chars / 4)
        return {
            "total_tokens": input_tokens + audio_out + text_out,
            "input_tokens": input_tokens,
            "output_tokens": audio_out + text_out,
            "input_token_details": {
                "text_tokens": text_in,
                "audio_tokens": audio_in,
                "image_tokens": 0,
                "cached_tokens": cached,
                "cached_tokens_details": {
                    "text_tokens": cached - cached_audio,
                    "audio_tokens": cached_audio,
                    "image_tokens": 0,
                },
            },
            "output_token_details": {"text_tokens": text_out, "audio_tokens": audio_out},
        }

    _HANDLERS: ClassVar[dict[str, Callable[[EmulatorSession, dict[str, Any]], None]]] = {
        "session.update": _on_session_update,
        "input_audio_buffer.append": _on_append,
        "input_audio_buffer.commit": _on_commit,
        "input_audio_buffer.clear": _on_clear,
        "conversation.item.create": _on_item_create,
        "conversation.item.retrieve": _on_item_retrieve,
        "conversation.item.truncate": _on_item_truncate,
        "conversation.item.delete": _on_item_delete,
        "response.create": _on_response_create,
        "response.cancel": _on_response_cancel,
        "output_audio_buffer.clear": _on_output_buffer_clear,
    }


def _text_chars(item: dict[str, Any]) -> int:
    """The text an item adds to the model's context (what input text tokens are counted on)."""
    chars = sum(len(item.get(key) or "") for key in ("arguments", "output", "name"))
    for part in item.get("content", ()):
        chars += len(part.get("text") or "") + len(part.get("transcript") or "")
    return chars


def _assistant_item(item_id: str, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": item_id,
        "object": "realtime.item",
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content,
    }


# --- validation helpers, with OpenAI's wording ------------------------------------------------

_JSON_KIND = {
    str: "a string",
    int: "an integer",
    dict: "an object",
    list: "an array",
    bool: "a boolean",
}


def _require(container: dict[str, Any], key: str, kind: type, param: str | None = None) -> Any:
    param = param or key
    if key not in container:
        raise ClientError(
            f"Missing required parameter: '{param}'.",
            code="missing_required_parameter",
            param=param,
        )
    return _typed(container[key], kind, param)


def _typed(value: Any, kind: type, param: str) -> Any:
    if type(value) is not kind:
        got = _JSON_KIND.get(type(value), "null" if value is None else "a number")
        raise ClientError(
            f"Invalid type for '{param}': expected {_JSON_KIND[kind]}, but got {got} instead.",
            code="invalid_type",
            param=param,
        )
    return value


def _reject_unknown(update: dict[str, Any], known: frozenset[str], where: str) -> None:
    for key in update:
        if key not in known:
            raise ClientError(
                f"Unknown parameter: '{where}.{key}'.",
                code="unknown_parameter",
                param=f"{where}.{key}",
            )


def _check_format(value: Any, param: str) -> dict[str, Any]:
    fmt = _typed(value, dict, param)
    kind = fmt.get("type")
    if kind == "audio/pcm":
        _reject_unknown(fmt, frozenset({"type", "rate"}), param)
        if fmt.get("rate", 24000) != 24000:
            raise ClientError(
                f"Invalid '{param}.rate': audio/pcm is 24000 Hz only.",
                code="invalid_value",
                param=f"{param}.rate",
            )
        return {"type": "audio/pcm", "rate": 24000}
    if kind in ("audio/pcmu", "audio/pcma"):
        _reject_unknown(fmt, frozenset({"type"}), param)
        return {"type": kind}
    raise ClientError(
        f"Invalid value: {kind!r}. Supported values are: 'audio/pcm', 'audio/pcmu', 'audio/pcma'.",
        code="invalid_value",
        param=f"{param}.type",
    )


def _merge_audio(current: dict[str, Any], update: dict[str, Any]) -> None:
    _reject_unknown(update, frozenset({"input", "output"}), "session.audio")
    if "input" in update:
        patch = _typed(update["input"], dict, "session.audio.input")
        _reject_unknown(patch, _AUDIO_INPUT_KEYS, "session.audio.input")
        target = current["input"]
        for key, value in patch.items():
            param = f"session.audio.input.{key}"
            if key == "format":
                target["format"] = _check_format(value, param)
            elif key == "turn_detection":
                target["turn_detection"] = _check_turn_detection(value, param)
            elif value is None:
                target[key] = None
            else:
                target[key] = copy.deepcopy(_typed(value, dict, param))
    if "output" in update:
        patch = _typed(update["output"], dict, "session.audio.output")
        _reject_unknown(patch, _AUDIO_OUTPUT_KEYS, "session.audio.output")
        target = current["output"]
        for key, value in patch.items():
            param = f"session.audio.output.{key}"
            if key == "format":
                target["format"] = _check_format(value, param)
            elif key == "speed":
                if type(value) not in (int, float) or not 0.25 <= value <= 1.5:
                    raise ClientError(
                        f"Invalid '{param}': a number from 0.25 to 1.5.",
                        code="invalid_value",
                        param=param,
                    )
                target["speed"] = float(value)
            else:
                target["voice"] = copy.deepcopy(value)


def _check_turn_detection(value: Any, param: str) -> dict[str, Any] | None:
    if value is None:
        return None
    detection = _typed(value, dict, param)
    kind = detection.get("type")
    if kind == "server_vad":
        defaults = _SERVER_VAD_DEFAULTS
    elif kind == "semantic_vad":
        defaults = _SEMANTIC_VAD_DEFAULTS
    else:
        raise ClientError(
            f"Invalid value: {kind!r}. Supported values are: 'server_vad', 'semantic_vad'.",
            code="invalid_value",
            param=f"{param}.type",
        )
    _reject_unknown(detection, frozenset(defaults) | {"type"}, param)
    threshold = detection.get("threshold", 0.5)
    if type(threshold) not in (int, float) or not 0.0 <= threshold <= 1.0:
        raise ClientError(
            f"Invalid '{param}.threshold': a number from 0 to 1.",
            code="invalid_value",
            param=f"{param}.threshold",
        )
    merged = {"type": kind, **defaults, **detection}
    if "threshold" in merged:
        merged["threshold"] = float(merged["threshold"])
    return merged


def _check_tool(tool: Any, index: int) -> dict[str, Any]:
    param = f"session.tools[{index}]"
    tool = _typed(tool, dict, param)
    _reject_unknown(tool, _TOOL_KEYS, param)
    if tool.get("type", "function") != "function":
        raise ClientError(
            f"Invalid value for '{param}.type': the emulator supports function tools only.",
            code="invalid_value",
            param=f"{param}.type",
        )
    _require(tool, "name", str, f"{param}.name")
    return copy.deepcopy(tool)


# --- the server -------------------------------------------------------------------------------


class Emulator:
    """A running emulator: its `url` and the `sessions` it has served (one record each)."""

    def __init__(
        self,
        scenario: Scenario,
        *,
        echo: bool,
        speed: float,
        chunk_ms: int,
        record: bool,
    ) -> None:
        self.scenario = scenario
        self.echo = echo
        self.speed = speed
        self.chunk_ms = chunk_ms
        self.record = record
        self.sessions: list[SessionRecord] = []
        self.connections = 0
        self.host = ""
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}{REALTIME_PATH}"

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        if url.path != REALTIME_PATH:
            return _http_error(connection, HTTPStatus.NOT_FOUND, f"Invalid URL (GET {url.path})")
        authorization = request.headers.get("Authorization", "")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _http_error(
                connection,
                HTTPStatus.UNAUTHORIZED,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            )
        if not parse_qs(url.query).get("model"):
            return _http_error(
                connection, HTTPStatus.BAD_REQUEST, "Missing required parameter: 'model'."
            )
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        model = parse_qs(urlsplit(ws.request.path).query)["model"][0]
        self.connections += 1
        record = SessionRecord(index=self.connections - 1, model=model, scenario=self.scenario.name)
        if self.record:
            self.sessions.append(record)
        session = EmulatorSession(
            self.scenario,
            record,
            keep_events=self.record,
            chunk_ms=self.chunk_ms,
            echo=self.echo,
        )
        lock = asyncio.Lock()
        wake = asyncio.Event()

        async def flush() -> None:
            frames = session.data_to_send()
            if frames:
                async with lock:
                    for frame in frames:
                        await ws.send(frame, text=True)

        async def pump() -> None:
            loop = asyncio.get_running_loop()
            while True:
                await wake.wait()
                deadline = loop.time()
                while (ms := session.step_output()) is not None:
                    await flush()
                    if self.speed > 0 and ms > 0:
                        deadline = max(deadline + ms / 1000.0 / self.speed, loop.time() - 0.2)
                        await asyncio.sleep(max(0.0, deadline - loop.time()))
                    else:
                        await asyncio.sleep(0)
                wake.clear()

        session.open(beta_header=ws.request.headers.get("OpenAI-Beta") is not None)
        pump_task = asyncio.create_task(pump())
        try:
            await flush()
            while session.close_request is None:
                frame = await ws.recv()
                session.receive(frame)
                await flush()
                if session.has_output:
                    wake.set()
            await ws.close(*session.close_request)
        except ConnectionClosed:
            pass
        finally:
            pump_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump_task
            session.connection_closed(ws.close_code)


def _http_error(connection: ServerConnection, status: HTTPStatus, message: str) -> Response:
    body = orjson.dumps(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        }
    ).decode()
    response = connection.respond(status, body)
    headers = Headers(response.headers)
    headers["Content-Type"] = "application/json"
    response.headers = headers
    return response


@contextlib.asynccontextmanager
async def run_emulator(
    scenario: Scenario | str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    echo: bool = False,
    speed: float = 1.0,
    chunk_ms: int = CHUNK_MS,
    record: bool = True,
) -> AsyncIterator[Emulator]:
    """Run an emulator on `host:port` (0: any free port) for the duration of the block.

    `speed` scales audio pacing (1.0 real time, 4.0 four times faster, 0 unpaced);
    `record=False` keeps no per-session records (long runs, load tests).
    """
    if scenario is None:
        scenario = BUILTINS["echo" if echo else "demo"]
    elif isinstance(scenario, str):
        scenario = load_scenario(scenario)
    emulator = Emulator(scenario, echo=echo, speed=speed, chunk_ms=chunk_ms, record=record)
    async with ws_serve(
        emulator._handle,
        host,
        port,
        process_request=emulator._process_request,
        compression=None,  # like the SDK's client: audio does not compress, it only costs CPU
        max_size=MAX_FRAME_BYTES,
    ) as server:
        emulator.host, emulator.port = next(iter(server.sockets)).getsockname()[:2]
        yield emulator


async def serve(
    host: str, port: int, scenario_name: str, echo: bool, *, speed: float = 1.0
) -> None:
    """Run the emulator until cancelled (the `switchboard emulate` command)."""
    async with run_emulator(
        scenario_name, host=host, port=port, echo=echo, speed=speed, record=False
    ) as emulator:
        log.info(
            "Realtime emulator listening on %s (scenario %s%s)",
            emulator.url,
            emulator.scenario.name,
            ", echo" if emulator.echo else "",
        )
        await asyncio.Future()
