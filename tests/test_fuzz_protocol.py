"""CallProtocol driven by random event sequences, in any order (media before start, events
after stop, acks of marks never sent, responses that never began, tool results twice...).

Properties: nothing raises; every frame it queues for Twilio passes Twilio's own checks and
every frame for the model is a valid client event; marks go out only where the policy says
(see `MarkPolicy`); its state stays bounded by the ids it has seen (not by the number of
events); and after any garbage, a good audio frame still flows.
"""

from __future__ import annotations

import base64
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge import realtime as rt
from bridge import twilio_media as tw
from bridge.call_protocol import MAX_DTMF_DIGITS, CallProtocol, ToolRequest
from bridge.playback import MARK_EVERY_MS, MULAW_BYTES_PER_MS
from tests.sdk_oracle import assert_valid_client_event

STREAM = "MZ" + "0" * 32
IDS = ("a", "b", "c")  # a small pool, so events refer to each other
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ids = st.sampled_from(IDS)
good_ulaw = st.integers(min_value=0, max_value=400).map(
    lambda n: base64.b64encode(b"\x7f" * n).decode()
)
bad_base64 = st.sampled_from(("!!!!", "AAA", "A===", "====", "A\nAA", "é", ""))
huge = st.integers(min_value=5_000, max_value=100_000).map(lambda n: "A" * (n - n % 4))
pcm_delta = st.integers(min_value=0, max_value=2_000).map(
    lambda n: base64.b64encode(b"\x01\x00" * n + b"\x02" * (n % 2)).decode()
)
start = tw.Start(STREAM, "CA1", "AC1", {"token": "t"}, ("inbound",), "audio/x-mulaw", 8000, 1)


def media_frame(payload: str) -> str:
    """A media frame as Twilio sends it, around any payload text."""
    media = {"track": "inbound", "chunk": "1", "timestamp": "20", "payload": payload}
    return orjson.dumps({"event": "media", "streamSid": STREAM, "media": media}).decode()


# Twilio events come through the parser, as on the wire: what it cannot vouch for (bad base64,
# wrong types) arrives as Malformed, and the protocol relies on that.
twilio_events = st.one_of(
    (good_ulaw | bad_base64 | huge).map(lambda p: tw.parse_frame(media_frame(p))),
    st.builds(tw.Mark, st.text(max_size=12) | st.sampled_from(("m1", "m2", "m3"))),
    st.builds(tw.Dtmf, st.sampled_from("0123456789*#")),
    st.just(tw.Stop("CA1")),
    st.just(start),
    st.just(tw.Connected("Call", "1.0.0")),
    st.builds(tw.Unknown, st.text(max_size=10)),
    st.builds(tw.Malformed, st.text(max_size=10)),
)
audio_deltas = st.builds(rt.AudioDelta, ids, ids, pcm_delta)
realtime_events = st.one_of(
    audio_deltas,
    st.builds(rt.SpeechStarted, st.integers(0, 10_000), ids),
    st.builds(rt.SpeechStopped, st.integers(0, 10_000), ids),
    st.builds(rt.ResponseCreated, ids),
    st.builds(
        rt.ResponseDone,
        ids | st.none(),
        st.sampled_from(("completed", "cancelled", "failed", None)),
        st.none() | st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=4)),
        st.just([]),
    ),
    st.builds(
        rt.FunctionCallDone,
        ids,
        st.sampled_from(("capture_lead", "end_call")),
        st.text(max_size=20),
        ids,
        ids,
    ),
    st.builds(rt.InputTranscriptDone, ids, st.text(max_size=20)),
    st.builds(rt.InputAudioCommitted, ids),
    st.builds(rt.OutputTranscriptDone, ids, ids, st.text(max_size=20)),
    st.builds(
        rt.ErrorEvent, st.none() | st.text(max_size=8), st.text(max_size=8), st.just("x"), st.none()
    ),
    st.builds(rt.Other, st.text(max_size=10), st.just({})),
    st.builds(rt.Malformed, st.text(max_size=10)),
)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("twilio"), twilio_events),
        st.tuples(st.just("realtime"), realtime_events),
        st.tuples(st.just("realtime"), audio_deltas),  # most of a real call is audio
        st.tuples(st.just("tool_done"), st.booleans()),
        st.tuples(st.just("hang_up"), st.none()),
        st.tuples(st.just("respond"), st.none()),
        st.tuples(st.just("echo"), st.integers(0, 3)),  # Twilio echoes marks it was sent
        st.tuples(st.just("time"), st.integers(0, 500)),  # ms pass
    ),
    max_size=60,
)


