"""The `switchboard` command line, and the draining uvicorn server behind `serve`."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import BaseModel, Field
from twilio.request_validator import RequestValidator
from typer.testing import CliRunner

from app.cli import DrainingServer, cli
from app.embedded import bind_loopback
from app.main import create_app
from app.serving import server_config
from app.settings import Settings
from tools.registry import REGISTRY, Tool, realtime_tools, tools_for

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No Switchboard variables from the outside and no .env file in the working directory."""
    for name in list(os.environ):
        if name.startswith(("TWILIO_", "OPENAI_", "REDIS_", "DATABASE_", "PUBLIC_", "PROFILES_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_help_lists_every_verb() -> None:
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    for verb in ("serve", "emulate", "call", "demo", "tools", "seed-demo"):
        assert verb in result.output


def test_python_dash_m_app_is_the_same_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "app", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "seed-demo" in done.stdout


# -- tools ---------------------------------------------------------------------------------


class ProbeArgs(BaseModel):
    customer: str = Field(description="Who is asking.")
    urgent: bool = False


async def _probe_handler(args: ProbeArgs, ctx: object) -> dict[str, object]:
    return {}


@pytest.fixture
def probe_tool(monkeypatch: pytest.MonkeyPatch) -> Tool:
    """A tool registered for the dispatcher for this test only."""
    probe = Tool(
        name="cli_probe_lookup",
        description="Look something up for the CLI test.\n\nSecond paragraph.",
        args=ProbeArgs,
        handler=_probe_handler,
        risk="read",
        personas=frozenset({"dispatcher"}),
        summary=None,
        needs_confirmation=False,
    )
    monkeypatch.setitem(REGISTRY, probe.name, probe)
    return probe


def test_tools_json_is_exactly_the_realtime_tool_list(probe_tool: Tool) -> None:
    result = runner.invoke(cli, ["tools", "--persona", "dispatcher", "--format", "json"])

    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    assert printed == realtime_tools("dispatcher")
    (probe,) = [t for t in printed if t["name"] == "cli_probe_lookup"]
    assert probe["type"] == "function"
    assert probe["parameters"]["properties"]["customer"]["type"] == "string"
    assert probe["parameters"]["required"] == ["customer"]


def test_tools_json_is_the_default_format(probe_tool: Tool) -> None:
    result = runner.invoke(cli, ["tools", "--persona", "dispatcher"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == realtime_tools("dispatcher")


def test_tools_table_has_a_row_per_tool(probe_tool: Tool) -> None:
    result = runner.invoke(cli, ["tools", "--persona", "dispatcher", "--format", "table"])

    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].split() == ["tool", "risk", "confirm", "description"]
    rows = lines[2:]
    assert len(rows) == len(tools_for("dispatcher"))
    (probe_row,) = [row for row in rows if row.startswith("cli_probe_lookup")]
    assert probe_row.split()[:3] == ["cli_probe_lookup", "read", "no"]
    assert probe_row.endswith("Look something up for the CLI test.")


def test_tools_for_an_unknown_persona_is_a_clear_error() -> None:
    result = runner.invoke(cli, ["tools", "--persona", "pirate"])
    assert result.exit_code == 2
    assert "unknown persona 'pirate'" in result.output
    assert "dispatcher" in result.output


def test_tools_rejects_an_unknown_format() -> None:
    result = runner.invoke(cli, ["tools", "--persona", "dispatcher", "--format", "yaml"])
    assert result.exit_code == 2


# -- verbs that need configuration ------------------------------------------------------------


def test_call_without_an_auth_token_explains_itself(clean_env: Path) -> None:
    result = runner.invoke(cli, ["call"])
    assert result.exit_code == 2
    assert "TWILIO_AUTH_TOKEN must be set" in result.output


def test_seed_demo_for_an_unknown_profile_is_a_clear_error(clean_env: Path) -> None:
    result = runner.invoke(cli, ["seed-demo", "--tenant", "nobody"])
    assert result.exit_code == 2
    assert "unknown profile 'nobody'" in result.output
    assert "acme-plumbing" in result.output


def test_seed_demo_fills_the_database_once(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"sqlite+aiosqlite:///{clean_env}/seed.db")

    first = runner.invoke(cli, ["seed-demo", "--tenant", "bright-smiles", "--today", "2025-03-03"])
    again = runner.invoke(cli, ["seed-demo", "--tenant", "bright-smiles", "--today", "2025-03-03"])

    assert first.exit_code == 0, first.output
    assert again.exit_code == 0, again.output
    lines = first.output.strip().splitlines()
    assert lines[0] == "Added demo data for bright-smiles:"
    created = {line.split()[0]: int(line.split()[-1]) for line in lines[3:]}
    assert created and all(n > 0 for n in created.values())
    assert "contacts" in created
    # Seeding is idempotent: nothing new the second time.
    assert (
        again.output.strip() == "The demo data for bright-smiles is already there; nothing added."
    )


def test_emulate_with_an_unknown_scenario_is_a_clear_error(clean_env: Path) -> None:
    result = runner.invoke(cli, ["emulate", "--scenario", "no-such-scenario"])
    assert result.exit_code == 2
    assert "no-such-scenario" in result.output


def test_bad_configuration_is_a_clear_error(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUDIO_MODE", "mp3")
    result = runner.invoke(cli, ["seed-demo"])
    assert result.exit_code == 2
    assert "bad configuration" in result.output
    assert "audio_mode" in result.output


# -- draining ------------------------------------------------------------------------------

PUBLIC = "https://switchboard.example.com"


async def test_draining_server_finishes_live_calls_before_stopping(sqlite_url: str) -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, public_url=PUBLIC, twilio_auth_token="t", database_url=sqlite_url
    )
    app = create_app(settings)
    sock = bind_loopback()
    host, port = sock.getsockname()[:2]
    config = server_config(app, settings, log_level="warning")
    server = DrainingServer(config, app, drain_timeout_s=60)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            assert not serving.done(), "server stopped during start-up"
            await asyncio.sleep(0.01)
        assert gc.get_freeze_count() > 0  # the start-up heap is out of the collector's sight
        services = app.state.services
        services.calls["CA-live"] = object()  # a call in progress

        server.begin_drain()
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as http:
            ready = await http.get("/readyz")
            form = {"CallSid": "CA-new", "To": "+15005550006", "From": "+14155550123"}
            url = f"{PUBLIC}/voice/incoming"
            signed = RequestValidator("t").compute_signature(url, form)
            answer = await http.post(
                "/voice/incoming", data=form, headers={"X-Twilio-Signature": signed}
            )
        assert not serving.done()  # still serving the live call
        assert ready.status_code == 503 and ready.json()["reasons"] == ["draining"]
        assert [el.tag for el in ET.fromstring(answer.text)] == ["Say", "Hangup"]

        del services.calls["CA-live"]  # the call ends
        await asyncio.wait_for(serving, timeout=30)
        assert gc.get_freeze_count() == 0  # and back in it once serving is over
    finally:
        server.should_exit = True
        if not serving.done():
            await asyncio.wait_for(serving, timeout=30)
        sock.close()


# -- serve, as a process -------------------------------------------------------------------


@pytest.fixture
def serve_process(clean_env: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    sock = bind_loopback()
    port = sock.getsockname()[1]
    sock.close()  # the child binds it again (SO_REUSEADDR); nothing else asks for it meanwhile
    log_file = clean_env / "serve.log"
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite+aiosqlite:///{clean_env}/serve.db",
        "TWILIO_AUTH_TOKEN": "serve-test-token",
        "PUBLIC_URL": PUBLIC,
    }
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "app", "serve", "--port", str(port)],
            cwd=clean_env,
            env={**env, "PYTHONPATH": str(ROOT)},
            stderr=log,
            stdout=log,
        )
    try:
        yield process, f"http://127.0.0.1:{port}", log_file
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def test_serve_answers_a_simulated_call_and_drains_on_sigterm(
    serve_process: tuple[subprocess.Popen[bytes], str, Path],
) -> None:
    # No OPENAI_API_KEY: `serve` runs the Realtime emulator in-process; `call` plays Twilio.
    process, url, log_file = serve_process
    async with httpx.AsyncClient(base_url=url) as http:
        for _ in range(600):
            assert process.poll() is None, log_file.read_text()
            try:
                health = await http.get("/healthz")
                break
            except httpx.TransportError:
                await asyncio.sleep(0.05)
        else:
            pytest.fail("serve never answered /healthz:\n" + log_file.read_text())
        ready = await http.get("/readyz")
    assert health.status_code == 200
    assert ready.status_code == 200

    placed = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "app", "call", "--url", url, "--script", "echo", "--pace", "0"],
        cwd=log_file.parent,
        env={
            **os.environ,
            "TWILIO_AUTH_TOKEN": "serve-test-token",
            "PUBLIC_URL": PUBLIC,
            "PYTHONPATH": str(ROOT),
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert placed.returncode == 0, placed.stdout + placed.stderr
    assert "stream: wss://switchboard.example.com/media-stream (token=" in placed.stdout
    assert "violations: 0" in placed.stdout

    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    lines = [json.loads(line) for line in log_file.read_text().splitlines() if line.startswith("{")]
    messages = [line["msg"] for line in lines]
    assert any("local Realtime emulator" in m for m in messages), messages
    assert any(m.startswith("call answered: connecting the media stream") for m in messages)
    assert any(m.startswith("draining: 0 live call(s)") for m in messages), messages
    assert process.returncode in (0, -signal.SIGTERM)


# -- configuration documentation -----------------------------------------------------------


def test_every_setting_is_documented_in_env_example_and_readme() -> None:
    env_example = (ROOT / ".env.example").read_text()
    readme = (ROOT / "README.md").read_text()
    documented = {
        line.lstrip("# ").split("=", 1)[0]
        for line in env_example.splitlines()
        if "=" in line and line.lstrip("# ").split("=", 1)[0].isupper()
    }
    names = {name.upper() for name in Settings.model_fields}

    assert documented == names
    for name in names:
        assert f"| `{name}` |" in readme, f"{name} missing from the README's configuration table"
