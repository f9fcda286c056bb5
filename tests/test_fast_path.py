"""The fast paths: hot messages handled in the sockets' frame callbacks, never out of order.

A caller media frame or a model audio delta handed to its pump costs a future, a task wakeup
and a coroutine resume; `CallSession` installs handlers on the picows sockets that take such a
message in the frame callback instead, while the pump is parked (bridge.call, "the fast
paths"). Everything here runs on real sockets on loopback: the app's server with its picows
media socket, the Realtime emulator behind the picows upstream connection, and either the
simulated caller or a bare WebSocket client playing Twilio.

What must hold: a call's hot messages go through the fast paths; when a pump is busy
(awaiting a conversation write, a drain) messages wait for it and nothing is reordered, lost
or handled twice; a restore or upstream back-pressure makes the fast path decline; a Twilio
socket found closed by a fast-path send ends the call as the pump's own failed send does; and
a bug inside a handler is contained (logged once, the call goes on without fast paths).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import logging
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import websockets
from websockets.asyncio.server import ServerConnection, serve

from app.embedded import wait_until
from app.media_websocket import MediaWebSocket
from bridge import realtime as rt
from bridge import twilio_media as tw
from bridge.audio import ulaw_to_pcm16
from bridge.call import CallSession
from bridge.call_protocol import CallProtocol
from bridge.realtime_connection import RealtimeConnection
from bridge.sim import voice
from bridge.sim.caller import (
    BARGE_IN_SCRIPT,
    DEMO_SCRIPT,
    CallerScript,
    hang_up,
    speak,
    wait_for_agent,
)
from bridge.sim.emulator import SessionRecord
from bridge.sim.scenario import Scenario, end, hear, say
from tests.e2e import (
    Stack,
    call_stack,
    expected_word_frequencies,
    incoming_call,
    read_wav_pcm,
    simulated_call,
    wait_until_idle,
    word_frequencies,
)
from tests.sdk_oracle import assert_every_event_valid
from tools.conversation import ConversationLog

APPEND = "input_audio_buffer.append"
DELTA = "response.output_audio.delta"


@dataclass
class FastPaths:
    """What the fast-path handlers of the calls in a test did, by kind of event."""

    sessions: list[CallSession] = field(default_factory=list)
    taken: collections.Counter[str] = field(default_factory=collections.Counter)
    declined: collections.Counter[str] = field(default_factory=collections.Counter)
    inside: bool = False  # a realtime handler is running (for faults injected there)

    @property
    def session(self) -> CallSession:
        (session,) = self.sessions
        return session


@pytest.fixture
def fast_paths(monkeypatch: pytest.MonkeyPatch) -> FastPaths:
    """Counts every offer to the handlers (they are looked up on the class at call start)."""
    seen = FastPaths()
    twilio_path = CallSession._twilio_fast_path
    realtime_path = CallSession._realtime_fast_path
    run = CallSession.run

    def on_twilio(self: CallSession, frame: str) -> bool:
        taken = twilio_path(self, frame)
        (seen.taken if taken else seen.declined)[type(tw.parse_frame(frame)).__name__] += 1
        return taken

    def on_realtime(self: CallSession, frame: bytes) -> bool:
        seen.inside = True
        try:
            taken = realtime_path(self, frame)
        finally:
            seen.inside = False
        kind = type(rt.parse_server_event(frame)).__name__
        (seen.taken if taken else seen.declined)[kind] += 1
        return taken

    async def recording_run(self: CallSession) -> Any:
        seen.sessions.append(self)
        return await run(self)

    monkeypatch.setattr(CallSession, "_twilio_fast_path", on_twilio)
    monkeypatch.setattr(CallSession, "_realtime_fast_path", on_realtime)
    monkeypatch.setattr(CallSession, "run", recording_run)
    return seen


def assert_heard_exactly_what_was_spoken(wav: Path, session: SessionRecord) -> None:
    """g711: the model's audio is forwarded verbatim, so the caller's recording must be every
    byte the emulator sent, in order: nothing lost, reordered or played twice."""
    heard, _ = read_wav_pcm(wav)
    spoken = ulaw_to_pcm16(b"".join(item.sent_audio for item in session.spoken))
    expected = np.frombuffer(spoken, dtype="<i2").astype(np.float64)
    assert len(heard) == len(expected)
    assert np.array_equal(heard, expected)


# -- a whole call ------------------------------------------------------------------------------


@pytest.mark.parametrize("audio_mode", ["pcm16", "g711"])
async def test_a_calls_hot_messages_are_handled_in_the_socket_callbacks(
    audio_mode: str, sqlite_url: str, tmp_path: Path, fast_paths: FastPaths
) -> None:
    heard = tmp_path / "heard.wav"
    async with call_stack("demo", database_url=sqlite_url, audio_mode=audio_mode) as stack:
        report = await simulated_call(stack, DEMO_SCRIPT, record_wav=heard)
        (session,) = stack.emulator.sessions
    call = fast_paths.session
    stats = call.protocol.stats

    assert report.violations == [] and report.closed_by == "server"
    assert call.protocol.finished == "agent ended the call"
    # Nearly every media frame and every audio delta skipped its pump (a few arrive while the
    # pump is still busy with an earlier, slower event and wait for it).
    deltas = len(session.sent(DELTA))
    assert stats.frames_in > 100 and deltas > 100
    assert fast_paths.taken["Media"] >= 0.95 * stats.frames_in
    assert fast_paths.taken["AudioDelta"] >= 0.95 * deltas
    assert fast_paths.taken["Mark"] > 0
    assert call.protocol.stats.fast_path_frames == sum(fast_paths.taken.values())
    # Only what the pumps must handle was declined.
    assert set(fast_paths.declined) <= {
        "Connected",
        "Start",
        "Dtmf",
        "Stop",
        "ResponseCreated",
        "ResponseDone",
        "SpeechStarted",
        "SpeechStopped",
        "InputAudioCommitted",
        "InputTranscriptDone",
        "OutputTranscriptDone",
        "FunctionCallDone",
        "SessionCreated",
        "SessionUpdated",
    }
    # And the audio is all there, both ways, in order.
    assert session.input_audio_ms >= 0.99 * report.audio_sent_ms
    assert stats.frames_out == deltas
    if audio_mode == "g711":
        assert_heard_exactly_what_was_spoken(heard, session)
    else:
        samples, rate = read_wav_pcm(heard)
        assert word_frequencies(samples, rate) == expected_word_frequencies(
            [item.text for item in session.spoken]
        )
    # The latency samples moved with the deltas into the callback: still one per 25 frames.
    assert len(stats.added_latency_s) >= deltas // 25 - 2


# -- barge-in ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["fast", "pump"])
async def test_a_barge_in_is_cleared_and_timed_on_either_path(
    path: str, sqlite_url: str, fast_paths: FastPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "fast": the clear leaves from the Realtime socket's frame callback. "pump": the fast path
    # declines speech_started (as it does when the upstream is backed up), the pump handles
    # it, and its reaction is timed from when the oldest message it had queued arrived.
    if path == "pump":
        realtime_path = CallSession._realtime_fast_path

        def declining(self: CallSession, frame: bytes) -> bool:
            if type(rt.parse_server_event(frame)) is rt.SpeechStarted:
                return False
            return realtime_path(self, frame)

        monkeypatch.setattr(CallSession, "_realtime_fast_path", declining)
    async with call_stack("barge_in", database_url=sqlite_url) as stack:
        report = await simulated_call(stack, BARGE_IN_SCRIPT, pace=0.25)
        (session,) = stack.emulator.sessions
        metrics = stack.services.metrics.registry
        timed = metrics.get_sample_value("switchboard_barge_in_reaction_seconds_count")
    stats = fast_paths.session.protocol.stats

    assert report.violations == [] and len(report.clears) == 1
    assert_every_event_valid(session)  # the cancel and truncate sent from the callback too
    assert len(session.received("conversation.item.truncate")) == 1
    if path == "fast":
        assert fast_paths.taken["SpeechStarted"] >= 1
    # One barge-in cut audio, and it was timed; other speech_started events cut nothing.
    assert stats.barge_ins == 1
    (reaction_s,) = stats.barge_in_reaction_s
    assert reaction_s > 0
    assert timed == 1


# -- a busy pump -------------------------------------------------------------------------------

TWO_ANSWERS = Scenario(
    name="two_answers",
    steps=(
        say("Hello, how can I help?"),
        hear("first question"),
        say("Here is a long first answer, with quite a few words in it, to take a while."),
        hear("second question"),
        say("And here is the second answer, which is not short either, for the same reason."),
        end(),
    ),
)
TWO_QUESTIONS = CallerScript(
    "two_questions",
    (
        wait_for_agent(),
        speak(1500),
        wait_for_agent(30.0),
        speak(1500),
        wait_for_agent(30.0),
        hang_up(),
    ),
)


async def test_deltas_that_arrive_while_the_pump_is_busy_wait_for_it_in_order(
    sqlite_url: str, tmp_path: Path, fast_paths: FastPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each caller turn's conversation-log write holds the realtime pump for 300 ms, while the
    # emulator (4x real time) streams the answer: its first deltas queue behind the write,
    # the rest go through the fast path once the pump has caught up and parked again.
    committed = ConversationLog.caller_audio_committed
    writes = 0

    async def slow_write(self: ConversationLog, item_id: str) -> None:
        nonlocal writes
        writes += 1
        await asyncio.sleep(0.3)
        await committed(self, item_id)

    monkeypatch.setattr(ConversationLog, "caller_audio_committed", slow_write)
    heard = tmp_path / "heard.wav"
    async with call_stack(
        TWO_ANSWERS, database_url=sqlite_url, audio_mode="g711", speed=4.0
    ) as stack:
        report = await simulated_call(stack, TWO_QUESTIONS, record_wav=heard)
        (session,) = stack.emulator.sessions

    assert report.violations == []
    assert writes == 2
    assert [item.text for item in session.spoken][-1].startswith("And here is the second")
    deltas = len(session.sent(DELTA))
    fast = fast_paths.taken["AudioDelta"]
    assert 0 < fast < deltas - 20  # both paths carried audio, in turns
    assert fast_paths.session.protocol.stats.frames_out == deltas
    assert_heard_exactly_what_was_spoken(heard, session)


# -- a bare Twilio side, for the situations a simulated caller cannot set up -------------------

WAIT_FOR_CALLER = Scenario(
    name="wait_for_caller",
    steps=(say("Hello, how can I help?"), hear("anything"), say("Goodbye."), end()),
)


QUIET_CODES = (0xFF, 0x7F, 0xFE, 0x7E)


@dataclass
class Line:
    """Twilio's side of one media stream, driven by the test."""

    stack: Stack
    ws: websockets.ClientConnection
    writer: tw.TwilioStreamWriter
    call: CallSession
    sent: list[str] = field(default_factory=list)  # base64 of every media frame sent
    received: list[Any] = field(default_factory=list)
    _next: int = 0

    async def media(self, count: int) -> list[str]:
        """`count` frames of silence, each different: a counter in base 4 over mu-law's
        quietest codes (0 and +-1 step), so the model's VAD still hears silence."""
        payloads = []
        for _ in range(count):
            self._next += 1
            digits = [(self._next >> shift) & 3 for shift in range(0, 16, 2)]
            ulaw = bytes(QUIET_CODES[d] for d in digits).ljust(160, b"\xff")
            payloads.append(base64.b64encode(ulaw).decode())
            await self.ws.send(self.writer.media(ulaw))
        self.sent += payloads
        return payloads

    def session(self, index: int = -1) -> SessionRecord:
        return self.stack.emulator.sessions[index]


