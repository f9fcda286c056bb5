"""Load generation: many lean simulated Twilio callers, and the echo emulator they talk to.

`place_call` (bridge.sim.caller) is a faithful single caller with scripts, a recording and a
report of every event; at 100+ concurrent calls its per-call cost would drown the server being
measured. A `LoadCaller` keeps only what a capacity measurement needs, sharing the sans-I/O
pieces (`TwilioStreamWriter` numbers the frames as Twilio does, `Playout` plays the returned
audio and releases marks at playout time as Twilio does):

* a signed `POST /voice/incoming`, then the media stream with the TwiML's token;
* one 20 ms frame of non-silent speech-band audio per tick, at real-time pace;
* every returned byte is matched to the sent frame at the same byte position (the echo
  returns audio byte for byte: the resamplers emit exactly one output byte per input byte,
  only delayed in content), which gives the added round-trip latency of each returned chunk;
* after `duration_s` of audio the emulator starts a barge-in; the caller waits (bounded) for
  Twilio's `clear`, then hangs up.

`LoadEchoSession` is the emulator's echo session with two changes for load tests: asking for a
response (the bridge's greeting) completes at once with no audio, so every appended byte is
echoed from the first frame; and once `barge_in_at_ms` of input has arrived it sends
`input_audio_buffer.speech_started` and times how long the bridge takes to cancel. The emulator
runs in its own process (`python -m bridge.sim.load emulator`), so its CPU is not the server's
or the load generator's.

Both sides speak WebSocket through picows, as the server does: with websockets' asyncio
stack the load generator and the emulator each cost about as much CPU per call as the server
they measure, and on a slower 2-core machine they fell behind real time before the server did.

Every loop here is bounded in count and in time.
"""

from __future__ import annotations

import argparse
import asyncio
import binascii
import contextlib
import functools
import gc
import json
import sys
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

import httpx
import numpy as np
import orjson
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_create_server
from twilio.request_validator import RequestValidator
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from bridge import twilio_media as tw
from bridge.audio import pcm16_to_ulaw
from bridge.realtime_connection import RealtimeConnection
from bridge.sim.caller import Playout, new_sid, parse_twiml
from bridge.sim.emulator import MAX_FRAME_BYTES, REALTIME_PATH, EmulatorSession, SessionRecord
from bridge.sim.scenario import BUILTINS

FRAME_MS = 20
FRAME_BYTES = tw.MULAW_BYTES_PER_MS * FRAME_MS  # 160 bytes of mu-law per 20 ms
DISTINCT_FRAMES = 250  # 5 s of test speech, cycled
API_VERSION = "2010-04-01"


# --- the caller's audio -----------------------------------------------------------------------


def speech_frames(frames: int = DISTINCT_FRAMES) -> list[bytes]:
    """Deterministic speech-band mu-law frames, none of them digital silence."""
    t = np.arange(FRAME_BYTES * frames) / 8000.0
    rng = np.random.default_rng(7)
    x = sum(a * np.sin(2 * np.pi * f * t) for a, f in ((5000, 230), (2500, 700), (1200, 2100)))
    x = x + rng.normal(0, 300, len(t))
    ulaw = pcm16_to_ulaw(np.clip(np.rint(x), -32768, 32767).astype("<i2").tobytes())
    return [ulaw[i : i + FRAME_BYTES] for i in range(0, len(ulaw), FRAME_BYTES)]


# --- one lean caller ----------------------------------------------------------------------------


@dataclass(slots=True)
class LoadPlan:
    """What every caller of a run does, and where it calls."""

    server_url: str  # where the server listens (http://127.0.0.1:PORT)
    public_url: str  # what the server signs and writes TwiML against
    auth_token: str
    to: str
    from_prefix: str = "+1500"  # caller i calls from prefix + i (7 digits): distinct callers
    duration_s: float = 10.0  # measured audio per call
    barge_in: bool = True  # after the measured audio, wait for the barge-in's `clear`
    barge_in_wait_s: float = 5.0  # how long to keep talking while waiting for it (bounded)
    connect_timeout_s: float = 10.0

    @property
    def measured_frames(self) -> int:
        return max(1, round(self.duration_s * 1000 / FRAME_MS))


