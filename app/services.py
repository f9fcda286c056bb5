"""Everything the process holds open, built once in the app's lifespan and closed with it.

Embedded defaults: without REDIS_URL the key-value store is fakeredis's asyncio client (the same
redis-py API, so one code path serves both); DATABASE_URL defaults to an SQLite file. The schema
is migrated to the newest revision at start-up.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import fakeredis
import redis.asyncio

from app.metrics import Metrics
from app.security import auth_token
from app.settings import OPENAI_REALTIME_URL
from app.stream_tokens import StreamTokens
from prompts.profiles import ProfileBook, load_profiles

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

    from app.settings import Settings
    from bridge.call import CallSession
    from tools.context import Notifier

log = logging.getLogger("switchboard.services")

EMULATOR_API_KEY = "sk-local-emulator"
# While draining, how often to look whether the last live call has ended.
DRAIN_POLL_S = 0.5


@dataclass(eq=False)
class Services:
    settings: Settings
    profiles: ProfileBook
    kv: redis.asyncio.Redis
    engine: AsyncEngine
    db: async_sessionmaker[AsyncSession]
    tokens: StreamTokens
    metrics: Metrics
    # Live calls on this replica, by CallSid (registered by the media handler).
    calls: dict[str, CallSession] = field(default_factory=dict)
    # Set on SIGTERM: readiness fails and new calls get a polite busy message.
    draining: bool = False
    notifier: Notifier | None = None

    @property
    def openai_api_key(self) -> str | None:
        """OPENAI_API_KEY; for a local emulator (any other Realtime URL) a placeholder will do."""
        key = self.settings.openai_api_key
        if key is not None:
            return key.get_secret_value()
        # The emulator insists on a bearer token, as OpenAI does, but accepts any.
        if self.settings.openai_realtime_url != OPENAI_REALTIME_URL:
            return EMULATOR_API_KEY
        return None

    @property
    def at_capacity(self) -> bool:
        return len(self.calls) >= self.settings.max_concurrent_calls

    async def drain(self, timeout_s: float) -> bool:
        """Stop taking calls and wait for live ones to end; True if they all did in time."""
        self.draining = True
        log.info("draining: %d live call(s), waiting up to %g s", len(self.calls), timeout_s)
        try:
            async with asyncio.timeout(timeout_s):
                # `calls` is a plain dict the media handler fills and empties; a poll twice a
                # second during shutdown costs nothing and keeps that handler free of hooks.
                while self.calls:  # noqa: ASYNC110
                    await asyncio.sleep(DRAIN_POLL_S)
        except TimeoutError:
            log.warning("drain timed out with %d live call(s)", len(self.calls))
            return False
        return True

    async def close(self) -> None:
        try:
            await self.kv.aclose()
        finally:
            await self.engine.dispose()


async def open_services(settings: Settings) -> Services:
    from tools.db.engine import make_engine, make_sessionmaker, migrate

    profiles = load_profiles(settings.profiles_file)
    kv = _open_kv(settings)
    auth_token(settings)  # warns now, at start-up, when no TWILIO_AUTH_TOKEN is configured
    try:
        await migrate(settings.database_url)
        engine = make_engine(settings.database_url)
    except BaseException:
        await kv.aclose()
        raise
    log.info(
        "services open",
        extra={
            "kv": "redis" if settings.redis_url else "embedded (fakeredis)",
            "database": engine.url.render_as_string(hide_password=True),
            "profiles": [p.id for p in profiles.profiles],
        },
    )
    return Services(
        settings=settings,
        profiles=profiles,
        kv=kv,
        engine=engine,
        db=make_sessionmaker(engine),
        tokens=StreamTokens(kv, settings.stream_token_ttl_s),
        metrics=Metrics(),
    )


def _open_kv(settings: Settings) -> redis.asyncio.Redis:
    # Strings in, strings out (decode_responses), like the test fixtures every module is tested
    # with; binary values are not stored in Redis.
    if settings.redis_url:
        return redis.asyncio.from_url(settings.redis_url, decode_responses=True)
    # Each process gets its own in-memory server: with the embedded store there is one replica.
    return fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(), decode_responses=True)
