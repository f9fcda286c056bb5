"""The dispatcher's tools: take down a job request, and text the caller a photo upload link."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator, BaseModel, Field
from sqlalchemy import func, select

from tools.db.models import Lead, Urgency
from tools.db.tenancy import tenant_session
from tools.handlers.bookings import moment, record_activity, zone_of
from tools.matching import spoken_phone
from tools.registry import tool
from tools.spool import LEAD as SPOOLED_LEAD
from tools.spool import SPOOL_KEY, Spool, is_store_outage

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    from prompts.profiles import BusinessProfile
    from tools.context import ToolContext

DISPATCHER = {"dispatcher"}
# A model stuck in a loop must not turn into a stream of texts to the caller.
MAX_PHOTO_TEXTS = 3
PHOTO_TEXTS_KEY = "sb:photos:{conversation}"
PHOTO_TEXTS_TTL_S = 24 * 3600

_PHONE_CHARS = re.compile(r"^\+?[\d\s().-]+$")


def normalize_phone(value: str) -> str:
    """A spoken or typed phone number as E.164: "(555) 123-4567" -> "+15551234567".

    Ten digits are taken as a North American number; other countries need their "+" prefix.
    """
    text = value.strip()
    if not _PHONE_CHARS.match(text):
        raise ValueError("a phone number may only hold digits, spaces, dashes, dots, brackets, +")
    digits = re.sub(r"\D", "", text)
    if text.startswith("+"):
        if not 8 <= len(digits) <= 15:
            raise ValueError("an international number has 8 to 15 digits after the +")
        return "+" + digits
    if len(digits) == 10:
        return "+1" + digits
    if len(digits) == 11 and digits.startswith("1"):
        return "+" + digits
    raise ValueError(
        "not a complete phone number: say all ten digits (e.g. 555-123-4567), "
        "or the full number with its country code after a +"
    )


PhoneNumber = Annotated[str, Field(max_length=40), AfterValidator(normalize_phone)]


def is_textable(number: str) -> bool:
    """Withheld or malformed caller ids ("anonymous", "") cannot be texted."""
    try:
        return normalize_phone(number) == number
    except ValueError:
        return False


async def conversation_lead(session: AsyncSession, ctx: ToolContext) -> Lead | None:
    """The newest lead taken in this conversation, if any."""
    query = (
        select(Lead)
        .where(Lead.conversation_id == ctx.conversation_id)
        .order_by(Lead.id.desc())
        .limit(1)
    )
    return await session.scalar(query)


# -- capture_lead -----------------------------------------------------------------------------


class CaptureLeadArgs(BaseModel):
    name: str = Field(
        min_length=1, max_length=200, description="The caller's name as they gave it."
    )
    job_type: str = Field(
        min_length=2,
        max_length=200,
        description="What needs doing, in a few words: 'burst pipe under kitchen sink', "
        "'outlet sparking in garage'.",
    )
    address: str = Field(
        min_length=3,
        max_length=500,
        description="Where the job is: street address and town, as the caller said it.",
    )
    urgency: Urgency = Field(
        description="emergency: danger or damage happening now (flooding, gas smell, sparks, "
        "no heat in freezing weather); urgent: needs someone within a day or two; routine: "
        "normal scheduling; flexible: whenever suits the business.",
    )
    callback_number: PhoneNumber | None = Field(
        None,
        description="Number to call back, if the caller gave one. Omit to use the number "
        "they are calling or texting from.",
    )
    notes: str | None = Field(
        None,
        max_length=2000,
        description="Anything else useful for the technician: access, pets, budget, "
        "best time to call, what they already tried.",
    )


def _capture_summary(args: CaptureLeadArgs) -> str:
    callback = (
        f", and we'll call you back on {spoken_phone(args.callback_number)}"
        if args.callback_number
        else ""
    )
    return (
        f"I'll pass this on: {args.job_type} at {args.address}, for {args.name}, "
        f"marked {args.urgency}{callback}."
    )


@tool(
    "capture_lead",
    args=CaptureLeadArgs,
    risk="low",
    personas=DISPATCHER,
    summary=_capture_summary,
)
async def capture_lead(args: CaptureLeadArgs, ctx: ToolContext) -> dict[str, Any]:
    """Write down the caller's job request for the team (a new lead). Use it once you know
    the name, what needs doing, where, and how urgent it is. Calling it again in the same
    conversation for the same job updates that request instead of adding another."""
    phone = args.callback_number or (ctx.caller if is_textable(ctx.caller) else None)
    try:
        lead, existing = await _store_lead(args, ctx, phone)
    except Exception as error:
        spool = ctx.extra.get(SPOOL_KEY)
        if not isinstance(spool, Spool) or not is_store_outage(error):
            raise
        return await _spool_lead(spool, args, ctx, phone)
    result: dict[str, Any] = {
        "status": "updated" if existing else "ok",
        "lead": _lead_view(lead, ctx),
        "callback_number": spoken_phone(lead.phone),
    }
    return result | _next_step(args, lead.phone)


async def _store_lead(
    args: CaptureLeadArgs, ctx: ToolContext, phone: str | None
) -> tuple[Lead, bool]:
    """Insert the lead, or update this conversation's lead for the same job; (lead, existed)."""
    source = "sms" if ctx.channel == "sms" else "voice"
    async with tenant_session(ctx.db, ctx.tenant) as session:
        existing = await session.scalar(
            select(Lead)
            .where(
                Lead.conversation_id == ctx.conversation_id,
                func.lower(Lead.job_type) == args.job_type.strip().lower(),
            )
            .limit(1)
        )
        lead = existing or Lead(conversation_id=ctx.conversation_id, source=source)
        lead.name = args.name.strip()
        lead.job_type = args.job_type.strip()
        lead.address = args.address.strip()
        lead.urgency = args.urgency
        lead.phone = phone or lead.phone
        lead.notes = args.notes or lead.notes
        if existing is None:
            session.add(lead)
        await session.flush()
        verb = "updated" if existing else "captured"
        record_activity(
            session,
            ctx,
            "lead_captured" if existing is None else "note",
            f"Lead {verb} by phone assistant: {lead.job_type} at {lead.address} ({lead.urgency})",
            lead_id=lead.id,
            data={"channel": ctx.channel, "caller": ctx.caller},
        )
        await session.commit()
    return lead, existing is not None


