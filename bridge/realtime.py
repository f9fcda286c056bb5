"""OpenAI Realtime (GA) events, with no I/O, plus a thin WebSocket connection.

Client events are built as plain dicts (`encode` turns one into JSON text) except the audio
append, which is the hot path and is built as text directly. Server events are parsed by
dispatching on the `type` string into small dataclasses for the events the bridge acts on;
everything else is `Other`. The SDK's pydantic models are the schema oracle in tests
(`tests/sdk_oracle.py`), not the parser: they are too slow for 50 frames a second and the
SDK's union silently mis-types events it does not know.

Only GA shapes: `session.type` is "realtime", audio settings live under `session.audio`, and
no `OpenAI-Beta` header is sent (beta shapes are now refused with close code 4000).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
import orjson

from bridge.base64_audio import decode_strict

# The connection moved to its own module (picows); importable from here as before.
from bridge.realtime_connection import MAX_FRAME_BYTES as MAX_FRAME_BYTES
from bridge.realtime_connection import RealtimeConnection as RealtimeConnection
from bridge.realtime_connection import realtime_url as realtime_url

AudioMode = Literal["pcm16", "g711"]

# `audio/pcm` is 16-bit little-endian mono at 24 kHz only; `audio/pcmu` is Twilio's own format.
AUDIO_FORMATS: dict[str, dict[str, Any]] = {
    "pcm16": {"type": "audio/pcm", "rate": 24000},
    "g711": {"type": "audio/pcmu"},
}

# Server VAD tuned for phone calls. `interrupt_response` lets the server cancel its own reply
# when the caller talks over it; the bridge still clears Twilio and truncates to what was heard.
DEFAULT_TURN_DETECTION: dict[str, Any] = {
    "type": "server_vad",
    "threshold": 0.5,
    "prefix_padding_ms": 300,
    "silence_duration_ms": 500,
    "create_response": True,
    # The bridge owns barge-in: it knows what the caller actually heard (marks), clears
    # Twilio's buffer, cancels and truncates in one place. Letting the server cancel too would
    # race our response.cancel into a `response_cancel_not_active` error.
    "interrupt_response": False,
}


# --- Client events --------------------------------------------------------------------------


def session_update(
    *,
    instructions: str,
    tools: list[dict[str, Any]],
    audio_mode: AudioMode,
    voice: str,
    transcription_model: str | None,
    turn_detection: dict[str, Any] | None = None,
    noise_reduction: Literal["near_field", "far_field"] | None = None,
    event_id: str | None = None,
) -> dict[str, Any]:
    """The `session.update` that configures a call.

    `turn_detection=None` means the default server VAD; `transcription_model=None` leaves
    caller transcription off. The model is chosen in the connection URL, not here.
    """
    audio_format = AUDIO_FORMATS.get(audio_mode)
    if audio_format is None:
        raise ValueError(f"audio_mode must be one of {sorted(AUDIO_FORMATS)}, not {audio_mode!r}")
    audio_input: dict[str, Any] = {
        "format": dict(audio_format),
        "transcription": {"model": transcription_model} if transcription_model else None,
        "turn_detection": dict(turn_detection or DEFAULT_TURN_DETECTION),
    }
    if noise_reduction is not None:
        audio_input["noise_reduction"] = {"type": noise_reduction}
    event: dict[str, Any] = {
        "type": "session.update",
        "session": {
            "type": "realtime",
            "instructions": instructions,
            "output_modalities": ["audio"],
            "tools": tools,
            "tool_choice": "auto",
            "audio": {
                "input": audio_input,
                "output": {"format": dict(audio_format), "voice": voice},
            },
        },
    }
    return _with_event_id(event, event_id)


def append_audio(b64: str) -> str:
    """`input_audio_buffer.append` as JSON text; `b64` is base64 and so safe to embed as is."""
    # One f-string builds the text in one allocation; `a + b64 + c` copies the 1280-character
    # audio twice (~0.07 µs a frame more).
    return f'{{"type":"input_audio_buffer.append","audio":"{b64}"}}'


def response_create(
    *, instructions: str | None = None, event_id: str | None = None
) -> dict[str, Any]:
    """Ask for a response; `instructions` overrides the session's for this response only."""
    event: dict[str, Any] = {"type": "response.create"}
    if instructions is not None:
        event["response"] = {"instructions": instructions}
    return _with_event_id(event, event_id)


