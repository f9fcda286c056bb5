"""Upstream faults: the Realtime side fails, the call does not.

Two layers:

- `CallSession` with scripted stand-ins for both sockets, to pin down exactly what is sent
  when a session drops with a tool still running, when an `error` event is fatal, when no
  new session can be had, and when the session is renewed before the 60-minute cap;
- whole calls with real processes: the Realtime emulator runs as its own process and is
  SIGKILLed mid-call (the call must survive on a new session), and a server whose Realtime
  URL refuses connections must apologise through Twilio's REST API, text the owner and
  record the missed call as a lead.

Every test prints what it injected and what was kept.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import orjson
import pytest
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from websockets.exceptions import ConnectionClosedError

from app.embedded import bind_loopback, running_server, wait_until
from app.fallback import (
    APOLOGY_MESSAGE,
    MISSED_CALL_NOTE,
    record_missed_call,
    redirect_to_apology,
)
from app.settings import Settings
from bridge import call as call_module
from bridge import realtime as rt
from bridge.call import CallSession, CallSetup, CallSummary
from bridge.sim.caller import CallerScript, hang_up, place_call, silence, speak, wait_for_agent
from bridge.sim.loopback_http import serve_loopback
from prompts.personas import render_instructions
from tests.e2e import AUTH_TOKEN, BUSINESS_NUMBER, CALLER_NUMBER
from tests.sdk_oracle import assert_valid_client_event, assert_valid_server_event
from tools import ToolContext
from tools.db.models import Call, Lead
from tools.registry import realtime_tools

ROOT = Path(__file__).resolve().parents[1]
OWNER_NUMBER = "+15005550100"  # acme-plumbing's owner in the demo profiles
ACCOUNT_SID = "AC" + "f" * 32


# == CallSession with scripted sockets =========================================================

_END = object()
_DROP = object()


class ScriptedUpstream:
    """A Realtime session the test scripts: frames to deliver, then a drop or a close."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sent: list[dict[str, Any]] = []
        self.closed = False
        self.close_code: int | None = None
        self._frames: asyncio.Queue[object] = asyncio.Queue()
        self.got_frame = asyncio.Event()

    def feed(self, event: dict[str, Any]) -> None:
        assert_valid_server_event(event)
        self._frames.put_nowait(orjson.dumps(event))

    def drop(self) -> None:
        """The connection dies without a close frame (the peer was killed)."""
        self._frames.put_nowait(_DROP)

    async def send(self, text: str) -> None:
        if self.closed:
            raise ConnectionClosedError(None, None)
        self.sent.append(orjson.loads(text))
        self.got_frame.set()

    def send_nowait(self, text: str) -> bool:
        # Upstream's synchronous send (the fast paths'; ScriptedTwilio has none, so unused).
        if self.closed:
            return False
        self.sent.append(orjson.loads(text))
        self.got_frame.set()
        return True

    @property
    def writable(self) -> bool:
        return not self.closed

    def __aiter__(self) -> ScriptedUpstream:
        return self

    async def __anext__(self) -> bytes:
        item = await self._frames.get()
        if item is _DROP:
            self.closed = True
            raise ConnectionClosedError(None, None)
        if item is _END:
            raise StopAsyncIteration
        assert isinstance(item, bytes)
        return item

    async def close(self) -> None:
        if not self.closed:
            self.closed, self.close_code = True, 1000
            self._frames.put_nowait(_END)

    def sent_types(self) -> list[str]:
        return [e["type"] for e in self.sent if e["type"] != "input_audio_buffer.append"]