def appended(session: SessionRecord) -> list[str]:
    return [event["audio"] for event in session.received(APPEND)]


@contextlib.asynccontextmanager
async def twilio_line(stack: Stack, call_sid: str) -> AsyncIterator[Line]:
    twiml = (await incoming_call(stack, call_sid)).text
    parameter = ET.fromstring(twiml).find("./Connect/Stream/Parameter[@name='token']")
    assert parameter is not None, twiml
    ws = await websockets.connect(stack.url.replace("http", "ws") + "/media-stream", max_queue=None)
    writer = tw.TwilioStreamWriter("MZ" + call_sid[2:], call_sid, "AC" + "0" * 32)
    await ws.send(writer.connected())
    await ws.send(writer.start({"token": parameter.attrib["value"]}))
    await wait_until(lambda: call_sid in stack.services.calls, 10)
    line = Line(stack, ws, writer, stack.services.calls[call_sid])

    async def twilio_side() -> None:  # keeps what arrives, acknowledges marks at once
        with contextlib.suppress(websockets.ConnectionClosed):
            async for frame in ws:
                event = tw.parse_outbound(frame)
                line.received.append(event)
                if isinstance(event, tw.OutboundMark):
                    await ws.send(writer.mark(event.name))

    reader = asyncio.create_task(twilio_side())
    # The greeting has played: both pumps are idle and parked.
    await wait_until(lambda: stack.emulator.sessions and stack.emulator.sessions[0].spoken, 10)
    await wait_until(lambda: line.call.protocol.playback.queued_ms == 0, 10)
    try:
        yield line
    finally:
        with contextlib.suppress(websockets.ConnectionClosed):
            await ws.send(writer.stop())
        await ws.close()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await wait_until_idle(stack)


