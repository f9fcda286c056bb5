"""Whole calls: real uvicorn on loopback, the Realtime emulator, the simulated Twilio caller.

Every event that crosses the emulator's socket, both ways, is validated against the official
openai SDK models; every message our server sends to "Twilio" is checked by the simulated
caller as Twilio would (a violation there is error 31924 in real life).
"""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET

import pytest
import websockets
from sqlalchemy import func, select

from app.embedded import wait_until
from bridge import twilio_media as tw
from bridge.sim import voice
from bridge.sim.caller import BARGE_IN_SCRIPT, DEMO_SCRIPT, CallerScript, Silence, silence
from bridge.sim.scenario import Scenario, call_tool, end, expect_tool_status, hear, say
from tests.e2e import (
    BUSINESS_NUMBER,
    CALLER_NUMBER,
    call_stack,
    expected_word_frequencies,
    incoming_call,
    read_wav_pcm,
    simulated_call,
    wait_until_idle,
    word_frequencies,
)
from tests.sdk_oracle import assert_every_event_valid
from tools.db.models import AuditLog, Call, Lead


@pytest.mark.parametrize("audio_mode", ["pcm16", "g711"])
async def test_audio_flows_both_ways_in_order_and_the_lead_is_stored(
    audio_mode: str, sqlite_url: str, tmp_path
) -> None:
    heard_wav = tmp_path / "heard.wav"
    async with call_stack("demo", database_url=sqlite_url, audio_mode=audio_mode) as stack:
        report = await simulated_call(stack, DEMO_SCRIPT, record_wav=heard_wav)
        (session,) = stack.emulator.sessions
        async with stack.services.db() as db:
            leads = (await db.execute(select(Lead))).scalars().all()
            call = (await db.execute(select(Call))).scalar_one()

    assert report.violations == []
    assert_every_event_valid(session)
    expected_format = {"pcm16": "audio/pcm", "g711": "audio/pcmu"}[audio_mode]
    assert session.session["audio"]["input"]["format"]["type"] == expected_format
    assert session.session["audio"]["output"]["format"]["type"] == expected_format

    # Caller -> model: all the caller's audio reached the model.
    assert session.input_audio_ms >= 0.99 * report.audio_sent_ms
    # Model -> caller: >= 99% of what the model spoke was played to the caller, in order.
    spoken_ms = sum(item.sent_ms for item in session.spoken)
    assert spoken_ms > 5000
    assert report.audio_played_ms >= 0.99 * spoken_ms
    samples, rate = read_wav_pcm(heard_wav)
    assert word_frequencies(samples, rate) == expected_word_frequencies(
        [item.text for item in session.spoken]
    )

    # The tool call went through the confirmation protocol and stored exactly one lead.
    assert [t.name for t in session.tool_calls] == ["capture_lead", "confirm_action", "end_call"]
    (lead,) = leads
    assert (lead.name, lead.address, lead.source) == ("Jamie Rivera", "12 Elm Street", "voice")
    # The call record: both sides' transcript, the tools, the usage, the duration.
    roles = [turn["role"] for turn in call.transcript]
    assert "caller" in roles and "agent" in roles
    assert "Yes please" in [turn["text"] for turn in call.transcript if turn["role"] == "caller"]
    assert [t["name"] for t in call.tool_calls] == ["capture_lead", "confirm_action", "end_call"]
    assert call.usage.get("total_tokens", 0) > 0
    assert call.from_number == CALLER_NUMBER and call.to_number == BUSINESS_NUMBER
    assert call.ended_at >= call.started_at
    assert report.closed_by == "server"  # end_call hung up after the goodbye played


async def test_the_same_call_runs_on_real_redis_and_postgresql(
    redis_url: str, postgres_url: str
) -> None:
    async with call_stack("demo", database_url=postgres_url, redis_url=redis_url) as stack:
        report = await simulated_call(stack, DEMO_SCRIPT)
        async with stack.services.db() as db:
            assert (await db.scalar(select(func.count()).select_from(Lead))) == 1
            outcomes = (await db.execute(select(AuditLog.outcome).order_by(AuditLog.id))).all()
    assert report.violations == []
    assert [o for (o,) in outcomes][:2] == ["proposed", "executed"]


def barge_in_after(silence_ms: int) -> CallerScript:
    """BARGE_IN_SCRIPT, interrupting `silence_ms` after the long answer starts playing."""
    steps = list(BARGE_IN_SCRIPT.steps)
    assert isinstance(steps[3], Silence)
    steps[3] = silence(silence_ms)
    return CallerScript(f"barge_in_after_{silence_ms}", tuple(steps))