class ScriptedTwilio:
    """Twilio's side of the media socket: the test pushes frames, the session's sends kept."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self._incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def media(self) -> None:
        payload = base64.b64encode(b"\xff" * 160).decode()
        frame = {"event": "media", "streamSid": "MZ1", "media": {"payload": payload}}
        self._incoming.put_nowait({"type": "websocket.receive", "text": json.dumps(frame)})

    def stop(self) -> None:
        frame = {"event": "stop", "streamSid": "MZ1", "stop": {"callSid": "CA1"}}
        self._incoming.put_nowait({"type": "websocket.receive", "text": json.dumps(frame)})

    async def receive(self) -> dict[str, Any]:
        return await self._incoming.get()

    async def send_text(self, data: str) -> None:
        self.sent.append(orjson.loads(data))

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self._incoming.put_nowait({"type": "websocket.disconnect", "code": code})


class StubConversation:
    async def caller_audio_committed(self, item_id: str) -> None: ...
    async def caller_transcribed(self, item_id: str, transcript: str) -> None: ...


@dataclass
class ToolRuns:
    """A stand-in for tools.run: counts runs per call and holds them until released."""

    runs: list[str] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, name: str, arguments: str, ctx: ToolContext) -> dict[str, Any]:
        self.runs.append(name)
        await self.release.wait()
        return {"status": "ok", "found": name}


def session_for(persona: str) -> dict[str, Any]:
    return rt.session_update(
        instructions=f"You are the {persona}.",
        tools=[
            {"type": "function", "name": "slow_lookup", "description": "Look up.", "parameters": {}}
        ],
        audio_mode="g711",
        voice="marin",
        transcription_model=None,
    )


@dataclass
class Rig:
    session: CallSession
    twilio: ScriptedTwilio
    upstreams: list[ScriptedUpstream]
    connects: list[float]  # the open timeout of every connect attempt
    lost: list[str]  # why the fallback ran, each time it did
    task: asyncio.Task[CallSummary] | None = None

    @property
    def first(self) -> ScriptedUpstream:
        return self.upstreams[0]


@contextlib.asynccontextmanager
async def scripted_call(
    *,
    refuse_connects: bool = False,
    renew_after_s: float | None = None,
    reconnect_budget_s: float = 3.0,
) -> AsyncIterator[Rig]:
    twilio = ScriptedTwilio()
    upstreams = [ScriptedUpstream("session-1")]
    connects: list[float] = []
    lost: list[str] = []

    async def connect(open_timeout_s: float) -> ScriptedUpstream:
        connects.append(open_timeout_s)
        if refuse_connects:
            raise ConnectionRefusedError(111, "Connection refused")
        upstreams.append(ScriptedUpstream(f"session-{len(upstreams) + 1}"))
        return upstreams[-1]

    async def upstream_lost(why: str) -> None:
        lost.append(why)

    setup = CallSetup(
        call_sid="CA1",
        stream_sid="MZ1",
        tenant="acme-plumbing",
        caller=CALLER_NUMBER,
        called=BUSINESS_NUMBER,
        persona="dispatcher",
        audio_mode="g711",
        session_for=session_for,
        reconnect_budget_s=reconnect_budget_s,
        session_renew_after_s=renew_after_s,
    )
    ctx = ToolContext(
        tenant="acme-plumbing",
        profile=None,  # type: ignore[arg-type]
        channel="voice",
        conversation_id="CA1",
        caller=CALLER_NUMBER,
        persona="dispatcher",
        db=None,  # type: ignore[arg-type]
        kv=None,  # type: ignore[arg-type]
        conversation=StubConversation(),  # type: ignore[arg-type]
    )
    session = CallSession(
        setup,
        twilio,
        upstreams[0],
        ctx,
        connect_upstream=connect,
        on_upstream_lost=upstream_lost,
    )
    rig = Rig(session, twilio, upstreams, connects, lost)
    rig.task = asyncio.create_task(session.run())
    try:
        yield rig
    finally:
        if not rig.task.done():
            rig.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await rig.task


def response_created(response_id: str) -> dict[str, Any]:
    return {
        "type": "response.created",
        "event_id": f"ev_{response_id}_c",
        "response": {"id": response_id, "object": "realtime.response", "status": "in_progress"},
    }


def response_done(response_id: str) -> dict[str, Any]:
    return {
        "type": "response.done",
        "event_id": f"ev_{response_id}_d",
        "response": {
            "id": response_id,
            "object": "realtime.response",
            "status": "completed",
            "output": [],
        },
    }


def function_call_done(call_id: str, response_id: str = "resp_1") -> dict[str, Any]:
    return {
        "type": "response.function_call_arguments.done",
        "event_id": f"ev_{call_id}",
        "response_id": response_id,
        "item_id": f"item_{call_id}",
        "output_index": 0,
        "call_id": call_id,
        "name": "slow_lookup",
        "arguments": '{"q": "leak"}',
    }


def caller_turn(item_id: str, transcript: str) -> list[dict[str, Any]]:
    return [
        {
            "type": "input_audio_buffer.committed",
            "event_id": f"ev_{item_id}_c",
            "item_id": item_id,
            "previous_item_id": None,
        },
        {
            "type": "conversation.item.input_audio_transcription.completed",
            "event_id": f"ev_{item_id}_t",
            "item_id": item_id,
            "content_index": 0,
            "transcript": transcript,
            "usage": {"type": "duration", "seconds": 1.0},
        },
    ]


def agent_said(item_id: str, response_id: str, transcript: str) -> dict[str, Any]:
    return {
        "type": "response.output_audio_transcript.done",
        "event_id": f"ev_{item_id}_o",
        "response_id": response_id,
        "item_id": item_id,
        "output_index": 0,
        "content_index": 0,
        "transcript": transcript,
    }


def error_event(code: str, error_type: str = "invalid_request_error") -> dict[str, Any]:
    return {
        "type": "error",
        "event_id": f"ev_err_{code}",
        "error": {"type": error_type, "code": code, "message": f"{code} happened"},
    }


async def test_a_drop_with_a_tool_running_restores_the_session_and_runs_the_tool_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tools = ToolRuns()
    monkeypatch.setattr(call_module, "run", tools)
    async with scripted_call() as rig:
        first = rig.first
        first.feed(response_created("resp_0"))
        first.feed(agent_said("item_a0", "resp_0", "Thanks for calling, how can I help?"))
        first.feed(response_done("resp_0"))
        for event in caller_turn("item_u1", "My sink is leaking"):
            first.feed(event)
        first.feed(response_created("resp_1"))
        first.feed(function_call_done("call_1"))
        first.feed(response_done("resp_1"))
        await wait_until(lambda: tools.runs, 5)
        first.drop()  # injected: the socket dies while the tool runs

        await wait_until(lambda: len(rig.upstreams) == 2 and rig.upstreams[1].sent, 5)
        second = rig.upstreams[1]
        await wait_until(lambda: len(second.sent_types()) >= 4, 5)
        # The new session: same instructions and tools, the conversation so far, no reply
        # asked for yet (the tool's output is still to come).
        assert second.sent_types() == ["session.update"] + ["conversation.item.create"] * 3
        assert second.sent[0] == session_for("dispatcher")
        items = [e["item"] for e in second.sent[1:]]
        assert [(i["type"], i.get("role")) for i in items] == [
            ("message", "assistant"),
            ("message", "user"),
            ("function_call", None),
        ]
        assert items[2]["call_id"] == "call_1"
        for event in second.sent:
            assert_valid_client_event(event)

        # A server replaying the call to us must not make the tool run again.
        second.feed(function_call_done("call_1", "resp_9"))
        rig.twilio.media()  # caller audio flows to the new session again
        await wait_until(lambda: rig.session.upstream_stats.duplicate_tool_calls == 1, 5)
        await wait_until(lambda: "input_audio_buffer.append" in [e["type"] for e in second.sent], 5)
        tools.release.set()
        await wait_until(lambda: second.sent_types()[-1:] == ["response.create"], 5)
        rig.twilio.stop()
        summary = await asyncio.wait_for(rig.task, 10)  # type: ignore[arg-type]

    outputs = [e for e in second.sent if e.get("item", {}).get("type") == "function_call_output"]
    assert [o["item"]["call_id"] for o in outputs] == ["call_1"]
    assert tools.runs == ["slow_lookup"]  # once, across two sessions and a replayed call
    assert first.sent_types()[:2] == ["session.update", "response.create"]
    assert summary.end_reason == "caller hung up"
    assert (summary.upstream.sessions, summary.upstream.restores) == (2, 1)
    assert summary.upstream.items_replayed == 3
    assert rig.lost == []
    print(
        "injected: realtime socket dropped with tool call_1 running; "
        f"kept: the call ({summary.end_reason}), {summary.upstream.items_replayed} items "
        f"replayed, tool runs {tools.runs}, duplicates refused "
        f"{summary.upstream.duplicate_tool_calls}"
    )


async def test_a_drop_mid_answer_clears_the_cut_audio_and_asks_for_the_answer_again() -> None:
    async with scripted_call() as rig:
        first = rig.first
        for event in caller_turn("item_u1", "What are your hours?"):
            first.feed(event)
        first.feed(response_created("resp_1"))
        first.feed(
            {
                "type": "response.output_audio.delta",
                "event_id": "ev_delta",
                "response_id": "resp_1",
                "item_id": "item_a1",
                "output_index": 0,
                "content_index": 0,
                "delta": base64.b64encode(b"\x7f" * 800).decode(),
            }
        )
        await wait_until(lambda: any(f["event"] == "media" for f in rig.twilio.sent), 5)
        first.drop()  # injected: mid-answer
        await wait_until(lambda: len(rig.upstreams) == 2, 5)
        second = rig.upstreams[1]
        await wait_until(lambda: "response.create" in second.sent_types(), 5)
        rig.twilio.stop()
        summary = await asyncio.wait_for(rig.task, 10)  # type: ignore[arg-type]

    assert second.sent_types() == ["session.update", "conversation.item.create", "response.create"]
    assert second.sent[1]["item"]["content"] == [
        {"type": "input_text", "text": "What are your hours?"}
    ]
    # The half-played answer was cleared at Twilio: it will never be finished.
    assert [f["event"] for f in rig.twilio.sent] == ["media", "mark", "clear"]
    assert summary.upstream.restores == 1
    print("injected: drop mid-answer; kept: the question, re-asked in the new session")


async def test_recoverable_errors_are_counted_and_the_session_goes_on() -> None:
    async with scripted_call() as rig:
        rig.first.feed(error_event("conversation_already_has_active_response"))
        rig.first.feed(error_event("response_cancel_not_active"))
        await wait_until(lambda: rig.session.upstream_stats.recoverable_errors == 2, 5)
        rig.twilio.stop()
        summary = await asyncio.wait_for(rig.task, 10)  # type: ignore[arg-type]
    assert summary.end_reason == "caller hung up"
    assert rig.connects == [] and rig.lost == []
    assert summary.upstream.sessions == 1


async def test_a_fatal_error_falls_back_without_reconnecting() -> None:
    async with scripted_call() as rig:
        rig.first.feed(error_event("insufficient_quota", "insufficient_quota"))
        summary = await asyncio.wait_for(rig.task, 10)  # type: ignore[arg-type]
    assert rig.connects == []  # a new session would fail the same way
    assert rig.lost == ["realtime error insufficient_quota"]
    assert summary.end_reason == "assistant unavailable: realtime error insufficient_quota"
    assert summary.upstream.gave_up == "realtime error insufficient_quota"
    print(f"injected: fatal error event; kept: fallback ran once ({rig.lost[0]})")


async def test_no_new_session_within_the_budget_falls_back() -> None:
    async with scripted_call(refuse_connects=True, reconnect_budget_s=0.4) as rig:
        rig.first.drop()
        summary = await asyncio.wait_for(rig.task, 10)  # type: ignore[arg-type]
    assert len(rig.connects) >= 3  # retried with backoff
    assert all(timeout <= 0.5 for timeout in rig.connects[1:])  # within what was left
    assert rig.lost == ["realtime socket dropped (close code None)"]
    assert summary.end_reason.startswith("assistant unavailable")
    assert summary.upstream.connect_failures == len(rig.connects)
    print(
        f"injected: drop, then {len(rig.connects)} refused reconnects; kept: the fallback "
        "(apology and callback) instead of a silent hang-up"
    )


async def test_the_session_is_renewed_before_its_cap_at_a_quiet_moment() -> None:
    async with scripted_call(renew_after_s=0.2) as rig:
        first = rig.first
        states: list[str | None] = []
        original_connect = rig.session._connect_upstream
        assert original_connect is not None

        async def connect(open_timeout_s: float) -> Any:
            states.append(rig.session.protocol.active_response)
            return await original_connect(open_timeout_s)

        rig.session._connect_upstream = connect
        for event in caller_turn("item_u1", "Hello?"):
            first.feed(event)
        first.feed(response_created("resp_1"))  # the agent is answering: not a quiet moment
        first.feed(agent_said("item_a1", "resp_1", "Hi! How can I help?"))
        await wait_until(lambda: rig.session.protocol.active_response == "resp_1", 5)
        await asyncio.sleep(0.6)  # well past the renewal age
        assert len(rig.upstreams) == 1  # not renewed mid-answer
        first.feed(response_done("resp_1"))
        await wait_until(lambda: len(rig.upstreams) == 2, 5)
        second = rig.upstreams[1]
        await wait_until(lambda: len(second.sent_types()) >= 3, 5)
        rig.twilio.stop()
        summary = await asyncio.wait_for(rig.task, 10)  # type: ignore[arg-type]

    assert states[0] is None  # connected only once the answer was done
    assert first.closed and first.close_code == 1000  # the old session closed cleanly
    # The conversation so far: the caller's question and the agent's answer.
    assert second.sent_types()[:3] == [
        "session.update",
        "conversation.item.create",
        "conversation.item.create",
    ]
    assert second.sent_types().count("response.create") == 0  # nothing owed: agent spoke last
    assert summary.upstream.renewals >= 1 and summary.upstream.restores >= 1
    print(
        f"injected: session age past the renewal limit; kept: {summary.upstream.renewals} "
        "renewal(s) at a quiet moment, conversation replayed"
    )


# == whole calls, real processes ===============================================================

EMULATOR_PROCESS = r"""
import asyncio, json, sys
from pathlib import Path
from bridge.sim.emulator import run_emulator
from bridge.sim.scenario import scenario_from_toml

