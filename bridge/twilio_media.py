"""Twilio Media Streams messages, both directions, with no I/O.

Server side (the bridge): `parse_frame` turns what Twilio sends into small event objects, and
`media_frame` / `mark_frame` / `clear_frame` build what we send back.
Caller side (the simulated Twilio and tests): `TwilioStreamWriter` produces Twilio's frames with
Twilio's numbering, and `parse_outbound` checks our server's frames the way Twilio would.

Shapes follow the Media Streams WebSocket reference: every frame is a JSON text frame,
`sequenceNumber`, `media.chunk` and `media.timestamp` are strings holding integers, and audio is
base64 of raw mu-law, 8 kHz, mono (8 bytes = 1 ms).

Parsing never raises: anything that is not a well-formed Twilio message becomes `Malformed`
with a reason naming the offending field, so one bad frame can never take a call down.
"""

from __future__ import annotations

import binascii
import re
from base64 import b64encode
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import msgspec
import orjson

from bridge.base64_audio import decode_strict

MULAW_BYTES_PER_MS = 8

# An inbound media payload is normally 20 ms (160 bytes, 216 base64 characters). We accept up
# to ~4 s of audio per frame; anything larger is not a plausible Twilio frame.
MAX_MEDIA_PAYLOAD_CHARS = 43_692  # base64 length of 32 KiB

DTMF_DIGITS = frozenset("0123456789*#ABCD")

# Canonical padded base64 (RFC 4648 section 4, no whitespace). Together with "length is a
# multiple of 4" this accepts exactly what a strict decoder accepts, without decoding: in
# pcm16 mode the bridge decodes the payload anyway, and in g711 mode it forwards the text
# verbatim inside JSON to OpenAI, where this check guarantees the text cannot break the JSON.
_BASE64_TEXT = re.compile(r"[A-Za-z0-9+/]*={0,2}")


def is_base64_text(text: str) -> bool:
    """True if `text` is canonical padded base64 (cheap: one C-level regex match, no decode)."""
    return len(text) % 4 == 0 and _BASE64_TEXT.fullmatch(text) is not None


# --- What Twilio sends us -------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Connected:
    protocol: str | None = None
    version: str | None = None


@dataclass(slots=True, frozen=True)
class Start:
    stream_sid: str
    call_sid: str
    account_sid: str
    custom_parameters: dict[str, str]
    tracks: tuple[str, ...]
    encoding: str
    sample_rate: int
    channels: int


@dataclass(slots=True)
class Media:
    # The base64 text (g711 mode forwards it as-is) and the mu-law bytes it holds: validating
    # base64 strictly costs the same as decoding it, so the parser decodes once and pcm16
    # mode uses the bytes. None only when built by hand (tests).
    # `media.chunk` and `media.timestamp` are not kept: audio plays in arrival order, and
    # nothing in the bridge needs Twilio's numbering.
    payload: str
    audio: bytes | None = field(default=None, repr=False, compare=False)


@dataclass(slots=True, frozen=True)
class Mark:
    name: str


@dataclass(slots=True, frozen=True)
class Dtmf:
    digit: str


@dataclass(slots=True, frozen=True)
class Stop:
    call_sid: str | None


@dataclass(slots=True, frozen=True)
class Unknown:
    event: str


@dataclass(slots=True, frozen=True)
class Malformed:
    reason: str


TwilioEvent = Connected | Start | Media | Mark | Dtmf | Stop | Unknown | Malformed


# Media frames are nearly every message of a call (50 a second), marks most of the rest. msgspec
# decodes just the fields the bridge uses of those two and skips the others (sequenceNumber,
# track, chunk, timestamp, streamSid) without building them, where orjson builds a dict of it
# all: 1.0 µs a media frame instead of 2.0, and about half the objects allocated. Anything it
# does not take (another event, a field missing or of another type, a bad payload, bad JSON)
# goes to the general parser, whose answer is the reference: tests/test_twilio_media.py checks
# that both agree. Skipping checks JSON syntax but neither the range of skipped numbers nor UTF-8
# inside skipped strings (the media socket has already decoded the whole frame as UTF-8).


class _MediaBody(msgspec.Struct):
    payload: str


class _MediaFrame(msgspec.Struct, tag_field="event", tag="media"):
    media: _MediaBody


class _MarkBody(msgspec.Struct):
    name: str


class _MarkFrame(msgspec.Struct, tag_field="event", tag="mark"):
    mark: _MarkBody


