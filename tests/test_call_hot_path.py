"""CallProtocol hot path: the per-stream frame limit, decode-once parsing, append batching."""

from __future__ import annotations

import base64
import binascii

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge import realtime as rt
from bridge import twilio_media as tw
from bridge.call_protocol import CallProtocol

FRAME = tw.TwilioStreamWriter("MZ" + "0" * 32, "CA" + "0" * 32, "AC" + "0" * 32)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def media(byte: int = 0x7F) -> tw.TwilioEvent:
    return tw.parse_frame(FRAME.media(bytes([byte]) * 160))


def appended(p: CallProtocol) -> int:
    return sum('"input_audio_buffer.append"' in f for f in p.realtime_frames_to_send())


@pytest.mark.parametrize("mode", ["pcm16", "g711"])
def test_a_flood_beyond_the_burst_is_dropped_as_rate_limited(mode: str) -> None:
    clock = FakeClock()
    p = CallProtocol(
        stream_sid="MZ1", audio_mode=mode, max_frames_per_s=50, frame_burst=10, monotonic=clock
    )
    for _ in range(25):  # all at the same instant
        p.receive_twilio(media())
    assert appended(p) == 10
    assert p.stats.frames_in == 10
    assert p.stats.frames_dropped == {"rate_limited": 15}


def test_the_bucket_refills_at_the_configured_rate() -> None:
    clock = FakeClock()
    p = CallProtocol(
        stream_sid="MZ1", audio_mode="g711", max_frames_per_s=40, frame_burst=10, monotonic=clock
    )
    for _ in range(10):
        p.receive_twilio(media())
    p.receive_twilio(media())
    assert p.stats.frames_dropped == {"rate_limited": 1}
    clock.now += 0.125  # 5 frames' worth at 40 per second (exact in binary)
    for _ in range(8):
        p.receive_twilio(media())
    assert p.stats.frames_in == 15
    assert p.stats.frames_dropped == {"rate_limited": 4}
    clock.now += 60.0  # a long quiet spell refills only up to the burst
    for _ in range(12):
        p.receive_twilio(media())
    assert p.stats.frames_in == 25
    assert p.stats.frames_dropped == {"rate_limited": 6}


def test_a_real_time_stream_is_never_limited() -> None:
    clock = FakeClock()
    p = CallProtocol(stream_sid="MZ1", audio_mode="pcm16", monotonic=clock)
    for _ in range(3000):  # a minute of Twilio's 50 frames a second
        p.receive_twilio(media())
        clock.now += 0.02
    assert p.stats.frames_in == 3000
    assert p.stats.frames_dropped == {}


def test_marks_and_other_events_do_not_count_against_the_limit() -> None:
    clock = FakeClock()
    p = CallProtocol(
        stream_sid="MZ1", audio_mode="g711", max_frames_per_s=5, frame_burst=2, monotonic=clock
    )
    for i in range(20):
        p.receive_twilio(tw.parse_frame(FRAME.mark(f"m{i}")))
    p.receive_twilio(media())
    p.receive_twilio(media())
    assert p.stats.frames_in == 2
    assert p.stats.frames_dropped == {}


def test_decoded_payload_is_used_and_matches_the_base64() -> None:
    event = media(0x12)
    assert isinstance(event, tw.Media)
    assert event.audio == base64.b64decode(event.payload) == bytes([0x12]) * 160
    delta = base64.b64encode(b"\x01\x02" * 240).decode()
    frame = orjson_delta(delta)
    parsed = rt.parse_server_event(frame)
    assert isinstance(parsed, rt.AudioDelta)
    assert parsed.audio == b"\x01\x02" * 240


@pytest.mark.parametrize("bad", ["QQ=", "A99/=", "QQ==QQ==", "QQ\n=", 'QQ"='])
def test_non_canonical_base64_is_still_refused(bad: str) -> None:
    assert isinstance(rt.parse_server_event(orjson_delta(bad)), rt.Malformed)
    frame = FRAME.media(b"\x00" * 3).replace("AAAA", bad)
    assert isinstance(tw.parse_frame(frame), tw.Malformed)


def orjson_delta(delta: str) -> str:
    return rt.encode(
        {
            "type": "response.output_audio.delta",
            "response_id": "resp_1",
            "item_id": "item_1",
            "output_index": 0,
            "content_index": 0,
            "delta": delta,
        }
    )


# Both parsers decode with pybase64 and fall back to binascii on a refusal, so that what they
# accept stays exactly what binascii's strict mode (with a length that is a multiple of 4)
# accepted before. These cases are where pybase64's validate=True and binascii differ, or could.
BASE64_EDGE_CASES = [
    "AAAA",
    "AB==",  # non-zero trailing bits: both accept
    "QR==",
    "ABC=",
    "AAAA====",  # binascii alone accepts whole "=" groups after a complete quantum
    "AAAA========",
    "QUJD====",
    "AB======",
    "AB==AAAA",
    "A===",
    "====",
    "AB=A",
    "A=AA",
    "AAA-",
    "AAA_",
    "AA A",
    "AAA\n",
    "AAA\x00",
    "éAAA",  # non-ASCII: binascii raises a plain ValueError, not binascii.Error
    "AAAé",
    "AA٠A",
    "AAA\uffff",
    "AAAA" * 320,
]


def binascii_verdict(text: str) -> bytes | None:
    """What the parsers accepted before pybase64: strict binascii on a multiple of 4 chars."""
    if len(text) % 4:
        return None
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except ValueError:
        return None


def check_both_parsers(text: str) -> None:
    expected = binascii_verdict(text)
    event = rt.parse_server_event(orjson_delta(text))
    if expected is None:
        assert isinstance(event, rt.Malformed)
        assert "'delta' is not valid base64" in event.reason
    else:
        assert isinstance(event, rt.AudioDelta)
        assert event.audio == expected
    if not text:
        return  # an empty Twilio payload is refused before decoding
    frame = orjson.dumps({"event": "media", "media": {"payload": text}})
    media = tw.parse_frame(frame)
    if expected is None:
        assert media == tw.Malformed("media.payload is not valid base64")
    else:
        assert isinstance(media, tw.Media)
        assert media.audio == expected


@pytest.mark.parametrize("text", BASE64_EDGE_CASES)
def test_base64_acceptance_is_binascii_strict_mode(text: str) -> None:
    check_both_parsers(text)


@given(st.text(alphabet="AQw09+/=\n é٠-_", max_size=24))
def test_base64_acceptance_matches_binascii_on_generated_text(text: str) -> None:
    check_both_parsers(text)


@given(st.binary(max_size=2000))
def test_any_base64_audio_decodes_to_the_same_bytes(audio: bytes) -> None:
    check_both_parsers(base64.b64encode(audio).decode())


def test_non_ascii_base64_is_malformed_not_an_exception() -> None:
    # binascii raises ValueError (not binascii.Error) for non-ASCII text: before pybase64 this
    # escaped both "never raises" parsers for payloads like "AAAé".
    assert tw.parse_frame(FRAME.media(b"\x00" * 3).replace("AAAA", "AAAé")) == tw.Malformed(
        "media.payload is not valid base64"
    )
    assert isinstance(rt.parse_server_event(orjson_delta("AA٠A")), rt.Malformed)
    outbound = orjson.dumps({"event": "media", "streamSid": "MZ1", "media": {"payload": "AAAé"}})
    assert isinstance(tw.parse_outbound(outbound.decode()), tw.Malformed)