async def test_while_the_session_is_restored_the_fast_path_declines_media(
    sqlite_url: str, fast_paths: FastPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        call_stack(WAIT_FOR_CALLER, database_url=sqlite_url, audio_mode="g711") as stack,
        twilio_line(stack, "CA" + "1" * 32) as line,
    ):
        call, first = line.call, line.call._upstream
        before = await line.media(5)
        await wait_until(lambda: appended(line.session(0))[-5:] == before, 10)
        assert fast_paths.taken["Media"] == 5

        # The session drops. Its replacement connects, but the replay into it is held: the
        # call is restoring, with a new session that could be written to at once.
        replay = asyncio.Event()
        send = RealtimeConnection.send

        async def held_send(self: RealtimeConnection, text: str) -> None:
            if self is not first:
                await replay.wait()
            await send(self, text)

        monkeypatch.setattr(RealtimeConnection, "send", held_send)
        await first.close()
        await wait_until(lambda: call._upstream is not first, 10)
        assert call._restoring and call._upstream.writable
        await line.media(10)
        stats = call.protocol.stats
        await wait_until(lambda: stats.frames_dropped.get("upstream_restoring") == 10, 10)
        # The fast path declined (the first, and any that came while the pump was parked
        # again); the pump dropped them all, as always while restoring.
        assert fast_paths.declined["Media"] >= 1
        assert fast_paths.taken["Media"] == 5

        replay.set()
        await wait_until(lambda: not call._restoring, 10)
        after = await line.media(5)
        restored = line.session(1)
        await wait_until(lambda: appended(restored) == after, 10)
        assert fast_paths.taken["Media"] == 10  # the fast path is back, on the new session
        # and the new session heard the caller only after its configuration and the replay.
        types = [event["type"] for event in restored.client_events]
        assert types[0] == "session.update" and types.index(APPEND) > 0
        assert set(types[types.index(APPEND) :]) == {APPEND}
    assert call.upstream_stats.restores == 1


