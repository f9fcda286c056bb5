"""Pending actions in Redis: stored at proposal, claimed at most once, shared by every process.

Keys::

    sb:confirm:id:{id}           the PendingAction as JSON (immutable once written)
    sb:confirm:id:{id}:state     absent while pending; then executing | executed | failed |
                                 cancelled | expired
    sb:confirm:conv:{conv}       sorted set of ids proposed in a conversation, scored by expiry
    sb:confirm:caller:{t}:{num}  the same per tenant and caller number (for cross-channel use)

Leaving `pending` is a claim: `SET state NX`. Redis runs it atomically, so of any number of
processes racing to confirm, cancel or expire one action, exactly one wins. (No Lua: the
embedded fakeredis store has none, and one SET is all it takes.)

Expiry is decided by `expires_at` in the record, checked by the caller of this store. Redis
TTLs only collect garbage, and are longer by `retain_s` so that a late attempt is told
"expired" rather than "unknown".
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson
from pydantic import TypeAdapter, ValidationError

from tools.confirmation import Party, PendingAction, State, is_phone_number, precheck

if TYPE_CHECKING:
    from redis.asyncio import Redis

KEY_PREFIX = "sb:confirm:"
RETAIN_S = 3600

_ACTION = TypeAdapter(PendingAction)


def new_confirmation_id() -> str:
    return f"cf_{secrets.token_hex(8)}"


@dataclass(frozen=True, slots=True)
class Stored:
    action: PendingAction
    state: State


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


class PendingStore:
    def __init__(self, kv: Redis, *, retain_s: int = RETAIN_S) -> None:
        self.kv = kv
        self.retain_s = retain_s

    @staticmethod
    def _record_key(confirmation_id: str) -> str:
        return f"{KEY_PREFIX}id:{confirmation_id}"

    @staticmethod
    def _state_key(confirmation_id: str) -> str:
        return f"{KEY_PREFIX}id:{confirmation_id}:state"

    @staticmethod
    def _conversation_key(conversation_id: str) -> str:
        return f"{KEY_PREFIX}conv:{conversation_id}"

    @staticmethod
    def _caller_key(tenant: str, caller: str) -> str:
        return f"{KEY_PREFIX}caller:{tenant}:{caller}"

    def _ttl(self, action: PendingAction) -> int:
        return max(1, math.ceil(action.expires_at - time.time()) + self.retain_s)

    async def add(self, action: PendingAction) -> None:
        ttl = self._ttl(action)
        indexes = [self._conversation_key(action.conversation_id)]
        if is_phone_number(action.caller):
            indexes.append(self._caller_key(action.tenant, action.caller))
        pipe = self.kv.pipeline(transaction=True)
        pipe.set(self._record_key(action.id), orjson.dumps(action), ex=ttl)
        for index in indexes:
            pipe.zadd(index, {action.id: action.expires_at})
            pipe.expire(index, ttl)
        await pipe.execute()

    async def load(self, confirmation_id: str) -> Stored | None:
        """The action and its state, or None if unknown (or unreadable)."""
        raw, state = await self.kv.mget(
            [self._record_key(confirmation_id), self._state_key(confirmation_id)]
        )
        if raw is None:
            return None
        try:
            action = _ACTION.validate_json(raw)
            return Stored(action, State(_text(state) or State.PENDING))
        except (ValidationError, ValueError):
            return None

    async def claim(self, action: PendingAction, state: State) -> bool:
        """Move `action` out of pending into `state`; False if something else got there first."""
        won = await self.kv.set(
            self._state_key(action.id), state.value, nx=True, ex=self._ttl(action)
        )
        return bool(won)

    async def settle(self, action: PendingAction, state: State) -> None:
        """Record how a claimed action ended (executed or failed)."""
        await self.kv.set(self._state_key(action.id), state.value, ex=self._ttl(action))

    async def open_for(self, party: Party, now: float) -> list[PendingAction]:
        """Pending, unexpired actions `party` may confirm or cancel, oldest first.

        For the SMS engine and prompts: "you have these proposals awaiting the caller's word".
        """
        indexes = [self._conversation_key(party.conversation_id)]
        if is_phone_number(party.caller):
            indexes.append(self._caller_key(party.tenant, party.caller))
        pipe = self.kv.pipeline(transaction=False)
        for index in indexes:
            pipe.zremrangebyscore(index, "-inf", now)
            pipe.zrangebyscore(index, f"({now!r}", "+inf")
        found = await pipe.execute()
        ids = dict.fromkeys(_text(i) for result in found[1::2] for i in result)
        actions = []
        for confirmation_id in ids:
            stored = await self.load(confirmation_id) if confirmation_id else None
            if stored is not None and precheck(stored.action, stored.state, party, now) is None:
                actions.append(stored.action)
        return sorted(actions, key=lambda a: a.created_at)
