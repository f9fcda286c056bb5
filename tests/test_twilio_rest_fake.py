"""The fake Twilio REST API answers the official twilio SDK, and refuses what Twilio refuses."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from twilio.base.exceptions import TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client

from bridge.sim.twilio_rest import FakeTwilio, run_twilio_rest

SID = "AC" + "a" * 32
TOKEN = "fake-twilio-token"


@pytest.fixture
async def twilio() -> AsyncIterator[FakeTwilio]:
    async with run_twilio_rest(SID, TOKEN) as fake:
        yield fake


def _messages_url(fake: FakeTwilio, account: str = SID) -> str:
    return f"{fake.url}/2010-04-01/Accounts/{account}/Messages.json"


async def test_the_official_sdk_sends_through_the_fake(twilio: FakeTwilio) -> None:
    http = AsyncTwilioHttpClient(timeout=5)
    client = Client(SID, TOKEN, http_client=http)
    client.api.base_url = twilio.url
    try:
        message = await client.messages.create_async(
            to="+15551234567",
            from_="+15005550006",
            body="Hello from the fake",
            media_url=["https://example.com/a.jpg", "https://example.com/b.jpg"],
            status_callback="https://bridge.example/sms/status",
        )
    finally:
        await http.close()
    assert message.sid is not None and message.sid.startswith("SM") and len(message.sid) == 34
    assert message.status == "queued" and message.account_sid == SID
    assert message.date_created is not None and message.num_media == "2"
    [sent] = twilio.messages
    assert (sent.to, sent.from_, sent.body) == (
        "+15551234567",
        "+15005550006",
        "Hello from the fake",
    )
    assert sent.media_urls == ["https://example.com/a.jpg", "https://example.com/b.jpg"]
    assert sent.status_callback == "https://bridge.example/sms/status"


async def test_wrong_credentials_are_refused_like_twilio(twilio: FakeTwilio) -> None:
    http = AsyncTwilioHttpClient(timeout=5)
    client = Client(SID, "wrong-token", http_client=http)
    client.api.base_url = twilio.url
    try:
        with pytest.raises(TwilioRestException) as refused:
            await client.messages.create_async(to="+15551234567", from_="+15005550006", body="x")
    finally:
        await http.close()
    assert refused.value.status == 401 and refused.value.code == 20003
    assert twilio.messages == []


@pytest.mark.parametrize(
    ("form", "status", "code"),
    [
        ({"From": "+15005550006", "Body": "x"}, 400, 21604),
        ({"To": "+15551234567", "Body": "x"}, 400, 21603),
        ({"To": "+15551234567", "From": "+15005550006"}, 400, 21602),
        ({"To": "+15551234567", "From": "+15005550006", "Body": "x" * 1601}, 400, 21617),
        ({"To": "+15551234567", "MessagingServiceSid": "MG" + "1" * 32, "Body": "x"}, 201, None),
        ({"To": "+15551234567", "From": "+1500", "MediaUrl": "https://e.com/a.jpg"}, 201, None),
    ],
)
async def test_required_fields(
    twilio: FakeTwilio, form: dict[str, str], status: int, code: int | None
) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.post(_messages_url(twilio), data=form, auth=(SID, TOKEN))
    assert response.status_code == status
    if code is None:
        assert response.json()["sid"].startswith("SM")
    else:
        assert response.json()["code"] == code and twilio.messages == []


async def test_auth_and_account_checks(twilio: FakeTwilio) -> None:
    form = {"To": "+15551234567", "From": "+15005550006", "Body": "x"}
    async with httpx.AsyncClient() as client:
        anonymous = await client.post(_messages_url(twilio), data=form)
        other = await client.post(
            _messages_url(twilio, "AC" + "b" * 32), data=form, auth=(SID, TOKEN)
        )
        as_json = await client.post(_messages_url(twilio), json=form, auth=(SID, TOKEN))
    assert (anonymous.status_code, anonymous.json()["code"]) == (401, 20003)
    assert (other.status_code, other.json()["code"]) == (404, 20404)
    assert as_json.status_code == 400
    assert twilio.messages == []


async def test_fail_next_then_succeed(twilio: FakeTwilio) -> None:
    twilio.fail_next(2)
    form = {"To": "+15551234567", "From": "+15005550006", "Body": "x"}
    async with httpx.AsyncClient() as client:
        statuses = [
            (await client.post(_messages_url(twilio), data=form, auth=(SID, TOKEN))).status_code
            for _ in range(3)
        ]
    assert statuses == [500, 500, 201]
    assert twilio.attempts == 3 and len(twilio.messages) == 1