@pytest.mark.parametrize(
    ("speed", "pace", "silence_ms", "still_generating"),
    [(0.0, 0.25, 1500, False), (4.0, 0.25, 1500, True), (0.0, 1.0, 1560, False)],
    ids=[
        "answer-generated-then-interrupted",
        "interrupted-while-generating",
        "real-time-between-marks",
    ],
)
async def test_barge_in_clears_twilio_and_truncates_at_what_the_caller_heard(
    sqlite_url: str, speed: float, pace: float, silence_ms: int, still_generating: bool
) -> None:
    # speed 0: the emulator generates the long answer at once (as OpenAI does, faster than
    # real time) and the caller interrupts audio buffered at Twilio; speed 4 (with the caller
    # 4x faster too): generation is still going when the caller interrupts, so the response
    # must be cancelled as well. At real time (pace 1), the pace Twilio plays at and the
    # bridge assumes between marks, the clear lands 60 ms into a mark interval (the emulator's
    # 40 ms deltas put a mark every 120 ms; its VAD starts the turn 60 ms into the speech).
    async with call_stack("barge_in", database_url=sqlite_url, speed=speed) as stack:
        report = await simulated_call(stack, barge_in_after(silence_ms), pace=pace)
        (session,) = stack.emulator.sessions

    assert report.violations == []
    assert_every_event_valid(session)
    assert session.errors == []  # no cancel without a response, no truncate past the audio
    assert len(report.clears) == 1
    (truncate,) = session.received("conversation.item.truncate")
    items = [item.item_id for item in session.spoken]
    cut = items.index(truncate["item_id"])
    cancels = session.received("response.cancel")
    if still_generating:
        assert len(cancels) == 1
        cut_response = session.spoken[cut].response_id
        done = [e for e in session.sent("response.done") if e["response"]["id"] == cut_response]
        assert done[0]["response"]["status"] == "cancelled"
    else:
        assert cancels == []

    # What the caller's own mark acknowledgements say it heard of the interrupted item, and
    # what it had really heard when the clear arrived. Marks are sparse now (one per 100 ms
    # of audio: every 120 ms with 40 ms deltas), so the marks trail playback by up to an
    # interval, and the bridge estimates between them assuming real-time playout: at pace 1
    # it must match what the caller heard; at pace 0.25 this caller plays 4x faster than
    # the estimate moves, so all that holds is that it lies between the two.
    before_ms = sum(item.sent_ms for item in session.spoken[:cut])  # fully played earlier
    acked = [
        report.mark_positions[name]
        for name in report.marks_echoed
        if name not in report.marks_flushed and report.mark_positions[name] <= report.clears[0]
    ]
    heard_by_marks = max(acked) - before_ms
    heard_at_clear = report.clears[0] - before_ms
    audio_end_ms = truncate["audio_end_ms"]
    assert 0 < heard_by_marks <= heard_at_clear
    # Never less than the echoed marks say: the caller echoes the marks it reached right
    # after sending the speech that sets off the barge-in, so they reach the bridge first
    # (40 ms of slack as before; the next mark lies >= 60 ms of playback past the clear).
    assert audio_end_ms >= heard_by_marks - 40
    if pace == 1.0:
        assert abs(audio_end_ms - heard_at_clear) <= 40
    else:
        assert audio_end_ms <= heard_at_clear
    # The interrupted answer was not played to the end; the reply to the interruption was.
    assert session.spoken[cut].truncated_at_ms == truncate["audio_end_ms"]
    planned_ms = sum(item.utterance.duration_ms for item in session.spoken)
    assert report.audio_played_ms < planned_ms - 5000
    assert session.spoken[-1].text.startswith("Of course")


def _media_url(stack) -> str:
    return stack.url.replace("http", "ws") + "/media-stream"


async def _open_stream(stack, parameters: dict[str, str], call_sid: str):
    # max_queue=None: frames these tests leave unread must not stall the closing handshake
    # behind websockets' flow control.
    ws = await websockets.connect(_media_url(stack), max_queue=None)
    writer = tw.TwilioStreamWriter("MZ" + call_sid[2:], call_sid, "AC" + "0" * 32)
    await ws.send(writer.connected())
    await ws.send(writer.start(parameters))
    return ws, writer


async def _close_code(ws) -> int | None:
    try:
        async with asyncio.timeout(5):
            async for _ in ws:
                pass
    except websockets.ConnectionClosed:
        pass
    return ws.close_code


