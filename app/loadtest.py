"""`switchboard loadtest`: how many calls one core carries, and what the bridge adds to each.

Three kinds of process, so that each one's CPU is its own:

* the server under test: `python -m app.loadtest worker`, W of them sharing one port
  (SO_REUSEPORT), worker i pinned to core i; configured through the environment like
  `switchboard serve`, with the Realtime URL pointing at
* the echo emulator (`python -m bridge.sim.load emulator`), pinned away from the first core
  when the machine has more than one, and
* this process: the load generator (`bridge.sim.load.run_load`), also kept off the first core.

Server CPU comes from /proc/<pid>/stat (utime + stime) over a window in which every call is
streaming; RSS from /proc/<pid>/status. Every loop is bounded in count and time, and every
process started here is stopped here, by its pid.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import secrets
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from app.metrics import metric_sample
from bridge.audio import ROUND_TRIP_DELAY_MS
from bridge.sim.load import CallResult, LoadPlan, Progress, run_load

CAPACITY_P99_MS = 50.0
CAPACITY_AUDIO_PCT = 99.0
STARTUP_TIMEOUT_S = 60.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class LoadTestError(RuntimeError):
    """The load test could not run (a process did not start, a bad target, ...)."""


# --- what a run reports ----------------------------------------------------------------------


@dataclass(slots=True)
class Report:
    calls: int
    duration_s: float
    mode: str
    workers: int
    completed_calls: int
    latency_ms: dict[str, float | None]  # added round trip, by byte position of returned audio
    algorithmic_delay_ms: float  # resampler delay inside the returned audio (pcm16 only)
    audio_returned_pct: float
    barge_in_ms: dict[str, float | None]  # speech_started sent -> response.cancel received
    barge_in_clear_loop_ms: dict[str, float | None]  # trigger frame sent -> clear received
    cpu_ms_per_call_s: float | None
    cpu_window_s: float | None
    rss_per_call_kib: float | None
    rss_mib: dict[str, float | None]  # baseline / peak / after (summed over workers)
    errors: int
    error_samples: list[str] = field(default_factory=list)
    # speech_started arrived -> clear sent, timed by the server itself (its histogram's bucket
    # bounds; one worker only: with --workers each scrape reaches just one of them)
    barge_in_server_ms: dict[str, float | None] = field(default_factory=dict)
    generator_late_ticks_pct: float = 0.0
    machine: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # why figures may not be the server's

    def held(self) -> bool:
        p99 = self.latency_ms.get("p99")
        return (
            self.errors == 0
            and p99 is not None
            and p99 <= CAPACITY_P99_MS
            and self.audio_returned_pct >= CAPACITY_AUDIO_PCT
        )


def percentiles(values: Any) -> dict[str, float | None]:
    data = np.asarray(values, dtype=np.float64)
    if not len(data):
        return {"p50": None, "p95": None, "p99": None, "max": None, "count": 0}
    p50, p95, p99 = np.percentile(data, [50, 95, 99])
    return {
        "p50": round(float(p50), 3),
        "p95": round(float(p95), 3),
        "p99": round(float(p99), 3),
        "max": round(float(data.max()), 3),
        "count": len(data),
    }


def summarize(
    results: list[CallResult],
    *,
    calls: int,
    duration_s: float,
    mode: str,
    workers: int,
    emulator: dict[str, Any] | None,
    usage: Usage | None,
) -> Report:
    latencies = np.concatenate([np.frombuffer(r.latencies_ms, dtype=np.float64) for r in results])
    sent = sum(r.sent_bytes for r in results)
    returned = sum(r.returned_bytes for r in results)
    errors = [f"call {r.index}: {e}" for r in results for e in r.errors]
    errors += [
        f"call {r.index}: {r.ahead} chunk(s) returned before sent" for r in results if r.ahead
    ]
    if emulator is not None and emulator.get("errors_sent"):
        errors.append(f"emulator sent {emulator['errors_sent']} error event(s) to the bridge")
    frames = sum(r.frames_sent for r in results) or 1
    cpu = rss_per_call = window = None
    rss: dict[str, float | None] = {"baseline": None, "peak": None, "after": None}
    if usage is not None:
        window = usage.window_s
        call_s = usage.call_seconds(results)
        if call_s > 0 and usage.cpu_ms is not None:
            cpu = round(usage.cpu_ms / call_s, 3)
        rss = {k: _mib(v) for k, v in usage.rss_kib.items()}
        if usage.rss_kib["loaded"] is not None and usage.rss_kib["baseline"] is not None:
            rss_per_call = round((usage.rss_kib["loaded"] - usage.rss_kib["baseline"]) / calls, 1)
    return Report(
        calls=calls,
        duration_s=duration_s,
        mode=mode,
        workers=workers,
        completed_calls=sum(1 for r in results if not r.errors),
        latency_ms=percentiles(latencies),
        algorithmic_delay_ms=ROUND_TRIP_DELAY_MS if mode == "pcm16" else 0.0,
        audio_returned_pct=round(100.0 * returned / sent, 3) if sent else 0.0,
        barge_in_ms=percentiles(emulator["reaction_ms"] if emulator else []),
        barge_in_clear_loop_ms=percentiles(
            [r.clear_after_ms for r in results if r.clear_after_ms is not None]
        ),
        cpu_ms_per_call_s=cpu,
        cpu_window_s=window,
        rss_per_call_kib=rss_per_call,
        rss_mib=rss,
        errors=len(errors),
        error_samples=errors[:10],
        generator_late_ticks_pct=round(100.0 * sum(r.late_ticks for r in results) / frames, 3),
        machine=machine_info(),
    )


def _mib(kib: float | None) -> float | None:
    return None if kib is None else round(kib / 1024.0, 1)


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def format_report(report: Report) -> str:
    def ms(stats: dict[str, float | None], keys: tuple[str, ...]) -> str:
        return "  ".join(f"{k} {_num(stats.get(k))}" for k in keys)

    rss = report.rss_mib
    lines = [
        f"calls {report.calls} x {report.duration_s:g} s, mode {report.mode}, "
        f"workers {report.workers}: {report.completed_calls} completed",
        "added round trip (ms, by byte position): "
        + ms(report.latency_ms, ("p50", "p95", "p99", "max"))
        + (
            f"  (+{report.algorithmic_delay_ms:g} ms resampler delay in the audio)"
            if report.algorithmic_delay_ms
            else ""
        ),
        f"audio returned: {report.audio_returned_pct:.2f} %",
        "barge-in, speech_started sent -> cancel received (ms): "
        + ms(report.barge_in_ms, ("p50", "p99", "max")),
        "barge-in, trigger frame sent -> clear received (ms): "
        + ms(report.barge_in_clear_loop_ms, ("p50", "p99", "max")),
        "barge-in, speech_started arrived -> clear sent, in the server (ms, at most): "
        + ms(report.barge_in_server_ms, ("p50", "p99"))
        + f"  ({int(report.barge_in_server_ms.get('count') or 0)} timed)",
        f"server CPU: {_num(report.cpu_ms_per_call_s)} ms per call-second "
        f"(window {_num(report.cpu_window_s)} s)",
        f"server RSS: {_num(report.rss_per_call_kib)} KiB per call; MiB baseline "
        f"{_num(rss['baseline'])}, peak {_num(rss['peak'])}, after {_num(rss['after'])}",
        f"errors: {report.errors}",
        *(f"  {e}" for e in report.error_samples),
        f"load generator late ticks: {report.generator_late_ticks_pct:.2f} %, "
        f"load average {report.machine.get('load_avg_1m')} on {report.machine.get('cores')} cores"
        f", helpers' CPU (% of a core): {report.machine.get('helper_cpu_pct')}"
        f", steal {report.machine.get('steal_pct', '-')} %",
        *(f"warning: {w}" for w in report.warnings),
    ]
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# --- /proc readings ------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (from /proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "(comm)", which may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cpu_steal_ticks(proc_stat: str) -> tuple[int, int]:
    """(steal, total) clock ticks of all CPUs so far, from the text of /proc/stat.

    Steal is time a virtual CPU was ready to run but the hypervisor ran something else: on a
    shared VM it is why the same work costs more CPU-ms in one hour than in another.
    """
    fields = proc_stat.split("\n", 1)[0].split()
    if not fields or fields[0] != "cpu":
        raise LoadTestError("/proc/stat does not start with the 'cpu' line")
    ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    return (ticks[7] if len(ticks) > 7 else 0), sum(ticks)


def steal_pct(before: tuple[int, int], after: tuple[int, int]) -> float:
    total = after[1] - before[1]
    return round(100.0 * (after[0] - before[0]) / total, 2) if total > 0 else 0.0


def _read_steal() -> tuple[int, int] | None:
    try:
        return cpu_steal_ticks(Path("/proc/stat").read_text())
    except (OSError, LoadTestError, ValueError):
        return None  # not Linux, or an unexpected layout: the figure is left out


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise LoadTestError(f"no VmRSS for pid {pid}")


@dataclass(slots=True)
class Usage:
    """Server CPU over the steady window, and RSS at baseline / loaded / peak / after."""

    window_start: float = 0.0  # monotonic
    window_end: float = 0.0
    cpu_ms: float | None = None
    rss_kib: dict[str, float | None] = field(
        default_factory=lambda: {"baseline": None, "loaded": None, "peak": None, "after": None}
    )

    @property
    def window_s(self) -> float | None:
        span = self.window_end - self.window_start
        return round(span, 3) if span > 0 else None

    def call_seconds(self, results: list[CallResult]) -> float:
        """Call-seconds of live media streams inside the CPU window."""
        total = 0.0
        for r in results:
            if not r.streaming_at:
                continue
            end = r.ended_at or self.window_end
            total += max(0.0, min(end, self.window_end) - max(r.streaming_at, self.window_start))
        return total


async def sample_usage(
    pids: list[int], usage: Usage, start_in_s: float, length_s: float, stop: asyncio.Event
) -> None:
    """CPU over [start, start + length]; RSS peak sampled every 0.5 s until `stop`."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    cpu0: float | None = None
    peak = 0
    for _ in range(int((start_in_s + length_s) / 0.5) + 400):  # bounded
        now = loop.time() - began
        with contextlib.suppress(OSError):
            peak = max(peak, sum(rss_kib(p) for p in pids))
            usage.rss_kib["peak"] = peak
            if cpu0 is None and now >= start_in_s:
                cpu0 = sum(cpu_seconds(p) for p in pids)
                usage.window_start = time.monotonic()
            elif cpu0 is not None and usage.cpu_ms is None and now >= start_in_s + length_s:
                usage.cpu_ms = (sum(cpu_seconds(p) for p in pids) - cpu0) * 1000.0
                usage.window_end = time.monotonic()
                usage.rss_kib["loaded"] = sum(rss_kib(p) for p in pids)
        if stop.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


