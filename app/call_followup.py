"""What happens around a call besides the call: escalation rules over what the caller says,
and the texts after it ends.

Both run in the notifier's background tasks, never in the call's own tasks: the rules must not
delay the audio, and a caller who hangs up right after saying "the basement is flooding" must
still get the owner alerted (the call's tasks are cancelled when it ends; these are not).

After a call (`follow_up_call`):

* every lead it captured goes to the lead webhook, and the owner gets one summary text
  (`[profile.escalation] lead_summary_text`);
* a proposal the caller never answered (the call ended first) is texted to them: "Reply YES
  to confirm"; their text answers it through the SMS channel, which shares the pending store.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from sqlalchemy import select

from app.sms_engine import fire_lead_webhook
from tools.confirmation import Party, is_phone_number
from tools.db.models import Lead
from tools.db.tenancy import tenant_session
from tools.escalation import SMS_LIMIT, apply_rules, detect
from tools.matching import spoken_phone
from tools.pending import PendingStore

if TYPE_CHECKING:
    from app.services import Services
    from bridge.call import CallSummary
    from tools.context import ToolContext

log = logging.getLogger("switchboard.followup")


async def caller_said(services: Services, ctx: ToolContext, text: str) -> None:
    """CallSession's `on_caller_said` hook: hand the escalation rules to the notifier.

    The owner calling their own line (e.g. to use the CRM operator) is not escalated to them.
    """
    profile = ctx.profile
    if ctx.caller in profile.owner_numbers or not detect(
        text, budget_limit=profile.escalation.budget_limit, owner_name=profile.owner_name
    ):
        return
    notifier = services.notifier
    spawn = getattr(notifier, "spawn", None)
    if spawn is None:
        await apply_rules(ctx, text)
        return
    spawn(apply_rules(ctx, text), "call escalation rules")


def follow_up_call(services: Services, ctx: ToolContext, summary: CallSummary) -> None:
    """Queue the after-call texts and webhooks (returns at once)."""
    spawn = getattr(services.notifier, "spawn", None)
    if spawn is not None:
        spawn(_follow_up(services, ctx, summary), f"follow-up {summary.call_sid}")


async def _follow_up(services: Services, ctx: ToolContext, summary: CallSummary) -> None:
    profile = ctx.profile
    async with tenant_session(services.db, ctx.tenant) as session:
        leads = list(
            await session.scalars(
                select(Lead).where(Lead.conversation_id == summary.call_sid).order_by(Lead.id)
            )
        )
    for lead in leads:
        await fire_lead_webhook(services.settings, services.db, profile, lead.id, channel="voice")
    notifier = services.notifier
    if notifier is None:
        return
    if leads and profile.escalation.lead_summary_text:
        body = lead_summary(profile.name, leads)
        for number in profile.owner_numbers:
            await notifier.send_sms(ctx.tenant, number, body, reason="lead_summary")
    if is_phone_number(summary.caller):
        party = Party(ctx.tenant, summary.call_sid, summary.caller)
        now = time.time()
        for action in await PendingStore(ctx.kv).open_for(party, now):
            minutes = max(1, int((action.expires_at - now) // 60))
            body = confirm_by_text(profile.name, action.summary, minutes)
            await notifier.send_sms(ctx.tenant, summary.caller, body, reason="confirm_request")


def lead_summary(business: str, leads: list[Lead]) -> str:
    """The owner's after-call text: one line per lead, within two SMS segments."""
    lines = [f"{business}: new lead{'s' if len(leads) > 1 else ''} from a call."]
    for lead in leads:
        callback = spoken_phone(lead.phone) or "no number"
        lines.append(
            f"{lead.name}: {lead.job_type} at {lead.address} ({lead.urgency}). Call {callback}."
        )
    text = " ".join(lines)
    return text if len(text) <= SMS_LIMIT else text[: SMS_LIMIT - 1] + "…"


def confirm_by_text(business: str, summary: str, minutes: int) -> str:
    tail = f" Reply YES to confirm or NO to cancel (within {minutes} min)."
    head = f"{business}: before we hung up: "
    room = SMS_LIMIT - len(head) - len(tail)
    line = summary if len(summary) <= room else summary[: room - 1] + "…"
    return head + line + tail
