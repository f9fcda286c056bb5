"""Tools that act on the conversation itself: hang up, alert the owner, hand over to a human.

They change no business records the caller has to approve, so they run at once
(`conversation_control=True`); what keeps them from being abused is built in: an escalation
alerts the owner once per category and conversation, and a transfer only ever goes to the
business's own owner number.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from tools.db.models import EscalationCategory
from tools.escalation import escalate_once
from tools.handlers.dispatch import PhoneNumber
from tools.registry import tool

if TYPE_CHECKING:
    from tools.context import ToolContext

CUSTOMER_FACING = {"dispatcher", "receptionist"}
EVERYONE_ON_CALLS = {"dispatcher", "receptionist", "crm_operator", "field_assistant"}


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
    result = await escalate_once(
        ctx, args.category, args.summary, callback_number=args.callback_number
    )
    if result.outcome == "already_escalated":
        return {
            "status": "already_escalated",
            "message": "The owner was already alerted about this in this conversation.",
        }
    if result.outcome == "notified":
        return {
            "status": "ok",
            "owner_notified": True,
            "message": f"{ctx.profile.owner_name} has been sent a text and will call back.",
        }
    return {
        "status": "recorded",
        "owner_notified": False,
        "message": f"Noted for {ctx.profile.owner_name}, but no text went out ({result.problem}). "
        "Tell the caller the team will see it and call back; do not promise an immediate call.",
    }


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
