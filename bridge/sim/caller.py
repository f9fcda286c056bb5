"""A simulated Twilio caller: places a call against our server the way Twilio would.

`place_call` posts the signed `/voice/incoming` webhook, reads the TwiML, opens the
`<Connect><Stream>` WebSocket and behaves like Twilio's side of a Media Stream: `connected`,
`start` (with the TwiML's `<Parameter>`s), a 20 ms `media` frame of the caller's line every
20 ms (speech from the script, silence between), `dtmf`, and `stop` at the end. What our server
sends back is checked as strictly as Twilio does (anything but well-formed `media` / `mark` /
`clear` is a protocol error, Twilio's 31924) and played out on Twilio's terms: audio is queued
and played on a real-time clock, a `mark` is echoed when playback reaches it, `clear` drops the
queue and echoes every mark still in it.

`pace` scales the clock: 1.0 is real time, 0.5 twice as fast, and 0 as fast as possible
(for tests: frames go out back to back, received audio counts as played on arrival).

The queue and the caller's line are sans-I/O (`Playout`, `Line`); `place_call` moves bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from xml.etree import ElementTree

import httpx
from twilio.request_validator import RequestValidator
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from bridge import twilio_media as tw
from bridge.audio import ulaw_to_pcm16
from bridge.sim import voice
from bridge.sim.wav import read_wav_as_ulaw, write_wav

FRAME_MS = 20
FRAME_BYTES = 160  # 20 ms of 8 kHz mu-law
SILENCE_BYTE = 0xFF  # mu-law zero
SILENCE_FRAME = bytes([SILENCE_BYTE]) * FRAME_BYTES
DTMF_GAP_MS = 100  # line silence after each key press
FAST_SPEECH_TAIL_MS = 1000  # pace 0: the silence a real line would carry after speech
AGENT_PAUSE_MS = 300  # playback idle this long ends an agent utterance (in the timeline)
API_VERSION = "2010-04-01"


class CallFailed(RuntimeError):
    """The call could not be placed (webhook refused, TwiML unusable, socket refused)."""


# --- the caller's script -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WaitForAgent:
    """Wait until the agent has spoken and gone quiet (its audio stopped arriving and playing)."""

    max_s: float = 20.0
    quiet_s: float = 0.8


@dataclass(frozen=True, slots=True)
class WaitForAgentToStart:
    """Wait until the agent's audio starts playing (for talking over it)."""

    max_s: float = 20.0


@dataclass(frozen=True, slots=True)
class Speak:
    """Say something: `ms` of synthetic speech, or the audio of a WAV file."""

    ms: int = 0
    wav: Path | None = None


@dataclass(frozen=True, slots=True)
class Dtmf:
    digits: str


@dataclass(frozen=True, slots=True)
class Silence:
    ms: int


@dataclass(frozen=True, slots=True)
class HangUp:
    pass


CallerStep = WaitForAgent | WaitForAgentToStart | Speak | Dtmf | Silence | HangUp


def wait_for_agent(max_s: float = 20.0, *, quiet_s: float = 0.8) -> WaitForAgent:
    return WaitForAgent(max_s, quiet_s)


def wait_for_agent_to_start(max_s: float = 20.0) -> WaitForAgentToStart:
    return WaitForAgentToStart(max_s)


def speak(what: int | Path | str) -> Speak:
    """`speak(2500)`: 2.5 s of synthetic speech; `speak(Path("hello.wav"))`: a recording."""
    if isinstance(what, int):
        if what <= 0:
            raise ValueError("speak(ms) needs a positive duration")
        return Speak(ms=what)
    return Speak(wav=Path(what))


def dtmf(digits: str) -> Dtmf:
    bad = [d for d in digits if d not in tw.DTMF_DIGITS]
    if not digits or bad:
        raise ValueError(f"dtmf digits must be 0-9 * # A-D, got {digits!r}")
    return Dtmf(digits)


def silence(ms: int) -> Silence:
    if ms < 0:
        raise ValueError("silence(ms) needs a non-negative duration")
    return Silence(ms)