async def test_upstream_back_pressure_makes_media_wait_for_the_drain_in_order(
    sqlite_url: str, fast_paths: FastPaths
) -> None:
    async with (
        call_stack(WAIT_FOR_CALLER, database_url=sqlite_url, audio_mode="g711") as stack,
        twilio_line(stack, "CA" + "2" * 32) as line,
    ):
        upstream = line.call._upstream
        session = line.session()
        await line.media(3)
        await wait_until(lambda: appended(session) == line.sent, 10)
        taken = fast_paths.taken["Media"]
        assert taken == 3

        # The transport reports its write buffer past the high-water mark (a stalled peer).
        upstream.pause_writing()
        assert not upstream.writable
        await line.media(20)
        # The first is declined: the Twilio pump sends it and waits for the drain, the rest
        # queue behind it (the pump is not parked, so the fast path is not even asked).
        await wait_until(lambda: fast_paths.declined["Media"] == 1, 10)
        await asyncio.sleep(0.2)
        assert fast_paths.taken["Media"] == taken and fast_paths.declined["Media"] == 1
        assert len(appended(session)) == 4  # the declined one was written, then the pump waited

        upstream.resume_writing()
        await wait_until(lambda: len(appended(session)) == len(line.sent), 10)
        assert appended(session) == line.sent  # in order, each once
        await line.media(3)  # the pump is parked again: the fast path takes them
        await wait_until(lambda: appended(session) == line.sent, 10)
        assert fast_paths.taken["Media"] == taken + 3


