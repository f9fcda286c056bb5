"""The escalation matrix: when the owner must hear about a conversation, and telling them once.

Two ways in, one way out:

* the model calls the `escalate` tool (tools/handlers/conversation.py), with its own summary;
* as a backstop for a model that misses it, `detect` runs keyword and amount rules over what
  callers say (voice transcripts) and text (SMS bodies), and `apply_rules` escalates what it
  finds.

Both end in `escalate_once`: one `Escalation` row per (tenant, conversation, category) — the
table's unique key — and one text to each owner number with who, what, the callback number
and a one-line summary. A second trigger of the same category in the same conversation, from
either path, is reported as `already_escalated` and texts nobody.

The rules (`detect`, pure; the documented matrix):

| category             | fires on                                                             |
|----------------------|----------------------------------------------------------------------|
| `budget_over_limit`  | a money amount above the profile's `budget_limit` ("$5,000", "8k",   |
|                      | "12 thousand dollars", "10 grand"); bare numbers are not money       |
| `full_remodel`       | "full/complete/total remodel|renovation", "gut the kitchen", "whole  |
|                      | kitchen/bathroom/house" remodel                                      |
| `angry_customer`     | "furious", "unacceptable", "ridiculous", "lawyer", "lawsuit", "sue   |
|                      | you", "worst service", "fed up", "angry", "scam", "rip(ped) off"     |
| `asked_for_owner`    | "speak/talk to the owner/manager/boss/a real person/a human", the    |
|                      | owner's name after speak/talk to                                     |
| `complex_electrical` | panel upgrade/replacement, rewiring, subpanel, service upgrade,      |
|                      | "200 amp", knob and tube, EV charger install, generator hookup       |
| `complex_plumbing`   | sewer/main line, repipe, gas line, water heater replacement/install, |
|                      | tankless, slab leak, septic                                          |
| `emergency`          | flooding, burst pipe, gas smell, sparks, smoke, fire, no heat, no    |
|                      | power, sewage backing up — unless negated ("not an emergency")       |
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from tools.db.models import Escalation, EscalationCategory
from tools.db.tenancy import tenant_session
from tools.matching import spoken_phone

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from prompts.profiles import BusinessProfile
    from tools.context import ToolContext

SMS_LIMIT = 320  # two SMS segments: enough for an alert, cheap to send
EVIDENCE_CHARS = 160

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


# -- the rules (pure) ----------------------------------------------------------------------------


def _words(*patterns: str) -> re.Pattern[str]:
    return re.compile(r"\b(?:" + "|".join(patterns) + r")\b", re.IGNORECASE)


_RULES: dict[EscalationCategory, re.Pattern[str]] = {
    "full_remodel": _words(
        r"(?:full|complete|total|entire|whole)[\s-]+(?:\w+\s+){0,2}(?:remodel\w*|renovat\w*|redo)",
        r"gut(?:ting|ted)?\s+(?:the\s+|my\s+|our\s+)?(?:kitchen|bath(?:room)?|house|home)",
        r"remodel\w*\s+(?:the\s+|my\s+|our\s+)?(?:whole|entire)\s+\w+",
    ),
    "angry_customer": _words(
        r"furious",
        r"unacceptable",
        r"ridiculous",
        r"outrageous",
        r"lawyer",
        r"lawsuit",
        r"sue\s+(?:you|your\s+company)",
        r"worst\s+(?:service|company|experience)",
        r"fed\s+up",
        r"(?:so|very|really|extremely)\s+(?:angry|upset|mad|pissed)",
        r"i'?m\s+(?:angry|livid|pissed)",
        r"scam(?:med)?",
        r"ripp?(?:ed)?\s+(?:me\s+)?off",
    ),
    "asked_for_owner": _words(
        r"(?:speak|talk|talking|speaking)\s+(?:to|with)\s+(?:the|your|a)\s+"
        r"(?:owner|manager|boss|supervisor|real\s+person|human|person\s+in\s+charge)",
        r"(?:put|get)\s+(?:me\s+)?(?:through\s+)?(?:to\s+)?(?:the|your)\s+(?:owner|manager|boss)",
        r"(?:is|where'?s)\s+the\s+owner",
    ),
    "complex_electrical": _words(
        r"(?:electrical\s+|breaker\s+|fuse\s+)?panel\s+(?:upgrade|replacement|swap|change)",
        r"(?:upgrade|replace)\s+(?:the\s+|my\s+|our\s+)?(?:electrical\s+|breaker\s+)?panel",
        r"re-?wir(?:e|ing)",
        r"sub-?panel",
        r"service\s+upgrade",
        r"[12]00\s*-?amp",
        r"knob\s+and\s+tube",
        r"(?:ev|car)\s+charger",
        r"generator\s+(?:hook-?up|install\w*|transfer)",
    ),
    "complex_plumbing": _words(
        r"sewer\s+(?:line|main|pipe)",
        r"main\s+(?:water\s+|sewer\s+)?line",
        r"re-?pip(?:e|ing)",
        r"gas\s+(?:line|pipe)",
        r"water\s+heater\s+(?:replace\w*|install\w*)",
        r"(?:replace|install|new)\s+(?:the\s+|a\s+|my\s+)?water\s+heater",
        r"tankless",
        r"slab\s+leak",
        r"septic",
    ),
    "emergency": _words(
        r"flood(?:ing|ed)?",
        r"burst\s+(?:pipe|pipes|water\s+line)",
        r"pipe\s+(?:burst|exploded)",
        r"(?:smell|smells|smelling)\s+(?:of\s+)?gas",
        r"gas\s+(?:smell|leak)",
        r"spark(?:s|ing)",
        r"smoke|smoking\s+outlet",
        r"(?:on\s+)?fire",
        r"burning\s+smell",
        r"no\s+(?:heat|power|electricity)",
        r"sewage\s+(?:backing\s+up|backup|everywhere)",
        r"water\s+(?:pouring|gushing|everywhere)",
        r"emergency",
    ),
}

_NEGATED_EMERGENCY = _words(
    r"(?:not|no|isn'?t|is\s+not|nothing)\s+(?:an?\s+|urgent\s+|of\s+an\s+)?(?:emergency|urgent)",
    r"no\s+rush",
)

# Money: "$5,000", "$5k", "5,000 dollars", "8k", "12 thousand (dollars)", "10 grand".
_MONEY = re.compile(
    r"(?P<dollar>\$)\s*(?P<n1>\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?)\s*(?P<m1>k|thousand|grand)?\b"
    r"|\b(?P<n2>\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?)\s*(?P<m2>k|thousand|grand)\b"
    r"|\b(?P<n3>\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?)\s*(?:dollars|bucks|usd)\b",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class Trigger:
    category: EscalationCategory
    evidence: str  # the words that fired it, for the owner's text and the audit trail


def money_amounts(text: str) -> list[float]:
    """Dollar amounts mentioned in `text` (bare numbers, like phone numbers, are not money)."""
    amounts = []
    for match in _MONEY.finditer(text):
        number = match["n1"] or match["n2"] or match["n3"]
        multiplier = match["m1"] or match["m2"]
        value = float(number.replace(",", ""))
        if multiplier:
            value *= 1000
        amounts.append(value)
    return amounts


def detect(text: str, *, budget_limit: float, owner_name: str | None = None) -> list[Trigger]:
    """Every escalation category `text` triggers, in the order of the matrix above."""
    found: list[Trigger] = []
    over = [a for a in money_amounts(text) if a > budget_limit]
    if over:
        found.append(Trigger("budget_over_limit", f"mentioned ${max(over):,.0f}"))
    for category, pattern in _RULES.items():
        match = pattern.search(text)
        if category == "asked_for_owner" and match is None and owner_name:
            match = _asked_for_by_name(text, owner_name)
        if match is None:
            continue
        if category == "emergency" and _NEGATED_EMERGENCY.search(text):
            remaining = _NEGATED_EMERGENCY.sub(" ", text)
            match = pattern.search(remaining)
            if match is None:
                continue
        found.append(Trigger(category, _quote(text)))
    return found


def _asked_for_by_name(text: str, owner_name: str) -> re.Match[str] | None:
    # "Dr. Patel" -> also "Patel"; "the owner" (the default name) is covered by the rule above.
    names = {owner_name.strip(), owner_name.strip().split()[-1]} - {"", "owner", "the owner"}
    if not names:
        return None
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    pattern = rf"\b(?:speak|talk|talking|speaking)\s+(?:to|with)\s+(?:{alternatives})\b"
    return re.search(pattern, text, re.IGNORECASE)


def _quote(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= EVIDENCE_CHARS else line[: EVIDENCE_CHARS - 1] + "…"


def alert_text(
    profile: BusinessProfile,
    *,
    category: str,
    channel: str,
    who: str,
    summary: str,
    callback_number: str | None,
) -> str:
    """The owner's text: business, what, how they reached us, who, summary, callback number."""
    via = "call" if channel == "voice" else "text"
    head = f"{profile.name}: {CATEGORY_WORDS.get(category, category)} ({via}) from {who}. "
    tail = f" Call back: {spoken_phone(callback_number) or 'number withheld'}"
    room = SMS_LIMIT - len(head) - len(tail)
    if room < 20:  # a very long business or caller name: keep the summary, shorten the rest
        head = f"{CATEGORY_WORDS.get(category, category)} ({via}). "
        room = SMS_LIMIT - len(head) - len(tail)
    line = " ".join(summary.split())
    body = line if len(line) <= room else line[: max(0, room - 1)] + "…"
    return head + body + tail


