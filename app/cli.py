"""The `switchboard` command: serve, emulate, call, demo, tools, seed-demo.

Every verb imports what it needs when it runs, so `switchboard --help` stays instant and a verb
never pays for another's dependencies.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import json
import logging
from collections.abc import Callable
from datetime import date, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, get_args

import typer
import uvicorn

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from app.settings import Settings
    from prompts.profiles import BusinessProfile, ProfileBook

log = logging.getLogger("switchboard.cli")

cli = typer.Typer(
    name="switchboard",
    help="Switchboard: an AI voice agent on a business's Twilio number.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class OutputFormat(enum.StrEnum):
    json = "json"
    table = "table"


def main() -> None:
    cli()


# -- serve ---------------------------------------------------------------------------------


@cli.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help="Interface to bind [default: HOST or 127.0.0.1].")
    ] = None,
    port: Annotated[int | None, typer.Option(help="TCP port [default: PORT or 8080].")] = None,
) -> None:
    """Run the server (webhooks, media WebSocket, probes, metrics).

    Without OPENAI_API_KEY (and OPENAI_REALTIME_URL left at OpenAI's) the local Realtime
    emulator is started in this process and calls are answered by it.
    """
    from app.logging_setup import configure_logging

    settings = _settings()
    configure_logging(settings.log_level)
    bind_host = host or settings.host
    bind_port = settings.port if port is None else port
    asyncio.run(_serve(settings, bind_host, bind_port))


async def _serve(settings: Settings, host: str, port: int) -> None:
    from app.main import create_app
    from app.settings import OPENAI_REALTIME_URL

    async with contextlib.AsyncExitStack() as stack:
        if not settings.uses_openai and settings.openai_realtime_url == OPENAI_REALTIME_URL:
            from bridge.sim.emulator import run_emulator

            emulator = await stack.enter_async_context(
                run_emulator(host="127.0.0.1", port=0, record=False)
            )
            settings = settings.model_copy(update={"openai_realtime_url": emulator.url})
            log.warning(
                "OPENAI_API_KEY is not set: calls are answered by the local Realtime emulator "
                "at %s (scenario %r: scripted, not a real model). Set OPENAI_API_KEY to use "
                "OpenAI.",
                emulator.url,
                emulator.scenario.name,
            )
        elif not settings.uses_openai:
            log.info("no OPENAI_API_KEY: Realtime server at %s", settings.openai_realtime_url)
        app = create_app(settings)
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,  # our JSON logging (configure_logging) handles uvicorn's lines too
            lifespan="on",
            ws_max_size=settings.max_frame_bytes,
        )
        await DrainingServer(config, app, settings.drain_timeout_s).serve()


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first SIGTERM/SIGINT drains before it stops.

    Draining: /readyz turns 503 (the load balancer stops sending calls), new calls hear a polite
    busy message, live calls run on until they end or `drain_timeout_s` passes; then the usual
    uvicorn shutdown. A second signal stops at once, as in plain uvicorn.
    """

    def __init__(self, config: uvicorn.Config, app: Starlette, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.drain_timeout_s = drain_timeout_s
        self.drain_task: asyncio.Task[None] | None = None
        self._drain_requested = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.started and not self._drain_requested and self._loop is not None:
            self._drain_requested = True
            # Signal handlers run between bytecodes; do the work on the loop.
            stop = functools.partial(uvicorn.Server.handle_exit, self, sig, frame)
            self._loop.call_soon_threadsafe(self.begin_drain, stop)
            return
        super().handle_exit(sig, frame)

    def begin_drain(self, then: Callable[[], None] | None = None) -> None:
        """Start draining (call on the server's loop); afterwards `then()`, else stop serving."""
        self._drain_requested = True
        if self.drain_task is not None:
            return
        services = self.app.state.services

        async def drain_then_stop() -> None:
            try:
                await services.drain(self.drain_timeout_s)
            finally:
                if then is not None:
                    then()
                else:
                    self.should_exit = True

        self.drain_task = asyncio.get_running_loop().create_task(drain_then_stop())


# -- emulate / call / demo -----------------------------------------------------------------


@cli.command()
def emulate(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8765,
    scenario: Annotated[
        str, typer.Option(help="Built-in scenario name (demo, echo, ...) or a scenario TOML file.")
    ] = "demo",
    echo: Annotated[
        bool, typer.Option(help="Echo the caller's audio back instead of speaking a script.")
    ] = False,
    speed: Annotated[
        float, typer.Option(help="Audio pacing: 1 real time, 4 four times faster, 0 unpaced.")
    ] = 1.0,
) -> None:
    """Run the local OpenAI Realtime emulator as its own server.

    Point a server at it with OPENAI_REALTIME_URL=ws://HOST:PORT/v1/realtime.
    """
    from app.logging_setup import configure_logging
    from bridge.sim.emulator import serve as serve_emulator
    from bridge.sim.scenario import ScenarioError, load_scenario

    configure_logging(_settings().log_level)
    try:
        load_scenario(scenario)  # a typo is an error message, not a traceback
    except ScenarioError as error:
        _fail(str(error))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_emulator(host, port, scenario, echo, speed=speed))


@cli.command()
def call(
    url: Annotated[
        str | None, typer.Option(help="Where the server listens [default: PUBLIC_URL].")
    ] = None,
    public_url: Annotated[
        str | None,
        typer.Option(help="URL the server checks signatures against [default: PUBLIC_URL]."),
    ] = None,
    to: Annotated[
        str | None, typer.Option(help="Number dialled [default: the first profile's].")
    ] = None,
    from_: Annotated[str, typer.Option("--from", help="Caller's number.")] = "+15005550199",
    script: Annotated[
        str, typer.Option(help="What the caller does: demo, barge_in or echo.")
    ] = "demo",
    wav: Annotated[
        Path | None,
        typer.Option(
            exists=True, dir_okay=False, help="Say this recording (instead of the script's turns)."
        ),
    ] = None,
    record: Annotated[
        Path | None, typer.Option(dir_okay=False, help="Save what the caller heard as a WAV.")
    ] = None,
    pace: Annotated[
        float, typer.Option(help="Clock: 1 real time, 0.5 twice as fast, 0 as fast as possible.")
    ] = 1.0,
) -> None:
    """Place a simulated call the way Twilio would: signed webhook, then the media stream."""
    from app.security import auth_token, uses_generated_token

    settings = _settings()
    if uses_generated_token(settings):
        _fail(
            "TWILIO_AUTH_TOKEN must be set (to the server's value): the simulated caller signs "
            "its webhooks with it, as Twilio does, and the server refuses unsigned calls."
        )
    from bridge.sim import caller

    if wav is not None:
        plan = caller.CallerScript(
            wav.stem,
            (
                caller.wait_for_agent(),
                caller.speak(wav),
                caller.wait_for_agent(30.0),
                caller.hang_up(),
            ),
        )
    elif script in caller.CALLER_SCRIPTS:
        plan = caller.CALLER_SCRIPTS[script]
    else:
        _fail(f"unknown script {script!r}; choose one of: {', '.join(caller.CALLER_SCRIPTS)}")
    if pace < 0:
        _fail("--pace must be 0 or more")
    try:
        report = asyncio.run(
            caller.place_call(
                server_url=url or settings.public_url,
                public_url=public_url or settings.public_url,
                auth_token=auth_token(settings),
                to=to or _profiles(settings).default.numbers[0],
                from_=from_,
                script=plan,
                record_wav=record,
                pace=pace,
                account_sid=settings.twilio_account_sid,
            )
        )
    except caller.CallFailed as error:
        _fail(f"the call failed: {error}", code=1)
    typer.echo(report.summary())
    if report.violations:
        raise typer.Exit(1)


@cli.command()
def demo() -> None:
    """Run a complete simulated call in this process: no Redis, PostgreSQL or keys needed."""
    from app.demo import main as demo_main

    result = demo_main()
    if isinstance(result, int) and result:
        raise typer.Exit(result)


# -- tools / seed-demo ---------------------------------------------------------------------


@cli.command("tools")
def list_tools(
    persona: Annotated[str, typer.Option(help="dispatcher, receptionist, crm_operator, ...")],
    output: Annotated[
        OutputFormat, typer.Option("--format", help="json or table.")
    ] = OutputFormat.json,
) -> None:
    """Print the tools a persona offers the model (json: exactly the Realtime `tools` list)."""
    from prompts.profiles import Persona
    from tools.registry import realtime_tools, tools_for

    personas = get_args(Persona)
    if persona not in personas:
        _fail(f"unknown persona {persona!r}; choose one of: {', '.join(personas)}")
    if output is OutputFormat.json:
        typer.echo(json.dumps(realtime_tools(persona), indent=2))
        return
    rows = [
        (t.name, t.risk, "yes" if t.needs_confirmation else "no", _first_sentence(t.description))
        for t in tools_for(persona)
    ]
    typer.echo(_table(("tool", "risk", "confirm", "description"), rows))


@cli.command("seed-demo")
def seed_demo(
    tenant: Annotated[
        str | None, typer.Option(help="Profile id [default: the first profile].")
    ] = None,
    today: Annotated[
        datetime | None,
        typer.Option(
            formats=["%Y-%m-%d"], help="Date the demo data is relative to [default: today]."
        ),
    ] = None,
) -> None:
    """Fill DATABASE_URL with demo customers, jobs and bookings for one profile."""
    settings = _settings()
    profiles = _profiles(settings)
    tenant_id = tenant or profiles.default.id
    profile = profiles.by_id(tenant_id)
    if profile is None:
        known = ", ".join(p.id for p in profiles.profiles)
        _fail(f"unknown profile {tenant_id!r}; profiles: {known}")
    day = today.date() if today is not None else None
    counts = asyncio.run(_seed(settings.database_url, profile, day))
    if not counts:
        typer.echo(f"The demo data for {profile.id} is already there; nothing added.")
        return
    typer.echo(f"Added demo data for {profile.id}:")
    typer.echo(_table(("table", "rows added"), [(name, str(n)) for name, n in counts.items()]))


async def _seed(database_url: str, profile: BusinessProfile, today: date | None) -> dict[str, int]:
    from tools.db.engine import make_engine, make_sessionmaker, migrate
    from tools.seed import seed_demo as seed

    await migrate(database_url)
    engine = make_engine(database_url)
    try:
        return await seed(make_sessionmaker(engine), profile.id, today=today, profile=profile)
    finally:
        await engine.dispose()


# -- helpers -------------------------------------------------------------------------------


def _settings() -> Settings:
    from pydantic import ValidationError

    from app.settings import Settings

    try:
        return Settings()
    except ValidationError as error:
        _fail(f"bad configuration:\n{error}")


def _profiles(settings: Settings) -> ProfileBook:
    from prompts.profiles import load_profiles

    try:
        return load_profiles(settings.profiles_file)
    except (OSError, ValueError) as error:  # pydantic's ValidationError is a ValueError
        _fail(f"cannot load profiles from {settings.profiles_file or 'the demo file'}: {error}")


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _first_sentence(text: str, limit: int = 90) -> str:
    line = " ".join(text.strip().split("\n\n", 1)[0].split())  # first paragraph, unwrapped
    sentence = line.split(". ", 1)[0]
    if sentence != line:
        sentence += "."
    return sentence if len(sentence) <= limit else sentence[: limit - 1].rstrip() + "…"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [header, tuple("-" * w for w in widths), *rows]
    return "\n".join(
        "  ".join(str(cell).ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )
