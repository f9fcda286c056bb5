"""CallProtocol: the per-call decisions (audio relay, barge-in, tool turns, hang-up), no I/O."""

from __future__ import annotations

import base64

import numpy as np
import orjson
import pytest

from bridge import realtime as rt
from bridge import twilio_media as tw
from bridge.call_protocol import CallProtocol, ToolRequest
from tests.sdk_oracle import assert_valid_client_event

STREAM = "MZ00000000000000000000000000000000"


class Clock:
    """A monotonic clock the test moves by hand (binary fractions keep the arithmetic exact).

    Standing still, playback estimates nothing between marks: heard = echoed marks.
    """

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def protocol(mode: str = "pcm16", clock: Clock | None = None) -> CallProtocol:
    return CallProtocol(
        stream_sid=STREAM,
        audio_mode=mode,  # type: ignore[arg-type]
        max_frame_bytes=4096,
        monotonic=clock or Clock(),
    )


def realtime_out(p: CallProtocol) -> list[dict]:
    events = [orjson.loads(frame) for frame in p.realtime_frames_to_send()]
    for event in events:
        assert_valid_client_event(event)
    return events


def twilio_out(p: CallProtocol) -> list[dict]:
    frames = p.twilio_frames_to_send()
    for frame in frames:
        assert not isinstance(tw.parse_outbound(frame), tw.Malformed), frame
    return [orjson.loads(frame) for frame in frames]


def ulaw_frame(ms: int = 20, byte: int = 0x7F) -> str:
    return base64.b64encode(bytes([byte]) * (8 * ms)).decode()


def pcm24_delta(ms: int) -> str:
    t = np.arange(24 * ms) / 24000
    pcm = (8000 * np.sin(2 * np.pi * 440 * t)).astype("<i2").tobytes()
    return base64.b64encode(pcm).decode()


def model_speaks(p: CallProtocol, item: str, response: str, chunks: int, ms: int = 20) -> list[str]:
    """Feed `chunks` audio deltas of one item; returns the names of the marks sent."""
    marks = []
    for _ in range(chunks):
        delta = pcm24_delta(ms) if p.audio_mode == "pcm16" else ulaw_frame(ms)
        p.receive_realtime(rt.AudioDelta(item_id=item, response_id=response, delta_b64=delta))
        sent = twilio_out(p)
        assert [m["event"] for m in sent] in (["media"], ["media", "mark"])
        marks += [m["mark"]["name"] for m in sent if m["event"] == "mark"]
    return marks


def twilio_events(p: CallProtocol) -> list[str]:
    return [m["event"] for m in twilio_out(p)]


def test_session_start_configures_then_asks_for_a_greeting() -> None:
    p = protocol()
    update = rt.session_update(
        instructions="Be brief.",
        tools=[],
        audio_mode="pcm16",
        voice="marin",
        transcription_model="gpt-4o-mini-transcribe",
    )
    p.start_session(update, "Hello from Acme")
    events = realtime_out(p)
    assert [e["type"] for e in events] == ["session.update", "response.create"]
    assert "Hello from Acme" in events[1]["response"]["instructions"]


@pytest.mark.parametrize("mode", ["pcm16", "g711"])
def test_caller_audio_is_forwarded_in_the_session_format(mode: str) -> None:
    p = protocol(mode)
    payload = ulaw_frame(20, 0x80)
    p.receive_twilio(tw.Media(payload=payload))
    (event,) = realtime_out(p)
    assert event["type"] == "input_audio_buffer.append"
    audio = base64.b64decode(event["audio"])
    if mode == "g711":
        assert event["audio"] == payload  # passthrough: not even re-encoded
    else:
        assert len(audio) == 160 * 3 * 2  # 160 samples at 8 kHz -> 480 PCM16 samples at 24 kHz
    assert p.stats.frames_in == 1


def test_oversized_and_undecodable_frames_are_counted_and_dropped() -> None:
    p = protocol()
    p.receive_twilio(tw.Media(payload="A" * 5000))
    p.receive_twilio(tw.Media(payload="***not base64***"))
    p.receive_twilio(tw.Malformed(reason="bad json"))
    p.receive_twilio(tw.Unknown(event="surprise"))
    assert p.realtime_frames_to_send() == []
    assert p.stats.frames_dropped == {
        "oversized": 1,
        "bad_base64": 1,
        "malformed": 1,
        "unknown_event": 1,
    }
    # ...and the call goes on: the next good frame is relayed.
    p.receive_twilio(tw.Media(payload=ulaw_frame()))
    assert len(realtime_out(p)) == 1


