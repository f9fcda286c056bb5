"""The calendar: bookings, blocked days, free slots; and time as the CRM tools speak it.

Times are stored in UTC and always presented in the business's own timezone, both as ISO
(for the model to reason with) and as a phrase it can say ("tomorrow at 2:30 PM"). The other
handler modules use `moment()`/`spoken_date()` from here so every tool speaks time alike, and
`record_activity()` to put a dated entry on the timeline; this module imports no other
handler module, so they all can import it.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any, get_args
from zoneinfo import ZoneInfo

from pydantic import BaseModel, Field
from sqlalchemy import delete, func, select

from prompts.profiles import BusinessProfile, Weekday
from tools.db.models import (
    Activity,
    ActivityKind,
    AvailabilityRule,
    BlockedDate,
    Booking,
    BookingStatus,
)
from tools.db.tenancy import tenant_session
from tools.matching import Candidate, label, resolve, search, spoken_phone, unresolved_reply
from tools.registry import tool

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from tools.context import ToolContext

CRM = {"crm_operator"}
MAX_ITEMS = 20
WEEKDAYS: tuple[Weekday, ...] = get_args(Weekday)
# A booking the caller refers to is one that has not long passed: today's earlier
# appointments still count (confirming this morning's visit after the fact is normal).
REFERENCE_LOOKBACK = timedelta(hours=12)


# -- speaking about time ---------------------------------------------------------------------


def zone_of(profile: BusinessProfile) -> ZoneInfo:
    return ZoneInfo(profile.timezone)


def local_now(ctx: ToolContext) -> datetime:
    return datetime.now(zone_of(ctx.profile))


def spoken_time(at: datetime) -> str:
    """ "2 PM", "2:30 PM", "12 PM" (noon)."""
    hour = at.hour % 12 or 12
    suffix = "AM" if at.hour < 12 else "PM"
    return f"{hour} {suffix}" if at.minute == 0 else f"{hour}:{at.minute:02d} {suffix}"


def spoken_date(day: date, today: date) -> str:
    """ "today", "tomorrow", "yesterday", else "Tuesday, March 4" (with the year if another)."""
    offset = (day - today).days
    if offset == 0:
        return "today"
    if offset == 1:
        return "tomorrow"
    if offset == -1:
        return "yesterday"
    text = f"{day:%A}, {day:%B} {day.day}"
    return text if day.year == today.year else f"{text}, {day.year}"


def moment(
    at: datetime | None, zone: ZoneInfo, now: datetime | None = None
) -> dict[str, str] | None:
    """An instant as the model should see it: local ISO plus a phrase to say."""
    if at is None:
        return None
    local = at.astimezone(zone)
    today = (now or datetime.now(zone)).astimezone(zone).date()
    return {
        "iso": local.isoformat(timespec="minutes"),
        "spoken": f"{spoken_date(local.date(), today)} at {spoken_time(local)}",
    }


def day_info(day: date, zone: ZoneInfo, now: datetime | None = None) -> dict[str, str]:
    today = (now or datetime.now(zone)).astimezone(zone).date()
    return {"iso": day.isoformat(), "spoken": spoken_date(day, today)}


def day_bounds(day: date, zone: ZoneInfo) -> tuple[datetime, datetime]:
    """The UTC instants where a local day starts and ends (23 or 25 hours long across DST)."""
    start = datetime.combine(day, time(0), tzinfo=zone)
    end = datetime.combine(day + timedelta(days=1), time(0), tzinfo=zone)
    return start.astimezone(UTC), end.astimezone(UTC)


# -- the timeline -----------------------------------------------------------------------------


def actor(ctx: ToolContext) -> str:
    """Who did it, as the timeline records it: the assistant persona acting for the caller."""
    return f"ai:{ctx.persona}"


def record_activity(
    session: AsyncSession,
    ctx: ToolContext,
    kind: ActivityKind,
    body: str,
    *,
    data: dict[str, Any] | None = None,
    **links: int | None,
) -> Activity:
    """Append a timeline entry for a write, in the same transaction as the write itself."""
    entry = Activity(
        kind=kind,
        body=body,
        actor=actor(ctx),
        conversation_id=ctx.conversation_id,
        data=data or {},
        **links,
    )
    session.add(entry)
    return entry


# -- free slots (pure) -----------------------------------------------------------------------


def opening_windows(
    day: date, rules: list[tuple[str, time, time]], profile: BusinessProfile
) -> list[tuple[time, time]]:
    """Bookable windows on `day`: the weekday's availability rules if any, else opening hours."""
    weekday = WEEKDAYS[day.weekday()]
    ruled = sorted((opens, closes) for day_name, opens, closes in rules if day_name == weekday)
    if ruled:
        return ruled
    hours = profile.hours.get(weekday)
    return [(hours.opens, hours.closes)] if hours is not None else []