async def test_twilio_back_pressure_makes_deltas_wait_for_the_pump(
    sqlite_url: str, fast_paths: FastPaths
) -> None:
    async with (
        call_stack(WAIT_FOR_CALLER, database_url=sqlite_url, audio_mode="g711") as stack,
        twilio_line(stack, "CA" + "3" * 32) as line,
    ):
        twilio = line.call._twilio
        assert isinstance(twilio, MediaWebSocket)
        session = line.session()
        taken = fast_paths.taken.copy()
        assert taken["AudioDelta"] > 0  # the greeting went through the fast path
        heard_before = len(line.received)

        def heard() -> bytes:
            return b"".join(
                e.ulaw for e in line.received[heard_before:] if isinstance(e, tw.OutboundMedia)
            )

        # Twilio stops reading: our write buffer is past its high-water mark.
        twilio.pause_writing()
        assert not twilio.writable
        # A caller turn (speech, then silence) makes the model answer.
        speech = voice.caller_speech(800)
        for i in range(0, len(speech), 160):
            await line.ws.send(line.writer.media(speech[i : i + 160].ljust(160, b"\xff")))
        await line.media(75)
        await wait_until(lambda: len(session.sent("response.done")) == 2, 10)
        await asyncio.sleep(0.2)
        # The realtime fast path took nothing (the pump waits for room to send the first
        # delta, the rest queue behind it): nothing was sent meanwhile.
        assert fast_paths.taken["AudioDelta"] == taken["AudioDelta"]
        assert fast_paths.taken["Other"] == taken["Other"]
        assert heard() == b""

        twilio.resume_writing()
        answer = session.spoken[-1].sent_audio
        assert session.spoken[-1].text == "Goodbye."
        await wait_until(lambda: len(heard()) == len(answer), 10)
        assert heard() == answer  # in order, each once


# -- the Twilio socket closing under a fast-path send ---------------------------------------


async def test_a_twilio_socket_found_closed_by_a_fast_path_send_ends_the_call(
    sqlite_url: str,
    fast_paths: FastPaths,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="switchboard")
    send_nowait = MediaWebSocket.send_text_nowait
    sends = 0

    def dropping(self: MediaWebSocket, data: str) -> bool:
        # The 30th send finds the connection lost (as if the caller's line died just then).
        nonlocal sends
        sends += 1
        if sends == 30:
            assert fast_paths.inside  # sent by the realtime fast path
            self._ws.disconnect(graceful=False)  # type: ignore[union-attr]
            self._gone(1006)
        return send_nowait(self, data)

    monkeypatch.setattr(MediaWebSocket, "send_text_nowait", dropping)
    async with call_stack("demo", database_url=sqlite_url, audio_mode="g711") as stack:
        await simulated_call(stack, DEMO_SCRIPT)
    call = fast_paths.session
    assert sends == 30  # nothing was sent after it
    assert call.protocol.finished == "twilio socket closed"
    messages = [r.getMessage() for r in caplog.records]
    assert f"call {call.setup.call_sid}: twilio socket gone (closed)" in messages
    assert any(
        m.startswith(f"call {call.setup.call_sid} ended (twilio socket closed)") for m in messages
    )
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


# -- a bug inside a handler ------------------------------------------------------------------


