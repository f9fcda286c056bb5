"""OpenAI Realtime GA events: builders validated by the SDK, server-event parsing, connection."""

from __future__ import annotations

import asyncio
import base64
import json
import typing
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from openai.types.realtime import RealtimeClientEvent, RealtimeServerEvent
from pydantic import BaseModel, Field
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosedError

from bridge.realtime import (
    DEFAULT_TURN_DETECTION,
    AudioDelta,
    ErrorEvent,
    FunctionCallDone,
    InputAudioCommitted,
    InputTranscriptDone,
    Malformed,
    Other,
    OutputTranscriptDone,
    RealtimeConnection,
    ResponseCreated,
    ResponseDone,
    SessionCreated,
    SessionUpdated,
    SpeechStarted,
    SpeechStopped,
    append_audio,
    encode,
    function_call_output,
    message_item,
    parse_any_server_event,
    parse_server_event,
    realtime_url,
    response_cancel,
    response_create,
    session_update,
    truncate,
)
from tests.sdk_oracle import (
    CLIENT_EVENT_CLASSES,
    SERVER_EVENT_CLASSES,
    assert_valid_client_event,
    assert_valid_server_event,
)
from tools.registry import json_schema


class BookVisit(BaseModel):
    """Arguments of a realistic tool, to get a schema the way the registry makes one."""

    name: str = Field(description="Caller's name")
    address: str
    urgency: typing.Literal["emergency", "soon", "flexible"] = "flexible"
    budget: float | None = None


TOOL = {
    "type": "function",
    "name": "book_visit",
    "description": "Propose a site visit.",
    "parameters": json_schema(BookVisit),
}


# --- the oracle itself ----------------------------------------------------------------------


def _union_types(union: object) -> set[str]:
    args = typing.get_args(union)
    if typing.get_origin(union) is typing.Annotated:
        return _union_types(args[0])
    if not args:
        return set(typing.get_args(union.model_fields["type"].annotation))  # type: ignore[attr-defined]
    return set().union(*(_union_types(arg) for arg in args))


def test_oracle_tables_cover_exactly_the_sdk_unions() -> None:
    assert set(CLIENT_EVENT_CLASSES) == _union_types(RealtimeClientEvent)
    assert set(SERVER_EVENT_CLASSES) == _union_types(RealtimeServerEvent)
    for table in (CLIENT_EVENT_CLASSES, SERVER_EVENT_CLASSES):
        for kind, cls in table.items():
            assert typing.get_args(cls.model_fields["type"].annotation) == (kind,)


@pytest.mark.parametrize(
    "event",
    [
        {"type": "some.future.event"},  # the SDK's union would call this a ConversationCreatedEvent
        {"type": "response.audio.delta", "delta": "AAAA"},  # beta name
        {"no": "type"},
    ],
)
def test_oracle_rejects_unknown_types(event: dict) -> None:
    with pytest.raises(AssertionError, match="not a known"):
        assert_valid_server_event(event)


def test_oracle_rejects_beta_fields_and_typos_at_any_depth() -> None:
    good = session_update(
        instructions="x", tools=[], audio_mode="g711", voice="marin", transcription_model=None
    )
    assert_valid_client_event(good)
    beta = json.loads(encode(good))
    beta["session"]["input_audio_format"] = "g711_ulaw"
    with pytest.raises(AssertionError, match="input_audio_format"):
        assert_valid_client_event(beta)
    typo = json.loads(encode(good))
    typo["session"]["audio"]["input"]["turn_detection"]["silence_ms"] = 200
    with pytest.raises(AssertionError, match="silence_ms"):
        assert_valid_client_event(typo)


def test_oracle_allows_only_the_known_untyped_session_fields() -> None:
    session = {"type": "realtime", "object": "realtime.session", "id": "sess_1", "expires_at": 9}
    assert_valid_server_event({"type": "session.created", "event_id": "e", "session": session})
    with pytest.raises(AssertionError, match=r"session\.bogus"):
        assert_valid_server_event(
            {"type": "session.created", "event_id": "e", "session": {**session, "bogus": 1}}
        )
    with pytest.raises(AssertionError, match=r"\['response'\]"):
        # the allowance is per event type and path, not a blanket "id is fine"
        assert_valid_server_event(
            {
                "type": "rate_limits.updated",
                "event_id": "e",
                "rate_limits": [],
                "response": {"id": 1},
            }
        )


