"""Contacts and companies: find people, see who works where, add new ones.

`create_contact` is shared by the CRM operator and the field assistant (one registration, two
personas), so a homeowner met on a door knock lands in the same address book.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field
from sqlalchemy import func, select

from tools.db.models import Activity, Company, Contact, Opportunity
from tools.db.tenancy import tenant_session
from tools.handlers.bookings import listing, moment, record_activity, zone_of
from tools.matching import (
    Candidate,
    label,
    normalize,
    phone_matches,
    resolve,
    search,
    spoken_phone,
    unresolved_reply,
)
from tools.registry import tool

if TYPE_CHECKING:
    from zoneinfo import ZoneInfo

    from sqlalchemy.ext.asyncio import AsyncSession

    from tools.context import ToolContext

CRM = {"crm_operator"}
CRM_AND_FIELD = {"crm_operator", "field_assistant"}
MAX_ITEMS = 20
MATCH_POOL = 5000


# -- shared with other handler modules -----------------------------------------------------


def contact_label(contact: Contact) -> str:
    company = contact.company.name if contact.company is not None else None
    return label(contact.name, contact.role, company, spoken_phone(contact.phone))


def contact_view(contact: Contact) -> dict[str, Any]:
    return {
        "id": contact.id,
        "label": contact_label(contact),
        "name": contact.name,
        "phone": spoken_phone(contact.phone),
        "email": contact.email,
        "role": contact.role,
        "company": contact.company.name if contact.company is not None else None,
    }


def contact_candidate(contact: Contact) -> Candidate:
    company = contact.company.name if contact.company is not None else None
    return Candidate(
        contact.id,
        contact_label(contact),
        tuple(filter(None, (contact.name, company, contact.email))),
        (contact.phone,) if contact.phone else (),
    )


async def contact_pool(session: AsyncSession) -> list[Contact]:
    query = select(Contact).order_by(Contact.updated_at.desc(), Contact.id.desc()).limit(MATCH_POOL)
    return list(await session.scalars(query))


async def resolve_contact(session: AsyncSession, reference: str) -> Contact | dict[str, Any]:
    """The contact a caller means, or the ambiguous/not-found reply to give instead."""
    rows = await contact_pool(session)
    resolution = resolve(reference, [contact_candidate(c) for c in rows])
    if resolution.status != "found":
        return unresolved_reply(resolution, kind="contact", reference=reference)
    return next(c for c in rows if c.id == resolution.key)


def company_label(company: Company) -> str:
    return label(company.name, company.industry, spoken_phone(company.phone))


def company_view(company: Company) -> dict[str, Any]:
    return {
        "id": company.id,
        "label": company_label(company),
        "name": company.name,
        "industry": company.industry,
        "phone": spoken_phone(company.phone),
        "website": company.website,
    }


def company_candidate(company: Company) -> Candidate:
    return Candidate(
        company.id,
        company_label(company),
        (company.name,),
        (company.phone,) if company.phone else (),
    )


async def company_pool(session: AsyncSession) -> list[Company]:
    return list(await session.scalars(select(Company).order_by(Company.id).limit(MATCH_POOL)))


async def resolve_company(session: AsyncSession, reference: str) -> Company | dict[str, Any]:
    rows = await company_pool(session)
    resolution = resolve(reference, [company_candidate(c) for c in rows])
    if resolution.status != "found":
        return unresolved_reply(resolution, kind="company", reference=reference)
    return next(c for c in rows if c.id == resolution.key)


def contact_details(contact: Contact, activities: list[Activity], zone: ZoneInfo) -> dict[str, Any]:
    return contact_view(contact) | {
        "notes": (contact.notes or "")[:300] or None,
        "recent_activity": [
            {"kind": a.kind, "what": a.body[:160], "when": moment(a.at, zone)} for a in activities
        ],
    }


async def recent_contact_activity(session: AsyncSession, contact: Contact) -> list[Activity]:
    return list(
        await session.scalars(
            select(Activity)
            .where(Activity.contact_id == contact.id)
            .order_by(Activity.at.desc(), Activity.id.desc())
            .limit(3)
        )
    )


# -- reads -----------------------------------------------------------------------------------------


class SearchArgs(BaseModel):
    query: str = Field(min_length=1, max_length=120, description="Name, company, email or phone.")
    limit: int = Field(5, ge=1, le=MAX_ITEMS)


class ContactRefArgs(BaseModel):
    contact: str = Field(
        min_length=1,
        max_length=120,
        description="Contact id from an earlier result, or the person's name or phone number.",
    )


class CompanyRefArgs(BaseModel):
    company: str = Field(
        min_length=1, max_length=120, description="Company id from an earlier result, or its name."
    )
    limit: int = Field(10, ge=1, le=MAX_ITEMS)


@tool("search_contacts", args=SearchArgs, risk="read", personas=CRM)
async def search_contacts(args: SearchArgs, ctx: ToolContext) -> dict[str, Any]:
    """Find contacts by (part of) a name, company, email or phone number; best first."""
    async with tenant_session(ctx.db, ctx.tenant) as session:
        rows = {c.id: c for c in await contact_pool(session)}
    found = search(args.query, [contact_candidate(c) for c in rows.values()])
    items = [contact_view(rows[s.candidate.key]) for s in found[: args.limit]]  # type: ignore[index]
    return {"query": args.query, **listing(items, len(found), "contacts")}


@tool("get_contact", args=ContactRefArgs, risk="read", personas=CRM)
async def get_contact(args: ContactRefArgs, ctx: ToolContext) -> dict[str, Any]:
    """One contact's details, latest activity and open deals."""
    async with tenant_session(ctx.db, ctx.tenant) as session:
        contact = await resolve_contact(session, args.contact)
        if isinstance(contact, dict):
            return contact
        activities = await recent_contact_activity(session, contact)
        deals = list(
            await session.scalars(
                select(Opportunity).where(
                    Opportunity.contact_id == contact.id,
                    Opportunity.stage.not_in(("closed-won", "closed-lost")),
                )
            )
        )
    return {
        "status": "ok",
        "contact": contact_details(contact, activities, zone_of(ctx.profile)),
        "open_deals": [
            {"id": d.id, "title": d.title, "stage": d.stage, "value": float(d.value)} for d in deals
        ],
    }