def response_cancel(*, event_id: str | None = None) -> dict[str, Any]:
    return _with_event_id({"type": "response.cancel"}, event_id)


def truncate(
    item_id: str, audio_end_ms: int, content_index: int = 0, *, event_id: str | None = None
) -> dict[str, Any]:
    """Cut an assistant item's audio at what the caller heard (also drops unheard transcript)."""
    if audio_end_ms < 0:
        raise ValueError(f"audio_end_ms must be >= 0, not {audio_end_ms}")
    event = {
        "type": "conversation.item.truncate",
        "item_id": item_id,
        "content_index": content_index,
        "audio_end_ms": audio_end_ms,
    }
    return _with_event_id(event, event_id)


def function_call_output(
    call_id: str, output: str, *, event_id: str | None = None
) -> dict[str, Any]:
    """A tool's result. The server does not answer it on its own: send `response_create` next."""
    event = {
        "type": "conversation.item.create",
        "item": {"type": "function_call_output", "call_id": call_id, "output": output},
    }
    return _with_event_id(event, event_id)


def message_item(
    role: Literal["system", "user"], text: str, *, event_id: str | None = None
) -> dict[str, Any]:
    """A text message in the conversation, e.g. a system note that the caller pressed a key."""
    event = {
        "type": "conversation.item.create",
        "item": {
            "type": "message",
            "role": role,
            "content": [{"type": "input_text", "text": text}],
        },
    }
    return _with_event_id(event, event_id)


def encode(event: dict[str, Any]) -> str:
    return orjson.dumps(event).decode()


def _with_event_id(event: dict[str, Any], event_id: str | None) -> dict[str, Any]:
    # Errors quote the event_id of the client event that caused them.
    if event_id is not None:
        event["event_id"] = event_id
    return event


# --- Server events --------------------------------------------------------------------------


@dataclass(slots=True)
class AudioDelta:
    item_id: str
    response_id: str
    delta_b64: str  # canonical base64, forwarded verbatim in g711 mode
    # The decoded audio: validating strictly costs what decoding does, so the parser decodes
    # once and pcm16 mode resamples these bytes. None only when built by hand (tests).
    audio: bytes | None = field(default=None, repr=False, compare=False)


@dataclass(slots=True, frozen=True)
class SpeechStarted:
    audio_start_ms: int
    item_id: str


@dataclass(slots=True, frozen=True)
class SpeechStopped:
    audio_end_ms: int
    item_id: str


@dataclass(slots=True, frozen=True)
class ResponseCreated:
    response_id: str


@dataclass(slots=True, frozen=True)
class ResponseDone:
    # Both optional in the SDK's schema. A response.done is never dropped as malformed for
    # lacking them: losing it would leave the bridge waiting for a response to finish.
    response_id: str | None
    status: str | None  # completed | cancelled | failed | incomplete
    usage: dict[str, Any] | None
    output: list[dict[str, Any]]
    # e.g. {"type": "cancelled", "reason": "turn_detected"}; None when absent.
    status_details: dict[str, Any] | None = None


@dataclass(slots=True, frozen=True)
class FunctionCallDone:
    call_id: str
    name: str
    arguments: str  # JSON text, exactly as the model wrote it (may be invalid JSON)
    item_id: str
    response_id: str


@dataclass(slots=True, frozen=True)
class InputTranscriptDone:
    item_id: str
    transcript: str


@dataclass(slots=True, frozen=True)
class InputAudioCommitted:
    item_id: str


@dataclass(slots=True, frozen=True)
class OutputTranscriptDone:
    item_id: str
    response_id: str
    transcript: str


@dataclass(slots=True, frozen=True)
class ErrorEvent:
    code: str | None
    message: str
    type: str
    event_id: str | None  # the client event that caused it, if the server says


