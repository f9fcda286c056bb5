"""The simulated Twilio caller (bridge/sim/caller.py) against a small fake server.

The fake server is a real Starlette app on real uvicorn (loopback): it checks the webhook's
X-Twilio-Signature with twilio's RequestValidator, answers with TwiML built by twilio's helper,
and then plays our server's part on the media WebSocket as each test scripts it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import time
import wave
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import numpy as np
import orjson
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from twilio.request_validator import RequestValidator
from twilio.twiml.voice_response import Connect, VoiceResponse

from bridge import twilio_media as tw
from bridge.audio import ulaw_to_pcm16
from bridge.sim import voice
from bridge.sim.caller import (
    CallerScript,
    CallFailed,
    Line,
    Playout,
    dtmf,
    hang_up,
    parse_twiml,
    place_call,
    silence,
    speak,
    wait_for_agent,
)
from bridge.sim.load import (
    FRAME_BYTES,
    FRAME_MS,
    CallResult,
    LoadCaller,
    LoadPlan,
    speech_frames,
)
from bridge.sim.wav import read_wav, read_wav_as_ulaw, write_wav

AUTH_TOKEN = "test-auth-token-0123456789abcdef"
TO, FROM = "+15005550006", "+15551230142"


# --- the fake server ----------------------------------------------------------------------------


class Peer:
    """Our server's side of the media socket, as a test scripts it."""

    def __init__(self, ws: WebSocket, target: FakeServer, start: dict[str, Any]) -> None:
        self.ws = ws
        self.target = target
        self.start = start
        self.stream_sid: str = start["streamSid"]

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        if isinstance(message, bytes):
            await self.ws.send_bytes(message)
        else:
            await self.ws.send_text(
                message if isinstance(message, str) else orjson.dumps(message).decode()
            )

    async def media(self, ulaw: bytes) -> None:
        await self.send(tw.media_frame(self.stream_sid, base64.b64encode(ulaw).decode()))

    async def mark(self, name: str) -> None:
        await self.send(tw.mark_frame(self.stream_sid, name))

    async def clear(self) -> None:
        await self.send(tw.clear_frame(self.stream_sid))

    async def recv(self) -> tw.TwilioEvent:
        frame = await self.ws.receive_text()
        self.target.frames.append(orjson.loads(frame))
        return tw.parse_frame(frame)

    async def echoes(self, count: int) -> list[str]:
        """Read the caller's frames until `count` mark echoes arrived; their names in order."""
        names: list[str] = []
        while len(names) < count:
            event = await self.recv()
            if isinstance(event, tw.Mark):
                names.append(event.name)
        self.target.echoes += names
        return names

    async def until_stop(self) -> None:
        while not isinstance(await self.recv(), tw.Stop):
            pass


Behaviour = Callable[[Peer], Awaitable[None]]


@dataclass
class FakeServer:
    behaviour: Behaviour
    public_url: str = ""  # what Twilio believes our URL is (signatures, TwiML)
    url: str = ""  # where the server really listens
    status: int = 200
    twiml: str | None = None
    webhook_forms: list[dict[str, str]] = field(default_factory=list)
    webhook_signature_ok: list[bool] = field(default_factory=list)
    ws_signature_ok: list[bool] = field(default_factory=list)
    frames: list[dict[str, Any]] = field(default_factory=list)  # everything the caller sent
    echoes: list[str] = field(default_factory=list)

    def app(self) -> Starlette:
        validator = RequestValidator(AUTH_TOKEN)

        async def incoming(request: Request) -> Response:
            # starlette's request.form() needs python-multipart; the body is plain urlencoded
            form = dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))
            self.webhook_forms.append(form)
            signature = request.headers.get("X-Twilio-Signature", "")
            self.webhook_signature_ok.append(
                validator.validate(self.public_url + "/voice/incoming", form, signature)
            )
            if self.twiml is not None:
                return Response(self.twiml, status_code=self.status, media_type="application/xml")
            reply = VoiceResponse()
            connect = Connect()
            ws_base = self.public_url.replace("https://", "wss://").replace("http://", "ws://")
            stream = connect.stream(url=ws_base + "/media-stream")
            stream.parameter(name="token", value="tok-123")
            reply.append(connect)
            return Response(str(reply), status_code=self.status, media_type="application/xml")

        async def media(ws: WebSocket) -> None:
            ws_base = self.public_url.replace("https://", "wss://").replace("http://", "ws://")
            self.ws_signature_ok.append(
                validator.validate(
                    ws_base + "/media-stream", {}, ws.headers.get("X-Twilio-Signature", "")
                )
            )
            await ws.accept()
            connected = orjson.loads(await ws.receive_text())
            start = orjson.loads(await ws.receive_text())
            self.frames += [connected, start]
            with contextlib.suppress(WebSocketDisconnect):
                await self.behaviour(Peer(ws, self, start))
                await ws.close(1000, "done")

        return Starlette(
            routes=[
                Route("/voice/incoming", incoming, methods=["POST"]),
                WebSocketRoute("/media-stream", media),
            ]
        )


