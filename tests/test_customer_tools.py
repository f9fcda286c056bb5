"""Customer-facing tools (dispatcher, receptionist, conversation control) against real SQL.

Handlers are called the way the runner calls them: arguments validated by the tool's pydantic
model, then `handler(args, ctx)`. The call and the SMS sender are small recording stand-ins for
the bridge's CallSession and the app's notifier.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from prompts.profiles import BusinessProfile, load_profiles
from tools.context import Channel, ToolContext
from tools.db.models import (
    Activity,
    AvailabilityRule,
    BlockedDate,
    Booking,
    Contact,
    Escalation,
    Lead,
)
from tools.db.tenancy import tenant_session
from tools.registry import get_tool, tools_for

Db = async_sessionmaker[AsyncSession]
CALLER = "+15555550142"
OTHER_CALLER = "+15555550143"
PROFILES = load_profiles()


@dataclass
class RecordingCall:
    hang_ups: int = 0
    transfers: list[str] = field(default_factory=list)

    async def hang_up(self) -> None:
        self.hang_ups += 1

    async def transfer(self, number: str) -> None:
        self.transfers.append(number)


@dataclass
class RecordingNotifier:
    sent: list[dict[str, str]] = field(default_factory=list)
    failing: set[str] = field(default_factory=set)

    async def send_sms(self, tenant: str, to: str, body: str, *, reason: str) -> None:
        if to in self.failing:
            raise RuntimeError("twilio said no")
        self.sent.append({"tenant": tenant, "to": to, "body": body, "reason": reason})


def make_ctx(
    db: Db,
    kv: Any,
    profile_id: str,
    *,
    channel: Channel = "voice",
    caller: str = CALLER,
    conversation_id: str = "CA" + "7" * 32,
    call: RecordingCall | None = None,
    notifier: RecordingNotifier | None = None,
    profile: BusinessProfile | None = None,
) -> ToolContext:
    profile = profile or PROFILES.by_id(profile_id)
    assert profile is not None
    if channel == "sms":
        conversation_id = f"sms:{profile.id}:{caller}"
    return ToolContext(
        tenant=profile.id,
        profile=profile,
        channel=channel,
        conversation_id=conversation_id,
        caller=caller,
        persona=profile.persona,
        db=db,
        kv=kv,
        conversation=None,  # type: ignore[arg-type]  # no tool here reads the transcript
        call=call,
        notifier=notifier,
    )


async def run(name: str, raw: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
    tool = get_tool(name)
    assert tool is not None
    result = await tool.handler(tool.args.model_validate(raw), ctx)
    json.dumps(result)  # every result must be JSON-able for the model
    return result


def future_weekday(weekday: int, zone: str, min_days: int = 7) -> date:
    day = datetime.now(ZoneInfo(zone)).date() + timedelta(days=min_days)
    while day.weekday() != weekday:
        day += timedelta(days=1)
    return day


# -- registry ----------------------------------------------------------------------------------


def test_tools_are_offered_to_the_right_personas() -> None:
    dispatcher = {t.name for t in tools_for("dispatcher")}
    receptionist = {t.name for t in tools_for("receptionist")}
    assert {"capture_lead", "request_photos", "end_call", "escalate"} <= dispatcher
    assert {"book_appointment", "transfer_to_human"}.isdisjoint(dispatcher)
    assert {
        "get_business_hours",
        "check_availability",
        "book_appointment",
        "cancel_appointment",
        "end_call",
        "escalate",
        "transfer_to_human",
    } <= receptionist
    assert "capture_lead" not in receptionist
    for persona in ("crm_operator", "field_assistant"):
        assert "end_call" in {t.name for t in tools_for(persona)}
        assert "escalate" not in {t.name for t in tools_for(persona)}


def test_writes_need_confirmation_and_conversation_control_does_not() -> None:
    confirm = {
        name: get_tool(name).needs_confirmation  # type: ignore[union-attr]
        for name in (
            "capture_lead",
            "book_appointment",
            "cancel_appointment",
            "request_photos",
            "end_call",
            "escalate",
            "transfer_to_human",
            "check_availability",
            "get_business_hours",
        )
    }
    assert confirm == {
        "capture_lead": True,
        "book_appointment": True,
        "cancel_appointment": True,
        "request_photos": False,
        "end_call": False,
        "escalate": False,
        "transfer_to_human": False,
        "check_availability": False,
        "get_business_hours": False,
    }


def test_schemas_stand_alone_and_describe_every_argument() -> None:
    names = ("capture_lead", "request_photos", "escalate", "check_availability")
    names += ("book_appointment", "cancel_appointment", "end_call", "transfer_to_human")
    for name in names:
        tool = get_tool(name)
        assert tool is not None
        schema = tool.realtime_schema()
        assert "$ref" not in json.dumps(schema)
        assert schema["description"]
        for prop, spec in schema["parameters"]["properties"].items():
            assert spec.get("description"), f"{name}.{prop} has no description"


def test_phone_numbers_are_validated_and_normalised() -> None:
    args = get_tool("capture_lead").args  # type: ignore[union-attr]
    base = {"name": "Al", "job_type": "leak", "address": "1 Main St", "urgency": "routine"}
    assert args(**base, callback_number="(555) 555-0199").callback_number == "+15555550199"
    assert args(**base, callback_number="1 555 555 0199").callback_number == "+15555550199"
    assert args(**base, callback_number="+44 20 7946 0958").callback_number == "+442079460958"
    for bad in ("12345", "call me maybe", "555-0199", "+1"):
        with pytest.raises(ValidationError):
            args(**base, callback_number=bad)
    with pytest.raises(ValidationError):
        args(**{**base, "urgency": "whenever"})


# -- capture_lead ------------------------------------------------------------------------------

LEAD = {
    "name": "Dana Fox",
    "job_type": "Burst pipe under the kitchen sink",
    "address": "12 Elm Street, Springfield",
    "urgency": "emergency",
    "notes": "Water shut off at the main.",
}


async def test_capture_lead_creates_a_lead_and_an_activity(db: Db, fake_kv: Any) -> None:
    ctx = make_ctx(db, fake_kv, "acme-plumbing")
    result = await run("capture_lead", LEAD, ctx)
    assert result["status"] == "ok"
    assert result["callback_number"] == "555-555-0142"
    assert "escalate" in result["next"]  # emergencies point the model at the owner alert
    async with tenant_session(db, "acme-plumbing") as session:
        lead = (await session.scalars(select(Lead))).one()
        activity = (await session.scalars(select(Activity))).one()
    assert (lead.name, lead.phone, lead.source, lead.urgency, lead.status) == (
        "Dana Fox",
        CALLER,
        "voice",
        "emergency",
        "new",
    )
    assert lead.conversation_id == ctx.conversation_id
    assert lead.notes == "Water shut off at the main."
    assert result["lead"]["id"] == lead.id
    assert activity.kind == "lead_captured" and activity.lead_id == lead.id
    assert activity.actor == "ai:dispatcher"
    # Another tenant sees none of it.
    async with tenant_session(db, "bright-smiles") as session:
        assert await session.scalar(select(func.count()).select_from(Lead)) == 0


async def test_capture_lead_again_updates_the_same_request(db: Db, fake_kv: Any) -> None:
    ctx = make_ctx(db, fake_kv, "acme-plumbing", channel="sms")
    await run("capture_lead", {**LEAD, "urgency": "urgent"}, ctx)
    again = await run(
        "capture_lead", {**LEAD, "urgency": "emergency", "callback_number": "555-555-0177"}, ctx
    )
    other_job = await run("capture_lead", {**LEAD, "job_type": "Outlet sparking"}, ctx)
    assert again["status"] == "updated" and other_job["status"] == "ok"
    async with tenant_session(db, "acme-plumbing") as session:
        leads = list(await session.scalars(select(Lead).order_by(Lead.id)))
    assert len(leads) == 2
    assert (leads[0].urgency, leads[0].phone, leads[0].source) == (
        "emergency",
        "+15555550177",
        "sms",
    )


async def test_capture_lead_from_a_withheld_number_asks_for_one(db: Db, fake_kv: Any) -> None:
    ctx = make_ctx(db, fake_kv, "acme-plumbing", caller="anonymous")
    result = await run("capture_lead", {**LEAD, "urgency": "routine"}, ctx)
    assert result["callback_number"] is None
    assert "callback number" in result["next"]


# -- request_photos --------------------------------------------------------------------------------


async def test_request_photos_texts_the_caller_the_link(db: Db, fake_kv: Any) -> None:
    notifier = RecordingNotifier()
    ctx = make_ctx(db, fake_kv, "acme-plumbing", notifier=notifier)
    await run("capture_lead", LEAD, ctx)
    result = await run("request_photos", {"what": "the leak"}, ctx)
    assert result["status"] == "ok"
    assert notifier.sent == [
        {
            "tenant": "acme-plumbing",
            "to": CALLER,
            "body": "Acme Plumbing & Electric: please upload photos of the leak here: "
            "https://example.com/upload",
            "reason": "photo_link",
        }
    ]
    async with tenant_session(db, "acme-plumbing") as session:
        activity = await session.scalar(select(Activity).where(Activity.kind == "photo_request"))
        lead = await session.scalar(select(Lead))
    assert activity is not None and lead is not None
    assert activity.lead_id == lead.id and activity.data["sent"] is True


async def test_request_photos_is_capped_per_conversation(db: Db, fake_kv: Any) -> None:
    notifier = RecordingNotifier()
    ctx = make_ctx(db, fake_kv, "acme-plumbing", notifier=notifier)
    results = [await run("request_photos", {}, ctx) for _ in range(4)]
    assert [r["status"] for r in results] == ["ok", "ok", "ok", "refused"]
    assert len(notifier.sent) == 3


async def test_request_photos_without_texting_is_recorded(db: Db, fake_kv: Any) -> None:
    ctx = make_ctx(db, fake_kv, "acme-plumbing")
    result = await run("request_photos", {}, ctx)
    assert result["status"] == "recorded"
    assert result["link"] == "https://example.com/upload"
    async with tenant_session(db, "acme-plumbing") as session:
        activity = await session.scalar(select(Activity))
    assert activity is not None and activity.data["sent"] is False


async def test_request_photos_edge_cases(db: Db, fake_kv: Any) -> None:
    notifier = RecordingNotifier()
    sms = make_ctx(db, fake_kv, "acme-plumbing", channel="sms", notifier=notifier)
    assert (await run("request_photos", {}, sms))["link"] == "https://example.com/upload"
    withheld = make_ctx(db, fake_kv, "acme-plumbing", caller="anonymous", notifier=notifier)
    assert (await run("request_photos", {}, withheld))["status"] == "error"
    failing = RecordingNotifier(failing={CALLER})
    broken = make_ctx(db, fake_kv, "acme-plumbing", notifier=failing)
    assert (await run("request_photos", {}, broken))["status"] == "error"
    no_link = make_ctx(db, fake_kv, "bright-smiles", notifier=notifier)
    assert (await run("request_photos", {}, no_link))["status"] == "unavailable"
    assert notifier.sent == []


# -- end_call / transfer_to_human ----------------------------------------------------------------


async def test_end_call_hangs_up_only_on_a_call(db: Db, fake_kv: Any) -> None:
    call = RecordingCall()
    voice = make_ctx(db, fake_kv, "acme-plumbing", call=call)
    assert await run("end_call", {"reason": "done"}, voice) == {"status": "ending"}
    assert call.hang_ups == 1
    sms = make_ctx(db, fake_kv, "acme-plumbing", channel="sms")
    result = await run("end_call", {}, sms)
    assert result["status"] == "not_on_call" and "text conversation" in result["message"]


async def test_transfer_goes_to_the_first_owner_number(db: Db, fake_kv: Any) -> None:
    call = RecordingCall()
    ctx = make_ctx(db, fake_kv, "bright-smiles", call=call)
    result = await run("transfer_to_human", {"reason": "wants a person"}, ctx)
    assert result == {"status": "transferring", "to": "Dr. Patel"}
    assert call.transfers == ["+15005550101"]
    sms = make_ctx(db, fake_kv, "bright-smiles", channel="sms")
    assert (await run("transfer_to_human", {}, sms))["status"] == "not_on_call"
    nobody = PROFILES.by_id("bright-smiles").model_copy(update={"owner_numbers": []})  # type: ignore[union-attr]
    lonely = make_ctx(db, fake_kv, "bright-smiles", call=RecordingCall(), profile=nobody)
    assert (await run("transfer_to_human", {}, lonely))["status"] == "unavailable"


# -- escalate ------------------------------------------------------------------------------------


async def test_escalate_alerts_the_owner_once_per_category(db: Db, fake_kv: Any) -> None:
    notifier = RecordingNotifier()
    ctx = make_ctx(db, fake_kv, "acme-plumbing", notifier=notifier)
    emergency = {"category": "emergency", "summary": "Basement flooding at 12 Elm Street."}
    first = await run("escalate", emergency, ctx)
    second = await run("escalate", {**emergency, "summary": "Still flooding!"}, ctx)
    angry = await run("escalate", {"category": "angry_customer", "summary": "Very upset."}, ctx)
    assert first["status"] == "ok" and first["owner_notified"] is True
    assert second["status"] == "already_escalated"
    assert angry["status"] == "ok"
    assert [m["to"] for m in notifier.sent] == ["+15005550100", "+15005550100"]
    assert {m["reason"] for m in notifier.sent} == {"escalation"}
    body = notifier.sent[0]["body"]
    assert "EMERGENCY" in body and "Basement flooding" in body and "555-555-0142" in body
    assert len(body) <= 320
    async with tenant_session(db, "acme-plumbing") as session:
        rows = list(await session.scalars(select(Escalation).order_by(Escalation.id)))
    assert [(r.category, r.notified_at is not None) for r in rows] == [
        ("emergency", True),
        ("angry_customer", True),
    ]
    # A new conversation may alert again.
    other = make_ctx(
        db, fake_kv, "acme-plumbing", notifier=notifier, conversation_id="CA" + "8" * 32
    )
    assert (await run("escalate", emergency, other))["status"] == "ok"


async def test_escalate_without_texting_records_and_retries_later(db: Db, fake_kv: Any) -> None:
    args = {
        "category": "asked_for_owner",
        "summary": "Wants Dana to call about a quote.",
        "callback_number": "555-555-0188",
    }
    silent = make_ctx(db, fake_kv, "acme-plumbing")
    result = await run("escalate", args, silent)
    assert result["status"] == "recorded" and result["owner_notified"] is False
    assert "texting is not set up" in result["message"]
    failing = RecordingNotifier(failing={"+15005550100"})
    broken = make_ctx(db, fake_kv, "acme-plumbing", notifier=failing)
    assert (await run("escalate", args, broken))["status"] == "recorded"
    notifier = RecordingNotifier()
    working = make_ctx(db, fake_kv, "acme-plumbing", notifier=notifier)
    assert (await run("escalate", args, working))["status"] == "ok"
    assert "555-555-0188" in notifier.sent[0]["body"]
    assert (await run("escalate", args, working))["status"] == "already_escalated"
    async with tenant_session(db, "acme-plumbing") as session:
        row = (await session.scalars(select(Escalation))).one()
    assert row.callback_number == "+15555550188" and row.notified_at is not None


# -- reception: hours and availability -----------------------------------------------------------

SMILES_ZONE = ZoneInfo("America/Chicago")


def _local(slot: dict[str, str]) -> datetime:
    return datetime.fromisoformat(slot["iso"])


async def test_business_hours(db: Db, fake_kv: Any) -> None:
    ctx = make_ctx(db, fake_kv, "bright-smiles")
    soon = datetime.now(SMILES_ZONE).date() + timedelta(days=5)
    async with tenant_session(db, "bright-smiles") as session:
        session.add(BlockedDate(date=soon, reason="Staff training"))
        await session.commit()
    result = await run("get_business_hours", {}, ctx)
    hours = {h["day"]: h for h in result["hours"]}
    assert hours["Monday"] == {"day": "Monday", "open": True, "opens": "9 AM", "closes": "6 PM"}
    assert hours["Friday"]["closes"] == "1 PM"
    assert hours["Saturday"] == {"day": "Saturday", "open": False}
    assert result["timezone"] == "America/Chicago"
    assert [c["reason"] for c in result["closures"]] == ["Staff training"]
    assert isinstance(result["open_now"], bool)


async def test_availability_lists_local_slots(db: Db, fake_kv: Any) -> None:
    ctx = make_ctx(db, fake_kv, "bright-smiles")
    monday = future_weekday(0, "America/Chicago")
    result = await run("check_availability", {"date": monday.isoformat()}, ctx)
    assert result["available"] is True
    starts = [_local(s) for s in result["slots"]]
    assert starts[0] == datetime.combine(monday, time(9), tzinfo=SMILES_ZONE)
    assert all(b - a == timedelta(minutes=30) for a, b in itertools.pairwise(starts))
    assert len(result["slots"]) + result["more"] == 18  # 9:00 .. 17:30


async def test_availability_respects_bookings_rules_and_blocks(db: Db, fake_kv: Any) -> None:
    ctx = make_ctx(db, fake_kv, "bright-smiles")
    monday = future_weekday(0, "America/Chicago")
    tuesday, wednesday = monday + timedelta(days=1), monday + timedelta(days=2)
    async with tenant_session(db, "bright-smiles") as session:
        start = datetime.combine(monday, time(10), tzinfo=SMILES_ZONE)
        session.add(
            Booking(
                customer_name="Ann",
                service="cleaning",
                starts_at=start,
                ends_at=start + timedelta(minutes=30),
                status="confirmed",
            )
        )
        session.add(BlockedDate(date=tuesday, reason="Dr. Patel at a conference"))
        session.add(AvailabilityRule(weekday="wed", opens=time(13), closes=time(15)))
        await session.commit()

    taken = await run("check_availability", {"date": monday.isoformat(), "time": "10:00"}, ctx)
    assert taken["available"] is False and "taken" in taken["why"]
    alternatives = {_local(s).time() for s in taken["alternatives"]}
    assert alternatives == {time(9, 30), time(10, 30), time(9)}

    free = await run("check_availability", {"date": monday.isoformat(), "time": "10:30"}, ctx)
    assert free["available"] is True

    blocked = await run("check_availability", {"date": tuesday.isoformat()}, ctx)
    assert blocked["available"] is False and "conference" in blocked["why"]
    assert _local(blocked["next_available"][0]) == datetime.combine(
        wednesday, time(13), tzinfo=SMILES_ZONE
    )

    ruled = await run("check_availability", {"date": wednesday.isoformat()}, ctx)
    assert [_local(s).time() for s in ruled["slots"]] == [
        time(13),
        time(13, 30),
        time(14),
        time(14, 30),
    ]
    late = await run("check_availability", {"date": wednesday.isoformat(), "time": "09:00"}, ctx)
    assert late["available"] is False and "outside our hours" in late["why"]


async def test_availability_rejects_bad_days(db: Db, fake_kv: Any) -> None:
    ctx = make_ctx(db, fake_kv, "bright-smiles")
    saturday = future_weekday(5, "America/Chicago")
    closed = await run("check_availability", {"date": saturday.isoformat()}, ctx)
    assert closed["available"] is False and "Saturdays" in closed["why"]
    assert _local(closed["next_available"][0]).weekday() == 0
    past = (datetime.now(SMILES_ZONE) - timedelta(days=2)).date()
    assert (await run("check_availability", {"date": past.isoformat()}, ctx))["status"] == "error"
    far = datetime.now(SMILES_ZONE).date() + timedelta(days=400)
    assert (await run("check_availability", {"date": far.isoformat()}, ctx))["status"] == "error"
    with pytest.raises(ValidationError):
        get_tool("check_availability").args.model_validate({"date": "next tuesday"})  # type: ignore[union-attr]


# -- reception: booking ----------------------------------------------------------------------------


def _booking_args(day: date, at: str, **overrides: str) -> dict[str, str]:
    return {
        "name": "Jamie Rivera",
        "phone": "555-555-0142",
        "service": "cleaning",
        "starts_at": f"{day.isoformat()}T{at}",
        **overrides,
    }


async def test_book_appointment_stores_utc_and_links_the_contact(db: Db, fake_kv: Any) -> None:
    ctx = make_ctx(db, fake_kv, "bright-smiles")
    monday = future_weekday(0, "America/Chicago")
    async with tenant_session(db, "bright-smiles") as session:
        contact = Contact(name="Jamie Rivera", phone=CALLER)
        session.add(contact)
        await session.commit()
    result = await run("book_appointment", _booking_args(monday, "14:30"), ctx)
    assert result["status"] == "ok"
    assert result["booking"]["starts"]["iso"].startswith(f"{monday.isoformat()}T14:30")
    assert "2:30 PM" in result["message"]
    async with tenant_session(db, "bright-smiles") as session:
        booking = (await session.scalars(select(Booking))).one()
        activity = (await session.scalars(select(Activity))).one()
    expected = datetime.combine(monday, time(14, 30), tzinfo=SMILES_ZONE)
    assert booking.starts_at == expected and booking.starts_at.tzinfo is not None
    assert booking.starts_at.astimezone(UTC).hour == expected.astimezone(UTC).hour
    assert booking.ends_at - booking.starts_at == timedelta(minutes=30)
    assert (booking.status, booking.customer_phone, booking.contact_id) == (
        "confirmed",
        CALLER,
        contact.id,
    )
    assert activity.kind == "booking" and activity.booking_id == booking.id
    # Booking the same thing again changes nothing.
    again = await run("book_appointment", _booking_args(monday, "14:30"), ctx)
    assert again["status"] == "unchanged"
    # Times are the business's wall clock: an offset would be read out wrongly, so it is refused.
    with pytest.raises(ValidationError, match="local time"):
        await run("book_appointment", _booking_args(monday, "20:30+00:00"), ctx)


async def test_book_appointment_refuses_impossible_times(db: Db, fake_kv: Any) -> None:
    ctx = make_ctx(db, fake_kv, "bright-smiles")
    monday = future_weekday(0, "America/Chicago")
    friday = monday + timedelta(days=4)
    async with tenant_session(db, "bright-smiles") as session:
        session.add(BlockedDate(date=monday + timedelta(days=1), reason="holiday"))
        await session.commit()
    await run("book_appointment", _booking_args(monday, "10:00"), ctx)
    cases = {
        "taken": _booking_args(monday, "10:15", phone="555-555-0143"),
        "outside our hours": _booking_args(friday, "12:45"),  # would end after 1 PM
        "holiday": _booking_args(monday + timedelta(days=1), "10:00"),
        "Saturdays": _booking_args(monday + timedelta(days=5), "10:00"),
        "passed": _booking_args(datetime.now(SMILES_ZONE).date(), "00:00"),
    }
    for expected, args in cases.items():
        result = await run("book_appointment", args, ctx)
        assert result["status"] == "error", (expected, result)
        assert expected in result["message"], (expected, result)
    taken = await run("book_appointment", cases["taken"], ctx)
    assert {_local(s).time() for s in taken["alternatives"]} >= {time(10, 30)}
    async with tenant_session(db, "bright-smiles") as session:
        assert await session.scalar(select(func.count()).select_from(Booking)) == 1


async def test_two_callers_cannot_both_get_the_last_slot(db: Db, fake_kv: Any) -> None:
    monday = future_weekday(0, "America/Chicago")
    first = make_ctx(db, fake_kv, "bright-smiles")
    second = make_ctx(db, fake_kv, "bright-smiles", caller=OTHER_CALLER)
    results = await asyncio.gather(
        run("book_appointment", _booking_args(monday, "11:00"), first),
        run("book_appointment", _booking_args(monday, "11:00", phone="555-555-0143"), second),
    )
    assert sorted(r["status"] for r in results) == ["error", "ok"]
    async with tenant_session(db, "bright-smiles") as session:
        assert await session.scalar(select(func.count()).select_from(Booking)) == 1


# -- reception: cancelling ------------------------------------------------------------------------


async def test_cancel_appointment_by_id_and_by_phone(db: Db, fake_kv: Any) -> None:
    ctx = make_ctx(db, fake_kv, "bright-smiles")
    monday = future_weekday(0, "America/Chicago")
    tuesday = monday + timedelta(days=1)
    one = await run("book_appointment", _booking_args(monday, "09:00"), ctx)
    await run("book_appointment", _booking_args(tuesday, "09:00"), ctx)

    ambiguous = await run("cancel_appointment", {}, ctx)
    assert ambiguous["status"] == "ambiguous" and len(ambiguous["bookings"]) == 2

    stranger = make_ctx(db, fake_kv, "bright-smiles", caller=OTHER_CALLER)
    refused = await run("cancel_appointment", {"booking_id": one["booking"]["id"]}, stranger)
    assert refused["status"] == "not_found"

    by_id = await run("cancel_appointment", {"booking_id": one["booking"]["id"]}, ctx)
    assert by_id["status"] == "ok" and by_id["booking"]["status"] == "cancelled"

    by_phone = await run(
        "cancel_appointment",
        {"phone": "(555) 555-0142", "date": tuesday.isoformat()},
        stranger,
    )
    assert by_phone["status"] == "ok"
    assert (await run("cancel_appointment", {}, ctx))["status"] == "not_found"
    async with tenant_session(db, "bright-smiles") as session:
        statuses = set(await session.scalars(select(Booking.status)))
        kinds = list(await session.scalars(select(Activity.kind).order_by(Activity.id)))
    assert statuses == {"cancelled"}
    assert kinds == ["booking", "booking", "cancellation", "cancellation"]
    # The freed slot can be booked again.
    rebook = await run("book_appointment", _booking_args(monday, "09:00"), stranger)
    assert rebook["status"] == "ok"


async def test_cancel_needs_some_way_to_know_the_caller(db: Db, fake_kv: Any) -> None:
    ctx = make_ctx(db, fake_kv, "bright-smiles", caller="anonymous")
    result = await run("cancel_appointment", {"booking_id": 1}, ctx)
    assert result["status"] == "error" and "phone number" in result["message"]
