"""Leads for the CRM operator: list, search, count, capture, qualify and score them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, get_args

from pydantic import BaseModel, Field
from sqlalchemy import func, select

from tools.db.models import (
    Activity,
    Booking,
    Lead,
    LeadSource,
    LeadStatus,
    Opportunity,
    Task,
    Urgency,
)
from tools.db.tenancy import tenant_session
from tools.handlers.bookings import listing, moment, record_activity, zone_of
from tools.matching import Candidate, label, resolve, search, spoken_phone, unresolved_reply
from tools.registry import tool

if TYPE_CHECKING:
    from zoneinfo import ZoneInfo

    from sqlalchemy.ext.asyncio import AsyncSession

    from tools.context import ToolContext

CRM = {"crm_operator"}
MAX_ITEMS = 20
# Matching loads the newest leads only; a business with more live leads than this has
# outgrown finding them by spoken name anyway.
MATCH_POOL = 5000
REF_DESCRIPTION = "Lead id from an earlier result, or the person's name, job or phone number."


# -- shared with other handler modules -----------------------------------------------------


def lead_label(lead: Lead) -> str:
    return label(lead.name, lead.job_type, spoken_phone(lead.phone))


def lead_view(lead: Lead, zone: ZoneInfo) -> dict[str, Any]:
    return {
        "id": lead.id,
        "label": lead_label(lead),
        "name": lead.name,
        "phone": spoken_phone(lead.phone),
        "job": lead.job_type,
        "status": lead.status,
        "urgency": lead.urgency,
        "score": lead.score,
        "created": moment(lead.created_at, zone),
    }


def lead_candidate(lead: Lead) -> Candidate:
    return Candidate(
        lead.id,
        lead_label(lead),
        tuple(filter(None, (lead.name, lead.job_type, lead.email))),
        (lead.phone,) if lead.phone else (),
    )


async def lead_pool(session: AsyncSession) -> list[Lead]:
    query = select(Lead).order_by(Lead.created_at.desc(), Lead.id.desc()).limit(MATCH_POOL)
    return list(await session.scalars(query))


async def resolve_lead(session: AsyncSession, reference: str) -> Lead | dict[str, Any]:
    """The lead a caller means, or the ambiguous/not-found reply to give instead."""
    rows = await lead_pool(session)
    resolution = resolve(reference, [lead_candidate(lead) for lead in rows])
    if resolution.status != "found":
        return unresolved_reply(resolution, kind="lead", reference=reference)
    return next(lead for lead in rows if lead.id == resolution.key)


# -- scoring (pure) ----------------------------------------------------------------------------

URGENCY_POINTS: dict[str, int] = {"emergency": 30, "urgent": 22, "routine": 12, "flexible": 5}
STATUS_POINTS: dict[str, int] = {"new": 5, "contacted": 10, "qualified": 20, "converted": 25}
SOURCE_POINTS: dict[str, int] = {"referral": 10, "voice": 5, "sms": 5, "web": 3, "other": 0}


def score_factors(lead: Lead, *, now: datetime, open_deal_value: float) -> dict[str, int]:
    """Points per reason, summing to at most 100; spoken back so the score can be explained."""
    age = now - lead.created_at
    factors = {
        "urgency": URGENCY_POINTS.get(lead.urgency, 0),
        "status": STATUS_POINTS.get(lead.status, 0),
        "source": SOURCE_POINTS.get(lead.source, 0),
        "reachable": (10 if lead.phone else 0) + (5 if lead.email else 0),
        "job described": 5 if lead.job_type else 0,
        "address known": 5 if lead.address else 0,
        "fresh (under a week)": 10 if age <= timedelta(days=7) else 0,
        "open deal value": 0 if open_deal_value <= 0 else (5 if open_deal_value < 1000 else 10),
    }
    return {reason: points for reason, points in factors.items() if points}


# -- reads -----------------------------------------------------------------------------------------


class ListLeadsArgs(BaseModel):
    status: LeadStatus | None = Field(None, description="Only leads in this status.")
    urgency: Urgency | None = Field(None, description="Only leads with this urgency.")
    limit: int = Field(5, ge=1, le=MAX_ITEMS, description="At most this many leads, newest first.")


class SearchLeadsArgs(BaseModel):
    query: str = Field(min_length=1, max_length=120, description="Name, job, email or phone.")
    limit: int = Field(5, ge=1, le=MAX_ITEMS)


class CountLeadsArgs(BaseModel):
    status: LeadStatus | None = Field(None, description="Count only leads in this status.")
    source: LeadSource | None = Field(None, description="Count only leads from this source.")
    days: int | None = Field(None, ge=1, le=3650, description="Only leads from the last N days.")


class LeadRefArgs(BaseModel):
    lead: str = Field(min_length=1, max_length=120, description=REF_DESCRIPTION)


@tool("list_leads", args=ListLeadsArgs, risk="read", personas=CRM)
async def list_leads(args: ListLeadsArgs, ctx: ToolContext) -> dict[str, Any]:
    """The newest leads, optionally only those with a given status or urgency."""
    where = []
    if args.status is not None:
        where.append(Lead.status == args.status)
    if args.urgency is not None:
        where.append(Lead.urgency == args.urgency)
    async with tenant_session(ctx.db, ctx.tenant) as session:
        total = await session.scalar(select(func.count(Lead.id)).where(*where)) or 0
        rows = await session.scalars(
            select(Lead)
            .where(*where)
            .order_by(Lead.created_at.desc(), Lead.id.desc())
            .limit(args.limit)
        )
        items = [lead_view(lead, zone_of(ctx.profile)) for lead in rows]
    return listing(items, total, "leads")


@tool("search_leads", args=SearchLeadsArgs, risk="read", personas=CRM)
async def search_leads(args: SearchLeadsArgs, ctx: ToolContext) -> dict[str, Any]:
    """Find leads by (part of) a name, job, email or phone number; best matches first."""
    async with tenant_session(ctx.db, ctx.tenant) as session:
        rows = {lead.id: lead for lead in await lead_pool(session)}
    found = search(args.query, [lead_candidate(lead) for lead in rows.values()])
    zone = zone_of(ctx.profile)
    items = [lead_view(rows[s.candidate.key], zone) for s in found[: args.limit]]  # type: ignore[index]
    return {"query": args.query, **listing(items, len(found), "leads")}


@tool("count_leads", args=CountLeadsArgs, risk="read", personas=CRM)
async def count_leads(args: CountLeadsArgs, ctx: ToolContext) -> dict[str, Any]:
    """How many leads there are, with a breakdown by status, optionally filtered by status,
    source or recency."""
    where = []
    if args.source is not None:
        where.append(Lead.source == args.source)
    if args.days is not None:
        where.append(Lead.created_at >= datetime.now(UTC) - timedelta(days=args.days))
    async with tenant_session(ctx.db, ctx.tenant) as session:
        rows = await session.execute(
            select(Lead.status, func.count(Lead.id)).where(*where).group_by(Lead.status)
        )
        by_status = {status: 0 for status in get_args(LeadStatus)} | dict(rows.all())
    count = by_status[args.status] if args.status else sum(by_status.values())
    return {
        "status": "ok",
        "count": count,
        "by_status": by_status,
        "filters": args.model_dump(exclude_none=True),
    }


@tool("get_lead_summary", args=LeadRefArgs, risk="read", personas=CRM)
async def get_lead_summary(args: LeadRefArgs, ctx: ToolContext) -> dict[str, Any]:
    """Everything worth saying about one lead: details, latest activity, open tasks, bookings
    and deals."""
    zone = zone_of(ctx.profile)
    async with tenant_session(ctx.db, ctx.tenant) as session:
        lead = await resolve_lead(session, args.lead)
        if isinstance(lead, dict):
            return lead
        activities = list(
            await session.scalars(
                select(Activity)
                .where(Activity.lead_id == lead.id)
                .order_by(Activity.at.desc(), Activity.id.desc())
                .limit(3)
            )
        )
        open_tasks = list(
            await session.scalars(
                select(Task).where(Task.lead_id == lead.id, Task.status == "open").limit(5)
            )
        )
        bookings = list(
            await session.scalars(
                select(Booking)
                .where(Booking.lead_id == lead.id, Booking.status != "cancelled")
                .order_by(Booking.starts_at.desc())
                .limit(3)
            )
        )
        deals = list(
            await session.scalars(select(Opportunity).where(Opportunity.lead_id == lead.id))
        )
    return {
        "status": "ok",
        "lead": lead_view(lead, zone)
        | {"email": lead.email, "address": lead.address, "source": lead.source},
        "notes": (lead.notes or "")[:300] or None,
        "recent_activity": [
            {"kind": a.kind, "what": a.body[:160], "when": moment(a.at, zone)} for a in activities
        ],
        "open_tasks": [
            {"id": t.id, "title": t.title, "due": moment(t.due, zone)} for t in open_tasks
        ],
        "bookings": [
            {
                "id": b.id,
                "service": b.service,
                "status": b.status,
                "starts": moment(b.starts_at, zone),
            }
            for b in bookings
        ],
        "deals": [
            {"id": d.id, "title": d.title, "stage": d.stage, "value": float(d.value)} for d in deals
        ],
    }


# -- writes ----------------------------------------------------------------------------------------


class CreateLeadArgs(BaseModel):
    name: str = Field(min_length=1, max_length=200, description="The person's full name.")
    phone: str | None = Field(None, max_length=32, description="Phone number, E.164 if known.")
    email: str | None = Field(None, max_length=254)
    job_type: str | None = Field(None, max_length=200, description="What they need done.")
    address: str | None = Field(None, max_length=500, description="Where the job is.")
    urgency: Urgency = "routine"
    source: LeadSource | None = Field(
        None, description="Where the lead came from (default: this call or text)."
    )
    notes: str | None = Field(None, max_length=2000)


class UpdateLeadStatusArgs(LeadRefArgs):
    status: LeadStatus = Field(description="The new status.")


class ScoreLeadArgs(LeadRefArgs):
    score: int | None = Field(
        None,
        ge=0,
        le=100,
        description="Set this score (0-100) as the caller says; omit to compute it from the "
        "lead's urgency, status, source, contact details, age and open deals.",
    )


def _lead_phrase(reference: str) -> str:
    return f"lead {reference}" if reference.strip().isdigit() else f"the lead for {reference}"


@tool(
    "create_lead",
    args=CreateLeadArgs,
    risk="low",
    personas=CRM,
    summary=lambda a: (
        f"I'll add {a.name} as a new lead"
        + (f" for {a.job_type}" if a.job_type else "")
        + (f", phone {spoken_phone(a.phone)}" if a.phone else "")
        + "."
    ),
)
async def create_lead(args: CreateLeadArgs, ctx: ToolContext) -> dict[str, Any]:
    """Add a new lead (a prospective customer)."""
    source = args.source or ("sms" if ctx.channel == "sms" else "voice")
    async with tenant_session(ctx.db, ctx.tenant) as session:
        duplicates = (
            search(args.phone, [lead_candidate(x) for x in await lead_pool(session)])
            if args.phone
            else []
        )
        lead = Lead(
            name=args.name.strip(),
            phone=args.phone,
            email=args.email,
            job_type=args.job_type,
            address=args.address,
            urgency=args.urgency,
            source=source,
            notes=args.notes,
            conversation_id=ctx.conversation_id,
        )
        session.add(lead)
        await session.flush()
        record_activity(
            session, ctx, "lead_captured", f"New lead: {lead_label(lead)}", lead_id=lead.id
        )
        await session.commit()
    result: dict[str, Any] = {"status": "ok", "lead": lead_view(lead, zone_of(ctx.profile))}
    if duplicates:
        result["same_phone_as"] = [
            {"id": s.candidate.key, "label": s.candidate.label} for s in duplicates[:3]
        ]
    return result


@tool(
    "update_lead_status",
    args=UpdateLeadStatusArgs,
    risk="medium",
    personas=CRM,
    summary=lambda a: f"I'll mark {_lead_phrase(a.lead)} as {a.status}.",
)
async def update_lead_status(args: UpdateLeadStatusArgs, ctx: ToolContext) -> dict[str, Any]:
    """Move a lead to another status (new, contacted, qualified, converted)."""
    async with tenant_session(ctx.db, ctx.tenant) as session:
        lead = await resolve_lead(session, args.lead)
        if isinstance(lead, dict):
            return lead
        before = lead.status
        if before == args.status:
            return {
                "status": "unchanged",
                "message": f"{lead.name} is already {before}.",
                "lead": lead_view(lead, zone_of(ctx.profile)),
            }
        lead.status = args.status
        record_activity(
            session,
            ctx,
            "status_change",
            f"Lead {lead.name}: {before} -> {args.status}",
            lead_id=lead.id,
            data={"from": before, "to": args.status},
        )
        await session.commit()
    return {
        "status": "ok",
        "from": before,
        "to": args.status,
        "lead": lead_view(lead, zone_of(ctx.profile)),
    }


@tool(
    "score_lead",
    args=ScoreLeadArgs,
    risk="low",
    personas=CRM,
    summary=lambda a: (
        f"I'll set the score of {_lead_phrase(a.lead)} to {a.score}."
        if a.score is not None
        else f"I'll work out a score for {_lead_phrase(a.lead)} and save it."
    ),
)
async def score_lead(args: ScoreLeadArgs, ctx: ToolContext) -> dict[str, Any]:
    """Score a lead from 0 to 100 (given by the caller, or computed with the reasons) and save
    it on the lead."""
    async with tenant_session(ctx.db, ctx.tenant) as session:
        lead = await resolve_lead(session, args.lead)
        if isinstance(lead, dict):
            return lead
        if args.score is not None:
            score, factors = args.score, {"set by caller": args.score}
        else:
            open_value = await session.scalar(
                select(func.coalesce(func.sum(Opportunity.value), 0)).where(
                    Opportunity.lead_id == lead.id,
                    Opportunity.stage.not_in(("closed-won", "closed-lost")),
                )
            )
            factors = score_factors(
                lead, now=datetime.now(UTC), open_deal_value=float(open_value or 0)
            )
            score = min(100, sum(factors.values()))
        before = lead.score
        lead.score = score
        record_activity(
            session,
            ctx,
            "note",
            f"Lead {lead.name} scored {score} (was {before})",
            lead_id=lead.id,
            data={"score": score, "factors": factors},
        )
        await session.commit()
    return {
        "status": "ok",
        "score": score,
        "previous_score": before,
        "factors": factors,
        "lead": lead_view(lead, zone_of(ctx.profile)),
    }
