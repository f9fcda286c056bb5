"""The receptionist's tools: opening hours, free appointment slots, booking and cancelling.

All times the caller hears or gives are the business's local time (the profile's timezone);
the store keeps UTC. Availability comes from one place (`_Calendar`): opening hours or, where
a weekday has them, availability rules; minus blocked days and existing bookings.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from pydantic import BaseModel, Field, field_validator
from sqlalchemy import select, text

from tools.db.models import AvailabilityRule, BlockedDate, Booking, Contact, Lead
from tools.db.tenancy import tenant_session
from tools.handlers.bookings import (
    WEEKDAYS,
    booking_view,
    day_bounds,
    day_info,
    free_slots,
    moment,
    opening_windows,
    record_activity,
    spoken_date,
    spoken_time,
    zone_of,
)
from tools.handlers.dispatch import PhoneNumber, is_textable
from tools.matching import spoken_phone
from tools.registry import tool

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from prompts.profiles import BusinessProfile
    from tools.context import ToolContext

RECEPTIONIST = {"receptionist"}
MAX_DAYS_AHEAD = 180  # further out than this, a receptionist takes a note instead
LOOKAHEAD_DAYS = 14  # how far to look for the next free day when the asked one is full
MAX_SLOTS = 8
ALTERNATIVES = 3
SLOT_STEP = timedelta(minutes=30)


# -- the calendar ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Calendar:
    """What decides availability over a range of local days, loaded in one go."""

    profile: BusinessProfile
    zone: ZoneInfo
    now: datetime  # aware, local
    rules: list[tuple[str, time, time]]
    blocked: dict[date, str | None]
    busy: list[tuple[datetime, datetime]]

    @property
    def length(self) -> timedelta:
        return timedelta(minutes=self.profile.appointment_minutes)

    def windows(self, day: date) -> list[tuple[time, time]]:
        return [] if day in self.blocked else opening_windows(day, self.rules, self.profile)

    def slots(self, day: date) -> list[datetime]:
        return free_slots(
            day,
            self.windows(day),
            self.busy,
            zone=self.zone,
            length=self.length,
            step=min(self.length, SLOT_STEP),
            not_before=self.now,
        )

    def closed_reason(self, day: date) -> str | None:
        if day in self.blocked:
            reason = self.blocked[day]
            return f"We're closed {self.spoken_day(day)}" + (f" ({reason})." if reason else ".")
        if not self.windows(day):
            return f"We're closed on {WEEKDAY_NAMES[day.weekday()]}s."
        return None

    def why_not(self, start: datetime) -> str | None:
        """Why an appointment cannot start at `start` (aware), or None if it can."""
        local = start.astimezone(self.zone)
        end = local + self.length
        if local < self.now:
            return "That time has already passed."
        closed = self.closed_reason(local.date())
        if closed:
            return closed
        windows = self.windows(local.date())
        inside = any(
            datetime.combine(local.date(), opens, tzinfo=self.zone) <= local
            and end <= datetime.combine(local.date(), closes, tzinfo=self.zone)
            for opens, closes in windows
        )
        if not inside:
            return f"That's outside our hours. {self.hours_phrase(local.date())}"
        if any(b_start < end and local < b_end for b_start, b_end in self.busy):
            return "That time is already taken."
        return None

    def hours_phrase(self, day: date) -> str:
        spans = []
        for opens, closes in self.windows(day):
            last = datetime.combine(day, closes) - self.length
            spans.append(
                f"from {spoken_time(datetime.combine(day, opens))} to "
                f"{spoken_time(datetime.combine(day, closes))} (last start "
                f"{spoken_time(last)})"
            )
        return (
            f"On {WEEKDAY_NAMES[day.weekday()]}s we take appointments " + " and ".join(spans) + "."
        )

    def nearest(self, wanted: datetime, count: int = ALTERNATIVES) -> list[datetime]:
        """Free slots closest to `wanted`: that day first, else the next days with room."""
        day = wanted.astimezone(self.zone).date()
        same_day = self.slots(day)
        if same_day:
            return sorted(sorted(same_day, key=lambda s: abs(s - wanted))[:count])
        return self.next_open(day + timedelta(days=1), count)

    def next_open(self, first: date, count: int) -> list[datetime]:
        for offset in range(LOOKAHEAD_DAYS):
            slots = self.slots(first + timedelta(days=offset))
            if slots:
                return slots[:count]
        return []

    def spoken_day(self, day: date) -> str:
        return spoken_date(day, self.now.date())


WEEKDAY_NAMES = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


async def _calendar(session: AsyncSession, ctx: ToolContext, first: date, last: date) -> _Calendar:
    zone = zone_of(ctx.profile)
    start, _ = day_bounds(first, zone)
    _, end = day_bounds(last, zone)
    rules = [
        (r.weekday, r.opens, r.closes) for r in await session.scalars(select(AvailabilityRule))
    ]
    blocked_rows = await session.scalars(
        select(BlockedDate).where(BlockedDate.date >= first, BlockedDate.date <= last)
    )
    bookings = await session.scalars(
        select(Booking).where(
            Booking.status != "cancelled", Booking.starts_at < end, Booking.ends_at > start
        )
    )
    return _Calendar(
        profile=ctx.profile,
        zone=zone,
        now=datetime.now(zone),
        rules=rules,
        blocked={b.date: b.reason for b in blocked_rows},
        busy=[(b.starts_at, b.ends_at) for b in bookings],
    )


def _local(at: datetime, zone: ZoneInfo) -> datetime:
    """A caller's time: naive means the business's local time."""
    return at.replace(tzinfo=zone) if at.tzinfo is None else at.astimezone(zone)


def _date_problem(day: date, today: date) -> str | None:
    if day < today:
        return f"That date has passed; today is {today:%A, %B} {today.day}."
    if day > today + timedelta(days=MAX_DAYS_AHEAD):
        return f"We only book up to {MAX_DAYS_AHEAD} days ahead."
    return None


async def _lock_calendar(session: AsyncSession, tenant: str) -> None:
    """Serialise bookings of one tenant until this transaction ends, so two callers can never
    both get the last free slot. Must run before the session's first statement."""
    connection = await session.connection()
    # Core statements on the connection: they read or write no tenant rows.
    if connection.dialect.name == "postgresql":
        await connection.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"bookings:{tenant}"}
        )
    elif connection.dialect.name == "sqlite":
        # Take SQLite's write lock up front; a second booking waits here (busy_timeout).
        await connection.exec_driver_sql("BEGIN IMMEDIATE")


