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
import math
from collections.abc import Callable, Coroutine
from datetime import date, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, get_args

import typer
import uvicorn

from app.serving import ProcessServer

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
    configure_logging(settings.log_level, redact=settings.log_redact_phone_numbers)
    bind_host = host or settings.host
    bind_port = settings.port if port is None else port
    run_server_loop(_serve(settings, bind_host, bind_port))


def run_server_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run the server on uvloop where it is installed (it comes with uvicorn[standard]).

    Measured with `switchboard loadtest --calls 50 --repeat 3`: 12.2 -> 10.2 server CPU-ms per
    call-second and a lower p99; docs/performance.md has the runs.
    """
    try:
        import uvloop
    except ImportError:  # e.g. Windows: the stdlib loop works, just slower
        asyncio.run(main)
        return
    uvloop.run(main)


async def _serve(settings: Settings, host: str, port: int) -> None:
    from app.main import create_app
    from app.serving import server_config
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
        config = server_config(
            app,
            settings,
            host=host,
            port=port,
            log_config=None,  # our JSON logging (configure_logging) handles uvicorn's lines too
        )
        await DrainingServer(config, app, settings.drain_timeout_s).serve()


class DrainingServer(ProcessServer):
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
            # Signal handlers run between bytecodes; do the work on the loop. The drain ends
            # in a plain stop, not uvicorn's signal path, which re-raises the signal when it
            # is done (exit status -15): a graceful drain is a clean exit, status 0.
            self._loop.call_soon_threadsafe(self.begin_drain)
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


# -- loadtest / bench ----------------------------------------------------------------------


class AudioModeOption(enum.StrEnum):
    pcm16 = "pcm16"
    g711 = "g711"


@cli.command()
def loadtest(
    calls: Annotated[int, typer.Option(min=1, max=5000, help="Concurrent simulated calls.")] = 100,
    duration: Annotated[
        float, typer.Option(min=2.0, max=3600.0, help="Seconds of measured audio per call.")
    ] = 20.0,
    mode: Annotated[AudioModeOption, typer.Option(help="Audio mode.")] = AudioModeOption.pcm16,
    workers: Annotated[
        int, typer.Option(min=1, max=64, help="Server processes sharing the port.")
    ] = 1,
    url: Annotated[
        str | None, typer.Option(help="Target a running server instead of starting one.")
    ] = None,
    server_pid: Annotated[
        list[int] | None, typer.Option(help="With --url: server pid(s) to read CPU/RSS from.")
    ] = None,
    allow_remote: Annotated[
        bool, typer.Option(help="Allow a --url that is not a loopback address.")
    ] = False,
    find_capacity: Annotated[
        bool, typer.Option(help="Step --calls up by --step until p99 > 50 ms or audio < 99 %.")
    ] = False,
    step: Annotated[int, typer.Option(min=1, help="With --find-capacity: calls added.")] = 50,
    max_calls: Annotated[
        int, typer.Option(min=1, help="With --find-capacity: upper bound.")
    ] = 2000,
    repeat: Annotated[
        int, typer.Option(min=1, max=100, help="Runs on one server; medians are reported.")
    ] = 1,
    loop: Annotated[
        str, typer.Option(help="Server event loop: uvloop (as `serve` uses) or asyncio.")
    ] = "uvloop",
    ws: Annotated[
        str,
        typer.Option(
            help="Media socket stack: picows (as `serve` runs it) or, to compare, one of "
            "uvicorn's: auto, websockets, websockets-sansio, wsproto."
        ),
    ] = "picows",
    pin: Annotated[bool, typer.Option(help="Pin server worker i to core i.")] = True,
    profile_dir: Annotated[
        Path | None, typer.Option(file_okay=False, help="cProfile each worker into this folder.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Measure capacity: N simulated Twilio callers against the server and the echo emulator.

    Prints the added round trip (p50/p95/p99/max), audio returned, barge-in reaction, server
    CPU-ms per call-second and RSS per call, and errors. Loopback only unless --allow-remote.
    """
    from dataclasses import asdict

    from app import loadtest as lt
    from app.serving import WS_CHOICES

    if loop not in ("uvloop", "asyncio"):
        _fail("--loop must be uvloop or asyncio")
    if ws not in WS_CHOICES:
        _fail(f"--ws must be one of: {', '.join(WS_CHOICES)}")
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    options = lt.ServerOptions(
        mode=mode.value,
        workers=workers,
        loop=loop,
        ws=ws,
        pin=pin,
        profile_dir=profile_dir,
    )
    progress = functools.partial(typer.echo, err=True)
    try:
        if find_capacity:
            if url is not None:
                _fail("--find-capacity starts its own server; leave out --url")
            result = lt.find_capacity(
                duration,
                server=options,
                start=calls,
                step=step,
                max_calls=max_calls,
                progress=progress,
            )
            if as_json:
                typer.echo(json.dumps(result, indent=2))
                return
            for report in result["steps"]:
                typer.echo(lt.format_report(lt.Report(**report)) + "\n")
            typer.echo(
                f"highest N that held (p99 <= {lt.CAPACITY_P99_MS:g} ms, audio >= "
                f"{lt.CAPACITY_AUDIO_PCT:g} %, no errors): {result['held_calls']} calls, "
                f"{result['held_calls_per_worker']} per worker"
            )
            return
        settings = _settings() if url is not None else None
        reports = lt.loadtest_runs(
            calls,
            duration,
            server=options,
            repeat=repeat,
            url=url,
            public_url=settings.public_url if settings is not None else None,
            auth_token=_auth_token_for(settings) if settings is not None else None,
            to=_profiles(settings).default.numbers[0] if settings is not None else None,
            server_pids=server_pid,
            allow_remote=allow_remote,
            progress=progress,
        )
    except lt.LoadTestError as error:
        _fail(str(error), code=1)
    if as_json:
        body: dict[str, Any] = {"runs": [asdict(r) for r in reports]}
        if repeat > 1:
            body["medians"] = lt.medians(reports)
        typer.echo(json.dumps(body, indent=2))
    else:
        for report in reports:
            typer.echo(lt.format_report(report) + "\n")
        if repeat > 1:
            typer.echo("medians: " + json.dumps(lt.medians(reports)))
    if any(r.errors for r in reports):
        raise typer.Exit(1)