@pytest.mark.parametrize("where", ["while-deciding", "after-handling"])
async def test_a_bug_in_a_fast_path_is_contained_and_loses_nothing(
    where: str,
    sqlite_url: str,
    tmp_path: Path,
    fast_paths: FastPaths,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    deltas = 0

    def fails_on_the_tenth_delta(original: Callable[..., Any]) -> Callable[..., Any]:
        def flaky(*args: Any) -> Any:
            nonlocal deltas
            if not fast_paths.inside:
                return original(*args)
            if where == "while-deciding":  # parse_server_event(frame): before any change
                result = original(*args)
            else:  # CallProtocol.receive_realtime(self, event): after the change
                original(*args)
                result = None
            if type(result) is rt.AudioDelta or type(args[-1]) is rt.AudioDelta:
                deltas += 1
                if deltas == 10:
                    raise RuntimeError("a bug")
            return result

        return flaky

    if where == "while-deciding":
        monkeypatch.setattr(
            rt, "parse_server_event", fails_on_the_tenth_delta(rt.parse_server_event)
        )
    else:
        monkeypatch.setattr(
            CallProtocol,
            "receive_realtime",
            fails_on_the_tenth_delta(CallProtocol.receive_realtime),
        )
    heard = tmp_path / "heard.wav"
    async with call_stack("demo", database_url=sqlite_url, audio_mode="g711") as stack:
        report = await simulated_call(stack, DEMO_SCRIPT, record_wav=heard)
        (session,) = stack.emulator.sessions
    call = fast_paths.session

    (error,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert error.getMessage().endswith(
        "fast path failed; the pumps handle every message from now on"
    )
    assert error.exc_info is not None and str(error.exc_info[1]) == "a bug"
    # From then on the handlers were never asked again: the pumps did everything.
    assert deltas == 10
    assert fast_paths.taken["AudioDelta"] == 9 + (where == "after-handling")
    assert call.protocol.finished == "agent ended the call"
    assert report.violations == [] and report.closed_by == "server"
    # The failed message was handled exactly once: by the pump when the handler had not
    # changed anything yet, else by the handler (its frames went out with the next ones).
    assert_heard_exactly_what_was_spoken(heard, session)


# -- the upstream socket's side of the contract ------------------------------------------------


async def test_the_upstream_offers_a_message_only_while_its_consumer_waits() -> None:
    release = asyncio.Event()

    async def server(ws: ServerConnection) -> None:
        for n in range(4):  # arrive while nobody waits: queued, never offered
            await ws.send(orjson.dumps({"n": n}).decode())
        await release.wait()
        for n in range(4, 10):  # one at a time, each finding the consumer parked again
            await asyncio.sleep(0.05)
            await ws.send(orjson.dumps({"n": n}).decode())
        await ws.close()

    async with serve(server, "127.0.0.1", 0) as listening:
        port = listening.sockets[0].getsockname()[1]
        connection = await RealtimeConnection.connect(f"ws://127.0.0.1:{port}/", "m", "k")
        handled: list[tuple[str, int]] = []

        def fast(payload: bytes) -> bool:
            n = orjson.loads(payload)["n"]
            if n % 2:
                return False  # declined: the consumer gets it
            handled.append(("fast", n))
            return True

        connection.set_fast_path(fast)
        await asyncio.sleep(0.2)
        assert handled == []
        async for frame in connection:
            n = orjson.loads(frame)["n"]
            handled.append(("pump", n))
            if n == 3:
                release.set()
            if n == 7:
                connection.set_fast_path(None)  # removed: everything goes to the consumer
        assert handled == [
            *[("pump", n) for n in range(4)],
            ("fast", 4),
            ("pump", 5),
            ("fast", 6),
            ("pump", 7),
            ("pump", 8),
            ("pump", 9),
        ]


async def test_the_upstreams_synchronous_send() -> None:
    received: list[str] = []
    closing = asyncio.Event()

    async def server(ws: ServerConnection) -> None:
        async for message in ws:
            received.append(str(message))
            if message == "last":
                closing.set()

    async with serve(server, "127.0.0.1", 0) as listening:
        port = listening.sockets[0].getsockname()[1]
        connection = await RealtimeConnection.connect(f"ws://127.0.0.1:{port}/", "m", "k")
        assert connection.writable
        assert connection.send_nowait("first") and connection.send_nowait("last")
        await asyncio.wait_for(closing.wait(), 5)
        connection.pause_writing()  # as the transport does past the high-water mark
        assert not connection.writable
        connection.resume_writing()
        assert connection.writable
        await connection.close()
        assert not connection.writable
        assert connection.send_nowait("after the close") is False
    assert received == ["first", "last"]