def test_oracle_rejects_wrong_values() -> None:
    bad_rate = session_update(
        instructions="x", tools=[], audio_mode="pcm16", voice="marin", transcription_model=None
    )
    bad_rate["session"]["audio"]["input"]["format"]["rate"] = 16000
    with pytest.raises(ValueError, match="24000"):
        assert_valid_client_event(bad_rate)
    with pytest.raises(ValueError):
        assert_valid_client_event({"type": "conversation.item.truncate", "item_id": "i"})


# --- client events --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "audio_format"),
    [("pcm16", {"type": "audio/pcm", "rate": 24000}), ("g711", {"type": "audio/pcmu"})],
)
def test_session_update_is_ga_shaped_and_sdk_valid(mode: str, audio_format: dict) -> None:
    event = session_update(
        instructions="You answer the phone for Acme.",
        tools=[TOOL],
        audio_mode=mode,  # type: ignore[arg-type]
        voice="marin",
        transcription_model="gpt-4o-mini-transcribe",
        event_id="evt_1",
    )
    assert_valid_client_event(encode(event))
    session = event["session"]
    assert session["type"] == "realtime"
    assert "model" not in session
    assert session["instructions"] == "You answer the phone for Acme."
    assert session["tools"] == [TOOL] and session["tool_choice"] == "auto"
    assert session["audio"]["input"]["format"] == audio_format
    assert session["audio"]["output"] == {"format": audio_format, "voice": "marin"}
    assert session["audio"]["input"]["transcription"] == {"model": "gpt-4o-mini-transcribe"}
    assert session["audio"]["input"]["turn_detection"] == DEFAULT_TURN_DETECTION
    assert event["event_id"] == "evt_1"


def test_session_update_options_stay_sdk_valid() -> None:
    semantic = {"type": "semantic_vad", "eagerness": "low", "interrupt_response": True}
    event = session_update(
        instructions="",
        tools=[],
        audio_mode="g711",
        voice="cedar",
        transcription_model=None,
        turn_detection=semantic,
        noise_reduction="near_field",
    )
    assert_valid_client_event(event)
    audio_input = event["session"]["audio"]["input"]
    assert audio_input["turn_detection"] == semantic
    assert audio_input["transcription"] is None
    assert audio_input["noise_reduction"] == {"type": "near_field"}


def test_session_update_rejects_unknown_audio_mode() -> None:
    with pytest.raises(ValueError, match="audio_mode"):
        session_update(
            instructions="",
            tools=[],
            audio_mode="opus",
            voice="marin",
            transcription_model=None,  # type: ignore[arg-type]
        )


def test_session_update_does_not_share_the_default_dicts() -> None:
    first = session_update(
        instructions="", tools=[], audio_mode="g711", voice="marin", transcription_model=None
    )
    first["session"]["audio"]["input"]["turn_detection"]["threshold"] = 0.9
    first["session"]["audio"]["input"]["format"]["type"] = "audio/pcma"
    second = session_update(
        instructions="", tools=[], audio_mode="g711", voice="marin", transcription_model=None
    )
    assert second["session"]["audio"]["input"]["turn_detection"]["threshold"] == 0.5
    assert second["session"]["audio"]["input"]["format"] == {"type": "audio/pcmu"}


@given(st.binary(max_size=2000))
def test_append_audio_is_the_sdk_event(audio: bytes) -> None:
    b64 = base64.b64encode(audio).decode()
    text = append_audio(b64)
    model = assert_valid_client_event(text)
    assert model.audio == b64  # type: ignore[attr-defined]
    assert json.loads(text) == {"type": "input_audio_buffer.append", "audio": b64}