class MarkPolicy:
    """What Twilio sees of the mark policy: a mark after at least MARK_EVERY_MS of audio, or
    before another item's audio, or at the end of a response; never anywhere else."""

    def __init__(self) -> None:
        self.item: str | None = None  # item of the audio sent since the last mark
        self.unmarked = 0  # its bytes
        self.marks: list[str] = []  # sent, oldest first (echoed or not)

    def check(self, frames: list[str], event: object) -> None:
        audio_item = event.item_id if type(event) is rt.AudioDelta else None
        for n, frame in enumerate(frames):
            out = tw.parse_outbound(frame)
            if type(out) is tw.OutboundMedia:
                assert audio_item is not None, "media not caused by model audio"
                if out.ulaw:
                    assert self.unmarked == 0 or self.item == audio_item, "a mark spans items"
                    self.item = audio_item
                    self.unmarked += len(out.ulaw)
            elif type(out) is tw.OutboundMark:
                assert self.unmarked > 0, "a mark closing no audio"
                if audio_item is not None:
                    media_before = any(
                        type(tw.parse_outbound(f)) is tw.OutboundMedia for f in frames[:n]
                    )
                    if media_before:
                        assert self.unmarked >= MARK_EVERY_MS * MULAW_BYTES_PER_MS, "early mark"
                    else:
                        assert self.item != audio_item, "a mark before the same item's audio"
                else:
                    assert type(event) is rt.ResponseDone, f"a mark on {event!r}"
                self.marks.append(out.name)
                self.item, self.unmarked = None, 0
            else:  # clear
                self.item, self.unmarked = None, 0
        if type(event) is rt.ResponseDone:
            assert self.unmarked == 0, "the end of a response left audio unmarked"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def drain(p: CallProtocol, pending: list[ToolRequest], policy: MarkPolicy, event: object) -> None:
    twilio_frames = p.twilio_frames_to_send()
    for frame in twilio_frames:
        assert not isinstance(tw.parse_outbound(frame), tw.Malformed), frame
    policy.check(twilio_frames, event)
    for frame in p.realtime_frames_to_send():
        assert_valid_client_event(orjson.loads(frame))
    pending.extend(p.tools_to_run())


def feed(
    p: CallProtocol,
    kind: str,
    value: Any,
    pending: list[ToolRequest],
    policy: MarkPolicy,
    clock: Clock,
) -> None:
    if kind == "twilio":
        p.receive_twilio(value)
    elif kind == "realtime":
        p.receive_realtime(value)
    elif kind == "tool_done" and pending:
        request = pending.pop(0) if value else pending[0]  # sometimes the same result twice
        p.tool_finished(request, '{"status":"ok"}', {"status": "ok"})
    elif kind == "hang_up":
        p.hang_up_requested = True
    elif kind == "respond":
        p.request_response("say something")
    elif kind == "echo" and policy.marks:
        p.receive_twilio(tw.Mark(name=policy.marks[min(value, len(policy.marks) - 1)]))
    elif kind == "time":
        clock.now += value / 1000
    drain(p, pending, policy, value)


def assert_bounded(p: CallProtocol) -> None:
    pool = len(IDS)
    assert len(p.dtmf_digits) <= MAX_DTMF_DIGITS
    assert len(p._cut_responses) <= pool and len(p._cut_items) <= pool
    assert len(p._tools_running) <= pool
    playback = p.playback
    assert len(playback._sent_bytes) <= pool and len(playback._heard_bytes) <= pool
    assert len(playback._cut_items) <= pool


def new_protocol(mode: str, clock: Clock) -> CallProtocol:
    return CallProtocol(
        stream_sid=STREAM,
        audio_mode=mode,  # type: ignore[arg-type]
        max_frame_bytes=4096,
        monotonic=clock,
    )


@FUZZ
@given(st.sampled_from(("pcm16", "g711")), steps)
def test_random_event_sequences_never_break_the_protocol(mode: str, sequence: list) -> None:
    clock = Clock()
    p = new_protocol(mode, clock)
    pending: list[ToolRequest] = []
    policy = MarkPolicy()
    session = rt.session_update(
        instructions="hi", tools=[], audio_mode=mode, voice="marin", transcription_model="m"
    )
    p.start_session(session, "Hello")
    drain(p, pending, policy, None)
    for kind, value in sequence:
        feed(p, kind, value, pending, policy, clock)
        assert_bounded(p)
        playback = p.playback
        for item in IDS:
            assert 0 <= playback.heard_ms(item) <= playback.sent_ms(item)
    assert p.stats.frames_in <= len(sequence)
    assert sum(p.stats.frames_dropped.values()) <= len(sequence)


@FUZZ
@given(st.sampled_from(("pcm16", "g711")), steps)
def test_after_any_garbage_good_audio_still_reaches_the_model(mode: str, sequence: list) -> None:
    clock = Clock()
    p = new_protocol(mode, clock)
    pending: list[ToolRequest] = []
    policy = MarkPolicy()
    for kind, value in sequence:
        if kind == "twilio" and type(value) is tw.Stop:
            continue  # after a stop the call is over; nothing is owed
        feed(p, kind, value, pending, policy, clock)
    p.receive_twilio(tw.parse_frame(media_frame(base64.b64encode(b"\x7f" * 160).decode())))
    appended = [orjson.loads(f) for f in p.realtime_frames_to_send()]
    assert [e["type"] for e in appended] == ["input_audio_buffer.append"]