async def main(port, scenario_file, speed, dump_file, wait_for_go):
    scenario = scenario_from_toml(Path(scenario_file).read_text())
    if wait_for_go:  # imports done: bind the port only when told (the moment is the test's)
        await asyncio.to_thread(sys.stdin.readline)
    async with run_emulator(scenario, port=port, speed=speed) as emulator:
        print("listening", emulator.url, flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        sessions = [
            {
                "client_events": [
                    e for e in s.client_events if e.get("type") != "input_audio_buffer.append"
                ],
                "audio_appends": sum(
                    e.get("type") == "input_audio_buffer.append" for e in s.client_events
                ),
                "server_events": [
                    e for e in s.server_events if e.get("type") != "response.output_audio.delta"
                ],
                "errors": s.errors,
                "tool_calls": [[t.name, t.output] for t in s.tool_calls],
                "spoken": [x.text for x in s.spoken],
            }
            for s in emulator.sessions
        ]
        Path(dump_file).write_text(json.dumps(sessions))

port, scenario_file, speed, dump_file, wait = sys.argv[1:6]
asyncio.run(main(int(port), scenario_file, float(speed), dump_file, wait == "wait"))
"""

BEFORE_THE_FAULT = """
name = "before-the-fault"
[[steps]]
say = "Thanks for calling Acme Plumbing. How can I help?"
[[steps]]
hear = "My sink is leaking"
[[steps]]
say = "This line is never reached: the process is killed first."
"""

AFTER_THE_FAULT = """
name = "after-the-fault"
[[steps]]
hear = "My sink is leaking"
[[steps]]
say = "We can send a plumber this afternoon. Goodbye!"
[[steps]]
call_tool = "end_call"
arguments = { reason = "booked a visit" }
[[steps]]
end = true
"""


class EmulatorProcess:
    """`bridge.sim.emulator` in its own process; killable, restartable on the same port."""

    def __init__(self, workdir: Path, port: int, scenario: str, name: str, *, wait: bool) -> None:
        self.dump = workdir / f"{name}.json"
        scenario_file = workdir / f"{name}.toml"
        scenario_file.write_text(scenario)
        self.log = workdir / f"{name}.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    EMULATOR_PROCESS,
                    str(port),
                    str(scenario_file),
                    "4",
                    str(self.dump),
                    "wait" if wait else "now",
                ],
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
            )

    async def listening(self) -> None:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.process.stdout.readline), 60)
        assert line.startswith(b"listening"), self.log.read_text()

    def tell(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(b"\n")
        self.process.stdin.flush()

    async def records(self) -> list[dict[str, Any]]:
        self.tell()
        await asyncio.wait_for(asyncio.to_thread(self.process.wait), 30)
        return json.loads(self.dump.read_text())

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def emulator_processes(tmp_path: Path) -> Iterator[list[EmulatorProcess]]:
    started: list[EmulatorProcess] = []
    yield started
    for emulator in started:
        emulator.kill()


def free_port() -> int:
    sock = bind_loopback()
    port = sock.getsockname()[1]
    sock.close()
    return port


def server_settings(
    database_url: str, realtime_url: str, sock: socket.socket, **extra: Any
) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        public_url=f"http://127.0.0.1:{sock.getsockname()[1]}",
        openai_realtime_url=realtime_url,
        twilio_auth_token=AUTH_TOKEN,
        database_url=database_url,
        **extra,
    )


async def test_killing_the_realtime_process_mid_call_keeps_the_call(
    sqlite_url: str, tmp_path: Path, emulator_processes: list[EmulatorProcess]
) -> None:
    port = free_port()
    before = EmulatorProcess(tmp_path, port, BEFORE_THE_FAULT, "before", wait=False)
    after = EmulatorProcess(tmp_path, port, AFTER_THE_FAULT, "after", wait=True)
    emulator_processes += [before, after]
    await before.listening()

    sock = bind_loopback()
    settings = server_settings(sqlite_url, f"ws://127.0.0.1:{port}/v1/realtime", sock)
    script = CallerScript(
        "survives-a-fault",
        (
            wait_for_agent(20.0),
            silence(2500),  # the emulator dies and comes back in here
            speak(1500),
            wait_for_agent(20.0),
            silence(5000),  # the agent hangs up after its goodbye: the caller never has to
            hang_up(),
        ),
    )
    call_sid = "CA" + "a" * 32
    async with running_server(settings, sock) as server:
        services = server.app.state.services
        calling = asyncio.create_task(
            place_call(
                server_url=server.url,
                auth_token=AUTH_TOKEN,
                to=BUSINESS_NUMBER,
                from_=CALLER_NUMBER,
                script=script,
                call_sid=call_sid,
                pace=1.0,
            )
        )
        await wait_until(lambda: call_sid in services.calls or calling.done(), 30)
        session: CallSession = services.calls[call_sid]
        # The greeting is generated and its response finished: kill the model mid-call.
        await wait_until(
            lambda: (
                any(t["role"] == "agent" for t in session.protocol.transcript)
                and session.protocol.active_response is None
            ),
            30,
        )
        before.kill()  # injected: SIGKILL, no close frame
        after.tell()  # the same port again, a fresh process with an empty conversation
        await after.listening()
        report = await asyncio.wait_for(calling, 90)
        await wait_until(lambda: not services.calls, 30)
        async with services.db() as db:
            record = (await db.execute(select(Call))).scalar_one()
    (restored,) = await after.records()

    print(report.summary())
    assert report.violations == []
    # No hang-up: the call went on to its scripted end, the agent saying goodbye.
    assert report.closed_by == "server"
    assert record.status == "agent ended the call"
    assert restored["spoken"] == ["We can send a plumber this afternoon. Goodbye!"]
    assert [name for name, _ in restored["tool_calls"]] == ["end_call"]
    assert restored["audio_appends"] > 0  # the caller's audio reached the new session

    # The new session got the same instructions and tools, then the conversation so far.
    events = restored["client_events"]
    for event in events:
        assert_valid_client_event(event)
    for event in restored["server_events"]:
        assert_valid_server_event(event)
    update = events[0]
    assert update["type"] == "session.update"
    profile = services.profiles.by_id("acme-plumbing")
    assert update["session"]["instructions"] == render_instructions(profile.persona, profile)
    assert [t["name"] for t in update["session"]["tools"]] == [
        t["name"] for t in realtime_tools(profile.persona)
    ]
    replay = events[1]
    assert replay["type"] == "conversation.item.create"
    assert replay["item"]["role"] == "assistant"
    assert replay["item"]["content"] == [
        {"type": "output_text", "text": "Thanks for calling Acme Plumbing. How can I help?"}
    ]
    assert restored["errors"] == []
    stats = session.upstream_stats
    assert (stats.sessions, stats.restores, stats.gave_up) == (2, 1, None)
    print(
        f"injected: SIGKILL of the Realtime process (pid {before.process.pid}) mid-call; "
        f"kept: the call ({record.status}), session restored in {stats.restore_ms[0]:.0f} ms "
        f"with {stats.items_replayed} item(s) replayed after {stats.connect_failures} refused "
        f"attempt(s), {len(report.clears)} clears, no hang-up"
    )


# -- refused at connect: the fallback --------------------------------------------------------


@dataclass
class FakeTwilioCalls:
    """Twilio's `Calls/{CallSid}.json` update endpoint on loopback: keeps each redirect."""

    account_sid: str
    auth_token: str
    redirects: list[dict[str, str]] = field(default_factory=list)
    url: str = ""

    def app(self) -> Starlette:
        async def update_call(request: Request) -> JSONResponse:
            expected = base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
            if request.headers.get("authorization") != f"Basic {expected}":
                return JSONResponse({"code": 20003, "status": 401}, status_code=401)
            if request.path_params["account"] != self.account_sid:
                return JSONResponse({"code": 20404, "status": 404}, status_code=404)
            form = dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))
            self.redirects.append({"call_sid": request.path_params["call"], **form})
            return JSONResponse({"sid": request.path_params["call"], "status": "in-progress"})

        route = "/2010-04-01/Accounts/{account}/Calls/{call}.json"
        return Starlette(routes=[Route(route, update_call, methods=["POST"])])