def free_slots(
    day: date,
    windows: list[tuple[time, time]],
    busy: list[tuple[datetime, datetime]],
    *,
    zone: ZoneInfo,
    length: timedelta,
    step: timedelta,
    not_before: datetime,
) -> list[datetime]:
    """Start times (aware, local) of appointments of `length` that fit a window, overlap no
    busy interval and do not start before `not_before`."""
    slots: list[datetime] = []
    for opens, closes in windows:
        start = datetime.combine(day, opens, tzinfo=zone)
        close = datetime.combine(day, closes, tzinfo=zone)
        while start + length <= close:
            end = start + length
            clash = any(b_start < end and start < b_end for b_start, b_end in busy)
            if start >= not_before and not clash:
                slots.append(start)
            start += step
    return slots


# -- references --------------------------------------------------------------------------------


def booking_label(booking: Booking, zone: ZoneInfo) -> str:
    when = moment(booking.starts_at, zone)
    assert when is not None
    return label(booking.customer_name, booking.service, when["spoken"], booking.status)


def booking_view(booking: Booking, zone: ZoneInfo) -> dict[str, Any]:
    return {
        "id": booking.id,
        "label": booking_label(booking, zone),
        "customer": booking.customer_name,
        "phone": spoken_phone(booking.customer_phone),
        "service": booking.service,
        "starts": moment(booking.starts_at, zone),
        "ends": moment(booking.ends_at, zone),
        "status": booking.status,
    }


async def resolve_booking(
    session: AsyncSession, ctx: ToolContext, reference: str, on: date | None
) -> Booking | dict[str, Any]:
    """The live booking a caller means, by id, customer name, service or phone (optionally
    narrowed to a local day), or the ambiguous/not-found reply to give instead."""
    zone = zone_of(ctx.profile)
    query = select(Booking).where(Booking.status != "cancelled")
    if reference.strip().isdigit():
        by_id = await session.scalar(select(Booking).where(Booking.id == int(reference)))
        if by_id is not None:
            return by_id
    if on is not None:
        start, end = day_bounds(on, zone)
        query = query.where(Booking.starts_at >= start, Booking.starts_at < end)
    else:
        query = query.where(Booking.starts_at >= datetime.now(UTC) - REFERENCE_LOOKBACK)
    rows = list(await session.scalars(query.order_by(Booking.starts_at).limit(500)))
    candidates = [
        Candidate(
            b.id,
            booking_label(b, zone),
            (b.customer_name, b.service),
            (b.customer_phone,) if b.customer_phone else (),
        )
        for b in rows
    ]
    resolution = resolve(reference, candidates)
    if resolution.status != "found":
        return unresolved_reply(resolution, kind="booking", reference=reference)
    return next(b for b in rows if b.id == resolution.key)


def listing(items: list[dict[str, Any]], total: int, noun: str) -> dict[str, Any]:
    return {"status": "ok", "total": total, noun: items, "more": max(0, total - len(items))}


# -- reads -----------------------------------------------------------------------------------------


class NoArgs(BaseModel):
    pass


class UpcomingArgs(BaseModel):
    days: int = Field(7, ge=1, le=90, description="How many days ahead, starting today.")
    limit: int = Field(5, ge=1, le=MAX_ITEMS, description="At most this many bookings.")


class ListBookingsArgs(BaseModel):
    status: BookingStatus | None = Field(None, description="Only bookings in this status.")
    start_date: date | None = Field(None, description="First local day (default: today).")
    end_date: date | None = Field(
        None, description="Last local day, inclusive (default: +30 days)."
    )
    customer: str | None = Field(None, max_length=120, description="Customer name or phone.")
    limit: int = Field(5, ge=1, le=MAX_ITEMS)


class AvailabilityArgs(BaseModel):
    day: date | None = Field(None, description="First local day to check (default: today).")
    days: int = Field(3, ge=1, le=14, description="How many days to check from `day`.")
    per_day: int = Field(4, ge=1, le=12, description="At most this many free slots per day.")