# -- get_business_hours ----------------------------------------------------------------------


class BusinessHoursArgs(BaseModel):
    pass


@tool("get_business_hours", args=BusinessHoursArgs, risk="read", personas=RECEPTIONIST)
async def get_business_hours(args: BusinessHoursArgs, ctx: ToolContext) -> dict[str, Any]:
    """Opening hours for each day of the week (local time), whether the business is open
    right now, and closures (holidays) in the coming weeks."""
    zone = zone_of(ctx.profile)
    now = datetime.now(zone)
    hours = []
    for index, weekday in enumerate(WEEKDAYS):
        span = ctx.profile.hours.get(weekday)
        entry: dict[str, Any] = {"day": WEEKDAY_NAMES[index], "open": span is not None}
        if span is not None:
            entry["opens"] = spoken_time(datetime.combine(now.date(), span.opens))
            entry["closes"] = spoken_time(datetime.combine(now.date(), span.closes))
        hours.append(entry)
    async with tenant_session(ctx.db, ctx.tenant) as session:
        closures = list(
            await session.scalars(
                select(BlockedDate)
                .where(
                    BlockedDate.date >= now.date(),
                    BlockedDate.date <= now.date() + timedelta(days=30),
                )
                .order_by(BlockedDate.date)
            )
        )
    closed_today = any(c.date == now.date() for c in closures)
    today = ctx.profile.hours.get(WEEKDAYS[now.weekday()])
    open_now = not closed_today and today is not None and today.opens <= now.time() < today.closes
    return {
        "status": "ok",
        "business": ctx.profile.name,
        "address": ctx.profile.address or None,
        "timezone": ctx.profile.timezone,
        "local_time": moment(now, zone, now),
        "open_now": open_now,
        "hours": hours,
        "closures": [{"day": day_info(c.date, zone, now), "reason": c.reason} for c in closures],
    }


# -- check_availability --------------------------------------------------------------------------


class CheckAvailabilityArgs(BaseModel):
    # dt.* spellings: a field named like its type would shadow the type in the class body.
    date: dt.date = Field(description="The local day the caller wants, as YYYY-MM-DD.")
    time: dt.time | None = Field(
        None,
        description="A specific local start time the caller asked for, as HH:MM (24-hour). "
        "Omit to list the free times that day.",
    )