@dataclass(slots=True, frozen=True)
class SessionCreated:
    session: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class SessionUpdated:
    session: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class Other:
    type: str
    data: dict[str, Any]


@dataclass(slots=True, frozen=True)
class Malformed:
    reason: str


ServerEvent = (
    AudioDelta
    | SpeechStarted
    | SpeechStopped
    | ResponseCreated
    | ResponseDone
    | FunctionCallDone
    | InputTranscriptDone
    | InputAudioCommitted
    | OutputTranscriptDone
    | ErrorEvent
    | SessionCreated
    | SessionUpdated
    | Other
    | Malformed
)

AUDIO_DELTA = "response.output_audio.delta"


class _Fields(msgspec.Struct):
    """What the bridge reads of an audio delta; any event type decodes (see parse_server_event)."""

    type: str
    delta: str | None = None
    item_id: str | None = None
    response_id: str | None = None


# Audio deltas are half of a call's events. msgspec decodes just these four fields and skips
# the rest (event_id, output_index, content_index) without building it, where orjson builds a
# dict of it all: 1.6 µs a 20 ms delta instead of 2.0. Every other event, and a delta it does
# not take (a field missing or of another type, bad base64, bad JSON), goes to the general
# parser, whose answer is the reference: tests/test_realtime.py checks that both agree. Decoding
# any type (no tag) costs other events ~0.3 µs, where a tag mismatch's exception costs 0.7.
# Skipping checks JSON syntax but neither the range of skipped numbers nor UTF-8 inside
# skipped strings of an audio delta.
_decode_fields = msgspec.json.Decoder(_Fields).decode
# RecursionError: nesting deeper than msgspec goes (orjson stops at 1024 and says so).
_NOT_DECODED = (msgspec.DecodeError, RecursionError, TypeError)


def parse_server_event(frame: str | bytes) -> ServerEvent:
    """Parse one frame from the Realtime server. Never raises; bad input becomes `Malformed`."""
    try:
        fields = _decode_fields(frame)
    except _NOT_DECODED:
        return parse_any_server_event(frame)
    if fields.type == AUDIO_DELTA:
        delta, item_id, response_id = fields.delta, fields.item_id, fields.response_id
        if delta is not None and item_id is not None and response_id is not None:
            # Decoding validates (deltas are forwarded verbatim inside Twilio JSON in g711
            # mode) and costs no more than a regex match would.
            audio = decode_strict(delta)
            if audio is not None:
                return AudioDelta(item_id, response_id, delta, audio)
    return parse_any_server_event(frame)


def parse_any_server_event(frame: str | bytes) -> ServerEvent:
    """`parse_server_event` without the hot decoder: every event built from orjson's dict."""
    try:
        data = orjson.loads(frame)
    except orjson.JSONDecodeError as exc:
        return Malformed(f"not JSON: {exc}")
    except TypeError:
        return Malformed(f"frame must be str or bytes, got {type(frame).__name__}")
    if type(data) is not dict:
        return Malformed("frame is not a JSON object")
    kind = data.get("type")
    if kind == AUDIO_DELTA:
        delta = data.get("delta")
        item_id = data.get("item_id")
        response_id = data.get("response_id")
        if type(delta) is str and type(item_id) is str and type(response_id) is str:
            audio = decode_strict(delta)
            if audio is not None:
                return AudioDelta(item_id, response_id, delta, audio)
        return _bad_audio_delta(data)
    if type(kind) is not str:
        return Malformed("missing 'type'" if kind is None else "'type' is not a string")
    parser = _PARSERS.get(kind)
    if parser is None:
        return Other(kind, data)
    try:
        return parser(data)
    except _BadField as exc:
        return Malformed(f"{kind}: {exc}")


def _bad_audio_delta(data: dict[str, Any]) -> Malformed:
    for key in ("delta", "item_id", "response_id"):
        if type(data.get(key)) is not str:
            return Malformed(f"{AUDIO_DELTA}: '{key}' is missing or not a string")
    return Malformed(f"{AUDIO_DELTA}: 'delta' is not valid base64")


