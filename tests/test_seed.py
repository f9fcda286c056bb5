"""The demo CRM seed: realistic, current, idempotent and confined to its tenant."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from prompts.profiles import load_profiles
from tools.db.models import Base, Booking, Lead, Message, Task
from tools.db.tenancy import tenant_session
from tools.seed import seed_demo

Db = async_sessionmaker[AsyncSession]
TODAY = date(2030, 3, 13)  # a Wednesday


async def _counts(db: Db, tenant: str) -> dict[str, int]:
    counts = {}
    async with tenant_session(db, tenant) as session:
        for mapper in Base.registry.mappers:
            model = mapper.class_
            counts[model.__tablename__] = (
                await session.scalar(select(func.count()).select_from(model)) or 0
            )
    return counts


async def test_seed_fills_the_crm_and_is_idempotent(db: Db) -> None:
    profile = load_profiles().by_id("acme-plumbing")
    created = await seed_demo(db, "acme", today=TODAY, profile=profile)
    counts = await _counts(db, "acme")
    assert created == {table: n for table, n in counts.items() if n}
    assert sum(created.values()) >= 36
    # Audit rows and raw status callbacks are records of real events, never demo data.
    assert counts.pop("audit_log") == 0 and counts.pop("call_events") == 0
    assert all(n > 0 for n in counts.values()), counts

    assert await seed_demo(db, "acme", today=TODAY, profile=profile) == {}
    # A later day adds nothing either: the natural keys carry no dates.
    assert await seed_demo(db, "acme", today=TODAY + timedelta(days=30), profile=profile) == {}
    assert await _counts(db, "acme") == {**counts, "audit_log": 0, "call_events": 0}


async def test_two_johnson_leads_for_ambiguity(db: Db) -> None:
    await seed_demo(db, "acme", today=TODAY)
    async with tenant_session(db, "acme") as session:
        names = list(await session.scalars(select(Lead.name).where(Lead.name.like("%Johnson"))))
    assert sorted(names) == ["Mike Johnson", "Sarah Johnson"]


async def test_dates_are_relative_to_today(db: Db) -> None:
    profile = load_profiles().by_id("bright-smiles")
    assert profile is not None
    await seed_demo(db, "smiles", today=TODAY, profile=profile)
    start = datetime(2030, 3, 13, tzinfo=UTC)
    async with tenant_session(db, "smiles") as session:
        bookings = list(await session.scalars(select(Booking)))
        tasks = list(await session.scalars(select(Task)))
        leads = list(await session.scalars(select(Lead)))
    assert all(
        start - timedelta(days=1) < b.starts_at < start + timedelta(days=14) for b in bookings
    )
    # The profile's appointment length and timezone shape the calendar.
    assert all(b.ends_at - b.starts_at == timedelta(minutes=30) for b in bookings)
    local_hours = {b.starts_at.astimezone(ZoneInfo(profile.timezone)).hour for b in bookings}
    assert local_hours <= set(range(9, 17))
    assert any(t.due is not None and t.due < start for t in tasks)  # something overdue
    assert all(lead.created_at <= start + timedelta(days=1) for lead in leads)
    assert max(lead.created_at for lead in leads) >= start - timedelta(days=1)


async def test_tenants_get_separate_copies(db: Db) -> None:
    first = await seed_demo(db, "acme", today=TODAY)
    second = await seed_demo(db, "smiles", today=TODAY)
    assert first == second
    async with tenant_session(db, "acme") as session:
        acme_sids = set(await session.scalars(select(Message.message_sid)))
    async with tenant_session(db, "smiles") as session:
        smiles_sids = set(await session.scalars(select(Message.message_sid)))
    assert len(acme_sids) == 3 and not acme_sids & smiles_sids