@tool("check_availability", args=CheckAvailabilityArgs, risk="read", personas=RECEPTIONIST)
async def check_availability(args: CheckAvailabilityArgs, ctx: ToolContext) -> dict[str, Any]:
    """Free appointment times on a day (local time), or whether one specific time is free.
    If the day is closed or full, suggests the next free times. Check before booking."""
    zone = zone_of(ctx.profile)
    today = datetime.now(zone).date()
    problem = _date_problem(args.date, today)
    if problem:
        return {"status": "error", "message": problem}
    async with tenant_session(ctx.db, ctx.tenant) as session:
        calendar = await _calendar(
            session, ctx, args.date, args.date + timedelta(days=LOOKAHEAD_DAYS)
        )
    result: dict[str, Any] = {
        "status": "ok",
        "day": day_info(args.date, zone, calendar.now),
        "appointment_minutes": ctx.profile.appointment_minutes,
    }
    if args.time is not None:
        wanted = datetime.combine(args.date, args.time, tzinfo=zone)
        why = calendar.why_not(wanted)
        result["requested"] = moment(wanted, zone, calendar.now)
        result["available"] = why is None
        if why is not None:
            result["why"] = why
            result["alternatives"] = [
                moment(s, zone, calendar.now) for s in calendar.nearest(wanted)
            ]
        return result
    slots = calendar.slots(args.date)
    result["available"] = bool(slots)
    if slots:
        result["slots"] = [moment(s, zone, calendar.now) for s in slots[:MAX_SLOTS]]
        result["more"] = max(0, len(slots) - MAX_SLOTS)
        return result
    result["why"] = calendar.closed_reason(args.date) or "Fully booked that day."
    result["next_available"] = [
        moment(s, zone, calendar.now)
        for s in calendar.next_open(args.date + timedelta(days=1), ALTERNATIVES)
    ]
    return result


# -- book_appointment --------------------------------------------------------------------------


class BookAppointmentArgs(BaseModel):
    name: str = Field(min_length=1, max_length=200, description="The customer's full name.")
    phone: PhoneNumber = Field(
        description="The customer's phone number (the number they are calling from unless "
        "they give another)."
    )
    service: str = Field(
        min_length=2, max_length=200, description="What the appointment is for, e.g. 'cleaning'."
    )
    starts_at: datetime = Field(
        description="Start in the business's local time, ISO 8601 without offset, e.g. "
        "2025-03-04T14:30. Must be a time check_availability reported free."
    )
    notes: str | None = Field(
        None, max_length=1000, description="Anything the team should know beforehand."
    )

    @field_validator("starts_at")
    @classmethod
    def _local_wall_clock(cls, value: datetime) -> datetime:
        # The confirmation question reads this time out; with an offset it would be read in
        # that offset's clock, not the business's, and the caller would agree to a wrong hour.
        if value.tzinfo is not None:
            raise ValueError("give the business's local time without a UTC offset or Z")
        return value


def _when(at: datetime) -> str:
    return f"{at:%A, %B} {at.day} at {spoken_time(at)}"


@tool(
    "book_appointment",
    args=BookAppointmentArgs,
    risk="medium",
    personas=RECEPTIONIST,
    summary=lambda a: (
        f"I'll book {a.service} for {a.name} on {_when(a.starts_at)}, "
        f"with {spoken_phone(a.phone)} as the contact number."
    ),
)
async def book_appointment(args: BookAppointmentArgs, ctx: ToolContext) -> dict[str, Any]:
    """Book an appointment at a free time (local time). Check availability first and repeat
    the day and time back to the caller."""
    zone = zone_of(ctx.profile)
    start = _local(args.starts_at, zone)
    problem = _date_problem(start.date(), datetime.now(zone).date())
    if problem:
        return {"status": "error", "message": problem}
    async with tenant_session(ctx.db, ctx.tenant) as session:
        await _lock_calendar(session, ctx.tenant)
        same = await session.scalar(
            select(Booking).where(
                Booking.customer_phone == args.phone,
                Booking.starts_at == start.astimezone(UTC),
                Booking.status != "cancelled",
            )
        )
        if same is not None:
            return {
                "status": "unchanged",
                "message": "That appointment is already booked.",
                "booking": booking_view(same, zone),
            }
        calendar = await _calendar(
            session, ctx, start.date(), start.date() + timedelta(days=LOOKAHEAD_DAYS)
        )
        why = calendar.why_not(start)
        if why is not None:
            return {
                "status": "error",
                "message": why,
                "alternatives": [moment(s, zone, calendar.now) for s in calendar.nearest(start)],
            }
        contact = await session.scalar(
            select(Contact).where(Contact.phone == args.phone).order_by(Contact.id).limit(1)
        )
        lead = await session.scalar(
            select(Lead).where(Lead.phone == args.phone).order_by(Lead.id.desc()).limit(1)
        )
        booking = Booking(
            customer_name=args.name.strip(),
            customer_phone=args.phone,
            service=args.service.strip(),
            starts_at=start,
            ends_at=start + calendar.length,
            status="confirmed",
            notes=args.notes,
            contact_id=contact.id if contact else None,
            lead_id=lead.id if lead else None,
            conversation_id=ctx.conversation_id,
        )
        session.add(booking)
        await session.flush()
        record_activity(
            session,
            ctx,
            "booking",
            f"Booked {booking.service} for {booking.customer_name}, {_when(start)}",
            booking_id=booking.id,
            contact_id=booking.contact_id,
            lead_id=booking.lead_id,
        )
        await session.commit()
    return {
        "status": "ok",
        "booking": booking_view(booking, zone),
        "message": f"Booked {booking.service} for {booking.customer_name} "
        f"{spoken_date(start.date(), calendar.now.date())} at {spoken_time(start)}.",
    }


