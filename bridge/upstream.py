"""When the Realtime upstream fails: retry or give up, and how long to wait between tries.

Pure policy (no sockets): a bounded backoff schedule, and a verdict for each way a session
can fail (a handshake that failed, a socket that closed, an `error` event). The one async
helper, `connect_with_retry`, only sleeps and calls the connect function it is given.

Verdicts:
- `RECOVERABLE`: an `error` event about one client event (a race, a bad truncate); the
  session goes on. Log it and count it.
- `RETRY`: the session is gone or never opened, but a new one may well work (refused or
  reset connection, timeout, 5xx, 429, the 60-minute cap's 1001, an abnormal close).
- `FATAL`: a new session would fail the same way (bad key, no quota, unknown model, a
  beta-shaped client, a policy close): stop trying, fall back at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from websockets.exceptions import InvalidStatus, InvalidURI

_T = TypeVar("_T")


class Verdict(StrEnum):
    RECOVERABLE = "recoverable"
    RETRY = "retry"
    FATAL = "fatal"


# `error.code` values that mean this session (and any new one) cannot serve the call.
FATAL_ERROR_CODES = frozenset(
    {
        "beta_api_shape_disabled",
        "invalid_api_key",
        "insufficient_quota",
        "model_not_found",
        "account_deactivated",
        "organization_deactivated",
        "billing_hard_limit_reached",
    }
)
# `error.type` values with the same meaning whatever the code.
FATAL_ERROR_TYPES = frozenset({"authentication_error", "permission_error"})
# `error.code` values that mean this session is over but a new one should work.
SESSION_ENDING_ERROR_CODES = frozenset({"session_expired"})
SESSION_ENDING_ERROR_TYPES = frozenset({"server_error"})

# WebSocket close codes a new session cannot cure: 1002 protocol error, 1003 unsupported
# data, 1007 bad payload, 1008 policy violation, 1009 too big, 1010 missing extension,
# 4000 beta API shape refused (PROTOCOLS.md C.1). Everything else (1000/1001 normal and
# going away, incl. the 60-minute cap; 1005/1006 no status or dropped; 1011 server error;
# 1012/1013 restart or try again; None: the TCP connection just died) is worth a new session.
FATAL_CLOSE_CODES = frozenset({1002, 1003, 1007, 1008, 1009, 1010, 4000})

# HTTP statuses of a refused handshake that retrying cannot fix.
FATAL_HTTP_STATUSES = frozenset({400, 401, 403, 404})


def classify_error_event(code: str | None, error_type: str | None) -> Verdict:
    """An `error` event: most are about one client event and the session goes on."""
    if code in FATAL_ERROR_CODES or error_type in FATAL_ERROR_TYPES:
        return Verdict.FATAL
    if code in SESSION_ENDING_ERROR_CODES or error_type in SESSION_ENDING_ERROR_TYPES:
        return Verdict.RETRY
    return Verdict.RECOVERABLE


def classify_close(code: int | None) -> Verdict:
    """The upstream socket closed (code None: no close frame, the connection died)."""
    return Verdict.FATAL if code in FATAL_CLOSE_CODES else Verdict.RETRY


def classify_connect_error(error: BaseException) -> Verdict:
    """A connection attempt failed with `error` (as raised by websockets' client)."""
    if isinstance(error, InvalidStatus):
        status = error.response.status_code
        return Verdict.FATAL if status in FATAL_HTTP_STATUSES else Verdict.RETRY
    if isinstance(error, InvalidURI | ValueError | TypeError):
        return Verdict.FATAL  # a configuration mistake: the same URL will fail again
    return Verdict.RETRY  # refused, reset, DNS, timeout, 5xx, 429, a broken handshake


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff between connection attempts, bounded by a total time budget.

    The first attempt is immediate; then `first_s`, doubling (`factor`) up to `max_s`, while
    the time spent waiting and trying stays within `budget_s`.
    """

    budget_s: float = 3.0
    first_s: float = 0.1
    factor: float = 2.0
    max_s: float = 1.0

    def __post_init__(self) -> None:
        if self.budget_s < 0 or self.first_s < 0 or self.max_s < 0 or self.factor < 1:
            raise ValueError(f"backoff values must be >= 0 (factor >= 1): {self}")

    def delays(self) -> list[float]:
        """The waits before the second, third, ... attempts, assuming attempts take no time."""
        waits: list[float] = []
        total, delay = 0.0, self.first_s
        while total + delay <= self.budget_s and delay > 0:
            waits.append(delay)
            total += delay
            delay = min(delay * self.factor, self.max_s)
        return waits

    def next_delay(self, attempt: int, elapsed_s: float) -> float | None:
        """The wait before attempt number `attempt + 1` (1-based `attempt` just failed), or
        None when the budget does not allow another try."""
        delay = min(self.first_s * self.factor ** (attempt - 1), self.max_s)
        if elapsed_s + delay > self.budget_s:
            return None
        return delay


class UpstreamUnavailable(Exception):
    """No session could be opened within the retry budget (or the failure was fatal)."""

    def __init__(self, attempts: int, last_error: BaseException, verdict: Verdict) -> None:
        super().__init__(f"{attempts} attempt(s), last: {type(last_error).__name__}: {last_error}")
        self.attempts = attempts
        self.last_error = last_error
        self.verdict = verdict


async def connect_with_retry(
    connect: Callable[[float], Awaitable[_T]],
    backoff: Backoff,
    *,
    on_failure: Callable[[int, BaseException, Verdict], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    min_open_timeout_s: float = 0.5,
) -> _T:
    """`await connect(open_timeout_s)` until it succeeds, within `backoff`'s budget.

    Each attempt gets the budget that is left as its timeout (at least `min_open_timeout_s`),
    so a black-holed endpoint cannot stretch the wait far past the budget. Raises
    `UpstreamUnavailable` when the budget is spent or a failure is fatal.
    """
    started = clock()
    attempt = 0
    while True:
        attempt += 1
        remaining = backoff.budget_s - (clock() - started)
        try:
            return await connect(max(remaining, min_open_timeout_s))
        except asyncio.CancelledError:
            raise
        except Exception as error:
            verdict = classify_connect_error(error)
            if on_failure is not None:
                on_failure(attempt, error, verdict)
            if verdict is Verdict.FATAL:
                raise UpstreamUnavailable(attempt, error, verdict) from error
            delay = backoff.next_delay(attempt, clock() - started)
            if delay is None:
                raise UpstreamUnavailable(attempt, error, verdict) from error
            await sleep(delay)
