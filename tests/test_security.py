"""Signature checks, the media upgrade check, one-time stream tokens and log redaction."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from redis.asyncio import Redis
from twilio.request_validator import RequestValidator

from app import security
from app.logging_setup import JsonFormatter, redact_numbers
from app.security import (
    auth_token,
    public_url_for,
    sign,
    signature_problem,
    uses_generated_token,
    validate_ws_upgrade,
)
from app.settings import Settings
from app.stream_tokens import KEY_PREFIX, StreamTokens

# Known-answer vector (twilio-python 9.13.0 and a hand-rolled HMAC agree on it).
VECTOR_TOKEN = "12345"
VECTOR_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
VECTOR_PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Caller": "+12349013030",
    "Digits": "1234",
    "From": "+12349013030",
    "To": "+18005551212",
}
VECTOR_SIGNATURE = "0/KCTR6DLpKmkAf8muzZqo1nDgQ="


def settings_with(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


# -- webhook signatures --------------------------------------------------------------------


def test_known_answer_vector() -> None:
    settings = settings_with(public_url="https://mycompany.com", twilio_auth_token=VECTOR_TOKEN)
    url = public_url_for(settings, "/myapp.php", "foo=1&bar=2")

    assert url == VECTOR_URL
    assert sign(settings, url, VECTOR_PARAMS) == VECTOR_SIGNATURE
    assert signature_problem(settings, url, VECTOR_PARAMS, VECTOR_SIGNATURE) is None


@pytest.mark.parametrize(
    ("signature", "params", "reason"),
    [
        (None, VECTOR_PARAMS, "missing_signature"),
        ("", VECTOR_PARAMS, "missing_signature"),
        ("0/KCTR6DLpKmkAf8muzZqo1nDgQ", VECTOR_PARAMS, "bad_signature"),
        (VECTOR_SIGNATURE, {**VECTOR_PARAMS, "Digits": "9999"}, "bad_signature"),
        (VECTOR_SIGNATURE, {**VECTOR_PARAMS, "Extra": ""}, "bad_signature"),
    ],
    ids=["absent", "empty", "truncated", "tampered", "extra-param"],
)
def test_bad_signatures_say_why(signature: str | None, params: dict[str, str], reason: str) -> None:
    settings = settings_with(public_url="https://mycompany.com", twilio_auth_token=VECTOR_TOKEN)
    assert signature_problem(settings, VECTOR_URL, params, signature) == reason


def test_public_url_decides_never_the_local_address() -> None:
    # Behind a TLS-terminating proxy the app is reached on http://10.0.3.7:8080; Twilio signed
    # the public https URL, and only that rebuild validates.
    settings = settings_with(public_url="https://mycompany.com", twilio_auth_token=VECTOR_TOKEN)
    local = "http://10.0.3.7:8080/myapp.php?foo=1&bar=2"
    signed = RequestValidator(VECTOR_TOKEN).compute_signature(VECTOR_URL, VECTOR_PARAMS)

    assert signature_problem(settings, local, VECTOR_PARAMS, signed) == "bad_signature"
    rebuilt = public_url_for(settings, "/myapp.php", "foo=1&bar=2")
    assert signature_problem(settings, rebuilt, VECTOR_PARAMS, signed) is None


def test_explicit_default_port_in_public_url_still_validates() -> None:
    # Twilio is inconsistent about :443; the validator tries both forms.
    settings = settings_with(public_url="https://mycompany.com:443", twilio_auth_token=VECTOR_TOKEN)
    url = public_url_for(settings, "/myapp.php", "foo=1&bar=2")
    assert signature_problem(settings, url, VECTOR_PARAMS, VECTOR_SIGNATURE) is None


def test_repeated_parameters_are_all_signed() -> None:
    from starlette.datastructures import FormData

    settings = settings_with(public_url="https://a.example", twilio_auth_token="t0ken")
    form = FormData([("Digits", "1"), ("Digits", "2"), ("CallSid", "CA1")])
    url = "https://a.example/voice/incoming"
    good = sign(settings, url, form)
    one_value = sign(settings, url, {"Digits": "2", "CallSid": "CA1"})

    assert good != one_value
    assert signature_problem(settings, url, form, good) is None
    assert signature_problem(settings, url, form, one_value) == "bad_signature"


# -- the embedded token ----------------------------------------------------------------------


def test_without_a_configured_token_a_random_one_is_used_and_checked(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(security, "_process_token", None)
    settings = settings_with(public_url="https://a.example", twilio_auth_token=None)
    url = "https://a.example/voice/incoming"

    with caplog.at_level(logging.WARNING, logger="switchboard.security"):
        token = auth_token(settings)
        again = auth_token(settings)
        signed_by_us = sign(settings, url, {"CallSid": "CA1"})
        signed_elsewhere = RequestValidator("12345").compute_signature(url, {"CallSid": "CA1"})
        unsigned = signature_problem(settings, url, {"CallSid": "CA1"}, None)
        mismatch = signature_problem(settings, url, {"CallSid": "CA1"}, signed_elsewhere)

    assert uses_generated_token(settings)
    assert token == again and len(token) >= 32
    assert signature_problem(settings, url, {"CallSid": "CA1"}, signed_by_us) is None
    assert unsigned == "missing_signature"
    assert mismatch == "no_auth_token"
    warnings = [r.getMessage() for r in caplog.records]
    assert sum("TWILIO_AUTH_TOKEN is not set" in w for w in warnings) == 1  # said once
    assert all(token not in w for w in warnings)


def test_empty_token_counts_as_not_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(security, "_process_token", None)
    settings = settings_with(twilio_auth_token="")
    assert uses_generated_token(settings)
    assert auth_token(settings) != ""


def test_configured_token_is_used_as_is() -> None:
    settings = settings_with(twilio_auth_token="my-real-token")
    assert not uses_generated_token(settings)
    assert auth_token(settings) == "my-real-token"


# -- media WebSocket upgrade -----------------------------------------------------------------

WS_PATH = "/media-stream"


def ws_settings(**values: object) -> Settings:
    return settings_with(
        public_url="https://switchboard.example.com", twilio_auth_token="ws-token", **values
    )


def test_unsigned_upgrade_is_accepted_unless_required() -> None:
    assert validate_ws_upgrade(ws_settings(), {}, WS_PATH) is None
    required = ws_settings(require_ws_signature=True)
    assert validate_ws_upgrade(required, {}, WS_PATH) == "missing_signature"


def test_signed_upgrade_is_checked_against_the_wss_url() -> None:
    validator = RequestValidator("ws-token")
    wss = validator.compute_signature("wss://switchboard.example.com/media-stream", {})
    https = validator.compute_signature("https://switchboard.example.com/media-stream", {})

    for settings in (ws_settings(), ws_settings(require_ws_signature=True)):
        assert validate_ws_upgrade(settings, {"X-Twilio-Signature": wss}, WS_PATH) is None
        assert validate_ws_upgrade(settings, {"x-twilio-signature": wss}, WS_PATH) is None
        assert (
            validate_ws_upgrade(settings, {"X-Twilio-Signature": https}, WS_PATH) == "bad_signature"
        )
        assert (
            validate_ws_upgrade(settings, {"X-Twilio-Signature": "nope"}, WS_PATH)
            == "bad_signature"
        )


def test_upgrade_signature_uses_the_public_path_prefix() -> None:
    settings = settings_with(
        public_url="https://calls.example.org/switchboard", twilio_auth_token="ws-token"
    )
    url = "wss://calls.example.org/switchboard/media-stream"
    signed = RequestValidator("ws-token").compute_signature(url, {})
    assert validate_ws_upgrade(settings, {"X-Twilio-Signature": signed}, WS_PATH) is None
    assert settings.media_stream_url == url


# -- one-time stream tokens (fakeredis and a real redis-server) ------------------------------

CALL = "CA" + "1" * 32


async def test_token_burns_once(kv: Redis) -> None:
    tokens = StreamTokens(kv, ttl_s=120)
    token = await tokens.mint(
        CALL,
        "acme-plumbing",
        "+14155550123",
        "+15005550006",
        persona="dispatcher",
        account_sid="AC" + "0" * 32,
    )

    grant = await tokens.burn(token, CALL)
    assert grant is not None
    assert grant.call_sid == CALL
    assert grant.tenant == "acme-plumbing"
    assert grant.persona == "dispatcher"
    assert (grant.caller, grant.called) == ("+14155550123", "+15005550006")
    assert grant.account_sid == "AC" + "0" * 32
    assert await tokens.burn(token, CALL) is None


async def test_token_for_another_call_is_refused_and_spent(kv: Redis) -> None:
    tokens = StreamTokens(kv, ttl_s=120)
    token = await tokens.mint(CALL, "acme-plumbing", "+1", "+2", persona="dispatcher")

    assert await tokens.burn(token, "CA" + "2" * 32) is None
    assert await tokens.burn(token, CALL) is None


async def test_token_is_stored_hashed_with_a_ttl(kv: Redis) -> None:
    tokens = StreamTokens(kv, ttl_s=90)
    token = await tokens.mint(CALL, "acme-plumbing", "+1", "+2", persona="dispatcher")

    keys = [key async for key in kv.scan_iter(match=KEY_PREFIX + "*")]
    assert len(keys) == 1
    assert token not in keys[0]
    assert token not in str(await kv.get(keys[0]))
    assert 0 < await kv.ttl(keys[0]) <= 90


async def test_only_one_of_many_concurrent_burns_wins(kv: Redis) -> None:
    tokens = StreamTokens(kv, ttl_s=120)
    token = await tokens.mint(CALL, "acme-plumbing", "+1", "+2", persona="dispatcher")

    results = await asyncio.gather(*(tokens.burn(token, CALL) for _ in range(20)))
    assert sum(grant is not None for grant in results) == 1


@pytest.mark.parametrize(
    ("token", "call_sid"),
    [
        ("", CALL),
        ("short", CALL),
        ("x" * 43 + "?", CALL),
        (None, CALL),
        (12345, CALL),
        ("A" * 43, ""),
        ("A" * 43, None),
    ],
)
async def test_malformed_input_is_refused_without_error(
    fake_kv: Redis, token: object, call_sid: object
) -> None:
    assert await StreamTokens(fake_kv, ttl_s=120).burn(token, call_sid) is None


async def test_foreign_value_under_a_token_key_is_refused(fake_kv: Redis) -> None:
    tokens = StreamTokens(fake_kv, ttl_s=120)
    token = await tokens.mint(CALL, "acme-plumbing", "+1", "+2", persona="dispatcher")
    (key,) = [key async for key in fake_kv.scan_iter(match=KEY_PREFIX + "*")]
    await fake_kv.set(key, "not json")
    assert await tokens.burn(token, CALL) is None


async def test_mint_needs_a_call_sid(fake_kv: Redis) -> None:
    with pytest.raises(ValueError):
        await StreamTokens(fake_kv, ttl_s=120).mint("", "t", "+1", "+2", persona="dispatcher")


# -- log redaction -------------------------------------------------------------------------


def test_phone_numbers_keep_only_their_last_four_digits() -> None:
    assert redact_numbers("call from +14155550123 to +15005550006") == (
        "call from +*******0123 to +*******0006"
    )
    assert (
        redact_numbers("GET /x?From=%2B14155550123 HTTP/1.1")
        == "GET /x?From=%2B*******0123 HTTP/1.1"
    )
    sid = "CA0123456789abcdef0123456789abcdef"
    assert redact_numbers(f"{sid} port 8080 at 2025-01-01") == f"{sid} port 8080 at 2025-01-01"


def test_json_lines_redact_message_and_extra_fields() -> None:
    record = logging.LogRecord(
        "switchboard.voice", logging.INFO, __file__, 1, "call from %s", ("+14155550123",), None
    )
    record.__dict__.update(
        {
            "to": "+15005550006",
            "call_sid": "CA" + "1" * 32,
            "live": 3,
            "owners": ["+15005550100"],
            "nested": {"from": "+14155550123"},
        }
    )
    line = json.loads(JsonFormatter().format(record))

    assert line["msg"] == "call from +*******0123"
    assert line["to"] == "+*******0006"
    assert line["call_sid"] == "CA" + "1" * 32
    assert line["live"] == 3
    assert line["owners"] == ["+*******0100"]
    assert line["nested"] == {"from": "+*******0123"}
    assert (line["level"], line["logger"]) == ("info", "switchboard.voice")
    unredacted = json.loads(JsonFormatter(redact=False).format(record))
    assert unredacted["msg"] == "call from +14155550123"