@contextlib.asynccontextmanager
async def serving(target: FakeServer, public_url: str | None = None) -> AsyncIterator[FakeServer]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    host, port = sock.getsockname()[:2]
    target.url = f"http://{host}:{port}"
    target.public_url = public_url or target.url
    server = uvicorn.Server(uvicorn.Config(target.app(), log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            assert not task.done(), "fake server failed to start"
            await asyncio.sleep(0.01)
        yield target
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=10)
        sock.close()


async def call(target: FakeServer, script: CallerScript, **options: Any) -> Any:
    return await asyncio.wait_for(
        place_call(
            server_url=target.url,
            auth_token=AUTH_TOKEN,
            to=TO,
            from_=FROM,
            script=script,
            **options,
        ),
        timeout=30,
    )


# --- calls --------------------------------------------------------------------------------------


async def test_call_is_signed_and_streams_like_twilio() -> None:
    async def behaviour(peer: Peer) -> None:
        await peer.until_stop()

    script = CallerScript("t", (speak(200), dtmf("5#"), silence(60), hang_up()))
    async with serving(FakeServer(behaviour)) as server:
        report = await call(server, script, pace=0, call_sid="CA" + "1" * 32)

    assert server.webhook_signature_ok == [True]
    assert server.ws_signature_ok == [True]
    form = server.webhook_forms[0]
    assert form["CallSid"] == report.call_sid == "CA" + "1" * 32
    assert (form["From"], form["To"], form["CallStatus"], form["Direction"]) == (
        FROM,
        TO,
        "ringing",
        "inbound",
    )
    assert form["AccountSid"].startswith("AC") and len(form["AccountSid"]) == 34

    connected, start, *rest = server.frames
    assert connected == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    parsed_start = tw.parse_frame(orjson.dumps(start))
    assert isinstance(parsed_start, tw.Start)
    assert parsed_start.custom_parameters == {"token": "tok-123"}
    assert parsed_start.call_sid == report.call_sid
    assert (parsed_start.encoding, parsed_start.sample_rate, parsed_start.channels) == (
        "audio/x-mulaw",
        8000,
        1,
    )
    assert [int(f["sequenceNumber"]) for f in [start, *rest]] == list(range(1, len(rest) + 2))
    media = [f for f in rest if f["event"] == "media"]
    assert all(len(base64.b64decode(f["media"]["payload"])) == 160 for f in media)
    assert [int(f["media"]["timestamp"]) for f in media] == [20 * n for n in range(len(media))]
    assert [int(f["media"]["chunk"]) for f in media] == list(range(1, len(media) + 1))
    # 200 ms of speech + 1 s of line silence after it (pace 0), 100 ms after each key, 60 ms
    assert len(media) == (200 + 1000 + 2 * 100 + 60) // 20
    assert [f["dtmf"]["digit"] for f in rest if f["event"] == "dtmf"] == ["5", "#"]
    assert rest[-1]["event"] == "stop" and rest[-1]["stop"]["callSid"] == report.call_sid
    first = base64.b64decode(media[0]["media"]["payload"])
    assert first == voice.caller_speech(200)[:160]
    assert report.dtmf_sent == "5#"
    assert report.audio_sent_ms == len(media) * 20
    assert report.closed_by == "caller" and report.close_code == 1000
    assert report.violations == []
    assert report.stream_sid == start["streamSid"]
    assert "dtmf 5" in report.summary()


async def test_marks_are_echoed_when_playback_reaches_them(tmp_path: Path) -> None:
    first, second = voice.synthesize("alpha beta", "audio/pcmu")[1], b"\x7e" * 4800
    order: list[list[str]] = []

    async def behaviour(peer: Peer) -> None:
        await peer.mark("nothing-queued")  # echoed at once: no audio ahead of it
        order.append(await peer.echoes(1))
        await peer.media(first)
        await peer.mark("a")
        await peer.media(second)
        await peer.mark("b")
        order.append(await peer.echoes(2))

    script = CallerScript("t", (wait_for_agent(10.0, quiet_s=5.0), hang_up()))
    recording = tmp_path / "heard.wav"
    async with serving(FakeServer(behaviour)) as server:
        report = await call(server, script, pace=0.25, record_wav=recording)

    assert order == [["nothing-queued"], ["a", "b"]]
    first_ms = len(first) / 8
    assert report.mark_positions == {
        "nothing-queued": 0.0,
        "a": first_ms,
        "b": first_ms + 600.0,
    }
    assert report.marks_received == report.marks_echoed == ["nothing-queued", "a", "b"]
    assert report.marks_flushed == [] and report.clears == []
    assert report.audio_received_ms == report.audio_played_ms == first_ms + 600
    assert report.closed_by == "server" and report.close_code == 1000
    # the recording holds what was played, in order (with line silence around it)
    with wave.open(str(recording)) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (8000, 1, 2)
        heard = wav.readframes(wav.getnframes())
    played = ulaw_to_pcm16(first + second)
    assert played in heard


async def test_clear_drops_the_queue_and_echoes_every_queued_mark() -> None:
    flushed: list[str] = []

    async def behaviour(peer: Peer) -> None:
        await peer.media(b"\x10" * 24_000)  # 3 s
        await peer.mark("a")
        await peer.media(b"\x20" * 24_000)
        await peer.mark("b")
        await peer.clear()
        flushed.extend(await peer.echoes(2))
        await peer.media(b"\x30" * 1_600)  # 200 ms after the clear
        await peer.mark("c")
        await peer.echoes(1)

    script = CallerScript("t", (wait_for_agent(10.0, quiet_s=5.0), hang_up()))
    async with serving(FakeServer(behaviour)) as server:
        report = await call(server, script, pace=1.0)

    assert flushed == ["a", "b"]
    assert report.marks_flushed == ["a", "b"]
    assert len(report.clears) == 1
    cleared_at = report.clears[0]
    assert cleared_at < 3000
    assert report.mark_positions["a"] == report.mark_positions["b"] == cleared_at
    assert report.mark_positions["c"] == cleared_at + 200
    assert report.audio_cleared_ms == 6000 - cleared_at
    assert report.audio_played_ms == cleared_at + 200
    assert server.echoes == ["a", "b", "c"]


async def test_every_frame_twilio_would_reject_is_counted() -> None:
    async def behaviour(peer: Peer) -> None:
        sid = peer.stream_sid
        await peer.send({"event": "hello", "streamSid": sid})
        await peer.send(
            {"event": "media", "streamSid": "MZ-someone-else", "media": {"payload": "/w=="}}
        )
        await peer.send({"event": "media", "streamSid": sid, "media": {"payload": "not base64"}})
        await peer.send({"event": "mark", "streamSid": sid, "mark": {}})
        await peer.send(b'{"event":"clear"}')  # binary frame
        await peer.send("{not json")
        await peer.mark("ok")
        await peer.echoes(1)

    script = CallerScript("t", (wait_for_agent(5.0), hang_up()))
    async with serving(FakeServer(behaviour)) as server:
        report = await call(server, script, pace=0)

    assert len(report.violations) == 6
    assert any("31924" in v for v in report.violations)
    assert report.marks_echoed == ["ok"]
    assert "violations: 6" in report.summary()


async def test_server_closing_the_socket_ends_the_call() -> None:
    async def behaviour(peer: Peer) -> None:
        await peer.ws.close(4001, "call over")

    script = CallerScript("t", (wait_for_agent(20.0), speak(5000), hang_up()))
    async with serving(FakeServer(behaviour)) as server:
        report = await call(server, script, pace=1.0)
    assert (report.closed_by, report.close_code, report.close_reason) == (
        "server",
        4001,
        "call over",
    )
    assert not any(f["event"] == "stop" for f in server.frames)


async def test_public_url_behind_a_proxy_is_signed_and_reached_directly() -> None:
    async def behaviour(peer: Peer) -> None:
        await peer.until_stop()

    script = CallerScript("t", (speak(100), hang_up()))
    async with serving(FakeServer(behaviour), public_url="https://bridge.example.test") as server:
        report = await call(server, script, pace=0, public_url="https://bridge.example.test")
    assert report.stream_url == "wss://bridge.example.test/media-stream"
    assert server.webhook_signature_ok == [True]
    assert server.ws_signature_ok == [True]
    assert report.closed_by == "caller"


async def test_webhook_refusal_fails_the_call_clearly() -> None:
    async def behaviour(peer: Peer) -> None:
        raise AssertionError("no stream expected")

    target = FakeServer(behaviour, status=403, twiml="<Response/>")
    async with serving(target) as server:
        with pytest.raises(CallFailed, match="403"):
            await call(server, CallerScript("t", ()), pace=0)


async def test_twiml_without_a_stream_ends_the_call_after_its_verbs() -> None:
    async def behaviour(peer: Peer) -> None:
        raise AssertionError("no stream expected")

    reply = VoiceResponse()
    reply.say("Sorry, all lines are busy.")
    reply.hangup()
    async with serving(FakeServer(behaviour, twiml=str(reply))) as server:
        report = await call(server, CallerScript("t", (hang_up(),)), pace=0)
    assert report.stream_url is None and report.stream_sid is None
    assert "busy" in report.twiml
    assert server.webhook_signature_ok == [True]


# --- the sans-I/O parts --------------------------------------------------------------------------


def test_playout_releases_marks_at_their_position() -> None:
    playout = Playout()
    assert playout.add_mark("idle") == ["idle"]
    playout.add_media(b"\x01" * 200)
    assert playout.add_mark("m1") == []
    playout.add_media(b"\x02" * 100)
    assert playout.add_mark("m2") == []
    audio, reached = playout.play(160)
    assert (audio, reached) == (b"\x01" * 160, [])
    audio, reached = playout.play(160)
    assert audio == b"\x01" * 40 + b"\x02" * 100
    assert reached == [("m1", 25.0), ("m2", 37.5)]  # where each sat, inside the played span
    assert playout.queued_bytes == 0 and playout.played_ms == 37.5
    assert playout.add_mark("after") == ["after"]


def test_playout_clear_returns_queued_marks_and_counts_dropped_audio() -> None:
    playout = Playout()
    playout.add_media(b"\x01" * 800)
    playout.add_mark("x")
    playout.add_media(b"\x01" * 800)
    playout.add_mark("y")
    playout.play(320)
    assert playout.clear() == ["x", "y"]
    assert playout.discarded_bytes == 1280 and playout.queued_bytes == 0
    assert playout.play(160) == (b"", [])


def test_line_pads_the_last_frame_with_silence_and_keeps_key_order() -> None:
    line = Line()
    line.say(b"\x00" * 200)
    line.press("7")
    assert line.next() == b"\x00" * 160
    assert line.next() == b"\x00" * 40 + b"\xff" * 120
    assert line.next() == "7"
    assert line.next() is None and line.idle


def test_parse_twiml_reads_stream_and_parameters() -> None:
    reply = VoiceResponse()
    connect = Connect()
    stream = connect.stream(url="wss://example.test/media-stream")
    stream.parameter(name="token", value="abc")
    stream.parameter(name="tenant", value="acme")
    reply.append(connect)
    parsed = parse_twiml(str(reply))
    assert parsed is not None
    assert parsed.url == "wss://example.test/media-stream"
    assert parsed.parameters == {"token": "abc", "tenant": "acme"}
    with pytest.raises(CallFailed, match="invalid XML"):
        parse_twiml("<Response>")
    with pytest.raises(CallFailed, match="Response"):
        parse_twiml("<Other/>")


@pytest.mark.parametrize(
    "make",
    [lambda: speak(0), lambda: dtmf("x"), lambda: dtmf(""), lambda: silence(-1)],
)
def test_bad_script_steps_are_refused(make: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        make()


async def test_speaking_a_wav_file_sends_its_audio_as_phone_frames(tmp_path: Path) -> None:
    utterance, pcm24 = voice.synthesize("hello from a file", "audio/pcm")
    path = tmp_path / "hello.wav"
    write_wav(path, pcm24, rate=24_000)

    async def behaviour(peer: Peer) -> None:
        await peer.until_stop()

    async with serving(FakeServer(behaviour)) as server:
        await call(server, CallerScript("t", (speak(path), hang_up())), pace=0)
    sent = b"".join(
        base64.b64decode(f["media"]["payload"]) for f in server.frames if f["event"] == "media"
    )
    expected = read_wav_as_ulaw(path)
    assert len(expected) == utterance.duration_ms * 8
    assert sent.startswith(expected)
    assert set(sent[len(expected) :]) == {0xFF}  # then the line is silent
    # the words survive the trip to the phone band: each is still its own tone
    samples = voice.decode_to_pcm16(expected, "audio/pcmu")
    for segment in utterance.segments:
        window = samples[segment.start_ms * 8 + 80 : segment.end_ms * 8 - 80]
        assert voice.nearest_segment_index(voice.dominant_frequency(window, 8000)) == segment.index


def test_read_wav_mixes_stereo_to_mono_and_rejects_non_wav(tmp_path: Path) -> None:
    path = tmp_path / "stereo.wav"
    left, right = np.full(800, 1000, dtype="<i2"), np.full(800, 3000, dtype="<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(2)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes(np.column_stack((left, right)).tobytes())
    pcm, rate = read_wav(path)
    assert rate == 8000
    assert set(np.frombuffer(pcm, dtype="<i2").tolist()) == {2000}
    bogus = tmp_path / "bogus.wav"
    bogus.write_bytes(b"not a wav file at all")
    with pytest.raises(ValueError, match="not a PCM WAV"):
        read_wav(bogus)


async def test_a_query_string_on_the_stream_url_is_a_violation_and_dropped() -> None:
    queries: list[str] = []

    async def behaviour(peer: Peer) -> None:
        queries.append(peer.ws.url.query)
        await peer.until_stop()

    target = FakeServer(behaviour)
    async with serving(target) as server:
        ws_url = server.url.replace("http://", "ws://") + "/media-stream?token=abc"
        reply = VoiceResponse()
        connect = Connect()
        connect.stream(url=ws_url)
        reply.append(connect)
        server.twiml = str(reply)
        report = await call(server, CallerScript("t", (hang_up(),)), pace=0)
    assert queries == [""]
    assert len(report.violations) == 1 and "query string" in report.violations[0]


# --- the load generator's lean caller (bridge/sim/load.py) against the same fake server ---------


def _load_plan(server: FakeServer, duration_s: float) -> LoadPlan:
    return LoadPlan(
        server_url=server.url,
        public_url=server.public_url,
        auth_token=AUTH_TOKEN,
        to=TO,
        duration_s=duration_s,
        barge_in_wait_s=2.0,
        connect_timeout_s=5.0,
    )


async def _run_load_caller(plan: LoadPlan) -> CallResult:
    caller = LoadCaller(0, plan, speech_frames(4))
    async with httpx.AsyncClient() as http:
        return await asyncio.wait_for(caller.run(http, time.monotonic() + 20), timeout=30)


async def test_load_caller_measures_every_echoed_frame_acks_marks_and_stops_on_clear() -> None:
    measured = 10  # 200 ms
    marks_sent: list[str] = []

    async def behaviour(peer: Peer) -> None:
        # Echo each frame, a mark after every fifth, then `clear` once the measured audio is in.
        media = 0
        while True:
            event = await peer.recv()
            if isinstance(event, tw.Media):
                media += 1
                await peer.send(tw.media_frame(peer.stream_sid, event.payload))
                if media % 5 == 0:
                    marks_sent.append(f"m{media}")
                    await peer.mark(f"m{media}")
                if media == measured:
                    await peer.clear()
            elif isinstance(event, tw.Stop):
                return

    async with serving(FakeServer(behaviour)) as server:
        result = await _run_load_caller(_load_plan(server, measured * FRAME_MS / 1000))
    assert result.errors == []
    assert server.webhook_signature_ok == [True] and server.ws_signature_ok == [True]
    assert result.sent_bytes == result.returned_bytes == measured * FRAME_BYTES
    assert len(result.latencies_ms) == measured and min(result.latencies_ms) >= 0
    assert result.ahead == 0
    # Each mark is echoed once, when playout reaches it or when `clear` drops the queue.
    echoed = [f["mark"]["name"] for f in server.frames if f["event"] == "mark"]
    assert echoed == marks_sent and result.marks_acked == result.marks_received == 2
    assert result.clear_after_ms is not None
    assert [f["event"] for f in server.frames][-1] == "stop"


async def test_load_caller_reports_a_media_socket_the_server_closes() -> None:
    async def behaviour(peer: Peer) -> None:
        for _ in range(3):
            await peer.recv()
        await peer.ws.close(1011, "gone")

    async with serving(FakeServer(behaviour)) as server:
        result = await _run_load_caller(_load_plan(server, 2.0))
    assert any("closed" in error for error in result.errors), result.errors
    assert result.frames_sent < 100  # it stopped talking instead of streaming into the void


async def test_load_caller_reports_a_refused_webhook() -> None:
    async def behaviour(peer: Peer) -> None:
        raise AssertionError("no stream expected")

    async with serving(FakeServer(behaviour, status=403, twiml="<Response/>")) as server:
        result = await _run_load_caller(_load_plan(server, 0.2))
    assert result.errors == ["CallRefused: /voice/incoming answered 403"]