def hang_up() -> HangUp:
    return HangUp()


@dataclass(frozen=True, slots=True)
class CallerScript:
    name: str
    steps: tuple[CallerStep, ...]


# Pairs with the emulator's `demo` scenario: greeting, the lead, the summary, "yes please".
DEMO_SCRIPT = CallerScript(
    "demo",
    (
        wait_for_agent(),
        speak(4000),
        wait_for_agent(30.0),
        speak(1000),
        wait_for_agent(30.0),
        hang_up(),
    ),
)

# Pairs with the emulator's `barge_in` scenario: asks, then talks over the long answer.
BARGE_IN_SCRIPT = CallerScript(
    "barge_in",
    (
        wait_for_agent(),
        speak(1500),
        wait_for_agent_to_start(30.0),
        silence(1500),
        speak(2000),
        wait_for_agent(30.0),
        hang_up(),
    ),
)

ECHO_SCRIPT = CallerScript("echo", (speak(2000), wait_for_agent(10.0), hang_up()))

CALLER_SCRIPTS: dict[str, CallerScript] = {
    s.name: s for s in (DEMO_SCRIPT, BARGE_IN_SCRIPT, ECHO_SCRIPT)
}


# --- Twilio's playback queue (sans-I/O) --------------------------------------------------------


class Playout:
    """The outbound audio queue of one stream, played on a clock its owner advances.

    The head of the queue is always audio (marks are released as soon as playback reaches
    them), so a mark sent while nothing is queued is echoed at once, as Twilio does.
    """

    def __init__(self) -> None:
        self._queue: deque[bytes | str] = deque()
        self.queued_bytes = 0
        self.played_bytes = 0
        self.discarded_bytes = 0

    @property
    def queued_ms(self) -> float:
        return self.queued_bytes / tw.MULAW_BYTES_PER_MS

    @property
    def played_ms(self) -> float:
        return self.played_bytes / tw.MULAW_BYTES_PER_MS

    def add_media(self, ulaw: bytes) -> None:
        if ulaw:
            self._queue.append(ulaw)
            self.queued_bytes += len(ulaw)

    def add_mark(self, name: str) -> list[str]:
        """Queue a mark; returns it at once (to echo now) when no audio is ahead of it."""
        if not self._queue:
            return [name]
        self._queue.append(name)
        return []

    def clear(self) -> list[str]:
        """Drop the queued audio; returns every mark that was still queued (to echo now)."""
        marks = [entry for entry in self._queue if isinstance(entry, str)]
        self.discarded_bytes += self.queued_bytes
        self._queue.clear()
        self.queued_bytes = 0
        return marks

    def play(self, n_bytes: int) -> tuple[bytes, list[tuple[str, float]]]:
        """Play up to `n_bytes` of queued audio.

        Returns the audio played and the marks playback reached, each with its position
        (ms of audio played when it was reached; a mark can sit inside the played span).
        """
        played = bytearray()
        reached: list[tuple[str, float]] = []
        while self._queue and len(played) < n_bytes:
            head = self._queue[0]
            assert isinstance(head, bytes)
            take = n_bytes - len(played)
            if len(head) <= take:
                played += head
                self._queue.popleft()
            else:
                played += head[:take]
                self._queue[0] = head[take:]
            while self._queue and isinstance(self._queue[0], str):
                position = (self.played_bytes + len(played)) / tw.MULAW_BYTES_PER_MS
                reached.append((self._queue.popleft(), position))  # type: ignore[arg-type]
        self.queued_bytes -= len(played)
        self.played_bytes += len(played)
        return bytes(played), reached


# --- the caller's line (sans-I/O) --------------------------------------------------------------