@pytest.mark.parametrize(
    "event",
    [
        response_create(),
        response_create(instructions="Greet the caller.", event_id="evt_2"),
        response_cancel(),
        response_cancel(event_id="evt_3"),
        truncate("item_1", 1234),
        truncate("item_1", 0, content_index=0, event_id="evt_4"),
        function_call_output("call_1", '{"status": "confirmation_required"}'),
        message_item("system", "The caller pressed 5."),
        message_item("user", "Hello?", event_id="evt_5"),
    ],
)
def test_client_builders_are_sdk_valid(event: dict) -> None:
    assert_valid_client_event(encode(event))


def test_client_builders_carry_their_arguments() -> None:
    assert truncate("item_9", 480) == {
        "type": "conversation.item.truncate",
        "item_id": "item_9",
        "content_index": 0,
        "audio_end_ms": 480,
    }
    assert function_call_output("call_7", "{}")["item"] == {
        "type": "function_call_output",
        "call_id": "call_7",
        "output": "{}",
    }
    assert response_create(instructions="Say hi")["response"] == {"instructions": "Say hi"}
    assert response_cancel() == {"type": "response.cancel"}


def test_truncate_refuses_negative_time() -> None:
    with pytest.raises(ValueError, match="audio_end_ms"):
        truncate("item_1", -1)


# --- server events: fixtures are SDK-valid first, then parsed -------------------------------


def server(event: dict[str, Any]) -> str:
    assert_valid_server_event(event)
    return json.dumps(event)


def test_parses_audio_delta() -> None:
    delta = base64.b64encode(b"\x00\x01" * 480).decode()
    frame = server(
        {
            "type": "response.output_audio.delta",
            "event_id": "e1",
            "response_id": "resp_1",
            "item_id": "item_1",
            "output_index": 0,
            "content_index": 0,
            "delta": delta,
        }
    )
    assert parse_server_event(frame) == AudioDelta("item_1", "resp_1", delta)
    assert parse_server_event(frame.encode()) == AudioDelta("item_1", "resp_1", delta)