def _auth_token_for(settings: Settings) -> str:
    from app.security import auth_token, uses_generated_token

    if uses_generated_token(settings):
        _fail("TWILIO_AUTH_TOKEN must be set (to the server's value) to sign the test calls")
    return auth_token(settings)


bench = typer.Typer(help="Micro-benchmarks of the hot path.", no_args_is_help=True)
cli.add_typer(bench, name="bench")


@bench.command("codec")
def bench_codec(
    frames: Annotated[int, typer.Option(min=1, max=1_000_000, help="Frames per run.")] = 5000,
    repeats: Annotated[int, typer.Option(min=1, max=50, help="Runs; medians reported.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Per-20 ms-frame cost of each direction of the audio path, in both audio modes."""
    from bridge.codec_bench import run_codec_bench

    results = run_codec_bench(frames=frames, repeats=repeats)
    if as_json:
        typer.echo(json.dumps(results, indent=2))
        return
    rows = [(name.removesuffix("_us"), f"{us:.2f}") for name, us in results.items()]
    typer.echo(_table(("path (per 20 ms frame)", "µs"), rows))


@bench.command("audio")
def bench_audio(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Audio quality of the resamplers: stopband, passband ripple, images, frame joins, delay."""
    from dataclasses import asdict

    from bridge.audio_quality import main as print_quality
    from bridge.audio_quality import measure

    if as_json:
        # -inf dB (bit-identical output) is not JSON: non-finite figures go out as text.
        figures = {k: v if math.isfinite(v) else str(v) for k, v in asdict(measure()).items()}
        typer.echo(json.dumps(figures, indent=2))
        return
    print_quality()


# -- outbox --------------------------------------------------------------------------------


@cli.command()
def outbox(
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="Most messages shown.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Texts that did not reach Twilio: the local outbox (no Twilio credentials), texts still
    sending, and dead letters (refused by Twilio or out of retries). Newest first."""
    settings = _settings()
    entries = asyncio.run(_unsent(settings.database_url, limit))
    if as_json:
        typer.echo(json.dumps([_outbox_row(e) for e in entries], indent=2, default=str))
        return
    if not entries:
        typer.echo("The outbox is empty: every text reached Twilio.")
        return
    rows = [
        (
            f"{e.created_at:%Y-%m-%d %H:%M:%S}",
            e.tenant,
            e.to,
            e.status + (f" ({e.error_code})" if e.error_code else ""),
            e.reason or "",
            " ".join(e.body.split()),
        )
        for e in entries
    ]
    typer.echo(_table(("when (UTC)", "tenant", "to", "status", "reason", "text"), rows))


async def _unsent(database_url: str, limit: int) -> list[Any]:
    from tools.db.engine import make_engine, make_sessionmaker, migrate
    from tools.notify import unsent_messages

    await migrate(database_url)
    engine = make_engine(database_url)
    try:
        return await unsent_messages(make_sessionmaker(engine), limit=limit)
    finally:
        await engine.dispose()


def _outbox_row(entry: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(entry)


@cli.command("spool")
def spool_command(
    replay: Annotated[
        bool, typer.Option("--replay", help="Write the waiting records to the database now.")
    ] = False,
) -> None:
    """Call records and leads kept on local disk (SPOOL_DIR) while the database was down.

    A running server writes them by itself once the database answers; `--replay` does it now.
    Records the database refused (not an outage) are listed under failed/ for a person."""
    from tools.spool import Spool

    settings = _settings()
    spool = Spool(settings.spool_dir)
    if replay:
        report = asyncio.run(_replay_spool(settings, spool))
        outage = " (the database is still unreachable)" if report.outage else ""
        typer.echo(
            f"written: {report.written}, set aside: {report.failed}, "
            f"still waiting: {report.remaining}{outage}"
        )
    rows = [
        (path.name.split("-")[1], state, f"{path.stat().st_size} B", path.name)
        for state, paths in (("waiting", spool.entries()), ("failed", spool.failed_entries()))
        for path in paths
    ]
    if not rows:
        typer.echo(f"The spool ({settings.spool_dir}) is empty: every record reached the database.")
        return
    typer.echo(_table(("kind", "state", "size", "file"), rows))


async def _replay_spool(settings: Settings, spool: Any) -> Any:
    import fakeredis

    from tools.db.engine import make_engine, make_sessionmaker
    from tools.spool import store_replayers

    engine = make_engine(settings.database_url)
    # Replaying writes SQL only; the conversation log a tool context carries is never read.
    kv = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(), decode_responses=True)
    try:
        replayers = store_replayers(make_sessionmaker(engine), kv, _profiles(settings).by_id)
        return await spool.replay(replayers)
    finally:
        await kv.aclose()
        await engine.dispose()
