"""One-time media stream tokens: the link between a signed webhook and the WebSocket it starts.

The `/voice/incoming` webhook is signed by Twilio; the Media Streams WebSocket upgrade may not
be. So the webhook mints a random token bound to the call, hands it to Twilio as a `<Parameter>`
of the `<Stream>`, and the media handler burns it when the stream's `start` message arrives.
Only someone who saw our TwiML for that very call can open a session, and only once.

Tokens live in Redis (shared by all replicas: Twilio may open the stream on another one) with a
short TTL. In Redis the key is the token's SHA-256, so a look at the keyspace does not yield
usable tokens.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from redis.asyncio import Redis

KEY_PREFIX = "switchboard:stream-token:"
# secrets.token_urlsafe(32) gives 43 characters; anything else was not minted here.
_TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]{43}")


@dataclass(frozen=True, slots=True)
class StreamGrant:
    """What the webhook knew about the call, handed to the media handler that burns the token."""

    call_sid: str
    tenant: str  # BusinessProfile.id
    persona: str
    caller: str  # the webhook's `From`
    called: str  # the webhook's `To`
    account_sid: str | None
    minted_at: float  # unix time


class StreamTokens:
    def __init__(self, kv: Redis, ttl_s: int) -> None:
        if ttl_s <= 0:
            raise ValueError("stream token TTL must be positive")
        self.kv = kv
        self.ttl_s = ttl_s

    async def mint(
        self,
        call_sid: str,
        tenant: str,
        caller: str,
        called: str,
        *,
        persona: str,
        account_sid: str | None = None,
    ) -> str:
        if not call_sid:
            raise ValueError("a stream token must be bound to a CallSid")
        token = secrets.token_urlsafe(32)
        grant = StreamGrant(
            call_sid=call_sid,
            tenant=tenant,
            persona=persona,
            caller=caller,
            called=called,
            account_sid=account_sid,
            minted_at=time.time(),
        )
        await self.kv.set(_key(token), orjson.dumps(asdict(grant)), ex=self.ttl_s)
        return token

    async def burn(self, token: object, call_sid: object) -> StreamGrant | None:
        """Consume `token`; its grant if it was live and minted for `call_sid`, else None.

        GETDEL makes it single-use across replicas. A live token presented with another
        CallSid is destroyed as well: whoever holds it is not the call it was made for.
        """
        if not isinstance(token, str) or not _TOKEN_SHAPE.fullmatch(token):
            return None
        if not isinstance(call_sid, str) or not call_sid:
            return None
        raw = await self.kv.getdel(_key(token))
        if raw is None:
            return None
        try:
            grant = StreamGrant(**orjson.loads(raw))
        except (orjson.JSONDecodeError, TypeError):
            return None  # not written by mint(): treat like an unknown token
        if grant.call_sid != call_sid:
            return None
        return grant


def _key(token: str) -> str:
    return KEY_PREFIX + hashlib.sha256(token.encode()).hexdigest()