@dataclass
class RecordingNotifier:
    """Stands in for the process's Notifier (tools.context.Notifier): keeps every text."""

    texts: list[tuple[str, str, str, str]] = field(default_factory=list)

    async def send_sms(self, tenant: str, to: str, body: str, *, reason: str) -> None:
        self.texts.append((tenant, to, body, reason))


async def test_a_refused_realtime_connect_apologises_texts_the_owner_and_records_a_lead(
    sqlite_url: str,
) -> None:
    refused = free_port()  # injected: nothing listens here
    twilio = FakeTwilioCalls(ACCOUNT_SID, AUTH_TOKEN)
    async with serve_loopback(twilio.app()) as twilio.url:
        sock = bind_loopback()
        settings = server_settings(
            sqlite_url,
            f"ws://127.0.0.1:{refused}/v1/realtime",
            sock,
            twilio_account_sid=ACCOUNT_SID,
            twilio_api_url=twilio.url,
            realtime_retry_budget_s=0.5,
        )
        call_sid = "CA" + "b" * 32
        async with running_server(settings, sock) as server:
            services = server.app.state.services
            notifier = RecordingNotifier()
            services.notifier = notifier
            report = await place_call(
                server_url=server.url,
                auth_token=AUTH_TOKEN,
                to=BUSINESS_NUMBER,
                from_=CALLER_NUMBER,
                script=CallerScript("waits", (wait_for_agent(10.0), hang_up())),
                call_sid=call_sid,
                pace=0,
            )
            async with services.db() as db:
                leads = (await db.execute(select(Lead))).scalars().all()
                calls = (await db.execute(select(Call))).scalars().all()

    print(report.summary())
    # The caller: redirected to the apology and callback promise, through Twilio's REST API.
    (redirect,) = twilio.redirects
    assert redirect["call_sid"] == call_sid
    document = ET.fromstring(redirect["Twiml"])
    assert [el.tag for el in document] == ["Say", "Hangup"]
    assert document[0].text == APOLOGY_MESSAGE
    assert report.closed_by == "server" and report.audio_received_ms == 0
    # The owner: a text with the caller's number.
    ((tenant, to, body, reason),) = notifier.texts
    assert (tenant, to, reason) == ("acme-plumbing", OWNER_NUMBER, "missed_call")
    assert CALLER_NUMBER in body
    # The record: a lead for the missed call, and the call itself.
    (lead,) = leads
    assert (lead.phone, lead.source, lead.notes, lead.conversation_id) == (
        CALLER_NUMBER,
        "voice",
        MISSED_CALL_NOTE,
        call_sid,
    )
    (call,) = calls
    assert call.status.startswith("assistant unavailable: realtime connect failed")
    print(
        f"injected: Realtime URL refused (port {refused}); kept: apology redirect "
        f"({len(twilio.redirects)}), owner text to {to}, missed-call lead {lead.id}, "
        f"call record '{call.status[:40]}...'"
    )