# --- child processes ------------------------------------------------------------------------------


@dataclass
class Child:
    name: str
    process: subprocess.Popen[str]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def read_line(self, timeout_s: float) -> dict[str, Any]:
        """The next JSON line the child prints (bounded wait)."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
                    break
                line = self.process.stdout.readline()
                if not line:
                    break
                with contextlib.suppress(ValueError):
                    return json.loads(line)
        raise LoadTestError(f"{self.name} did not answer in {timeout_s:g} s{self.tail()}")

    def command(self, text: str, timeout_s: float = 10.0) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()
        return self.read_line(timeout_s)

    def tail(self) -> str:
        with contextlib.suppress(OSError):
            text = self.log.read_text()[-2000:]
            if text.strip():
                return f"; its log ends with:\n{text}"
        return ""

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def _spawn(name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None) -> Child:
    log = workdir / f"{name}.log"
    handle: IO[str] = log.open("w")
    process = subprocess.Popen(
        [sys.executable, *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=handle,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=os.getcwd(),
    )
    handle.close()
    return Child(name, process, log)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return list(range(os.cpu_count() or 1))


@dataclass(slots=True)
class ServerOptions:
    mode: str = "pcm16"
    workers: int = 1
    loop: str = "uvloop"  # as `switchboard serve` runs
    # As `switchboard serve` runs: the media socket on picows; or one of uvicorn's own stacks
    # (auto, websockets, websockets-sansio, wsproto) to compare against.
    ws: str = "picows"
    pin: bool = True
    profile_dir: Path | None = None
    max_calls_per_worker: int = 10_000


@dataclass
class Stack:
    """The processes under test: emulator, optional redis, W server workers."""

    url: str
    auth_token: str
    to: str
    workers: list[Child]
    emulator: Child | None
    others: list[Child]

    @property
    def server_pids(self) -> list[int]:
        return [w.pid for w in self.workers]


@contextlib.contextmanager
def start_stack(options: ServerOptions, barge_in_at_ms: float | None) -> Iterator[Stack]:
    from prompts.profiles import load_profiles

    cores = _cores()
    server_cores = cores[: options.workers] if options.pin else []
    # The emulator and this process keep off the server's cores when there are cores to spare.
    spare = [c for c in cores if c not in server_cores] or cores
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setaffinity(0, set(spare))
    workdir = Path(tempfile.mkdtemp(prefix="switchboard-load-"))
    children: list[Child] = []
    try:
        emulator_args = ["-m", "bridge.sim.load", "emulator"]
        if barge_in_at_ms is not None:
            emulator_args += ["--barge-in-at-ms", str(barge_in_at_ms)]
        for core in spare:
            emulator_args += ["--cpu", str(core)]
        emulator = _spawn("emulator", emulator_args, workdir)
        children.append(emulator)
        realtime_url = emulator.read_line(STARTUP_TIMEOUT_S)["url"]
        redis_url = os.environ.get("REDIS_URL")
        others: list[Child] = []
        if options.workers > 1 and not redis_url:
            # Stream tokens minted by one worker are burned by whichever worker gets the
            # media socket: with several workers the token store must be shared.
            redis_url = _start_redis(workdir, others)
            children.extend(others)
        port = _free_port()
        auth_token = secrets.token_hex(16)
        env = {
            "PUBLIC_URL": f"http://127.0.0.1:{port}",
            "OPENAI_REALTIME_URL": realtime_url,
            "TWILIO_AUTH_TOKEN": auth_token,
            "AUDIO_MODE": options.mode,
            "MAX_CONCURRENT_CALLS": str(options.max_calls_per_worker),
            "MAX_CALLS_PER_CALLER_PER_MIN": "1000000",
            "LOG_LEVEL": "WARNING",
        }
        env.pop("OPENAI_API_KEY", None)
        if redis_url:
            env["REDIS_URL"] = redis_url
        workers = []
        for i in range(options.workers):
            argv = ["-m", "app.loadtest", "worker", "--port", str(port)]
            argv += ["--loop", options.loop, "--ws", options.ws]
            if server_cores:
                argv += ["--cpu", str(server_cores[i % len(server_cores)])]
            if options.profile_dir is not None:
                argv += ["--profile", str(options.profile_dir / f"worker{i}.prof")]
            worker_env = {**env, "DATABASE_URL": f"sqlite+aiosqlite:///{workdir}/worker{i}.db"}
            worker = _spawn(f"worker{i}", argv, workdir, worker_env)
            children.append(worker)
            workers.append(worker)
        for worker in workers:
            worker.read_line(STARTUP_TIMEOUT_S)
        to = load_profiles(None).default.numbers[0]
        yield Stack(f"http://127.0.0.1:{port}", auth_token, to, workers, emulator, others)
    finally:
        for child in reversed(children):
            child.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setaffinity(0, set(cores))


def _start_redis(workdir: Path, children: list[Child]) -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise LoadTestError("--workers > 1 needs a shared Redis: set REDIS_URL or install redis")
    port = _free_port()
    log = workdir / "redis.log"
    with log.open("w") as handle:
        process = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
            ],
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
    children.append(Child("redis", process, log))
    for _ in range(100):  # bounded: 10 s
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
            return f"redis://127.0.0.1:{port}/0"
        time.sleep(0.1)
    raise LoadTestError(f"redis-server did not start{children[-1].tail()}")


# --- one run ------------------------------------------------------------------------------------


@dataclass(slots=True)
class RunOptions:
    calls: int
    duration_s: float
    ramp_s: float | None = None
    warmup: bool = True
    progress: Callable[[str], None] | None = None


def check_loopback(url: str, allow_remote: bool) -> None:
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not allow_remote:
        raise LoadTestError(
            f"{url} is not a loopback address; a load test hammers its target "
            "(pass --allow-remote if that machine is yours)"
        )


def ramp_for(duration_s: float, ramp_s: float | None) -> float:
    return min(2.0, duration_s / 4) if ramp_s is None else ramp_s


async def measure(
    plan: LoadPlan,
    run: RunOptions,
    *,
    server_pids: list[int],
    emulator: Child | None,
    mode: str,
    workers: int,
) -> Report:
    ramp = ramp_for(run.duration_s, run.ramp_s)
    if run.warmup:
        # One short call first: the first call imports and caches what every later one shares.
        warm = LoadPlan(**{**asdict(plan), "duration_s": 0.5, "barge_in": False})
        await run_load(warm, 1, ramp_s=0.0)
    if emulator is not None:
        emulator.command("reset")
    server_timed = workers == 1 and emulator is not None  # our stack, with its barge-ins
    buckets_before = await barge_in_buckets(plan.server_url) if server_timed else {}
    usage = Usage()
    with contextlib.suppress(OSError):
        usage.rss_kib["baseline"] = sum(rss_kib(p) for p in server_pids)
    stop = asyncio.Event()
    # Every call streams from the end of the ramp (plus call set-up) to the end of the first
    # call's measured audio: that is the steady window.
    window_start = ramp + 0.5
    window_len = max(0.5, run.duration_s - ramp - 0.7)
    sampler = asyncio.create_task(sample_usage(server_pids, usage, window_start, window_len, stop))
    helpers_before, helpers_since = _helper_cpu(emulator), time.monotonic()
    steal_before = _read_steal()

    def show(progress: Progress, elapsed: float) -> None:
        if run.progress is not None:
            run.progress(
                f"[{elapsed:5.1f} s] started {progress.started}/{run.calls}  "
                f"streaming {progress.streaming}  finished {progress.finished}  "
                f"failed {progress.failed}"
            )

    try:
        results = await run_load(plan, run.calls, ramp_s=ramp, on_progress=show)
    finally:
        stop.set()
        await sampler
    await asyncio.sleep(1.0)  # let the servers finish saving the calls
    buckets_after = await barge_in_buckets(plan.server_url, settled=True) if server_timed else {}
    with contextlib.suppress(OSError):
        usage.rss_kib["after"] = sum(rss_kib(p) for p in server_pids)
    elapsed = max(1e-3, time.monotonic() - helpers_since)
    helper_cpu = {
        name: round(100.0 * (after - helpers_before.get(name, after)) / elapsed, 1)
        for name, after in _helper_cpu(emulator).items()
    }
    emulator_stats = emulator.command("stats") if emulator is not None else None
    report = summarize(
        results,
        calls=run.calls,
        duration_s=run.duration_s,
        mode=mode,
        workers=workers,
        emulator=emulator_stats,
        usage=usage if server_pids else None,
    )
    report.machine["helper_cpu_pct"] = helper_cpu
    steal_after = _read_steal()
    if steal_before is not None and steal_after is not None:
        report.machine["steal_pct"] = steal_pct(steal_before, steal_after)
    if server_timed:
        report.barge_in_server_ms = histogram_quantiles(buckets_before, buckets_after)
    report.warnings = measurement_warnings(report)
    return report


BARGE_IN_HISTOGRAM = "switchboard_barge_in_reaction_seconds"


async def barge_in_buckets(url: str, *, settled: bool = False) -> dict[float, float]:
    """The server's barge-in reaction histogram: cumulative count per bucket bound (s).

    `settled`: first wait (bounded) until the server has no call left: a call's samples are
    observed as it ends.
    """
    async with httpx.AsyncClient(timeout=5.0) as http:
        for _ in range(100):  # bounded: 10 s
            text = (await http.get(url.rstrip("/") + "/metrics")).text
            if not settled or metric_sample(text, "switchboard_active_calls") == 0:
                break
            await asyncio.sleep(0.1)
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == BARGE_IN_HISTOGRAM + "_bucket":
                buckets[float(sample.labels["le"])] = sample.value
    return buckets


def histogram_quantiles(
    before: dict[float, float], after: dict[float, float]
) -> dict[str, float | None]:
    """p50/p99 (ms) of what a cumulative histogram gained between two scrapes, each as the
    bound of the bucket it falls in (an upper bound; None past the last finite bound)."""
    bounds = sorted(after)
    gained = [after[b] - before.get(b, 0.0) for b in bounds]
    total = gained[-1] if gained else 0.0
    result: dict[str, float | None] = {"p50": None, "p99": None, "count": total}
    if total <= 0:
        return result
    for name, q in (("p50", 0.50), ("p99", 0.99)):
        bound = next(b for b, n in zip(bounds, gained, strict=True) if n >= q * total)
        result[name] = None if bound == float("inf") else round(bound * 1000.0, 3)
    return result


# On the development VM steal stays under 1 % in quiet hours; runs with 10 % measured ~25 % more
# CPU per call-second and p99s of 50-250 ms.
STEAL_WARNING_PCT = 2.0


def measurement_warnings(report: Report) -> list[str]:
    """Conditions under which latency and audio figures describe the machine, not the server."""
    warnings = []
    if report.generator_late_ticks_pct > 1.0:
        warnings.append(
            f"the load generator missed {report.generator_late_ticks_pct:.1f} % of its 20 ms "
            "ticks: it could not keep real-time pace, so latencies include its own lag"
        )
    steal = report.machine.get("steal_pct") or 0.0
    if steal > STEAL_WARNING_PCT:
        warnings.append(
            f"the hypervisor took {steal:g} % of the machine's CPU time (steal): the machine "
            "ran slower than usual, so CPU-ms per call-second and latencies are inflated; "
            "compare runs with little steal"
        )
    load, cores = report.machine.get("load_avg_1m", 0.0), report.machine.get("cores") or 1
    if load > cores:
        warnings.append(
            f"load average {load:g} on {cores} cores: other processes compete for the CPU; "
            "latency percentiles include scheduling delay, and CPU-ms per call-second is "
            "understated when the server cannot keep up (check the latency first)"
        )
    return warnings


def _helper_cpu(emulator: Child | None) -> dict[str, float]:
    """CPU seconds so far of the load generator (this process) and the emulator."""
    times = os.times()
    cpu = {"load_generator": times.user + times.system}
    if emulator is not None:
        with contextlib.suppress(OSError):
            cpu["emulator"] = cpu_seconds(emulator.pid)
    return cpu


def loadtest_runs(
    calls: int,
    duration_s: float,
    *,
    server: ServerOptions,
    repeat: int = 1,
    url: str | None = None,
    public_url: str | None = None,
    auth_token: str | None = None,
    to: str | None = None,
    server_pids: list[int] | None = None,
    allow_remote: bool = False,
    progress: Callable[[str], None] | None = None,
    ramp_s: float | None = None,
) -> list[Report]:
    """`repeat` load tests against one server (started here, or `url`), one report each.

    The same server serves every run, so its RSS after each run shows whether memory grows
    with the calls it has served.
    """
    if not 1 <= repeat <= 100:
        raise ValueError("repeat must be 1 to 100")
    run = RunOptions(calls, duration_s, ramp_s, progress=progress)
    runner = _event_loop_runner("uvloop")  # the load generator: lean, not under test
    with contextlib.ExitStack() as scope:
        if url is not None:
            check_loopback(url, allow_remote)
            if not auth_token or not to:
                raise LoadTestError("targeting --url needs the server's auth token and a number")
            public = public_url or url  # what the server signs against (its PUBLIC_URL)
            plan = LoadPlan(url, public, auth_token, to, duration_s=duration_s, barge_in=False)
            pids, emulator = server_pids or [], None
        else:
            stack = scope.enter_context(start_stack(server, barge_in_at_ms=duration_s * 1000.0))
            plan = LoadPlan(stack.url, stack.url, stack.auth_token, stack.to, duration_s=duration_s)
            pids, emulator = stack.server_pids, stack.emulator
        return [
            runner(
                measure(
                    plan,
                    run,
                    server_pids=pids,
                    emulator=emulator,
                    mode=server.mode,
                    workers=server.workers,
                )
            )
            for _ in range(repeat)
        ]


def find_capacity(
    duration_s: float,
    *,
    server: ServerOptions,
    start: int = 50,
    step: int = 50,
    max_calls: int = 2000,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Step N up until p99 > 50 ms, audio < 99 % or errors; the highest N that held."""
    steps: list[dict[str, Any]] = []
    best: int | None = None
    runner = _event_loop_runner("uvloop")  # the load generator: lean, not under test
    with start_stack(server, barge_in_at_ms=duration_s * 1000.0) as stack:
        plan = LoadPlan(stack.url, stack.url, stack.auth_token, stack.to, duration_s=duration_s)
        calls = start
        for _ in range(100):  # bounded, and by max_calls
            if calls > max_calls:
                break
            if progress is not None:
                progress(f"-- {calls} calls")
            report = runner(
                measure(
                    plan,
                    RunOptions(calls, duration_s, progress=progress),
                    server_pids=stack.server_pids,
                    emulator=stack.emulator,
                    mode=server.mode,
                    workers=server.workers,
                )
            )
            steps.append(asdict(report))
            if not report.held():
                break
            best = calls
            calls += step
    return {
        "held_calls": best,
        "held_calls_per_worker": None if best is None else best / server.workers,
        "criteria": {"p99_ms_max": CAPACITY_P99_MS, "audio_returned_pct_min": CAPACITY_AUDIO_PCT},
        "workers": server.workers,
        "mode": server.mode,
        "steps": steps,
    }