def _next_step(args: CaptureLeadArgs, phone: str | None) -> dict[str, str]:
    if phone is None:
        return {"next": "No callback number: ask the caller for one and capture again."}
    if args.urgency == "emergency":
        return {
            "next": "This is an emergency: also call escalate with category 'emergency' so "
            "the owner is alerted now."
        }
    return {}


async def _spool_lead(
    spool: Spool, args: CaptureLeadArgs, ctx: ToolContext, phone: str | None
) -> dict[str, Any]:
    """The database is unreachable: keep the lead on local disk until it is back.

    It has no database id yet; the spool entry's tail is its reference. The replay goes through
    `_store_lead` again, whose upsert on (conversation, job type) makes replays idempotent.
    """
    entry = await spool.put(
        SPOOLED_LEAD,
        {
            "tenant": ctx.tenant,
            "conversation_id": ctx.conversation_id,
            "channel": ctx.channel,
            "caller": ctx.caller,
            "persona": ctx.persona,
            "arguments": args.model_dump(mode="json"),
        },
    )
    view = {
        "id": None,
        "reference": entry[-8:],
        "name": args.name.strip(),
        "job": args.job_type.strip(),
        "address": args.address.strip(),
        "urgency": args.urgency,
        "status": "new",
    }
    return {
        "status": "ok",
        "saved": "queued",
        "lead": view,
        "callback_number": spoken_phone(phone),
        "message": "Taken down; it reaches the team's records as soon as they are reachable.",
    } | _next_step(args, phone)


