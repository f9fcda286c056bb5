"""Partnerships: who the business builds things with, how far along, and how healthy.

Phases run discover -> co-create -> deploy -> independent; health is a 0-100 judgement the
owner keeps up to date. The activity table has no partnership column, so timeline entries for
partnerships carry `partnership_id` in their data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, get_args

from pydantic import BaseModel, Field
from sqlalchemy import func, select

from tools.db.models import Company, Contact, Partnership, PartnershipPhase
from tools.db.tenancy import tenant_session
from tools.handlers.bookings import listing, moment, record_activity, zone_of
from tools.matching import Candidate, label, resolve, unresolved_reply
from tools.registry import tool

if TYPE_CHECKING:
    from zoneinfo import ZoneInfo

    from sqlalchemy.ext.asyncio import AsyncSession

    from tools.context import ToolContext

CRM = {"crm_operator"}
MAX_ITEMS = 20
PHASES: tuple[str, ...] = get_args(PartnershipPhase)
# Below this health a partnership is called out as at risk.
AT_RISK_BELOW = 40


def health_word(score: int) -> str:
    if score < AT_RISK_BELOW:
        return "at risk"
    return "fair" if score < 70 else "healthy"


# -- references ------------------------------------------------------------------------------------


def partnership_label(partnership: Partnership) -> str:
    return label(partnership.name, partnership.phase, f"health {partnership.health_score}")


def partnership_view(partnership: Partnership, zone: ZoneInfo) -> dict[str, Any]:
    return {
        "id": partnership.id,
        "label": partnership_label(partnership),
        "name": partnership.name,
        "phase": partnership.phase,
        "health_score": partnership.health_score,
        "health": health_word(partnership.health_score),
        "updated": moment(partnership.updated_at, zone),
    }


async def _partners_with_names(
    session: AsyncSession,
) -> list[tuple[Partnership, str | None, str | None]]:
    query = (
        select(Partnership, Contact.name, Company.name)
        .outerjoin(Contact, Contact.id == Partnership.contact_id)
        .outerjoin(Company, Company.id == Partnership.company_id)
        .order_by(Partnership.id)
    )
    return list(await session.execute(query))


async def partnership_choices(session: AsyncSession) -> list[tuple[Partnership, Candidate]]:
    """Every partnership with the candidate a reference is matched against: its name, and
    the partner company's and contact person's names."""
    return [
        (p, Candidate(p.id, partnership_label(p), tuple(filter(None, (p.name, company, person)))))
        for p, person, company in await _partners_with_names(session)
    ]


async def resolve_partnership(
    session: AsyncSession, reference: str
) -> Partnership | dict[str, Any]:
    """The partnership a caller means (by id, name, partner company or contact)."""
    choices = await partnership_choices(session)
    resolution = resolve(reference, [candidate for _, candidate in choices])
    if resolution.status != "found":
        return unresolved_reply(resolution, kind="partnership", reference=reference)
    return next(p for p, _ in choices if p.id == resolution.key)


# -- reads -----------------------------------------------------------------------------------------


class ListPartnershipsArgs(BaseModel):
    phase: PartnershipPhase | None = Field(None, description="Only partnerships in this phase.")
    limit: int = Field(5, ge=1, le=MAX_ITEMS, description="At most this many, least healthy first.")


class PartnershipSummaryArgs(BaseModel):
    partnership: str | None = Field(
        None,
        max_length=120,
        description="One partnership (id or name) to summarise; omit for all of them.",
    )


@tool("list_partnerships", args=ListPartnershipsArgs, risk="read", personas=CRM)
async def list_partnerships(args: ListPartnershipsArgs, ctx: ToolContext) -> dict[str, Any]:
    """Partnerships, least healthy first, optionally in one phase."""
    where = [Partnership.phase == args.phase] if args.phase else []
    async with tenant_session(ctx.db, ctx.tenant) as session:
        total = await session.scalar(select(func.count(Partnership.id)).where(*where)) or 0
        rows = await session.scalars(
            select(Partnership)
            .where(*where)
            .order_by(Partnership.health_score, Partnership.id)
            .limit(args.limit)
        )
        items = [partnership_view(p, zone_of(ctx.profile)) for p in rows]
    return listing(items, total, "partnerships")


@tool("get_partnership_summary", args=PartnershipSummaryArgs, risk="read", personas=CRM)
async def get_partnership_summary(args: PartnershipSummaryArgs, ctx: ToolContext) -> dict[str, Any]:
    """All partnerships at a glance (count per phase, average health, those at risk), or one
    partnership's details."""
    zone = zone_of(ctx.profile)
    async with tenant_session(ctx.db, ctx.tenant) as session:
        if args.partnership:
            found = await resolve_partnership(session, args.partnership)
            if isinstance(found, dict):
                return found
            contact = await session.get(Contact, found.contact_id) if found.contact_id else None
            company = await session.get(Company, found.company_id) if found.company_id else None
            return {
                "status": "ok",
                "partnership": partnership_view(found, zone)
                | {
                    "contact": contact.name if contact else None,
                    "company": company.name if company else None,
                    "notes": (found.notes or "")[:300] or None,
                    "next_phase": _next_phase(found.phase),
                },
            }
        rows = list(await session.scalars(select(Partnership).order_by(Partnership.health_score)))
    at_risk = [p for p in rows if p.health_score < AT_RISK_BELOW]
    return {
        "status": "ok",
        "total": len(rows),
        "by_phase": {phase: sum(1 for p in rows if p.phase == phase) for phase in PHASES},
        "average_health": round(sum(p.health_score for p in rows) / len(rows)) if rows else None,
        "at_risk": [partnership_view(p, zone) for p in at_risk[:5]],
        "at_risk_count": len(at_risk),
    }