@dataclass(slots=True)
class CallResult:
    index: int
    latencies_ms: array = field(default_factory=lambda: array("d"))
    sent_bytes: int = 0  # measured audio sent
    returned_bytes: int = 0  # of it, returned
    frames_sent: int = 0  # every media frame, measured or not
    marks_received: int = 0
    marks_acked: int = 0
    late_ticks: int = 0  # ticks the sender ran more than one frame late (load generator lag)
    clear_after_ms: float | None = None  # barge-in: trigger frame sent -> `clear` received
    ahead: int = 0  # chunks returned before their frame was sent (would be a bug)
    errors: list[str] = field(default_factory=list)
    started_at: float = 0.0
    streaming_at: float = 0.0  # first media frame sent
    measured_until: float = 0.0  # last measured frame sent
    ended_at: float = 0.0


class LoadCaller:
    """One simulated Twilio media stream: real-time sender, receiver, playout with marks."""

    def __init__(self, index: int, plan: LoadPlan, frames: list[bytes]) -> None:
        self.index = index
        self.plan = plan
        self.frames = frames
        self.result = CallResult(index)
        self.writer = tw.TwilioStreamWriter(new_sid("MZ"), new_sid("CA"), new_sid("AC"))
        self.playout = Playout()
        self.sent_at = array("d")  # monotonic send time of each media frame
        self._received = 0  # returned mu-law bytes so far
        self._cleared = asyncio.Event()
        self._closed = asyncio.Event()

    async def run(self, http: httpx.AsyncClient, stop_at: float) -> CallResult:
        result = self.result
        result.started_at = time.monotonic()
        try:
            async with asyncio.timeout(max(0.1, stop_at - time.monotonic())):
                url, parameters, signature = await self._answer(http)
                # picows, as the bridge's own upstream: websockets' asyncio client cost the
                # generator about as much CPU per call as the server being measured.
                ws = await RealtimeConnection.open(
                    url,
                    [("X-Twilio-Signature", signature)],
                    open_timeout=self.plan.connect_timeout_s,
                )
                try:
                    # Frames are handled in picows' callback while the receiver is parked.
                    ws.set_fast_path(functools.partial(self._on_fast_frame, ws))
                    await ws.send(self.writer.connected())
                    await ws.send(self.writer.start(parameters))
                    receiver = asyncio.create_task(self._receive(ws))
                    try:
                        await self._talk(ws)
                        await ws.send(self.writer.stop())
                    finally:
                        receiver.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await receiver
                finally:
                    await ws.close()
        except TimeoutError:
            result.errors.append("call did not finish in time")
        except ConnectionClosed as exc:
            result.errors.append(f"media socket closed early: {exc}")
        except (InvalidHandshake, OSError, httpx.HTTPError, CallRefused) as exc:
            result.errors.append(f"{type(exc).__name__}: {exc}")
        result.ended_at = time.monotonic()
        return result

    async def _answer(self, http: httpx.AsyncClient) -> tuple[str, dict[str, str], str]:
        plan = self.plan
        caller = f"{plan.from_prefix}{self.index % 10_000_000:07d}"
        params = {
            "AccountSid": self.writer.account_sid,
            "ApiVersion": API_VERSION,
            "CallSid": self.writer.call_sid,
            "CallStatus": "ringing",
            "Direction": "inbound",
            "From": caller,
            "To": plan.to,
            "Caller": caller,
            "Called": plan.to,
        }
        validator = RequestValidator(plan.auth_token)
        webhook = plan.public_url.rstrip("/") + "/voice/incoming"
        headers = {"X-Twilio-Signature": validator.compute_signature(webhook, params)}
        reply = await http.post(
            plan.server_url.rstrip("/") + "/voice/incoming", data=params, headers=headers
        )
        if reply.status_code != 200:
            raise CallRefused(f"/voice/incoming answered {reply.status_code}")
        stream = parse_twiml(reply.text)
        if stream is None:
            raise CallRefused(f"no <Connect><Stream> in the TwiML: {reply.text[:200]!r}")
        # Connect where the server listens, on the TwiML's path (like the caller's tunnel rule).
        server = urlsplit(plan.server_url)
        scheme = "wss" if server.scheme == "https" else "ws"
        path = urlsplit(stream.url).path
        url = urlunsplit((scheme, server.netloc, path, "", ""))
        return url, stream.parameters, validator.compute_signature(stream.url, {})

    async def _talk(self, ws: RealtimeConnection) -> None:
        """Send one frame per 20 ms tick and play 20 ms of returned audio (bounded count)."""
        plan, result, frames = self.plan, self.result, self.frames
        measured = plan.measured_frames
        extra = round(plan.barge_in_wait_s * 1000 / FRAME_MS) if plan.barge_in else 0
        loop = asyncio.get_running_loop()
        tick = FRAME_MS / 1000.0
        deadline = loop.time()
        result.streaming_at = time.monotonic()
        for k in range(measured + extra):
            if k >= measured and (self._cleared.is_set() or self._closed.is_set()):
                break
            if self._closed.is_set():
                result.errors.append("server closed the media socket during the call")
                return
            self._play_one_frame(ws)
            self.sent_at.append(time.monotonic())
            if not ws.send_nowait(self.writer.media(frames[k % len(frames)])):
                result.errors.append("server closed the media socket during the call")
                return
            result.frames_sent += 1
            if k < measured:
                result.sent_bytes += FRAME_BYTES
                result.measured_until = self.sent_at[k]
            # Like a phone line: never burst to catch up; count the ticks the generator lost.
            now = loop.time()
            if now - deadline > tick:
                result.late_ticks += 1
            deadline = max(deadline + tick, now - tick)
            await asyncio.sleep(max(0.0, deadline - loop.time()))
        if plan.barge_in and not self._cleared.is_set():
            result.errors.append("no clear after the barge-in")

    def _play_one_frame(self, ws: RealtimeConnection) -> None:
        _, reached = self.playout.play(FRAME_BYTES)
        for name, _position in reached:
            self.result.marks_acked += 1
            ws.send_nowait(self.writer.mark(name))

    async def _receive(self, ws: RealtimeConnection) -> None:
        """Frames the fast path did not take (while this task was not parked), in order."""
        try:
            async for frame in ws:
                self._on_frame(ws, frame)
        except ConnectionClosed:
            pass
        self._closed.set()

    def _on_fast_frame(self, ws: RealtimeConnection, frame: bytes) -> bool:
        try:
            self._on_frame(ws, frame)
        except Exception as exc:  # picows would fail the connection: record it instead
            self.result.errors.append(f"load caller failed on a frame: {exc!r}")
        return True

    def _on_frame(self, ws: RealtimeConnection, frame: bytes) -> None:
        now = time.monotonic()
        result = self.result
        try:
            message = orjson.loads(frame)
            event = message["event"]
            if event == "media":
                ulaw = binascii.a2b_base64(message["media"]["payload"], strict_mode=True)
            elif event == "mark":
                name = message["mark"]["name"]
        except (orjson.JSONDecodeError, KeyError, TypeError, binascii.Error) as exc:
            result.errors.append(f"bad frame from the server: {exc!r}")
            return
        if event == "media":
            self._returned(ulaw, now)
            self.playout.add_media(ulaw)
        elif event == "mark":
            result.marks_received += 1
            for echoed in self.playout.add_mark(name):
                result.marks_acked += 1
                ws.send_nowait(self.writer.mark(echoed))
        elif event == "clear":
            measured = self.plan.measured_frames
            if len(self.sent_at) >= measured:
                result.clear_after_ms = (now - self.sent_at[measured - 1]) * 1000.0
            else:
                result.errors.append("clear before the barge-in")
            self._cleared.set()
            for echoed in self.playout.clear():
                result.marks_acked += 1
                ws.send_nowait(self.writer.mark(echoed))
        else:
            result.errors.append(f"unexpected event {event!r} from the server")

    def _returned(self, ulaw: bytes, now: float) -> None:
        """Latency of every sent frame whose last byte came back in this chunk.

        By byte position: frame f is back when returned byte 160 f + 159 is, so audio a server
        held back to batch it shows up as latency of the frames it held.
        """
        result = self.result
        start = self._received
        self._received = end = start + len(ulaw)
        # Bytes past the measured audio (the barge-in tail) are not counted.
        counted = min(end, self.plan.measured_frames * FRAME_BYTES) - start
        if counted <= 0:
            return
        result.returned_bytes += counted
        sent_at = self.sent_at
        for frame in range(start // FRAME_BYTES, (start + counted) // FRAME_BYTES):
            if frame >= len(sent_at):
                result.ahead += 1
                return
            result.latencies_ms.append((now - sent_at[frame]) * 1000.0)


class CallRefused(Exception):
    """The server did not answer the call with a media stream."""


# --- a run of many callers ----------------------------------------------------------------------


@dataclass(slots=True)
class Progress:
    started: int = 0
    streaming: int = 0
    finished: int = 0
    failed: int = 0


async def run_load(
    plan: LoadPlan,
    calls: int,
    *,
    ramp_s: float = 2.0,
    on_progress: Callable[[Progress, float], None] | None = None,
    progress_every_s: float = 1.0,
) -> list[CallResult]:
    """Run `calls` callers, starts spread evenly over `ramp_s`; every caller is time-bounded."""
    if calls < 1:
        raise ValueError("calls must be at least 1")
    frames = speech_frames()
    callers = [LoadCaller(i, plan, frames) for i in range(calls)]
    progress = Progress()
    limit = ramp_s + plan.duration_s + plan.barge_in_wait_s + plan.connect_timeout_s + 15.0
    stop_at = time.monotonic() + limit
    spacing = ramp_s / calls

    async def one(caller: LoadCaller, http: httpx.AsyncClient) -> CallResult:
        await asyncio.sleep(caller.index * spacing)
        progress.started += 1
        result = await caller.run(http, stop_at)
        progress.finished += 1
        progress.failed += bool(result.errors)
        return result

    limits = httpx.Limits(max_connections=min(calls, 200), max_keepalive_connections=20)
    async with httpx.AsyncClient(timeout=plan.connect_timeout_s, limits=limits) as http:
        tasks = [asyncio.create_task(one(c, http)) for c in callers]
        began = time.monotonic()
        ticks = int(limit / progress_every_s) + 2
        for _ in range(ticks):  # bounded: the callers themselves stop by `stop_at`
            done, _pending = await asyncio.wait(tasks, timeout=progress_every_s)
            progress.streaming = sum(
                1 for c in callers if c.result.streaming_at and not c.result.ended_at
            )
            if on_progress is not None:
                on_progress(progress, time.monotonic() - began)
            if len(done) == len(tasks):
                break
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    return [r if isinstance(r, CallResult) else _crashed(i, r) for i, r in enumerate(results)]


def _crashed(index: int, error: BaseException) -> CallResult:
    result = CallResult(index)
    result.errors.append(f"caller crashed: {error!r}")
    return result


# --- the emulator side: echo with a timed barge-in -----------------------------------------------


@dataclass(slots=True)
class EmulatorStats:
    sessions: int = 0
    barge_ins: int = 0
    # speech_started sent -> response.cancel received (the bridge sends `clear` just before)
    reaction_ms: list[float] = field(default_factory=list)
    errors_sent: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "sessions": self.sessions,
            "barge_ins": self.barge_ins,
            "reaction_ms": self.reaction_ms,
            "errors_sent": self.errors_sent,
        }


