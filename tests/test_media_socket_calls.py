"""Whole calls on the picows media socket: the real media handler, the emulator, real callers.

Under the app's uvicorn config (`app.serving.server_config`, which every server of the app
uses) /media-stream must be served by app.media_socket, not by Starlette's route: the handler
is wrapped to record the type of socket it runs on.
"""

from __future__ import annotations

import asyncio
import logging
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import websockets

import app.media
from app.cli import DrainingServer
from app.embedded import bind_loopback, wait_until
from app.main import create_app
from app.media_websocket import MediaWebSocket
from app.security import public_url_for, sign
from app.serving import server_config
from app.settings import Settings
from bridge import twilio_media as tw
from bridge.sim.caller import ECHO_SCRIPT, CallerScript, hang_up, place_call, silence
from bridge.sim.emulator import run_emulator
from tests.e2e import (
    AUTH_TOKEN,
    BUSINESS_NUMBER,
    CALLER_NUMBER,
    call_stack,
    incoming_call,
    simulated_call,
    wait_until_idle,
)


@pytest.fixture
def socket_types(monkeypatch: pytest.MonkeyPatch) -> list[type]:
    """The type of each socket the media handler ran on."""
    seen: list[type] = []
    handle = app.media.media_stream

    async def recording(websocket: Any) -> None:
        seen.append(type(websocket))
        await handle(websocket)

    monkeypatch.setattr(app.media, "media_stream", recording)
    return seen


def media_url(base: str) -> str:
    return base.replace("http://", "ws://") + "/media-stream"


async def open_stream(base: str, call_sid: str, token: str) -> websockets.ClientConnection:
    ws = await websockets.connect(media_url(base), max_queue=None)
    writer = tw.TwilioStreamWriter("MZ" + call_sid[2:], call_sid, "AC" + "0" * 32)
    await ws.send(writer.connected())
    await ws.send(writer.start({"token": token}))
    return ws


def stream_token(twiml: str) -> str:
    parameter = ET.fromstring(twiml).find("./Connect/Stream/Parameter[@name='token']")
    assert parameter is not None, twiml
    return parameter.attrib["value"]


async def test_a_simulated_call_runs_on_the_picows_media_socket(
    sqlite_url: str, tmp_path: Path, socket_types: list[type]
) -> None:
    async with call_stack("echo", database_url=sqlite_url, spool_dir=tmp_path / "s") as stack:
        report = await simulated_call(stack, ECHO_SCRIPT)
    assert socket_types == [MediaWebSocket]
    assert report.violations == []
    assert report.audio_played_ms > 0  # the echo came back through send_text
    assert (report.closed_by, report.close_code) == ("caller", 1000)


async def test_an_upgrade_refused_before_accept_is_http_403_and_counted(
    sqlite_url: str, tmp_path: Path, socket_types: list[type]
) -> None:
    async with call_stack(
        "echo", database_url=sqlite_url, spool_dir=tmp_path / "s", require_ws_signature=True
    ) as stack:
        settings = stack.server.settings
        forged = sign(settings, public_url_for(settings, "/media-stream", websocket=True), {})
        statuses = []
        for headers in ({}, {"X-Twilio-Signature": forged[::-1]}):
            with pytest.raises(websockets.InvalidStatus) as refused:
                await websockets.connect(media_url(stack.url), additional_headers=headers)
            statuses.append(refused.value.response.status_code)
        rejections = stack.services.metrics.registry.get_sample_value(
            "switchboard_webhook_rejections_total", {"reason": "ws_signature"}
        )
        # The genuine signature gets through the same check.
        async with websockets.connect(
            media_url(stack.url), additional_headers={"X-Twilio-Signature": forged}
        ) as ws:
            accepted = ws.response.status_code
    assert statuses == [403, 403]
    assert rejections == 2
    assert accepted == 101
    assert socket_types == [MediaWebSocket] * 3


async def test_a_bad_stream_token_closes_with_1008_and_its_reason(
    sqlite_url: str, tmp_path: Path, socket_types: list[type]
) -> None:
    call_sid = "CA" + "b" * 32
    async with call_stack("echo", database_url=sqlite_url, spool_dir=tmp_path / "s") as stack:
        await incoming_call(stack, call_sid)
        ws = await open_stream(stack.url, call_sid, "guessed")
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
        sessions = stack.emulator.sessions
    assert ws.close_code == 1008
    assert ws.close_reason == f"bad or reused stream token for {call_sid}"
    assert sessions == []  # nobody got an upstream session
    assert socket_types == [MediaWebSocket]


async def test_a_caller_that_vanishes_mid_call_ends_the_call_normally(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="switchboard")
    call_sid = "CA" + "d" * 32
    async with call_stack("echo", database_url=sqlite_url, spool_dir=tmp_path / "s") as stack:
        token = stream_token((await incoming_call(stack, call_sid)).text)
        ws = await open_stream(stack.url, call_sid, token)
        await wait_until(lambda: call_sid in stack.services.calls, 10)
        ws.transport.abort()  # the line drops: no stop message, no close frame
        await wait_until_idle(stack)
    ended = [r.getMessage() for r in caplog.records if r.getMessage().startswith("call CA")]
    assert any(m.startswith(f"call {call_sid} ended (twilio socket closed)") for m in ended)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_drain_waits_for_the_live_media_call(
    sqlite_url: str, tmp_path: Path, socket_types: list[type]
) -> None:
    async with run_emulator("echo", speed=0) as emulator:
        sock = bind_loopback()
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None,
            public_url=url,
            openai_realtime_url=emulator.url,
            twilio_auth_token=AUTH_TOKEN,
            database_url=sqlite_url,
            spool_dir=tmp_path / "s",
        )
        application = create_app(settings)
        server = DrainingServer(
            server_config(application, settings, log_level="warning"), application, 60
        )
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            await wait_until(lambda: server.started, 10)
            calling = asyncio.create_task(
                place_call(
                    server_url=url,
                    auth_token=AUTH_TOKEN,
                    to=BUSINESS_NUMBER,
                    from_=CALLER_NUMBER,
                    script=CallerScript("two-seconds", (silence(2000), hang_up())),
                    pace=1.0,
                )
            )
            services = application.state.services
            await wait_until(lambda: len(services.calls) == 1, 20)
            server.begin_drain()
            await asyncio.sleep(0.5)
            serving_while_live = not serving.done() and len(services.calls) == 1
            report = await asyncio.wait_for(calling, 30)
            await asyncio.wait_for(serving, 30)  # the drain ends the server once the call has
        finally:
            server.should_exit = True
            await asyncio.wait_for(serving, 30)
            sock.close()
    assert serving_while_live
    assert report.violations == []
    assert report.closed_by == "caller"  # the call ran to its own end
    assert socket_types == [MediaWebSocket]
