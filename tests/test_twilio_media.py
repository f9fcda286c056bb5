"""Twilio Media Streams messages: parsing, building, and the caller-side writer/reader."""

from __future__ import annotations

import base64
import binascii
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.twilio_media import (
    MAX_MEDIA_PAYLOAD_CHARS,
    Connected,
    Dtmf,
    Malformed,
    Mark,
    Media,
    OutboundClear,
    OutboundMark,
    OutboundMedia,
    Start,
    Stop,
    TwilioStreamWriter,
    Unknown,
    clear_frame,
    is_base64_text,
    mark_frame,
    media_frame,
    parse_any_frame,
    parse_frame,
    parse_outbound,
)

STREAM = "MZ00000000000000000000000000000001"
CALL = "CA00000000000000000000000000000001"
ACCOUNT = "AC00000000000000000000000000000001"

# The documented examples (PROTOCOLS A.2), as Twilio sends them.
DOC_START = {
    "event": "start",
    "sequenceNumber": "1",
    "streamSid": STREAM,
    "start": {
        "streamSid": STREAM,
        "accountSid": ACCOUNT,
        "callSid": CALL,
        "tracks": ["inbound"],
        "customParameters": {"call_token": "opaque-one-time-token"},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    },
}


def media_message(**media: object) -> str:
    return json.dumps(
        {"event": "media", "sequenceNumber": "7", "streamSid": STREAM, "media": media}
    )


# --- parse_frame: the documented shapes ------------------------------------------------------


def test_parses_documented_start() -> None:
    assert parse_frame(json.dumps(DOC_START)) == Start(
        stream_sid=STREAM,
        call_sid=CALL,
        account_sid=ACCOUNT,
        custom_parameters={"call_token": "opaque-one-time-token"},
        tracks=("inbound",),
        encoding="audio/x-mulaw",
        sample_rate=8000,
        channels=1,
    )


def test_parses_documented_media_keeping_payload_encoded() -> None:
    payload = base64.b64encode(bytes(range(160))).decode()
    event = parse_frame(
        media_message(track="inbound", chunk="6", timestamp="120", payload=payload).encode()
    )
    assert event == Media(payload=payload)
    assert isinstance(event, Media) and event.audio == bytes(range(160))


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (
            {"event": "connected", "protocol": "Call", "version": "1.0.0"},
            Connected("Call", "1.0.0"),
        ),
        ({"event": "mark", "streamSid": STREAM, "mark": {"name": "g3:17"}}, Mark("g3:17")),
        (
            {
                "event": "dtmf",
                "streamSid": STREAM,
                "dtmf": {"track": "inbound_track", "digit": "#"},
            },
            Dtmf("#"),
        ),
        (
            {
                "event": "stop",
                "streamSid": STREAM,
                "stop": {"accountSid": ACCOUNT, "callSid": CALL},
            },
            Stop(CALL),
        ),
        ({"event": "stop", "streamSid": STREAM}, Stop(None)),
        ({"event": "transcription", "streamSid": STREAM}, Unknown("transcription")),
    ],
)
def test_parses_other_documented_events(frame: dict, expected: object) -> None:
    assert parse_frame(json.dumps(frame)) == expected


def test_start_falls_back_to_top_level_stream_sid_and_defaults_optional_parts() -> None:
    start = {k: v for k, v in DOC_START["start"].items() if k not in ("streamSid", "tracks")}
    del start["customParameters"]
    event = parse_frame(json.dumps({**DOC_START, "start": start}))
    assert isinstance(event, Start)
    assert (event.stream_sid, event.custom_parameters, event.tracks) == (STREAM, {}, ())


def test_media_needs_only_its_payload() -> None:
    # chunk and timestamp are Twilio's numbering, which the bridge does not use.
    assert parse_frame(media_message(payload="AAAA")) == Media("AAAA")
    assert parse_frame(media_message(payload="AAAA", chunk=3, timestamp="x")) == Media("AAAA")


# --- parse_frame: bad input is Malformed, with the reason ------------------------------------


