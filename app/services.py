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

from app.logging_setup import register_secret
from app.metrics import Metrics
from app.security import auth_token
from app.settings import OPENAI_REALTIME_URL
from app.stream_tokens import StreamTokens
from prompts.profiles import ProfileBook, load_profiles

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

    from app.settings import Settings
    from app.sms_engine import SmsEngine
    from bridge.call import CallSession
    from tools.context import Notifier
    from tools.spool import Spool

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
    # Texting: the SMS conversation engine (built with the notifier in open_services).
    sms_engine: SmsEngine | None = None
    # Call records and leads the database could not take, on local disk until it is back.
    spool: Spool | None = None
    _background: list[asyncio.Task[None]] = field(default_factory=list)

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

    def start_spool(self) -> None:
        """Replay spooled records while the database is back; count the spool in metrics."""
        from tools import runner
        from tools.spool import Spool, store_replayers

        spool = self.spool = Spool(self.settings.spool_dir)
        events = self.metrics.spool_events
        spool.observers.append(lambda event, kind: events.labels(event, kind).inc())
        self.metrics.spooled_records.set_function(lambda: len(spool))
        runner.add_observer(self.metrics.observe_tool_run)
        replayers = store_replayers(self.db, self.kv, self.profiles.by_id)
        flusher = spool.run_flusher(replayers, self.settings.spool_flush_interval_s)
        self._background.append(asyncio.create_task(flusher, name="spool-flusher"))

    async def close(self) -> None:
        from tools import runner

        runner.remove_observer(self.metrics.observe_tool_run)
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        # Queued texts, webhooks and deferred SMS replies finish (bounded) while stores are up.
        close_notifier = getattr(self.notifier, "aclose", None)
        if close_notifier is not None:
            await close_notifier(self.settings.notify_drain_s)
        try:
            await self.kv.aclose()
        finally:
            await self.engine.dispose()


async def open_services(settings: Settings) -> Services:
    from tools.db.engine import make_engine, make_sessionmaker, migrate

    profiles = load_profiles(settings.profiles_file)
    kv = _open_kv(settings)
    auth_token(settings)  # warns now, at start-up, when no TWILIO_AUTH_TOKEN is configured
    secrets = (settings.twilio_auth_token, settings.openai_api_key, settings.lead_webhook_secret)
    for secret in secrets:
        register_secret(secret.get_secret_value() if secret is not None else None)
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
    services = Services(
        settings=settings,
        profiles=profiles,
        kv=kv,
        engine=engine,
        db=make_sessionmaker(engine),
        tokens=StreamTokens(kv, settings.stream_token_ttl_s),
        metrics=Metrics(),
    )
    from app.sms_engine import open_texting

    services.notifier, services.sms_engine = open_texting(settings, profiles, services.db, kv)
    services.start_spool()
    from tools.spool import SPOOL_KEY

    services.sms_engine.tool_extra[SPOOL_KEY] = services.spool  # texted leads spool too
    return services


def _open_kv(settings: Settings) -> redis.asyncio.Redis:
    # Strings in, strings out (decode_responses), like the test fixtures every module is tested
    # with; binary values are not stored in Redis.
    if settings.redis_url:
        return redis.asyncio.from_url(settings.redis_url, decode_responses=True)
    # Each process gets its own in-memory server: with the embedded store there is one replica.
    return fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(), decode_responses=True)