_decode_hot = msgspec.json.Decoder(_MediaFrame | _MarkFrame).decode
# RecursionError: nesting deeper than msgspec goes (orjson stops at 1024 and says so).
_NOT_HOT = (msgspec.DecodeError, RecursionError, TypeError)


def parse_frame(frame: str | bytes) -> TwilioEvent:
    """Parse one frame Twilio sent. Never raises; bad input becomes `Malformed`."""
    try:
        hot = _decode_hot(frame)
    except _NOT_HOT:
        return parse_any_frame(frame)
    if type(hot) is _MarkFrame:
        return Mark(hot.mark.name)
    payload = hot.media.payload
    # Strict decoding accepts canonical padded base64 (what is_base64_text accepts, plus
    # binascii's "AAAA====": see bridge.base64_audio), and leaves the bytes for pcm16 mode.
    if 0 < len(payload) <= MAX_MEDIA_PAYLOAD_CHARS:
        audio = decode_strict(payload)
        if audio is not None:
            return Media(payload, audio)
    return parse_any_frame(frame)  # it words the error


def parse_any_frame(frame: str | bytes) -> TwilioEvent:
    """`parse_frame` without the hot decoder: every event built from orjson's dict."""
    message = _load_object(frame)
    if type(message) is Malformed:
        return message
    event = message.get("event")
    if type(event) is not str:
        return Malformed("missing 'event'" if event is None else "'event' is not a string")
    parser = _PARSERS.get(event)
    if parser is None:
        return Unknown(event)
    return parser(message)


def _parse_media(message: dict[str, Any]) -> Media | Malformed:
    media = message.get("media")
    if type(media) is not dict:
        return _bad_object("media", media)
    payload = media.get("payload")
    if type(payload) is not str:
        return _bad_string("media.payload", payload)
    if not payload:
        return Malformed("media.payload is empty")
    if len(payload) > MAX_MEDIA_PAYLOAD_CHARS:
        return Malformed(
            f"media.payload is {len(payload)} characters, more than {MAX_MEDIA_PAYLOAD_CHARS}"
        )
    audio = decode_strict(payload)  # as in parse_frame
    if audio is None:
        return Malformed("media.payload is not valid base64")
    return Media(payload, audio)


def _parse_connected(message: dict[str, Any]) -> Connected | Malformed:
    protocol = message.get("protocol")
    version = message.get("version")
    if protocol is not None and type(protocol) is not str:
        return _bad_string("protocol", protocol)
    if version is not None and type(version) is not str:
        return _bad_string("version", version)
    return Connected(protocol, version)


def _parse_start(message: dict[str, Any]) -> Start | Malformed:
    start = message.get("start")
    if type(start) is not dict:
        return _bad_object("start", start)
    # start.streamSid is documented; fall back to the top-level copy every message carries.
    stream_sid = start.get("streamSid", message.get("streamSid"))
    if not _nonempty_str(stream_sid):
        return _bad_string("start.streamSid", stream_sid)
    call_sid = start.get("callSid")
    if not _nonempty_str(call_sid):
        return _bad_string("start.callSid", call_sid)
    account_sid = start.get("accountSid")
    if not _nonempty_str(account_sid):
        return _bad_string("start.accountSid", account_sid)

    custom = start.get("customParameters", {})
    if type(custom) is not dict:
        return _bad_object("start.customParameters", custom)
    for key, value in custom.items():
        if type(value) is not str:
            return _bad_string(f"start.customParameters[{key!r}]", value)

    tracks = start.get("tracks", [])
    if type(tracks) is not list or not all(type(t) is str for t in tracks):
        return Malformed(f"start.tracks is not a list of strings: {tracks!r}")

    media_format = start.get("mediaFormat")
    if type(media_format) is not dict:
        return _bad_object("start.mediaFormat", media_format)
    encoding = media_format.get("encoding")
    if not _nonempty_str(encoding):
        return _bad_string("start.mediaFormat.encoding", encoding)
    sample_rate = media_format.get("sampleRate")
    if not _positive_int(sample_rate):
        return Malformed(f"start.mediaFormat.sampleRate is not a positive integer: {sample_rate!r}")
    channels = media_format.get("channels")
    if not _positive_int(channels):
        return Malformed(f"start.mediaFormat.channels is not a positive integer: {channels!r}")

    return Start(
        stream_sid=stream_sid,
        call_sid=call_sid,
        account_sid=account_sid,
        custom_parameters=dict(custom),
        tracks=tuple(tracks),
        encoding=encoding,
        sample_rate=sample_rate,
        channels=channels,
    )


