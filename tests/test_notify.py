"""Outbound texts: the notifier against the fake Twilio REST server and real SQL; the lead
webhook against a loopback receiver; `switchboard outbox`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from typer.testing import CliRunner

from app.cli import cli
from bridge.sim.loopback_http import serve_loopback
from bridge.sim.twilio_rest import FakeTwilio, run_twilio_rest
from tools.db.engine import make_engine, make_sessionmaker, migrate
from tools.db.models import Message
from tools.db.tenancy import tenant_session
from tools.lead_webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, post_lead, signature, verify
from tools.notify import (
    DEAD_LETTER,
    OUTBOX,
    RetryPolicy,
    SmsNotifier,
    TwilioAccount,
    unsent_messages,
)

Db = async_sessionmaker[AsyncSession]
SID = "AC" + "c" * 32
TOKEN = "notify-test-token"
SENDER = "+15005550006"
OWNER = "+15005550100"
FAST = RetryPolicy(attempts=3, backoff_s=0.01, timeout_s=5.0)


@pytest.fixture
async def twilio() -> AsyncIterator[FakeTwilio]:
    async with run_twilio_rest(SID, TOKEN) as fake:
        yield fake


def notifier_for(db: Db, twilio: FakeTwilio | None, **kw: Any) -> SmsNotifier:
    account = (
        TwilioAccount(SID, TOKEN, twilio.url, status_callback="https://bridge.example/sms/status")
        if twilio is not None
        else None
    )
    return SmsNotifier(
        db,
        sender_for=lambda tenant: SENDER if tenant == "acme-plumbing" else None,
        account=account,
        policy=kw.pop("policy", FAST),
        **kw,
    )


async def messages(db: Db) -> list[Message]:
    async with tenant_session(db, "acme-plumbing") as session:
        return list(await session.scalars(select(Message).order_by(Message.id)))


async def test_a_text_goes_out_through_twilio_in_the_background(db: Db, twilio: FakeTwilio) -> None:
    notifier = notifier_for(db, twilio)
    await notifier.send_sms("acme-plumbing", OWNER, "Flooding at 12 Elm", reason="escalation")
    assert notifier.in_flight == 1  # queued: the caller did not wait for Twilio
    assert await notifier.drain(10)
    [sent] = twilio.messages
    assert (sent.to, sent.from_, sent.body) == (OWNER, SENDER, "Flooding at 12 Elm")
    assert sent.status_callback == "https://bridge.example/sms/status"
    [row] = await messages(db)
    assert row.direction == "outbound" and row.reason == "escalation"
    assert row.message_sid == sent.sid and row.status == "queued"
    assert row.conversation_id == f"sms:acme-plumbing:{OWNER}"
    await notifier.aclose()


async def test_twilio_failing_twice_then_succeeding(db: Db, twilio: FakeTwilio) -> None:
    twilio.fail_next(2)
    notifier = notifier_for(db, twilio)
    await notifier.send_sms("acme-plumbing", OWNER, "hello", reason="test")
    assert await notifier.drain(10)
    assert twilio.attempts == 3 and len(twilio.messages) == 1
    [row] = await messages(db)
    assert row.message_sid == twilio.messages[0].sid and row.status == "queued"
    assert row.error_code is None
    await notifier.aclose()


async def test_out_of_retries_is_a_dead_letter(db: Db, twilio: FakeTwilio) -> None:
    twilio.fail_next(10, status=503)
    notifier = notifier_for(db, twilio)
    await notifier.send_sms("acme-plumbing", OWNER, "hello", reason="test")
    assert await notifier.drain(10)
    assert twilio.attempts == FAST.attempts and twilio.messages == []
    [row] = await messages(db)
    assert (row.status, row.error_code, row.message_sid) == (DEAD_LETTER, "20500", None)
    [entry] = await unsent_messages(db)
    assert (entry.status, entry.to, entry.body) == (DEAD_LETTER, OWNER, "hello")
    await notifier.aclose()


async def test_a_refusal_is_not_retried(db: Db, twilio: FakeTwilio) -> None:
    notifier = SmsNotifier(
        db,
        sender_for=lambda tenant: SENDER,
        account=TwilioAccount(SID, "not-the-token", twilio.url),
        policy=FAST,
    )
    await notifier.send_sms("acme-plumbing", OWNER, "hello", reason="test")
    assert await notifier.drain(10)
    assert twilio.attempts == 1
    [row] = await messages(db)
    assert (row.status, row.error_code) == (DEAD_LETTER, "20003")
    await notifier.aclose()


async def test_timeouts_are_retried_and_bounded(db: Db) -> None:
    # A server that accepts and never answers: each attempt ends at the client's timeout.
    accepted = 0

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        with contextlib.suppress(Exception):
            await reader.read()  # until the client gives up and closes
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    notifier = SmsNotifier(
        db,
        sender_for=lambda tenant: SENDER,
        account=TwilioAccount(SID, TOKEN, f"http://127.0.0.1:{port}"),
        policy=RetryPolicy(attempts=2, backoff_s=0.01, timeout_s=0.2),
    )
    try:
        await notifier.send_sms("acme-plumbing", OWNER, "hello", reason="test")
        assert await notifier.drain(10)
    finally:
        await notifier.aclose()
        server.close()
        await server.wait_closed()
    [row] = await messages(db)
    assert (row.status, row.error_code) == (DEAD_LETTER, "timeout")
    assert accepted == 2


async def _fill_outbox(database_url: str) -> list[tuple[str, str]]:
    await migrate(database_url)
    engine = make_engine(database_url)
    db = make_sessionmaker(engine)
    try:
        notifier = notifier_for(db, None)
        await notifier.send_sms("acme-plumbing", OWNER, "Leak at 12 Elm", reason="escalation")
        await notifier.send_sms("no-such-tenant", OWNER, "orphan", reason="test")
        await notifier.aclose()
        return [(e.status, e.body) for e in await unsent_messages(db)]
    finally:
        await engine.dispose()


def test_without_credentials_texts_wait_in_the_outbox(sqlite_url: str) -> None:
    # Sync test: the CLI runs its own event loop.
    entries = asyncio.run(_fill_outbox(sqlite_url))
    # Both kept; their relative order is not defined (each is written by its own background
    # task, so two texts sent in the same instant may land either way round).
    assert sorted(entries) == [(OUTBOX, "Leak at 12 Elm"), (OUTBOX, "orphan")]

    result = CliRunner().invoke(cli, ["outbox"], env={"DATABASE_URL": sqlite_url})
    assert result.exit_code == 0, result.output
    assert "Leak at 12 Elm" in result.output and "outbox" in result.output
    as_json = CliRunner().invoke(cli, ["outbox", "--json"], env={"DATABASE_URL": sqlite_url})
    rows = orjson.loads(as_json.output)
    assert {r["reason"] for r in rows} == {"escalation", "test"} and rows[1]["to"] == OWNER


def test_an_empty_outbox_says_so(sqlite_url: str) -> None:
    result = CliRunner().invoke(cli, ["outbox"], env={"DATABASE_URL": sqlite_url})
    assert result.exit_code == 0 and "outbox is empty" in result.output


async def test_empty_texts_are_refused(db: Db) -> None:
    notifier = notifier_for(db, None)
    with pytest.raises(ValueError, match="recipient and a body"):
        await notifier.send_sms("acme-plumbing", OWNER, "  ", reason="test")
    assert notifier.in_flight == 0


# -- the lead webhook ----------------------------------------------------------------------------


def test_signature_and_verification() -> None:
    body = b'{"event":"lead.captured"}'
    header = signature("s3cret", 1_700_000_000, body)
    assert header.startswith("sha256=") and len(header) == 7 + 64
    assert header != signature("s3cret", 1_700_000_001, body)  # the timestamp is signed
    assert header != signature("other", 1_700_000_000, body)


async def test_lead_webhook_is_signed_and_retried() -> None:
    received: list[tuple[int, bool, dict[str, Any]]] = []
    answers = iter([503, 500, 200])

    async def hook(request: Request) -> Response:
        body = await request.body()
        ok = verify(
            "s3cret", request.headers[TIMESTAMP_HEADER], body, request.headers[SIGNATURE_HEADER]
        )
        status = next(answers)
        received.append((status, ok, orjson.loads(body)))
        return Response(status_code=status)

    app = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    import httpx

    payload = {"event": "lead.captured", "lead": {"id": 7, "name": "Ann"}}
    async with serve_loopback(app) as url, httpx.AsyncClient() as client:
        delivered = await post_lead(
            client, url + "/hook", payload, secret="s3cret", policy=RetryPolicy(3, 0.01, 5.0)
        )
        refused_forever = await post_lead(
            client, url + "/nowhere", payload, secret="s3cret", policy=RetryPolicy(3, 0.01, 5.0)
        )
    assert delivered is True and refused_forever is False
    assert [(status, ok) for status, ok, _ in received] == [(503, True), (500, True), (200, True)]
    assert received[-1][2] == payload