class SummaryArgs(BaseModel):
    days: int = Field(7, ge=1, le=90, description="Period starting today, in days.")


async def _bookings_between(
    session: AsyncSession, start: datetime, end: datetime, status: str | None = None
) -> tuple[list[Booking], int]:
    where = [Booking.starts_at >= start, Booking.starts_at < end]
    if status is None:
        where.append(Booking.status != "cancelled")
    else:
        where.append(Booking.status == status)
    total = await session.scalar(select(func.count()).select_from(Booking).where(*where)) or 0
    rows = await session.scalars(select(Booking).where(*where).order_by(Booking.starts_at))
    return list(rows), total


@tool("get_todays_bookings", args=NoArgs, risk="read", personas=CRM)
async def get_todays_bookings(args: NoArgs, ctx: ToolContext) -> dict[str, Any]:
    """Today's appointments (local time), earliest first, cancelled ones left out."""
    zone = zone_of(ctx.profile)
    today = local_now(ctx).date()
    async with tenant_session(ctx.db, ctx.tenant) as session:
        start, end = day_bounds(today, zone)
        rows, total = await _bookings_between(session, start, end)
    items = [booking_view(b, zone) for b in rows[:MAX_ITEMS]]
    return {"day": day_info(today, zone), **listing(items, total, "bookings")}


@tool("get_upcoming_bookings", args=UpcomingArgs, risk="read", personas=CRM)
async def get_upcoming_bookings(args: UpcomingArgs, ctx: ToolContext) -> dict[str, Any]:
    """Appointments from now over the next few days, soonest first (cancelled left out)."""
    zone = zone_of(ctx.profile)
    now = local_now(ctx)
    _, end = day_bounds(now.date() + timedelta(days=args.days - 1), zone)
    async with tenant_session(ctx.db, ctx.tenant) as session:
        rows, total = await _bookings_between(session, now.astimezone(UTC), end)
    items = [booking_view(b, zone) for b in rows[: args.limit]]
    return {"through": day_info(now.date() + timedelta(days=args.days - 1), zone)} | listing(
        items, total, "bookings"
    )


@tool("list_bookings", args=ListBookingsArgs, risk="read", personas=CRM)
async def list_bookings(args: ListBookingsArgs, ctx: ToolContext) -> dict[str, Any]:
    """Bookings in a date range, optionally by status or customer (name or phone)."""
    zone = zone_of(ctx.profile)
    first = args.start_date or local_now(ctx).date()
    last = args.end_date or first + timedelta(days=30)
    if last < first:
        return {"status": "error", "message": "end_date is before start_date."}
    start, _ = day_bounds(first, zone)
    _, end = day_bounds(last, zone)
    async with tenant_session(ctx.db, ctx.tenant) as session:
        query = select(Booking).where(Booking.starts_at >= start, Booking.starts_at < end)
        if args.status is not None:
            query = query.where(Booking.status == args.status)
        rows = list(await session.scalars(query.order_by(Booking.starts_at).limit(2000)))
    if args.customer:
        candidates = [
            Candidate(b.id, b.customer_name, (b.customer_name,), (b.customer_phone or "",))
            for b in rows
        ]
        wanted = {s.candidate.key for s in search(args.customer, candidates)}
        rows = [b for b in rows if b.id in wanted]
    items = [booking_view(b, zone) for b in rows[: args.limit]]
    return {
        "from": day_info(first, zone),
        "to": day_info(last, zone),
        **listing(items, len(rows), "bookings"),
    }