def medians(reports: list[Report]) -> dict[str, Any]:
    """Medians of the headline figures over several runs."""

    def median(get: Callable[[Report], float | None]) -> float | None:
        values = [v for v in map(get, reports) if v is not None]
        return round(statistics.median(values), 3) if values else None

    return {
        "p50_ms": median(lambda r: r.latency_ms["p50"]),
        "p99_ms": median(lambda r: r.latency_ms["p99"]),
        "max_ms": median(lambda r: r.latency_ms["max"]),
        "audio_returned_pct": median(lambda r: r.audio_returned_pct),
        "barge_in_p99_ms": median(lambda r: r.barge_in_ms["p99"]),
        "barge_in_server_p99_ms": median(lambda r: r.barge_in_server_ms.get("p99")),
        "cpu_ms_per_call_s": median(lambda r: r.cpu_ms_per_call_s),
        "rss_per_call_kib": median(lambda r: r.rss_per_call_kib),
        # One server serves every run: its RSS after each run shows growth across calls.
        "rss_after_mib_per_run": [r.rss_mib["after"] for r in reports],
    }


def _event_loop_runner(loop: str) -> Callable[[Any], Any]:
    if loop == "uvloop":
        import uvloop

        return uvloop.run
    return asyncio.run


# --- the server worker process --------------------------------------------------------------


