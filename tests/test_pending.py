"""PendingStore: pending actions in Redis, claimed at most once."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.asyncio import Redis

from tools.confirmation import Party, PendingAction, State
from tools.pending import RETAIN_S, PendingStore, new_confirmation_id

CALLER = "+15551230001"


def pending(**overrides: object) -> PendingAction:
    now = time.time()
    fields: dict[str, object] = {
        "id": new_confirmation_id(),
        "tool": "create_booking",
        "arguments": {"day": "2030-01-02", "slots": [1, 2], "note": None},
        "tenant": "acme",
        "conversation_id": "CA1",
        "channel": "voice",
        "caller": CALLER,
        "persona": "dispatcher",
        "risk": "medium",
        "summary": "I'll book Tuesday at 3 PM.",
        "created_at": now,
        "expires_at": now + 300,
    }
    return PendingAction(**(fields | overrides))  # type: ignore[arg-type]


async def test_round_trip(kv: Redis) -> None:
    store = PendingStore(kv)
    action = pending()
    await store.add(action)
    stored = await store.load(action.id)
    assert stored is not None
    assert stored.action == action
    assert stored.state is State.PENDING


async def test_unknown_and_unreadable_records_load_as_none(kv: Redis) -> None:
    store = PendingStore(kv)
    assert await store.load("cf_nope") is None
    await kv.set("sb:confirm:id:cf_garbage", b"{not json")
    assert await store.load("cf_garbage") is None
    await kv.set("sb:confirm:id:cf_wrong", b'{"id": "cf_wrong"}')
    assert await store.load("cf_wrong") is None


async def test_records_expire_after_the_retention(kv: Redis) -> None:
    store = PendingStore(kv)
    action = pending()
    await store.add(action)
    await store.claim(action, State.CANCELLED)
    for key in (f"sb:confirm:id:{action.id}", f"sb:confirm:id:{action.id}:state"):
        assert 300 < await kv.ttl(key) <= 300 + RETAIN_S


async def test_a_claim_is_won_once(kv: Redis) -> None:
    store = PendingStore(kv)
    action = pending()
    await store.add(action)
    assert await store.claim(action, State.EXECUTING)
    assert not await store.claim(action, State.EXECUTING)
    assert not await store.claim(action, State.CANCELLED)
    assert not await store.claim(action, State.EXPIRED)
    await store.settle(action, State.EXECUTED)
    stored = await store.load(action.id)
    assert stored is not None and stored.state is State.EXECUTED


@pytest.mark.parametrize("rounds", [40])
async def test_concurrent_claims_have_one_winner(kv: Redis, rounds: int) -> None:
    store = PendingStore(kv)
    for _ in range(rounds):
        action = pending()
        await store.add(action)
        states = [State.EXECUTING, State.CANCELLED, State.EXPIRED] * 3
        wins = await asyncio.gather(*(store.claim(action, s) for s in states))
        assert sum(wins) == 1
        stored = await store.load(action.id)
        assert stored is not None
        assert stored.state is states[wins.index(True)]


async def test_open_for_lists_what_a_party_may_confirm(kv: Redis) -> None:
    store = PendingStore(kv)
    now = time.time()
    on_call = pending(conversation_id="CA1")
    later_on_call = pending(conversation_id="CA1", created_at=now + 1)
    other_call_same_caller = pending(conversation_id="CA2")
    expired = pending(conversation_id="CA1", expires_at=now - 1)
    executed = pending(conversation_id="CA1")
    stranger = pending(conversation_id="CA3", caller="+15559999999")
    other_tenant = pending(conversation_id="CA1", tenant="globex")
    for action in (
        on_call,
        later_on_call,
        other_call_same_caller,
        expired,
        executed,
        stranger,
        other_tenant,
    ):
        await store.add(action)
    await store.claim(executed, State.EXECUTING)

    by_sms = Party("acme", f"sms:acme:{CALLER}", CALLER)
    found = await store.open_for(by_sms, now)
    assert [a.id for a in found] == [on_call.id, other_call_same_caller.id, later_on_call.id]
    # On the call itself; the other call's proposal also shows, being the same caller's.
    found = await store.open_for(Party("acme", "CA1", CALLER), now)
    assert {a.id for a in found} == {on_call.id, later_on_call.id, other_call_same_caller.id}


async def test_withheld_numbers_are_not_indexed_across_conversations(kv: Redis) -> None:
    store = PendingStore(kv)
    action = pending(caller="anonymous")
    await store.add(action)
    now = time.time()
    assert await store.open_for(Party("acme", "CA9", "anonymous"), now) == []
    assert [a.id for a in await store.open_for(Party("acme", "CA1", "anonymous"), now)] == [
        action.id
    ]


def test_confirmation_ids_are_unique_and_safe() -> None:
    ids = {new_confirmation_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(i.startswith("cf_") and i[3:].isalnum() for i in ids)