@tool("get_availability", args=AvailabilityArgs, risk="read", personas=CRM)
async def get_availability(args: AvailabilityArgs, ctx: ToolContext) -> dict[str, Any]:
    """Free appointment slots per day (local time), honouring opening hours, availability
    rules, blocked days and existing bookings."""
    zone = zone_of(ctx.profile)
    now = local_now(ctx)
    first = args.day or now.date()
    last = first + timedelta(days=args.days - 1)
    length = timedelta(minutes=ctx.profile.appointment_minutes)
    step = min(length, timedelta(minutes=30))
    range_start, _ = day_bounds(first, zone)
    _, range_end = day_bounds(last, zone)
    async with tenant_session(ctx.db, ctx.tenant) as session:
        rules = [
            (r.weekday, r.opens, r.closes) for r in await session.scalars(select(AvailabilityRule))
        ]
        blocked = {
            b.date: b.reason
            for b in await session.scalars(
                select(BlockedDate).where(BlockedDate.date >= first, BlockedDate.date <= last)
            )
        }
        booked = [
            (b.starts_at, b.ends_at)
            for b in await session.scalars(
                select(Booking).where(
                    Booking.status != "cancelled",
                    Booking.starts_at < range_end,
                    Booking.ends_at > range_start,
                )
            )
        ]
    days: list[dict[str, Any]] = []
    for offset in range(args.days):
        day = first + timedelta(days=offset)
        entry: dict[str, Any] = {"day": day_info(day, zone, now)}
        if day in blocked:
            entry |= {"open": False, "why": f"blocked: {blocked[day] or 'no reason given'}"}
        elif not (windows := opening_windows(day, rules, ctx.profile)):
            entry |= {"open": False, "why": "closed"}
        else:
            slots = free_slots(
                day, windows, booked, zone=zone, length=length, step=step, not_before=now
            )
            entry |= {
                "open": True,
                "free_slots": len(slots),
                "slots": [moment(s, zone, now) for s in slots[: args.per_day]],
                "more": max(0, len(slots) - args.per_day),
            }
        days.append(entry)
    return {
        "status": "ok",
        "appointment_minutes": ctx.profile.appointment_minutes,
        "days": days,
    }


@tool("get_booking_summary", args=SummaryArgs, risk="read", personas=CRM)
async def get_booking_summary(args: SummaryArgs, ctx: ToolContext) -> dict[str, Any]:
    """Booking counts by status for a period starting today, the busiest day and the next
    appointment."""
    zone = zone_of(ctx.profile)
    now = local_now(ctx)
    start, _ = day_bounds(now.date(), zone)
    _, end = day_bounds(now.date() + timedelta(days=args.days - 1), zone)
    async with tenant_session(ctx.db, ctx.tenant) as session:
        rows = list(
            await session.scalars(
                select(Booking)
                .where(Booking.starts_at >= start, Booking.starts_at < end)
                .order_by(Booking.starts_at)
            )
        )
    by_status = Counter(b.status for b in rows)
    live = [b for b in rows if b.status != "cancelled"]
    per_day = Counter(b.starts_at.astimezone(zone).date() for b in live)
    busiest = max(per_day.items(), key=lambda item: (item[1], -item[0].toordinal()), default=None)
    upcoming = next((b for b in live if b.starts_at >= now), None)
    return {
        "status": "ok",
        "period_days": args.days,
        "total": len(rows),
        "by_status": {s: by_status.get(s, 0) for s in get_args(BookingStatus)},
        "today": per_day.get(now.date(), 0),
        "busiest_day": (
            {"day": day_info(busiest[0], zone, now), "bookings": busiest[1]} if busiest else None
        ),
        "next": booking_view(upcoming, zone) if upcoming else None,
    }


# -- writes ----------------------------------------------------------------------------------------


class BookingRefArgs(BaseModel):
    booking: str = Field(
        min_length=1,
        max_length=120,
        description="Booking id from an earlier result, or the customer's name or phone.",
    )
    on: date | None = Field(None, description="The booking's local day, to tell apart several.")


class CancelBookingArgs(BookingRefArgs):
    reason: str | None = Field(None, max_length=300, description="Why it is cancelled.")


class BlockDateArgs(BaseModel):
    day: date = Field(description="Local day to block for bookings.")
    reason: str | None = Field(None, max_length=200, description="Holiday, vacation...")


class UnblockDateArgs(BaseModel):
    day: date = Field(description="Local day to open again for bookings.")


def _ref_phrase(args: BookingRefArgs) -> str:
    ref = f"booking {args.booking}" if args.booking.isdigit() else f"{args.booking}'s booking"
    return ref + (f" on {args.on:%A, %B} {args.on.day}" if args.on else "")


def _spoken_day(day: date) -> str:
    return f"{day:%A, %B} {day.day}"