@pytest.mark.parametrize(
    ("frame", "reason_contains"),
    [
        ("", "not JSON"),
        ("{", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        ("[1, 2]", "array"),
        ('"media"', "string"),
        ("null", "expected an object"),
        ("{}", "missing 'event'"),
        ('{"event": 1}', "'event' is not a string"),
        ('{"event": "media"}', "missing 'media' object"),
        ('{"event": "media", "media": []}', "'media' is JSON array"),
        ('{"event": "media", "media": {}}', "missing 'media.payload'"),
        ('{"event": "media", "media": {"payload": 12}}', "'media.payload' is JSON number"),
        ('{"event": "media", "media": {"payload": ""}}', "media.payload is empty"),
        ('{"event": "media", "media": {"payload": "AAA"}}', "not valid base64"),
        ('{"event": "media", "media": {"payload": "AA\\"A"}}', "not valid base64"),
        ('{"event": "media", "media": {"payload": "A===" }}', "not valid base64"),
        ('{"event": "media", "media": {"payload": "AAAA\\n"}}', "not valid base64"),
        ('{"event": "start"}', "missing 'start' object"),
        ('{"event": "start", "start": {}}', "missing 'start.streamSid'"),
        ('{"event": "mark", "mark": {}}', "missing 'mark.name'"),
        ('{"event": "mark", "mark": {"name": 3}}', "'mark.name' is JSON number"),
        ('{"event": "dtmf", "dtmf": {"digit": "55"}}', "dtmf.digit is not one of"),
        ('{"event": "dtmf", "dtmf": {}}', "missing 'dtmf.digit'"),
        ('{"event": "stop", "stop": "now"}', "'stop' is JSON string"),
        ('{"event": "stop", "stop": {"callSid": 7}}', "'stop.callSid' is JSON number"),
    ],
)
def test_malformed_frames_say_what_is_wrong(frame: str | bytes, reason_contains: str) -> None:
    event = parse_frame(frame)
    assert isinstance(event, Malformed)
    assert reason_contains in event.reason


@pytest.mark.parametrize(
    ("path", "value", "reason_contains"),
    [
        (("callSid",), None, "missing 'start.callSid'"),
        (("accountSid",), "", "'start.accountSid' is empty"),
        (("customParameters",), ["a"], "'start.customParameters' is JSON array"),
        (("customParameters", "call_token"), 5, "start.customParameters['call_token']"),
        (("tracks",), "inbound", "start.tracks"),
        (("tracks",), ["inbound", 1], "start.tracks"),
        (("mediaFormat",), None, "missing 'start.mediaFormat' object"),
        (("mediaFormat", "encoding"), 1, "start.mediaFormat.encoding"),
        (("mediaFormat", "sampleRate"), "8000", "start.mediaFormat.sampleRate"),
        (("mediaFormat", "sampleRate"), 0, "start.mediaFormat.sampleRate"),
        (("mediaFormat", "channels"), True, "start.mediaFormat.channels"),
    ],
)
def test_malformed_start_names_the_field(
    path: tuple[str, ...], value: object, reason_contains: str
) -> None:
    message = json.loads(json.dumps(DOC_START))
    node = message["start"]
    for key in path[:-1]:
        node = node[key]
    if value is None:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    event = parse_frame(json.dumps(message))
    assert isinstance(event, Malformed)
    assert reason_contains in event.reason


# --- parse_frame's hot decoder agrees with the general parser -------------------------------

# Frames that look like media or marks, well-formed or almost: each goes through the hot
# decoder and must come out as the general parser (orjson, every field checked) has it.
NEAR_HOT_FRAMES = [
    media_message(track="inbound", chunk="1", timestamp="20", payload="AAAA//8="),
    '{"event":"mark","streamSid":"MZ1","mark":{"name":"g0:1"}}',
    '{"event":"mark","mark":{"name":""}}',
    '{"media":{"payload":"AAAA"},"event":"media"}',  # the tag need not come first
    '{"event":"media","media":{"payload":"AAAA"},"event":"start"}',  # duplicates: the last wins
    '{"event":"start","media":{"payload":"AAAA"},"event":"media"}',
    '{"event":"media","media":{"payload":5,"payload":"AAAA"}}',
    '{"event":"media","media":{"payload":"AAAA","payload":5}}',
    '{"event":"mark","mark":{"name":"a","name":1}}',
    '{"event":"media","media":{"payload":"\\u0041AAA"}}',  # an escape in the payload
    '{"event":"media","media":{"payload":"AAAA"},"x":"\\ud800"}',  # a lone surrogate
    '{"event":"media","media":{"payload":"AAAA"},"x":NaN}',
    '{"event":"media","media":{"payload":"AAAA"}} ',
    '{"event":"media","media":{"payload":"AAAA"}}x',
    '{"event":"media","media":{"payload":"AAAA"},"deep":' + "[" * 2000 + "]" * 2000 + "}",
    '{"event":"media","media":{"payload":"AAAA"},"deep":' + "[" * 100 + "]" * 100 + "}",
    '{"event":"media","media":{"payload":"AAAA===="}}',  # binascii's strict mode takes it
    '{"event":"media","media":{"payload":"AAA="}}',
    '{"event":"media","media":{"payload":"' + "A" * (MAX_MEDIA_PAYLOAD_CHARS + 4) + '"}}',
    '{"event":"media","media":{"payload":null}}',
    '{"event":"media","media":null}',
    '{"event":"mark","mark":{"name":null}}',
    '{"event":"MEDIA","media":{"payload":"AAAA"}}',
    "[]",
    b'{"event":"media","media":{"payload":"AAAA"}}',
    bytearray(b'{"event":"media","media":{"payload":"AAAA"}}'),
]


@pytest.mark.parametrize("frame", NEAR_HOT_FRAMES)
def test_hot_decoder_agrees_with_the_general_parser(frame: str | bytes) -> None:
    assert parse_frame(frame) == parse_any_frame(frame)


@given(
    st.dictionaries(
        st.sampled_from(["event", "media", "mark", "streamSid", "sequenceNumber", "x"]),
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers()
            | st.text(max_size=8)
            | st.sampled_from(["media", "mark", "AAAA", "//8=", "AAA"]),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.sampled_from(["payload", "name", "chunk"]), inner, max_size=3)
            ),
            max_leaves=8,
        ),
        max_size=4,
    )
)
def test_hot_decoder_agrees_on_generated_frames(message: dict[str, object]) -> None:
    frame = json.dumps(message)
    assert parse_frame(frame) == parse_any_frame(frame)


