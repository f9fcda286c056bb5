"""How the business (and the assistant) is doing: dashboard, daily summary, timeline, call
insights and the assistant's return on investment. Reads only."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any, get_args

from pydantic import BaseModel, Field
from sqlalchemy import func, select

from tools.db.models import (
    Activity,
    ActivityKind,
    Booking,
    Call,
    Escalation,
    Lead,
    LeadStatus,
    Opportunity,
    Task,
)
from tools.db.tenancy import tenant_session
from tools.handlers.bookings import day_bounds, day_info, listing, local_now, moment, zone_of
from tools.handlers.leads import lead_label
from tools.handlers.pipeline import OPEN_STAGES, spoken_money
from tools.registry import tool

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from tools.context import ToolContext

CRM = {"crm_operator"}
MAX_ITEMS = 20
# With fewer converted-or-not agent leads than this, the observed conversion rate is noise.
MIN_LEADS_FOR_OBSERVED_RATE = 5
DEFAULT_CONVERSION_RATE = 0.2


async def _count(session: AsyncSession, column: Any, *where: Any) -> int:
    return await session.scalar(select(func.count(column)).where(*where)) or 0


def _call_start() -> Any:
    # Calls that never connected have no start; they still happened when the row was made.
    return func.coalesce(Call.started_at, Call.created_at)


# -- dashboard and daily summary ---------------------------------------------------------------


class PeriodArgs(BaseModel):
    days: int = Field(30, ge=1, le=365, description="Look back this many days (default 30).")


class DailySummaryArgs(BaseModel):
    day: date | None = Field(None, description="Local day to summarise (default: today).")


@tool("get_dashboard_stats", args=PeriodArgs, risk="read", personas=CRM)
async def get_dashboard_stats(args: PeriodArgs, ctx: ToolContext) -> dict[str, Any]:
    """Headline numbers: leads, pipeline, bookings, tasks, calls and escalations."""
    zone = zone_of(ctx.profile)
    now = local_now(ctx)
    since = now.astimezone(UTC) - timedelta(days=args.days)
    today_start, today_end = day_bounds(now.date(), zone)
    _, week_end = day_bounds(now.date() + timedelta(days=6), zone)
    async with tenant_session(ctx.db, ctx.tenant) as session:
        status_rows = await session.execute(
            select(Lead.status, func.count(Lead.id)).group_by(Lead.status)
        )
        by_status = {s: 0 for s in get_args(LeadStatus)} | dict(status_rows.all())
        open_deals, open_value = (
            await session.execute(
                select(
                    func.count(Opportunity.id), func.coalesce(func.sum(Opportunity.value), 0)
                ).where(Opportunity.stage.in_(OPEN_STAGES))
            )
        ).one()
        won_value = await session.scalar(
            select(func.coalesce(func.sum(Opportunity.value), 0)).where(
                Opportunity.stage == "closed-won", Opportunity.closed_at >= since
            )
        )
        live = Booking.status != "cancelled"
        stats = {
            "period_days": args.days,
            "leads": {
                "new_in_period": await _count(session, Lead.id, Lead.created_at >= since),
                "by_status": by_status,
            },
            "pipeline": {
                "open_deals": open_deals,
                "open_value": float(open_value),
                "open_value_spoken": spoken_money(open_value),
                "won_in_period": float(won_value or 0),
            },
            "bookings": {
                "today": await _count(
                    session,
                    Booking.id,
                    live,
                    Booking.starts_at >= today_start,
                    Booking.starts_at < today_end,
                ),
                "next_7_days": await _count(
                    session,
                    Booking.id,
                    live,
                    Booking.starts_at >= now.astimezone(UTC),
                    Booking.starts_at < week_end,
                ),
                "pending": await _count(
                    session,
                    Booking.id,
                    Booking.status == "pending",
                    Booking.starts_at >= now.astimezone(UTC),
                ),
            },
            "tasks": {
                "open": await _count(session, Task.id, Task.status == "open"),
                "overdue": await _count(
                    session, Task.id, Task.status == "open", Task.due < now.astimezone(UTC)
                ),
            },
            "calls_in_period": await _count(session, Call.id, _call_start() >= since),
            "escalations_in_period": await _count(
                session, Escalation.id, Escalation.created_at >= since
            ),
        }
    return {"status": "ok", **stats}


@tool("get_daily_summary", args=DailySummaryArgs, risk="read", personas=CRM)
async def get_daily_summary(args: DailySummaryArgs, ctx: ToolContext) -> dict[str, Any]:
    """One local day at a glance: calls, new leads, appointments, tasks due, escalations and
    what moved in the pipeline."""
    zone = zone_of(ctx.profile)
    now = local_now(ctx)
    day = args.day or now.date()
    start, end = day_bounds(day, zone)
    async with tenant_session(ctx.db, ctx.tenant) as session:
        calls, call_seconds = (
            await session.execute(
                select(func.count(Call.id), func.coalesce(func.sum(Call.duration_s), 0)).where(
                    _call_start() >= start, _call_start() < end
                )
            )
        ).one()
        new_leads = list(
            await session.scalars(
                select(Lead)
                .where(Lead.created_at >= start, Lead.created_at < end)
                .order_by(Lead.created_at)
            )
        )
        bookings = list(
            await session.scalars(
                select(Booking)
                .where(
                    Booking.starts_at >= start,
                    Booking.starts_at < end,
                    Booking.status != "cancelled",
                )
                .order_by(Booking.starts_at)
            )
        )
        tasks_due = list(
            await session.scalars(
                select(Task)
                .where(Task.status == "open", Task.due.is_not(None), Task.due < end)
                .order_by(Task.due)
            )
        )
        escalations = list(
            await session.scalars(
                select(Escalation).where(
                    Escalation.created_at >= start, Escalation.created_at < end
                )
            )
        )
        moves = list(
            await session.scalars(
                select(Activity)
                .where(
                    Activity.kind == "status_change",
                    Activity.opportunity_id.is_not(None),
                    Activity.at >= start,
                    Activity.at < end,
                )
                .order_by(Activity.at)
            )
        )
    return {
        "status": "ok",
        "day": day_info(day, zone, now),
        "calls": {"count": calls, "minutes": round(float(call_seconds) / 60, 1)},
        "new_leads": {"count": len(new_leads), "top": [lead_label(x) for x in new_leads[:5]]},
        "appointments": {
            "count": len(bookings),
            "list": [
                {
                    "id": b.id,
                    "customer": b.customer_name,
                    "service": b.service,
                    "starts": moment(b.starts_at, zone, now),
                    "status": b.status,
                }
                for b in bookings[:5]
            ],
        },
        "tasks_due": {
            "count": len(tasks_due),
            "overdue": sum(1 for t in tasks_due if t.due is not None and t.due < start),
            "top": [
                {"id": t.id, "title": t.title, "due": moment(t.due, zone, now)}
                for t in tasks_due[:5]
            ],
        },
        "escalations": {
            "count": len(escalations),
            "categories": dict(Counter(e.category for e in escalations)),
        },
        "deal_moves": [m.body for m in moves[:5]],
    }


# -- the timeline ------------------------------------------------------------------------------


class RecentActivitiesArgs(BaseModel):
    limit: int = Field(5, ge=1, le=MAX_ITEMS, description="At most this many, newest first.")
    kind: ActivityKind | None = Field(None, description="Only activities of this kind.")
    days: int | None = Field(None, ge=1, le=365, description="Only from the last N days.")


@tool("get_recent_activities", args=RecentActivitiesArgs, risk="read", personas=CRM)
async def get_recent_activities(args: RecentActivitiesArgs, ctx: ToolContext) -> dict[str, Any]:
    """The latest entries on the timeline (notes, calls, status changes, bookings...)."""
    zone = zone_of(ctx.profile)
    where = []
    if args.kind is not None:
        where.append(Activity.kind == args.kind)
    if args.days is not None:
        where.append(Activity.at >= datetime.now(UTC) - timedelta(days=args.days))
    async with tenant_session(ctx.db, ctx.tenant) as session:
        total = await _count(session, Activity.id, *where)
        rows = await session.scalars(
            select(Activity)
            .where(*where)
            .order_by(Activity.at.desc(), Activity.id.desc())
            .limit(args.limit)
        )
        items = [
            {
                "id": a.id,
                "kind": a.kind,
                "what": a.body[:200],
                "by": a.actor,
                "when": moment(a.at, zone),
            }
            for a in rows
        ]
    return listing(items, total, "activities")


# -- the assistant itself ----------------------------------------------------------------------


def call_outcome(
    call_sid: str, leads: set[str], bookings: set[str], escalated: set[str]
) -> list[str]:
    """What a conversation produced, from the records that carry its CallSid."""
    outcome = [
        name
        for name, produced in (
            ("lead_captured", leads),
            ("booked", bookings),
            ("escalated", escalated),
        )
        if call_sid in produced
    ]
    return outcome or ["no_record"]


async def _conversation_ids(session: AsyncSession, column: Any) -> set[str]:
    rows = await session.scalars(select(column).where(column.is_not(None)))
    return {str(r) for r in rows}


@tool("get_voice_session_insights", args=PeriodArgs, risk="read", personas=CRM)
async def get_voice_session_insights(args: PeriodArgs, ctx: ToolContext) -> dict[str, Any]:
    """How the phone assistant's calls went: counts, durations, tools used and outcomes (lead
    captured, booked, escalated, or nothing recorded)."""
    since = datetime.now(UTC) - timedelta(days=args.days)
    async with tenant_session(ctx.db, ctx.tenant) as session:
        calls = list(await session.scalars(select(Call).where(_call_start() >= since)))
        with_lead = await _conversation_ids(session, Lead.conversation_id)
        with_booking = await _conversation_ids(session, Booking.conversation_id)
        escalated = await _conversation_ids(session, Escalation.conversation_id)
    durations = [c.duration_s for c in calls if c.duration_s is not None]
    tools_used: Counter[str] = Counter()
    tool_problems = 0
    outcomes: Counter[str] = Counter()
    for call in calls:
        for entry in call.tool_calls:
            tools_used[str(entry.get("name", "unknown"))] += 1
            if entry.get("status") not in (None, "ok"):
                tool_problems += 1
        outcomes.update(call_outcome(call.call_sid, with_lead, with_booking, escalated))
    return {
        "status": "ok",
        "period_days": args.days,
        "calls": len(calls),
        "by_direction": dict(Counter(c.direction for c in calls)),
        "by_persona": dict(Counter(c.persona or "unknown" for c in calls)),
        "by_status": dict(Counter(c.status or "unknown" for c in calls)),
        "duration": {
            "total_minutes": round(sum(durations) / 60, 1),
            "average_seconds": round(sum(durations) / len(durations)) if durations else None,
            "longest_seconds": round(max(durations)) if durations else None,
        },
        "tool_calls": sum(tools_used.values()),
        "top_tools": dict(tools_used.most_common(5)),
        "tool_results_not_ok": tool_problems,
        "outcomes": dict(outcomes),
    }


class RoiArgs(PeriodArgs):
    admin_minutes_per_call: float = Field(
        5.0, ge=0, le=120, description="Staff minutes each call would also cost (notes, callbacks)."
    )
    hourly_rate: float = Field(25.0, ge=0, le=1000, description="Staff cost per hour, dollars.")
    conversion_rate: float | None = Field(
        None, ge=0, le=1, description="Lead-to-customer rate to assume (default: observed)."
    )
    average_deal_value: float | None = Field(
        None, ge=0, description="Average won deal in dollars to assume (default: observed)."
    )


ROI_FORMULA = (
    "revenue = agent_leads * conversion_rate * average_deal_value; "
    "hours_saved = (call_minutes + calls * admin_minutes_per_call) / 60; "
    "labour_value = hours_saved * hourly_rate; total_value = revenue + labour_value"
)


@tool("get_roi_calculation_insights", args=RoiArgs, risk="read", personas=CRM)
async def get_roi_calculation_insights(args: RoiArgs, ctx: ToolContext) -> dict[str, Any]:
    """What the assistant was worth over a period: revenue expected from the leads it
    captured plus staff time it saved. The formula and every input are in the result."""
    since = datetime.now(UTC) - timedelta(days=args.days)
    agent_lead = Lead.conversation_id.is_not(None)
    async with tenant_session(ctx.db, ctx.tenant) as session:
        agent_leads = await _count(session, Lead.id, agent_lead, Lead.created_at >= since)
        agent_leads_ever = await _count(session, Lead.id, agent_lead)
        converted = await _count(session, Lead.id, agent_lead, Lead.status == "converted")
        all_leads = await _count(session, Lead.id)
        all_converted = await _count(session, Lead.id, Lead.status == "converted")
        won_avg = await session.scalar(
            select(func.avg(Opportunity.value)).where(Opportunity.stage == "closed-won")
        )
        open_avg = await session.scalar(
            select(func.avg(Opportunity.value)).where(Opportunity.stage.in_(OPEN_STAGES))
        )
        calls, call_seconds = (
            await session.execute(
                select(func.count(Call.id), func.coalesce(func.sum(Call.duration_s), 0)).where(
                    _call_start() >= since
                )
            )
        ).one()

    if args.conversion_rate is not None:
        rate, rate_basis = args.conversion_rate, "given by the caller"
    elif agent_leads_ever >= MIN_LEADS_FOR_OBSERVED_RATE:
        rate, rate_basis = (
            converted / agent_leads_ever,
            f"observed: {converted} of {agent_leads_ever} agent leads converted",
        )
    elif all_leads >= MIN_LEADS_FOR_OBSERVED_RATE:
        rate, rate_basis = (
            all_converted / all_leads,
            f"observed: {all_converted} of {all_leads} leads converted",
        )
    else:
        rate, rate_basis = DEFAULT_CONVERSION_RATE, "assumed (too few leads to measure)"

    if args.average_deal_value is not None:
        deal_value, value_basis = args.average_deal_value, "given by the caller"
    elif won_avg is not None:
        deal_value, value_basis = float(won_avg), "average closed-won deal"
    elif open_avg is not None:
        deal_value, value_basis = float(open_avg), "average open deal (nothing won yet)"
    else:
        deal_value, value_basis = 0.0, "no deals on file: give average_deal_value to estimate"

    call_minutes = float(call_seconds) / 60
    revenue = agent_leads * rate * deal_value
    hours_saved = (call_minutes + calls * args.admin_minutes_per_call) / 60
    labour_value = hours_saved * args.hourly_rate
    total = revenue + labour_value
    return {
        "status": "ok",
        "period_days": args.days,
        "formula": ROI_FORMULA,
        "inputs": {
            "agent_leads": agent_leads,
            "conversion_rate": round(rate, 3),
            "conversion_rate_basis": rate_basis,
            "average_deal_value": round(deal_value, 2),
            "average_deal_value_basis": value_basis,
            "calls": calls,
            "call_minutes": round(call_minutes, 1),
            "admin_minutes_per_call": args.admin_minutes_per_call,
            "hourly_rate": args.hourly_rate,
        },
        "expected_revenue": round(revenue, 2),
        "hours_saved": round(hours_saved, 1),
        "labour_value": round(labour_value, 2),
        "total_value": round(total, 2),
        "spoken": f"About {spoken_money(round(total))} over {args.days} days: "
        f"{spoken_money(round(revenue))} expected from {agent_leads} leads the assistant "
        f"captured, plus {hours_saved:.1f} staff hours saved.",
    }