async def test_without_twilio_credentials_the_fallback_still_records_and_texts(
    sqlite_url: str,
) -> None:
    sock = bind_loopback()
    settings = server_settings(
        sqlite_url,
        f"ws://127.0.0.1:{free_port()}/v1/realtime",
        sock,
        realtime_retry_budget_s=0.2,
    )
    async with running_server(settings, sock) as server:
        services = server.app.state.services
        notifier = RecordingNotifier()
        services.notifier = notifier
        report = await place_call(
            server_url=server.url,
            auth_token=AUTH_TOKEN,
            to=BUSINESS_NUMBER,
            from_=CALLER_NUMBER,
            script=CallerScript("waits", (wait_for_agent(10.0), hang_up())),
            pace=0,
        )
        async with services.db() as db:
            leads = (await db.execute(select(Lead))).scalars().all()
    assert report.closed_by == "server"
    assert [lead.notes for lead in leads] == [MISSED_CALL_NOTE]
    assert [t[1] for t in notifier.texts] == [OWNER_NUMBER]
    print("injected: refused connect, no Twilio credentials; kept: lead and owner text")


async def test_a_realtime_process_that_never_comes_back_ends_in_the_fallback(
    sqlite_url: str, tmp_path: Path, emulator_processes: list[EmulatorProcess]
) -> None:
    port = free_port()
    before = EmulatorProcess(tmp_path, port, BEFORE_THE_FAULT, "before", wait=False)
    emulator_processes.append(before)
    await before.listening()
    twilio = FakeTwilioCalls(ACCOUNT_SID, AUTH_TOKEN)
    call_sid = "CA" + "c" * 32
    async with serve_loopback(twilio.app()) as twilio.url:
        sock = bind_loopback()
        settings = server_settings(
            sqlite_url,
            f"ws://127.0.0.1:{port}/v1/realtime",
            sock,
            twilio_account_sid=ACCOUNT_SID,
            twilio_api_url=twilio.url,
            realtime_retry_budget_s=0.5,
        )
        async with running_server(settings, sock) as server:
            services = server.app.state.services
            notifier = RecordingNotifier()
            services.notifier = notifier
            calling = asyncio.create_task(
                place_call(
                    server_url=server.url,
                    auth_token=AUTH_TOKEN,
                    to=BUSINESS_NUMBER,
                    from_=CALLER_NUMBER,
                    script=CallerScript(
                        "waits", (wait_for_agent(20.0), silence(30_000), hang_up())
                    ),
                    call_sid=call_sid,
                    pace=1.0,
                )
            )
            await wait_until(lambda: call_sid in services.calls or calling.done(), 30)
            session: CallSession = services.calls[call_sid]
            await wait_until(lambda: session.protocol.transcript, 30)
            before.kill()  # injected: SIGKILL, and nothing listens on the port again
            report = await asyncio.wait_for(calling, 60)
            await wait_until(lambda: not services.calls, 30)
            async with services.db() as db:
                leads = (await db.execute(select(Lead))).scalars().all()
                record = (await db.execute(select(Call))).scalar_one()

    (redirect,) = twilio.redirects
    assert redirect["call_sid"] == call_sid
    assert [el.tag for el in ET.fromstring(redirect["Twiml"])] == ["Say", "Hangup"]
    assert [(lead.phone, lead.notes) for lead in leads] == [(CALLER_NUMBER, MISSED_CALL_NOTE)]
    assert [(t[1], t[3]) for t in notifier.texts] == [(OWNER_NUMBER, "missed_call")]
    assert record.status == "assistant unavailable: realtime socket dropped (close code None)"
    assert report.violations == []
    stats = session.upstream_stats
    assert stats.connect_failures >= 2 and stats.restores == 0
    print(
        f"injected: SIGKILL of the Realtime process mid-call, port left closed; kept: "
        f"{stats.connect_failures} reconnect attempts, then the apology redirect, the owner "
        f"text and missed-call lead {leads[0].id} (call record: {record.status})"
    )


