"""The field assistant: what a technician or canvasser needs hands-free on a job site.

Look someone up, note what happened, check a project, log a door knock or an inspection.
Notes and visits attach to whatever the worker names: a contact, a lead, a project or a deal,
resolved from one pool (so "the Henderson job" can be the project or the homeowner, and the
worker is asked when it is both).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field
from sqlalchemy import select

from tools.db.models import Activity, Opportunity, Project
from tools.db.tenancy import tenant_session
from tools.handlers.bookings import day_info, listing, moment, record_activity, zone_of
from tools.handlers.contacts import contact_candidate, contact_pool, contact_view
from tools.handlers.leads import lead_candidate, lead_pool, lead_view
from tools.handlers.partnerships import partnership_choices
from tools.handlers.pipeline import deal_candidate
from tools.matching import (
    Candidate,
    label,
    resolve,
    search,
    tag,
    unresolved_reply,
    untag,
)
from tools.registry import tool

if TYPE_CHECKING:
    from zoneinfo import ZoneInfo

    from sqlalchemy.ext.asyncio import AsyncSession

    from tools.context import ToolContext

FIELD = {"field_assistant"}
MAX_ITEMS = 10
MATCH_POOL = 5000

SubjectKind = Literal["contact", "lead", "project", "deal", "partnership"]
VisitKind = Literal["door_knock", "appointment", "inspection", "call"]
# Which Activity/Task column links a subject of each kind (partnerships have none).
LINK_COLUMN: dict[str, str] = {
    "contact": "contact_id",
    "lead": "lead_id",
    "project": "project_id",
    "deal": "opportunity_id",
}


# -- projects ------------------------------------------------------------------------------------


def project_label(project: Project) -> str:
    return label(project.name, project.customer, project.address, project.status)


def project_candidate(project: Project) -> Candidate:
    return Candidate(
        project.id,
        project_label(project),
        tuple(filter(None, (project.name, project.customer, project.address))),
    )


async def project_pool(session: AsyncSession) -> list[Project]:
    query = select(Project).order_by(Project.updated_at.desc(), Project.id.desc())
    return list(await session.scalars(query.limit(MATCH_POOL)))


def project_view(project: Project, zone: ZoneInfo) -> dict[str, Any]:
    return {
        "id": project.id,
        "label": project_label(project),
        "name": project.name,
        "customer": project.customer,
        "address": project.address,
        "status": project.status,
        "progress_percent": project.progress,
        "next_step": project.next_step,
        "crew": project.crew,
        "start": day_info(project.start_date, zone) if project.start_date else None,
        "target": day_info(project.target_date, zone) if project.target_date else None,
    }


# -- subjects: whatever a note or visit is about --------------------------------------------------


async def resolve_subject(
    session: AsyncSession,
    reference: str,
    kinds: tuple[SubjectKind, ...],
) -> tuple[SubjectKind, Any] | dict[str, Any]:
    """The (kind, row) a worker means among records of several kinds, or the reply to give.

    Ids may be tagged ("lead:12", as ambiguous replies list them) or bare.
    """
    rows: dict[str, tuple[SubjectKind, Any]] = {}
    pool: list[Candidate] = []
    for kind in kinds:
        choices = await _CHOICES[kind](session)
        rows |= {f"{kind}:{row.id}": (kind, row) for row, _ in choices}
        pool += tag(kind, [candidate for _, candidate in choices])
    resolution = resolve(reference, pool)
    if resolution.status != "found":
        noun = kinds[0] if len(kinds) == 1 else "record"
        return unresolved_reply(resolution, kind=noun, reference=reference)
    return rows[str(resolution.key)]


def _choices_from(
    pool: Callable[[AsyncSession], Awaitable[list[Any]]], candidate: Callable[[Any], Candidate]
) -> Callable[[AsyncSession], Awaitable[list[tuple[Any, Candidate]]]]:
    async def choices(session: AsyncSession) -> list[tuple[Any, Candidate]]:
        return [(row, candidate(row)) for row in await pool(session)]

    return choices


async def _deal_pool(session: AsyncSession) -> list[Opportunity]:
    query = select(Opportunity).order_by(Opportunity.updated_at.desc(), Opportunity.id.desc())
    return list((await session.scalars(query.limit(MATCH_POOL))).unique())


_CHOICES: dict[str, Callable[[AsyncSession], Awaitable[list[tuple[Any, Candidate]]]]] = {
    "contact": _choices_from(contact_pool, contact_candidate),
    "lead": _choices_from(lead_pool, lead_candidate),
    "project": _choices_from(project_pool, project_candidate),
    "deal": _choices_from(_deal_pool, deal_candidate),
    "partnership": partnership_choices,
}


def subject_links(kind: str, row: Any) -> tuple[dict[str, int], dict[str, Any]]:
    """Foreign-key columns to set for a subject, and extra data for kinds without a column."""
    links: dict[str, int] = {}
    data: dict[str, Any] = {}
    if kind in LINK_COLUMN:
        links[LINK_COLUMN[kind]] = row.id
    else:
        data[f"{kind}_id"] = row.id
    # Keep the person on the timeline too when the subject is their project or deal.
    if kind in ("project", "deal", "partnership") and getattr(row, "contact_id", None):
        links.setdefault("contact_id", row.contact_id)
    if kind in ("project", "deal") and getattr(row, "lead_id", None):
        links.setdefault("lead_id", row.lead_id)
    return links, data


def subject_label(kind: str, row: Any) -> str:
    name = getattr(row, "name", None) or getattr(row, "title", None)
    return f"{kind} {name}"


# -- tools -----------------------------------------------------------------------------------------


class SearchContactArgs(BaseModel):
    query: str = Field(
        min_length=1, max_length=120, description="Name, company, email or phone of the person."
    )


class AddNoteArgs(BaseModel):
    about: str = Field(
        min_length=1,
        max_length=120,
        description="Who or what the note is about: a contact, lead, project or deal, by name "
        'or by id (e.g. "contact:12" from an earlier result).',
    )
    note: str = Field(min_length=1, max_length=2000, description="The note, as dictated.")
    about_type: Literal["contact", "lead", "project", "deal"] | None = Field(
        None, description="What kind of record `about` is, when known."
    )


class ProjectArgs(BaseModel):
    project: str = Field(
        min_length=1,
        max_length=120,
        description="Project id, or its name, customer or address.",
    )


class LogActivityArgs(BaseModel):
    kind: VisitKind = Field(description="What happened.")
    summary: str = Field(min_length=1, max_length=2000, description="What happened, briefly.")
    about: str | None = Field(
        None,
        max_length=120,
        description="The contact, lead or project it concerns (name or id), if any.",
    )
    address: str | None = Field(None, max_length=500, description="Where (door knocks).")
    outcome: str | None = Field(
        None, max_length=200, description='Result, e.g. "not home", "interested".'
    )


@tool("search_contact", args=SearchContactArgs, risk="read", personas=FIELD)
async def search_contact(args: SearchContactArgs, ctx: ToolContext) -> dict[str, Any]:
    """Look someone up among contacts and leads by name, company, email or phone."""
    zone = zone_of(ctx.profile)
    async with tenant_session(ctx.db, ctx.tenant) as session:
        contacts = {f"contact:{c.id}": c for c in await contact_pool(session)}
        leads = {f"lead:{lead.id}": lead for lead in await lead_pool(session)}
        pool = tag("contact", [contact_candidate(c) for c in contacts.values()]) + tag(
            "lead", [lead_candidate(lead) for lead in leads.values()]
        )
        found = search(args.query, pool)[:MAX_ITEMS]
        items: list[dict[str, Any]] = []
        for scored in found:
            key = str(scored.candidate.key)
            if key in contacts:
                items.append({"type": "contact"} | contact_view(contacts[key]) | {"id": key})
            else:
                items.append({"type": "lead"} | lead_view(leads[key], zone) | {"id": key})
        if len(found) == 1:
            # One person: say what happened with them last, which is what a worker at the
            # door wants to know.
            kind, ident = untag(found[0].candidate.key)
            column = Activity.contact_id if kind == "contact" else Activity.lead_id
            last = await session.scalar(
                select(Activity)
                .where(column == int(ident))
                .order_by(Activity.at.desc(), Activity.id.desc())
                .limit(1)
            )
            if last is not None:
                items[0]["last_activity"] = {
                    "kind": last.kind,
                    "what": last.body[:160],
                    "when": moment(last.at, zone),
                }
    return {"query": args.query, **listing(items, len(found), "people")}


def _quoted(note: str, limit: int = 160) -> str:
    """The dictated note as read back: whole if short, else cut at a word boundary."""
    text = " ".join(note.split()).rstrip(".!? ")
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + "..."


@tool(
    "add_note",
    args=AddNoteArgs,
    risk="low",
    personas=FIELD,
    summary=lambda a: f'I\'ll add a note to {a.about}: "{_quoted(a.note)}".',
)
async def add_note(args: AddNoteArgs, ctx: ToolContext) -> dict[str, Any]:
    """Add a dictated note to a contact, lead, project or deal's timeline."""
    kinds: tuple[SubjectKind, ...] = (
        (args.about_type,) if args.about_type else ("contact", "lead", "project", "deal")
    )
    async with tenant_session(ctx.db, ctx.tenant) as session:
        subject = await resolve_subject(session, args.about, kinds)
        if isinstance(subject, dict):
            return subject
        kind, row = subject
        links, data = subject_links(kind, row)
        entry = record_activity(session, ctx, "note", args.note.strip(), data=data, **links)
        await session.commit()
    return {
        "status": "ok",
        "note_id": entry.id,
        "attached_to": subject_label(kind, row),
        "when": moment(entry.at, zone_of(ctx.profile)),
    }


