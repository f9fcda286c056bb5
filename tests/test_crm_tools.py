"""The CRM operator's tool catalogue, against real SQLite and PostgreSQL.

Tools are called the way the runner calls them: looked up in the registry, arguments validated
with the tool's pydantic model, handler awaited with a ToolContext. Each test seeds its own
rows for two tenants and checks the second tenant never shows through.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import fakeredis
import pytest
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

import tools.handlers.analytics
import tools.handlers.bookings
import tools.handlers.contacts
import tools.handlers.field
import tools.handlers.leads
import tools.handlers.partnerships
import tools.handlers.pipeline
import tools.handlers.tasks  # noqa: F401  (importing registers the tools)
from prompts.profiles import BusinessProfile, load_profiles
from tools.context import ToolContext
from tools.conversation import ConversationLog
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
    Opportunity,
    Partnership,
    Project,
    Task,
)
from tools.db.tenancy import tenant_session
from tools.handlers.bookings import day_bounds, free_slots, moment, spoken_date, spoken_time
from tools.registry import REGISTRY, get_tool, tools_for

PROFILES = load_profiles()
ACME = PROFILES.by_id("acme-plumbing")
SMILES = PROFILES.by_id("bright-smiles")
assert ACME is not None and SMILES is not None
ZONE = ZoneInfo(ACME.timezone)

CRM_CATALOGUE = {
    "list_leads",
    "search_leads",
    "count_leads",
    "create_lead",
    "update_lead_status",
    "score_lead",
    "get_lead_summary",
    "get_todays_bookings",
    "get_upcoming_bookings",
    "list_bookings",
    "confirm_booking",
    "cancel_booking",
    "block_date",
    "unblock_date",
    "get_availability",
    "get_booking_summary",
    "list_opportunities",
    "get_pipeline_summary",
    "create_opportunity",
    "move_deal",
    "search_contacts",
    "get_contact",
    "create_contact",
    "search_companies",
    "create_company",
    "get_company_contacts",
    "list_partnerships",
    "get_partnership_summary",
    "update_partnership_phase",
    "update_health_score",
    "get_dashboard_stats",
    "get_daily_summary",
    "get_recent_activities",
    "get_voice_session_insights",
    "get_roi_calculation_insights",
    "create_task",
    "list_tasks",
}
FIELD_CATALOGUE = {
    "create_contact",
    "search_contact",
    "add_note",
    "get_project_status",
    "log_activity",
}
CONFIRMATION_TOOLS = {"confirm_action", "cancel_action"}
MY_MODULES = tuple(
    f"tools.handlers.{m}"
    for m in (
        "leads",
        "bookings",
        "pipeline",
        "contacts",
        "partnerships",
        "tasks",
        "analytics",
        "field",
    )
)
NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


# -- calling tools like the runner -------------------------------------------------------------


def make_ctx(
    db: async_sessionmaker[AsyncSession],
    profile: BusinessProfile = ACME,
    persona: str = "crm_operator",
) -> ToolContext:
    kv = fakeredis.FakeAsyncRedis(decode_responses=True)
    conversation_id = "CA" + "0" * 32
    return ToolContext(
        tenant=profile.id,
        profile=profile,
        channel="voice",
        conversation_id=conversation_id,
        caller=profile.owner_numbers[0],
        persona=persona,
        db=db,
        kv=kv,
        conversation=ConversationLog(kv, conversation_id),
    )


async def call(ctx: ToolContext, name: str, /, **arguments: Any) -> dict[str, Any]:
    tool = get_tool(name)
    assert tool is not None, name
    assert ctx.persona in tool.personas, f"{name} is not offered to {ctx.persona}"
    args = tool.args.model_validate(arguments)
    result = await tool.handler(args, ctx)
    json.dumps(result)  # what the model receives must be plain JSON
    return result


def labels(items: list[dict[str, Any]]) -> list[str]:
    return [item["label"] for item in items]


# -- data -----------------------------------------------------------------------------------


@dataclass
class Seeded:
    mike_lead: int
    sarah_lead: int
    priya_lead: int
    mike_contact: int
    linda_contact: int
    riverside: int
    kitchen_deal: int
    repipe_deal: int
    tomorrow_booking: int
    mike_booking_today: int
    supply_partnership: int
    riverside_partnership: int
    project: int


def local(day: date, hour: int, minute: int = 0) -> datetime:
    return datetime.combine(day, time(hour, minute), tzinfo=ZONE).astimezone(UTC)


def today() -> date:
    return datetime.now(ZONE).date()


async def seed(db: async_sessionmaker[AsyncSession]) -> Seeded:
    """Acme's CRM, plus a Bright Smiles tenant whose rows share names with Acme's."""
    now = datetime.now(UTC)
    day = today()
    async with tenant_session(db, ACME.id) as s:
        mike = Lead(
            name="Mike Johnson",
            phone="+15555550142",
            job_type="kitchen remodel",
            status="qualified",
            urgency="urgent",
            source="voice",
            conversation_id="CA-lead-1",
            created_at=now - timedelta(days=2),
        )
        sarah = Lead(
            name="Sarah Johnson",
            phone="+15555550199",
            job_type="water heater",
            status="new",
            urgency="emergency",
            created_at=now - timedelta(hours=3),
        )
        priya = Lead(
            name="Priya Raman",
            phone="+15555551234",
            email="priya@example.com",
            job_type="panel upgrade",
            status="contacted",
            source="referral",
            created_at=now - timedelta(days=20),
        )
        tom = Lead(
            name="Tom Becker",
            job_type="bathroom",
            status="converted",
            source="web",
            created_at=now - timedelta(days=60),
        )
        supply = Company(name="Johnson Supply Co", industry="wholesale", phone="+15555550300")
        riverside = Company(name="Riverside Property Management", industry="property")
        s.add_all([mike, sarah, priya, tom, supply, riverside])
        await s.flush()
        mike_c = Contact(
            name="Mike Johnson", phone="+15555550142", role="homeowner", lead_id=mike.id
        )
        linda = Contact(
            name="Linda Park", phone="+15555550400", role="property manager", company=riverside
        )
        sarah_c = Contact(name="Sarah Johnson", phone="+15555550199", lead_id=sarah.id)
        s.add_all([mike_c, linda, sarah_c])
        await s.flush()
        kitchen = Opportunity(
            title="Johnson kitchen remodel",
            value=Decimal("18500"),
            stage="proposal-sent",
            contact=mike_c,
            lead_id=mike.id,
        )
        heater = Opportunity(
            title="Sarah water heater",
            value=Decimal("2400"),
            stage="contacted",
            contact=sarah_c,
            lead_id=sarah.id,
        )
        repipe = Opportunity(
            title="Riverside repiping",
            value=Decimal("42000"),
            stage="negotiation",
            company=riverside,
            contact=linda,
        )
        bath = Opportunity(
            title="Becker bathroom",
            value=Decimal("9000"),
            stage="closed-won",
            closed_at=now,
        )
        s.add_all([kitchen, heater, repipe, bath])
        mike_today = Booking(
            customer_name="Mike Johnson",
            customer_phone="+15555550142",
            service="kitchen measure",
            starts_at=local(day, 12),
            ends_at=local(day, 13),
            status="pending",
            lead_id=mike.id,
        )
        tomorrow = Booking(
            customer_name="Sarah Johnson",
            customer_phone="+15555550199",
            service="water heater install",
            starts_at=local(day + timedelta(days=1), 10),
            ends_at=local(day + timedelta(days=1), 11),
            status="pending",
            conversation_id="CA-booked-2",
        )
        later = Booking(
            customer_name="Priya Raman",
            service="panel quote",
            starts_at=local(day + timedelta(days=3), 9),
            ends_at=local(day + timedelta(days=3), 10),
            status="confirmed",
        )
        gone = Booking(
            customer_name="Tom Becker",
            service="bathroom walkthrough",
            starts_at=local(day + timedelta(days=2), 15),
            ends_at=local(day + timedelta(days=2), 16),
            status="cancelled",
        )
        s.add_all([mike_today, tomorrow, later, gone])
        p_supply = Partnership(
            name="Johnson Supply co-marketing",
            phase="discover",
            health_score=72,
            company_id=supply.id,
        )
        p_river = Partnership(
            name="Riverside maintenance program",
            phase="deploy",
            health_score=35,
            company_id=riverside.id,
            contact_id=linda.id,
        )
        project = Project(
            name="Henderson bathroom remodel",
            customer="Ann Henderson",
            address="14 Oak Street",
            status="active",
            progress=60,
            next_step="tile delivery Thursday",
            crew=["Luis", "Dee"],
            start_date=day - timedelta(days=10),
            target_date=day + timedelta(days=12),
        )
        s.add_all([p_supply, p_river, project])
        s.add_all(
            [
                Task(
                    title="Call Mike back about tile",
                    due=now - timedelta(days=1),
                    priority="high",
                    lead_id=mike.id,
                ),
                Task(
                    title="Send Riverside proposal",
                    due=local(day + timedelta(days=3), 12),
                    contact_id=linda.id,
                ),
                Task(title="Old chore", status="done", completed_at=now - timedelta(days=3)),
            ]
        )
        s.add_all(
            [
                Call(
                    call_sid="CA-lead-1",
                    started_at=now - timedelta(days=2),
                    duration_s=180,
                    status="completed",
                    persona="dispatcher",
                    tool_calls=[{"name": "capture_lead", "status": "ok"}],
                ),
                Call(
                    call_sid="CA-booked-2",
                    started_at=now - timedelta(days=1),
                    duration_s=240,
                    status="completed",
                    persona="receptionist",
                    tool_calls=[
                        {"name": "get_availability", "status": "ok"},
                        {"name": "capture_lead", "status": "invalid_arguments"},
                    ],
                ),
                Call(
                    call_sid="CA-angry-3",
                    started_at=now - timedelta(hours=5),
                    duration_s=60,
                    status="completed",
                    persona="dispatcher",
                ),
                Call(
                    call_sid="CA-ancient",
                    started_at=now - timedelta(days=90),
                    duration_s=600,
                    status="completed",
                    persona="dispatcher",
                ),
            ]
        )
        s.add(
            Escalation(
                conversation_id="CA-angry-3",
                channel="voice",
                caller="+15555559999",
                category="angry_customer",
                summary="Upset about a late visit",
            )
        )
        s.add(
            Activity(
                kind="call",
                body="Spoke with Mike about the tile",
                lead_id=mike.id,
                contact_id=mike_c.id,
                at=now - timedelta(hours=1),
            )
        )
        await s.commit()
        ids = Seeded(
            mike_lead=mike.id,
            sarah_lead=sarah.id,
            priya_lead=priya.id,
            mike_contact=mike_c.id,
            linda_contact=linda.id,
            riverside=riverside.id,
            kitchen_deal=kitchen.id,
            repipe_deal=repipe.id,
            tomorrow_booking=tomorrow.id,
            mike_booking_today=mike_today.id,
            supply_partnership=p_supply.id,
            riverside_partnership=p_river.id,
            project=project.id,
        )
    async with tenant_session(db, SMILES.id) as s:
        other_mike = Lead(
            name="Mike Johnson",
            phone="+15555550142",
            job_type="cleaning",
            status="new",
            conversation_id="CA-smiles-1",
        )
        s.add(other_mike)
        s.add(Contact(name="Mike Johnson", phone="+15555550142", role="patient"))
        s.add(Company(name="Johnson Dental Lab"))
        s.add(Opportunity(title="Johnson implants", value=Decimal("7000"), stage="negotiation"))
        s.add(
            Booking(
                customer_name="Mike Johnson",
                customer_phone="+15555550142",
                service="cleaning",
                starts_at=local(day + timedelta(days=1), 10),
                ends_at=local(day + timedelta(days=1), 10, 30),
                status="pending",
            )
        )
        s.add(Partnership(name="Johnson Dental Lab referral", phase="co-create", health_score=90))
        s.add(Project(name="Henderson crowns", customer="Ann Henderson"))
        s.add(Task(title="Order Smiles supplies", due=datetime.now(UTC) - timedelta(days=1)))
        s.add(
            Call(
                call_sid="CA-smiles-1",
                started_at=now - timedelta(hours=2),
                duration_s=99,
                status="completed",
                persona="receptionist",
                tool_calls=[{"name": "book_appointment", "status": "ok"}],
            )
        )
        s.add(BlockedDate(date=day + timedelta(days=1), reason="dentist conference"))
        await s.commit()
    return ids


@pytest.fixture
async def crm(db: async_sessionmaker[AsyncSession]) -> AsyncIterator[tuple[ToolContext, Seeded]]:
    ids = await seed(db)
    yield make_ctx(db), ids


async def rows(
    db: async_sessionmaker[AsyncSession], model: Any, tenant: str = ACME.id
) -> list[Any]:
    async with tenant_session(db, tenant) as s:
        return list((await s.scalars(select(model).order_by(model.id))).unique())


# -- the catalogue ----------------------------------------------------------------------------


def test_catalogue_per_persona() -> None:
    crm_names = {t.name for t in tools_for("crm_operator")}
    assert crm_names >= CRM_CATALOGUE
    # Besides the catalogue the operator only gets the confirmation protocol and call control
    # shared by every persona on a call (hanging up...), never another persona's business tools.
    for name in crm_names - CRM_CATALOGUE - CONFIRMATION_TOOLS:
        shared = REGISTRY[name]
        assert shared.risk == "read" and not shared.needs_confirmation, name
        assert {"dispatcher", "receptionist", "crm_operator"} <= shared.personas, name
    mine = {t.name for t in REGISTRY.values() if t.handler.__module__.startswith(MY_MODULES)}
    assert {n for n in mine if "crm_operator" in REGISTRY[n].personas} == CRM_CATALOGUE
    field_names = {t.name for t in tools_for("field_assistant")}
    assert FIELD_CATALOGUE <= field_names
    assert {n for n in mine if "field_assistant" in REGISTRY[n].personas} == FIELD_CATALOGUE
    mine = CRM_CATALOGUE | FIELD_CATALOGUE
    # create_contact is one registration shared by both personas.
    assert get_tool("create_contact").personas >= {"crm_operator", "field_assistant"}  # type: ignore[union-attr]
    # Field-only tools stay with the field assistant and vice versa.
    for name in FIELD_CATALOGUE - {"create_contact"}:
        assert REGISTRY[name].personas == {"field_assistant"}
    assert all(REGISTRY[name].personas <= {"crm_operator", "field_assistant"} for name in mine)


def test_schemas_are_valid_function_schemas() -> None:
    for name in CRM_CATALOGUE | FIELD_CATALOGUE:
        tool = REGISTRY[name]
        assert NAME_PATTERN.match(tool.name)
        params = tool.parameters()
        assert params["type"] == "object" and isinstance(params["properties"], dict)
        text = json.dumps(tool.realtime_schema())
        assert "$ref" not in text and "$defs" not in text
        assert tool.chat_schema()["function"]["parameters"] == params
        assert tool.description.strip()
        for prop in params["properties"].values():
            assert "type" in prop or "anyOf" in prop or "enum" in prop


def test_risk_levels_and_spoken_summaries() -> None:
    reads = {n for n in CRM_CATALOGUE | FIELD_CATALOGUE if REGISTRY[n].risk == "read"}
    writes = (CRM_CATALOGUE | FIELD_CATALOGUE) - reads
    assert writes == {
        "create_lead",
        "update_lead_status",
        "score_lead",
        "confirm_booking",
        "cancel_booking",
        "block_date",
        "unblock_date",
        "create_opportunity",
        "move_deal",
        "create_contact",
        "create_company",
        "update_partnership_phase",
        "update_health_score",
        "create_task",
        "add_note",
        "log_activity",
    }
    assert all(REGISTRY[n].needs_confirmation and REGISTRY[n].summary for n in writes)
    order = {"low": 1, "medium": 2, "high": 3}
    assert order[REGISTRY["cancel_booking"].risk] > order[REGISTRY["add_note"].risk]
    assert order[REGISTRY["move_deal"].risk] > order[REGISTRY["add_note"].risk]
    assert REGISTRY["cancel_booking"].risk == "high"

    examples = {
        "create_lead": {"name": "Ann Lee", "job_type": "leaky tap", "phone": "+15555550111"},
        "update_lead_status": {"lead": "Mike Johnson", "status": "qualified"},
        "score_lead": {"lead": "Mike Johnson"},
        "confirm_booking": {"booking": "Sarah Johnson"},
        "cancel_booking": {"booking": "Sarah Johnson", "on": "2030-03-05"},
        "block_date": {"day": "2030-12-25", "reason": "Christmas"},
        "unblock_date": {"day": "2030-12-25"},
        "create_opportunity": {"title": "Lee bathroom", "value": 5000, "contact": "Ann Lee"},
        "move_deal": {"deal": "Johnson kitchen remodel", "stage": "negotiation"},
        "create_contact": {"name": "Ann Lee", "company": "Lee Homes"},
        "create_company": {"name": "Lee Homes"},
        "update_partnership_phase": {"partnership": "Johnson Supply", "phase": "co-create"},
        "update_health_score": {"partnership": "Johnson Supply", "health_score": 80},
        "create_task": {"title": "Call Ann", "due_date": "2030-03-05", "about": "Ann Lee"},
        "add_note": {"about": "Henderson", "note": "Tiles arrived. Grout is short."},
        "log_activity": {"kind": "door_knock", "summary": "No answer", "address": "3 Elm St"},
    }
    assert set(examples) == writes
    spoken = {
        n: REGISTRY[n].spoken_summary(REGISTRY[n].args.model_validate(a))
        for n, a in examples.items()
    }
    for text in spoken.values():
        assert text.startswith("I'll ") and text.endswith(".") and "\n" not in text
        assert re.sub(r'"[^"]*"', "", text).count(". ") == 0  # one sentence (notes quoted)
    assert spoken["move_deal"] == "I'll move the Johnson kitchen remodel deal to negotiation."
    assert spoken["cancel_booking"] == "I'll cancel Sarah Johnson's booking on Tuesday, March 5."
    assert spoken["add_note"] == 'I\'ll add a note to Henderson: "Tiles arrived. Grout is short".'
    assert spoken["block_date"] == (
        "I'll block Wednesday, December 25 so nothing can be booked that day."
    )


@pytest.mark.parametrize(
    ("name", "arguments"),
    [
        ("update_lead_status", {"lead": "Mike", "status": "won"}),
        ("list_leads", {"status": "hot"}),
        ("move_deal", {"deal": "Johnson", "stage": "closed"}),
        ("list_opportunities", {"stage": "proposal"}),
        ("list_bookings", {"status": "done"}),
        ("update_partnership_phase", {"partnership": "x", "phase": "launch"}),
        ("update_health_score", {"partnership": "x", "health_score": 101}),
        ("update_health_score", {"partnership": "x", "health_score": -1}),
        ("score_lead", {"lead": "Mike", "score": 150}),
        ("update_lead_status", {"lead": "", "status": "new"}),
        ("block_date", {"day": "next tuesday"}),
        ("log_activity", {"kind": "email", "summary": "x"}),
    ],
)
def test_enum_and_range_errors_are_validation_errors(name: str, arguments: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        REGISTRY[name].args.model_validate(arguments)


# -- pure calendar helpers --------------------------------------------------------------------


def test_spoken_times() -> None:
    assert spoken_time(datetime(2030, 1, 1, 14, 30)) == "2:30 PM"
    assert spoken_time(datetime(2030, 1, 1, 0, 0)) == "12 AM"
    assert spoken_time(datetime(2030, 1, 1, 12, 0)) == "12 PM"
    base = date(2030, 3, 4)
    assert spoken_date(base, base) == "today"
    assert spoken_date(base + timedelta(days=1), base) == "tomorrow"
    assert spoken_date(base - timedelta(days=1), base) == "yesterday"
    assert spoken_date(date(2030, 3, 8), base) == "Friday, March 8"
    assert spoken_date(date(2031, 1, 2), base) == "Thursday, January 2, 2031"
    now = datetime(2030, 3, 4, 9, 0, tzinfo=ZONE)
    at = datetime(2030, 3, 5, 19, 30, tzinfo=UTC)  # 3:30 PM in New York (EST)
    assert moment(at, ZONE, now) == {
        "iso": "2030-03-05T14:30-05:00",
        "spoken": "tomorrow at 2:30 PM",
    }


def test_day_bounds_follow_daylight_saving() -> None:
    start, end = day_bounds(date(2030, 3, 10), ZONE)  # spring forward in the US
    assert end - start == timedelta(hours=23)
    start, end = day_bounds(date(2030, 11, 3), ZONE)
    assert end - start == timedelta(hours=25)


def test_free_slots_skip_busy_and_past() -> None:
    day = date(2030, 3, 4)
    busy = [(datetime(2030, 3, 4, 9, 30, tzinfo=ZONE), datetime(2030, 3, 4, 10, 30, tzinfo=ZONE))]
    slots = free_slots(
        day,
        [(time(8), time(12))],
        busy,
        zone=ZONE,
        length=timedelta(hours=1),
        step=timedelta(minutes=30),
        not_before=datetime(2030, 3, 4, 8, 15, tzinfo=ZONE),
    )
    assert [s.strftime("%H:%M") for s in slots] == ["08:30", "10:30", "11:00"]


# -- leads --------------------------------------------------------------------------------------


async def test_lead_reads(crm: tuple[ToolContext, Seeded]) -> None:
    ctx, ids = crm
    listed = await call(ctx, "list_leads", limit=2)
    assert listed["total"] == 4 and listed["more"] == 2
    assert [x["name"] for x in listed["leads"]] == ["Sarah Johnson", "Mike Johnson"]
    qualified = await call(ctx, "list_leads", status="qualified")
    assert [x["id"] for x in qualified["leads"]] == [ids.mike_lead]
    assert qualified["leads"][0]["label"] == "Mike Johnson, kitchen remodel, 555-555-0142"

    found = await call(ctx, "search_leads", query="johnson")
    assert {x["id"] for x in found["leads"]} == {ids.mike_lead, ids.sarah_lead}
    by_phone = await call(ctx, "search_leads", query="555-1234")
    assert [x["id"] for x in by_phone["leads"]] == [ids.priya_lead]
    assert (await call(ctx, "search_leads", query="zzyzx quux"))["total"] == 0

    counted = await call(ctx, "count_leads")
    assert counted["count"] == 4
    assert counted["by_status"] == {"new": 1, "contacted": 1, "qualified": 1, "converted": 1}
    assert (await call(ctx, "count_leads", days=7))["count"] == 2
    assert (await call(ctx, "count_leads", status="new", days=7))["count"] == 1

    summary = await call(ctx, "get_lead_summary", lead="Mike Johnson")
    assert summary["lead"]["id"] == ids.mike_lead
    assert summary["recent_activity"][0]["what"] == "Spoke with Mike about the tile"
    assert [t["title"] for t in summary["open_tasks"]] == ["Call Mike back about tile"]
    assert summary["deals"][0]["title"] == "Johnson kitchen remodel"
    assert summary["bookings"][0]["service"] == "kitchen measure"
    # An id from an earlier result works as well as a name.
    assert (await call(ctx, "get_lead_summary", lead=str(ids.priya_lead)))["lead"]["name"] == (
        "Priya Raman"
    )


async def test_lead_writes(crm: tuple[ToolContext, Seeded]) -> None:
    ctx, ids = crm
    created = await call(
        ctx,
        "create_lead",
        name="Ann Lee",
        phone="+15555550142",
        job_type="leaky tap",
        urgency="urgent",
    )
    assert created["status"] == "ok" and created["lead"]["status"] == "new"
    assert created["same_phone_as"][0]["id"] == ids.mike_lead  # flagged, not refused
    [ann] = [x for x in await rows(ctx.db, Lead) if x.name == "Ann Lee"]
    assert ann.source == "voice" and ann.conversation_id == ctx.conversation_id

    moved = await call(ctx, "update_lead_status", lead="Sarah Johnson", status="contacted")
    assert (moved["from"], moved["to"]) == ("new", "contacted")
    again = await call(ctx, "update_lead_status", lead="Sarah Johnson", status="contacted")
    assert again["status"] == "unchanged"

    scored = await call(ctx, "score_lead", lead="Priya")
    assert scored["score"] == sum(scored["factors"].values()) <= 100
    assert scored["factors"]["source"] == 10 and scored["factors"]["reachable"] == 15
    set_score = await call(ctx, "score_lead", lead=str(ids.mike_lead), score=88)
    assert set_score["score"] == 88

    leads = {x.id: x for x in await rows(ctx.db, Lead)}
    assert leads[ids.sarah_lead].status == "contacted"
    assert leads[ids.priya_lead].score == scored["score"]
    assert leads[ids.mike_lead].score == 88
    timeline = [(a.kind, a.lead_id) for a in await rows(ctx.db, Activity)]
    assert ("lead_captured", ann.id) in timeline
    assert ("status_change", ids.sarah_lead) in timeline
    assert all(a.actor == "ai:crm_operator" for a in (await rows(ctx.db, Activity))[1:])


async def test_ambiguous_and_missing_references(crm: tuple[ToolContext, Seeded]) -> None:
    ctx, ids = crm
    ambiguous = await call(ctx, "update_lead_status", lead="Johnson", status="converted")
    assert ambiguous["status"] == "ambiguous"
    assert {c["id"] for c in ambiguous["candidates"]} == {ids.mike_lead, ids.sarah_lead}
    assert "Mike Johnson, kitchen remodel, 555-555-0142" in labels(ambiguous["candidates"])
    # Nothing was written while the caller is asked.
    assert {x.status for x in await rows(ctx.db, Lead)} == {
        "new",
        "contacted",
        "qualified",
        "converted",
    }

    nobody = await call(ctx, "get_lead_summary", lead="Bartholomew Quince")
    assert nobody["status"] == "not_found" and nobody["suggestions"] == []
    close = await call(ctx, "move_deal", deal="Riverside repaving job", stage="closed-won")
    assert close["status"] == "not_found"
    assert close["suggestions"][0]["id"] == ids.repipe_deal
    assert all(
        d.stage != "closed-won" or d.title == "Becker bathroom"
        for d in await rows(ctx.db, Opportunity)
    )

    for name, arguments in [
        ("get_contact", {"contact": "Johnson"}),
        ("score_lead", {"lead": "Johnson"}),
        ("move_deal", {"deal": "Johnson", "stage": "negotiation"}),
        ("confirm_booking", {"booking": "Johnson"}),
    ]:
        result = await call(ctx, name, **arguments)
        assert result["status"] == "ambiguous", (name, result)
        assert len(result["candidates"]) >= 2
    # The kitchen deal is "the Johnson kitchen remodel"; with the detail there is no doubt.
    sure = await call(ctx, "move_deal", deal="Johnson kitchen", stage="negotiation")
    assert sure["status"] == "ok" and sure["deal"]["id"] == ids.kitchen_deal


# -- bookings ----------------------------------------------------------------------------------


async def test_booking_reads(crm: tuple[ToolContext, Seeded]) -> None:
    ctx, ids = crm
    todays = await call(ctx, "get_todays_bookings")
    assert todays["day"]["spoken"] == "today"
    assert [b["id"] for b in todays["bookings"]] == [ids.mike_booking_today]
    assert todays["bookings"][0]["starts"]["spoken"] == "today at 12 PM"

    upcoming = await call(ctx, "get_upcoming_bookings", days=7)
    assert [b["customer"] for b in upcoming["bookings"]] == ["Sarah Johnson", "Priya Raman"]
    assert upcoming["bookings"][0]["starts"]["spoken"] == "tomorrow at 10 AM"
    assert (await call(ctx, "get_upcoming_bookings", days=7, limit=1))["more"] == 1

    cancelled = await call(ctx, "list_bookings", status="cancelled")
    assert [b["customer"] for b in cancelled["bookings"]] == ["Tom Becker"]
    priya = await call(ctx, "list_bookings", customer="Priya")
    assert [b["service"] for b in priya["bookings"]] == ["panel quote"]
    by_phone = await call(ctx, "list_bookings", customer="555-0199")
    assert [b["customer"] for b in by_phone["bookings"]] == ["Sarah Johnson"]
    bad = await call(ctx, "list_bookings", start_date="2030-01-10", end_date="2030-01-01")
    assert bad["status"] == "error"

    summary = await call(ctx, "get_booking_summary", days=7)
    assert summary["by_status"] == {"pending": 2, "confirmed": 1, "cancelled": 1}
    assert summary["today"] == 1
    assert summary["next"]["customer"] in ("Mike Johnson", "Sarah Johnson")


async def test_booking_writes(crm: tuple[ToolContext, Seeded]) -> None:
    ctx, ids = crm
    tomorrow = today() + timedelta(days=1)
    confirmed = await call(ctx, "confirm_booking", booking="Sarah Johnson")
    assert confirmed["status"] == "ok" and confirmed["booking"]["status"] == "confirmed"
    assert (await call(ctx, "confirm_booking", booking=str(ids.tomorrow_booking)))["status"] == (
        "unchanged"
    )
    cancelled = await call(
        ctx,
        "cancel_booking",
        booking="Sarah",
        on=tomorrow.isoformat(),
        reason="customer travelling",
    )
    assert cancelled["booking"]["id"] == ids.tomorrow_booking
    assert cancelled["booking"]["status"] == "cancelled"
    # Cancelled bookings are no longer something a name refers to.
    assert (await call(ctx, "cancel_booking", booking="Sarah Johnson"))["status"] == "not_found"

    bookings = {b.id: b for b in await rows(ctx.db, Booking)}
    assert bookings[ids.tomorrow_booking].cancelled_at is not None
    assert "customer travelling" in (bookings[ids.tomorrow_booking].notes or "")
    kinds = [(a.kind, a.booking_id) for a in await rows(ctx.db, Activity)]
    assert ("booking", ids.tomorrow_booking) in kinds
    assert ("cancellation", ids.tomorrow_booking) in kinds


async def test_blocking_days_and_availability(crm: tuple[ToolContext, Seeded]) -> None:
    ctx, _ = crm
    day = today() + timedelta(days=7)
    while day.weekday() > 3:  # a Monday-Thursday: open 8 to 5 for Acme
        day += timedelta(days=1)
    free = await call(ctx, "get_availability", day=day.isoformat(), days=1, per_day=3)
    [entry] = free["days"]
    assert entry["open"] and entry["free_slots"] == 17  # 8:00 ... 16:00 every half hour
    assert [s["iso"][11:16] for s in entry["slots"]] == ["08:00", "08:30", "09:00"]

    async with tenant_session(ctx.db, ACME.id) as s:
        s.add(
            Booking(
                customer_name="X",
                service="y",
                starts_at=local(day, 8, 30),
                ends_at=local(day, 9, 30),
            )
        )
        await s.commit()
    entry = (await call(ctx, "get_availability", day=day.isoformat(), days=1))["days"][0]
    assert entry["free_slots"] == 14  # 8:00, 8:30 and 9:00 overlap 8:30-9:30
    assert entry["slots"][0]["iso"][11:16] == "09:30"

    blocked = await call(ctx, "block_date", day=day.isoformat(), reason="staff training")
    assert blocked["status"] == "ok" and blocked["bookings_that_day"] == 1
    assert (await call(ctx, "block_date", day=day.isoformat()))["status"] == "unchanged"
    entry = (await call(ctx, "get_availability", day=day.isoformat(), days=1))["days"][0]
    assert entry == {"day": entry["day"], "open": False, "why": "blocked: staff training"}

    assert (await call(ctx, "unblock_date", day=day.isoformat()))["status"] == "ok"
    assert (await call(ctx, "unblock_date", day=day.isoformat()))["status"] == "unchanged"
    entry = (await call(ctx, "get_availability", day=day.isoformat(), days=1))["days"][0]
    assert entry["open"] is True

    sunday = day + timedelta(days=6 - day.weekday())
    closed = (await call(ctx, "get_availability", day=sunday.isoformat(), days=1))["days"][0]
    assert closed["open"] is False and closed["why"] == "closed"

    # Availability rules replace the opening hours on their weekday (here: a lunch break).
    weekday = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")[day.weekday()]
    async with tenant_session(ctx.db, ACME.id) as s:
        s.add_all(
            [
                AvailabilityRule(weekday=weekday, opens=time(13), closes=time(15)),
                AvailabilityRule(weekday=weekday, opens=time(10), closes=time(12)),
                AvailabilityRule(weekday="sun", opens=time(10), closes=time(11)),
            ]
        )
        await s.commit()
    entry = (await call(ctx, "get_availability", day=day.isoformat(), days=1, per_day=12))["days"][
        0
    ]
    assert [s["iso"][11:16] for s in entry["slots"]] == [
        "10:00",
        "10:30",
        "11:00",
        "13:00",
        "13:30",
        "14:00",
    ]
    sunday_rule = (await call(ctx, "get_availability", day=sunday.isoformat(), days=1))["days"]
    assert [s["spoken"][-5:] for s in sunday_rule[0]["slots"]] == ["10 AM"]


# -- pipeline --------------------------------------------------------------------------------


async def test_pipeline(crm: tuple[ToolContext, Seeded]) -> None:
    ctx, ids = crm
    deals = await call(ctx, "list_opportunities")
    assert [d["title"] for d in deals["deals"]] == [
        "Riverside repiping",
        "Johnson kitchen remodel",
        "Sarah water heater",
    ]
    assert deals["deals"][0]["label"] == "Riverside repiping, Linda Park, negotiation, $42,000"
    won = await call(ctx, "list_opportunities", stage="closed-won")
    assert [d["title"] for d in won["deals"]] == ["Becker bathroom"]

    summary = await call(ctx, "get_pipeline_summary")
    assert summary["open_deals"] == 3 and summary["open_value"] == 62900.0
    assert summary["won_this_month"] == {"deals": 1, "value": 9000.0}
    stages = {s["stage"]: s for s in summary["stages"]}
    assert stages["negotiation"] == {"stage": "negotiation", "deals": 1, "value": 42000.0}

    created = await call(
        ctx,
        "create_opportunity",
        title="Park office rewire",
        value=12500.5,
        contact="Linda Park",
        stage="discovery-call",
    )
    assert created["deal"]["company"] == "Riverside Property Management"  # from the contact
    assert created["deal"]["value"] == 12500.5
    refused = await call(ctx, "create_opportunity", title="x", contact="Johnson")
    assert refused["status"] == "ambiguous" and "not created" in refused["message"]

    moved = await call(ctx, "move_deal", deal="Riverside repiping", stage="closed-won")
    assert (moved["from"], moved["to"]) == ("negotiation", "closed-won")
    deal = {d.id: d for d in await rows(ctx.db, Opportunity)}[ids.repipe_deal]
    assert deal.stage == "closed-won" and deal.closed_at is not None
    reopened = await call(ctx, "move_deal", deal=str(ids.repipe_deal), stage="negotiation")
    assert reopened["status"] == "ok"
    assert {d.id: d for d in await rows(ctx.db, Opportunity)}[ids.repipe_deal].closed_at is None
    assert len(await rows(ctx.db, Opportunity)) == 5
    changes = [a for a in await rows(ctx.db, Activity) if a.opportunity_id == ids.repipe_deal]
    assert [a.data["to"] for a in changes] == ["closed-won", "negotiation"]


# -- contacts and companies --------------------------------------------------------------------


async def test_contacts_and_companies(crm: tuple[ToolContext, Seeded]) -> None:
    ctx, ids = crm
    found = await call(ctx, "search_contacts", query="Linda")
    assert [c["id"] for c in found["contacts"]] == [ids.linda_contact]
    assert found["contacts"][0]["company"] == "Riverside Property Management"
    by_company = await call(ctx, "search_contacts", query="Riverside")
    assert [c["name"] for c in by_company["contacts"]] == ["Linda Park"]

    contact = await call(ctx, "get_contact", contact="Lynda Park")  # misheard
    assert contact["status"] == "ok" and contact["contact"]["id"] == ids.linda_contact
    assert [d["title"] for d in contact["open_deals"]] == ["Riverside repiping"]

    companies = await call(ctx, "search_companies", query="riverside property")
    assert companies["companies"][0]["id"] == ids.riverside
    assert companies["companies"][0]["contacts"] == 1
    people = await call(ctx, "get_company_contacts", company="Riverside")
    assert [p["name"] for p in people["contacts"]] == ["Linda Park"]

    made = await call(
        ctx,
        "create_contact",
        name="Raj Patel",
        phone="+15555550777",
        company="Riverside Property Mgmt",
        role="owner",
    )
    assert made["status"] == "ok" and made["company_created"] is False
    assert made["contact"]["company"] == "Riverside Property Management"
    fresh = await call(ctx, "create_contact", name="Eve Stone", company="Stone Builders")
    assert fresh["company_created"] is True
    twice = await call(ctx, "create_contact", name="raj patel", phone="555-555-0777")
    assert twice["status"] == "exists" and twice["contact"]["id"] == made["contact"]["id"]
    # One company called Johnson: linked; two: the caller is asked first, nothing is written.
    linked = await call(ctx, "create_contact", name="Al Roe", company="Johnson")
    assert linked["contact"]["company"] == "Johnson Supply Co"
    await call(ctx, "create_company", name="Johnson Electric")
    unsure = await call(ctx, "create_contact", name="Bo Roe", company="Johnson")
    assert unsure["status"] == "ambiguous"
    assert {c["label"].split(",")[0] for c in unsure["candidates"]} == {
        "Johnson Supply Co",
        "Johnson Electric",
    }

    company = await call(ctx, "create_company", name="Oak Street Realty", industry="real estate")
    assert company["status"] == "ok"
    assert (await call(ctx, "create_company", name="oak street realty"))["status"] == "exists"
    people = await call(ctx, "get_company_contacts", company="Riverside")
    assert {p["name"] for p in people["contacts"]} == {"Linda Park", "Raj Patel"}
    names = [c.name for c in await rows(ctx.db, Contact)]
    assert names.count("Raj Patel") == 1 and "Eve Stone" in names


# -- partnerships ------------------------------------------------------------------------------


async def test_partnerships(crm: tuple[ToolContext, Seeded]) -> None:
    ctx, ids = crm
    listed = await call(ctx, "list_partnerships")
    assert [p["id"] for p in listed["partnerships"]] == [
        ids.riverside_partnership,
        ids.supply_partnership,
    ]
    assert listed["partnerships"][0]["health"] == "at risk"
    summary = await call(ctx, "get_partnership_summary")
    assert summary["by_phase"] == {"discover": 1, "co-create": 0, "deploy": 1, "independent": 0}
    assert summary["average_health"] == round((72 + 35) / 2)
    assert [p["id"] for p in summary["at_risk"]] == [ids.riverside_partnership]
    one = await call(ctx, "get_partnership_summary", partnership="Riverside")
    assert one["partnership"]["contact"] == "Linda Park"
    assert one["partnership"]["next_phase"] == "independent"

    phase = await call(
        ctx, "update_partnership_phase", partnership="Johnson Supply", phase="co-create"
    )
    assert (phase["from"], phase["to"]) == ("discover", "co-create")
    health = await call(
        ctx,
        "update_health_score",
        partnership="Riverside maintenance",
        health_score=55,
        reason="renewed contract",
    )
    assert (health["from"], health["to"]) == (35, 55)
    stored = {p.id: p for p in await rows(ctx.db, Partnership)}
    assert stored[ids.supply_partnership].phase == "co-create"
    assert stored[ids.riverside_partnership].health_score == 55
    logged = [a.data.get("partnership_id") for a in await rows(ctx.db, Activity)]
    assert logged.count(ids.riverside_partnership) == 1
    assert logged.count(ids.supply_partnership) == 1


# -- tasks -------------------------------------------------------------------------------------


async def test_tasks(crm: tuple[ToolContext, Seeded]) -> None:
    ctx, ids = crm
    open_tasks = await call(ctx, "list_tasks")
    assert [t["title"] for t in open_tasks["tasks"]] == [
        "Call Mike back about tile",
        "Send Riverside proposal",
    ]
    assert open_tasks["tasks"][0]["overdue"] is True
    overdue = await call(ctx, "list_tasks", due="overdue")
    assert [t["title"] for t in overdue["tasks"]] == ["Call Mike back about tile"]
    done = await call(ctx, "list_tasks", status="done")
    assert [t["title"] for t in done["tasks"]] == ["Old chore"]

    tomorrow = today() + timedelta(days=1)
    made = await call(
        ctx,
        "create_task",
        title="Call Sarah about install",
        due_date=tomorrow.isoformat(),
        due_time="09:30",
        priority="urgent",
        about="Sarah Johnson",
        about_type="lead",
    )
    assert made["status"] == "ok" and made["about"] == "lead Sarah Johnson"
    assert made["task"]["due"]["spoken"] == "tomorrow at 9:30 AM"
    closing = await call(
        ctx,
        "create_task",
        title="Renewal call",
        about="Riverside maintenance",
        due_date=tomorrow.isoformat(),
    )
    hours = ACME.hours.get(("mon", "tue", "wed", "thu", "fri", "sat", "sun")[tomorrow.weekday()])
    expected = spoken_time(datetime.combine(tomorrow, hours.closes if hours else time(17)))
    assert closing["task"]["due"]["spoken"] == f"tomorrow at {expected}"
    unsure = await call(ctx, "create_task", title="x", about="Johnson")
    assert unsure["status"] == "ambiguous"
    assert any(c["id"].startswith("lead:") for c in unsure["candidates"])
    assert (await call(ctx, "create_task", title="x", due_time="10:00"))["status"] == "error"

    tasks = {t.title: t for t in await rows(ctx.db, Task)}
    assert tasks["Call Sarah about install"].lead_id == ids.sarah_lead
    assert tasks["Renewal call"].partnership_id == ids.riverside_partnership
    assert "x" not in tasks
    this_week = await call(ctx, "list_tasks", due="this_week", limit=10)
    assert {"Call Sarah about install", "Renewal call", "Call Mike back about tile"} <= {
        t["title"] for t in this_week["tasks"]
    }


# -- analytics ---------------------------------------------------------------------------------


async def test_dashboard_summary_and_timeline(crm: tuple[ToolContext, Seeded]) -> None:
    ctx, _ = crm
    stats = await call(ctx, "get_dashboard_stats", days=30)
    assert stats["leads"]["new_in_period"] == 3
    assert stats["pipeline"] == {
        "open_deals": 3,
        "open_value": 62900.0,
        "open_value_spoken": "$62,900",
        "won_in_period": 9000.0,
    }
    assert stats["bookings"]["today"] == 1 and stats["bookings"]["next_7_days"] == 2
    assert stats["tasks"] == {"open": 2, "overdue": 1}
    assert stats["calls_in_period"] == 3 and stats["escalations_in_period"] == 1

    daily = await call(ctx, "get_daily_summary")
    assert daily["day"]["spoken"] == "today"
    assert daily["appointments"]["count"] == 1
    assert daily["tasks_due"]["overdue"] == 1
    assert daily["escalations"] == {"count": 1, "categories": {"angry_customer": 1}}
    # Sarah's lead came in 3 hours ago: today, unless it is not yet 3 AM.
    sarah_today = (datetime.now(ZONE) - timedelta(hours=3)).date() == today()
    assert daily["new_leads"]["top"] == (
        ["Sarah Johnson, water heater, 555-555-0199"] * sarah_today
    )

    await call(ctx, "update_lead_status", lead="Priya Raman", status="qualified")
    recent = await call(ctx, "get_recent_activities", limit=2)
    assert recent["total"] == 2 and recent["activities"][0]["kind"] == "status_change"
    assert recent["activities"][0]["by"] == "ai:crm_operator"
    calls_only = await call(ctx, "get_recent_activities", kind="call")
    assert [a["what"] for a in calls_only["activities"]] == ["Spoke with Mike about the tile"]


async def test_voice_insights_and_roi(crm: tuple[ToolContext, Seeded]) -> None:
    ctx, _ = crm
    insights = await call(ctx, "get_voice_session_insights", days=30)
    assert insights["calls"] == 3  # the 90-day-old call is outside the period
    assert insights["duration"] == {
        "total_minutes": round((180 + 240 + 60) / 60, 1),
        "average_seconds": 160,
        "longest_seconds": 240,
    }
    assert insights["top_tools"] == {"capture_lead": 2, "get_availability": 1}
    assert insights["tool_results_not_ok"] == 1
    assert insights["outcomes"] == {"lead_captured": 1, "booked": 1, "escalated": 1}
    assert insights["by_persona"] == {"dispatcher": 2, "receptionist": 1}

    roi = await call(
        ctx, "get_roi_calculation_insights", days=30, hourly_rate=30, admin_minutes_per_call=5
    )
    inputs = roi["inputs"]
    assert "revenue = agent_leads * conversion_rate * average_deal_value" in roi["formula"]
    assert inputs["agent_leads"] == 1  # only Mike's lead came from a conversation
    assert inputs["average_deal_value"] == 9000.0  # the one closed-won deal
    assert inputs["conversion_rate_basis"].startswith("assumed")
    assert roi["expected_revenue"] == round(1 * inputs["conversion_rate"] * 9000.0, 2)
    assert roi["hours_saved"] == round((8 + 3 * 5) / 60, 1)
    assert roi["labour_value"] == round((8 + 3 * 5) / 60 * 30, 2)
    assert roi["total_value"] == round(roi["expected_revenue"] + roi["labour_value"], 2)
    given = await call(
        ctx, "get_roi_calculation_insights", conversion_rate=0.5, average_deal_value=1000
    )
    assert given["expected_revenue"] == 500.0
    assert given["inputs"]["conversion_rate_basis"] == "given by the caller"


# -- tenancy ---------------------------------------------------------------------------------


async def test_another_tenants_rows_never_appear(db: async_sessionmaker[AsyncSession]) -> None:
    ids = await seed(db)
    acme, smiles = make_ctx(db), make_ctx(db, SMILES)

    # Acme's reads carry none of Bright Smiles' rows, and vice versa.
    acme_text = json.dumps(
        [
            await call(acme, "list_leads", limit=20),
            await call(acme, "search_contacts", query="Johnson", limit=20),
            await call(acme, "search_companies", query="Johnson"),
            await call(acme, "list_opportunities", limit=20),
            await call(acme, "get_upcoming_bookings", limit=20),
            await call(acme, "list_partnerships", limit=20),
            await call(acme, "list_tasks", limit=20),
            await call(acme, "get_voice_session_insights"),
        ]
    )
    for foreign in (
        "cleaning",
        "patient",
        "Dental",
        "implants",
        "Smiles supplies",
        "book_appointment",
        "crowns",
    ):
        assert foreign not in acme_text
    smiles_text = json.dumps(
        [
            await call(smiles, "list_leads", limit=20),
            await call(smiles, "search_leads", query="Johnson"),
            await call(smiles, "get_todays_bookings"),
            await call(smiles, "get_upcoming_bookings", limit=20),
            await call(smiles, "list_tasks", limit=20),
            await call(smiles, "get_dashboard_stats"),
            await call(smiles, "get_pipeline_summary"),
            await call(smiles, "get_recent_activities", limit=20),
        ]
    )
    for foreign in ("kitchen", "Sarah", "Priya", "Riverside", "Call Mike back"):
        assert foreign not in smiles_text

    # A name both tenants use resolves within the tenant: one Mike Johnson lead each.
    assert (await call(smiles, "get_lead_summary", lead="Mike Johnson"))["lead"]["job"] == (
        "cleaning"
    )
    assert (await call(acme, "get_lead_summary", lead="Mike Johnson"))["lead"]["id"] == (
        ids.mike_lead
    )
    # An id of another tenant's row names nothing here.
    foreign_id = await call(smiles, "get_lead_summary", lead=str(ids.priya_lead))
    assert foreign_id["status"] == "not_found"
    refused = await call(smiles, "cancel_booking", booking=str(ids.tomorrow_booking))
    assert refused["status"] == "not_found"
    assert {b.status for b in await rows(db, Booking) if b.id == ids.tomorrow_booking} == {
        "pending"
    }
    # Blocked days are per tenant: Bright Smiles' conference does not close Acme.
    tomorrow = (today() + timedelta(days=1)).isoformat()
    smiles_day = (await call(smiles, "get_availability", day=tomorrow, days=1))["days"][0]
    assert smiles_day["open"] is False and "conference" in smiles_day["why"]
    acme_day = (await call(acme, "get_availability", day=tomorrow, days=1))["days"][0]
    assert "conference" not in json.dumps(acme_day)

    # Counts agree with what each tenant owns.
    assert (await call(smiles, "count_leads"))["count"] == 1
    assert (await call(smiles, "get_voice_session_insights"))["calls"] == 1
    async with tenant_session(db, SMILES.id) as s:
        assert await s.scalar(select(func.count(Lead.id))) == 1
