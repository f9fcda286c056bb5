"""Graceful drain of a real `switchboard serve` process with a live call on it.

SIGTERM: /readyz turns 503, a new call hears the busy message, the live call goes on to its
end (or until DRAIN_TIMEOUT_S), then the process exits with status 0. The server process is
the one `tests/test_cli.py` starts (its `serve_process` fixture); the caller is the simulated
Twilio caller in this process.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest
from twilio.request_validator import RequestValidator

from app.twiml import BUSY_MESSAGE
from bridge.sim.caller import CallerScript, CallReport, hang_up, place_call, silence, wait_for_agent
from tests import test_cli

# The server process and its clean environment, exactly as test_cli starts them.
clean_env = test_cli.clean_env
serve_process = test_cli.serve_process
PUBLIC = test_cli.PUBLIC

AUTH_TOKEN = "serve-test-token"  # what serve_process gives the server
BUSINESS_NUMBER = "+15005550006"

Served = tuple[subprocess.Popen[bytes], str, Path]


@pytest.fixture
def short_drain(monkeypatch: pytest.MonkeyPatch) -> float:
    """A drain timeout far shorter than the live call (set before the server starts)."""
    monkeypatch.setenv("DRAIN_TIMEOUT_S", "1.0")
    return 1.0


async def wait_for_health(http: httpx.AsyncClient, served: Served) -> None:
    process, _, log_file = served
    for _ in range(600):
        assert process.poll() is None, log_file.read_text()
        try:
            await http.get("/healthz")
            return
        except httpx.TransportError:
            await asyncio.sleep(0.05)
    pytest.fail("serve never answered /healthz:\n" + log_file.read_text())


async def wait_for_live_calls(http: httpx.AsyncClient, count: int) -> None:
    async with asyncio.timeout(30):
        while (await http.get("/readyz")).json()["live_calls"] != count:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


def start_call(url: str, script: CallerScript) -> asyncio.Task[CallReport]:
    return asyncio.create_task(
        place_call(
            server_url=url,
            public_url=PUBLIC,
            auth_token=AUTH_TOKEN,
            to=BUSINESS_NUMBER,
            from_="+15005550199",
            script=script,
            pace=1.0,
        )
    )


async def new_call_while_draining(http: httpx.AsyncClient) -> httpx.Response:
    form = {"CallSid": "CA" + "9" * 32, "To": BUSINESS_NUMBER, "From": "+14155550123"}
    signature = RequestValidator(AUTH_TOKEN).compute_signature(f"{PUBLIC}/voice/incoming", form)
    return await http.post("/voice/incoming", data=form, headers={"X-Twilio-Signature": signature})


def log_messages(log_file: Path) -> list[str]:
    lines = log_file.read_text().splitlines()
    return [json.loads(line)["msg"] for line in lines if line.startswith("{")]


async def test_sigterm_lets_the_live_call_finish_then_exits_zero(serve_process: Served) -> None:
    process, url, log_file = serve_process
    script = CallerScript("stays-on-the-line", (wait_for_agent(20.0), silence(3000), hang_up()))
    async with httpx.AsyncClient(base_url=url) as http:
        await wait_for_health(http, serve_process)
        calling = start_call(url, script)
        await wait_for_live_calls(http, 1)

        process.send_signal(signal.SIGTERM)  # injected: the orchestrator stops this replica
        async with asyncio.timeout(30):
            while (ready := await http.get("/readyz")).status_code == 200:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        refused = await new_call_while_draining(http)
        live_while_draining = ready.json()["live_calls"]

        report = await asyncio.wait_for(calling, 60)
    exit_code = await asyncio.wait_for(asyncio.to_thread(process.wait), 60)

    messages = log_messages(log_file)
    print(report.summary())
    assert ready.status_code == 503 and ready.json()["reasons"] == ["draining"]
    assert live_while_draining == 1
    busy = ET.fromstring(refused.text)
    assert [el.tag for el in busy] == ["Say", "Hangup"] and busy[0].text == BUSY_MESSAGE
    # The live call ran to its own end: the caller hung up, nothing cut it off.
    assert report.violations == []
    assert report.closed_by == "caller"
    assert report.audio_played_ms > 0
    assert any(m.startswith("draining: 1 live call(s)") for m in messages), messages
    assert not any(m.startswith("drain timed out") for m in messages)
    assert exit_code == 0
    print(
        "injected: SIGTERM with 1 live call; kept: the call to its end "
        f"({report.closed_by} hung up), readiness 503, busy TwiML for a new call, exit {exit_code}"
    )


@pytest.mark.usefixtures("short_drain")
async def test_a_drain_is_bounded_by_its_timeout(serve_process: Served) -> None:
    process, url, log_file = serve_process
    script = CallerScript("never-hangs-up", (wait_for_agent(20.0), silence(60_000), hang_up()))
    async with httpx.AsyncClient(base_url=url) as http:
        await wait_for_health(http, serve_process)
        calling = start_call(url, script)
        await wait_for_live_calls(http, 1)
        process.send_signal(signal.SIGTERM)
        exit_code = await asyncio.wait_for(asyncio.to_thread(process.wait), 60)
        report = await asyncio.wait_for(calling, 60)

    messages = log_messages(log_file)
    assert any(m.startswith("drain timed out with 1 live call(s)") for m in messages), messages
    assert report.closed_by == "server"  # the process went away under the call
    assert exit_code == 0
    print(
        "injected: SIGTERM with a call longer than DRAIN_TIMEOUT_S=1; kept: a bounded drain, "
        f"the call closed by the server ({report.close_code}), exit {exit_code}"
    )
