"""The escalation matrix: the pure keyword/amount rules, the owner's text, and "once per
conversation and category" across the `escalate` tool and the rules (real SQL)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from prompts.profiles import load_profiles
from tools.context import Channel, ToolContext
from tools.db.models import Activity, Escalation, Lead
from tools.db.tenancy import tenant_session
from tools.escalation import SMS_LIMIT, alert_text, apply_rules, detect, money_amounts
from tools.registry import get_tool

Db = async_sessionmaker[AsyncSession]
PROFILES = load_profiles()
ACME = PROFILES.by_id("acme-plumbing")
CALLER = "+15555550142"
OWNER = "+15005550100"


@dataclass
class RecordingNotifier:
    sent: list[dict[str, str]] = field(default_factory=list)

    async def send_sms(self, tenant: str, to: str, body: str, *, reason: str) -> None:
        self.sent.append({"tenant": tenant, "to": to, "body": body, "reason": reason})


def make_ctx(
    db: Db,
    kv: Any,
    notifier: RecordingNotifier | None,
    *,
    channel: Channel = "voice",
    conversation_id: str = "CA" + "5" * 32,
) -> ToolContext:
    assert ACME is not None
    return ToolContext(
        tenant=ACME.id,
        profile=ACME,
        channel=channel,
        conversation_id=conversation_id,
        caller=CALLER,
        persona=ACME.persona,
        db=db,
        kv=kv,
        conversation=None,  # type: ignore[arg-type]  # escalations do not read the transcript
        notifier=notifier,
    )


# -- the rules (pure) ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "categories"),
    [
        ("The basement is flooding!", {"emergency"}),
        ("I smell gas in the kitchen", {"emergency"}),
        ("the outlet is sparking", {"emergency"}),
        ("We have no heat and it's freezing", {"emergency"}),
        ("It's not an emergency, whenever suits", set()),
        ("no rush, not urgent at all", set()),
        ("We want a full kitchen remodel", {"full_remodel"}),
        ("we're gutting the bathroom", {"full_remodel"}),
        ("This is ridiculous, third time you've missed us", {"angry_customer"}),
        ("I'll call my lawyer", {"angry_customer"}),
        ("Can I speak to the owner please", {"asked_for_owner"}),
        ("let me talk to a real person", {"asked_for_owner"}),
        ("I'd like to talk to Dana", {"asked_for_owner"}),
        ("We need a panel upgrade to 200 amp", {"complex_electrical"}),
        ("the whole house needs rewiring", {"complex_electrical"}),
        ("The sewer line is backed up", {"complex_plumbing"}),
        ("replace the water heater", {"complex_plumbing"}),
        ("Our budget is about $5,000", {"budget_over_limit"}),
        ("maybe 10 grand", {"budget_over_limit"}),
        ("we can spend 1500 dollars", set()),
        ("call me on 555 123 4567", set()),  # numbers are not money
        ("My tap drips a little", set()),
        ("Burst pipe! Water everywhere and I'm furious", {"emergency", "angry_customer"}),
    ],
)
def test_detect(text: str, categories: set[str]) -> None:
    found = detect(text, budget_limit=2000, owner_name="Dana")
    assert {t.category for t in found} == categories
    assert all(t.evidence for t in found)


def test_money_amounts() -> None:
    assert money_amounts("$2,500 or 3k, maybe 4 thousand, 700 dollars, $1.5k") == [
        2500.0,
        3000.0,
        4000.0,
        700.0,
        1500.0,
    ]
    assert money_amounts("call 555-0100 at 9") == []


def test_the_budget_limit_comes_from_the_profile() -> None:
    assert detect("about $3,000", budget_limit=5000) == []
    [trigger] = detect("about $6,000", budget_limit=5000)
    assert trigger.category == "budget_over_limit" and "$6,000" in trigger.evidence


def test_alert_text_names_who_what_callback_and_summary() -> None:
    assert ACME is not None
    text = alert_text(
        ACME,
        category="emergency",
        channel="sms",
        who="Ann Smith",
        summary="Basement flooding at 12 Elm St. " * 30,
        callback_number=CALLER,
    )
    assert len(text) <= SMS_LIMIT
    assert text.startswith("Acme Plumbing & Electric: EMERGENCY (text) from Ann Smith.")
    assert "Basement flooding" in text and text.endswith("Call back: 555-555-0142")
    withheld = alert_text(
        ACME, category="other", channel="voice", who="x", summary="s" * 10, callback_number=None
    )
    assert withheld.endswith("number withheld")


# -- once per conversation and category ----------------------------------------------------------


async def test_rules_and_the_tool_alert_the_owner_once(db: Db, fake_kv: Any) -> None:
    notifier = RecordingNotifier()
    ctx = make_ctx(db, fake_kv, notifier)
    assert await apply_rules(ctx, "Help, the basement is flooding!") == ["emergency"]
    assert await apply_rules(ctx, "It's still flooding, water everywhere") == []
    tool = get_tool("escalate")
    assert tool is not None
    args = tool.args.model_validate({"category": "emergency", "summary": "Flooding basement."})
    assert (await tool.handler(args, ctx))["status"] == "already_escalated"
    assert [(m["to"], m["reason"]) for m in notifier.sent] == [(OWNER, "escalation")]
    body = notifier.sent[0]["body"]
    assert "EMERGENCY (call)" in body and "flooding" in body and "555-555-0142" in body
    # Another category in the same conversation is a new alert.
    assert await apply_rules(ctx, "This is unacceptable!") == ["angry_customer"]
    assert len(notifier.sent) == 2
    async with tenant_session(db, "acme-plumbing") as session:
        rows = list(await session.scalars(select(Escalation).order_by(Escalation.id)))
        sources = [a.data["source"] for a in await session.scalars(select(Activity))]
    assert [(r.category, r.notified_at is not None) for r in rows] == [
        ("emergency", True),
        ("angry_customer", True),
    ]
    assert sources == ["rules", "rules"]


async def test_the_alert_names_the_lead_when_there_is_one(db: Db, fake_kv: Any) -> None:
    notifier = RecordingNotifier()
    ctx = make_ctx(
        db, fake_kv, notifier, channel="sms", conversation_id=f"sms:acme-plumbing:{CALLER}"
    )
    async with tenant_session(db, "acme-plumbing") as session:
        session.add(Lead(name="Ann Smith", phone=CALLER, conversation_id=ctx.conversation_id))
        await session.commit()
    assert await apply_rules(ctx, "I want to speak to the owner") == ["asked_for_owner"]
    assert "from Ann Smith" in notifier.sent[0]["body"]
    assert "(text)" in notifier.sent[0]["body"]


async def test_without_a_notifier_it_is_recorded_and_alerted_later(db: Db, fake_kv: Any) -> None:
    silent = make_ctx(db, fake_kv, None)
    assert await apply_rules(silent, "gas leak!") == []
    notifier = RecordingNotifier()
    assert await apply_rules(make_ctx(db, fake_kv, notifier), "still smells of gas") == [
        "emergency"
    ]
    assert len(notifier.sent) == 1


async def test_the_tool_and_the_rules_racing_text_once(db: Db, fake_kv: Any) -> None:
    notifier = RecordingNotifier()
    ctx = make_ctx(db, fake_kv, notifier, conversation_id="CA" + "9" * 32)
    tool = get_tool("escalate")
    assert tool is not None
    args = tool.args.model_validate({"category": "emergency", "summary": "Gas smell."})
    results = await asyncio.gather(
        tool.handler(args, ctx),
        apply_rules(ctx, "I smell gas!"),
        apply_rules(ctx, "gas leak in the kitchen"),
    )
    assert len(notifier.sent) == 1
    tool_status = results[0]["status"]
    rule_hits = results[1] + results[2]
    assert (tool_status == "ok") != (rule_hits == ["emergency"])  # exactly one of them texted
