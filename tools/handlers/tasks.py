"""Follow-up tasks: "remind me to call Mike Johnson tomorrow", and what is due."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field
from sqlalchemy import case, func, select

from prompts.profiles import BusinessProfile
from tools.db.models import Task, TaskPriority
from tools.db.tenancy import tenant_session
from tools.handlers.bookings import (
    WEEKDAYS,
    day_bounds,
    listing,
    local_now,
    moment,
    record_activity,
    spoken_date,
    spoken_time,
    zone_of,
)
from tools.handlers.field import SubjectKind, resolve_subject, subject_label
from tools.registry import tool

if TYPE_CHECKING:
    from zoneinfo import ZoneInfo

    from tools.context import ToolContext

CRM = {"crm_operator"}
MAX_ITEMS = 20
# A task due "on a day" without a time is due when that day's business closes.
DEFAULT_DUE_TIME = time(17, 0)
TASK_LINKS = {
    "lead": "lead_id",
    "contact": "contact_id",
    "deal": "opportunity_id",
    "project": "project_id",
    "partnership": "partnership_id",
}
PRIORITY_ORDER = {"urgent": 0, "high": 1, "normal": 2, "low": 3}


def due_instant(day: date, at: time | None, profile: BusinessProfile) -> datetime:
    """A local due day (and optional time) as an aware instant in the profile's timezone."""
    if at is None:
        hours = profile.hours.get(WEEKDAYS[day.weekday()])
        at = hours.closes if hours is not None else DEFAULT_DUE_TIME
    return datetime.combine(day, at, tzinfo=zone_of(profile))


def task_view(task: Task, zone: ZoneInfo, now: datetime) -> dict[str, Any]:
    return {
        "id": task.id,
        "title": task.title,
        "priority": task.priority,
        "status": task.status,
        "due": moment(task.due, zone, now),
        "overdue": task.status == "open" and task.due is not None and task.due < now,
    }


class CreateTaskArgs(BaseModel):
    title: str = Field(min_length=1, max_length=300, description='What to do: "Call Mike back".')
    due_date: date | None = Field(None, description="Local day it is due, if any.")
    due_time: time | None = Field(None, description="Local time it is due (needs due_date).")
    priority: TaskPriority = "normal"
    about: str | None = Field(
        None,
        max_length=120,
        description="The lead, contact, deal, project or partnership it concerns, by name or id.",
    )
    about_type: SubjectKind | None = Field(None, description="What kind of record `about` is.")
    notes: str | None = Field(None, max_length=2000)


class ListTasksArgs(BaseModel):
    status: Literal["open", "done", "all"] = "open"
    due: Literal["overdue", "today", "this_week", "any"] = Field(
        "any", description="overdue, due today, due within 7 days, or any."
    )
    limit: int = Field(5, ge=1, le=MAX_ITEMS, description="At most this many, soonest due first.")


def _task_summary(a: CreateTaskArgs) -> str:
    when = ""
    if a.due_date is not None:
        when = f" due {a.due_date:%A, %B} {a.due_date.day}"
        if a.due_time is not None:
            when += f" at {spoken_time(datetime.combine(a.due_date, a.due_time))}"
    about = f" about {a.about}" if a.about else ""
    return f"I'll add a {a.priority} priority task: {a.title}{about}{when}."


@tool("create_task", args=CreateTaskArgs, risk="low", personas=CRM, summary=_task_summary)
async def create_task(args: CreateTaskArgs, ctx: ToolContext) -> dict[str, Any]:
    """Add a follow-up task, optionally due at a local day/time and linked to a record."""
    if args.due_time is not None and args.due_date is None:
        return {"status": "error", "message": "A due time needs a due date too."}
    zone = zone_of(ctx.profile)
    due = due_instant(args.due_date, args.due_time, ctx.profile) if args.due_date else None
    async with tenant_session(ctx.db, ctx.tenant) as session:
        links: dict[str, int] = {}
        about = None
        if args.about:
            kinds: tuple[SubjectKind, ...] = (
                (args.about_type,)
                if args.about_type
                else ("lead", "contact", "deal", "project", "partnership")
            )
            subject = await resolve_subject(session, args.about, kinds)
            if isinstance(subject, dict):
                return subject | {"message": subject["message"] + " The task was not added yet."}
            kind, row = subject
            links[TASK_LINKS[kind]] = row.id
            about = subject_label(kind, row)
        task = Task(
            title=args.title.strip(),
            due=due.astimezone(UTC) if due else None,
            priority=args.priority,
            notes=args.notes,
            **links,
        )
        session.add(task)
        await session.flush()
        activity_links = {k: v for k, v in links.items() if k != "partnership_id"}
        record_activity(
            session,
            ctx,
            "task",
            f"Task added: {task.title}",
            data={"task_id": task.id},
            **activity_links,
        )
        await session.commit()
    return {"status": "ok", "task": task_view(task, zone, local_now(ctx)), "about": about}


@tool("list_tasks", args=ListTasksArgs, risk="read", personas=CRM)
async def list_tasks(args: ListTasksArgs, ctx: ToolContext) -> dict[str, Any]:
    """Follow-up tasks: open ones by default, optionally only overdue, due today or this week;
    soonest due first, then by priority."""
    zone = zone_of(ctx.profile)
    now = local_now(ctx)
    where = [] if args.status == "all" else [Task.status == args.status]
    if args.due == "overdue":
        where += [Task.due.is_not(None), Task.due < now.astimezone(UTC)]
    elif args.due in ("today", "this_week"):
        start, end = day_bounds(now.date(), zone)
        if args.due == "this_week":
            _, end = day_bounds(now.date() + timedelta(days=6), zone)
        where += [Task.due.is_not(None), Task.due < end]
        if args.status != "open":
            where.append(Task.due >= start)
    priority_rank = case(PRIORITY_ORDER, value=Task.priority, else_=len(PRIORITY_ORDER))
    async with tenant_session(ctx.db, ctx.tenant) as session:
        total = await session.scalar(select(func.count(Task.id)).where(*where)) or 0
        rows = await session.scalars(
            select(Task)
            .where(*where)
            .order_by(Task.due.is_(None), Task.due, priority_rank, Task.id)
            .limit(args.limit)
        )
        items = [task_view(t, zone, now) for t in rows]
    return {
        "today": {"iso": now.date().isoformat(), "spoken": spoken_date(now.date(), now.date())},
        **listing(items, total, "tasks"),
    }
