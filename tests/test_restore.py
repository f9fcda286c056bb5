"""Rebuilding a call's conversation in a new Realtime session (bridge.restore)."""

from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st

from bridge import realtime as rt
from bridge.restore import ConversationHistory
from bridge.sim.emulator import run_emulator
from tests.sdk_oracle import assert_valid_client_event, assert_valid_server_event


def a_call_so_far() -> ConversationHistory:
    history = ConversationHistory()
    history.agent_said("item_a1", "Thanks for calling. How can I help?")
    history.caller_committed("item_u1")
    history.tool_called("call_1", "capture_lead", '{"name": "Jamie"}')  # the reply began
    history.caller_said("item_u1", "My sink is leaking")  # transcription arrives late
    history.tool_answered("call_1", '{"status": "confirmation_required"}')
    history.agent_said("item_a2", "Shall I go ahead?")
    return history


def test_the_replay_is_the_conversation_in_order() -> None:
    events = a_call_so_far().replay_events()
    items = [e["item"] for e in events]
    assert [e["type"] for e in events] == ["conversation.item.create"] * 5
    assert [(i["type"], i.get("role")) for i in items] == [
        ("message", "assistant"),
        ("message", "user"),  # where it was committed, not where its transcript arrived
        ("function_call", None),
        ("function_call_output", None),
        ("message", "assistant"),
    ]
    assert items[0]["content"] == [
        {"type": "output_text", "text": "Thanks for calling. How can I help?"}
    ]
    assert items[1]["content"] == [{"type": "input_text", "text": "My sink is leaking"}]
    assert (items[2]["call_id"], items[2]["name"], items[2]["arguments"]) == (
        "call_1",
        "capture_lead",
        '{"name": "Jamie"}',
    )
    assert items[3] == {
        "type": "function_call_output",
        "call_id": "call_1",
        "output": '{"status": "confirmation_required"}',
    }


def test_every_replayed_event_validates_against_the_sdk() -> None:
    for event in a_call_so_far().replay_events():
        assert_valid_client_event(orjson.loads(rt.encode(event)))


def test_a_caller_turn_without_transcription_is_skipped() -> None:
    history = ConversationHistory()
    history.caller_committed("item_u1")
    assert history.replay_events() == []
    assert not history.awaits_reply


def test_a_running_tool_is_replayed_without_output_and_owes_no_reply_yet() -> None:
    history = ConversationHistory()
    history.caller_said("item_u1", "Book me in")
    history.tool_called("call_1", "create_booking", "{}")
    items = [e["item"]["type"] for e in history.replay_events()]
    assert items == ["message", "function_call"]
    assert history.pending_calls == ["call_1"]
    assert history.known("call_1") and not history.answered("call_1")
    assert not history.awaits_reply  # the reply comes with the tool's output
    history.tool_answered("call_1", '{"status": "ok"}')
    assert history.answered("call_1") and history.pending_calls == []
    assert history.awaits_reply


def test_who_spoke_last_decides_whether_a_reply_is_owed() -> None:
    history = ConversationHistory()
    assert not history.awaits_reply
    history.agent_said("a1", "Hello")
    assert not history.awaits_reply
    history.caller_said("u1", "Hi, I need a plumber")
    assert history.awaits_reply
    history.agent_said("a2", "Sure")
    assert not history.awaits_reply


def test_repeats_do_not_duplicate_items() -> None:
    history = ConversationHistory()
    history.tool_called("call_1", "lookup", "{}")
    history.tool_called("call_1", "lookup", "{}")
    history.caller_committed("u1")
    history.caller_committed("u1")
    history.caller_said("u1", "hello")
    history.tool_answered("call_unknown", "{}")  # not ours: ignored
    assert len(history) == 2


@given(st.lists(st.sampled_from(["user", "agent", "call", "answer"]), max_size=60))
def test_history_is_bounded_and_keeps_pending_calls(steps: list[str]) -> None:
    history = ConversationHistory(max_items=10)
    calls = 0
    for n, step in enumerate(steps):
        if step == "user":
            history.caller_said(f"u{n}", "words")
        elif step == "agent":
            history.agent_said(f"a{n}", "words")
        elif step == "call":
            calls += 1
            history.tool_called(f"call_{calls}", "lookup", "{}")
        elif calls:
            history.tool_answered(f"call_{calls}", "{}")
    assert len(history) <= 10 + len(history.pending_calls)
    for event in history.replay_events():
        assert_valid_client_event(event)
    # A pending call is never forgotten: its output will come and must match.
    replayed_calls = {
        e["item"]["call_id"]
        for e in history.replay_events()
        if e["item"]["type"] == "function_call"
    }
    assert set(history.pending_calls) <= replayed_calls


async def test_the_emulator_accepts_a_replay_into_a_fresh_session() -> None:
    history = ConversationHistory()
    history.agent_said("a1", "Thanks for calling.")
    history.caller_said("u1", "My sink is leaking")
    history.agent_said("a2", "I'm sorry to hear that. What is your address?")
    async with run_emulator("demo", speed=0) as emulator:
        upstream = await rt.RealtimeConnection.connect(emulator.url, "gpt-realtime", "sk-x")
        try:
            for event in history.replay_events():
                await upstream.send(rt.encode(event))
            seen: list[dict] = []
            async for frame in upstream:
                event = orjson.loads(frame)
                seen.append(event)
                if sum(e["type"] == "conversation.item.done" for e in seen) == 3:
                    break
        finally:
            await upstream.close()
    for event in seen:
        assert_valid_server_event(event)
    assert not [e for e in seen if e["type"] == "error"]
    (session,) = emulator.sessions
    creates = session.received("conversation.item.create")
    assert [c["item"]["role"] for c in creates] == ["assistant", "user", "assistant"]