def _token(twiml: str) -> str:
    parameter = ET.fromstring(twiml).find("./Connect/Stream/Parameter[@name='token']")
    assert parameter is not None, twiml
    return parameter.attrib["value"]


async def test_stream_tokens_are_one_time_and_bound_to_their_call(sqlite_url: str) -> None:
    async with call_stack("demo", database_url=sqlite_url, start_timeout_s=1.0) as stack:
        call_a, call_b = "CA" + "a" * 32, "CA" + "b" * 32
        token_a = _token((await incoming_call(stack, call_a)).text)
        token_b = _token((await incoming_call(stack, call_b)).text)

        # A made-up token, and a real token presented for another call: refused with 1008.
        for params, sid in (({"token": "guess"}, call_a), ({"token": token_b}, call_a)):
            ws, _ = await _open_stream(stack, params, sid)
            assert await _close_code(ws) == 1008
        # No start at all within the deadline: refused too.
        silent = await websockets.connect(_media_url(stack), max_queue=None)
        assert await _close_code(silent) == 1008
        assert stack.emulator.sessions == []  # nobody got an upstream session

        # The right token for the right call is accepted once...
        ws, writer = await _open_stream(stack, {"token": token_a}, call_a)
        await asyncio.sleep(0.3)
        assert len(stack.emulator.sessions) == 1
        await ws.send(writer.stop())
        await ws.close()
        # ...and never again.
        again, _ = await _open_stream(stack, {"token": token_a}, call_a)
        assert await _close_code(again) == 1008
        await wait_until_idle(stack)
        assert len(stack.emulator.sessions) == 1


GARBAGE: list[str | bytes] = [
    "this is not json",
    b"\x00\xff\xfe binary frame",
    "[1, 2, 3]",
    '{"event": "media"}',
    '{"event": "media", "media": {"payload": "!!!not base64!!!"}}',
    '{"event": "media", "media": {"payload": 12}}',
    '{"event": "media", "media": {"payload": "' + "A" * 200_000 + '"}}',
    '{"event": "surprise", "streamSid": "MZ1"}',
    '{"event": "mark"}',
]

TWO_TURNS = Scenario(
    name="two_turns",
    steps=(
        say("Hello, how can I help?"),
        hear("first question"),
        say("Here is the first answer."),
        hear("second question"),
        say("Here is the second answer."),
        end(),
    ),
)


async def test_garbage_frames_mid_call_are_dropped_and_the_call_goes_on(sqlite_url: str) -> None:
    async with call_stack(TWO_TURNS, database_url=sqlite_url) as stack:
        call_sid = "CA" + "c" * 32
        token = _token((await incoming_call(stack, call_sid)).text)
        ws, writer = await _open_stream(stack, {"token": token}, call_sid)
        received: list[str] = []

        async def twilio_side() -> None:  # acknowledge marks at once, keep what arrives
            async for frame in ws:
                event = tw.parse_outbound(frame)
                received.append(type(event).__name__)
                if isinstance(event, tw.OutboundMark):
                    await ws.send(writer.mark(event.name))

        reader = asyncio.create_task(twilio_side())
        speech = voice.caller_speech(800)
        silence = b"\xff" * 160

        async def utter() -> None:
            for i in range(0, len(speech), 160):
                await ws.send(writer.media(speech[i : i + 160].ljust(160, b"\xff")))
            for _ in range(75):  # 1.5 s of silence ends the turn for the VAD
                await ws.send(writer.media(silence))

        await wait_until(lambda: stack.emulator.sessions and stack.emulator.sessions[0].spoken, 10)
        session = stack.emulator.sessions[0]
        await utter()
        await wait_until(lambda: len(session.sent("response.done")) >= 2, 30)
        for frame in GARBAGE:
            await ws.send(frame)
        await utter()
        await wait_until(lambda: len(session.sent("response.done")) >= 3, 30)
        await ws.send(writer.stop())
        await ws.close()
        reader.cancel()
        await wait_until_idle(stack)
        metrics = stack.services.metrics

    assert [t.transcript for t in session.user_turns] == ["first question", "second question"]
    assert [item.text for item in session.spoken][-1] == "Here is the second answer."
    assert received.count("OutboundMedia") > 0 and "Malformed" not in received
    dropped = sum(
        metrics.registry.get_sample_value("switchboard_frames_dropped_total", {"reason": r}) or 0
        for r in ("malformed", "unknown_event", "oversized", "bad_base64")
    )
    assert dropped == len(GARBAGE)