# -- telling the owner, once -----------------------------------------------------------------------

Outcome = Literal["notified", "already_escalated", "recorded"]


@dataclass(frozen=True, slots=True)
class EscalationResult:
    outcome: Outcome
    problem: str | None = None  # why no text went out, when outcome is "recorded"


async def escalate_once(
    ctx: ToolContext,
    category: EscalationCategory,
    summary: str,
    *,
    callback_number: str | None = None,
    source: str = "model",
) -> EscalationResult:
    """Record the escalation and text the owner, unless this conversation already did for
    `category`. An escalation recorded without a text (no notifier, every send failed) is
    retried by the next trigger of the same category."""
    from tools.handlers.bookings import record_activity
    from tools.handlers.dispatch import conversation_lead

    callback = callback_number or ctx.caller
    summary = summary.strip()
    async with tenant_session(ctx.db, ctx.tenant) as session:
        escalation = await session.scalar(
            select(Escalation).where(
                Escalation.conversation_id == ctx.conversation_id,
                Escalation.category == category,
            )
        )
        if escalation is not None and escalation.notified_at is not None:
            return EscalationResult("already_escalated")
        lead = await conversation_lead(session, ctx)
        if escalation is None:
            escalation = Escalation(
                conversation_id=ctx.conversation_id,
                channel=ctx.channel,
                caller=ctx.caller,
                category=category,
                summary=summary,
                callback_number=callback,
            )
            session.add(escalation)
            record_activity(
                session,
                ctx,
                "escalation",
                f"Escalated ({CATEGORY_WORDS[category]}): {summary}",
                lead_id=lead.id if lead else None,
                data={"category": category, "callback": callback, "source": source},
            )
            try:
                await session.commit()
            except IntegrityError:
                # The same escalation raced in (a parallel tool call, or the rules on another
                # replica); whoever inserted it does the alerting.
                return EscalationResult("already_escalated")
        # Claim the alert: of the tool and the rules (on any replica) racing for one
        # escalation, exactly one sees its UPDATE change the row, and only it texts.
        if not await _set_notified(session, escalation.id, datetime.now(UTC), unset=True):
            return EscalationResult("already_escalated")
        who = (lead.name if lead is not None and lead.name else None) or (
            spoken_phone(ctx.caller) or "a withheld number"
        )
        notified, problem = await _alert_owner(ctx, escalation, who)
        if not notified:  # give the claim back, so the next trigger tries again
            await _set_notified(session, escalation.id, None, unset=False)
    return EscalationResult("notified") if notified else EscalationResult("recorded", problem)