# -- the fallback's parts, each failing on its own ---------------------------------------------


async def test_a_twilio_refusal_or_outage_is_reported_not_raised() -> None:
    twilio = FakeTwilioCalls(ACCOUNT_SID, "the-real-token")
    async with serve_loopback(twilio.app()) as twilio.url:
        wrong_token = Settings(  # type: ignore[call-arg]
            _env_file=None,
            twilio_account_sid=ACCOUNT_SID,
            twilio_auth_token="not-the-token",
            twilio_api_url=twilio.url,
        )
        refused = await redirect_to_apology(wrong_token, "CA1")
    unreachable = await redirect_to_apology(
        wrong_token.model_copy(update={"twilio_api_url": f"http://127.0.0.1:{free_port()}"}),
        "CA1",
    )
    no_credentials = await redirect_to_apology(Settings(_env_file=None), "CA1")  # type: ignore[call-arg]
    assert refused[0] is False and refused[1].startswith("Twilio answered 401")
    assert unreachable[0] is False and unreachable[1].startswith("Twilio unreachable")
    assert no_credentials[0] is False and "no Twilio credentials" in no_credentials[1]
    assert twilio.redirects == []


async def test_the_missed_call_lead_is_recorded_once_per_call(sqlite_url: str) -> None:
    from tools.db.engine import make_engine, make_sessionmaker, migrate

    await migrate(sqlite_url)
    engine = make_engine(sqlite_url)
    try:
        db = make_sessionmaker(engine)
        first = await record_missed_call(db, "acme-plumbing", "CA1", CALLER_NUMBER)
        again = await record_missed_call(db, "acme-plumbing", "CA1", CALLER_NUMBER)
        other = await record_missed_call(db, "acme-plumbing", "CA2", CALLER_NUMBER)
        async with db() as session:
            leads = (await session.execute(select(Lead).order_by(Lead.id))).scalars().all()
    finally:
        await engine.dispose()
    assert first == again != other
    assert [(lead.conversation_id, lead.source, lead.notes) for lead in leads] == [
        ("CA1", "voice", MISSED_CALL_NOTE),
        ("CA2", "voice", MISSED_CALL_NOTE),
    ]