@tool("get_project_status", args=ProjectArgs, risk="read", personas=FIELD)
async def get_project_status(args: ProjectArgs, ctx: ToolContext) -> dict[str, Any]:
    """Where a project stands: status, progress, next step, crew, dates and latest updates."""
    zone = zone_of(ctx.profile)
    async with tenant_session(ctx.db, ctx.tenant) as session:
        subject = await resolve_subject(session, args.project, ("project",))
        if isinstance(subject, dict):
            return subject
        _, project = subject
        updates = list(
            await session.scalars(
                select(Activity)
                .where(Activity.project_id == project.id)
                .order_by(Activity.at.desc(), Activity.id.desc())
                .limit(3)
            )
        )
    return {
        "status": "ok",
        "project": project_view(project, zone),
        "latest": [
            {"kind": a.kind, "what": a.body[:160], "when": moment(a.at, zone)} for a in updates
        ],
    }


def _visit_summary(args: LogActivityArgs) -> str:
    what = args.kind.replace("_", " ")
    where = f" at {args.about or args.address}" if (args.about or args.address) else ""
    outcome = f" ({args.outcome})" if args.outcome else ""
    return f"I'll log a {what}{where}{outcome}."


@tool("log_activity", args=LogActivityArgs, risk="low", personas=FIELD, summary=_visit_summary)
async def log_activity(args: LogActivityArgs, ctx: ToolContext) -> dict[str, Any]:
    """Log a door knock, appointment, inspection or call, optionally about a contact, lead or
    project."""
    async with tenant_session(ctx.db, ctx.tenant) as session:
        links: dict[str, int] = {}
        data: dict[str, Any] = {
            k: v for k, v in (("address", args.address), ("outcome", args.outcome)) if v
        }
        attached = None
        if args.about:
            subject = await resolve_subject(session, args.about, ("contact", "lead", "project"))
            if isinstance(subject, dict):
                return subject
            kind, row = subject
            links, extra = subject_links(kind, row)
            data |= extra
            attached = subject_label(kind, row)
        body = args.summary.strip() + (f" Outcome: {args.outcome}." if args.outcome else "")
        entry = record_activity(session, ctx, args.kind, body, data=data, **links)
        await session.commit()
    return {
        "status": "ok",
        "activity_id": entry.id,
        "kind": args.kind,
        "attached_to": attached,
        "when": moment(entry.at, zone_of(ctx.profile)),
    }
