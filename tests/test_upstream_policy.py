"""The upstream fault policy: backoff schedule, error/close classification, connect-with-retry."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus
from websockets.http11 import Response

from bridge import realtime as rt
from bridge.sim.emulator import run_emulator
from bridge.upstream import (
    Backoff,
    UpstreamUnavailable,
    Verdict,
    classify_close,
    classify_connect_error,
    classify_error_event,
    connect_with_retry,
)


def http_refusal(status: int) -> InvalidStatus:
    return InvalidStatus(Response(status, "refused", Headers(), b""))


# -- backoff -------------------------------------------------------------------------------


def test_default_backoff_is_exponential_capped_and_within_about_three_seconds() -> None:
    delays = Backoff().delays()
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.0]
    assert sum(delays) <= 3.0


@given(
    budget=st.floats(0, 30),
    first=st.floats(0.01, 2),
    factor=st.floats(1, 4),
    cap=st.floats(0.01, 5),
)
def test_backoff_never_waits_past_its_budget(
    budget: float, first: float, factor: float, cap: float
) -> None:
    backoff = Backoff(budget_s=budget, first_s=first, factor=factor, max_s=cap)
    delays = backoff.delays()
    assert sum(delays) <= budget + 1e-9
    assert all(d <= max(first, cap) for d in delays)
    assert delays == sorted(delays) or cap < first  # grows until the cap


def test_next_delay_stops_when_the_budget_is_spent() -> None:
    backoff = Backoff(budget_s=1.0, first_s=0.25, factor=2, max_s=1.0)
    assert backoff.next_delay(1, elapsed_s=0.0) == 0.25
    assert backoff.next_delay(2, elapsed_s=0.25) == 0.5
    assert backoff.next_delay(3, elapsed_s=0.75) is None  # 0.75 + 1.0 > 1.0


def test_backoff_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="backoff"):
        Backoff(budget_s=-1)
    with pytest.raises(ValueError, match="backoff"):
        Backoff(factor=0.5)


# -- classification ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "error_type", "verdict"),
    [
        ("conversation_already_has_active_response", "invalid_request_error", "recoverable"),
        ("response_cancel_not_active", "invalid_request_error", "recoverable"),
        ("invalid_value", "invalid_request_error", "recoverable"),
        ("unknown_parameter", "invalid_request_error", "recoverable"),
        (None, "invalid_request_error", "recoverable"),
        ("beta_api_shape_disabled", "invalid_request_error", "fatal"),
        ("invalid_api_key", "invalid_request_error", "fatal"),
        ("insufficient_quota", "insufficient_quota", "fatal"),
        (None, "authentication_error", "fatal"),
        ("session_expired", "invalid_request_error", "retry"),
        (None, "server_error", "retry"),
    ],
)
def test_error_events_are_classified(code: str | None, error_type: str, verdict: str) -> None:
    assert classify_error_event(code, error_type) == Verdict(verdict)


@pytest.mark.parametrize(
    ("code", "verdict"),
    [
        (None, "retry"),  # the TCP connection died: no close frame
        (1000, "retry"),
        (1001, "retry"),  # going away: the 60-minute cap
        (1006, "retry"),
        (1011, "retry"),
        (1012, "retry"),
        (1013, "retry"),
        (1008, "fatal"),
        (4000, "fatal"),  # beta-shaped client refused
    ],
)
def test_close_codes_are_classified(code: int | None, verdict: str) -> None:
    assert classify_close(code) == Verdict(verdict)


@pytest.mark.parametrize(
    ("error", "verdict"),
    [
        (ConnectionRefusedError(111, "refused"), "retry"),
        (TimeoutError(), "retry"),
        (OSError("network unreachable"), "retry"),
        (http_refusal(500), "retry"),
        (http_refusal(503), "retry"),
        (http_refusal(429), "retry"),
        (http_refusal(401), "fatal"),
        (http_refusal(403), "fatal"),
        (http_refusal(404), "fatal"),
        (ValueError("bad URL"), "fatal"),
    ],
)
def test_connect_errors_are_classified(error: BaseException, verdict: str) -> None:
    assert classify_connect_error(error) == Verdict(verdict)


# -- connect with retry (fake clock) -----------------------------------------------------------


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


async def test_retries_until_the_upstream_answers() -> None:
    time = FakeTime()
    outcomes: list[BaseException | str] = [
        ConnectionRefusedError(111, "refused"),
        http_refusal(503),
        "session",
    ]
    timeouts: list[float] = []
    failures: list[tuple[int, str]] = []

    async def connect(open_timeout_s: float) -> str:
        timeouts.append(open_timeout_s)
        outcome = outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    result = await connect_with_retry(
        connect,
        Backoff(budget_s=3.0),
        on_failure=lambda n, e, v: failures.append((n, v)),
        clock=time.clock,
        sleep=time.sleep,
    )
    assert result == "session"
    assert time.sleeps == [0.1, 0.2]
    assert failures == [(1, Verdict.RETRY), (2, Verdict.RETRY)]
    # Each attempt's handshake timeout is what is left of the budget.
    assert timeouts == [3.0, pytest.approx(2.9), pytest.approx(2.7)]


async def test_gives_up_when_the_budget_is_spent() -> None:
    time = FakeTime()
    attempts = 0

    async def connect(open_timeout_s: float) -> str:
        nonlocal attempts
        attempts += 1
        time.now += 0.05  # each refused attempt takes a little time
        raise ConnectionRefusedError(111, "refused")

    with pytest.raises(UpstreamUnavailable) as raised:
        await connect_with_retry(connect, Backoff(budget_s=3.0), clock=time.clock, sleep=time.sleep)
    assert raised.value.verdict is Verdict.RETRY
    assert raised.value.attempts == attempts > 3
    assert time.now <= 3.0 + 0.05
    assert isinstance(raised.value.last_error, ConnectionRefusedError)


async def test_a_fatal_refusal_is_not_retried() -> None:
    time = FakeTime()
    attempts = 0

    async def connect(open_timeout_s: float) -> str:
        nonlocal attempts
        attempts += 1
        raise http_refusal(401)

    with pytest.raises(UpstreamUnavailable) as raised:
        await connect_with_retry(connect, Backoff(), clock=time.clock, sleep=time.sleep)
    assert attempts == 1 and time.sleeps == []
    assert raised.value.verdict is Verdict.FATAL


# -- connect with retry (real sockets) ---------------------------------------------------------


def closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


async def test_a_closed_port_is_retried_then_reported_unavailable() -> None:
    url = f"ws://127.0.0.1:{closed_port()}/v1/realtime"
    failures: list[BaseException] = []
    with pytest.raises(UpstreamUnavailable) as raised:
        await connect_with_retry(
            lambda timeout: rt.RealtimeConnection.connect(url, "gpt-realtime", "sk-x"),
            Backoff(budget_s=0.5, first_s=0.05),
            on_failure=lambda n, e, v: failures.append(e),
        )
    print(f"injected: connection refused at {url}; kept: {len(failures)} attempts, then gave up")
    assert raised.value.attempts == len(failures) >= 3
    assert all(isinstance(e, OSError) for e in failures)


async def test_a_missing_api_key_is_fatal_at_once_against_the_emulator() -> None:
    async with run_emulator("demo") as emulator:
        with pytest.raises(UpstreamUnavailable) as raised:
            await connect_with_retry(
                lambda timeout: rt.RealtimeConnection.connect(emulator.url, "gpt-realtime", None),
                Backoff(budget_s=2.0),
            )
    assert raised.value.attempts == 1
    assert raised.value.verdict is Verdict.FATAL
    assert isinstance(raised.value.last_error, InvalidStatus)
    assert emulator.connections == 0  # refused at the handshake, no session opened