@pytest.mark.parametrize("mode", ["pcm16", "g711"])
def test_model_audio_goes_to_twilio_with_a_mark_every_100_ms_not_every_chunk(mode: str) -> None:
    p = protocol(mode)
    p.receive_realtime(rt.ResponseCreated(response_id="resp_1"))
    events = []
    for _ in range(10):  # 10 deltas of 20 ms
        p.receive_realtime(
            rt.AudioDelta(
                item_id="item_1",
                response_id="resp_1",
                delta_b64=pcm24_delta(20) if mode == "pcm16" else ulaw_frame(20),
            )
        )
        events.append(twilio_events(p))
    assert events == [["media"]] * 4 + [["media", "mark"]] + [["media"]] * 4 + [["media", "mark"]]
    assert p.stats.frames_out == 10
    assert p.playback.queued_ms == 200


def test_unmarked_audio_is_queued_and_playing() -> None:
    p = protocol()
    p.receive_realtime(rt.ResponseCreated(response_id="resp_1"))
    assert model_speaks(p, "item_1", "resp_1", chunks=7) == ["g0:1"]
    p.receive_twilio(tw.Mark(name="g0:1"))
    # 40 ms sent after the only mark: not acknowledged, so still queued and playing.
    assert (p.playback.queued_ms, p.playback.playing_item) == (40, "item_1")
    assert p.playback.heard_ms("item_1") == 100
    assert not p.ready_to_hang_up


def test_a_mark_closes_an_item_before_the_next_items_audio() -> None:
    p = protocol("g711")
    p.receive_realtime(rt.ResponseCreated(response_id="resp_1"))
    model_speaks(p, "item_1", "resp_1", chunks=2)
    p.receive_realtime(
        rt.AudioDelta(item_id="item_2", response_id="resp_1", delta_b64=ulaw_frame())
    )
    sent = twilio_out(p)
    assert [m["event"] for m in sent] == ["mark", "media"]
    p.receive_twilio(tw.Mark(name=sent[0]["mark"]["name"]))
    assert p.playback.heard_ms("item_1") == 40
    assert (p.playback.playing_item, p.playback.queued_ms) == ("item_2", 20)


def test_the_end_of_a_response_is_marked() -> None:
    p = protocol("g711")
    p.hang_up_requested = True
    p.receive_realtime(rt.ResponseCreated(response_id="resp_1"))
    assert model_speaks(p, "bye", "resp_1", chunks=3) == []
    p.receive_realtime(
        rt.ResponseDone(response_id="resp_1", status="completed", usage=None, output=[])
    )
    sent = twilio_out(p)
    assert [m["event"] for m in sent] == ["mark"]
    assert not p.ready_to_hang_up  # the goodbye is still playing...
    p.receive_twilio(tw.Mark(name=sent[0]["mark"]["name"]))
    assert p.ready_to_hang_up  # ...and now it has been heard, all of it
    assert p.playback.heard_ms("bye") == 60
    # A response.done with nothing unmarked sends nothing.
    p.receive_realtime(rt.ResponseDone(response_id=None, status="completed", usage=None, output=[]))
    assert p.twilio_frames_to_send() == []


def test_barge_in_clears_cancels_and_truncates_at_what_was_heard() -> None:
    p = protocol()
    p.receive_realtime(rt.ResponseCreated(response_id="resp_1"))
    marks = model_speaks(p, "item_1", "resp_1", chunks=10, ms=40)
    assert len(marks) == 3  # at 120, 240 and 360 ms; the last 40 ms unmarked
    p.receive_twilio(tw.Mark(name=marks[0]))  # the caller has heard 120 ms

    p.receive_realtime(rt.SpeechStarted(audio_start_ms=900, item_id="item_user"))
    assert [m["event"] for m in twilio_out(p)] == ["clear"]
    events = realtime_out(p)
    assert [e["type"] for e in events] == ["response.cancel", "conversation.item.truncate"]
    assert events[1]["item_id"] == "item_1"
    assert events[1]["audio_end_ms"] == 120
    assert p.stats.barge_ins == 1

    # Late audio of the cut response is dropped; marks Twilio echoes for flushed audio
    # do not count as heard.
    p.receive_realtime(
        rt.AudioDelta(item_id="item_1", response_id="resp_1", delta_b64=pcm24_delta(40))
    )
    assert p.twilio_frames_to_send() == []
    for name in marks[1:]:
        p.receive_twilio(tw.Mark(name=name))
    assert p.playback.heard_ms("item_1") == 120