def _parse_mark(message: dict[str, Any]) -> Mark | Malformed:
    mark = message.get("mark")
    if type(mark) is not dict:
        return _bad_object("mark", mark)
    name = mark.get("name")
    if type(name) is not str:
        return _bad_string("mark.name", name)
    return Mark(name)


def _parse_dtmf(message: dict[str, Any]) -> Dtmf | Malformed:
    dtmf = message.get("dtmf")
    if type(dtmf) is not dict:
        return _bad_object("dtmf", dtmf)
    digit = dtmf.get("digit")
    if type(digit) is not str:
        return _bad_string("dtmf.digit", digit)
    if digit not in DTMF_DIGITS:
        return Malformed(f"dtmf.digit is not one of 0-9 * # A-D: {digit!r}")
    return Dtmf(digit)


def _parse_stop(message: dict[str, Any]) -> Stop | Malformed:
    stop = message.get("stop")
    if stop is None:
        return Stop(None)
    if type(stop) is not dict:
        return _bad_object("stop", stop)
    call_sid = stop.get("callSid")
    if call_sid is not None and type(call_sid) is not str:
        return _bad_string("stop.callSid", call_sid)
    return Stop(call_sid)


_PARSERS = {
    "media": _parse_media,
    "connected": _parse_connected,
    "start": _parse_start,
    "mark": _parse_mark,
    "dtmf": _parse_dtmf,
    "stop": _parse_stop,
}


def _nonempty_str(value: object) -> bool:
    return type(value) is str and value != ""


def _positive_int(value: object) -> bool:
    return type(value) is int and value > 0


def _json_kind(value: object) -> str:
    return {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}.get(
        type(value), "null"
    )


def _bad_object(path: str, value: object) -> Malformed:
    if value is None:
        return Malformed(f"missing '{path}' object")
    return Malformed(f"'{path}' is JSON {_json_kind(value)}, expected an object")


def _bad_string(path: str, value: object) -> Malformed:
    if value is None:
        return Malformed(f"missing '{path}'")
    if value == "":
        return Malformed(f"'{path}' is empty")
    return Malformed(f"'{path}' is JSON {_json_kind(value)}, expected a string")


# --- What we send to Twilio -----------------------------------------------------------------


@lru_cache(maxsize=4096)
def _json_string(text: str) -> str:
    # A stream's SID is the same for every frame of a call: escape it once, not 50 times a second.
    return orjson.dumps(text).decode()


def media_frame(stream_sid: str, payload_b64: str) -> str:
    """A `media` frame: `payload_b64` is base64 of raw mu-law and is embedded verbatim.

    Callers pass base64 they produced or checked (`is_base64_text`), so it needs no escaping.
    """
    return (
        f'{{"event":"media","streamSid":{_json_string(stream_sid)},'
        f'"media":{{"payload":"{payload_b64}"}}}}'
    )


def mark_frame(stream_sid: str, name: str) -> str:
    return (
        f'{{"event":"mark","streamSid":{_json_string(stream_sid)},'
        f'"mark":{{"name":{orjson.dumps(name).decode()}}}}}'
    )


def clear_frame(stream_sid: str) -> str:
    return f'{{"event":"clear","streamSid":{_json_string(stream_sid)}}}'


# --- Caller side: Twilio's frames, as Twilio numbers them -----------------------------------


