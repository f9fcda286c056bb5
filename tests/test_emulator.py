"""The Realtime emulator (bridge/sim/emulator.py), its scenarios and its synthetic voice.

Most protocol behaviour is tested on the sans-I/O `EmulatorSession`, stepping its output by
hand, so nothing depends on timing; the server is tested over real loopback WebSockets.
Every event the emulator sends in every test is validated against the openai SDK models.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from bridge.audio import InboundTranscoder
from bridge.sim import voice
from bridge.sim.emulator import (
    CHUNK_MS,
    EmulatorSession,
    EnergyVad,
    SessionRecord,
    run_emulator,
    serve,
    threshold_rms,
)
from bridge.sim.scenario import (
    BUILTINS,
    DEMO_LEAD_UTTERANCE,
    Scenario,
    ScenarioError,
    ScriptRun,
    call_tool,
    end,
    expect_tool_status,
    hear,
    load_scenario,
    say,
    scenario_from_toml,
    wait_ms,
)
from tests.sdk_oracle import assert_valid_client_event, assert_valid_server_event
from tests.servers import free_port

PCMU_SESSION: dict[str, Any] = {
    "type": "session.update",
    "session": {
        "type": "realtime",
        "instructions": "You answer the phone for a plumber.",
        "audio": {
            "input": {
                "format": {"type": "audio/pcmu"},
                "transcription": {"model": "gpt-4o-mini-transcribe"},
                "turn_detection": {"type": "server_vad", "silence_duration_ms": 500},
            },
            "output": {"format": {"type": "audio/pcmu"}, "voice": "marin"},
        },
        "tools": [
            {
                "type": "function",
                "name": "capture_lead",
                "description": "Record a lead.",
                "parameters": {"type": "object", "properties": {"name": {"type": "string"}}},
            }
        ],
    },
}


# --- helpers ----------------------------------------------------------------------------------


class Driver:
    """Drives a sans-I/O EmulatorSession like the server does, minus the clock."""

    def __init__(self, scenario: Scenario | str = "demo", **options: Any) -> None:
        if isinstance(scenario, str):
            scenario = load_scenario(scenario)
        self.record = SessionRecord(index=0, model="gpt-realtime", scenario=scenario.name)
        self.session = EmulatorSession(scenario, self.record, **options)
        self.session.open()
        self.received: list[dict[str, Any]] = []
        self.collect()

    def send(self, event: dict[str, Any], *, valid: bool = True) -> list[dict[str, Any]]:
        if valid:
            assert_valid_client_event(event)
        self.session.receive(orjson.dumps(event))
        return self.collect()

    def collect(self) -> list[dict[str, Any]]:
        events = [orjson.loads(frame) for frame in self.session.data_to_send()]
        self.received += events
        return events

    def step(self, n: int = 1) -> list[dict[str, Any]]:
        """Advance the active response by up to `n` paced steps."""
        for _ in range(n):
            if self.session.step_output() is None:
                break
        return self.collect()

    def run_response(self) -> list[dict[str, Any]]:
        while self.session.step_output() is not None:
            pass
        return self.collect()

    def append_ulaw(self, ulaw: bytes, frame_bytes: int = 160) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for start in range(0, len(ulaw), frame_bytes):
            chunk = ulaw[start : start + frame_bytes]
            events += self.send(
                {"type": "input_audio_buffer.append", "audio": base64.b64encode(chunk).decode()}
            )
        return events

    def errors(self) -> list[dict[str, Any]]:
        return [e["error"] for e in self.received if e["type"] == "error"]


def types(events: Iterable[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


def validate_all(events: Iterable[dict[str, Any]]) -> int:
    count = 0
    for event in events:
        assert_valid_server_event(event)
        count += 1
    return count


def silence_ulaw(ms: int) -> bytes:
    return b"\xff" * (ms * 8)


def tone_ulaw(ms: int, freq: float = 1000.0, amplitude: float = 8000.0) -> bytes:
    t = np.arange(ms * 8) / 8000.0
    samples = np.round(amplitude * np.sin(2 * np.pi * freq * t)).astype(np.int16)
    return voice.encode_pcm16(samples, "audio/pcmu")


def tool_output(call_id: str, output: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "conversation.item.create",
        "item": {"type": "function_call_output", "call_id": call_id, "output": json.dumps(output)},
    }


def only(events: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    matching = [e for e in events if e["type"] == kind]
    assert len(matching) == 1, f"expected one {kind}, got {types(events)}"
    return matching[0]


MESSAGE_ORDER = [
    "response.output_item.added",
    "conversation.item.added",
    "response.content_part.added",
    "response.output_audio.done",
    "response.output_audio_transcript.done",
    "response.content_part.done",
    "response.output_item.done",
    "conversation.item.done",
]


def without_deltas(events: list[dict[str, Any]]) -> list[str]:
    return [
        t
        for t in types(events)
        if t not in ("response.output_audio.delta", "response.output_audio_transcript.delta")
    ]


# --- voice ------------------------------------------------------------------------------------


def test_synthetic_speech_duration_grows_with_text_and_tones_stay_in_phone_band() -> None:
    short = voice.plan("Hello there")
    long = voice.plan("Hello there, this is a much longer sentence with many more words in it")
    assert long.duration_ms > 2 * short.duration_ms
    assert all(300 <= s.frequency_hz <= 3400 for s in long.segments)
    assert [s.word for s in short.segments] == ["Hello", "there"]
    # consecutive words have different tones, in the documented order
    assert [s.frequency_hz for s in long.segments[:3]] == list(voice.SEGMENT_FREQUENCIES_HZ[:3])


@pytest.mark.parametrize("fmt", ["audio/pcm", "audio/pcmu", "audio/pcma"])
def test_each_word_is_recoverable_from_its_audio(fmt: voice.AudioFormat) -> None:
    utterance, audio = voice.synthesize("one two three four five six", fmt)
    assert len(audio) == utterance.duration_ms * voice.bytes_per_ms(fmt)
    samples = voice.decode_to_pcm16(audio, fmt)
    rate = voice.sample_rate(fmt)
    for segment in utterance.segments:
        start = segment.start_ms * rate // 1000
        window = samples[start : start + segment.duration_ms * rate // 1000]
        found = voice.nearest_segment_index(voice.dominant_frequency(window, rate))
        assert found == segment.index
    gap = samples[utterance.segments[0].end_ms * rate // 1000 : utterance.segments[1].start_ms]
    assert voice.rms(gap) < 50


def test_caller_speech_is_loud_enough_for_the_vad_and_whole_frames() -> None:
    speech = voice.caller_speech(1010)
    assert len(speech) == 1000 * 8
    level = voice.rms(voice.decode_to_pcm16(speech, "audio/pcmu"))
    assert level > 4 * threshold_rms(0.5)


# --- VAD --------------------------------------------------------------------------------------


def test_energy_vad_times_turns_by_samples() -> None:
    vad = EnergyVad(8000, threshold_rms=threshold_rms(0.5), silence_ms=500, origin_ms=0)
    pcm = voice.decode_to_pcm16(
        silence_ulaw(500) + tone_ulaw(1000) + silence_ulaw(800), "audio/pcmu"
    )
    changes = []
    for start in range(0, len(pcm), 137):  # odd chunk sizes: frames straddle appends
        changes += vad.feed(pcm[start : start + 137])
    assert changes == [("start", 500), ("stop", 2000)]


def test_energy_vad_ignores_clicks_and_quiet_noise() -> None:
    vad = EnergyVad(8000, threshold_rms=threshold_rms(0.5), silence_ms=500, origin_ms=0)
    click = tone_ulaw(10)
    hiss = tone_ulaw(1000, amplitude=100.0)
    pcm = voice.decode_to_pcm16(silence_ulaw(100) + click + silence_ulaw(300) + hiss, "audio/pcmu")
    assert vad.feed(pcm) == []


# --- session lifecycle and errors (sans-I/O) ---------------------------------------------------


def test_session_created_first_then_update_reflects_the_session() -> None:
    drive = Driver()
    assert types(drive.received) == ["session.created"]
    created = drive.received[0]["session"]
    assert created["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    updated = only(drive.send(PCMU_SESSION), "session.updated")["session"]
    assert updated["audio"]["input"]["format"] == {"type": "audio/pcmu"}
    assert updated["audio"]["output"]["format"] == {"type": "audio/pcmu"}
    assert updated["instructions"] == "You answer the phone for a plumber."
    assert [t["name"] for t in updated["tools"]] == ["capture_lead"]
    # fields the update left out keep their defaults, filled-in VAD defaults included
    assert updated["audio"]["output"]["voice"] == "marin"
    assert updated["audio"]["input"]["turn_detection"]["prefix_padding_ms"] == 300
    assert drive.record.session == updated
    assert validate_all(drive.received) == 2


@pytest.mark.parametrize(
    ("event", "code", "param"),
    [
        ({"type": "session.frobnicate"}, "invalid_value", "type"),
        ({"event_id": "e1"}, "missing_required_parameter", "type"),
        (
            {"type": "conversation.item.truncate", "content_index": 0},
            "missing_required_parameter",
            "item_id",
        ),
        (
            {
                "type": "conversation.item.truncate",
                "item_id": "x",
                "content_index": 0,
                "audio_end_ms": "5",
            },
            "invalid_type",
            "audio_end_ms",
        ),
        (
            {
                "type": "session.update",
                "session": {"type": "realtime", "input_audio_format": "g711_ulaw"},
            },
            "unknown_parameter",
            "session.input_audio_format",
        ),
        (
            {"type": "session.update", "session": {"instructions": "hi"}},
            "missing_required_parameter",
            "session.type",
        ),
        (
            {
                "type": "session.update",
                "session": {
                    "type": "realtime",
                    "audio": {"input": {"format": {"type": "audio/opus"}}},
                },
            },
            "invalid_value",
            "session.audio.input.format.type",
        ),
        ({"type": "input_audio_buffer.append", "audio": "not base64!"}, "invalid_value", "audio"),
        ({"type": "input_audio_buffer.commit"}, "input_audio_buffer_commit_empty", None),
        ({"type": "response.cancel"}, "response_cancel_not_active", None),
        (
            {
                "type": "conversation.item.truncate",
                "item_id": "nope",
                "content_index": 0,
                "audio_end_ms": 0,
            },
            "invalid_value",
            "item_id",
        ),
        (tool_output("call_unknown", {"status": "ok"}), "invalid_value", "item.call_id"),
        ({"type": "output_audio_buffer.clear"}, "invalid_value", "type"),
    ],
)
def test_bad_client_events_get_an_error_and_the_session_stays_usable(
    event: dict[str, Any], code: str, param: str | None
) -> None:
    drive = Driver()
    replies = drive.send({**event, "event_id": "evt_client_7"}, valid=False)
    error = only(replies, "error")["error"]
    assert error["code"] == code
    assert error["param"] == param
    assert error["event_id"] == "evt_client_7"
    assert error["type"] == "invalid_request_error" and error["message"]
    # nothing was applied, and the connection still works
    assert types(drive.send(PCMU_SESSION)) == ["session.updated"]
    validate_all(drive.received)


def test_invalid_json_is_an_error_not_a_crash() -> None:
    drive = Driver()
    drive.session.receive(b"{not json")
    drive.session.receive(b"[1, 2]")
    drive.collect()
    assert [e["code"] for e in drive.errors()] == ["invalid_json", "invalid_json"]
    validate_all(drive.received)


# --- responses --------------------------------------------------------------------------------


def test_response_create_speaks_the_script_in_ga_event_order() -> None:
    drive = Driver("demo")
    drive.send(PCMU_SESSION)
    start = drive.send({"type": "response.create", "response": {"instructions": "Greet."}})
    assert types(start) == ["response.created", "rate_limits.updated"]
    events = drive.run_response()
    assert without_deltas(events) == [*MESSAGE_ORDER, "response.done"]

    text = "Thanks for calling. How can I help you today?"
    _, expected_audio = voice.synthesize(text, "audio/pcmu")
    deltas = [
        base64.b64decode(e["delta"]) for e in events if e["type"] == "response.output_audio.delta"
    ]
    assert b"".join(deltas) == expected_audio
    assert all(len(d) == CHUNK_MS * 8 for d in deltas[:-1])
    transcript = "".join(
        e["delta"] for e in events if e["type"] == "response.output_audio_transcript.delta"
    )
    assert transcript == text
    done = only(events, "response.done")["response"]
    assert done["status"] == "completed"
    assert done["output"][0]["content"] == [{"type": "output_audio", "transcript": text}]
    usage = done["usage"]
    assert usage["output_token_details"]["audio_tokens"] == round(len(expected_audio) / 8 / 50)
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]

    spoken = drive.record.spoken[0]
    assert spoken.text == text and spoken.sent_audio == expected_audio
    assert not spoken.cancelled and spoken.truncated_at_ms is None
    validate_all(drive.received)


def test_response_create_during_a_response_is_refused_like_openai() -> None:
    drive = Driver("demo")
    drive.send(PCMU_SESSION)
    drive.send({"type": "response.create"})
    drive.step(3)
    reply = drive.send({"type": "response.create"})
    assert only(reply, "error")["error"]["code"] == "conversation_already_has_active_response"
    assert only(drive.run_response(), "response.done")["response"]["status"] == "completed"
    validate_all(drive.received)


def test_pcm16_output_is_24khz_and_pcmu_output_is_8khz() -> None:
    drive = Driver(Scenario("t", (say("Hi there"),)))
    drive.send({"type": "response.create"})
    pcm = b"".join(
        base64.b64decode(e["delta"])
        for e in drive.run_response()
        if e["type"] == "response.output_audio.delta"
    )
    utterance = voice.plan("Hi there")
    assert len(pcm) == utterance.duration_ms * 48
    assert drive.record.spoken[0].format == "audio/pcm"
    validate_all(drive.received)


def test_text_only_session_streams_text() -> None:
    drive = Driver(Scenario("t", (say("Plain text answer"),)))
    drive.send(
        {"type": "session.update", "session": {"type": "realtime", "output_modalities": ["text"]}}
    )
    drive.send({"type": "response.create"})
    events = drive.run_response()
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == (
        "Plain text answer"
    )
    assert not any(e["type"] == "response.output_audio.delta" for e in events)
    validate_all(drive.received)


# --- caller turns -------------------------------------------------------------------------------


def test_caller_turn_gets_vad_events_commit_transcript_and_a_response() -> None:
    drive = Driver("demo")
    drive.send(PCMU_SESSION)
    drive.send({"type": "response.create"})
    drive.run_response()  # the greeting
    events = drive.append_ulaw(silence_ulaw(500) + tone_ulaw(1000) + silence_ulaw(600))
    assert types(events)[:8] == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
        "response.created",
        "rate_limits.updated",
        "conversation.item.input_audio_transcription.completed",
    ]
    started, stopped, committed = events[0], events[1], events[2]
    assert started["audio_start_ms"] == 500 - 300  # prefix padding included
    assert stopped["audio_end_ms"] == 2000  # 500 ms of silence after the tone ended
    assert started["item_id"] == stopped["item_id"] == committed["item_id"]
    greeting_item = drive.record.spoken[0].item_id
    assert committed["previous_item_id"] == greeting_item
    transcription = events[7]
    assert transcription["transcript"] == DEMO_LEAD_UTTERANCE
    assert transcription["item_id"] == committed["item_id"]
    turn = drive.record.user_turns[0]
    assert (turn.audio_start_ms, turn.audio_end_ms, turn.scripted) == (200, 2000, True)
    validate_all(drive.received)


def test_vad_settings_from_session_update_are_used() -> None:
    drive = Driver("demo")
    update = json.loads(json.dumps(PCMU_SESSION))
    update["session"]["audio"]["input"]["turn_detection"] = {
        "type": "server_vad",
        "silence_duration_ms": 200,
        "prefix_padding_ms": 100,
        "create_response": False,
    }
    drive.send(update)
    events = drive.append_ulaw(silence_ulaw(500) + tone_ulaw(1000) + silence_ulaw(600))
    assert events[0]["audio_start_ms"] == 400
    assert events[1]["audio_end_ms"] == 1700
    assert "response.created" not in types(events)  # create_response: false
    validate_all(drive.received)


def test_without_turn_detection_only_manual_commits_make_turns() -> None:
    drive = Driver("demo")
    update = json.loads(json.dumps(PCMU_SESSION))
    update["session"]["audio"]["input"]["turn_detection"] = None
    update["session"]["audio"]["input"]["transcription"] = None
    drive.send(update)
    assert drive.append_ulaw(tone_ulaw(1000) + silence_ulaw(1000)) == []
    events = drive.send({"type": "input_audio_buffer.commit"})
    assert types(events) == [
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
    ]  # no transcription configured, no automatic response
    assert drive.record.user_turns[0].audio_end_ms == 2000
    validate_all(drive.received)


# --- function calls -----------------------------------------------------------------------------


def test_demo_scenario_calls_tools_and_uses_their_output() -> None:
    drive = Driver("demo")
    drive.send(PCMU_SESSION)
    drive.send({"type": "response.create"})
    drive.run_response()
    drive.append_ulaw(tone_ulaw(1500) + silence_ulaw(600))
    events = drive.run_response()
    assert without_deltas(events) == [
        "response.output_item.added",
        "conversation.item.added",
        *["response.function_call_arguments.delta"]
        * len([e for e in events if e["type"] == "response.function_call_arguments.delta"]),
        "response.function_call_arguments.done",
        "response.output_item.done",
        "conversation.item.done",
        "response.done",
    ]
    call = only(events, "response.function_call_arguments.done")
    assert call["name"] == "capture_lead"
    args = json.loads(call["arguments"])
    assert args["name"] == "Jamie Rivera" and args["address"] == "12 Elm Street"
    assert (
        "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
        == call["arguments"]
    )
    # the model waits for the output: nothing more until the bridge answers
    assert drive.step(5) == []

    output = {
        "status": "confirmation_required",
        "confirmation_id": "conf_42",
        "summary": "I'll save a lead for Jamie Rivera.",
    }
    added = drive.send(tool_output(call["call_id"], output))
    assert types(added) == ["conversation.item.added", "conversation.item.done"]
    drive.send({"type": "response.create"})
    events = drive.run_response()
    assert drive.record.spoken[-1].text == "I'll save a lead for Jamie Rivera. Shall I go ahead?"

    drive.append_ulaw(tone_ulaw(800) + silence_ulaw(600))  # "Yes please"
    events = drive.run_response()
    confirm = only(events, "response.function_call_arguments.done")
    assert confirm["name"] == "confirm_action"
    assert json.loads(confirm["arguments"]) == {"confirmation_id": "conf_42"}

    drive.send(
        tool_output(confirm["call_id"], {"status": "executed", "confirmation_id": "conf_42"})
    )
    drive.send({"type": "response.create"})
    events = drive.run_response()
    # goodbye and hang-up in one response: output 0 is speech, output 1 the end_call
    done = only(events, "response.done")["response"]
    assert [o["type"] for o in done["output"]] == ["message", "function_call"]
    assert done["output"][1]["name"] == "end_call"
    assert [c.name for c in drive.record.tool_calls] == [
        "capture_lead",
        "confirm_action",
        "end_call",
    ]
    assert drive.record.tool_calls[0].output == json.dumps(output)
    assert [t.transcript for t in drive.record.user_turns] == [DEMO_LEAD_UTTERANCE, "Yes please"]
    assert drive.record.script_errors == []
    # past the end of the script the model still answers, with the idle reply
    drive.send({"type": "response.create"})
    drive.run_response()
    assert drive.record.spoken[-1].text == BUILTINS["demo"].idle_reply
    assert validate_all(drive.received) > 100


def test_unexpected_tool_status_follows_the_otherwise_branch() -> None:
    drive = Driver("demo")
    drive.send(PCMU_SESSION)
    drive.send({"type": "response.create"})
    drive.run_response()
    drive.append_ulaw(tone_ulaw(1500) + silence_ulaw(600))
    call = only(drive.run_response(), "response.function_call_arguments.done")
    drive.send(tool_output(call["call_id"], {"status": "error", "message": "db down"}))
    drive.send({"type": "response.create"})
    drive.run_response()
    assert drive.record.spoken[-1].text == (
        "Sorry, that did not go through. Someone from the team will call you back."
    )
    assert drive.record.tool_calls[-1].name == "end_call"
    assert drive.record.script_errors == []
    validate_all(drive.received)


def test_expectation_without_a_branch_is_noted_and_references_are_checked() -> None:
    scenario = Scenario(
        "t",
        (
            call_tool("lookup", {"q": "x"}),
            expect_tool_status("ok"),
            say("Your number is {last.number}."),
        ),
    )
    drive = Driver(scenario)
    drive.send({"type": "response.create"})
    call = only(drive.run_response(), "response.function_call_arguments.done")
    drive.send(tool_output(call["call_id"], {"status": "failed"}))
    drive.send({"type": "response.create"})
    drive.run_response()
    assert drive.record.spoken[-1].text == "Your number is ."
    assert len(drive.record.script_errors) == 2
    assert "expected tool status 'ok'" in drive.record.script_errors[0]
    assert "'number'" in drive.record.script_errors[1]


# --- barge-in -----------------------------------------------------------------------------------


def start_long_answer(drive: Driver) -> list[dict[str, Any]]:
    drive.send(PCMU_SESSION)
    drive.send({"type": "response.create"})
    drive.run_response()  # greeting
    drive.append_ulaw(tone_ulaw(1200) + silence_ulaw(600))  # "What services do you offer?"
    return drive.step(10)  # 10 chunks = 400 ms of the long answer are out


def test_caller_speech_during_a_response_cancels_it_and_truncation_is_validated() -> None:
    drive = Driver("barge_in")
    start_long_answer(drive)
    long_answer = drive.record.spoken[1]
    assert long_answer.sent_ms == 10 * CHUNK_MS

    events = drive.append_ulaw(tone_ulaw(200))
    assert types(events)[0] == "input_audio_buffer.speech_started"
    assert without_deltas(events[1:]) == [
        "response.output_audio.done",
        "response.output_audio_transcript.done",
        "response.content_part.done",
        "response.output_item.done",
        "conversation.item.done",
        "response.done",
    ]
    done = only(events, "response.done")["response"]
    assert done["status"] == "cancelled"
    assert done["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
    item = only(events, "response.output_item.done")["item"]
    assert item["status"] == "incomplete"
    assert item["content"][0]["transcript"] == " ".join(long_answer.words_sent)
    assert 0 < len(long_answer.words_sent) < len(long_answer.utterance.segments)
    assert long_answer.cancelled and long_answer.total_ms == 400  # never generated the rest
    assert drive.step(5) == []  # nothing more of the long answer

    too_far = drive.send(
        {
            "type": "conversation.item.truncate",
            "item_id": long_answer.item_id,
            "content_index": 0,
            "audio_end_ms": 401,
        }
    )
    assert only(too_far, "error")["error"]["param"] == "audio_end_ms"
    truncated = drive.send(
        {
            "type": "conversation.item.truncate",
            "item_id": long_answer.item_id,
            "content_index": 0,
            "audio_end_ms": 260,
        }
    )
    assert only(truncated, "conversation.item.truncated")["audio_end_ms"] == 260
    assert drive.record.truncations == [(long_answer.item_id, 260)]
    assert long_answer.truncated_at_ms == 260

    # the interruption is the next scripted caller turn, and the reply follows it
    drive.append_ulaw(tone_ulaw(800) + silence_ulaw(600))
    drive.run_response()
    assert (
        drive.record.user_turns[-1].transcript == "Sorry, I just need someone to fix a leak today."
    )
    assert drive.record.spoken[-1].text == "Of course. We can send someone this afternoon."
    validate_all(drive.received)


def test_with_interrupt_response_off_the_client_must_cancel() -> None:
    drive = Driver("barge_in")
    update = json.loads(json.dumps(PCMU_SESSION))
    update["session"]["audio"]["input"]["turn_detection"]["interrupt_response"] = False
    drive.send(update)
    drive.send({"type": "response.create"})
    drive.run_response()
    drive.append_ulaw(tone_ulaw(1200) + silence_ulaw(600))
    drive.step(5)
    events = drive.append_ulaw(tone_ulaw(200))
    assert types(events) == ["input_audio_buffer.speech_started"]
    assert drive.step(2)  # still talking
    response_id = drive.record.spoken[1].response_id
    cancelled = drive.send({"type": "response.cancel", "response_id": response_id})
    done = only(cancelled, "response.done")["response"]
    assert done["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
    again = drive.send({"type": "response.cancel"})
    assert only(again, "error")["error"]["code"] == "response_cancel_not_active"
    validate_all(drive.received)


def test_outputs_a_cancelled_response_never_began_come_in_the_next_one() -> None:
    scenario = Scenario(
        "t", (say("Let me look that up for you right away."), call_tool("lookup", {"q": 1}))
    )
    drive = Driver(scenario)
    drive.send({"type": "response.create"})
    drive.step(2)
    drive.send({"type": "response.cancel"})
    assert drive.record.tool_calls == []
    drive.send({"type": "response.create"})
    events = drive.run_response()
    assert only(events, "response.function_call_arguments.done")["name"] == "lookup"
    assert [c.name for c in drive.record.tool_calls] == ["lookup"]
    validate_all(drive.received)


# --- conversation items -------------------------------------------------------------------------


def test_items_can_be_created_retrieved_and_deleted() -> None:
    drive = Driver(Scenario("t", (say("Hello"),)))
    created = drive.send(
        {
            "type": "conversation.item.create",
            "item": {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "(caller pressed 5)"}],
            },
        }
    )
    assert types(created) == ["conversation.item.added", "conversation.item.done"]
    item_id = created[0]["item"]["id"]
    drive.send({"type": "response.create"})
    drive.run_response()
    spoken = drive.record.spoken[0]
    retrieved = only(
        drive.send({"type": "conversation.item.retrieve", "item_id": spoken.item_id}),
        "conversation.item.retrieved",
    )
    assert base64.b64decode(retrieved["item"]["content"][0]["audio"]) == spoken.sent_audio
    assert types(drive.send({"type": "conversation.item.delete", "item_id": item_id})) == [
        "conversation.item.deleted"
    ]
    assert only(drive.send({"type": "conversation.item.delete", "item_id": item_id}), "error")
    not_audio = drive.send(
        {
            "type": "conversation.item.create",
            "item": {
                "type": "message",
                "role": "system",
                "content": [{"type": "input_text", "text": "x"}],
            },
        }
    )
    error = only(
        drive.send(
            {
                "type": "conversation.item.truncate",
                "item_id": not_audio[0]["item"]["id"],
                "content_index": 0,
                "audio_end_ms": 0,
            }
        ),
        "error",
    )
    assert "assistant" in error["error"]["message"]
    validate_all(drive.received)


def test_voice_cannot_change_after_audio_was_produced() -> None:
    drive = Driver(Scenario("t", (say("Hello"),)))
    drive.send({"type": "response.create"})
    drive.run_response()
    reply = drive.send(
        {
            "type": "session.update",
            "session": {"type": "realtime", "audio": {"output": {"voice": "cedar"}}},
        }
    )
    assert only(reply, "error")["error"]["code"] == "cannot_update_voice"
    validate_all(drive.received)


# --- echo mode ----------------------------------------------------------------------------------


def test_echo_returns_every_chunk_inside_one_response_per_utterance() -> None:
    drive = Driver("echo")
    drive.send(PCMU_SESSION)
    assert drive.append_ulaw(silence_ulaw(200)) == []  # nothing to echo before speech
    speech = voice.caller_speech(600)
    events = drive.append_ulaw(speech + silence_ulaw(1000))
    deltas = [e for e in events if e["type"] == "response.output_audio.delta"]
    appended = [
        e["audio"] for e in drive.record.client_events if e["type"] == "input_audio_buffer.append"
    ][10:]
    assert [d["delta"] for d in deltas] == appended  # byte-for-byte, chunk for chunk
    assert types(events)[:4] == [
        "response.created",
        "response.output_item.added",
        "conversation.item.added",
        "response.content_part.added",
    ]
    assert types(events)[-1] == "response.done"
    assert not any(t.startswith("input_audio_buffer.speech") for t in types(events))
    # the next utterance opens a new response
    again = drive.append_ulaw(voice.caller_speech(100))
    assert types(again)[0] == "response.created"
    validate_all(drive.received)


def test_echo_transcodes_when_input_and_output_formats_differ() -> None:
    drive = Driver("echo")
    update = json.loads(json.dumps(PCMU_SESSION))
    update["session"]["audio"]["output"]["format"] = {"type": "audio/pcm", "rate": 24000}
    drive.send(update)
    events = drive.append_ulaw(voice.caller_speech(400))
    out = b"".join(
        base64.b64decode(e["delta"]) for e in events if e["type"] == "response.output_audio.delta"
    )
    assert len(out) == 400 * 48  # 24 kHz PCM16 for 400 ms of 8 kHz mu-law
    expected = InboundTranscoder().process(voice.caller_speech(400))
    assert out == expected
    validate_all(drive.received)


# --- scenarios ----------------------------------------------------------------------------------


def test_builtin_scenarios_exist() -> None:
    assert {"demo", "barge_in", "echo"} <= set(BUILTINS)
    assert load_scenario("echo").echo


def test_scenario_from_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "lead.toml"
    path.write_text(
        """
        idle_reply = "Anything else?"
        [[steps]]
        say = "Hello"
        [[steps]]
        hear = "I need a plumber"
        [[steps]]
        call_tool = "capture_lead"
        arguments = { issue = "leak", id = "{last}" }
        [[steps]]
        expect_tool_status = "confirmation_required"
        [[steps.otherwise]]
        say = "Sorry."
        [[steps]]
        wait_ms = 250
        [[steps]]
        end = true
        """
    )
    scenario = load_scenario(path)
    assert scenario.name == "lead" and scenario.idle_reply == "Anything else?"
    assert scenario.steps == (
        say("Hello"),
        hear("I need a plumber"),
        call_tool("capture_lead", {"issue": "leak", "id": "{last}"}),
        expect_tool_status("confirmation_required", [say("Sorry.")]),
        wait_ms(250),
        end(),
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[steps]]\nsay = 'a'\nhear = 'b'", "exactly one"),
        ("[[steps]]\nwait_ms = true", "must be a int"),
        ("[[steps]]\nwait_ms = -5", "negative"),
        ("[[steps]]\nsay = 'a'\narguments = {}", "unexpected keys"),
        ("colour = 'blue'", "unknown scenario keys"),
        ("[[steps]]\nend = false", "end = true"),
        ("steps = 'x'", "array of tables"),
        ("not toml [", "not valid TOML"),
    ],
)
def test_bad_scenarios_are_refused_clearly(text: str, message: str) -> None:
    with pytest.raises(ScenarioError, match=message):
        scenario_from_toml(text)


def test_unknown_scenario_name_lists_the_builtins() -> None:
    with pytest.raises(ScenarioError, match="barge_in"):
        load_scenario("no-such-scenario")


def test_script_run_plans_responses_up_to_the_next_wait() -> None:
    run = ScriptRun(
        Scenario(
            "t",
            (
                say("a"),
                wait_ms(100),
                say("b"),
                say("c"),
                call_tool("t", {"x": "{last.v}", "y": "id {last.v}"}),
                say("never in the same response"),
            ),
        )
    )
    plan = run.next_response()
    assert [(type(o).__name__, o.lead_in_ms) for o in plan.outputs] == [
        ("SpeakPlan", 0),
        ("SpeakPlan", 100),
        ("CallPlan", 0),
    ]
    assert plan.outputs[1].text == "b c"
    assert run.errors  # {last.v} before any tool output
    run.tool_output('{"v": 7}')
    assert run.next_response().outputs[0].text == "never in the same response"


def test_references_keep_the_type_of_a_whole_value() -> None:
    run = ScriptRun(
        Scenario("t", (call_tool("a"), call_tool("b", {"n": "{last.n}", "s": "n={last.n}"})))
    )
    run.next_response()
    run.tool_output('{"n": 5}')
    plan = run.next_response()
    assert json.loads(plan.outputs[0].arguments) == {"n": 5, "s": "n=5"}


# --- the server over real WebSockets ------------------------------------------------------------


async def test_server_refuses_connections_like_openai() -> None:
    async with run_emulator("demo", speed=0) as emu:
        with pytest.raises(InvalidStatus) as no_key:
            async with connect(emu.url + "?model=gpt-realtime"):
                pass
        assert no_key.value.response.status_code == 401
        assert b"API key" in no_key.value.response.body
        with pytest.raises(InvalidStatus) as no_model:
            async with connect(emu.url, additional_headers={"Authorization": "Bearer k"}):
                pass
        assert no_model.value.response.status_code == 400
        wrong_path = emu.url.replace("/v1/realtime", "/v1/other") + "?model=m"
        with pytest.raises(InvalidStatus) as not_found:
            async with connect(wrong_path, additional_headers={"Authorization": "Bearer k"}):
                pass
        assert not_found.value.response.status_code == 404
        assert emu.sessions == []


async def test_beta_clients_are_closed_with_4000() -> None:
    async with run_emulator("demo", speed=0) as emu:
        headers = {"Authorization": "Bearer k", "OpenAI-Beta": "realtime=v1"}
        async with connect(emu.url + "?model=gpt-realtime", additional_headers=headers) as ws:
            error = orjson.loads(await ws.recv())
            assert error["error"]["code"] == "beta_api_shape_disabled"
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 4000
        validate_all(emu.sessions[0].server_events)


async def test_demo_call_over_a_socket_in_pcm16_mode() -> None:
    """The bridge's default mode: 24 kHz PCM both ways, caller audio upsampled from the phone."""
    async with run_emulator("demo", speed=0) as emu:
        headers = {"Authorization": "Bearer sk-test"}
        async with connect(emu.url + "?model=gpt-realtime", additional_headers=headers) as ws:

            async def send(event: dict[str, Any]) -> None:
                assert_valid_client_event(event)
                await ws.send(orjson.dumps(event).decode())

            async def until(kind: str) -> dict[str, Any]:
                while True:
                    event = orjson.loads(await ws.recv())
                    if event["type"] == kind:
                        return event

            async def speak(ms: int) -> None:
                upsample = InboundTranscoder()
                line = voice.caller_speech(ms) + silence_ulaw(700)
                for start in range(0, len(line), 160):
                    pcm = upsample.process(line[start : start + 160])
                    await send(
                        {
                            "type": "input_audio_buffer.append",
                            "audio": base64.b64encode(pcm).decode(),
                        }
                    )

            assert (await until("session.created"))["session"]["model"] == "gpt-realtime"
            session = json.loads(json.dumps(PCMU_SESSION))
            for side in ("input", "output"):
                session["session"]["audio"][side]["format"] = {"type": "audio/pcm", "rate": 24000}
            await send(session)
            await until("session.updated")
            await send({"type": "response.create"})
            await until("response.done")
            await speak(3000)
            call = await until("response.function_call_arguments.done")
            await until("response.done")
            await send(
                tool_output(
                    call["call_id"],
                    {
                        "status": "confirmation_required",
                        "confirmation_id": "c-1",
                        "summary": "A lead for Jamie.",
                    },
                )
            )
            await send({"type": "response.create"})
            await until("response.done")
            await speak(800)
            confirm = await until("response.function_call_arguments.done")
            assert json.loads(confirm["arguments"]) == {"confirmation_id": "c-1"}

        record = emu.sessions[0]
        assert record.model == "gpt-realtime"
        assert [t.transcript for t in record.user_turns] == [DEMO_LEAD_UTTERANCE, "Yes please"]
        assert [s.text for s in record.spoken] == [
            "Thanks for calling. How can I help you today?",
            "A lead for Jamie. Shall I go ahead?",
        ]
        assert all(s.format == "audio/pcm" for s in record.spoken)
        # the received log has everything the client sent, parsed
        assert record.received("response.create") and record.received("conversation.item.create")
        # every event on the wire, in order, is what the record holds
        assert validate_all(record.server_events) > 150
    assert record.closed