class LoadEchoSession(EmulatorSession):
    """Echo session for load tests: no greeting audio, one timed barge-in (see module doc)."""

    def __init__(self, stats: EmulatorStats, barge_in_at_ms: float | None) -> None:
        super().__init__(
            BUILTINS["echo"],
            SessionRecord(index=stats.sessions, model="load", scenario="echo"),
            keep_events=False,
            echo=True,
        )
        self._stats = stats
        self._barge_in_at_ms = barge_in_at_ms
        self._barge_in_sent_at: float | None = None

    def _echo_append(self, event: dict[str, Any]) -> None:
        super()._echo_append(event)
        at = self._barge_in_at_ms
        if at is not None and self._input_ms >= at and self._response is not None:
            self._barge_in_at_ms = None
            self._speech_item = self._new_id("item")
            self._emit(
                {
                    "type": "input_audio_buffer.speech_started",
                    "audio_start_ms": round(self._input_ms),
                    "item_id": self._speech_item,
                }
            )
            self._stats.barge_ins += 1
            self._barge_in_sent_at = time.monotonic()

    def _on_response_cancel(self, event: dict[str, Any]) -> None:
        if self._barge_in_sent_at is not None:
            elapsed = (time.monotonic() - self._barge_in_sent_at) * 1000.0
            self._stats.reaction_ms.append(elapsed)
            self._barge_in_sent_at = None
        super()._on_response_cancel(event)

    def _start_response(
        self, options: dict[str, Any], *, after_created: list[dict[str, Any]] | None = None
    ) -> None:
        # The bridge's greeting: created and completed with no audio, so that from the first
        # appended frame on, every byte the caller sends comes back.
        response = self._new_response(options)
        self._emit(
            {"type": "response.created", "response": self._response_object(response, "in_progress")}
        )
        for extra in after_created or ():
            self._emit(extra)
        self._finish_response(response, "completed")

    def _emit_error(self, message: str, **kwargs: Any) -> None:
        self._stats.errors_sent += 1
        super()._emit_error(message, **kwargs)

    # The base class dispatches client events through a class-level table of its own methods.
    _HANDLERS: ClassVar[dict[str, Callable[[EmulatorSession, dict[str, Any]], None]]] = {
        **EmulatorSession._HANDLERS,
        "response.cancel": _on_response_cancel,  # type: ignore[dict-item]
    }


