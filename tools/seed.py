"""A believable demo CRM for one tenant: leads, contacts, deals, bookings, projects, tasks...

Everything is dated relative to `today` so the demo always looks current: bookings this week,
leads from the last few weeks, tasks due soon. Seeding is idempotent: each record has a
natural key without dates (e.g. a lead's name and phone), and a record whose key exists is
left alone, so re-running (today or next month) adds nothing twice.

Two leads share the surname Johnson on purpose: "the Johnson lead" must make the assistant ask
which one.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar
from zoneinfo import ZoneInfo

from sqlalchemy import select

from tools.db.models import (
    Activity,
    AvailabilityRule,
    BlockedDate,
    Booking,
    Call,
    Company,
    Contact,
    Escalation,
    Lead,
    Message,
    Opportunity,
    Partnership,
    Project,
    Task,
    TenantScoped,
)
from tools.db.tenancy import tenant_session

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from prompts.profiles import BusinessProfile

M = TypeVar("M", bound=TenantScoped)

DEFAULT_TIMEZONE = "America/New_York"
# Demo numbers in the 555-01xx range reserved for fiction.
CUSTOMER = "+1555555{:04d}"


# fmt: off
LEADS: list[tuple[str, str, str, str, str, str, int, int]] = [
    # name, job, address, urgency, status, source, score, days ago
    ("Mike Johnson", "kitchen remodel", "14 Elm Street", "routine", "qualified", "voice", 72, 9),
    ("Sarah Johnson", "water heater swap", "88 Birch Lane", "urgent", "new", "sms", 55, 1),
    ("Dave Wilson", "burst pipe", "5 Cedar Court", "emergency", "contacted", "voice", 80, 0),
    ("Priya Shah", "rewire farmhouse", "210 County Road 4", "routine", "new", "web", 40, 3),
    ("Ben Carter", "bathroom fan", "9 Maple Avenue", "flexible", "contacted", "voice", 30, 12),
    ("Olivia Brown", "panel upgrade", "33 Willow Drive", "urgent", "qualified", "referral", 85, 6),
    ("Lucas Green", "dead outdoor outlet", "71 Pine Street", "routine", "new", "sms", 25, 2),
    ("Hannah Lee", "low water pressure", "402 Oak Street", "routine", "converted", "voice", 90, 28),
    ("Marcus King", "sump pump", "18 River Road", "urgent", "new", "voice", 60, 0),
    ("Zoe Adams", "EV charger install", "6 Hilltop Way", "flexible", "contacted", "web", 50, 15),
    ("Sam Patel", "leaking shower valve", "120 Lake Street", "routine", "new", "referral", 45, 4),
    ("Ava Thompson", "repipe house", "77 Chestnut St", "routine", "qualified", "voice", 65, 20),
]
# fmt: on


class _Seeder:
    def __init__(
        self, session: AsyncSession, tenant: str, today: date, zone: ZoneInfo, minutes: int
    ) -> None:
        self.session = session
        self.tenant = tenant
        self.today = today
        self.zone = zone
        self.minutes = minutes
        self.created: Counter[str] = Counter()

    def at(self, days: int, hour: int = 9, minute: int = 0) -> datetime:
        """Local wall-clock time `days` from today, as an aware UTC instant."""
        day = self.today + timedelta(days=days)
        return datetime.combine(day, time(hour, minute), tzinfo=self.zone).astimezone(UTC)

    def sid(self, prefix: str, number: int) -> str:
        """A Twilio-shaped SID, distinct per tenant (message SIDs are globally unique)."""
        return prefix + hashlib.sha256(f"{self.tenant}:{prefix}:{number}".encode()).hexdigest()[:32]

    def weekday(self, days_ahead: int) -> int:
        """Offset of the first Monday-to-Friday day at least `days_ahead` from today."""
        offset = days_ahead
        while (self.today + timedelta(days=offset)).weekday() >= 5:
            offset += 1
        return offset

    async def ensure(self, model: type[M], key: dict[str, Any], **values: Any) -> M:
        """The row with `key`, created with `values` if there is none yet."""
        query = select(model).filter_by(**key).order_by(model.id).limit(1)
        existing = await self.session.scalar(query)
        if existing is not None:
            return existing
        row = model(**key, **values)
        self.session.add(row)
        await self.session.flush()
        self.created[model.__tablename__] += 1
        return row


async def seed_demo(
    db: async_sessionmaker[AsyncSession],
    tenant: str,
    *,
    today: date | None = None,
    profile: BusinessProfile | None = None,
) -> dict[str, int]:
    """Fill `tenant` with demo data; returns how many rows were created per table."""
    zone = ZoneInfo(profile.timezone if profile else DEFAULT_TIMEZONE)
    today = today or datetime.now(zone).date()
    minutes = profile.appointment_minutes if profile else 60
    async with tenant_session(db, tenant) as session:
        seeder = _Seeder(session, tenant, today, zone, minutes)
        await _seed(seeder)
        await session.commit()
    return dict(seeder.created)


async def _seed(s: _Seeder) -> None:
    companies = await _companies(s)
    contacts = await _contacts(s, companies)
    leads = await _leads(s)
    await _opportunities(s, contacts, companies, leads)
    await _partnerships(s, contacts, companies)
    projects = await _projects(s, contacts, leads)
    await _calendar(s, contacts, leads)
    await _tasks(s, leads, contacts, projects)
    await _activities(s, leads, contacts, projects)
    await _conversations(s, leads)


async def _companies(s: _Seeder) -> dict[str, Company]:
    rows = [
        ("Springfield Property Management", "property management", "+15555550101"),
        ("Oak Ridge HOA", "homeowners association", "+15555550102"),
        ("Bright Future Builders", "general contractor", "+15555550103"),
        ("Evergreen Realty", "real estate", "+15555550104"),
    ]
    return {
        name: await s.ensure(
            Company, {"name": name}, industry=industry, phone=phone, created_at=s.at(-60)
        )
        for name, industry, phone in rows
    }


async def _contacts(s: _Seeder, companies: dict[str, Company]) -> dict[str, Contact]:
    rows = [
        ("Linda Park", "+15555550111", "Springfield Property Management", "portfolio manager"),
        ("Tom Alvarez", "+15555550112", "Springfield Property Management", "maintenance lead"),
        ("Grace Okafor", "+15555550113", "Oak Ridge HOA", "board president"),
        ("Raj Mehta", "+15555550114", "Bright Future Builders", "site manager"),
        ("Nina Rossi", "+15555550115", "Evergreen Realty", "broker"),
        ("Carlos Diaz", "+15555550116", None, "homeowner"),
        ("Emily Chen", "+15555550117", None, "homeowner"),
        ("Frank Miller", "+15555550118", None, "landlord"),
    ]
    contacts = {}
    for name, phone, company, role in rows:
        contacts[name] = await s.ensure(
            Contact,
            {"name": name, "phone": phone},
            role=role,
            email=name.lower().replace(" ", ".") + "@example.com",
            company_id=companies[company].id if company else None,
            created_at=s.at(-45),
        )
    return contacts


async def _leads(s: _Seeder) -> dict[str, Lead]:
    leads = {}
    for number, (name, job, address, urgency, status, source, score, ago) in enumerate(LEADS):
        phone = CUSTOMER.format(150 + number)
        leads[name] = await s.ensure(
            Lead,
            {"name": name, "phone": phone},
            job_type=job,
            address=f"{address}, Springfield",
            urgency=urgency,
            status=status,
            source=source,
            score=score,
            email=f"{name.split()[0].lower()}@example.com" if number % 3 == 0 else None,
            notes="Demo lead." if number % 4 else "Prefers a text before anyone comes over.",
            created_at=s.at(-ago, 8 + number % 9, 15),
        )
    return leads


async def _opportunities(
    s: _Seeder,
    contacts: dict[str, Contact],
    companies: dict[str, Company],
    leads: dict[str, Lead],
) -> None:
    rows = [
        ("Johnson kitchen remodel", "18500", "proposal-sent", leads["Mike Johnson"], None, 14),
        ("Brown panel upgrade", "3200", "negotiation", leads["Olivia Brown"], None, 7),
        ("Oak Ridge HOA pool house wiring", "12750", "discovery-call", None, "Grace Okafor", 30),
        ("Springfield PM annual maintenance", "24000", "contacted", None, "Linda Park", 45),
        ("Evergreen listing inspections", "4800", "new-lead", None, "Nina Rossi", 60),
        ("Lee pressure fix", "650", "closed-won", leads["Hannah Lee"], None, -20),
        ("Thompson repipe", "9800", "closed-lost", leads["Ava Thompson"], None, -5),
    ]
    for title, value, stage, lead, contact_name, close_in in rows:
        contact = contacts[contact_name] if contact_name else None
        await s.ensure(
            Opportunity,
            {"title": title},
            value=Decimal(value),
            stage=stage,
            lead_id=lead.id if lead else None,
            contact_id=contact.id if contact else None,
            company_id=contact.company_id if contact else None,
            expected_close=s.today + timedelta(days=close_in),
            closed_at=s.at(close_in) if stage.startswith("closed") else None,
            created_at=s.at(-30),
        )


async def _partnerships(
    s: _Seeder, contacts: dict[str, Contact], companies: dict[str, Company]
) -> None:
    rows = [
        ("Bright Future Builders subcontracting", "co-create", 78, "Raj Mehta"),
        ("Evergreen Realty referral program", "discover", 55, "Nina Rossi"),
        ("Springfield PM preferred vendor", "deploy", 88, "Linda Park"),
    ]
    for name, phase, health, contact_name in rows:
        contact = contacts[contact_name]
        await s.ensure(
            Partnership,
            {"name": name},
            phase=phase,
            health_score=health,
            contact_id=contact.id,
            company_id=contact.company_id,
            notes="Quarterly review due." if health < 60 else "Going well.",
            created_at=s.at(-90),
        )


async def _projects(
    s: _Seeder, contacts: dict[str, Contact], leads: dict[str, Lead]
) -> dict[str, Project]:
    rows = [
        (
            "Lee kitchen pressure fix",
            "Hannah Lee",
            leads["Hannah Lee"],
            "completed",
            100,
            None,
            ["Ana", "Joe"],
            -25,
            -20,
        ),
        (
            "Johnson kitchen remodel",
            "Mike Johnson",
            leads["Mike Johnson"],
            "planned",
            0,
            "Send revised proposal",
            ["Ana", "Joe", "Kim"],
            10,
            40,
        ),
        (
            "Oak Ridge pool house wiring",
            "Oak Ridge HOA",
            None,
            "active",
            45,
            "Rough-in inspection",
            ["Kim", "Lee"],
            -10,
            12,
        ),
        (
            "Miller rental repipe",
            "Frank Miller",
            None,
            "on-hold",
            20,
            "Waiting for tenant access",
            ["Joe"],
            -14,
            21,
        ),
    ]
    projects = {}
    for name, customer, lead, status, progress, next_step, crew, start, target in rows:
        contact = contacts.get(customer)
        projects[name] = await s.ensure(
            Project,
            {"name": name},
            customer=customer,
            lead_id=lead.id if lead else None,
            contact_id=contact.id if contact else None,
            address=lead.address if lead else "Springfield",
            status=status,
            progress=progress,
            next_step=next_step,
            crew=crew,
            start_date=s.today + timedelta(days=start),
            target_date=s.today + timedelta(days=target),
            created_at=s.at(start - 7),
        )
    return projects


async def _calendar(s: _Seeder, contacts: dict[str, Contact], leads: dict[str, Lead]) -> None:
    length = timedelta(minutes=s.minutes)
    rows = [
        # customer, phone, service, weekdays ahead, hour, status
        (leads["Dave Wilson"], "emergency pipe repair follow-up", 0, 10, "confirmed"),
        (leads["Sarah Johnson"], "water heater estimate", 1, 9, "pending"),
        (leads["Olivia Brown"], "panel upgrade site visit", 1, 14, "confirmed"),
        (leads["Priya Shah"], "wiring inspection", 2, 11, "confirmed"),
        (contacts["Carlos Diaz"], "leaky faucet repair", 3, 13, "pending"),
        (contacts["Emily Chen"], "dishwasher hookup", 4, 15, "confirmed"),
        (leads["Ben Carter"], "bathroom fan install", 5, 10, "cancelled"),
        (leads["Marcus King"], "sump pump replacement", 6, 9, "confirmed"),
    ]
    for person, service, ahead, hour, status in rows:
        offset = s.weekday(ahead)
        starts = s.at(offset, hour)
        is_lead = isinstance(person, Lead)
        await s.ensure(
            Booking,
            {"customer_name": person.name, "service": service},
            customer_phone=person.phone,
            starts_at=starts,
            ends_at=starts + length,
            status=status,
            lead_id=person.id if is_lead else None,
            contact_id=None if is_lead else person.id,
            cancelled_at=s.at(-1) if status == "cancelled" else None,
            created_at=s.at(-3),
        )
    await s.ensure(
        BlockedDate, {"reason": "Team training day"}, date=s.today + timedelta(days=s.weekday(9))
    )
    await s.ensure(BlockedDate, {"reason": "Owner on vacation"}, date=s.today + timedelta(days=24))
    await s.ensure(AvailabilityRule, {"weekday": "sat"}, opens=time(9), closes=time(12))


async def _tasks(
    s: _Seeder,
    leads: dict[str, Lead],
    contacts: dict[str, Contact],
    projects: dict[str, Project],
) -> None:
    rows: list[tuple[str, int, str, str, dict[str, int]]] = [
        (
            "Call Mike Johnson about proposal",
            1,
            "open",
            "high",
            {"lead_id": leads["Mike Johnson"].id},
        ),
        (
            "Order 50-gallon water heater",
            2,
            "open",
            "normal",
            {"lead_id": leads["Sarah Johnson"].id},
        ),
        (
            "Book rough-in inspection",
            3,
            "open",
            "high",
            {"project_id": projects["Oak Ridge pool house wiring"].id},
        ),
        (
            "Send Linda the maintenance quote",
            -1,
            "open",
            "urgent",
            {"contact_id": contacts["Linda Park"].id},
        ),
        ("Follow up on Priya's rewiring", 5, "open", "low", {"lead_id": leads["Priya Shah"].id}),
        ("Invoice Hannah Lee", -10, "done", "normal", {"lead_id": leads["Hannah Lee"].id}),
    ]
    for title, due_in, status, priority, links in rows:
        await s.ensure(
            Task,
            {"title": title},
            due=s.at(due_in, 17),
            status=status,
            priority=priority,
            completed_at=s.at(due_in, 16) if status == "done" else None,
            created_at=s.at(min(due_in, 0) - 3),
            **links,
        )


async def _activities(
    s: _Seeder,
    leads: dict[str, Lead],
    contacts: dict[str, Contact],
    projects: dict[str, Project],
) -> None:
    rows: list[tuple[str, str, int, int, dict[str, int]]] = [
        (
            "lead_captured",
            "New lead by phone: burst pipe in basement",
            0,
            7,
            {"lead_id": leads["Dave Wilson"].id},
        ),
        (
            "call",
            "Called Dave back, shut-off valve located, crew on the way",
            0,
            8,
            {"lead_id": leads["Dave Wilson"].id},
        ),
        (
            "door_knock",
            "Knocked on 12 doors on Elm Street, 3 interested in inspections",
            -2,
            15,
            {},
        ),
        ("door_knock", "Maple Avenue canvass: 1 booked estimate, 2 asked for flyers", -1, 16, {}),
        (
            "inspection",
            "Panel is a 100A Federal Pacific; recommend replacement",
            -5,
            11,
            {"lead_id": leads["Olivia Brown"].id},
        ),
        (
            "note",
            "Mike wants quartz counters; budget flexible",
            -8,
            14,
            {"lead_id": leads["Mike Johnson"].id},
        ),
        (
            "email",
            "Sent proposal for kitchen remodel",
            -6,
            9,
            {"lead_id": leads["Mike Johnson"].id},
        ),
        (
            "project_update",
            "Conduit run finished in pool house",
            -3,
            17,
            {"project_id": projects["Oak Ridge pool house wiring"].id},
        ),
        (
            "meeting",
            "Quarterly vendor review with Linda",
            -12,
            10,
            {"contact_id": contacts["Linda Park"].id},
        ),
        (
            "status_change",
            "Hannah Lee: qualified -> converted",
            -21,
            12,
            {"lead_id": leads["Hannah Lee"].id},
        ),
    ]
    for kind, body, days, hour, links in rows:
        await s.ensure(
            Activity,
            {"kind": kind, "body": body},
            actor="owner" if kind in {"door_knock", "inspection", "meeting"} else "ai:dispatcher",
            at=s.at(days, hour),
            **links,
        )


async def _conversations(s: _Seeder, leads: dict[str, Lead]) -> None:
    dave = leads["Dave Wilson"]
    emergency_call = s.sid("CA", 1)
    started = s.at(0, 7, 2)
    await s.ensure(
        Call,
        {"call_sid": emergency_call},
        direction="inbound",
        from_number=dave.phone,
        to_number="+15005550006",
        persona="dispatcher",
        started_at=started,
        ended_at=started + timedelta(minutes=3, seconds=12),
        duration_s=192.0,
        status="completed",
        transcript=[
            {"role": "assistant", "text": "Thanks for calling, how can I help?", "at": "00:00"},
            {"role": "user", "text": "Water is pouring into my basement!", "at": "00:04"},
            {
                "role": "assistant",
                "text": "Let's get someone out to you right away.",
                "at": "00:07",
            },
        ],
        tool_calls=[{"name": "capture_lead", "outcome": "executed"}],
        usage={"input_tokens": 1830, "output_tokens": 412},
        summary="Emergency: burst pipe in basement at 5 Cedar Court.",
    )
    await s.ensure(
        Call,
        {"call_sid": s.sid("CA", 2)},
        direction="inbound",
        from_number=leads["Marcus King"].phone,
        to_number="+15005550006",
        persona="dispatcher",
        started_at=s.at(0, 8, 40),
        ended_at=s.at(0, 8, 44),
        duration_s=240.0,
        status="completed",
        summary="Sump pump failed after the storm; booked for next week.",
    )
    await s.ensure(
        Escalation,
        {"conversation_id": emergency_call, "category": "emergency"},
        channel="voice",
        caller=dave.phone,
        summary="Burst pipe flooding basement at 5 Cedar Court; water shut off, needs crew now.",
        callback_number=dave.phone,
        notified_at=started + timedelta(minutes=2),
        created_at=started + timedelta(minutes=2),
    )
    sarah = leads["Sarah Johnson"]
    texts = [
        ("inbound", "Hi, my water heater is leaking from the bottom", -1),
        ("outbound", "Sorry to hear that! Can I get your address?", -1),
        ("inbound", "88 Birch Lane. Tomorrow morning works", -1),
    ]
    for number, (direction, body, days) in enumerate(texts):
        inbound = direction == "inbound"
        await s.ensure(
            Message,
            {"message_sid": s.sid("SM", number)},
            direction=direction,
            from_number=sarah.phone if inbound else "+15005550006",
            to_number="+15005550006" if inbound else sarah.phone,
            body=body,
            status="received" if inbound else "delivered",
            conversation_id=f"sms:{s.tenant}:{sarah.phone}",
            reason=None if inbound else "reply",
            created_at=s.at(days, 18),
        )