class TwilioStreamWriter:
    """Builds the frames Twilio sends for one stream (used by the simulated caller and tests).

    `sequenceNumber` counts every message after `connected` from "1"; `media.chunk` counts
    media messages from "1"; `media.timestamp` is the presentation time of the frame's first
    sample in ms since the stream started, advanced by the audio sent (8 bytes = 1 ms).
    """

    def __init__(self, stream_sid: str, call_sid: str, account_sid: str) -> None:
        self.stream_sid = stream_sid
        self.call_sid = call_sid
        self.account_sid = account_sid
        self._sequence = 0
        self._chunk = 0
        self._audio_bytes = 0

    @property
    def timestamp_ms(self) -> int:
        """The `media.timestamp` the next media frame will carry."""
        return self._audio_bytes // MULAW_BYTES_PER_MS

    def connected(self) -> str:
        return _dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})

    def start(
        self,
        custom_parameters: dict[str, str],
        *,
        tracks: tuple[str, ...] = ("inbound",),
    ) -> str:
        return self._message(
            "start",
            {
                "accountSid": self.account_sid,
                "streamSid": self.stream_sid,
                "callSid": self.call_sid,
                "tracks": list(tracks),
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                "customParameters": dict(custom_parameters),
            },
        )

    def media(self, ulaw: bytes) -> str:
        self._chunk += 1
        frame = self._message(
            "media",
            {
                "track": "inbound",
                "chunk": str(self._chunk),
                "timestamp": str(self.timestamp_ms),
                "payload": b64encode(ulaw).decode("ascii"),
            },
        )
        self._audio_bytes += len(ulaw)
        return frame

    def skip(self, ms: int) -> None:
        """Advance the media clock without sending audio (a gap in the inbound stream)."""
        if ms < 0:
            raise ValueError("cannot skip a negative duration")
        self._audio_bytes += ms * MULAW_BYTES_PER_MS

    def mark(self, name: str) -> str:
        return self._message("mark", {"name": name})

    def dtmf(self, digit: str) -> str:
        return self._message("dtmf", {"track": "inbound_track", "digit": digit})

    def stop(self) -> str:
        return self._message("stop", {"accountSid": self.account_sid, "callSid": self.call_sid})

    def _message(self, event: str, body: dict[str, Any]) -> str:
        self._sequence += 1
        return _dumps(
            {
                "event": event,
                "sequenceNumber": str(self._sequence),
                event: body,
                "streamSid": self.stream_sid,
            }
        )


def _dumps(message: dict[str, Any]) -> str:
    return orjson.dumps(message).decode()


# --- Caller side: reading our server's frames as Twilio would -------------------------------


@dataclass(slots=True, frozen=True)
class OutboundMedia:
    stream_sid: str
    ulaw: bytes = field(repr=False)


@dataclass(slots=True, frozen=True)
class OutboundMark:
    stream_sid: str
    name: str


@dataclass(slots=True, frozen=True)
class OutboundClear:
    stream_sid: str


OutboundEvent = OutboundMedia | OutboundMark | OutboundClear | Malformed

_TWILIO_PROTOCOL_ERROR = "Twilio error 31924"


def parse_outbound(frame: str | bytes) -> OutboundEvent:
    """Check one frame our server sent, as strictly as Twilio does. Never raises.

    Only `media`, `mark` and `clear` are allowed, each with a non-empty `streamSid`; `media`
    needs `media.payload` as strictly valid base64 (of raw mu-law: any bytes are valid
    mu-law, so the check is on the encoding) and `mark` a string `mark.name`. Anything else
    is what Twilio reports as a protocol error (31924), returned as `Malformed`.
    """
    if isinstance(frame, bytes):
        # Twilio expects text frames; a binary frame is itself a protocol violation.
        return Malformed(
            f"binary frame; Twilio accepts JSON text frames only ({_TWILIO_PROTOCOL_ERROR})"
        )
    message = _load_object(frame)
    if isinstance(message, Malformed):
        return message
    event = message.get("event")
    if event not in ("media", "mark", "clear"):
        return Malformed(
            f"event {event!r} is not one of media, mark, clear ({_TWILIO_PROTOCOL_ERROR})"
        )
    stream_sid = message.get("streamSid")
    if not _nonempty_str(stream_sid):
        return _bad_string("streamSid", stream_sid)
    if event == "clear":
        return OutboundClear(stream_sid)
    if event == "mark":
        mark = message.get("mark")
        if type(mark) is not dict:
            return _bad_object("mark", mark)
        name = mark.get("name")
        if not _nonempty_str(name):
            return _bad_string("mark.name", name)
        return OutboundMark(stream_sid, name)
    media = message.get("media")
    if type(media) is not dict:
        return _bad_object("media", media)
    payload = media.get("payload")
    if type(payload) is not str:
        return _bad_string("media.payload", payload)
    try:
        ulaw = binascii.a2b_base64(payload, strict_mode=True)
    except ValueError as exc:  # binascii.Error, or a plain ValueError for non-ASCII text
        return Malformed(f"media.payload is not valid base64: {exc}")
    return OutboundMedia(stream_sid, ulaw)


def _load_object(frame: str | bytes) -> dict[str, Any] | Malformed:
    """Decode a frame that must hold one JSON object."""
    try:
        message = orjson.loads(frame)
    except orjson.JSONDecodeError as exc:
        return Malformed(f"not JSON: {exc}")
    except TypeError:
        return Malformed(f"frame must be str or bytes, got {type(frame).__name__}")
    if type(message) is not dict:
        return Malformed(f"frame is JSON {_json_kind(message)}, expected an object")
    return message
