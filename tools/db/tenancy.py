"""Tenant isolation in one place: a session that cannot see or touch another tenant's rows.

Every tool query runs in `tenant_session(ctx.db, ctx.tenant)`. Its session carries the tenant
in `session.info`, and two listeners do the rest, so a handler that forgets a `WHERE tenant =`
still cannot leak:

* `do_orm_execute` adds `tenant == <this tenant>` to every ORM SELECT (including
  `session.get` and relationship loads), UPDATE and DELETE statement, bulk ones included, and
  stamps the tenant on ORM `insert()` rows (refusing parameter rows of another tenant).
  Core/text statements are refused: they would bypass the filter.
* `before_flush` stamps new objects with the tenant and refuses to flush an object of another
  tenant (added, changed, deleted, or moved to another tenant), or a foreign key that points
  at another tenant's row.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event, inspect, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Mapper, ORMExecuteState, Session, UOWTransaction, with_loader_criteria

from tools.db.models import Base, TenantScoped

TENANT_KEY = "tenant"


class CrossTenantError(PermissionError):
    """An operation would have read or written another tenant's data."""


class TenantSession(Session):
    """The sync session behind every `tenant_session`; the listeners below are bound to it."""


@asynccontextmanager
async def tenant_session(
    db: async_sessionmaker[AsyncSession], tenant: str
) -> AsyncIterator[AsyncSession]:
    """A session confined to `tenant`. Commit explicitly; leaving without commit rolls back."""
    if not isinstance(tenant, str) or not tenant:
        raise ValueError("tenant_session needs a tenant id")
    async with db(sync_session_class=TenantSession, info={TENANT_KEY: tenant}) as session:
        yield session


def session_tenant(session: Session | AsyncSession) -> str | None:
    return session.info.get(TENANT_KEY)


def _tenant_of(session: Session) -> str:
    tenant = session.info.get(TENANT_KEY)
    if not tenant:
        raise CrossTenantError("a TenantSession was opened without a tenant")
    return tenant


def _criteria(tenant: str) -> Any:
    return with_loader_criteria(
        TenantScoped, lambda cls: cls.tenant == tenant, include_aliases=True
    )


@event.listens_for(TenantSession, "do_orm_execute")
def _scope_statement(state: ORMExecuteState) -> None:
    tenant = _tenant_of(state.session)
    if not state.is_orm_statement:
        raise CrossTenantError(
            "tenant sessions run ORM statements only (select/update/delete/insert on the "
            "models); a Core or text() statement would bypass the tenant filter"
        )
    if state.is_select:
        # Attribute refreshes reload an object already known to be this tenant's.
        if not state.is_column_load:
            state.statement = state.statement.options(_criteria(tenant))
    elif state.is_update or state.is_delete:
        if _is_bulk_by_primary_key(state):
            # executemany UPDATE by primary key takes no extra WHERE criteria; fence it here.
            _check_rows_belong(state.session, state, tenant)
        else:
            state.statement = state.statement.options(_criteria(tenant))
    elif state.is_insert:
        if state.parameters:
            state.parameters = _stamped(state.parameters, tenant)
        else:
            state.statement = _with_tenant_value(state.statement, tenant)


def _is_bulk_by_primary_key(state: ORMExecuteState) -> bool:
    return isinstance(state.parameters, list) and len(state.parameters) > 0


def _check_rows_belong(session: Session, state: ORMExecuteState, tenant: str) -> None:
    mapper = state.bind_mapper
    if mapper is None or not issubclass(mapper.class_, TenantScoped):
        return
    rows: list[dict[str, Any]] = state.parameters  # type: ignore[assignment]
    if any("tenant" in row and row["tenant"] != tenant for row in rows):
        raise CrossTenantError("bulk update would move rows to another tenant")
    ids = {row.get("id") for row in rows}
    if None in ids:
        raise CrossTenantError("bulk update by primary key needs an id in every row")
    found = _existing_ids(session, mapper.class_, ids)
    if found != ids:
        raise CrossTenantError(f"rows {sorted(ids - found)} are not this tenant's")


def _with_tenant_value(statement: Any, tenant: str) -> Any:
    # insert(Model).values(...): the session's tenant replaces whatever tenant was given
    # inline (the ORM offers no public way to read inline values back to refuse them).
    # Multi-row VALUES cannot be amended that way; tests/test_tenancy.py pins this check.
    if getattr(statement, "_multi_values", ()):
        raise CrossTenantError(
            "multi-row insert(...).values([...]) is not supported in tenant sessions; "
            "pass the rows as a list of parameter dicts instead"
        )
    return statement.values(tenant=tenant)


def _stamped(parameters: Any, tenant: str) -> Any:
    if parameters is None:
        return None
    rows = parameters if isinstance(parameters, list) else [parameters]
    stamped = []
    for row in rows:
        if row.get("tenant", tenant) != tenant:
            raise CrossTenantError("insert would create rows for another tenant")
        stamped.append({**row, "tenant": tenant})
    return stamped if isinstance(parameters, list) else stamped[0]


@event.listens_for(TenantSession, "before_flush")
def _guard_flush(session: Session, _flush: UOWTransaction, _instances: Any) -> None:
    tenant = _tenant_of(session)
    for obj in session.new:
        if isinstance(obj, TenantScoped):
            if obj.tenant is None:
                obj.tenant = tenant
            elif obj.tenant != tenant:
                raise CrossTenantError(f"cannot add a {type(obj).__name__} of another tenant")
    # Iterating the session covers every object it holds, including one of another tenant
    # pulled in through a relationship cascade (whose foreign key is only set during flush).
    for obj in (*session, *session.deleted):
        if isinstance(obj, TenantScoped) and obj.tenant != tenant:
            raise CrossTenantError(f"cannot change a {type(obj).__name__} of another tenant")
    _check_references(session, tenant, [*session.new, *session.dirty])


def _check_references(session: Session, tenant: str, objects: Iterable[object]) -> None:
    """Every foreign key set in this flush must point at one of this tenant's rows."""
    wanted: dict[type[TenantScoped], set[Any]] = defaultdict(set)
    for obj in objects:
        if not isinstance(obj, TenantScoped):
            continue
        state = inspect(obj)
        mapper: Mapper[Any] = state.mapper
        for column in mapper.local_table.columns:
            for fk in column.foreign_keys:
                key = mapper.get_property_by_column(column).key
                value = getattr(obj, key)
                if value is None or (state.persistent and not state.attrs[key].history.added):
                    continue
                target = _model_for_table(fk.column.table)
                if target is not None:
                    wanted[target].add(value)
    for model, ids in wanted.items():
        # Rows created in this same flush with explicit ids are this tenant's by now.
        ids = ids - {o.id for o in session.new if isinstance(o, model)}
        found = _existing_ids(session, model, ids)
        if found != ids:
            raise CrossTenantError(
                f"{model.__tablename__} {sorted(ids - found)} not found for this tenant"
            )


def _existing_ids(session: Session, model: type[TenantScoped], ids: set[Any]) -> set[Any]:
    if not ids:
        return set()
    with session.no_autoflush:
        # Runs through _scope_statement, so only this tenant's ids come back.
        return set(session.scalars(select(model.id).where(model.id.in_(ids))))


def _model_for_table(table: Any) -> type[TenantScoped] | None:
    for mapper in Base.registry.mappers:
        if mapper.local_table is table and issubclass(mapper.class_, TenantScoped):
            return mapper.class_
    return None