def _next_phase(phase: str) -> str | None:
    index = PHASES.index(phase)
    return PHASES[index + 1] if index + 1 < len(PHASES) else None


# -- writes ----------------------------------------------------------------------------------------


class PartnershipRef(BaseModel):
    partnership: str = Field(
        min_length=1,
        max_length=120,
        description="Partnership id from an earlier result, or its name or partner's name.",
    )


class UpdatePhaseArgs(PartnershipRef):
    phase: PartnershipPhase = Field(description="The phase to move it to.")


class UpdateHealthArgs(PartnershipRef):
    health_score: int = Field(ge=0, le=100, description="New health score, 0 (failing) to 100.")
    reason: str | None = Field(None, max_length=300, description="Why, in a few words.")


def _phrase(reference: str) -> str:
    return (
        f"partnership {reference}"
        if reference.strip().isdigit()
        else f"the {reference} partnership"
    )


@tool(
    "update_partnership_phase",
    args=UpdatePhaseArgs,
    risk="medium",
    personas=CRM,
    summary=lambda a: f"I'll move {_phrase(a.partnership)} to the {a.phase} phase.",
)
async def update_partnership_phase(args: UpdatePhaseArgs, ctx: ToolContext) -> dict[str, Any]:
    """Move a partnership to another phase (discover, co-create, deploy, independent)."""
    async with tenant_session(ctx.db, ctx.tenant) as session:
        found = await resolve_partnership(session, args.partnership)
        if isinstance(found, dict):
            return found
        before = found.phase
        if before == args.phase:
            return {
                "status": "unchanged",
                "message": f"{found.name} is already in the {before} phase.",
                "partnership": partnership_view(found, zone_of(ctx.profile)),
            }
        found.phase = args.phase
        record_activity(
            session,
            ctx,
            "status_change",
            f"Partnership {found.name}: {before} -> {args.phase}",
            contact_id=found.contact_id,
            data={"partnership_id": found.id, "from": before, "to": args.phase},
        )
        await session.commit()
    return {
        "status": "ok",
        "from": before,
        "to": args.phase,
        "partnership": partnership_view(found, zone_of(ctx.profile)),
    }


@tool(
    "update_health_score",
    args=UpdateHealthArgs,
    risk="low",
    personas=CRM,
    summary=lambda a: f"I'll set the health score of {_phrase(a.partnership)} to {a.health_score}.",
)
async def update_health_score(args: UpdateHealthArgs, ctx: ToolContext) -> dict[str, Any]:
    """Set a partnership's health score (0-100), with an optional reason."""
    async with tenant_session(ctx.db, ctx.tenant) as session:
        found = await resolve_partnership(session, args.partnership)
        if isinstance(found, dict):
            return found
        before = found.health_score
        found.health_score = args.health_score
        record_activity(
            session,
            ctx,
            "note",
            f"Partnership {found.name}: health {before} -> {args.health_score}"
            + (f" ({args.reason})" if args.reason else ""),
            contact_id=found.contact_id,
            data={"partnership_id": found.id, "from": before, "to": args.health_score},
        )
        await session.commit()
    return {
        "status": "ok",
        "from": before,
        "to": args.health_score,
        "partnership": partnership_view(found, zone_of(ctx.profile)),
    }