async def replay_spooled_lead(
    payload: dict[str, Any],
    *,
    db: async_sessionmaker[AsyncSession],
    kv: Redis,
    profile: BusinessProfile,
) -> None:
    """Write a lead `_spool_lead` kept while the database was down (the spool's flusher)."""
    from tools.context import ToolContext
    from tools.conversation import ConversationLog

    conversation_id = str(payload["conversation_id"])
    ctx = ToolContext(
        tenant=str(payload["tenant"]),
        profile=profile,
        channel=payload.get("channel", "voice"),
        conversation_id=conversation_id,
        caller=str(payload.get("caller", "")),
        persona=str(payload.get("persona", "dispatcher")),
        db=db,
        kv=kv,
        conversation=ConversationLog(kv, conversation_id),
    )
    args = CaptureLeadArgs.model_validate(payload["arguments"])
    phone = args.callback_number or (ctx.caller if is_textable(ctx.caller) else None)
    await _store_lead(args, ctx, phone)


def _lead_view(lead: Lead, ctx: ToolContext) -> dict[str, Any]:
    return {
        "id": lead.id,
        "name": lead.name,
        "job": lead.job_type,
        "address": lead.address,
        "urgency": lead.urgency,
        "status": lead.status,
        "created": moment(lead.created_at, zone_of(ctx.profile)),
    }


# -- request_photos -----------------------------------------------------------------------------


class RequestPhotosArgs(BaseModel):
    what: str | None = Field(
        None,
        max_length=200,
        description="What the photos should show, e.g. 'the leak and the pipe under the sink'.",
    )


@tool(
    "request_photos",
    args=RequestPhotosArgs,
    risk="low",
    personas=DISPATCHER,
    conversation_control=True,
)
async def request_photos(args: RequestPhotosArgs, ctx: ToolContext) -> dict[str, Any]:
    """Text the caller a link where they can upload photos of the problem (only to the
    number they are calling from). Offer it when photos would help price or plan the job."""
    link = ctx.profile.photo_upload_url
    if not link:
        return {
            "status": "unavailable",
            "message": "This business has no photo upload link. Ask the caller to describe "
            "the problem instead.",
        }
    body = f"{ctx.profile.name}: please upload photos" + (
        f" of {args.what.strip()}" if args.what else " of the job"
    )
    body += f" here: {link}"
    if ctx.channel == "sms":
        # Already texting: the link goes in the reply itself rather than in a second message.
        await _record_photo_request(ctx, body, sent=False)
        return {"status": "ok", "link": link, "message": "Put this link in your reply."}
    if not is_textable(ctx.caller):
        return {
            "status": "error",
            "message": "The caller's number is withheld, so no text can be sent. Read the "
            f"link out instead: {link}",
        }
    key = PHOTO_TEXTS_KEY.format(conversation=ctx.conversation_id)
    sent_before = int(await ctx.kv.incr(key))
    await ctx.kv.expire(key, PHOTO_TEXTS_TTL_S)
    if sent_before > MAX_PHOTO_TEXTS:
        return {
            "status": "refused",
            "message": f"The link was already texted {MAX_PHOTO_TEXTS} times in this "
            "conversation. Read it out instead.",
            "link": link,
        }
    if ctx.notifier is None:
        await _record_photo_request(ctx, body, sent=False)
        return {
            "status": "recorded",
            "message": "Texting is not set up here; the request is noted for the team. "
            "Read the link out if the caller wants it now.",
            "link": link,
        }
    try:
        await ctx.notifier.send_sms(ctx.tenant, ctx.caller, body, reason="photo_link")
    except Exception as error:  # a failed text must not end the conversation
        await _record_photo_request(ctx, body, sent=False, error=repr(error))
        return {
            "status": "error",
            "message": "The text could not be sent. Read the link out instead.",
            "link": link,
        }
    await _record_photo_request(ctx, body, sent=True)
    return {
        "status": "ok",
        "sent_to": spoken_phone(ctx.caller),
        "message": "Photo link texted to the caller.",
    }


async def _record_photo_request(
    ctx: ToolContext, body: str, *, sent: bool, error: str | None = None
) -> None:
    async with tenant_session(ctx.db, ctx.tenant) as session:
        lead = await conversation_lead(session, ctx)
        record_activity(
            session,
            ctx,
            "photo_request",
            "Photo upload link " + ("texted to " if sent else "offered to ") + ctx.caller,
            lead_id=lead.id if lead else None,
            data={"text": body, "sent": sent, "channel": ctx.channel}
            | ({"error": error} if error else {}),
        )
        await session.commit()
