"""Rate limits shared by every replica: sliding-window counters in Redis.

The arithmetic is pure (`window_for`, `estimated_count`); `RateLimiter.hit` is one Redis round
trip around it. The estimate is the classic sliding-window counter: this fixed window's count
plus the previous window's count weighted by how much of it the sliding window still covers.
It needs two integers per subject, has no burst at window edges, and is exact enough for
"at most N per minute".

Keys: `sb:rl:{limit}:{subject}:{window index}`, expiring after two windows.

Redis down: limits fail open (the call or text goes ahead: turning callers away because a
counter is unreachable would make a Redis outage a full outage), and each unchecked request
is counted in `switchboard_limits_failed_open_total`. Rejections are counted in
`switchboard_limit_rejections_total`. A limit of 0 or less is switched off.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from app.metrics import Metrics

log = logging.getLogger("switchboard.limits")

KEY_PREFIX = "sb:rl:"
MINUTE_S = 60

# Limit names, as metric labels.
CALLS_PER_CALLER = "calls_per_caller"
SMS_PER_NUMBER = "sms_per_number"
CONCURRENT_CALLS = "concurrent_calls"


@dataclass(frozen=True, slots=True)
class Window:
    """Where a hit at one moment is counted, and how much the previous window still weighs."""

    current_key: str
    previous_key: str
    previous_weight: float  # 1.0 at the start of the current window, 0.0 at its end
    ttl_s: int


def window_for(limit: str, subject: str, now: float, window_s: int) -> Window:
    if window_s <= 0:
        raise ValueError("window_s must be positive")
    index, into = divmod(now, window_s)
    prefix = f"{KEY_PREFIX}{limit}:{subject or 'unknown'}:"
    return Window(
        current_key=f"{prefix}{int(index)}",
        previous_key=f"{prefix}{int(index) - 1}",
        previous_weight=1.0 - into / window_s,
        ttl_s=2 * window_s,
    )


def estimated_count(previous: int, current: int, previous_weight: float) -> float:
    """Hits in the sliding window ending now (the current hit included in `current`)."""
    return previous * previous_weight + current


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    count: float  # estimated hits in the window, this one included
    limit: int
    checked: bool = True  # False: the store was unreachable and the request went ahead


class RateLimiter:
    def __init__(self, kv: Redis, metrics: Metrics | None = None) -> None:
        self.kv = kv
        self.metrics = metrics

    async def hit(
        self,
        limit_name: str,
        subject: str,
        *,
        limit: int,
        window_s: int = MINUTE_S,
        now: float | None = None,
    ) -> Decision:
        """Count one request by `subject` against `limit` per `window_s`; may it go ahead?

        Refused requests are counted too: a caller who keeps hammering stays refused.
        """
        if limit <= 0:
            return Decision(allowed=True, count=0.0, limit=limit)
        window = window_for(limit_name, subject, time.time() if now is None else now, window_s)
        try:
            pipe = self.kv.pipeline(transaction=True)
            pipe.incr(window.current_key)
            pipe.expire(window.current_key, window.ttl_s)
            pipe.get(window.previous_key)
            current, _, previous = await pipe.execute()
        except (RedisError, OSError) as error:
            log.warning("rate limit %s not checked (Redis unavailable): %s", limit_name, error)
            if self.metrics is not None:
                self.metrics.limits_failed_open.labels(limit_name).inc()
            return Decision(allowed=True, count=0.0, limit=limit, checked=False)
        count = estimated_count(int(previous or 0), int(current), window.previous_weight)
        allowed = count <= limit
        if not allowed:
            self.rejected(limit_name)
        return Decision(allowed=allowed, count=count, limit=limit)

    def rejected(self, limit_name: str) -> None:
        """Count a refusal (also for limits checked elsewhere, like concurrent calls)."""
        if self.metrics is not None:
            self.metrics.limit_rejections.labels(limit_name).inc()
