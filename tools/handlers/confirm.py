"""`confirm_action` and `cancel_action`: the caller's word on a proposed write.

To the registry these are plain `read` tools; the runner recognises them by name and runs the
protocol itself (`tools.runner`), so a confirmation always executes the *stored* action and
never arguments the model sends again. The handlers below only route a direct call (outside
the runner) back through it.

They are registered for every persona that has write tools. The runner also allows them to
any other persona that has a tool needing confirmation (a persona added later, or a test's).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, Field, StringConstraints

from tools.registry import tool

if TYPE_CHECKING:
    from tools.context import ToolContext

WRITER_PERSONAS = frozenset({"dispatcher", "receptionist", "crm_operator", "field_assistant"})

ConfirmationId = Annotated[
    str,
    StringConstraints(strip_whitespace=True, pattern=r"^[A-Za-z0-9_-]{1,64}$"),
    Field(description="The confirmation_id from the confirmation_required result."),
]


class ConfirmationArgs(BaseModel):
    confirmation_id: ConfirmationId


@tool("confirm_action", args=ConfirmationArgs, risk="read", personas=WRITER_PERSONAS)
async def confirm_action(args: ConfirmationArgs, ctx: ToolContext) -> dict[str, Any]:
    """Carry out an action you proposed, once the caller has agreed to it.

    Call this only after you read the proposal's summary to the caller and they said yes
    (for high-risk actions: an explicit yes such as "yes, go ahead"). The action runs exactly
    as proposed; to change anything, propose it again. If the result is "rejected", do what
    its message says: never tell the caller it was done.
    """
    from tools.runner import run  # the runner imports this module

    return await run("confirm_action", args.model_dump(), ctx)


@tool("cancel_action", args=ConfirmationArgs, risk="read", personas=WRITER_PERSONAS)
async def cancel_action(args: ConfirmationArgs, ctx: ToolContext) -> dict[str, Any]:
    """Drop an action you proposed, when the caller declines it or changes their mind."""
    from tools.runner import run  # the runner imports this module

    return await run("cancel_action", args.model_dump(), ctx)