def test_what_the_hot_decoder_skips_is_checked_for_syntax_only() -> None:
    # Documented leniency: numbers the bridge does not read are not range-checked.
    frame = '{"event":"media","x":1e999,"media":{"payload":"AAAA"}}'
    assert parse_frame(frame) == Media("AAAA")
    assert isinstance(parse_any_frame(frame), Malformed)


def test_oversized_media_payload_is_rejected() -> None:
    too_long = "A" * (MAX_MEDIA_PAYLOAD_CHARS + 4 - MAX_MEDIA_PAYLOAD_CHARS % 4)
    event = parse_frame(media_message(payload=too_long))
    assert isinstance(event, Malformed) and "more than" in event.reason


def test_non_text_frame_type_is_malformed_not_an_exception() -> None:
    event = parse_frame(123)  # type: ignore[arg-type]
    assert isinstance(event, Malformed)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
event_names = st.sampled_from(["connected", "start", "media", "mark", "dtmf", "stop", "other"])


@given(st.text() | st.binary())
def test_parse_frame_never_raises_on_arbitrary_input(frame: str | bytes) -> None:
    assert parse_frame(frame) is not None


@given(event_names, st.dictionaries(st.text(max_size=15), json_values, max_size=6))
def test_parse_frame_never_raises_on_arbitrary_messages(event: str, body: dict) -> None:
    for message in ({"event": event, **body}, {"event": event, event: body}):
        assert parse_frame(json.dumps(message)) is not None


base64ish = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_ \n"
)


@given(base64ish | st.text())
def test_is_base64_text_agrees_with_a_strict_decoder(text: str) -> None:
    # Padded base64 only: a strict decoder also takes unpadded lengths ("0000=" decodes), which
    # Twilio never sends and which is_base64_text refuses on purpose.
    try:
        binascii.a2b_base64(text, strict_mode=True)
        decodes = len(text) % 4 == 0
    except (binascii.Error, ValueError):
        decodes = False
    assert is_base64_text(text) == decodes


@given(st.binary(min_size=1, max_size=2000))
def test_any_encoded_audio_is_accepted(audio: bytes) -> None:
    payload = base64.b64encode(audio).decode()
    event = parse_frame(media_message(payload=payload))
    assert isinstance(event, Media)
    assert base64.b64decode(event.payload) == audio


# --- what we send ---------------------------------------------------------------------------


def test_outbound_frames_have_twilios_documented_shapes() -> None:
    assert json.loads(media_frame(STREAM, "f39+fQ==")) == {
        "event": "media",
        "streamSid": STREAM,
        "media": {"payload": "f39+fQ=="},
    }
    assert json.loads(mark_frame(STREAM, "g3:17")) == {
        "event": "mark",
        "streamSid": STREAM,
        "mark": {"name": "g3:17"},
    }
    assert json.loads(clear_frame(STREAM)) == {"event": "clear", "streamSid": STREAM}


@given(st.text(min_size=1), st.text(min_size=1))
def test_outbound_frames_escape_any_sid_and_mark_name(stream_sid: str, name: str) -> None:
    assert json.loads(mark_frame(stream_sid, name))["mark"]["name"] == name
    assert json.loads(clear_frame(stream_sid))["streamSid"] == stream_sid
    assert json.loads(media_frame(stream_sid, "AAAA"))["streamSid"] == stream_sid