def test_barge_in_truncates_at_the_estimate_between_marks() -> None:
    clock = Clock()
    p = protocol("g711", clock)
    p.receive_realtime(rt.ResponseCreated(response_id="resp_1"))
    marks = model_speaks(p, "item_1", "resp_1", chunks=10, ms=40)  # all of it at t=0
    clock.now = 0.125
    p.receive_twilio(tw.Mark(name=marks[0]))  # 120 ms had played by now
    clock.now = 0.1875  # and Twilio played on for 62.5 ms
    p.receive_realtime(rt.SpeechStarted(audio_start_ms=900, item_id="item_user"))
    assert twilio_events(p) == ["clear"]
    truncate = realtime_out(p)[-1]
    assert (truncate["item_id"], truncate["audio_end_ms"]) == ("item_1", 182)
    # After the clear only echoed marks count for the cut item.
    assert p.playback.heard_ms("item_1") == 120


def test_barge_in_truncates_at_most_at_the_next_unechoed_mark() -> None:
    clock = Clock()
    p = protocol("g711", clock)
    p.receive_realtime(rt.ResponseCreated(response_id="resp_1"))
    marks = model_speaks(p, "item_1", "resp_1", chunks=10, ms=40)
    p.receive_twilio(tw.Mark(name=marks[0]))
    clock.now = 5.0  # its echo is late: the 240 ms mark may not have played yet
    p.receive_realtime(rt.SpeechStarted(audio_start_ms=900, item_id="item_user"))
    assert realtime_out(p)[-1]["audio_end_ms"] == 240


def test_barge_in_on_audio_sent_but_not_yet_marked_cuts_its_item() -> None:
    clock = Clock()
    p = protocol("g711", clock)
    p.receive_realtime(rt.ResponseCreated(response_id="resp_1"))
    assert model_speaks(p, "item_1", "resp_1", chunks=2) == []
    clock.now = 0.03125
    p.receive_realtime(rt.SpeechStarted(audio_start_ms=900, item_id="item_user"))
    assert twilio_events(p) == ["clear"]
    events = realtime_out(p)
    assert [e["type"] for e in events] == ["response.cancel", "conversation.item.truncate"]
    assert (events[1]["item_id"], events[1]["audio_end_ms"]) == ("item_1", 31)
    assert (p.playback.queued_ms, p.playback.playing_item) == (0, None)
    assert p.playback.heard_ms("item_1") == 0  # cut: no echoed mark, nothing known


def test_speech_into_silence_interrupts_nothing() -> None:
    p = protocol()
    p.receive_realtime(rt.SpeechStarted(audio_start_ms=0, item_id="item_user"))
    assert p.twilio_frames_to_send() == []
    assert p.realtime_frames_to_send() == []
    assert p.stats.barge_ins == 0


def test_barge_in_after_generation_finished_still_truncates_buffered_audio() -> None:
    p = protocol("g711")
    p.receive_realtime(rt.ResponseCreated(response_id="resp_1"))
    marks = model_speaks(p, "item_1", "resp_1", chunks=5, ms=100)
    assert len(marks) == 5  # each delta is a whole mark interval
    p.receive_realtime(
        rt.ResponseDone(response_id="resp_1", status="completed", usage=None, output=[])
    )
    assert p.twilio_frames_to_send() == []  # nothing unmarked to close
    p.receive_twilio(tw.Mark(name=marks[0]))
    p.receive_realtime(rt.SpeechStarted(audio_start_ms=0, item_id="item_user"))
    assert [m["event"] for m in twilio_out(p)] == ["clear"]
    events = realtime_out(p)
    # No response is active, so nothing to cancel (OpenAI would answer with an error).
    assert [e["type"] for e in events] == ["conversation.item.truncate"]
    assert events[0]["audio_end_ms"] == 100


def function_call(
    call_id: str, name: str = "capture_lead", args: str = "{}"
) -> rt.FunctionCallDone:
    return rt.FunctionCallDone(
        call_id=call_id, name=name, arguments=args, item_id=f"it_{call_id}", response_id="resp_1"
    )