class Line:
    """What the caller's phone sends next: 20 ms frames of queued speech/silence, key presses."""

    def __init__(self) -> None:
        self._queue: deque[bytes | str] = deque()

    @property
    def idle(self) -> bool:
        return not self._queue

    def say(self, ulaw: bytes) -> None:
        """Queue audio as whole 20 ms frames (the last one padded with silence)."""
        for start in range(0, len(ulaw), FRAME_BYTES):
            frame = ulaw[start : start + FRAME_BYTES]
            if len(frame) < FRAME_BYTES:
                frame += bytes([SILENCE_BYTE]) * (FRAME_BYTES - len(frame))
            self._queue.append(frame)

    def press(self, digit: str) -> None:
        self._queue.append(digit)

    def next(self) -> bytes | str | None:
        """The next frame (bytes) or key press (str); None when nothing is queued."""
        return self._queue.popleft() if self._queue else None


# --- the report --------------------------------------------------------------------------------


@dataclass(slots=True)
class CallReport:
    call_sid: str
    twiml: str = ""
    stream_url: str | None = None
    stream_sid: str | None = None
    custom_parameters: dict[str, str] = field(default_factory=dict)
    events: list[tuple[float, str]] = field(default_factory=list)
    audio_sent_ms: float = 0.0
    audio_received_ms: float = 0.0
    audio_played_ms: float = 0.0
    audio_cleared_ms: float = 0.0
    marks_received: list[str] = field(default_factory=list)
    marks_echoed: list[str] = field(default_factory=list)
    # name -> ms of audio played when the mark was echoed (where in playback it sat)
    mark_positions: dict[str, float] = field(default_factory=dict)
    marks_flushed: list[str] = field(default_factory=list)  # echoed because of a clear
    clears: list[float] = field(default_factory=list)  # ms of audio played at each clear
    dtmf_sent: str = ""
    violations: list[str] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str = ""
    closed_by: str = ""  # "server" or "caller"
    recording: Path | None = None

    def summary(self) -> str:
        lines = [
            f"Call {self.call_sid}"
            + (f", stream {self.stream_sid}" if self.stream_sid else ", no media stream"),
        ]
        if self.stream_url:
            params = ", ".join(f"{k}={v}" for k, v in self.custom_parameters.items())
            lines.append(f"  stream: {self.stream_url}" + (f" ({params})" if params else ""))
        lines += [
            f"  audio: sent {self.audio_sent_ms / 1000:.2f} s, received "
            f"{self.audio_received_ms / 1000:.2f} s, played {self.audio_played_ms / 1000:.2f} s, "
            f"cleared {self.audio_cleared_ms / 1000:.2f} s",
            f"  marks: {len(self.marks_received)} received, {len(self.marks_echoed)} echoed "
            f"({len(self.marks_flushed)} by clear); clears: {len(self.clears)}",
            f"  violations: {len(self.violations)}"
            + "".join(f"\n    - {v}" for v in self.violations[:20]),
            f"  websocket closed by {self.closed_by or '?'}: {self.close_code} "
            f"{self.close_reason!r}",
        ]
        if self.recording:
            lines.append(f"  recording: {self.recording}")
        lines.append("  timeline:")
        lines += [f"    {t:8.3f} s  {text}" for t, text in self.events]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


# --- placing the call --------------------------------------------------------------------------


def new_sid(prefix: str) -> str:
    """A Twilio-shaped SID: two letters and 32 hex digits."""
    return prefix + secrets.token_hex(16)


@dataclass(frozen=True, slots=True)
class StreamInstruction:
    url: str
    parameters: dict[str, str]


def parse_twiml(twiml: str) -> StreamInstruction | None:
    """The `<Connect><Stream>` of a TwiML document, or None when it has none."""
    try:
        root = ElementTree.fromstring(twiml)
    except ElementTree.ParseError as exc:
        raise CallFailed(f"the webhook answered with invalid XML: {exc}") from exc
    if root.tag != "Response":
        raise CallFailed(f"TwiML root element is <{root.tag}>, expected <Response>")
    stream = root.find("./Connect/Stream")
    if stream is None:
        return None
    url = stream.get("url")
    if not url:
        raise CallFailed("<Stream> has no url attribute")
    parameters = {}
    for parameter in stream.findall("./Parameter"):
        name, value = parameter.get("name"), parameter.get("value")
        if name is None or value is None:
            raise CallFailed("<Parameter> needs both name and value")
        parameters[name] = value
    return StreamInstruction(url, parameters)