# -- cancel_appointment ---------------------------------------------------------------------------


class CancelAppointmentArgs(BaseModel):
    booking_id: int | None = Field(
        None, ge=1, description="The booking's id, if an earlier result gave it."
    )
    phone: PhoneNumber | None = Field(
        None,
        description="The phone number the appointment was booked under. Omit if it is the "
        "number the caller is using.",
    )
    date: dt.date | None = Field(
        None, description="The appointment's local day (YYYY-MM-DD), if the caller has several."
    )


def _cancel_summary(args: CancelAppointmentArgs) -> str:
    what = f"appointment {args.booking_id}" if args.booking_id else "the appointment"
    if args.phone:
        what += f" booked under {spoken_phone(args.phone)}"
    if args.date:
        what += f" on {args.date:%A, %B} {args.date.day}"
    return f"I'll cancel {what}."


@tool(
    "cancel_appointment",
    args=CancelAppointmentArgs,
    risk="medium",
    personas=RECEPTIONIST,
    summary=_cancel_summary,
)
async def cancel_appointment(args: CancelAppointmentArgs, ctx: ToolContext) -> dict[str, Any]:
    """Cancel the caller's upcoming appointment, found by booking id or by the phone number
    it was booked under (and the day, if they have several)."""
    zone = zone_of(ctx.profile)
    now = datetime.now(UTC)
    # A caller may only cancel appointments booked under their own (or a stated) number.
    phones = {p for p in (args.phone, ctx.caller if is_textable(ctx.caller) else None) if p}
    if not phones:
        return {
            "status": "error",
            "message": "Ask for the phone number the appointment was booked under.",
        }
    async with tenant_session(ctx.db, ctx.tenant) as session:
        query = select(Booking).where(
            Booking.status != "cancelled",
            Booking.starts_at > now,
            Booking.customer_phone.in_(phones),
        )
        if args.booking_id is not None:
            query = query.where(Booking.id == args.booking_id)
        if args.date is not None:
            start, end = day_bounds(args.date, zone)
            query = query.where(Booking.starts_at >= start, Booking.starts_at < end)
        found = list(await session.scalars(query.order_by(Booking.starts_at).limit(10)))
        if not found:
            return {
                "status": "not_found",
                "message": "No upcoming appointment matches"
                + (f" booking {args.booking_id}" if args.booking_id else "")
                + f" under {' or '.join(sorted(spoken_phone(p) or p for p in phones))}"
                + (f" on {args.date:%A, %B} {args.date.day}" if args.date else "")
                + ". Check the number and day with the caller.",
            }
        if len(found) > 1:
            return {
                "status": "ambiguous",
                "message": "Several upcoming appointments match; ask which one and call "
                "again with its booking_id or date.",
                "bookings": [booking_view(b, zone) for b in found],
            }
        booking = found[0]
        booking.status = "cancelled"
        booking.cancelled_at = now
        record_activity(
            session,
            ctx,
            "cancellation",
            f"Cancelled by the caller: {booking.service} for {booking.customer_name}, "
            f"{_when(booking.starts_at.astimezone(zone))}",
            booking_id=booking.id,
            contact_id=booking.contact_id,
            lead_id=booking.lead_id,
        )
        await session.commit()
    return {
        "status": "ok",
        "booking": booking_view(booking, zone),
        "message": f"Cancelled {booking.service} on {_when(booking.starts_at.astimezone(zone))}.",
    }