class LoadEchoListener(WSListener):
    """One echo session served on picows: each whole frame in, the session's frames out.

    The session is sans-I/O (bytes in, frames out), so serving it is a callback: no task, no
    queue, no wakeup per message (websockets' asyncio server cost the emulator more CPU than
    the server it helps to measure). The bridge never fragments a message; a fragment is
    refused with a close frame rather than reassembled.
    """

    def __init__(self, stats: EmulatorStats, barge_in_at_ms: float | None) -> None:
        self._stats = stats
        self._session = LoadEchoSession(stats, barge_in_at_ms)

    def on_ws_connected(self, transport: WSTransport) -> None:
        self._stats.sessions += 1
        self._session.open()
        self._flush(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type is WSMsgType.TEXT or msg_type is WSMsgType.BINARY:
            if not frame.fin:
                self._close(transport, WSCloseCode.UNSUPPORTED_DATA, "fragmented message")
                return
            if self._session.close_request is None:
                self._session.receive(frame.get_payload_as_bytes())
                self._flush(transport)
        elif msg_type is WSMsgType.CONTINUATION:
            self._close(transport, WSCloseCode.UNSUPPORTED_DATA, "fragmented message")
        elif msg_type is WSMsgType.CLOSE:
            code = frame.get_close_code()
            self._close(transport, WSCloseCode.OK if code == WSCloseCode.NO_INFO else code, "")
        # PING is answered by picows; PONG needs nothing.

    def _flush(self, transport: WSTransport) -> None:
        for out in self._session.data_to_send():
            transport.send(WSMsgType.TEXT, out)
        request = self._session.close_request
        if request is not None:
            self._close(transport, *request)

    @staticmethod
    def _close(transport: WSTransport, code: int, reason: str) -> None:
        if not transport.is_close_frame_sent:
            transport.send_close(code, reason.encode())
        transport.disconnect()  # graceful: what was sent goes out first

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        handshake = transport.close_handshake
        received = handshake.recv if handshake is not None else None
        self._session.connection_closed(received.code if received is not None else None)


async def serve_load_emulator(
    host: str, port: int, barge_in_at_ms: float | None, commands: asyncio.StreamReader
) -> None:
    """Serve echo sessions; answer `stats`/`reset` lines on `commands` until `quit` or EOF."""
    stats = EmulatorStats()
    server = await ws_create_server(
        lambda request: LoadEchoListener(stats, barge_in_at_ms),
        host,
        port,
        max_frame_size=MAX_FRAME_BYTES,
    )
    async with server:
        bound = server.sockets[0].getsockname()
        _reply({"url": f"ws://{bound[0]}:{bound[1]}{REALTIME_PATH}"})
        for _ in range(100_000):  # bounded: one line per command
            line = (await commands.readline()).decode().strip()
            if line == "stats":
                _reply(stats.as_dict())
            elif line == "reset":
                _reply(_reset(stats).as_dict())
            elif line in ("quit", ""):
                return


def _reset(stats: EmulatorStats) -> EmulatorStats:
    stats.barge_ins = 0
    stats.reaction_ms = []
    stats.errors_sent = 0
    return stats


def _reply(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


async def _emulator_main(host: str, port: int, barge_in_at_ms: float | None) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await serve_load_emulator(host, port, barge_in_at_ms, reader)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Load-test echo emulator (one process).")
    sub = parser.add_subparsers(dest="command", required=True)
    emu = sub.add_parser("emulator")
    emu.add_argument("--host", default="127.0.0.1")
    emu.add_argument("--port", type=int, default=0)
    emu.add_argument("--barge-in-at-ms", type=float, default=None)
    emu.add_argument("--cpu", type=int, action="append", default=None)
    args = parser.parse_args(argv)
    if args.cpu:
        with contextlib.suppress(OSError, AttributeError):
            import os

            os.sched_setaffinity(0, set(args.cpu))
    # Everything imported so far lives as long as the process: out of the collector's sight,
    # its full collections do not walk it again and again while sessions allocate events.
    gc.collect()
    gc.freeze()
    run = _event_loop_runner()
    run(_emulator_main(args.host, args.port, args.barge_in_at_ms))


def _event_loop_runner() -> Callable[[Any], Any]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] installs it
        return asyncio.run
    return uvloop.run


if __name__ == "__main__":
    main()