def _websocket_form(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    return {"https": "wss", "http": "ws"}.get(scheme, scheme) + sep + rest


def _reachable_stream_url(stream_url: str, server_url: str, public_url: str) -> str:
    """Where to connect: the TwiML's URL, moved from the public origin to `server_url`.

    Behind a tunnel or proxy the TwiML names the public host; a local test caller reaches the
    same server directly. Like Twilio, it leaves any query string out.
    """
    public = urlsplit(_websocket_form(public_url))
    target = urlsplit(stream_url)
    if (target.scheme, target.netloc) != (public.scheme, public.netloc):
        return urlunsplit(target._replace(query="", fragment=""))  # Twilio drops queries
    server = urlsplit(_websocket_form(server_url))
    path = target.path
    if public.path.rstrip("/") and path.startswith(public.path.rstrip("/")):
        path = path[len(public.path.rstrip("/")) :]
    return urlunsplit((server.scheme, server.netloc, server.path.rstrip("/") + path, "", ""))


async def place_call(
    *,
    server_url: str,
    auth_token: str,
    to: str,
    from_: str,
    script: CallerScript = DEMO_SCRIPT,
    call_sid: str | None = None,
    record_wav: Path | None = None,
    pace: float = 1.0,
    public_url: str | None = None,
    account_sid: str | None = None,
) -> CallReport:
    """Place one simulated inbound call and return what happened on it."""
    if pace < 0:
        raise ValueError("pace must be >= 0")
    server_url = server_url.rstrip("/")
    public_url = (public_url or server_url).rstrip("/")
    call_sid = call_sid or new_sid("CA")
    account_sid = account_sid or new_sid("AC")
    report = CallReport(call_sid=call_sid)
    started = time.monotonic()

    def note(text: str) -> None:
        report.events.append((time.monotonic() - started, text))

    params = {
        "AccountSid": account_sid,
        "ApiVersion": API_VERSION,
        "CallSid": call_sid,
        "CallStatus": "ringing",
        "Called": to,
        "Caller": from_,
        "Direction": "inbound",
        "From": from_,
        "To": to,
        "CallerCountry": "US",
        "CalledCountry": "US",
    }
    validator = RequestValidator(auth_token)
    webhook = f"{public_url}/voice/incoming"
    headers = {"X-Twilio-Signature": validator.compute_signature(webhook, params)}
    async with httpx.AsyncClient(timeout=15.0) as http:
        try:
            reply = await http.post(f"{server_url}/voice/incoming", data=params, headers=headers)
        except httpx.HTTPError as exc:
            raise CallFailed(f"POST {server_url}/voice/incoming failed: {exc!r}") from exc
    note(f"POST /voice/incoming -> {reply.status_code}")
    if reply.status_code != 200:
        raise CallFailed(
            f"POST {server_url}/voice/incoming answered {reply.status_code}: {reply.text[:300]!r}"
        )
    report.twiml = reply.text
    stream = parse_twiml(reply.text)
    if stream is None:
        note("TwiML has no <Connect><Stream>; the call ends after its verbs")
        return report
    report.stream_url = stream.url
    report.custom_parameters = stream.parameters
    if urlsplit(stream.url).query:
        report.violations.append(
            f"<Stream url> has a query string, which Twilio drops (31920): {stream.url}"
        )
    if not stream.url.startswith("wss://"):
        note(f"note: Twilio requires wss:// stream URLs (31922); connecting to {stream.url}")

    call = _Call(
        report=report,
        note=note,
        account_sid=account_sid,
        script=script,
        pace=pace,
    )
    url = _reachable_stream_url(stream.url, server_url, public_url)
    # Twilio may sign the upgrade (unsettled, see PROTOCOLS.md A.7): over the URL it opened.
    upgrade_signature = validator.compute_signature(stream.url, {})
    try:
        ws = await connect(
            url,
            additional_headers={"X-Twilio-Signature": upgrade_signature},
            compression=None,
            open_timeout=10,
        )
    except (InvalidHandshake, OSError, TimeoutError) as exc:
        raise CallFailed(f"media stream {url} refused: {exc!r}") from exc
    note(f"websocket open: {url}")
    try:
        async with ws:
            await call.run(ws, stream.parameters)
    finally:
        report.audio_played_ms = call.playout.played_ms
        report.audio_cleared_ms = call.playout.discarded_bytes / tw.MULAW_BYTES_PER_MS
        if record_wav is not None and call.played:
            write_wav(record_wav, ulaw_to_pcm16(bytes(call.played)))
            report.recording = record_wav
    return report


class _Call:
    """One media stream from Twilio's side: the asyncio layer around `Line` and `Playout`."""

    def __init__(
        self,
        *,
        report: CallReport,
        note: Callable[[str], None],
        account_sid: str,
        script: CallerScript,
        pace: float,
    ) -> None:
        self.report = report
        self.note = note
        self.script = script
        self.pace = pace
        self.writer = tw.TwilioStreamWriter(new_sid("MZ"), report.call_sid, account_sid)
        report.stream_sid = self.writer.stream_sid
        self.line = Line()
        self.playout = Playout()
        self.played = bytearray()  # the recording: what the caller heard, in order
        self._send_lock = asyncio.Lock()
        self._ws: ClientConnection | None = None
        self._closed = asyncio.Event()
        self._line_drained = asyncio.Event()
        self._line_drained.set()
        self._line_wakeup = asyncio.Event()
        self._activity = asyncio.Event()  # agent audio arrived or playback moved
        self._last_media_at = 0.0
        self._media_count = 0
        self._agent_talking = False

    # -- sending ---------------------------------------------------------------------------
    async def _send(self, frame: str) -> bool:
        if self._closed.is_set() or self._ws is None:
            return False
        try:
            await self._ws.send(frame)
        except ConnectionClosed:
            self._socket_closed()
            return False
        return True

    async def _send_built(self, build: Callable[..., str], *args: Any) -> bool:
        # Build and send under one lock so sequenceNumbers reach the server in order.
        async with self._send_lock:
            return await self._send(build(*args))

    async def _echo_marks(self, names: list[str], *, flushed: bool) -> None:
        position = self.playout.played_ms
        await self._echo_marks_at([(name, position) for name in names], flushed=flushed)

    async def _echo_marks_at(self, marks: list[tuple[str, float]], *, flushed: bool) -> None:
        for name, position in marks:
            self.report.marks_echoed.append(name)
            self.report.mark_positions[name] = position
            if flushed:
                self.report.marks_flushed.append(name)
            await self._send_built(self.writer.mark, name)

    # -- the three tasks -------------------------------------------------------------------
    async def run(self, ws: ClientConnection, parameters: dict[str, str]) -> None:
        self._ws = ws
        await self._send_built(self.writer.connected)
        await self._send_built(self.writer.start, parameters)
        self.note(f"sent connected + start (stream {self.writer.stream_sid})")
        tasks = [
            asyncio.create_task(self._receive()),
            asyncio.create_task(self._clock() if self.pace > 0 else self._fast_line()),
        ]
        script = asyncio.create_task(self._run_script())
        closed = asyncio.create_task(self._closed.wait())
        try:
            await asyncio.wait({script, closed}, return_when=asyncio.FIRST_COMPLETED)
            if script.done() and script.exception() is not None:
                raise script.exception()  # type: ignore[misc]
            if not self._closed.is_set():
                await self._hang_up()
        finally:
            for task in (*tasks, script, closed):
                task.cancel()
            for task in (*tasks, script, closed):
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await task

    async def _receive(self) -> None:
        assert self._ws is not None
        try:
            async for frame in self._ws:
                await self._on_frame(frame)
        except ConnectionClosed:
            pass
        self._socket_closed()

    async def _on_frame(self, frame: str | bytes) -> None:
        event = tw.parse_outbound(frame)
        if isinstance(event, tw.Malformed):
            self._violation(event.reason)
        elif event.stream_sid != self.writer.stream_sid:
            self._violation(f"streamSid {event.stream_sid!r} is not this stream's")
        elif isinstance(event, tw.OutboundMedia):
            await self._on_media(event.ulaw)
        elif isinstance(event, tw.OutboundMark):
            self.report.marks_received.append(event.name)
            await self._echo_marks(self.playout.add_mark(event.name), flushed=False)
        else:
            await self._on_clear()
        self._activity.set()

    def _violation(self, problem: str) -> None:
        self.report.violations.append(problem)
        self.note(f"protocol violation: {problem}")

    async def _on_media(self, ulaw: bytes) -> None:
        self.report.audio_received_ms += len(ulaw) / tw.MULAW_BYTES_PER_MS
        self._last_media_at = time.monotonic()
        self._media_count += 1
        if not self._agent_talking:
            self._agent_talking = True
            self.note(f"agent audio starts (played so far {self.playout.played_ms:.0f} ms)")
        self.playout.add_media(ulaw)
        if self.pace == 0:
            await self._play(self.playout.queued_bytes)

    async def _on_clear(self) -> None:
        at = self.playout.played_ms
        queued = self.playout.queued_ms
        flushed = self.playout.clear()
        self.report.clears.append(at)
        self.note(
            f"clear at {at:.0f} ms played: dropped {queued:.0f} ms, echoing {len(flushed)} mark(s)"
        )
        await self._echo_marks(flushed, flushed=True)
        self._agent_stopped()

    async def _play(self, n_bytes: int) -> int:
        """Play up to `n_bytes`, echo the marks reached; returns how many bytes were played."""
        audio, reached = self.playout.play(n_bytes)
        self.played += audio
        self._activity.set()
        if reached:
            await self._echo_marks_at(reached, flushed=False)
        return len(audio)

    def _agent_stopped(self) -> None:
        if self._agent_talking:
            self._agent_talking = False
            self.note(f"agent audio stops (played {self.playout.played_ms:.0f} ms)")

    async def _clock(self) -> None:
        """Real-time (x pace) 20 ms ticks: one frame of the caller's line, 20 ms of playback."""
        loop = asyncio.get_running_loop()
        tick = FRAME_MS / 1000.0 * self.pace
        deadline = loop.time()
        idle_ms = 0
        while not self._closed.is_set():
            await self._send_line_frame(filler=True)
            played = await self._play(FRAME_BYTES)
            if played < FRAME_BYTES:
                # Nothing (or not enough) to play: the caller hears the line's silence.
                self.played += bytes([SILENCE_BYTE]) * (FRAME_BYTES - played)
            if played:
                idle_ms = 0
            else:
                idle_ms += FRAME_MS
                if idle_ms >= AGENT_PAUSE_MS:
                    self._agent_stopped()
            # A phone line does not catch up on time it lost: when this loop falls behind (a
            # busy event loop), skip the missed ticks rather than burst through them.
            deadline = max(deadline + tick, loop.time() - tick)
            await asyncio.sleep(max(0.0, deadline - loop.time()))

    async def _fast_line(self) -> None:
        """pace 0: queued frames go out back to back; an idle line sends nothing."""
        while not self._closed.is_set():
            await self._line_wakeup.wait()
            self._line_wakeup.clear()
            while not self.line.idle and not self._closed.is_set():
                await self._send_line_frame(filler=False)
                await asyncio.sleep(0)
            self._line_drained.set()

    async def _send_line_frame(self, *, filler: bool) -> None:
        entry = self.line.next()
        while isinstance(entry, str):
            self.report.dtmf_sent += entry
            self.note(f"dtmf {entry}")
            await self._send_built(self.writer.dtmf, entry)
            entry = self.line.next()
        if entry is None:
            self._line_drained.set()
            if not filler:
                return
            entry = SILENCE_FRAME
        if await self._send_built(self.writer.media, entry):
            self.report.audio_sent_ms += FRAME_MS

    # -- the script ------------------------------------------------------------------------
    async def _run_script(self) -> None:
        for step in self.script.steps:
            if self._closed.is_set():
                return
            if isinstance(step, HangUp):
                await self._hang_up()
                return
            await self._run_step(step)

    async def _run_step(self, step: CallerStep) -> None:
        if isinstance(step, WaitForAgent):
            await self._wait_for_agent(step)
        elif isinstance(step, WaitForAgentToStart):
            await self._wait_for_agent_to_start(step)
        elif isinstance(step, Speak):
            audio = voice.caller_speech(step.ms) if step.wav is None else read_wav_as_ulaw(step.wav)
            what = f"{step.ms} ms of speech" if step.wav is None else str(step.wav)
            self.note(f"caller speaks: {what}")
            if self.pace == 0:
                audio += bytes([SILENCE_BYTE]) * (FAST_SPEECH_TAIL_MS * tw.MULAW_BYTES_PER_MS)
            await self._queue_and_drain(audio)
            self.note("caller stops speaking")
        elif isinstance(step, Dtmf):
            gap = bytes([SILENCE_BYTE]) * (DTMF_GAP_MS * tw.MULAW_BYTES_PER_MS)
            for digit in step.digits:
                self.line.press(digit)
                self.line.say(gap)
            await self._queue_and_drain(b"")
        elif isinstance(step, Silence):
            self.note(f"caller stays silent for {step.ms} ms")
            await self._queue_and_drain(bytes([SILENCE_BYTE]) * (step.ms * tw.MULAW_BYTES_PER_MS))

    async def _queue_and_drain(self, audio: bytes) -> None:
        self.line.say(audio)
        self._line_drained.clear()
        self._line_wakeup.set()
        await self._line_drained.wait()

    async def _wait_for_agent(self, step: WaitForAgent) -> None:
        """Until agent audio arrived (after now), played out, and `quiet_s` passed without more."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + step.max_s
        seen = self._media_count
        while True:
            now = time.monotonic()
            heard = self._media_count > seen
            quiet_for = now - self._last_media_at
            if heard and self.playout.queued_bytes == 0 and quiet_for >= step.quiet_s:
                self._agent_stopped()
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                self.note(
                    f"waited {step.max_s:.1f} s for the agent: "
                    + ("still talking" if heard else "it said nothing")
                )
                return
            # Re-check when something happens, or when the quiet period could be over.
            timeout = min(remaining, max(0.01, step.quiet_s - quiet_for) if heard else remaining)
            self._activity.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._activity.wait()

    async def _wait_for_agent_to_start(self, step: WaitForAgentToStart) -> None:
        seen = self._media_count
        try:
            async with asyncio.timeout(step.max_s):
                while self._media_count == seen:
                    self._activity.clear()
                    await self._activity.wait()
        except TimeoutError:
            self.note(f"waited {step.max_s:.1f} s for the agent to start talking")

    # -- ending ----------------------------------------------------------------------------
    async def _hang_up(self) -> None:
        if self._closed.is_set():
            return
        self.note("caller hangs up: stop")
        await self._send_built(self.writer.stop)
        if self._ws is not None and not self._closed.is_set():
            self.report.closed_by = "caller"
            await self._ws.close(1000, "call ended")
            self._socket_closed()

    def _socket_closed(self) -> None:
        if self._closed.is_set():
            return
        ws = self._ws
        if ws is not None:
            self.report.close_code = ws.close_code
            self.report.close_reason = ws.close_reason or ""
        if not self.report.closed_by:
            self.report.closed_by = "server"
        self.note(f"websocket closed: {self.report.close_code} {self.report.close_reason!r}")
        self._closed.set()
        self._activity.set()
        self._line_drained.set()
        self._line_wakeup.set()
