"""Fuzzing the three wire parsers with messages shaped like the real ones but wrong inside.

Plain garbage (random text and bytes) is covered next to each parser's own tests; here the
event names are right and the fields are not: wrong JSON types at every level, huge values,
invalid base64, unknown extra fields. Each parser must return one of its event types (bad
input as `Malformed`/`Unknown`/`Other`) and never raise.
"""

from __future__ import annotations

import base64
import typing

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge import realtime as rt
from bridge import twilio_media as tw

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TWILIO_EVENTS = ("connected", "start", "media", "mark", "dtmf", "stop", "clear", "unknown-x")
REALTIME_TYPES = (
    rt.AUDIO_DELTA,
    "input_audio_buffer.speech_started",
    "input_audio_buffer.speech_stopped",
    "input_audio_buffer.committed",
    "response.created",
    "response.done",
    "response.function_call_arguments.done",
    "conversation.item.input_audio_transcription.completed",
    "response.output_audio_transcript.done",
    "error",
    "session.created",
    "session.updated",
    "rate_limits.updated",
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
# Base64 that is valid, invalid (bad characters, bad padding), or very long.
base64ish = st.one_of(
    st.binary(max_size=400).map(lambda b: base64.b64encode(b).decode()),
    st.text(alphabet="ABCD+/=-_!* \n", max_size=60),
    st.integers(min_value=1, max_value=200_000).map(lambda n: "A" * n),
)
field_values = json_values | base64ish


def shaped(names: tuple[str, ...], key: str, nested: tuple[str, ...]) -> st.SearchStrategy[bytes]:
    """A JSON object with a real event name and nested objects whose fields are anything."""
    objects = st.dictionaries(
        st.sampled_from(("payload", "name", "digit", "track", "streamSid", "callSid",
                         "customParameters", "mediaFormat", "chunk", "timestamp", "delta",
                         "item_id", "response_id", "call_id", "arguments", "transcript",
                         "response", "error", "usage", "status", "output", "audio_start_ms")),
        field_values,
        max_size=8,
    )  # fmt: skip
    body = st.fixed_dictionaries(
        {key: st.sampled_from(names)},
        optional={name: objects | field_values for name in nested}
        | {"streamSid": field_values, "sequenceNumber": field_values, "item_id": field_values,
           "response_id": field_values, "delta": base64ish, "call_id": field_values,
           "name": field_values, "arguments": field_values, "transcript": field_values},
    )  # fmt: skip
    return body.map(lambda d: orjson.dumps(d))


twilio_frames = shaped(TWILIO_EVENTS, "event", ("start", "media", "mark", "dtmf", "stop"))
realtime_frames = shaped(REALTIME_TYPES, "type", ("response", "error", "session", "part"))

TWILIO_TYPES = typing.get_args(tw.TwilioEvent)
SERVER_TYPES = typing.get_args(rt.ServerEvent)


@FUZZ
@given(twilio_frames, st.booleans())
def test_parse_frame_never_raises_on_shaped_garbage(frame: bytes, as_text: bool) -> None:
    event = tw.parse_frame(frame.decode() if as_text else frame)
    assert isinstance(event, TWILIO_TYPES)
    if isinstance(event, tw.Media):
        assert type(event.payload) is str


@FUZZ
@given(twilio_frames)
def test_parse_outbound_never_raises_and_accepts_only_valid_media(frame: bytes) -> None:
    event = tw.parse_outbound(frame.decode())
    assert isinstance(event, tw.OutboundMedia | tw.OutboundMark | tw.OutboundClear | tw.Malformed)
    assert isinstance(tw.parse_outbound(frame), tw.Malformed)  # binary frames never pass


@FUZZ
@given(realtime_frames, st.booleans())
def test_parse_server_event_never_raises_on_shaped_garbage(frame: bytes, as_text: bool) -> None:
    event = rt.parse_server_event(frame.decode() if as_text else frame)
    assert isinstance(event, SERVER_TYPES)
    if isinstance(event, rt.AudioDelta):
        base64.b64decode(event.delta_b64, validate=True)  # only valid audio gets through
    if isinstance(event, rt.FunctionCallDone):
        assert all(type(v) is str for v in (event.call_id, event.name, event.arguments))


@FUZZ
@given(st.sampled_from((tw.parse_frame, rt.parse_server_event, tw.parse_outbound)), json_values)
def test_any_json_document_is_handled(parse: typing.Any, document: object) -> None:
    parse(orjson.dumps(document).decode())


def test_deeply_nested_json_is_refused_without_recursion_errors() -> None:
    deep = "[" * 100_000 + "]" * 100_000
    assert isinstance(tw.parse_frame(deep), tw.Malformed)
    assert isinstance(rt.parse_server_event(deep), rt.Malformed)
    nested_event = '{"event":"media","media":' + "[" * 5000 + "]" * 5000 + "}"
    assert isinstance(tw.parse_frame(nested_event), tw.Malformed)