WRITE_WITHOUT_ASKING = Scenario(
    name="write_without_asking",
    steps=(
        say("Hi, how can I help?"),
        hear("I need a plumber. Sam Lee, 3 Oak Road, call me on 555 555 0188."),
        call_tool(
            "capture_lead",
            {
                "name": "Sam Lee",
                "job_type": "plumbing",
                "address": "3 Oak Road",
                "urgency": "routine",
                "callback_number": "555 555 0188",
            },
        ),
        expect_tool_status("confirmation_required"),
        # The model confirms on its own, without asking the caller: must not execute.
        call_tool("confirm_action", {"confirmation_id": "{last.confirmation_id}"}),
        expect_tool_status("rejected"),
        say("Shall I save your details so we can call you back?"),
        hear("Yes, please do."),
        call_tool("confirm_action", {"confirmation_id": "{last.confirmation_id}"}),
        expect_tool_status("executed"),
        # A replay of the same confirmation must not write twice.
        call_tool("confirm_action", {"confirmation_id": "{last.confirmation_id}"}),
        expect_tool_status("rejected"),
        say("All done, goodbye."),
        call_tool("end_call", {"reason": "done"}),
        end(),
    ),
)


async def test_a_write_runs_only_after_the_caller_says_yes_and_only_once(
    sqlite_url: str,
) -> None:
    async with call_stack(WRITE_WITHOUT_ASKING, database_url=sqlite_url) as stack:
        script = DEMO_SCRIPT  # greeting, a long turn, a short "yes" turn, hang up
        report = await simulated_call(stack, script)
        (session,) = stack.emulator.sessions
        async with stack.services.db() as db:
            leads = (await db.execute(select(Lead))).scalars().all()
            audit = (
                await db.execute(select(AuditLog.tool, AuditLog.outcome).order_by(AuditLog.id))
            ).all()

    assert report.violations == []
    assert session.script_errors == []  # every expect_tool_status held
    outputs = [t.output for t in session.tool_calls]
    assert '"not_affirmed"' in outputs[1]
    assert '"executed"' in outputs[2]
    assert '"already_executed"' in outputs[3] or '"status":"rejected"' in outputs[3]
    assert [lead.name for lead in leads] == ["Sam Lee"]
    assert [tuple(row) for row in audit][:4] == [
        ("capture_lead", "proposed"),
        ("capture_lead", "rejected"),
        ("capture_lead", "executed"),
        ("capture_lead", "rejected"),
    ]


GREET_ONLY = Scenario(name="greet_only", steps=(say("Hello, how can I help?"), end()))
OWNER_NUMBER = "+15005550100"  # acme-plumbing's owner number in the demo profiles
OPERATOR_PIN = "2468"


def tool_names(session_update: dict) -> set[str]:
    return {tool["name"] for tool in session_update["session"]["tools"]}


@pytest.mark.parametrize(
    ("caller", "digits", "unlocked"),
    [
        (OWNER_NUMBER, OPERATOR_PIN, True),
        (OWNER_NUMBER, "1111", False),  # the owner's phone, a wrong PIN
        (CALLER_NUMBER, OPERATOR_PIN, False),  # the right PIN from a customer's phone
    ],
    ids=["owner-with-pin", "owner-wrong-pin", "customer-with-pin"],
)
async def test_only_the_owner_with_the_pin_gets_the_crm_operator(
    sqlite_url: str, caller: str, digits: str, unlocked: bool
) -> None:
    from bridge.sim.caller import dtmf, hang_up, wait_for_agent

    script = CallerScript("pin", (wait_for_agent(), dtmf(digits), silence(600), hang_up()))
    async with call_stack(GREET_ONLY, database_url=sqlite_url) as stack:
        report = await simulated_call(stack, script, caller=caller)
        (session,) = stack.emulator.sessions
        async with stack.services.db() as db:
            call = (await db.execute(select(Call))).scalar_one()

    assert report.violations == [] and report.dtmf_sent == digits
    updates = session.received("session.update")
    customer_tools = tool_names(updates[0])
    assert "capture_lead" in customer_tools
    assert not customer_tools & {"list_leads", "move_deal", "get_dashboard_stats", "block_date"}
    if unlocked:
        assert len(updates) == 2
        operator_tools = tool_names(updates[1])
        assert {
            "list_leads",
            "move_deal",
            "get_dashboard_stats",
            "confirm_action",
        } <= operator_tools
        assert call.persona == "crm_operator"
    else:
        assert len(updates) == 1
        assert call.persona == "dispatcher"
