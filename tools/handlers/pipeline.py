"""The sales pipeline: deals (opportunities) by stage, and moving them along."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, get_args

from pydantic import BaseModel, Field
from sqlalchemy import func, select

from tools.db.models import Company, Contact, Lead, Opportunity, Stage
from tools.db.tenancy import tenant_session
from tools.handlers.bookings import day_info, listing, record_activity, zone_of
from tools.handlers.contacts import resolve_company, resolve_contact
from tools.handlers.leads import resolve_lead
from tools.matching import Candidate, label, resolve, unresolved_reply
from tools.registry import tool

if TYPE_CHECKING:
    from zoneinfo import ZoneInfo

    from sqlalchemy.ext.asyncio import AsyncSession

    from tools.context import ToolContext

CRM = {"crm_operator"}
MAX_ITEMS = 20
MATCH_POOL = 5000
STAGES: tuple[str, ...] = get_args(Stage)
CLOSED = ("closed-won", "closed-lost")
OPEN_STAGES = tuple(s for s in STAGES if s not in CLOSED)


def spoken_stage(stage: str) -> str:
    return stage.replace("-", " ")


def spoken_money(value: Decimal | float) -> str:
    amount = float(value)
    return f"${amount:,.0f}" if amount == int(amount) else f"${amount:,.2f}"


# -- shared with other handler modules -----------------------------------------------------


def deal_label(deal: Opportunity) -> str:
    who = deal.contact.name if deal.contact is not None else None
    who = who or (deal.company.name if deal.company is not None else None)
    return label(deal.title, who, spoken_stage(deal.stage), spoken_money(deal.value))


def deal_view(deal: Opportunity, zone: ZoneInfo) -> dict[str, Any]:
    return {
        "id": deal.id,
        "label": deal_label(deal),
        "title": deal.title,
        "stage": deal.stage,
        "value": float(deal.value),
        "contact": deal.contact.name if deal.contact is not None else None,
        "company": deal.company.name if deal.company is not None else None,
        "expected_close": day_info(deal.expected_close, zone) if deal.expected_close else None,
    }


def deal_candidate(deal: Opportunity) -> Candidate:
    names = (
        deal.title,
        deal.contact.name if deal.contact is not None else None,
        deal.company.name if deal.company is not None else None,
    )
    return Candidate(deal.id, deal_label(deal), tuple(filter(None, names)))


async def resolve_deal(session: AsyncSession, reference: str) -> Opportunity | dict[str, Any]:
    """The deal a caller means (by id, title, contact or company name), or the reply to give."""
    query = select(Opportunity).order_by(Opportunity.updated_at.desc(), Opportunity.id.desc())
    rows = list((await session.scalars(query.limit(MATCH_POOL))).unique())
    resolution = resolve(reference, [deal_candidate(d) for d in rows])
    if resolution.status != "found":
        return unresolved_reply(resolution, kind="deal", reference=reference)
    return next(d for d in rows if d.id == resolution.key)


# -- reads -----------------------------------------------------------------------------------------


class ListDealsArgs(BaseModel):
    stage: Stage | None = Field(None, description="Only deals in this stage (default: open ones).")
    limit: int = Field(5, ge=1, le=MAX_ITEMS, description="At most this many, biggest first.")


class NoArgs(BaseModel):
    pass


@tool("list_opportunities", args=ListDealsArgs, risk="read", personas=CRM)
async def list_opportunities(args: ListDealsArgs, ctx: ToolContext) -> dict[str, Any]:
    """Deals in the pipeline, biggest first: one stage, or every open stage by default."""
    where = Opportunity.stage == args.stage if args.stage else Opportunity.stage.in_(OPEN_STAGES)
    async with tenant_session(ctx.db, ctx.tenant) as session:
        total = await session.scalar(select(func.count(Opportunity.id)).where(where)) or 0
        rows = (
            await session.scalars(
                select(Opportunity)
                .where(where)
                .order_by(Opportunity.value.desc(), Opportunity.id)
                .limit(args.limit)
            )
        ).unique()
        items = [deal_view(d, zone_of(ctx.profile)) for d in rows]
    return {"stage": args.stage or "open", **listing(items, total, "deals")}


@tool("get_pipeline_summary", args=NoArgs, risk="read", personas=CRM)
async def get_pipeline_summary(args: NoArgs, ctx: ToolContext) -> dict[str, Any]:
    """Deal count and value per stage, the open pipeline total, and what was won this month."""
    zone = zone_of(ctx.profile)
    month_start_local = datetime.now(zone).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    async with tenant_session(ctx.db, ctx.tenant) as session:
        rows = await session.execute(
            select(
                Opportunity.stage,
                func.count(Opportunity.id),
                func.coalesce(func.sum(Opportunity.value), 0),
            ).group_by(Opportunity.stage)
        )
        per_stage = {stage: (count, float(value)) for stage, count, value in rows}
        won_this_month = await session.execute(
            select(func.count(Opportunity.id), func.coalesce(func.sum(Opportunity.value), 0)).where(
                Opportunity.stage == "closed-won",
                Opportunity.closed_at >= month_start_local.astimezone(UTC),
            )
        )
        won_count, won_value = won_this_month.one()
    stages = [
        {
            "stage": stage,
            "deals": per_stage.get(stage, (0, 0.0))[0],
            "value": per_stage.get(stage, (0, 0.0))[1],
        }
        for stage in STAGES
    ]
    open_deals = sum(s["deals"] for s in stages if s["stage"] in OPEN_STAGES)
    open_value = sum(s["value"] for s in stages if s["stage"] in OPEN_STAGES)
    return {
        "status": "ok",
        "stages": stages,
        "open_deals": open_deals,
        "open_value": open_value,
        "open_value_spoken": spoken_money(open_value),
        "won_this_month": {"deals": won_count, "value": float(won_value)},
    }


# -- writes ----------------------------------------------------------------------------------------


class CreateDealArgs(BaseModel):
    title: str = Field(
        min_length=1, max_length=200, description='Short name, e.g. "Johnson kitchen remodel".'
    )
    value: float = Field(0, ge=0, le=100_000_000, description="Expected value in dollars.")
    stage: Stage = "new-lead"
    contact: str | None = Field(None, max_length=120, description="Contact name or id, if any.")
    company: str | None = Field(None, max_length=120, description="Company name or id, if any.")
    lead: str | None = Field(None, max_length=120, description="Lead name or id, if any.")
    expected_close: date | None = Field(None, description="Expected closing day.")
    notes: str | None = Field(None, max_length=2000)


class MoveDealArgs(BaseModel):
    deal: str = Field(
        min_length=1,
        max_length=120,
        description="Deal id from an earlier result, or its title, contact or company name.",
    )
    stage: Stage = Field(description="The stage to move it to.")


@tool(
    "create_opportunity",
    args=CreateDealArgs,
    risk="low",
    personas=CRM,
    summary=lambda a: (
        f"I'll add a {spoken_money(a.value)} deal, {a.title}, "
        f"at stage {spoken_stage(a.stage)}"
        + (f" for {a.contact or a.company or a.lead}" if (a.contact or a.company or a.lead) else "")
        + "."
    ),
)
async def create_opportunity(args: CreateDealArgs, ctx: ToolContext) -> dict[str, Any]:
    """Add a deal to the pipeline, optionally linked to a contact, company and lead."""
    async with tenant_session(ctx.db, ctx.tenant) as session:
        contact: Contact | dict[str, Any] | None = None
        company: Company | dict[str, Any] | None = None
        lead: Lead | dict[str, Any] | None = None
        if args.contact:
            contact = await resolve_contact(session, args.contact)
        if args.company:
            company = await resolve_company(session, args.company)
        if args.lead:
            lead = await resolve_lead(session, args.lead)
        for link in (contact, company, lead):
            if isinstance(link, dict):
                return link | {"message": link["message"] + " The deal was not created yet."}
        assert not isinstance(contact, dict) and not isinstance(company, dict)
        assert not isinstance(lead, dict)
        deal = Opportunity(
            title=args.title.strip(),
            value=Decimal(str(args.value)),
            stage=args.stage,
            contact=contact,
            company=company or (contact.company if contact is not None else None),
            lead_id=lead.id if lead is not None else None,
            expected_close=args.expected_close,
            notes=args.notes,
            closed_at=datetime.now(UTC) if args.stage in CLOSED else None,
        )
        session.add(deal)
        await session.flush()
        record_activity(
            session,
            ctx,
            "note",
            f"Deal added: {deal_label(deal)}",
            opportunity_id=deal.id,
            contact_id=deal.contact_id,
            lead_id=deal.lead_id,
        )
        await session.commit()
    return {"status": "ok", "deal": deal_view(deal, zone_of(ctx.profile))}


def _deal_phrase(reference: str) -> str:
    return f"deal {reference}" if reference.strip().isdigit() else f"the {reference} deal"


@tool(
    "move_deal",
    args=MoveDealArgs,
    risk="medium",
    personas=CRM,
    summary=lambda a: f"I'll move {_deal_phrase(a.deal)} to {spoken_stage(a.stage)}.",
)
async def move_deal(args: MoveDealArgs, ctx: ToolContext) -> dict[str, Any]:
    """Move a deal to another pipeline stage (closing it when the stage is closed-won or
    closed-lost)."""
    async with tenant_session(ctx.db, ctx.tenant) as session:
        deal = await resolve_deal(session, args.deal)
        if isinstance(deal, dict):
            return deal
        before = deal.stage
        if before == args.stage:
            return {
                "status": "unchanged",
                "message": f"{deal.title} is already at {spoken_stage(before)}.",
                "deal": deal_view(deal, zone_of(ctx.profile)),
            }
        deal.stage = args.stage
        deal.closed_at = datetime.now(UTC) if args.stage in CLOSED else None
        record_activity(
            session,
            ctx,
            "status_change",
            f"Deal {deal.title}: {spoken_stage(before)} -> {spoken_stage(args.stage)}",
            opportunity_id=deal.id,
            contact_id=deal.contact_id,
            lead_id=deal.lead_id,
            data={"from": before, "to": args.stage},
        )
        await session.commit()
    return {
        "status": "ok",
        "from": before,
        "to": args.stage,
        "deal": deal_view(deal, zone_of(ctx.profile)),
    }
