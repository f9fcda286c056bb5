"""What the caller said in one conversation, kept in Redis so every process and channel sees it.

The confirmation protocol asks one question of it: "what has the caller said since this
proposal?". On a call the answer can lag: the model may call `confirm_action` while the
caller's "yes" is still being transcribed. So the log also tracks caller audio that was
committed but not yet transcribed, and a reader can wait (bounded) until it has the words.

Keys (both expire `ttl_s` after the last write)::

    sb:conv:{id}:said      sorted set: JSON {"item", "text", "channel"} scored by when it was said
    sb:conv:{id}:unheard   hash: audio item id -> when it was committed

An utterance is timed by when the caller finished speaking (the commit), not by when its
transcript arrived, so a "yes" said before a proposal never counts as a reply to it. Times are
server wall-clock (`time.time()`) so that processes on different hosts agree.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING

import orjson

from tools.confirmation import Replies

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import Pipeline

KEY_PREFIX = "sb:conv:"
MAX_UTTERANCES = 200  # the protocol only needs recent turns; older ones are trimmed
# Audio whose transcript has not come this long after its commit is taken as lost (e.g. a
# transcription failure nobody reported), so it stops holding up confirmations.
LOST_AUDIO_S = 30.0
POLL_S = 0.05


class ConversationLog:
    def __init__(self, kv: Redis, conversation_id: str, *, ttl_s: int = 3600) -> None:
        self.kv = kv
        self.conversation_id = conversation_id
        self.ttl_s = ttl_s
        self._said = f"{KEY_PREFIX}{conversation_id}:said"
        self._unheard = f"{KEY_PREFIX}{conversation_id}:unheard"

    # --- writers -------------------------------------------------------------------------------

    async def caller_audio_committed(self, item_id: str) -> None:
        """The caller finished a turn (Realtime `input_audio_buffer.committed`)."""
        pipe = self.kv.pipeline(transaction=True)
        pipe.hsetnx(self._unheard, item_id, repr(time.time()))
        pipe.expire(self._unheard, self.ttl_s)
        await pipe.execute()

    async def caller_transcribed(self, item_id: str, text: str) -> None:
        """The transcript of a committed turn arrived (input transcription completed)."""
        committed = await self.kv.hget(self._unheard, item_id)
        said_at = float(committed) if committed is not None else time.time()
        # One transaction: a reader never sees the audio gone and the words not yet there.
        pipe = self.kv.pipeline(transaction=True)
        pipe.hdel(self._unheard, item_id)
        self._add(pipe, item_id, text, "voice", said_at)
        await pipe.execute()

    async def caller_transcription_failed(self, item_id: str) -> None:
        """The turn will never have a transcript; stop waiting for it."""
        await self.kv.hdel(self._unheard, item_id)

    async def caller_texted(self, text: str) -> None:
        """An inbound text message (SMS engine)."""
        pipe = self.kv.pipeline(transaction=True)
        self._add(pipe, f"sms-{uuid.uuid4().hex}", text, "sms", time.time())
        await pipe.execute()

    def _add(self, pipe: Pipeline, item_id: str, text: str, channel: str, said_at: float) -> None:
        if text.strip():  # silence or noise transcribed as nothing is not a reply
            entry = orjson.dumps({"item": item_id, "text": text, "channel": channel})
            pipe.zadd(self._said, {entry: said_at})
            pipe.zremrangebyrank(self._said, 0, -MAX_UTTERANCES - 1)
        pipe.expire(self._said, self.ttl_s)

    # --- readers -------------------------------------------------------------------------------

    async def caller_replies(self, *, since: float, wait_s: float) -> Replies:
        """Everything the caller said after `since`, oldest first.

        Waits up to `wait_s` while caller audio committed after `since` is untranscribed;
        if some still is when the wait ends, the replies are marked incomplete.
        """
        deadline = time.monotonic() + max(wait_s, 0.0)
        while True:
            pipe = self.kv.pipeline(transaction=True)
            pipe.hvals(self._unheard)
            pipe.zrangebyscore(self._said, f"({since!r}", "+inf")
            committed, said = await pipe.execute()
            now = time.time()
            waiting = any(since < float(t) and now - float(t) < LOST_AUDIO_S for t in committed)
            if not waiting or time.monotonic() >= deadline:
                texts = tuple(orjson.loads(entry)["text"] for entry in said)
                return Replies(texts=texts, complete=not waiting)
            await asyncio.sleep(min(POLL_S, max(deadline - time.monotonic(), 0.0)))

    async def latest_caller_utterance(self, *, since: float, wait_s: float) -> str | None:
        """The caller's newest words after `since`, or None if there are none (or if their
        newest audio is still untranscribed when `wait_s` runs out)."""
        replies = await self.caller_replies(since=since, wait_s=wait_s)
        return replies.latest if replies.complete else None
