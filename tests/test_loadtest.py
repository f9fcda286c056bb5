"""`switchboard loadtest` and `switchboard bench codec`: well-formed, self-consistent reports.

Small N, short calls, real processes on loopback (server worker, echo emulator). No timing
thresholds: only what must hold on any machine (every byte comes back, nothing fails, the
numbers agree with each other).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os

import pytest
from typer.testing import CliRunner

from app import loadtest as lt
from app.cli import cli
from bridge.sim.load import FRAME_MS

CALLS = 3
DURATION_S = 2.0


@pytest.fixture(scope="module", params=["pcm16", "g711"])
def report(request: pytest.FixtureRequest) -> lt.Report:
    (report,) = lt.loadtest_runs(CALLS, DURATION_S, server=lt.ServerOptions(mode=request.param))
    return report


def test_every_call_completes_and_every_byte_comes_back(report: lt.Report) -> None:
    assert report.errors == 0, report.error_samples
    assert report.completed_calls == CALLS
    assert report.audio_returned_pct == 100.0


def test_latency_is_measured_for_every_frame_of_every_call(report: lt.Report) -> None:
    frames = round(DURATION_S * 1000 / FRAME_MS)
    latency = report.latency_ms
    assert latency["count"] == CALLS * frames
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]


def test_each_call_had_one_barge_in_answered_with_clear_and_cancel(report: lt.Report) -> None:
    assert report.barge_in_ms["count"] == CALLS
    assert report.barge_in_clear_loop_ms["count"] == CALLS
    assert 0 < report.barge_in_ms["p50"] <= report.barge_in_ms["max"]
    # The server timed each barge-in itself (its histogram, scraped around the run).
    server = report.barge_in_server_ms
    assert server["count"] == CALLS
    assert server["p50"] is not None and 0 < server["p50"] <= server["p99"]


def test_server_usage_is_read_from_proc(report: lt.Report) -> None:
    assert report.cpu_ms_per_call_s is not None and report.cpu_ms_per_call_s > 0
    assert report.cpu_window_s is not None and report.cpu_window_s > 0
    rss = report.rss_mib
    assert rss["baseline"] is not None and rss["peak"] is not None and rss["after"] is not None
    assert rss["peak"] >= rss["baseline"]
    assert report.machine["cores"] == os.cpu_count()
    assert 0.0 <= report.machine["steal_pct"] < 100.0


def test_steal_is_read_from_proc_stat_and_warned_about(report: lt.Report) -> None:
    before = lt.cpu_steal_ticks("cpu  100 0 50 800 0 0 10 40 0 0\ncpu0 50 0 25 400 0 0 5 20 0 0")
    after = lt.cpu_steal_ticks("cpu  180 0 60 880 0 0 20 60 0 0\n")
    assert before == (40, 1000) and after == (60, 1200)
    assert lt.steal_pct(before, after) == 10.0
    assert lt.cpu_steal_ticks("cpu  1 2 3 4\n") == (0, 10)  # kernels older than 2.6.11
    with pytest.raises(lt.LoadTestError):
        lt.cpu_steal_ticks("intr 1 2 3")
    stolen = dataclasses.replace(report, machine={**report.machine, "steal_pct": 10.0})
    assert any("10 % of the machine's CPU time" in w for w in lt.measurement_warnings(stolen))
    quiet = dataclasses.replace(report, machine={**report.machine, "steal_pct": 0.5})
    assert not any("steal" in w for w in lt.measurement_warnings(quiet))


def test_the_resampler_delay_is_reported_in_pcm16_only(report: lt.Report) -> None:
    assert (report.algorithmic_delay_ms > 0) == (report.mode == "pcm16")


def test_report_formats_and_serialises(report: lt.Report) -> None:
    text = lt.format_report(report)
    assert "audio returned: 100.00 %" in text
    assert "errors: 0" in text
    data = json.loads(json.dumps(lt.asdict(report)))
    assert lt.Report(**data) == report


def test_a_non_loopback_target_is_refused_unless_allowed() -> None:
    with pytest.raises(lt.LoadTestError, match="not a loopback"):
        lt.check_loopback("http://192.0.2.10:8080", allow_remote=False)
    lt.check_loopback("http://192.0.2.10:8080", allow_remote=True)
    lt.check_loopback("http://127.0.0.1:8080", allow_remote=False)
    lt.check_loopback("http://localhost:8080", allow_remote=False)


def test_capacity_is_the_highest_step_that_held() -> None:
    result = lt.find_capacity(DURATION_S, server=lt.ServerOptions(), start=1, step=1, max_calls=2)
    steps = result["steps"]
    assert [s["calls"] for s in steps] == [1, 2][: len(steps)]
    held = [s["calls"] for s in steps if lt.Report(**s).held()]
    assert result["held_calls"] == (max(held) if held else None)
    assert result["workers"] == 1


def test_percentiles_of_known_values() -> None:
    stats = lt.percentiles(list(range(1, 101)))
    assert stats["count"] == 100
    assert stats["max"] == 100
    assert stats["p50"] == 50.5
    assert lt.percentiles([])["p99"] is None


def test_histogram_quantiles_are_bucket_bounds_of_what_a_run_added() -> None:
    before = {0.001: 5.0, 0.002: 5.0, 0.005: 5.0, float("inf"): 5.0}  # an earlier run's
    after = {0.001: 55.0, 0.002: 103.0, 0.005: 104.0, float("inf"): 105.0}
    assert lt.histogram_quantiles(before, after) == {"p50": 1.0, "p99": 5.0, "count": 100.0}
    tail = {0.001: 1.0, 0.002: 1.0, 0.005: 1.0, float("inf"): 3.0}
    assert lt.histogram_quantiles({}, tail) == {"p50": None, "p99": None, "count": 3.0}
    assert lt.histogram_quantiles(after, after)["p99"] is None  # nothing in this run


def test_loadtest_cli_prints_json() -> None:
    result = CliRunner().invoke(
        cli, ["loadtest", "--calls", "2", "--duration", "2", "--mode", "g711", "--json"]
    )
    assert result.exit_code == 0, result.output
    run = json.loads(result.stdout)["runs"][0]
    assert run["calls"] == 2 and run["mode"] == "g711" and run["errors"] == 0


def test_bench_codec_reports_each_direction_in_both_modes() -> None:
    result = CliRunner().invoke(
        cli, ["bench", "codec", "--frames", "50", "--repeats", "1", "--json"]
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    for name in ("inbound_pcm16_us", "outbound_pcm16_us", "inbound_g711_us", "outbound_g711_us"):
        assert figures[name] > 0


def test_the_load_emulator_speaks_only_sdk_valid_events() -> None:
    # The load emulator adds its own events to the validated emulator (a timed speech_started,
    # an audio-less greeting): every frame of a whole session must still validate.
    import base64

    from bridge import realtime as rt
    from bridge.sim.load import EmulatorStats, LoadEchoSession
    from tests.sdk_oracle import assert_valid_server_event

    stats = EmulatorStats()
    session = LoadEchoSession(stats, barge_in_at_ms=100)
    session.open()
    for event in _bridge_opening():
        session.receive(event)
    frame = base64.b64encode(b"\x10" * 160).decode()  # 20 ms of loud mu-law
    for _ in range(10):  # 200 ms: past the barge-in point
        session.receive(rt.append_audio(frame))
    session.receive(rt.encode(rt.response_cancel()))
    sent = [json.loads(f) for f in session.data_to_send()]
    for event in sent:
        assert_valid_server_event(event)
    types = [e["type"] for e in sent]
    assert "input_audio_buffer.speech_started" in types and "response.output_audio.delta" in types
    assert stats.barge_ins == 1 and len(stats.reaction_ms) == 1 and stats.errors_sent == 0


async def test_the_load_emulator_serves_sessions_over_a_real_socket() -> None:
    # Served from picows callbacks; a websockets client (another implementation) talks to it.
    import base64

    from picows import ws_create_server
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosedError

    from bridge import realtime as rt
    from bridge.sim.load import EmulatorStats, LoadEchoListener
    from tests.sdk_oracle import assert_valid_server_event

    stats = EmulatorStats()
    server = await ws_create_server(lambda request: LoadEchoListener(stats, None), "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}/v1/realtime") as ws:
            created = json.loads(await ws.recv())
            assert_valid_server_event(created)
            assert created["type"] == "session.created"
            for event in _bridge_opening():
                await ws.send(event)
            audio = base64.b64encode(bytes(range(160))).decode()
            await ws.send(rt.append_audio(audio))
            deltas = []
            for _ in range(20):  # bounded: a handful of events come before the echo
                event = json.loads(await ws.recv())
                assert_valid_server_event(event)
                if event["type"] == "response.output_audio.delta":
                    deltas.append(event["delta"])
                    break
            assert deltas == [audio]
            # The bridge never fragments a message; the load emulator refuses one clearly.
            await ws.send(iter(['{"type": "input_audio_', 'buffer.clear"}']))
            with pytest.raises(ConnectionClosedError) as closed:
                async with asyncio.timeout(5):
                    for _ in range(20):
                        await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1003
    assert stats.sessions == 1 and stats.errors_sent == 0


def _bridge_opening() -> list[str]:
    """What the bridge sends first on a g711 session: its settings, then the greeting."""
    from bridge import realtime as rt

    update = rt.session_update(
        instructions="echo",
        tools=[],
        audio_mode="g711",
        voice="marin",
        transcription_model="gpt-4o-mini-transcribe",
    )
    return [rt.encode(update), rt.encode(rt.response_create(instructions="greet"))]
