"""Tenant isolation: a tenant session can never read, change or delete another tenant's rows."""

from __future__ import annotations

import pytest
from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import aliased

from tools.db.models import Activity, Company, Contact, Lead
from tools.db.tenancy import CrossTenantError, session_tenant, tenant_session

Db = async_sessionmaker[AsyncSession]


async def _two_tenants(db: Db) -> dict[str, dict[str, int]]:
    """Same-looking data for tenants a and b; returns their ids."""
    ids: dict[str, dict[str, int]] = {}
    for tenant in ("a", "b"):
        async with tenant_session(db, tenant) as session:
            company = Company(name=f"{tenant} corp")
            session.add(company)
            await session.flush()
            lead = Lead(name=f"Smith {tenant}", phone="+15550001111")
            contact = Contact(name=f"Jones {tenant}", company_id=company.id)
            session.add_all([lead, contact])
            await session.commit()
            ids[tenant] = {"lead": lead.id, "contact": contact.id, "company": company.id}
    return ids


async def _count_all(db: Db, model: type) -> dict[str, int]:
    """Row counts per tenant, read with an unscoped session (the test's own eyes)."""
    async with db() as session:
        rows = await session.execute(select(model.tenant, func.count()).group_by(model.tenant))
        return {tenant: count for tenant, count in rows.all()}


async def test_new_rows_are_stamped_with_the_session_tenant(db: Db) -> None:
    async with tenant_session(db, "a") as session:
        lead = Lead(name="X")
        session.add(lead)
        await session.commit()
        assert lead.tenant == "a"
        assert session_tenant(session) == "a"


async def test_select_sees_only_own_rows(db: Db) -> None:
    ids = await _two_tenants(db)
    async with tenant_session(db, "a") as session:
        names = list(await session.scalars(select(Lead.name)))
        count = await session.scalar(select(func.count()).select_from(Contact))
        grouped = (
            await session.execute(select(Lead.tenant, func.count()).group_by(Lead.tenant))
        ).all()
        joined = (
            await session.execute(
                select(Contact.name, Company.name).join(Company, Contact.company_id == Company.id)
            )
        ).all()
        other = aliased(Lead)
        self_join = (
            await session.execute(select(Lead.id, other.id).join(other, other.phone == Lead.phone))
        ).all()
    assert names == ["Smith a"]
    assert count == 1
    assert grouped == [("a", 1)]
    assert joined == [("Jones a", "a corp")]
    assert self_join == [(ids["a"]["lead"], ids["a"]["lead"])]


async def test_get_by_primary_key_cannot_cross(db: Db) -> None:
    ids = await _two_tenants(db)
    async with tenant_session(db, "a") as session:
        assert await session.get(Lead, ids["b"]["lead"]) is None
        assert await session.get(Lead, ids["a"]["lead"]) is not None


async def test_relationship_loads_are_scoped(db: Db) -> None:
    ids = await _two_tenants(db)
    async with tenant_session(db, "a") as session:
        contact = await session.get(Contact, ids["a"]["contact"])
        assert contact is not None and contact.company is not None
        assert contact.company.name == "a corp"


async def test_bulk_update_and_delete_stay_inside_the_tenant(db: Db) -> None:
    ids = await _two_tenants(db)
    async with tenant_session(db, "a") as session:
        result = await session.execute(update(Lead).values(status="contacted"))
        assert result.rowcount == 1
        result = await session.execute(
            update(Lead).where(Lead.id == ids["b"]["lead"]).values(name="hacked")
        )
        assert result.rowcount == 0
        result = await session.execute(delete(Contact))
        assert result.rowcount == 1
        await session.commit()
    async with tenant_session(db, "b") as session:
        lead = await session.get(Lead, ids["b"]["lead"])
        assert lead is not None and lead.name == "Smith b" and lead.status == "new"
    assert await _count_all(db, Contact) == {"b": 1}


