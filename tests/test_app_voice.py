"""Voice webhooks, probes and metrics, served by real uvicorn on loopback.

Signatures are computed with twilio's own RequestValidator over the URL Twilio would use
(the public URL), never with the code under test, so a wrong URL rebuild fails these tests.
"""

from __future__ import annotations

import socket
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Mapping

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select
from twilio.request_validator import RequestValidator

from app.embedded import RunningServer, running_server
from app.services import Services, open_services
from app.settings import Settings
from app.stream_tokens import KEY_PREFIX
from tools.db.models import CallEvent

PUBLIC = "https://switchboard.example.com"
TOKEN = "test-auth-token-0123456789"
ACME = "+15005550006"  # answered by the demo profile "acme-plumbing" (persona dispatcher)
CALLER = "+14155550123"
ACCOUNT = "AC" + "0" * 32


def make_settings(database_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "public_url": PUBLIC,
        "twilio_auth_token": TOKEN,
        "database_url": database_url,
        "redis_url": None,
        "openai_api_key": None,
        "profiles_file": None,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def incoming_form(call_sid: str, to: str = ACME, **extra: str) -> dict[str, str]:
    form = {
        "AccountSid": ACCOUNT,
        "ApiVersion": "2010-04-01",
        "CallSid": call_sid,
        "CallStatus": "ringing",
        "Called": to,
        "Caller": CALLER,
        "Direction": "inbound",
        "From": CALLER,
        "FromCountry": "US",
        "To": to,
        "ToCountry": "US",
    }
    form.update(extra)
    return form


def signature(url: str, form: Mapping[str, str], token: str = TOKEN) -> str:
    return RequestValidator(token).compute_signature(url, form)


@pytest.fixture
async def server(sqlite_url: str) -> AsyncIterator[RunningServer]:
    async with running_server(make_settings(sqlite_url)) as running:
        yield running


@pytest.fixture
async def client(server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url) as http:
        yield http


def services_of(server: RunningServer) -> Services:
    return server.app.state.services


async def post_signed(
    client: httpx.AsyncClient,
    path: str,
    form: Mapping[str, str],
    *,
    public: str = PUBLIC,
    query: str = "",
    headers: Mapping[str, str] | None = None,
) -> httpx.Response:
    url = f"{public}{path}" + (f"?{query}" if query else "")
    sent = {"X-Twilio-Signature": signature(url, form), **(headers or {})}
    target = path + (f"?{query}" if query else "")
    return await client.post(target, data=dict(form), headers=sent)


def stream_of(twiml: str) -> tuple[str, dict[str, str]]:
    """The <Stream> url and its <Parameter>s; fails unless the document is Connect/Stream."""
    root = ET.fromstring(twiml)
    assert root.tag == "Response"
    (connect,) = list(root)
    assert connect.tag == "Connect"
    (stream,) = list(connect)
    assert stream.tag == "Stream"
    params = {p.attrib["name"]: p.attrib["value"] for p in stream.findall("Parameter")}
    return stream.attrib["url"], params


def said_and_hung_up(twiml: str) -> str:
    root = ET.fromstring(twiml)
    assert [child.tag for child in root] == ["Say", "Hangup"]
    return root[0].text or ""


async def stored_tokens(services: Services) -> list[str]:
    return [key async for key in services.kv.scan_iter(match=KEY_PREFIX + "*")]


def sample(metrics_text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


# -- /voice/incoming -----------------------------------------------------------------------


async def test_signed_call_gets_a_stream_with_a_one_time_token(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    response = await post_signed(client, "/voice/incoming", incoming_form("CA" + "1" * 32))

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/xml")
    url, params = stream_of(response.text)
    assert url == "wss://switchboard.example.com/media-stream"
    assert set(params) == {"token"}

    tokens = services_of(server).tokens
    grant = await tokens.burn(params["token"], "CA" + "1" * 32)
    assert grant is not None
    assert (grant.tenant, grant.persona) == ("acme-plumbing", "dispatcher")
    assert (grant.caller, grant.called, grant.account_sid) == (CALLER, ACME, ACCOUNT)
    assert await tokens.burn(params["token"], "CA" + "1" * 32) is None  # used up


async def test_token_presented_for_another_call_is_refused_and_destroyed(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    response = await post_signed(client, "/voice/incoming", incoming_form("CA" + "2" * 32))
    _, params = stream_of(response.text)
    tokens = services_of(server).tokens

    assert await tokens.burn(params["token"], "CA" + "3" * 32) is None
    assert await tokens.burn(params["token"], "CA" + "2" * 32) is None


async def test_every_call_gets_its_own_token(client: httpx.AsyncClient) -> None:
    first = await post_signed(client, "/voice/incoming", incoming_form("CA" + "4" * 32))
    second = await post_signed(client, "/voice/incoming", incoming_form("CA" + "5" * 32))
    assert stream_of(first.text)[1]["token"] != stream_of(second.text)[1]["token"]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-Twilio-Signature": "0/KCTR6DLpKmkAf8muzZqo1nDgQ="},
        {"X-Twilio-Signature": ""},
    ],
    ids=["no-header", "wrong-signature", "empty-header"],
)
async def test_unsigned_or_badly_signed_calls_are_refused(
    server: RunningServer, client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    response = await client.post(
        "/voice/incoming", data=incoming_form("CA" + "6" * 32), headers=headers
    )
    assert response.status_code == 403
    assert await stored_tokens(services_of(server)) == []


async def test_signature_over_the_local_url_is_refused(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    # What a validator that trusted the Host header would accept: not Twilio's URL.
    form = incoming_form("CA" + "7" * 32)
    response = await post_signed(client, "/voice/incoming", form, public=server.url)
    assert response.status_code == 403
    assert await stored_tokens(services_of(server)) == []


async def test_tampered_parameters_are_refused(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    form = incoming_form("CA" + "8" * 32)
    signed = signature(f"{PUBLIC}/voice/incoming", form)
    tampered = {**form, "From": "+15005550100"}  # the owner's number: would unlock operator mode
    response = await client.post(
        "/voice/incoming", data=tampered, headers={"X-Twilio-Signature": signed}
    )
    assert response.status_code == 403
    assert await stored_tokens(services_of(server)) == []


async def test_refusals_are_counted_by_reason(client: httpx.AsyncClient) -> None:
    await client.post("/voice/incoming", data=incoming_form("CA" + "9" * 32))
    await client.post(
        "/voice/incoming",
        data=incoming_form("CA" + "9" * 32),
        headers={"X-Twilio-Signature": "bogus"},
    )
    text = (await client.get("/metrics")).text
    rejections = "switchboard_webhook_rejections_total"
    assert sample(text, rejections, reason="missing_signature") == 1
    assert sample(text, rejections, reason="bad_signature") == 1


async def test_behind_a_proxy_the_public_url_is_what_counts(client: httpx.AsyncClient) -> None:
    # The proxy forwards to the pod's address; Host and scheme differ from PUBLIC_URL.
    headers = {"Host": "10.0.3.7:8080", "X-Forwarded-Proto": "https"}
    response = await post_signed(
        client, "/voice/incoming", incoming_form("CA" + "a" * 32), headers=headers
    )
    assert response.status_code == 200
    assert stream_of(response.text)[0] == "wss://switchboard.example.com/media-stream"


async def test_query_string_is_part_of_the_signed_url(client: httpx.AsyncClient) -> None:
    form = incoming_form("CA" + "b" * 32)
    ok = await post_signed(client, "/voice/incoming", form, query="source=main%20line&x=1")
    assert ok.status_code == 200

    # Signed without the query, sent with it: not what Twilio signed.
    url_without_query = f"{PUBLIC}/voice/incoming"
    refused = await client.post(
        "/voice/incoming?source=main%20line&x=1",
        data=form,
        headers={"X-Twilio-Signature": signature(url_without_query, form)},
    )
    assert refused.status_code == 403


async def test_public_url_with_a_path_prefix(sqlite_url: str) -> None:
    settings = make_settings(sqlite_url, public_url="https://calls.example.org/switchboard/")
    async with running_server(settings) as running, httpx.AsyncClient(base_url=running.url) as http:
        response = await post_signed(
            http,
            "/voice/incoming",
            incoming_form("CA" + "c" * 32),
            public="https://calls.example.org/switchboard",
        )
    assert response.status_code == 200
    assert stream_of(response.text)[0] == "wss://calls.example.org/switchboard/media-stream"


async def test_unknown_number_hears_a_polite_goodbye(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    response = await post_signed(
        client, "/voice/incoming", incoming_form("CA" + "d" * 32, to="+15559990000")
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/xml")
    assert "not set up to take calls" in said_and_hung_up(response.text)
    assert await stored_tokens(services_of(server)) == []


async def test_draining_replica_sends_callers_away_politely(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    services_of(server).draining = True

    response = await post_signed(client, "/voice/incoming", incoming_form("CA" + "e" * 32))
    assert "busy" in said_and_hung_up(response.text)
    ready = await client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["reasons"] == ["draining"]
    assert await stored_tokens(services_of(server)) == []


async def test_full_replica_sends_callers_away_politely(sqlite_url: str) -> None:
    settings = make_settings(sqlite_url, max_concurrent_calls=1)
    async with running_server(settings) as running, httpx.AsyncClient(base_url=running.url) as http:
        first = await post_signed(http, "/voice/incoming", incoming_form("CA" + "f" * 31 + "1"))
        stream_of(first.text)  # the first call is connected
        services_of(running).calls["CA" + "f" * 31 + "1"] = object()  # type: ignore[assignment]

        second = await post_signed(http, "/voice/incoming", incoming_form("CA" + "f" * 31 + "2"))
        metrics = (await http.get("/metrics")).text
    assert "busy" in said_and_hung_up(second.text)
    assert sample(metrics, "switchboard_calls_total", outcome="connected") == 1
    assert sample(metrics, "switchboard_calls_total", outcome="busy") == 1


async def test_oversized_body_is_refused(client: httpx.AsyncClient) -> None:
    form = incoming_form("CA" + "0" * 32, Padding="x" * 70_000)
    response = await post_signed(client, "/voice/incoming", form)
    assert response.status_code == 413


async def test_non_form_body_is_refused(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/voice/incoming",
        json=incoming_form("CA" + "0" * 32),
        headers={"X-Twilio-Signature": "whatever"},
    )
    assert response.status_code == 415


# -- /voice/status -------------------------------------------------------------------------


async def call_events(services: Services, call_sid: str) -> int:
    async with services.db() as session:
        query = select(func.count()).select_from(CallEvent).where(CallEvent.call_sid == call_sid)
        return int(await session.scalar(query) or 0)


async def test_status_callback_is_recorded_once(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    call_sid = "CA" + "5" * 32
    completed = incoming_form(
        call_sid,
        CallStatus="completed",
        CallDuration="42",
        SequenceNumber="2",
        CallbackSource="call-progress-events",
        Timestamp="Tue, 21 Nov 2023 18:00:00 +0000",
        SomeFieldTwilioAddsNextYear="anything",  # unknown params are never rejected
    )
    first = await post_signed(client, "/voice/status", completed)
    again = await post_signed(client, "/voice/status", completed)  # Twilio's retry
    ringing = await post_signed(
        client, "/voice/status", {**completed, "CallStatus": "ringing", "SequenceNumber": "0"}
    )

    assert [first.status_code, again.status_code, ringing.status_code] == [204, 204, 204]
    assert await call_events(services_of(server), call_sid) == 2
    metrics = (await client.get("/metrics")).text
    assert sample(metrics, "switchboard_status_callbacks_total", outcome="recorded") == 2
    assert sample(metrics, "switchboard_status_callbacks_total", outcome="duplicate") == 1


async def test_status_callback_needs_a_signature(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    call_sid = "CA" + "6" * 32
    form = incoming_form(call_sid, CallStatus="completed", SequenceNumber="1")
    response = await client.post("/voice/status", data=form)
    assert response.status_code == 403
    assert await call_events(services_of(server), call_sid) == 0


# -- probes and metrics ----------------------------------------------------------------------


async def test_healthz_and_readyz(client: httpx.AsyncClient) -> None:
    health = await client.get("/healthz")
    ready = await client.get("/readyz")
    assert health.status_code == 200
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "reasons": [], "live_calls": 0}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_readyz_reports_an_unreachable_redis(sqlite_url: str) -> None:
    settings = make_settings(sqlite_url, redis_url=f"redis://127.0.0.1:{closed_port()}/0")
    async with running_server(settings) as running, httpx.AsyncClient(base_url=running.url) as http:
        health = await http.get("/healthz")
        ready = await http.get("/readyz")
    assert health.status_code == 200  # alive: restarting would not bring Redis back
    # Degraded, not unready: callers still reach us and hear a polite "unavailable".
    assert ready.status_code == 200
    (problem,) = ready.json()["degraded"]
    assert problem.startswith("redis: ")


async def test_metrics_are_prometheus_text(client: httpx.AsyncClient) -> None:
    await post_signed(client, "/voice/incoming", incoming_form("CA" + "7" * 32))
    await post_signed(client, "/voice/incoming", incoming_form("CA" + "8" * 32, to="+15550000000"))
    response = await client.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    names = {family.name for family in text_string_to_metric_families(response.text)}
    for expected in (
        "switchboard_active_calls",
        "switchboard_frames_in",
        "switchboard_frames_out",
        "switchboard_frames_dropped",
        "switchboard_barge_ins",
        "switchboard_tool_calls",
        "switchboard_webhook_rejections",
        "switchboard_upstream_errors",
    ):
        assert expected in names
    assert sample(response.text, "switchboard_calls_total", outcome="connected") == 1
    assert sample(response.text, "switchboard_calls_total", outcome="unknown_number") == 1


# -- production-shaped: real Redis and PostgreSQL --------------------------------------------


@pytest.mark.redis
@pytest.mark.postgres
async def test_with_real_redis_and_postgres(redis_url: str, postgres_url: str) -> None:
    settings = make_settings(postgres_url, redis_url=redis_url)
    call_sid = "CA" + "9" * 32
    async with running_server(settings) as running, httpx.AsyncClient(base_url=running.url) as http:
        ready = await http.get("/readyz")
        answer = await post_signed(http, "/voice/incoming", incoming_form(call_sid))
        status = incoming_form(call_sid, CallStatus="completed", SequenceNumber="3")
        first = await post_signed(http, "/voice/status", status)
        again = await post_signed(http, "/voice/status", status)
        services = services_of(running)
        grant = await services.tokens.burn(stream_of(answer.text)[1]["token"], call_sid)
        events = await call_events(services, call_sid)

    assert ready.status_code == 200
    assert grant is not None and grant.tenant == "acme-plumbing"
    assert (first.status_code, again.status_code) == (204, 204)
    assert events == 1


# -- services ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"openai_api_key": "sk-real"}, "sk-real"),
        ({}, None),  # OpenAI itself without a key: nothing to send
        ({"openai_realtime_url": "ws://127.0.0.1:8765/v1/realtime"}, "sk-local-emulator"),
    ],
    ids=["configured", "openai-without-key", "emulator"],
)
async def test_realtime_credentials(
    sqlite_url: str, overrides: dict[str, object], expected: str | None
) -> None:
    services = await open_services(make_settings(sqlite_url, **overrides))
    try:
        assert services.openai_api_key == expected
    finally:
        await services.close()


async def test_drain_gives_up_after_its_timeout(sqlite_url: str) -> None:
    services = await open_services(make_settings(sqlite_url))
    try:
        services.calls["CA-stuck"] = object()  # type: ignore[assignment]
        assert await services.drain(timeout_s=0.05) is False
        assert services.draining
        del services.calls["CA-stuck"]
        assert await services.drain(timeout_s=5) is True
    finally:
        await services.close()