RESPONSE_DONE = {
    "type": "response.done",
    "event_id": "e9",
    "response": {
        "object": "realtime.response",
        "id": "resp_1",
        "status": "cancelled",
        "status_details": {"type": "cancelled", "reason": "turn_detected"},
        "output": [
            {
                "type": "function_call",
                "id": "item_2",
                "call_id": "call_1",
                "name": "book_visit",
                "arguments": '{"name": "Sam"}',
                "status": "completed",
            }
        ],
        "usage": {"total_tokens": 30, "input_tokens": 20, "output_tokens": 10},
    },
}


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (
            {
                "type": "input_audio_buffer.speech_started",
                "event_id": "e2",
                "audio_start_ms": 1500,
                "item_id": "item_u1",
            },
            SpeechStarted(1500, "item_u1"),
        ),
        (
            {
                "type": "input_audio_buffer.speech_stopped",
                "event_id": "e3",
                "audio_end_ms": 2500,
                "item_id": "item_u1",
            },
            SpeechStopped(2500, "item_u1"),
        ),
        (
            {
                "type": "input_audio_buffer.committed",
                "event_id": "e4",
                "item_id": "item_u1",
                "previous_item_id": None,
            },
            InputAudioCommitted("item_u1"),
        ),
        (
            {
                "type": "response.created",
                "event_id": "e5",
                "response": {
                    "object": "realtime.response",
                    "id": "resp_1",
                    "status": "in_progress",
                },
            },
            ResponseCreated("resp_1"),
        ),
        (
            RESPONSE_DONE,
            ResponseDone(
                "resp_1",
                "cancelled",
                RESPONSE_DONE["response"]["usage"],
                RESPONSE_DONE["response"]["output"],
                {"type": "cancelled", "reason": "turn_detected"},
            ),
        ),
        (
            {
                "type": "response.function_call_arguments.done",
                "event_id": "e6",
                "response_id": "resp_1",
                "item_id": "item_2",
                "output_index": 0,
                "call_id": "call_1",
                "name": "book_visit",
                "arguments": '{"name": "Sam"}',
            },
            FunctionCallDone("call_1", "book_visit", '{"name": "Sam"}', "item_2", "resp_1"),
        ),
        (
            {
                "type": "conversation.item.input_audio_transcription.completed",
                "event_id": "e7",
                "item_id": "item_u1",
                "content_index": 0,
                "transcript": "My sink is leaking.",
                "usage": {"type": "duration", "seconds": 1.5},
            },
            InputTranscriptDone("item_u1", "My sink is leaking."),
        ),
        (
            {
                "type": "response.output_audio_transcript.done",
                "event_id": "e8",
                "response_id": "resp_1",
                "item_id": "item_3",
                "output_index": 0,
                "content_index": 0,
                "transcript": "Sorry to hear that.",
            },
            OutputTranscriptDone("item_3", "resp_1", "Sorry to hear that."),
        ),
        (
            {
                "type": "error",
                "event_id": "e10",
                "error": {
                    "type": "invalid_request_error",
                    "code": "conversation_already_has_active_response",
                    "message": "Conversation already has an active response",
                    "param": None,
                    "event_id": "evt_2",
                },
            },
            ErrorEvent(
                "conversation_already_has_active_response",
                "Conversation already has an active response",
                "invalid_request_error",
                "evt_2",
            ),
        ),
        (
            {
                "type": "session.created",
                "event_id": "e11",
                "session": {"type": "realtime", "id": "sess_1", "model": "gpt-realtime"},
            },
            SessionCreated({"type": "realtime", "id": "sess_1", "model": "gpt-realtime"}),
        ),
        (
            {
                "type": "session.updated",
                "event_id": "e12",
                "session": {"type": "realtime", "audio": {"output": {"voice": "marin"}}},
            },
            SessionUpdated({"type": "realtime", "audio": {"output": {"voice": "marin"}}}),
        ),
        (
            {
                "type": "response.output_audio_transcript.delta",
                "event_id": "e13",
                "response_id": "resp_1",
                "item_id": "item_3",
                "output_index": 0,
                "content_index": 0,
                "delta": "Sorry",
            },
            Other(
                "response.output_audio_transcript.delta",
                {
                    "type": "response.output_audio_transcript.delta",
                    "event_id": "e13",
                    "response_id": "resp_1",
                    "item_id": "item_3",
                    "output_index": 0,
                    "content_index": 0,
                    "delta": "Sorry",
                },
            ),
        ),
    ],
)
def test_parses_the_events_the_bridge_acts_on(event: dict, expected: object) -> None:
    assert parse_server_event(server(event)) == expected


def test_response_done_without_id_or_status_still_ends_the_response() -> None:
    frame = server({"type": "response.done", "event_id": "e", "response": {}})
    assert parse_server_event(frame) == ResponseDone(None, None, None, [], None)


def test_error_without_code_or_event_id() -> None:
    frame = server(
        {"type": "error", "event_id": "e", "error": {"type": "server_error", "message": "boom"}}
    )
    assert parse_server_event(frame) == ErrorEvent(None, "boom", "server_error", None)


def test_unknown_event_types_are_other_not_mistyped() -> None:
    assert parse_server_event('{"type": "some.future.event", "x": 1}') == Other(
        "some.future.event", {"type": "some.future.event", "x": 1}
    )


