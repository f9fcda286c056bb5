"""ConversationLog: the caller's words in Redis, shared across processes and channels."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
from redis.asyncio import Redis

from tools import conversation
from tools.confirmation import Replies
from tools.conversation import LOST_AUDIO_S, MAX_UTTERANCES, ConversationLog


async def test_texts_after_a_moment_are_replies_in_order(kv: Redis) -> None:
    log = ConversationLog(kv, "sms:acme:+15551230001")
    await log.caller_texted("hi, I need a plumber")
    since = time.time()
    await log.caller_texted("wait")
    await log.caller_texted("yes")
    replies = await log.caller_replies(since=since, wait_s=0)
    assert replies.texts == ("wait", "yes")
    assert replies.complete
    assert await log.latest_caller_utterance(since=since, wait_s=0) == "yes"


async def test_nothing_said_since(kv: Redis) -> None:
    log = ConversationLog(kv, "CA-quiet")
    await log.caller_texted("yes")
    replies = await log.caller_replies(since=time.time(), wait_s=0)
    assert replies.texts == ()
    assert await log.latest_caller_utterance(since=time.time(), wait_s=0) is None


async def test_speech_is_timed_by_its_commit_not_its_transcript(kv: Redis) -> None:
    log = ConversationLog(kv, "CA-commit")
    await log.caller_audio_committed("item_1")
    proposal = time.time()  # the model proposed while "yes" was still being transcribed
    await log.caller_transcribed("item_1", "yes")
    # Said before the proposal, so it is no reply to it.
    assert (await log.caller_replies(since=proposal, wait_s=0)).texts == ()
    await log.caller_audio_committed("item_2")
    await log.caller_transcribed("item_2", "yes, go ahead")
    assert await log.latest_caller_utterance(since=proposal, wait_s=0) == "yes, go ahead"


async def test_reader_waits_for_a_pending_transcript(kv: Redis) -> None:
    log = ConversationLog(kv, "CA-wait")
    since = time.time()
    await log.caller_audio_committed("item_1")

    async def transcribe_later() -> None:
        await asyncio.sleep(0.2)
        await log.caller_transcribed("item_1", "yes please")

    transcriber = asyncio.create_task(transcribe_later())
    replies = await log.caller_replies(since=since, wait_s=30)
    await transcriber
    assert replies.texts == ("yes please",)
    assert replies.complete


async def test_untranscribed_audio_after_the_wait_is_incomplete(kv: Redis) -> None:
    log = ConversationLog(kv, "CA-slow")
    since = time.time()
    await log.caller_texted("yes")
    await log.caller_audio_committed("item_9")  # maybe "no, wait": nobody knows yet
    replies = await log.caller_replies(since=since, wait_s=0.1)
    assert replies.texts == ("yes",)
    assert not replies.complete
    assert await log.latest_caller_utterance(since=since, wait_s=0) is None


async def test_audio_before_the_moment_does_not_hold_up_a_reader(kv: Redis) -> None:
    log = ConversationLog(kv, "CA-old-audio")
    await log.caller_audio_committed("item_1")
    since = time.time()
    await log.caller_texted("yes")
    replies = await log.caller_replies(since=since, wait_s=0)
    assert replies == Replies(texts=("yes",), complete=True)


async def test_failed_transcription_stops_the_wait(kv: Redis) -> None:
    log = ConversationLog(kv, "CA-failed")
    since = time.time()
    await log.caller_audio_committed("item_1")
    await log.caller_transcription_failed("item_1")
    replies = await log.caller_replies(since=since, wait_s=0)
    assert replies.complete
    assert replies.texts == ()


async def test_audio_never_transcribed_is_eventually_taken_as_lost(
    kv: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = ConversationLog(kv, "CA-lost")
    since = time.time()
    await log.caller_audio_committed("item_1")
    later = since + LOST_AUDIO_S + 1
    monkeypatch.setattr(
        conversation, "time", SimpleNamespace(time=lambda: later, monotonic=time.monotonic)
    )
    assert (await log.caller_replies(since=since, wait_s=0)).complete


async def test_empty_transcripts_are_not_replies(kv: Redis) -> None:
    log = ConversationLog(kv, "CA-noise")
    since = time.time()
    await log.caller_audio_committed("item_1")
    await log.caller_transcribed("item_1", "  ")
    await log.caller_texted("")
    replies = await log.caller_replies(since=since, wait_s=0)
    assert replies.texts == ()
    assert replies.complete


async def test_state_is_shared_between_instances_and_expires(kv: Redis) -> None:
    writer = ConversationLog(kv, "CA-shared", ttl_s=120)
    reader = ConversationLog(kv, "CA-shared", ttl_s=120)
    since = time.time()
    await writer.caller_audio_committed("item_1")
    await writer.caller_transcribed("item_1", "yes")
    assert await reader.latest_caller_utterance(since=since, wait_s=0) == "yes"
    keys = [k async for k in kv.scan_iter(match="sb:conv:CA-shared:*")]
    assert keys
    for key in keys:
        assert 0 < await kv.ttl(key) <= 120


async def test_conversations_are_separate(kv: Redis) -> None:
    since = time.time()
    await ConversationLog(kv, "CA-a").caller_texted("yes")
    assert await ConversationLog(kv, "CA-b").latest_caller_utterance(since=since, wait_s=0) is None


async def test_history_is_bounded(kv: Redis) -> None:
    log = ConversationLog(kv, "CA-long")
    since = time.time()
    for n in range(MAX_UTTERANCES + 25):
        await log.caller_texted(f"message {n}")
    replies = await log.caller_replies(since=since, wait_s=0)
    assert len(replies.texts) == MAX_UTTERANCES
    assert replies.latest == f"message {MAX_UTTERANCES + 24}"


async def test_separate_clients_see_the_same_log(redis_url: str) -> None:
    """Two connections stand in for two processes (the real two-process race is elsewhere)."""
    first = Redis.from_url(redis_url, decode_responses=True)
    second = Redis.from_url(redis_url)  # bytes replies: both client styles must work
    try:
        await first.flushdb()
        since = time.time()
        await ConversationLog(first, "CA-two").caller_audio_committed("item_1")
        waiting = ConversationLog(second, "CA-two").caller_replies(since=since, wait_s=30)
        reader = asyncio.create_task(waiting)
        await asyncio.sleep(0.1)
        await ConversationLog(first, "CA-two").caller_transcribed("item_1", "yep")
        replies = await reader
        assert replies.texts == ("yep",)
        assert replies.complete
    finally:
        await first.aclose()
        await second.aclose()