class _BadField(Exception):
    """A required field is missing or has the wrong type (rare events only)."""


def _string(data: dict[str, Any], key: str, where: str = "") -> str:
    value = data.get(key)
    if type(value) is not str:
        raise _BadField(f"'{where}{key}' is missing or not a string")
    return value


def _optional_string(data: dict[str, Any], key: str, where: str = "") -> str | None:
    value = data.get(key)
    if value is not None and type(value) is not str:
        raise _BadField(f"'{where}{key}' is not a string")
    return value


def _integer(data: dict[str, Any], key: str) -> int:
    value = data.get(key)
    if type(value) is not int:
        raise _BadField(f"'{key}' is missing or not an integer")
    return value


def _object(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    if type(value) is not dict:
        raise _BadField(f"'{key}' is missing or not an object")
    return value


def _optional_object(data: dict[str, Any], key: str, where: str = "") -> dict[str, Any] | None:
    value = data.get(key)
    if value is not None and type(value) is not dict:
        raise _BadField(f"'{where}{key}' is not an object")
    return value


def _speech_started(data: dict[str, Any]) -> SpeechStarted:
    return SpeechStarted(_integer(data, "audio_start_ms"), _string(data, "item_id"))


def _speech_stopped(data: dict[str, Any]) -> SpeechStopped:
    return SpeechStopped(_integer(data, "audio_end_ms"), _string(data, "item_id"))


def _response_created(data: dict[str, Any]) -> ResponseCreated:
    return ResponseCreated(_string(_object(data, "response"), "id", "response."))


def _response_done(data: dict[str, Any]) -> ResponseDone:
    response = _object(data, "response")
    output = response.get("output", [])
    if type(output) is not list or not all(type(item) is dict for item in output):
        raise _BadField("'response.output' is not a list of objects")
    return ResponseDone(
        response_id=_optional_string(response, "id", "response."),
        status=_optional_string(response, "status", "response."),
        usage=_optional_object(response, "usage", "response."),
        output=output,
        status_details=_optional_object(response, "status_details", "response."),
    )


def _function_call_done(data: dict[str, Any]) -> FunctionCallDone:
    return FunctionCallDone(
        call_id=_string(data, "call_id"),
        name=_string(data, "name"),
        arguments=_string(data, "arguments"),
        item_id=_string(data, "item_id"),
        response_id=_string(data, "response_id"),
    )


def _input_transcript_done(data: dict[str, Any]) -> InputTranscriptDone:
    return InputTranscriptDone(_string(data, "item_id"), _string(data, "transcript"))


def _input_audio_committed(data: dict[str, Any]) -> InputAudioCommitted:
    return InputAudioCommitted(_string(data, "item_id"))


def _output_transcript_done(data: dict[str, Any]) -> OutputTranscriptDone:
    return OutputTranscriptDone(
        _string(data, "item_id"), _string(data, "response_id"), _string(data, "transcript")
    )


def _error(data: dict[str, Any]) -> ErrorEvent:
    error = _object(data, "error")
    return ErrorEvent(
        code=_optional_string(error, "code", "error."),
        message=_string(error, "message", "error."),
        type=_string(error, "type", "error."),
        event_id=_optional_string(error, "event_id", "error."),
    )


def _session_created(data: dict[str, Any]) -> SessionCreated:
    return SessionCreated(_object(data, "session"))


def _session_updated(data: dict[str, Any]) -> SessionUpdated:
    return SessionUpdated(_object(data, "session"))


_PARSERS = {
    "input_audio_buffer.speech_started": _speech_started,
    "input_audio_buffer.speech_stopped": _speech_stopped,
    "input_audio_buffer.committed": _input_audio_committed,
    "response.created": _response_created,
    "response.done": _response_done,
    "response.function_call_arguments.done": _function_call_done,
    "conversation.item.input_audio_transcription.completed": _input_transcript_done,
    "response.output_audio_transcript.done": _output_transcript_done,
    "error": _error,
    "session.created": _session_created,
    "session.updated": _session_updated,
}