@tool(
    "confirm_booking",
    args=BookingRefArgs,
    risk="medium",
    personas=CRM,
    summary=lambda a: f"I'll mark {_ref_phrase(a)} as confirmed.",
)
async def confirm_booking(args: BookingRefArgs, ctx: ToolContext) -> dict[str, Any]:
    """Confirm a pending booking, found by id or by customer name/phone."""
    zone = zone_of(ctx.profile)
    async with tenant_session(ctx.db, ctx.tenant) as session:
        booking = await resolve_booking(session, ctx, args.booking, args.on)
        if isinstance(booking, dict):
            return booking
        if booking.status != "pending":
            return {
                "status": "unchanged",
                "message": f"That booking is already {booking.status}.",
                "booking": booking_view(booking, zone),
            }
        booking.status = "confirmed"
        record_activity(
            session,
            ctx,
            "booking",
            f"Booking confirmed: {booking_label(booking, zone)}",
            booking_id=booking.id,
            lead_id=booking.lead_id,
            contact_id=booking.contact_id,
        )
        await session.commit()
    return {"status": "ok", "booking": booking_view(booking, zone)}


@tool(
    "cancel_booking",
    args=CancelBookingArgs,
    risk="high",
    personas=CRM,
    summary=lambda a: f"I'll cancel {_ref_phrase(a)}.",
)
async def cancel_booking(args: CancelBookingArgs, ctx: ToolContext) -> dict[str, Any]:
    """Cancel a booking (frees the slot), found by id or by customer name/phone."""
    zone = zone_of(ctx.profile)
    async with tenant_session(ctx.db, ctx.tenant) as session:
        booking = await resolve_booking(session, ctx, args.booking, args.on)
        if isinstance(booking, dict):
            return booking
        if booking.status == "cancelled":
            return {
                "status": "unchanged",
                "message": "That booking was already cancelled.",
                "booking": booking_view(booking, zone),
            }
        booking.status = "cancelled"
        booking.cancelled_at = datetime.now(UTC)
        if args.reason:
            booking.notes = "\n".join(filter(None, [booking.notes, f"Cancelled: {args.reason}"]))
        record_activity(
            session,
            ctx,
            "cancellation",
            f"Booking cancelled: {booking_label(booking, zone)}"
            + (f" ({args.reason})" if args.reason else ""),
            booking_id=booking.id,
            lead_id=booking.lead_id,
            contact_id=booking.contact_id,
        )
        await session.commit()
    return {"status": "ok", "booking": booking_view(booking, zone)}


@tool(
    "block_date",
    args=BlockDateArgs,
    risk="medium",
    personas=CRM,
    summary=lambda a: f"I'll block {_spoken_day(a.day)} so nothing can be booked that day.",
)
async def block_date(args: BlockDateArgs, ctx: ToolContext) -> dict[str, Any]:
    """Block a whole local day for bookings (holiday, vacation). Existing bookings that day
    are kept and reported so the caller can decide about them."""
    zone = zone_of(ctx.profile)
    start, end = day_bounds(args.day, zone)
    async with tenant_session(ctx.db, ctx.tenant) as session:
        existing = await session.scalar(select(BlockedDate).where(BlockedDate.date == args.day))
        if existing is None:
            session.add(BlockedDate(date=args.day, reason=args.reason))
            record_activity(
                session,
                ctx,
                "note",
                f"Blocked {args.day.isoformat()} for bookings"
                + (f": {args.reason}" if args.reason else ""),
            )
        clashes, total = await _bookings_between(session, start, end)
        await session.commit()
    return {
        "status": "unchanged" if existing is not None else "ok",
        "day": day_info(args.day, zone),
        "message": "That day was already blocked." if existing is not None else "Day blocked.",
        "bookings_that_day": total,
        "bookings": [booking_view(b, zone) for b in clashes[:MAX_ITEMS]],
    }


@tool(
    "unblock_date",
    args=UnblockDateArgs,
    risk="medium",
    personas=CRM,
    summary=lambda a: f"I'll open {_spoken_day(a.day)} for bookings again.",
)
async def unblock_date(args: UnblockDateArgs, ctx: ToolContext) -> dict[str, Any]:
    """Open a previously blocked local day for bookings again."""
    zone = zone_of(ctx.profile)
    async with tenant_session(ctx.db, ctx.tenant) as session:
        result = await session.execute(delete(BlockedDate).where(BlockedDate.date == args.day))
        removed = result.rowcount or 0
        if removed:
            record_activity(session, ctx, "note", f"Unblocked {args.day.isoformat()} for bookings")
        await session.commit()
    return {
        "status": "ok" if removed else "unchanged",
        "day": day_info(args.day, zone),
        "message": "Day open for bookings again." if removed else "That day was not blocked.",
    }