async def _set_notified(
    session: AsyncSession, escalation_id: int, value: datetime | None, *, unset: bool
) -> bool:
    """Set `notified_at` (only if still unset, with `unset`); True if the row changed."""
    statement = update(Escalation).where(Escalation.id == escalation_id)
    if unset:
        statement = statement.where(Escalation.notified_at.is_(None))
    result = await session.execute(
        statement.values(notified_at=value).execution_options(synchronize_session=False)
    )
    await session.commit()
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def _alert_owner(ctx: ToolContext, escalation: Escalation, who: str) -> tuple[bool, str]:
    """Text every owner number; (at least one text went out, why not otherwise)."""
    if not ctx.profile.escalation.notify_owner:
        return False, "owner alerts are switched off for this business"
    if not ctx.profile.owner_numbers:
        return False, "no owner number is configured"
    if ctx.notifier is None:
        return False, "texting is not set up"
    body = alert_text(
        ctx.profile,
        category=escalation.category,
        channel=escalation.channel,
        who=who,
        summary=escalation.summary,
        callback_number=escalation.callback_number,
    )
    sent = 0
    for number in ctx.profile.owner_numbers:
        try:
            await ctx.notifier.send_sms(ctx.tenant, number, body, reason="escalation")
            sent += 1
        except Exception:  # one failed owner number must not stop the others
            continue
    return sent > 0, "sending the text failed"


async def apply_rules(ctx: ToolContext, text: str) -> list[EscalationCategory]:
    """The backstop: escalate what `detect` finds in the caller's words; returns the
    categories that texted the owner just now (already escalated ones are skipped quietly)."""
    triggers = detect(
        text, budget_limit=ctx.profile.escalation.budget_limit, owner_name=ctx.profile.owner_name
    )
    notified: list[EscalationCategory] = []
    for trigger in triggers:
        said = "texted" if ctx.channel == "sms" else "said"
        summary = f"Flagged automatically; customer {said}: \u201c{trigger.evidence}\u201d"
        result = await escalate_once(ctx, trigger.category, summary, source="rules")
        if result.outcome == "notified":
            notified.append(trigger.category)
    return notified