@given(st.binary(max_size=4000))
def test_outbound_media_round_trips_through_twilios_reader(audio: bytes) -> None:
    frame = media_frame(STREAM, base64.b64encode(audio).decode())
    assert parse_outbound(frame) == OutboundMedia(STREAM, audio)


def test_outbound_mark_and_clear_round_trip() -> None:
    assert parse_outbound(mark_frame(STREAM, "g0:1")) == OutboundMark(STREAM, "g0:1")
    assert parse_outbound(clear_frame(STREAM)) == OutboundClear(STREAM)


@pytest.mark.parametrize(
    ("frame", "reason_contains"),
    [
        (b'{"event":"clear","streamSid":"MZ1"}', "binary frame"),
        ("not json", "not JSON"),
        ('{"event":"stop","streamSid":"MZ1"}', "31924"),
        ('{"event":"media","media":{"payload":"AAAA"}}', "missing 'streamSid'"),
        ('{"event":"clear","streamSid":""}', "'streamSid' is empty"),
        ('{"event":"media","streamSid":"MZ1"}', "missing 'media' object"),
        ('{"event":"media","streamSid":"MZ1","media":{"payload":7}}', "media.payload"),
        ('{"event":"media","streamSid":"MZ1","media":{"payload":"AAA"}}', "not valid base64"),
        ('{"event":"media","streamSid":"MZ1","media":{"payload":"AA A"}}', "not valid base64"),
        ('{"event":"mark","streamSid":"MZ1","mark":{}}', "missing 'mark.name'"),
        ('{"event":"mark","streamSid":"MZ1"}', "missing 'mark' object"),
    ],
)
def test_twilios_reader_rejects_what_twilio_rejects(
    frame: str | bytes, reason_contains: str
) -> None:
    event = parse_outbound(frame)
    assert isinstance(event, Malformed)
    assert reason_contains in event.reason


# --- the caller-side writer -----------------------------------------------------------------


def test_writer_numbers_frames_like_twilio() -> None:
    writer = TwilioStreamWriter(STREAM, CALL, ACCOUNT)
    connected = json.loads(writer.connected())
    start = json.loads(writer.start({"token": "t0k"}))
    first = json.loads(writer.media(b"\xff" * 160))
    second = json.loads(writer.media(b"\xff" * 80))
    writer.skip(100)
    third = json.loads(writer.media(b"\xff" * 160))
    mark = json.loads(writer.mark("g0:1"))
    dtmf = json.loads(writer.dtmf("7"))
    stop = json.loads(writer.stop())

    assert connected == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    assert "sequenceNumber" not in connected
    assert [m["sequenceNumber"] for m in (start, first, second, third, mark, dtmf, stop)] == [
        str(n) for n in range(1, 8)
    ]
    assert all(m["streamSid"] == STREAM for m in (start, first, third, mark, dtmf, stop))
    assert [m["media"]["chunk"] for m in (first, second, third)] == ["1", "2", "3"]
    # 160 bytes = 20 ms, 80 bytes = 10 ms, then a 100 ms gap.
    assert [m["media"]["timestamp"] for m in (first, second, third)] == ["0", "20", "130"]
    assert first["media"]["track"] == "inbound"
    assert base64.b64decode(first["media"]["payload"]) == b"\xff" * 160
    assert start["start"]["customParameters"] == {"token": "t0k"}
    assert start["start"]["mediaFormat"] == {
        "encoding": "audio/x-mulaw",
        "sampleRate": 8000,
        "channels": 1,
    }
    assert dtmf["dtmf"] == {"track": "inbound_track", "digit": "7"}
    assert stop["stop"] == {"accountSid": ACCOUNT, "callSid": CALL}
    assert writer.timestamp_ms == 150


def test_writer_frames_parse_back_to_the_same_facts() -> None:
    writer = TwilioStreamWriter(STREAM, CALL, ACCOUNT)
    assert parse_frame(writer.connected()) == Connected("Call", "1.0.0")
    start = parse_frame(writer.start({"token": "abc"}))
    assert isinstance(start, Start)
    assert (start.stream_sid, start.call_sid, start.account_sid) == (STREAM, CALL, ACCOUNT)
    assert start.custom_parameters == {"token": "abc"}
    audio = bytes(range(256)) * 2
    media = parse_frame(writer.media(audio))
    assert isinstance(media, Media) and base64.b64decode(media.payload) == audio
    assert parse_frame(writer.mark("g2:9")) == Mark("g2:9")
    assert parse_frame(writer.dtmf("*")) == Dtmf("*")
    assert parse_frame(writer.stop()) == Stop(CALL)


def test_writer_rejects_negative_gap() -> None:
    with pytest.raises(ValueError, match="negative"):
        TwilioStreamWriter(STREAM, CALL, ACCOUNT).skip(-1)