@tool("search_companies", args=SearchArgs, risk="read", personas=CRM)
async def search_companies(args: SearchArgs, ctx: ToolContext) -> dict[str, Any]:
    """Find companies by (part of) their name or phone number, with how many contacts each has."""
    async with tenant_session(ctx.db, ctx.tenant) as session:
        rows = {c.id: c for c in await company_pool(session)}
        found = search(args.query, [company_candidate(c) for c in rows.values()])[: args.limit]
        ids = [s.candidate.key for s in found]
        counts = dict(
            (
                await session.execute(
                    select(Contact.company_id, func.count(Contact.id))
                    .where(Contact.company_id.in_(ids))
                    .group_by(Contact.company_id)
                )
            ).all()
        )
    items = [
        company_view(rows[key]) | {"contacts": counts.get(key, 0)}  # type: ignore[index]
        for key in ids
    ]
    return {"query": args.query, **listing(items, len(found), "companies")}


@tool("get_company_contacts", args=CompanyRefArgs, risk="read", personas=CRM)
async def get_company_contacts(args: CompanyRefArgs, ctx: ToolContext) -> dict[str, Any]:
    """The people on file at one company."""
    async with tenant_session(ctx.db, ctx.tenant) as session:
        company = await resolve_company(session, args.company)
        if isinstance(company, dict):
            return company
        where = Contact.company_id == company.id
        total = await session.scalar(select(func.count(Contact.id)).where(where)) or 0
        people = await session.scalars(
            select(Contact).where(where).order_by(Contact.name).limit(args.limit)
        )
        items = [contact_view(c) for c in people]
    return {"company": company_view(company), **listing(items, total, "contacts")}


# -- writes ----------------------------------------------------------------------------------------