async def test_two_connections_get_two_independent_sessions() -> None:
    async with run_emulator(Scenario("t", (say("one"),)), speed=0) as emu:
        headers = {"Authorization": "Bearer k"}
        for _ in range(2):
            async with connect(emu.url + "?model=gpt-realtime", additional_headers=headers) as ws:
                await ws.send('{"type":"response.create"}')
                while orjson.loads(await ws.recv())["type"] != "response.done":
                    pass
        assert emu.connections == 2
        assert [len(s.spoken) for s in emu.sessions] == [1, 1]
        assert emu.sessions[0].spoken[0].item_id != emu.sessions[1].spoken[0].item_id
        for record in emu.sessions:
            validate_all(record.server_events)


async def test_echo_server_without_records() -> None:
    async with run_emulator(echo=True, speed=0, record=False) as emu:
        headers = {"Authorization": "Bearer k"}
        async with connect(emu.url + "?model=gpt-realtime", additional_headers=headers) as ws:
            await ws.recv()  # session.created
            frames = [base64.b64encode(bytes([n % 250 + 1]) * 960).decode() for n in range(25)]
            for frame in frames:
                await ws.send(
                    orjson.dumps({"type": "input_audio_buffer.append", "audio": frame}).decode()
                )
            echoed = []
            while len(echoed) < len(frames):
                event = orjson.loads(await ws.recv())
                assert_valid_server_event(event)
                if event["type"] == "response.output_audio.delta":
                    echoed.append(event["delta"])
            assert echoed == frames
        assert emu.sessions == [] and emu.connections == 1


async def test_serve_runs_until_cancelled() -> None:
    port = free_port()
    server = asyncio.create_task(serve("127.0.0.1", port, "barge_in", False, speed=0))
    url = f"ws://127.0.0.1:{port}/v1/realtime?model=gpt-realtime"
    try:
        async with asyncio.timeout(10):
            while True:
                try:
                    ws = await connect(url, additional_headers={"Authorization": "Bearer k"})
                    break
                except OSError:
                    await asyncio.sleep(0.05)
        async with ws:
            created = orjson.loads(await ws.recv())
            assert_valid_server_event(created)
            await ws.send('{"type":"response.create"}')
            spoken = []
            while (event := orjson.loads(await ws.recv()))["type"] != "response.done":
                if event["type"] == "response.output_audio_transcript.done":
                    spoken.append(event["transcript"])
            assert spoken == [BUILTINS["barge_in"].steps[0].text]
    finally:
        server.cancel()
        with pytest.raises(asyncio.CancelledError):
            await server
