"""Webhooks fuzzed over real HTTP: random forms (correctly signed, so the handlers really run),
random bodies, content types, sizes and signatures. Whatever arrives, the answer is a
deliberate one (TwiML, 204, or a 4xx naming the problem), never a 500, and the server stays up.

The server runs in a thread of its own (uvicorn on loopback) so that hypothesis can drive it
with a plain synchronous client.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.embedded import running_server
from app.settings import Settings
from tests.e2e import AUTH_TOKEN, BUSINESS_NUMBER, signed_headers

FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
SIGNED_PATHS = ("/voice/incoming", "/voice/status", "/sms/status")
ALL_PATHS = (*SIGNED_PATHS, "/sms/incoming")
ANSWERS = {200, 204, 400, 403, 413, 415}

form_keys = st.sampled_from(
    ("CallSid", "From", "To", "CallStatus", "SequenceNumber", "CallDuration", "Timestamp",
     "AccountSid", "Direction", "MessageSid", "MessageStatus", "Body", "NumMedia", "ErrorCode",
     "StreamEvent", "MediaUrl0", "")
) | st.text(max_size=20)  # fmt: skip
form_values = st.one_of(
    st.text(max_size=60),
    st.sampled_from((BUSINESS_NUMBER, "+15005550199", "anonymous", "", "completed", "-1",
                     "99999999999999999999", "Tue, 21 Nov 2023 18:00:00 +0000", "0" * 5000)),
    st.integers().map(str),
)  # fmt: skip
forms = st.dictionaries(form_keys, form_values, max_size=12)


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Settings]]:
    tmp: Path = tmp_path_factory.mktemp("fuzz-webhooks")
    ready = threading.Event()
    stop = threading.Event()
    found: dict[str, object] = {}

    async def serve() -> None:
        config = Settings(
            _env_file=None,  # type: ignore[call-arg]
            twilio_auth_token=AUTH_TOKEN,
            database_url=f"sqlite+aiosqlite:///{tmp}/fuzz.db",
            spool_dir=tmp / "spool",
            max_calls_per_caller_per_min=0,  # the fuzzer calls from a few numbers, often
        )
        async with running_server(config) as server:
            found["url"], found["settings"] = server.url, config
            ready.set()
            while not stop.is_set():  # noqa: ASYNC110 - a thread's Event has no awaitable form
                await asyncio.sleep(0.05)

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(60), "server did not start"
    try:
        yield str(found["url"]), found["settings"]  # type: ignore[misc]
    finally:
        stop.set()
        thread.join(30)


@pytest.fixture(scope="module")
def http(server_url: tuple[str, Settings]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server_url[0], timeout=30) as client:
        yield client


@FUZZ
@given(path=st.sampled_from(SIGNED_PATHS), form=forms)
def test_signed_random_forms_get_a_deliberate_answer(
    http: httpx.Client, server_url: tuple[str, Settings], path: str, form: dict[str, str]
) -> None:
    # Correctly signed, so verification passes and the handler itself meets the garbage.
    url = server_url[1].public_url + path
    response = http.post(path, data=form, headers=signed_headers(url, form))
    assert response.status_code in ANSWERS, (path, form, response.text[:300])


@FUZZ
@given(
    path=st.sampled_from(ALL_PATHS),
    body=st.binary(max_size=3000) | st.text(max_size=3000).map(str.encode),
    content_type=st.sampled_from(
        (
            "application/x-www-form-urlencoded",
            "application/json",
            "text/plain",
            "",
            "multipart/form-data; boundary=x",
        )
    ),
    # Header values a client can send at all: printable ASCII without surrounding whitespace
    # (HTTP strips it; h11 refuses to send a value like " ").
    signature=st.none()
    | st.text(max_size=40).filter(lambda s: s.isascii() and s.isprintable() and s == s.strip()),
)
def test_random_bodies_and_signatures_are_refused_cleanly(
    http: httpx.Client, path: str, body: bytes, content_type: str, signature: str | None
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    if signature is not None:
        headers["X-Twilio-Signature"] = signature
    response = http.post(path, content=body, headers=headers)
    assert response.status_code in ANSWERS - {200, 204}, (path, body[:100], response.status_code)


def test_huge_and_endless_bodies_are_cut_off(http: httpx.Client) -> None:
    assert http.post("/voice/incoming", content=b"a=" + b"x" * 2_000_000).status_code == 413

    def endless() -> Iterator[bytes]:  # chunked, no Content-Length: the cap is on what arrives
        for _ in range(1_000):
            yield b"x" * 10_000

    assert http.post("/voice/incoming", content=endless()).status_code == 413
    too_many = "&".join(f"k{i}=v" for i in range(5_000)).encode()
    assert http.post("/voice/status", content=too_many).status_code in (400, 413)


def test_the_server_is_still_healthy_after_the_fuzzing(http: httpx.Client) -> None:
    assert http.get("/healthz").status_code == 200
    assert http.get("/readyz").status_code == 200
    # One refusal of our own, so the check below does not depend on what the fuzzer drew.
    forged = http.post(
        "/voice/incoming", data={"CallSid": "CA1"}, headers={"X-Twilio-Signature": "forged"}
    )
    assert forged.status_code == 403
    metrics = http.get("/metrics").text
    assert 'switchboard_webhook_rejections_total{reason="bad_signature"}' in metrics