def worker_main(argv: list[str]) -> None:
    from app.serving import PICOWS, WS_CHOICES

    parser = argparse.ArgumentParser(prog="python -m app.loadtest worker")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cpu", type=int, default=None)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="uvloop")
    parser.add_argument("--ws", choices=WS_CHOICES, default=PICOWS)
    parser.add_argument("--profile", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.cpu is not None:
        with contextlib.suppress(OSError, AttributeError):
            os.sched_setaffinity(0, {args.cpu})

    from app.logging_setup import configure_logging
    from app.settings import Settings

    settings = Settings()
    configure_logging(settings.log_level)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", args.port))
    # uvicorn re-raises the signal that stopped it once it has shut down; with this handler
    # that is a no-op, so the worker exits normally (and writes its profile).
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    profiler = None
    if args.profile is not None:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        _event_loop_runner(args.loop)(_worker_serve(settings, sock, args.ws))
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)


async def _worker_serve(settings: Any, sock: socket.socket, ws: str) -> None:
    from app.main import create_app
    from app.serving import ProcessServer, server_config

    app = create_app(settings)
    config = server_config(app, settings, ws=ws, log_config=None, backlog=4096)
    server = ProcessServer(config)  # as `switchboard serve` runs (DrainingServer is one)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    for _ in range(int(STARTUP_TIMEOUT_S / 0.01)):  # bounded
        if server.started or task.done():
            break
        await asyncio.sleep(0.01)
    if task.done():
        task.result()
        return
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    await task


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker_main(sys.argv[2:])
    else:
        sys.exit("usage: python -m app.loadtest worker --port PORT [--cpu N]")
