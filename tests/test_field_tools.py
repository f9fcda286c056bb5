"""The field assistant's tools against real SQLite and PostgreSQL: look people up, take notes,
check projects, log visits; always within the caller's tenant."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.test_crm_tools import SMILES, Seeded, call, make_ctx, rows, seed
from tools.context import ToolContext
from tools.db.models import Activity, Contact, Project
from tools.db.tenancy import tenant_session
from tools.registry import get_tool


@pytest.fixture
async def field(
    db: async_sessionmaker[AsyncSession],
) -> AsyncIterator[tuple[ToolContext, Seeded]]:
    ids = await seed(db)
    yield make_ctx(db, persona="field_assistant"), ids


def test_field_assistant_cannot_reach_crm_operator_tools() -> None:
    for name in ("cancel_booking", "move_deal", "list_leads", "get_dashboard_stats"):
        tool = get_tool(name)
        assert tool is not None and "field_assistant" not in tool.personas


async def test_search_contact(field: tuple[ToolContext, Seeded]) -> None:
    ctx, ids = field
    people = await call(ctx, "search_contact", query="Linda Park")
    [linda] = people["people"]
    assert linda["type"] == "contact" and linda["id"] == f"contact:{ids.linda_contact}"
    assert linda["company"] == "Riverside Property Management"
    assert "last_activity" not in linda  # nothing on her timeline yet

    # Contacts and leads both come back, tagged, so the worker can say which one.
    johnsons = await call(ctx, "search_contact", query="Johnson")
    kinds = {(p["type"], p["name"]) for p in johnsons["people"]}
    assert {("contact", "Mike Johnson"), ("lead", "Mike Johnson"), ("lead", "Sarah Johnson")} <= (
        kinds
    )
    by_phone = await call(ctx, "search_contact", query="(555) 555-0400")
    assert [p["name"] for p in by_phone["people"]] == ["Linda Park"]
    assert (await call(ctx, "search_contact", query="Zebulon Quartz"))["total"] == 0

    # One person found: the last thing that happened with them is included.
    priya = await call(ctx, "search_contact", query="Priya Raman")
    assert priya["total"] == 1 and "last_activity" not in priya["people"][0]
    mike_lead = await call(ctx, "search_contact", query="Mike Johnson kitchen remodel")
    [found] = mike_lead["people"]
    assert (found["type"], found["id"]) == ("lead", f"lead:{ids.mike_lead}")
    assert found["last_activity"]["what"] == "Spoke with Mike about the tile"


async def test_add_note_attaches_to_what_was_named(field: tuple[ToolContext, Seeded]) -> None:
    ctx, ids = field
    note = await call(ctx, "add_note", about="Henderson bathroom", note="Tiles arrived, 3 short.")
    assert note["status"] == "ok" and note["attached_to"] == "project Henderson bathroom remodel"
    by_customer = await call(ctx, "add_note", about="Ann Henderson", note="Prefers texts.")
    assert by_customer["attached_to"] == "project Henderson bathroom remodel"

    # "Mike Johnson" is both a contact and a lead: the worker is asked which.
    ambiguous = await call(ctx, "add_note", about="Mike Johnson", note="Gate code 4411")
    assert ambiguous["status"] == "ambiguous"
    ids_offered = {c["id"] for c in ambiguous["candidates"]}
    assert {f"contact:{ids.mike_contact}", f"lead:{ids.mike_lead}"} <= ids_offered
    # ...and answers with the tagged id, or narrows the kind.
    picked = await call(ctx, "add_note", about=f"contact:{ids.mike_contact}", note="Gate code 4411")
    assert picked["attached_to"] == "contact Mike Johnson"
    narrowed = await call(
        ctx, "add_note", about="Mike Johnson", about_type="lead", note="Wants quote by Friday"
    )
    assert narrowed["attached_to"] == "lead Mike Johnson"
    deal = await call(ctx, "add_note", about="Riverside repiping", note="Board meets Monday")
    assert deal["attached_to"] == "deal Riverside repiping"

    misheard = await call(ctx, "add_note", about="Hendersen bathrom", note="x")
    assert misheard["attached_to"] == "project Henderson bathroom remodel"
    nothing = await call(ctx, "add_note", about="Quigley barn", note="never saved")
    assert nothing["status"] == "not_found"

    notes = [a for a in await rows(ctx.db, Activity) if a.kind == "note"]
    assert [n.body for n in notes if n.project_id == ids.project] == [
        "Tiles arrived, 3 short.",
        "Prefers texts.",
        "x",
    ]
    assert [n.body for n in notes if n.contact_id == ids.mike_contact] == ["Gate code 4411"]
    assert [n.body for n in notes if n.lead_id == ids.mike_lead] == ["Wants quote by Friday"]
    repipe_notes = [n for n in notes if n.opportunity_id == ids.repipe_deal]
    # The deal's contact person sees the note on their timeline too.
    assert [(n.body, n.contact_id) for n in repipe_notes] == [
        ("Board meets Monday", ids.linda_contact)
    ]
    assert all(n.actor == "ai:field_assistant" for n in notes)
    assert "never saved" not in json.dumps([n.body for n in notes])


async def test_project_status(field: tuple[ToolContext, Seeded]) -> None:
    ctx, ids = field
    await call(ctx, "add_note", about="Henderson", about_type="project", note="Grout done")
    status = await call(ctx, "get_project_status", project="14 Oak Street")
    project = status["project"]
    assert project["id"] == ids.project
    assert (project["status"], project["progress_percent"]) == ("active", 60)
    assert project["next_step"] == "tile delivery Thursday" and project["crew"] == ["Luis", "Dee"]
    assert project["target"]["iso"] > project["start"]["iso"]
    assert [u["what"] for u in status["latest"]] == ["Grout done"]
    assert (await call(ctx, "get_project_status", project=str(ids.project)))["project"]["id"] == (
        ids.project
    )
    unknown = await call(ctx, "get_project_status", project="Lighthouse restoration")
    assert unknown["status"] == "not_found"


async def test_log_activity(field: tuple[ToolContext, Seeded]) -> None:
    ctx, ids = field
    knock = await call(
        ctx,
        "log_activity",
        kind="door_knock",
        summary="Talked to the neighbour",
        address="16 Oak Street",
        outcome="interested",
    )
    assert knock["status"] == "ok" and knock["attached_to"] is None
    inspection = await call(
        ctx, "log_activity", kind="inspection", summary="Subfloor is dry", about="Henderson"
    )
    assert inspection["attached_to"] == "project Henderson bathroom remodel"
    refused = await call(ctx, "log_activity", kind="call", summary="x", about="Johnson")
    assert refused["status"] == "ambiguous"

    logged = {a.kind: a for a in await rows(ctx.db, Activity) if a.actor == "ai:field_assistant"}
    assert set(logged) == {"door_knock", "inspection"}
    assert logged["door_knock"].data == {"address": "16 Oak Street", "outcome": "interested"}
    assert logged["door_knock"].body == "Talked to the neighbour Outcome: interested."
    assert logged["inspection"].project_id == ids.project
    assert logged["inspection"].conversation_id == ctx.conversation_id


async def test_create_contact_is_shared_with_the_crm_operator(
    field: tuple[ToolContext, Seeded],
) -> None:
    ctx, _ = field
    made = await call(
        ctx, "create_contact", name="Gus Ortiz", phone="+15555550888", role="homeowner"
    )
    assert made["status"] == "ok"
    operator = make_ctx(ctx.db)
    found = await call(operator, "search_contacts", query="Gus Ortiz")
    assert [c["phone"] for c in found["contacts"]] == ["555-555-0888"]
    again = await call(operator, "create_contact", name="Gus Ortiz", phone="555-555-0888")
    assert again["status"] == "exists"
    assert [c.name for c in await rows(ctx.db, Contact)].count("Gus Ortiz") == 1


async def test_field_tools_stay_in_their_tenant(field: tuple[ToolContext, Seeded]) -> None:
    ctx, ids = field
    smiles = make_ctx(ctx.db, SMILES, persona="field_assistant")
    # Bright Smiles has its own "Henderson" project and "Mike Johnson"; Acme's never show.
    status = await call(smiles, "get_project_status", project="Henderson")
    assert status["project"]["name"] == "Henderson crowns"
    assert (await call(smiles, "get_project_status", project=str(ids.project)))["status"] == (
        "not_found"
    )
    people = await call(smiles, "search_contact", query="Johnson")
    assert {p["name"] for p in people["people"]} == {"Mike Johnson"}
    assert "kitchen" not in json.dumps(people) and "Sarah" not in json.dumps(people)
    note = await call(smiles, "add_note", about="Henderson", note="Smiles note")
    assert note["attached_to"] == "project Henderson crowns"
    foreign = await call(smiles, "add_note", about=f"project:{ids.project}", note="leak")
    assert foreign["status"] == "not_found"

    async with tenant_session(ctx.db, ctx.tenant) as s:
        acme_bodies = list(await s.scalars(select(Activity.body)))
        acme_projects = list(await s.scalars(select(Project.name)))
    assert "Smiles note" not in acme_bodies and "leak" not in acme_bodies
    assert acme_projects == ["Henderson bathroom remodel"]