@pytest.mark.parametrize(
    ("frame", "reason_contains"),
    [
        ("", "not JSON"),
        ("[]", "not a JSON object"),
        ("{}", "missing 'type'"),
        ('{"type": 3}', "'type' is not a string"),
        ('{"type": "response.output_audio.delta", "item_id": "i", "response_id": "r"}', "'delta'"),
        (
            '{"type": "response.output_audio.delta", "delta": "AAAA", "response_id": "r"}',
            "'item_id'",
        ),
        (
            '{"type": "response.output_audio.delta", "delta": "AA\\"A", "item_id": "i",'
            ' "response_id": "r"}',
            "not valid base64",
        ),
        ('{"type": "input_audio_buffer.speech_started", "item_id": "i"}', "'audio_start_ms'"),
        (
            '{"type": "input_audio_buffer.speech_started", "item_id": "i", "audio_start_ms": 1.5}',
            "'audio_start_ms'",
        ),
        ('{"type": "response.created"}', "'response'"),
        ('{"type": "response.done", "response": {"id": "r", "status": 1}}', "'response.status'"),
        ('{"type": "response.done", "response": {"id": 7}}', "'response.id'"),
        (
            '{"type": "response.done", "response": {"id": "r", "status": "done", "output": 1}}',
            "'response.output'",
        ),
        (
            '{"type": "response.done", "response": {"id": "r", "status": "done", "usage": 1}}',
            "'response.usage'",
        ),
        ('{"type": "response.function_call_arguments.done", "call_id": "c"}', "'name'"),
        ('{"type": "error", "error": {"type": "x"}}', "'error.message'"),
        ('{"type": "error", "error": {"type": "x", "message": "m", "code": 5}}', "'error.code'"),
        ('{"type": "session.updated", "session": null}', "'session'"),
    ],
)
def test_malformed_server_events_say_what_is_wrong(frame: str, reason_contains: str) -> None:
    event = parse_server_event(frame)
    assert isinstance(event, Malformed)
    assert reason_contains in event.reason


# --- parse_server_event's hot decoder agrees with the general parser ------------------------

_DELTA = '"type":"response.output_audio.delta"'
# Frames that look like audio deltas, well-formed or almost, and other events: each goes
# through the hot decoder and must come out as the general parser (orjson) has it.
NEAR_DELTA_FRAMES = [
    "{" + _DELTA + ',"event_id":"e","response_id":"r","item_id":"i","output_index":0,'
    '"content_index":0,"delta":"AAAA//8="}',
    '{"delta":"AAAA","item_id":"i","response_id":"r",' + _DELTA + "}",  # type last
    "{" + _DELTA + ',"delta":"AAAA","item_id":"i","response_id":"r","type":"x.y"}',  # dup
    '{"type":"x.y","delta":"AAAA","item_id":"i","response_id":"r",' + _DELTA + "}",
    "{" + _DELTA + ',"delta":"AAAA","item_id":null,"response_id":"r"}',
    "{" + _DELTA + ',"delta":5,"item_id":"i","response_id":"r"}',
    "{" + _DELTA + ',"delta":"AAA","item_id":"i","response_id":"r"}',
    "{" + _DELTA + ',"delta":"","item_id":"i","response_id":"r"}',
    "{" + _DELTA + ',"delta":"\\u0041AAA","item_id":"i","response_id":"r"}',
    "{" + _DELTA + ',"delta":"AAAA","item_id":"i","response_id":"r","x":NaN}',
    "{" + _DELTA + ',"delta":"AAAA","item_id":"i","response_id":"r","x":"\\udc00"}',
    "{" + _DELTA + ',"delta":"AAAA","item_id":"i","response_id":"r"}x',
    "{"
    + _DELTA
    + ',"delta":"AAAA","item_id":"i","response_id":"r","d":'
    + "[" * 2000
    + "]" * 2000
    + "}",
    '{"type":"response.output_audio_transcript.delta","delta":"Hi","item_id":"i",'
    '"response_id":"r"}',
    '{"type":"input_audio_buffer.speech_started","audio_start_ms":1,"item_id":"i"}',
    '{"type":null}',
    '{"type":"response.done","response":{"id":"r","status":"completed"}}',
    "[]",
    "",
    ("{" + _DELTA + ',"delta":"AAAA","item_id":"i","response_id":"r"}').encode(),
]


@pytest.mark.parametrize("frame", NEAR_DELTA_FRAMES)
def test_hot_decoder_agrees_with_the_general_parser(frame: str | bytes) -> None:
    assert parse_server_event(frame) == parse_any_server_event(frame)