def test_tool_result_waits_for_the_active_response_to_finish_before_asking_for_a_reply() -> None:
    p = protocol()
    p.receive_realtime(rt.ResponseCreated(response_id="resp_1"))
    p.receive_realtime(function_call("call_1"))
    (request,) = p.tools_to_run()
    assert request == ToolRequest("call_1", "capture_lead", "{}")

    p.tool_finished(request, '{"status": "ok"}', {"status": "ok"})
    events = realtime_out(p)
    assert [e["type"] for e in events] == ["conversation.item.create"]
    assert events[0]["item"] == {
        "type": "function_call_output",
        "call_id": "call_1",
        "output": '{"status": "ok"}',
    }

    p.receive_realtime(
        rt.ResponseDone(
            response_id="resp_1", status="completed", usage={"total_tokens": 42}, output=[]
        )
    )
    assert [e["type"] for e in realtime_out(p)] == ["response.create"]
    assert p.usage == {"total_tokens": 42}
    assert p.tool_calls[0]["name"] == "capture_lead"


def test_parallel_tool_calls_get_one_reply_after_the_last_result() -> None:
    p = protocol()
    p.receive_realtime(rt.ResponseCreated(response_id="resp_1"))
    p.receive_realtime(function_call("call_1"))
    p.receive_realtime(function_call("call_2", "escalate"))
    p.receive_realtime(
        rt.ResponseDone(response_id="resp_1", status="completed", usage=None, output=[])
    )
    first, second = p.tools_to_run()
    p.tool_finished(second, "{}", {})
    assert [e["type"] for e in realtime_out(p)] == ["conversation.item.create"]
    p.tool_finished(first, "{}", {})
    assert [e["type"] for e in realtime_out(p)] == ["conversation.item.create", "response.create"]


def test_hang_up_waits_for_the_goodbye_to_be_generated_and_heard() -> None:
    p = protocol("g711")
    p.receive_realtime(rt.ResponseCreated(response_id="resp_9"))
    assert model_speaks(p, "bye", "resp_9", chunks=2) == []
    p.hang_up_requested = True
    assert not p.ready_to_hang_up  # still generating
    p.receive_realtime(
        rt.ResponseDone(response_id="resp_9", status="completed", usage=None, output=[])
    )
    (last,) = twilio_out(p)  # the end of the goodbye is marked
    assert not p.ready_to_hang_up  # still playing
    p.receive_twilio(tw.Mark(name=last["mark"]["name"]))
    assert p.ready_to_hang_up


def test_after_end_call_no_new_reply_is_requested() -> None:
    p = protocol()
    p.receive_realtime(function_call("call_end", "end_call"))
    (request,) = p.tools_to_run()
    p.hang_up_requested = True
    p.tool_finished(request, '{"status":"ending"}', {"status": "ending"})
    assert [e["type"] for e in realtime_out(p)] == ["conversation.item.create"]


def test_transcripts_of_both_sides_are_kept_in_order() -> None:
    p = protocol()
    p.receive_realtime(
        rt.OutputTranscriptDone(item_id="a1", response_id="r1", transcript="Hi, how can I help?")
    )
    p.receive_realtime(rt.InputTranscriptDone(item_id="u1", transcript="My sink leaks."))
    p.receive_realtime(rt.InputTranscriptDone(item_id="u2", transcript=""))
    assert [(t["role"], t["text"]) for t in p.transcript] == [
        ("agent", "Hi, how can I help?"),
        ("caller", "My sink leaks."),
    ]


def test_stop_and_dtmf() -> None:
    p = protocol()
    p.receive_twilio(tw.Dtmf(digit="2"))
    p.receive_twilio(tw.Dtmf(digit="4"))
    assert p.dtmf_digits == "24"
    p.receive_twilio(tw.Stop(call_sid="CA1"))
    assert p.finished == "caller hung up"


def test_barge_in_between_chunks_still_truncates_the_item_being_spoken() -> None:
    p = protocol("g711")
    p.receive_realtime(rt.ResponseCreated(response_id="resp_1"))
    (mark,) = model_speaks(p, "item_1", "resp_1", chunks=3, ms=40)
    p.receive_twilio(tw.Mark(name=mark))  # played as fast as it arrives: queue empty
    assert p.playback.playing_item is None
    p.receive_realtime(rt.SpeechStarted(audio_start_ms=0, item_id="item_user"))
    assert [m["event"] for m in twilio_out(p)] == ["clear"]
    events = realtime_out(p)
    assert [e["type"] for e in events] == ["response.cancel", "conversation.item.truncate"]
    assert (events[1]["item_id"], events[1]["audio_end_ms"]) == ("item_1", 120)


def test_dtmf_buffer_keeps_only_the_latest_digits() -> None:
    p = protocol()
    for digit in "1234567890" * 100:
        p.receive_twilio(tw.Dtmf(digit=digit))
    assert p.dtmf_digits == ("1234567890" * 2)[-16:]