async def test_bulk_update_by_primary_key_cannot_cross(db: Db) -> None:
    ids = await _two_tenants(db)
    async with tenant_session(db, "a") as session:
        await session.execute(update(Lead), [{"id": ids["a"]["lead"], "name": "Renamed a"}])
        with pytest.raises(CrossTenantError):
            await session.execute(update(Lead), [{"id": ids["b"]["lead"], "name": "hacked"}])
        with pytest.raises(CrossTenantError):
            await session.execute(
                update(Lead), [{"id": ids["a"]["lead"], "name": "moved", "tenant": "b"}]
            )
        await session.commit()
    async with tenant_session(db, "b") as session:
        lead = await session.get(Lead, ids["b"]["lead"])
        assert lead is not None and lead.name == "Smith b"


async def test_orm_inserts_are_stamped_or_refused(db: Db) -> None:
    async with tenant_session(db, "a") as session:
        await session.execute(insert(Lead), [{"name": "bulk 1"}, {"name": "bulk 2"}])
        await session.execute(insert(Lead).values(name="inline"))
        # An inline foreign tenant is overridden by the session's own.
        await session.execute(insert(Lead).values(name="spoofed", tenant="b"))
        with pytest.raises(CrossTenantError):
            await session.execute(insert(Lead), [{"name": "bad", "tenant": "b"}])
        with pytest.raises(CrossTenantError):
            await session.execute(
                insert(Lead).values([{"name": "ok", "tenant": "a"}, {"name": "bad", "tenant": "b"}])
            )
        await session.commit()
    assert await _count_all(db, Lead) == {"a": 4}


async def test_objects_of_another_tenant_cannot_be_flushed(db: Db) -> None:
    ids = await _two_tenants(db)
    async with tenant_session(db, "b") as session:
        foreign = await session.get(Lead, ids["b"]["lead"])
    assert foreign is not None
    async with tenant_session(db, "a") as session:
        session.add(Lead(name="spoof", tenant="b"))
        with pytest.raises(CrossTenantError):
            await session.flush()
    async with tenant_session(db, "a") as session:
        foreign.name = "hacked"
        await session.merge(foreign)
        with pytest.raises(CrossTenantError):
            await session.flush()
    async with tenant_session(db, "a") as session:
        session.add(foreign)
        await session.delete(foreign)
        with pytest.raises(CrossTenantError):
            await session.flush()
    async with tenant_session(db, "a") as session:
        own = await session.get(Lead, ids["a"]["lead"])
        assert own is not None
        own.tenant = "b"
        with pytest.raises(CrossTenantError):
            await session.flush()
    assert await _count_all(db, Lead) == {"a": 1, "b": 1}
    async with tenant_session(db, "b") as session:
        lead = await session.get(Lead, ids["b"]["lead"])
        assert lead is not None and lead.name == "Smith b"


async def test_references_to_another_tenants_rows_are_refused(db: Db) -> None:
    ids = await _two_tenants(db)
    async with tenant_session(db, "a") as session:
        session.add(Activity(kind="note", body="x", lead_id=ids["b"]["lead"]))
        with pytest.raises(CrossTenantError, match="leads"):
            await session.flush()
    async with tenant_session(db, "a") as session:
        contact = await session.get(Contact, ids["a"]["contact"])
        assert contact is not None
        contact.company_id = ids["b"]["company"]
        with pytest.raises(CrossTenantError, match="companies"):
            await session.flush()
    async with tenant_session(db, "a") as session:
        session.add(Activity(kind="note", body="fine", lead_id=ids["a"]["lead"]))
        await session.commit()
    assert await _count_all(db, Activity) == {"a": 1}


async def test_core_and_text_statements_are_refused(db: Db) -> None:
    await _two_tenants(db)
    async with tenant_session(db, "a") as session:
        with pytest.raises(CrossTenantError):
            await session.execute(text("SELECT name FROM leads"))
        with pytest.raises(CrossTenantError):
            await session.execute(select(Lead.__table__.c.name))
        with pytest.raises(CrossTenantError):
            await session.execute(Lead.__table__.delete())
    assert await _count_all(db, Lead) == {"a": 1, "b": 1}


async def test_a_tenant_is_required(db: Db) -> None:
    with pytest.raises(ValueError, match="tenant"):
        async with tenant_session(db, ""):
            pass