def test_what_the_hot_decoder_skips_is_checked_for_syntax_only() -> None:
    # Documented leniency: bytes the bridge does not read are not checked for UTF-8.
    frame = b'{"type":"response.output_audio.delta","delta":"AAAA","item_id":"i",'
    frame += b'"response_id":"r","event_id":"\xff"}'
    assert parse_server_event(frame) == AudioDelta("i", "r", "AAAA")
    assert isinstance(parse_any_server_event(frame), Malformed)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)


@given(st.text() | st.binary())
def test_parse_server_event_never_raises_on_arbitrary_input(frame: str | bytes) -> None:
    assert parse_server_event(frame) is not None


@given(
    st.sampled_from([*SERVER_EVENT_CLASSES, "x.y"]),
    st.dictionaries(
        st.sampled_from(
            ["delta", "item_id", "response_id", "response", "error", "session", "call_id", "name"]
        )
        | st.text(max_size=8),
        json_values,
        max_size=6,
    ),
)
def test_parse_server_event_never_raises_on_arbitrary_fields(kind: str, body: dict) -> None:
    frame = json.dumps({**body, "type": kind})
    event = parse_server_event(frame)
    assert event is not None
    assert event == parse_any_server_event(frame)  # the hot decoder agrees


# --- connection (the picows client in depth: tests/test_realtime_connection.py) ---------------

Handler = Callable[[ServerConnection], Awaitable[None]]


async def test_connect_sends_ga_handshake_and_moves_frames(realtime_server) -> None:
    seen: dict[str, Any] = {}

    async def handler(ws: ServerConnection) -> None:
        seen["path"] = ws.request.path
        seen["headers"] = ws.request.headers
        await ws.send('{"type":"session.created","session":{}}')
        seen["received"] = await ws.recv()
        await ws.send(b'{"type":"session.updated","session":{}}')
        await ws.close()

    url = await realtime_server(handler)
    connection = await RealtimeConnection.connect(url, "gpt-realtime", "sk-test")
    first = await anext(connection)
    await connection.send(append_audio("AAAA"))
    rest = [frame async for frame in connection]

    assert seen["path"] == "/v1/realtime?model=gpt-realtime"
    assert seen["headers"]["Authorization"] == "Bearer sk-test"
    assert "OpenAI-Beta" not in seen["headers"]
    assert seen["received"] == append_audio("AAAA")
    assert parse_server_event(first) == SessionCreated({})
    assert [parse_server_event(frame) for frame in rest] == [SessionUpdated({})]
    assert connection.close_code == 1000


async def test_connect_without_key_sends_no_authorization(realtime_server) -> None:
    headers: list[Any] = []

    async def handler(ws: ServerConnection) -> None:
        headers.append(ws.request.headers)
        await ws.wait_closed()

    connection = await RealtimeConnection.connect(await realtime_server(handler), "m", None)
    await connection.close()
    assert "Authorization" not in headers[0]


async def test_abnormal_close_raises_with_code_and_reason(realtime_server) -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.close(4000, "beta_api_shape_disabled")

    connection = await RealtimeConnection.connect(await realtime_server(handler), "m", "k")
    with pytest.raises(ConnectionClosedError):
        await anext(connection)
    assert (connection.close_code, connection.close_reason) == (4000, "beta_api_shape_disabled")


async def test_connect_times_out_when_the_server_never_answers() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accept TCP, never answer the HTTP upgrade
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(TimeoutError):
            await RealtimeConnection.connect(
                f"ws://127.0.0.1:{port}/v1/realtime", "m", "k", open_timeout=0.2
            )
    finally:
        server.close()


def test_realtime_url_sets_model_and_keeps_other_query() -> None:
    assert (
        realtime_url("wss://api.openai.com/v1/realtime", "gpt-realtime-2.1")
        == "wss://api.openai.com/v1/realtime?model=gpt-realtime-2.1"
    )
    assert (
        realtime_url("ws://127.0.0.1:9/v1/realtime?model=old&x=1", "a b")
        == "ws://127.0.0.1:9/v1/realtime?x=1&model=a+b"
    )
