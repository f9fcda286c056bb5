"""Escalation and notifications on real calls: the keyword rules over the caller's transcript
text the owner once (even with the model's own `escalate` racing them), and a call that
captured a lead ends with the owner's summary text; all through the fake Twilio REST API."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from bridge.sim.caller import DEMO_SCRIPT
from bridge.sim.scenario import Scenario, call_tool, end, hear, say
from bridge.sim.twilio_rest import FakeTwilio, run_twilio_rest
from tests.e2e import (
    AUTH_TOKEN,
    BUSINESS_NUMBER,
    CALLER_NUMBER,
    call_stack,
    simulated_call,
)

ACCOUNT_SID = "AC" + "e" * 32
OWNER = "+15005550100"

FLOODING = Scenario(
    name="flooding",
    steps=(
        say("Thanks for calling, how can I help?"),
        hear("Help, the basement is flooding and there is water everywhere"),
        call_tool("escalate", {"category": "emergency", "summary": "Basement flooding now."}),
        say("I have alerted Dana, she will call you right back."),
        hear("Thank you"),
        say("Goodbye."),
        call_tool("end_call", {"reason": "escalated"}),
        end(),
    ),
)


@pytest.fixture
async def twilio() -> AsyncIterator[FakeTwilio]:
    async with run_twilio_rest(ACCOUNT_SID, AUTH_TOKEN) as fake:
        yield fake


async def _call(stack: Any) -> None:
    await simulated_call(stack, DEMO_SCRIPT)
    assert await stack.services.notifier.drain(20)


async def test_an_emergency_on_a_call_texts_the_owner_once(
    sqlite_url: str, twilio: FakeTwilio
) -> None:
    async with call_stack(
        FLOODING,
        database_url=sqlite_url,
        twilio_account_sid=ACCOUNT_SID,
        twilio_api_url=twilio.url,
    ) as stack:
        await _call(stack)
    to_owner = [m for m in twilio.messages if m.to == OWNER]
    assert len(to_owner) == 1, [m.body for m in twilio.messages]
    body = to_owner[0].body
    assert body.startswith("Acme Plumbing & Electric: EMERGENCY (call)")
    assert body.endswith("Call back: 500-555-0199")
    assert to_owner[0].from_ == BUSINESS_NUMBER


async def test_a_captured_lead_ends_with_the_owners_summary(
    sqlite_url: str, twilio: FakeTwilio
) -> None:
    async with call_stack(
        "demo",
        database_url=sqlite_url,
        twilio_account_sid=ACCOUNT_SID,
        twilio_api_url=twilio.url,
    ) as stack:
        await _call(stack)
    [summary] = [m for m in twilio.messages if m.to == OWNER]
    assert summary.body == (
        "Acme Plumbing & Electric: new lead from a call. Jamie Rivera: leaking kitchen sink at "
        "12 Elm Street (urgent). Call 555-555-0142."
    )
    assert [m for m in twilio.messages if m.to == CALLER_NUMBER] == []  # nothing left open
