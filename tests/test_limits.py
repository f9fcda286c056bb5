"""Rate limits: the sliding-window arithmetic, the Redis counters, failing open, and the
per-caller call limit on /voice/incoming (real HTTP, counted in /metrics)."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from app.embedded import running_server
from app.limits import (
    CALLS_PER_CALLER,
    RateLimiter,
    estimated_count,
    window_for,
)
from app.metrics import Metrics
from app.settings import Settings
from tests.e2e import AUTH_TOKEN, BUSINESS_NUMBER, signed_headers
from tests.servers import free_port


def sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


# -- the arithmetic ----------------------------------------------------------------------------


def test_window_keys_and_weights() -> None:
    window = window_for("calls_per_caller", "+15550001111", now=125.0, window_s=60)
    assert window.current_key == "sb:rl:calls_per_caller:+15550001111:2"
    assert window.previous_key == "sb:rl:calls_per_caller:+15550001111:1"
    assert window.previous_weight == pytest.approx(1 - 5 / 60)
    assert window.ttl_s == 120
    assert window_for("x", "", 0.0, 60).current_key == "sb:rl:x:unknown:0"
    with pytest.raises(ValueError):
        window_for("x", "y", 0.0, 0)


@given(
    now=st.floats(min_value=0, max_value=4e9, allow_nan=False),
    window_s=st.integers(min_value=1, max_value=86_400),
)
def test_previous_weight_is_a_fraction_that_falls_through_the_window(
    now: float, window_s: int
) -> None:
    window = window_for("x", "y", now, window_s)
    assert 0.0 < window.previous_weight <= 1.0
    later = window_for("x", "y", now + window_s, window_s)
    assert later.previous_key == window.current_key


@given(
    previous=st.integers(min_value=0, max_value=10_000),
    current=st.integers(min_value=0, max_value=10_000),
    weight=st.floats(min_value=0, max_value=1),
)
def test_estimate_lies_between_the_two_windows(previous: int, current: int, weight: float) -> None:
    estimate = estimated_count(previous, current, weight)
    assert current <= estimate <= previous + current


# -- the counters --------------------------------------------------------------------------------


async def test_limit_allows_then_refuses_and_counts_refusals(kv: Redis) -> None:
    metrics = Metrics()
    limiter = RateLimiter(kv, metrics)
    decisions = [
        await limiter.hit("sms_per_number", "+15550002222", limit=3, now=1000.0) for _ in range(5)
    ]
    assert [d.allowed for d in decisions] == [True, True, True, False, False]
    other = await limiter.hit("sms_per_number", "+15550003333", limit=3, now=1000.0)
    assert other.allowed  # another number has its own budget
    rendered = metrics.render().decode()
    assert sample(rendered, "switchboard_limit_rejections_total", limit="sms_per_number") == 2


async def test_the_previous_window_still_counts_then_fades(kv: Redis) -> None:
    limiter = RateLimiter(kv)
    for _ in range(4):
        assert (await limiter.hit("l", "s", limit=4, now=59.0)).allowed
    # 1 s into the next minute the previous window weighs 59/60: 4 * 0.98 + 1 > 4.
    assert not (await limiter.hit("l", "s", limit=4, now=61.0)).allowed
    # Late in that minute it weighs little: 4 * 1/60 + 2 (the refused hit counts too) <= 4.
    assert (await limiter.hit("l", "s", limit=4, now=119.0)).allowed


async def test_keys_expire(kv: Redis) -> None:
    await RateLimiter(kv).hit("l", "s", limit=4, window_s=60, now=0.0)
    ttl = await kv.ttl("sb:rl:l:s:0")
    assert 0 < ttl <= 120


async def test_a_zero_limit_is_off_and_touches_nothing(fake_kv: Redis) -> None:
    decision = await RateLimiter(fake_kv).hit("l", "s", limit=0)
    assert decision.allowed and decision.checked
    assert await fake_kv.keys("*") == []


async def test_redis_down_fails_open_and_is_counted() -> None:
    metrics = Metrics()
    unreachable = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    try:
        decision = await RateLimiter(unreachable, metrics).hit("calls_per_caller", "+1", limit=1)
    finally:
        await unreachable.aclose()
    assert decision.allowed and not decision.checked
    rendered = metrics.render().decode()
    assert sample(rendered, "switchboard_limits_failed_open_total", limit="calls_per_caller") == 1


# -- the per-caller call limit on the webhook ----------------------------------------------------


async def test_a_number_calling_too_often_hears_busy(sqlite_url: str, tmp_path) -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        twilio_auth_token=AUTH_TOKEN,
        database_url=sqlite_url,
        max_calls_per_caller_per_min=2,
        spool_dir=tmp_path / "spool",
    )
    async with running_server(settings) as server:
        public = settings.public_url
        async with httpx.AsyncClient(base_url=server.url) as http:

            async def call(n: int, caller: str) -> str:
                form = {"CallSid": f"CA{n:032d}", "From": caller, "To": BUSINESS_NUMBER}
                headers = signed_headers(public + "/voice/incoming", form)
                answer = await http.post("/voice/incoming", data=form, headers=headers)
                assert answer.status_code == 200
                return answer.text

            answers = [await call(n, "+15550004444") for n in range(3)]
            someone_else = await call(9, "+15550005555")
            metrics = (await http.get("/metrics")).text
    assert ["<Stream" in a for a in answers] == [True, True, False]
    assert "busy" in answers[2]
    assert "<Stream" in someone_else
    assert sample(metrics, "switchboard_calls_total", outcome="rate_limited") == 1
    assert sample(metrics, "switchboard_limit_rejections_total", limit=CALLS_PER_CALLER) == 1


async def test_the_webhook_body_limit_is_configurable_and_counted(
    sqlite_url: str, tmp_path
) -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        twilio_auth_token=AUTH_TOKEN,
        database_url=sqlite_url,
        max_webhook_bytes=2_000,
        spool_dir=tmp_path / "spool",
    )
    form = {"CallSid": "CA" + "1" * 32, "From": "+15550006666", "To": BUSINESS_NUMBER}
    async with running_server(settings) as server:
        url = settings.public_url + "/voice/incoming"
        async with httpx.AsyncClient(base_url=server.url) as http:
            small = await http.post("/voice/incoming", data=form, headers=signed_headers(url, form))
            padded = {**form, "Padding": "x" * 2_500}
            large = await http.post(
                "/voice/incoming", data=padded, headers=signed_headers(url, padded)
            )
            metrics = (await http.get("/metrics")).text
    assert small.status_code == 200
    assert large.status_code == 413
    assert sample(metrics, "switchboard_webhook_rejections_total", reason="too_large") == 1
