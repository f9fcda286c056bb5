"""Tools that act on the conversation itself: hang up, alert the owner, hand over to a human.

They change no business records the caller has to approve, so they run at once
(`conversation_control=True`); what keeps them from being abused is built in: an escalation
alerts the owner once per category and conversation, and a transfer only ever goes to the
business's own owner number.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from tools.db.models import Escalation, EscalationCategory
from tools.db.tenancy import tenant_session
from tools.handlers.bookings import record_activity
from tools.handlers.dispatch import PhoneNumber, conversation_lead
from tools.matching import spoken_phone
from tools.registry import tool

if TYPE_CHECKING:
    from tools.context import ToolContext

CUSTOMER_FACING = {"dispatcher", "receptionist"}
EVERYONE_ON_CALLS = {"dispatcher", "receptionist", "crm_operator", "field_assistant"}
SMS_LIMIT = 320  # two SMS segments: enough for an alert, cheap to send

CATEGORY_WORDS: dict[str, str] = {
    "budget_over_limit": "budget over limit",
    "full_remodel": "full remodel",
    "angry_customer": "upset customer",
    "asked_for_owner": "asked for the owner",
    "complex_electrical": "complex electrical job",
    "complex_plumbing": "complex plumbing job",
    "emergency": "EMERGENCY",
    "other": "needs attention",
}


def _not_on_a_call(ctx: ToolContext, what: str) -> dict[str, Any] | None:
    if ctx.channel == "voice" and ctx.call is not None:
        return None
    where = (
        "This is a text conversation, not a phone call"
        if ctx.channel == "sms"
        else "This call cannot be controlled from here"
    )
    return {"status": "not_on_call", "message": f"{where}, so there is nothing to {what}."}


# -- end_call -----------------------------------------------------------------------------------


class EndCallArgs(BaseModel):
    reason: str | None = Field(
        None, max_length=200, description="Why the call is ending, for the call record."
    )


@tool(
    "end_call",
    args=EndCallArgs,
    risk="read",
    personas=EVERYONE_ON_CALLS,
    conversation_control=True,
)
async def end_call(args: EndCallArgs, ctx: ToolContext) -> dict[str, Any]:
    """Hang up once the conversation is finished and you have said goodbye (your goodbye
    finishes playing first). Never use it while the caller still needs something."""
    refusal = _not_on_a_call(ctx, "hang up; just say goodbye")
    if refusal is not None:
        return refusal
    assert ctx.call is not None
    await ctx.call.hang_up()
    return {"status": "ending"}


# -- escalate -----------------------------------------------------------------------------------


class EscalateArgs(BaseModel):
    category: EscalationCategory = Field(
        description="Why the owner must know: budget_over_limit (budget above what you may "
        "quote), full_remodel, angry_customer, asked_for_owner (caller insists on the owner), "
        "complex_electrical, complex_plumbing, emergency (danger or damage right now), other."
    )
    summary: str = Field(
        min_length=5,
        max_length=500,
        description="One or two sentences for the owner's phone: who, what, where, how urgent.",
    )
    callback_number: PhoneNumber | None = Field(
        None,
        description="Number the owner should call back, if not the one the caller is using.",
    )


@tool(
    "escalate",
    args=EscalateArgs,
    risk="medium",
    personas=CUSTOMER_FACING,
    conversation_control=True,
)
async def escalate(args: EscalateArgs, ctx: ToolContext) -> dict[str, Any]:
    """Alert the owner by text about this conversation (once per category). Use it for
    emergencies, upset callers, callers who insist on the owner, and jobs beyond what you may
    handle. Tell the caller the owner has been told and will call back."""
    callback = args.callback_number or ctx.caller
    async with tenant_session(ctx.db, ctx.tenant) as session:
        escalation = await session.scalar(
            select(Escalation).where(
                Escalation.conversation_id == ctx.conversation_id,
                Escalation.category == args.category,
            )
        )
        if escalation is not None and escalation.notified_at is not None:
            return {
                "status": "already_escalated",
                "message": "The owner was already alerted about this in this conversation.",
            }
        if escalation is None:
            escalation = Escalation(
                conversation_id=ctx.conversation_id,
                channel=ctx.channel,
                caller=ctx.caller,
                category=args.category,
                summary=args.summary.strip(),
                callback_number=callback,
            )
            session.add(escalation)
            lead = await conversation_lead(session, ctx)
            record_activity(
                session,
                ctx,
                "escalation",
                f"Escalated ({CATEGORY_WORDS[args.category]}): {args.summary.strip()}",
                lead_id=lead.id if lead else None,
                data={"category": args.category, "callback": callback},
            )
            try:
                await session.commit()
            except IntegrityError:
                # The same escalation raced in from a parallel tool call; it does the alerting.
                return {
                    "status": "already_escalated",
                    "message": "The owner was already alerted about this in this conversation.",
                }
        notified, problem = await _alert_owner(ctx, escalation)
        if notified:
            escalation.notified_at = datetime.now(UTC)
            await session.commit()
    if notified:
        return {
            "status": "ok",
            "owner_notified": True,
            "message": f"{ctx.profile.owner_name} has been sent a text and will call back.",
        }
    return {
        "status": "recorded",
        "owner_notified": False,
        "message": f"Noted for {ctx.profile.owner_name}, but no text went out ({problem}). "
        "Tell the caller the team will see it and call back; do not promise an immediate call.",
    }


async def _alert_owner(ctx: ToolContext, escalation: Escalation) -> tuple[bool, str]:
    """Text every owner number; (at least one text went out, why not otherwise)."""
    if not ctx.profile.escalation.notify_owner:
        return False, "owner alerts are switched off for this business"
    if not ctx.profile.owner_numbers:
        return False, "no owner number is configured"
    if ctx.notifier is None:
        return False, "texting is not set up"
    body = _alert_text(ctx, escalation)
    sent = 0
    for number in ctx.profile.owner_numbers:
        try:
            await ctx.notifier.send_sms(ctx.tenant, number, body, reason="escalation")
            sent += 1
        except Exception:  # one failed owner number must not stop the others
            continue
    return sent > 0, "sending the text failed"


def _alert_text(ctx: ToolContext, escalation: Escalation) -> str:
    via = "call" if escalation.channel == "voice" else "text"
    head = f"{ctx.profile.name}: {CATEGORY_WORDS[escalation.category]} ({via}). "
    tail = f" Call back: {spoken_phone(escalation.callback_number) or 'number withheld'}"
    room = SMS_LIMIT - len(head) - len(tail)
    summary = (
        escalation.summary
        if len(escalation.summary) <= room
        else (escalation.summary[: max(0, room - 1)] + "…")
    )
    return head + summary + tail


# -- transfer_to_human ----------------------------------------------------------------------------


class TransferArgs(BaseModel):
    reason: str | None = Field(
        None, max_length=200, description="Why the caller needs a person, for the call record."
    )


@tool(
    "transfer_to_human",
    args=TransferArgs,
    risk="low",
    personas={"receptionist"},
    conversation_control=True,
)
async def transfer_to_human(args: TransferArgs, ctx: ToolContext) -> dict[str, Any]:
    """Put the caller through to a person at the business. First tell the caller you are
    transferring them. Use it when they ask for a person or you cannot help."""
    refusal = _not_on_a_call(ctx, "transfer; offer to have someone call back (escalate)")
    if refusal is not None:
        return refusal
    if not ctx.profile.owner_numbers:
        return {
            "status": "unavailable",
            "message": "Nobody is available to take a transfer. Offer to have someone call "
            "back instead (escalate).",
        }
    assert ctx.call is not None
    number = ctx.profile.owner_numbers[0]
    try:
        await ctx.call.transfer(number)
    except Exception:
        return {
            "status": "error",
            "message": "The transfer did not go through. Apologise and offer a call back "
            "(escalate).",
        }
    return {"status": "transferring", "to": ctx.profile.owner_name}