class CreateContactArgs(BaseModel):
    name: str = Field(min_length=1, max_length=200, description="The person's full name.")
    phone: str | None = Field(None, max_length=32, description="Phone number, E.164 if known.")
    email: str | None = Field(None, max_length=254)
    role: str | None = Field(None, max_length=100, description="Homeowner, property manager...")
    company: str | None = Field(
        None,
        max_length=200,
        description="Company they work for (an existing one by name or id; a new name is added).",
    )
    notes: str | None = Field(None, max_length=2000)


class CreateCompanyArgs(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    phone: str | None = Field(None, max_length=32)
    website: str | None = Field(None, max_length=500)
    address: str | None = Field(None, max_length=500)
    industry: str | None = Field(None, max_length=100)
    notes: str | None = Field(None, max_length=2000)


def _same_person(existing: Contact, args: CreateContactArgs) -> bool:
    """A re-entry of someone already on file: same name and the same phone or email."""
    if normalize(existing.name) != normalize(args.name):
        return False
    same_phone = bool(args.phone and existing.phone and phone_matches(args.phone, existing.phone))
    same_email = bool(
        args.email and existing.email and existing.email.lower() == args.email.lower()
    )
    return same_phone or same_email


@tool(
    "create_contact",
    args=CreateContactArgs,
    risk="low",
    personas=CRM_AND_FIELD,
    summary=lambda a: (
        f"I'll add {a.name} to your contacts"
        + (f" at {a.company}" if a.company else "")
        + (f", phone {spoken_phone(a.phone)}" if a.phone else "")
        + "."
    ),
)
async def create_contact(args: CreateContactArgs, ctx: ToolContext) -> dict[str, Any]:
    """Add a person to the contacts (optionally at a company). Someone already on file with
    the same name and phone or email is returned instead of being added twice."""
    async with tenant_session(ctx.db, ctx.tenant) as session:
        existing = next((c for c in await contact_pool(session) if _same_person(c, args)), None)
        if existing is not None:
            return {
                "status": "exists",
                "message": f"{existing.name} is already in the contacts.",
                "contact": contact_view(existing),
            }
        company: Company | None = None
        company_created = False
        if args.company:
            found = await resolve_company(session, args.company)
            if isinstance(found, dict) and found["status"] == "ambiguous":
                return found
            if isinstance(found, Company):
                company = found
            else:
                company = Company(name=args.company.strip())
                session.add(company)
                company_created = True
        contact = Contact(
            name=args.name.strip(),
            phone=args.phone,
            email=args.email,
            role=args.role,
            notes=args.notes,
            company=company,
        )
        session.add(contact)
        await session.flush()
        record_activity(
            session, ctx, "note", f"Contact added: {contact_label(contact)}", contact_id=contact.id
        )
        await session.commit()
    return {
        "status": "ok",
        "contact": contact_view(contact),
        "company_created": company_created,
    }


@tool(
    "create_company",
    args=CreateCompanyArgs,
    risk="low",
    personas=CRM,
    summary=lambda a: (
        f"I'll add the company {a.name}" + (f" ({a.industry})" if a.industry else "") + "."
    ),
)
async def create_company(args: CreateCompanyArgs, ctx: ToolContext) -> dict[str, Any]:
    """Add a company (a customer business, supplier or partner). A company already on file
    under the same name is returned instead of being added twice."""
    async with tenant_session(ctx.db, ctx.tenant) as session:
        wanted = normalize(args.name)
        existing = next(
            (c for c in await company_pool(session) if normalize(c.name) == wanted), None
        )
        if existing is not None:
            return {
                "status": "exists",
                "message": f"{existing.name} is already on file.",
                "company": company_view(existing),
            }
        company = Company(**args.model_dump() | {"name": args.name.strip()})
        session.add(company)
        await session.flush()
        record_activity(
            session, ctx, "note", f"Company added: {company.name}", data={"company_id": company.id}
        )
        await session.commit()
    return {"status": "ok", "company": company_view(company)}
