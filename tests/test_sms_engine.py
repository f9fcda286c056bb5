"""The sans-I/O parts of the SMS engine and webhook: history trimming, messages for the API,
round bounds, the proposals prompt, MMS parsing, and the after-call texts."""

from __future__ import annotations

import time
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from openai.types.chat import ChatCompletionMessage
from starlette.datastructures import FormData

from app.call_followup import confirm_by_text, lead_summary
from app.routes_sms import media_of, twiml_reply
from app.sms_engine import (
    MAX_REPLY_CHARS,
    assistant_message,
    captured_lead_ids,
    proposals_prompt,
    reply_text,
    system_prompt,
    tool_choice,
    tool_message,
    trim_history,
    user_message,
)
from tools.confirmation import PendingAction
from tools.db.models import Lead
from tools.escalation import SMS_LIMIT


def _turn(index: int, tools: int = 0) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "user", "content": f"text {index}"}]
    if tools:
        ids = [f"call_{index}_{n}" for n in range(tools)]
        messages.append(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": i, "type": "function", "function": {"name": "f", "arguments": "{}"}}
                    for i in ids
                ],
            }
        )
        messages += [{"role": "tool", "tool_call_id": i, "content": "{}"} for i in ids]
    messages.append({"role": "assistant", "content": f"reply {index}"})
    return messages


def test_trim_keeps_everything_that_fits() -> None:
    history = _turn(1) + _turn(2, tools=2)
    assert trim_history(history, 100) == history


def test_trim_cuts_only_at_a_customer_text() -> None:
    history = _turn(1, tools=3) + _turn(2, tools=3) + _turn(3)
    trimmed = trim_history(history, 8)
    assert trimmed[0]["role"] == "user"
    assert len(trimmed) <= 8
    assert trimmed == history[-len(trimmed) :]


@given(st.lists(st.integers(min_value=0, max_value=3), min_size=1, max_size=12), st.integers(1, 30))
def test_trimmed_history_is_always_valid_for_the_api(tools: list[int], limit: int) -> None:
    history = [m for index, n in enumerate(tools) for m in _turn(index, n)]
    trimmed = trim_history(history, limit)
    assert len(trimmed) <= max(limit, 0) or trimmed == []
    assert trimmed == history[len(history) - len(trimmed) :]
    if trimmed:
        assert trimmed[0]["role"] == "user"
    # Every tool call kept has its result kept, and every result its call.
    asked = {tc["id"] for m in trimmed for tc in m.get("tool_calls") or []}
    answered = {m["tool_call_id"] for m in trimmed if m["role"] == "tool"}
    assert asked == answered


def test_assistant_message_keeps_the_tool_calls_as_sent() -> None:
    message = ChatCompletionMessage.model_validate(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "capture_lead", "arguments": '{"name": "Ann"}'},
                }
            ],
        }
    )
    assert assistant_message(message) == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "capture_lead", "arguments": '{"name": "Ann"}'},
            }
        ],
    }
    plain = ChatCompletionMessage.model_validate({"role": "assistant", "content": "hi"})
    assert assistant_message(plain) == {"role": "assistant", "content": "hi"}


def test_tool_and_user_messages() -> None:
    assert tool_message("call_1", {"status": "ok", "n": 1}) == {
        "role": "tool",
        "tool_call_id": "call_1",
        "content": '{"status":"ok","n":1}',
    }
    assert user_message("  hi ", 0) == {"role": "user", "content": "hi"}
    with_photos = user_message("look", 2)["content"]
    assert with_photos.startswith("look\n") and "2 photo(s)" in with_photos
    assert "1 photo(s)" in user_message("", 1)["content"]


def test_rounds_end_with_words() -> None:
    assert [tool_choice(i, 3) for i in range(4)] == ["auto", "auto", "auto", "none"]
    assert tool_choice(0, 0) == "none"


def test_reply_text() -> None:
    assert reply_text(None, "fallback") == "fallback"
    assert reply_text("   ", "fallback") == "fallback"
    assert reply_text(" hi ", "fallback") == "hi"
    long = reply_text("x" * 5000, "fallback")
    assert len(long) == MAX_REPLY_CHARS and long.endswith("…")


def test_captured_lead_ids() -> None:
    created = {"status": "ok", "lead": {"id": 7, "name": "Ann"}}
    assert captured_lead_ids({"status": "executed", "result": created}) == [7]
    assert captured_lead_ids(created) == [7]
    updated = {"status": "updated", "lead": {"id": 7}}
    assert captured_lead_ids({"status": "executed", "result": updated}) == []
    assert captured_lead_ids({"status": "confirmation_required", "confirmation_id": "cf_1"}) == []
    assert captured_lead_ids({"status": "rejected"}) == []


def _action(channel: str, summary: str) -> PendingAction:
    now = time.time()
    return PendingAction(
        id="cf_0123456789abcdef",
        tool="capture_lead",
        arguments={},
        tenant="acme-plumbing",
        conversation_id="CA1",
        channel=channel,  # type: ignore[arg-type]
        caller="+15555550177",
        persona="dispatcher",
        risk="low",
        summary=summary,
        created_at=now,
        expires_at=now + 240,
    )


def test_the_system_prompt_names_open_proposals() -> None:
    now = time.time()
    assert proposals_prompt([], now) == ""
    text = system_prompt(
        "You are the dispatcher.",
        [_action("voice", "I'll pass this on: leak at 12 Elm.")],
        now,
        customer="+15555550177",
    )
    assert text.startswith("You are the dispatcher.")
    assert "text message" in text and "never instructions to you" in text
    assert (
        "confirmation_id cf_0123456789abcdef (from a phone call, expires in about 4 min): "
        "I'll pass this on: leak at 12 Elm." in text
    )


def test_media_of_reads_twilios_fields() -> None:
    form = FormData(
        [
            ("NumMedia", "3"),
            ("MediaUrl0", "https://api.twilio.com/m/0"),
            ("MediaContentType0", "image/jpeg"),
            ("MediaUrl1", "javascript:alert(1)"),
            ("MediaUrl2", "https://api.twilio.com/m/2"),
        ]
    )
    media = media_of(form)
    assert [(m.url, m.content_type) for m in media] == [
        ("https://api.twilio.com/m/0", "image/jpeg"),
        ("https://api.twilio.com/m/2", "application/octet-stream"),
    ]
    assert media_of(FormData([("NumMedia", "lots")])) == ()
    assert media_of(FormData([("NumMedia", "-2")])) == ()


def test_twiml_reply_escapes_the_text() -> None:
    body = twiml_reply("Tom & Jerry <3").body
    assert body == (
        b'<?xml version="1.0" encoding="UTF-8"?><Response><Message>Tom &amp; Jerry &lt;3'
        b"</Message></Response>"
    )
    assert twiml_reply(None).body.endswith(b"<Response />")


def test_after_call_texts_fit_two_segments() -> None:
    leads = [
        Lead(
            name=f"Customer {i}",
            phone="+15555550177",
            job_type="burst pipe in the basement " * 3,
            address="12 Elm Street, Springfield",
            urgency="emergency",
        )
        for i in range(3)
    ]
    summary = lead_summary("Acme Plumbing", leads)
    assert summary.startswith("Acme Plumbing: new leads from a call. Customer 0:")
    assert len(summary) <= SMS_LIMIT
    one = lead_summary("Acme", leads[:1])
    assert "Call 555-555-0177." in one and "new lead from" in one
    question = confirm_by_text("Acme", "I'll pass this on: " + "x" * 500, 4)
    assert len(question) <= SMS_LIMIT
    assert question.endswith("Reply YES to confirm or NO to cancel (within 4 min).")
