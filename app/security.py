"""Is this request really from Twilio? Webhook signatures and the media WebSocket upgrade.

Twilio signs every webhook with HMAC-SHA1 over the URL it requested plus the sorted form
parameters, keyed with the account's auth token (`X-Twilio-Signature`). We run behind
TLS-terminating proxies, so the URL we see (`http://10.0.3.7:8080/...`) is not the one Twilio
signed: the URL is rebuilt from `PUBLIC_URL` + the request path (+ query string), never from the
`Host` header. twilio's own `RequestValidator` does the arithmetic and the constant-time compare.

Security by default: with no `TWILIO_AUTH_TOKEN` configured the process invents a random token
at startup and still checks every signature, so an unconfigured server refuses the world
instead of trusting it. The in-process demo and tests sign with `auth_token(settings)`.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from twilio.request_validator import RequestValidator

if TYPE_CHECKING:
    from starlette.requests import Request

    from app.settings import Settings

log = logging.getLogger("switchboard.security")

SIGNATURE_HEADER = "X-Twilio-Signature"
# Twilio's webhooks are a few hundred bytes to a few KiB; nothing legitimate comes near this.
# The default of MAX_WEBHOOK_BYTES (the setting), which is what is enforced.
MAX_WEBHOOK_BYTES = 64 * 1024
# Twilio sends a few dozen parameters; parse_qsl refuses bodies with more than this many.
MAX_WEBHOOK_FIELDS = 500

_FORM_TYPE = "application/x-www-form-urlencoded"
_process_token: str | None = None


# -- the auth token ----------------------------------------------------------------------


def auth_token(settings: Settings) -> str:
    """The token webhooks are signed with: TWILIO_AUTH_TOKEN, else one random per process."""
    configured = _configured_token(settings)
    if configured is not None:
        return configured
    global _process_token
    if _process_token is None:
        _process_token = secrets.token_urlsafe(32)
        log.warning(
            "TWILIO_AUTH_TOKEN is not set: using a random per-process token, so only this "
            "process (the demo, the simulated caller started from it) can sign webhooks and "
            "real Twilio requests will be refused. Set TWILIO_AUTH_TOKEN to your Twilio "
            "account's auth token (Console > Account > API keys & tokens) to take real calls."
        )
    return _process_token


def uses_generated_token(settings: Settings) -> bool:
    return _configured_token(settings) is None


def _configured_token(settings: Settings) -> str | None:
    if settings.twilio_auth_token is None:
        return None
    return settings.twilio_auth_token.get_secret_value() or None


# -- URLs as Twilio sees them --------------------------------------------------------------


def public_url_for(
    settings: Settings, path: str, query: str = "", *, websocket: bool = False
) -> str:
    """The URL Twilio requested: PUBLIC_URL (which may carry a path prefix) + path (+ ?query).

    `websocket=True` gives the ws(s):// form, which is what Twilio signs on WebSocket upgrades.
    """
    base = settings.public_url.rstrip("/")
    if websocket:
        scheme, sep, rest = base.partition("://")
        base = {"https": "wss", "http": "ws"}.get(scheme, scheme) + sep + rest
    url = base + path
    return f"{url}?{query}" if query else url


def sign(settings: Settings, url: str, params: Mapping[str, str]) -> str:
    """X-Twilio-Signature for a request to `url` with form `params` (what Twilio would send)."""
    return RequestValidator(auth_token(settings)).compute_signature(url, params)


# -- checks --------------------------------------------------------------------------------


def signature_problem(
    settings: Settings, url: str, params: Mapping[str, str], signature: str | None
) -> str | None:
    """None if `signature` is Twilio's for `url` + `params`, else why not (a metric label)."""
    if not signature:
        return "missing_signature"
    if RequestValidator(auth_token(settings)).validate(url, params, signature):
        return None
    return "no_auth_token" if uses_generated_token(settings) else "bad_signature"


def validate_ws_upgrade(settings: Settings, headers: Mapping[str, str], path: str) -> str | None:
    """None if the media WebSocket upgrade may proceed, else the reason to refuse it.

    Whether Twilio signs Media Streams upgrades is not settled, so a present signature is always
    checked (against the wss:// form of PUBLIC_URL + path, no params) and an absent one is
    accepted unless REQUIRE_WS_SIGNATURE is set. The one-time stream token is checked later,
    on the `start` message, either way.
    """
    signature = _header(headers, SIGNATURE_HEADER)
    if not signature:
        if settings.require_ws_signature:
            _log_rejection(path, "missing_signature", url=None)
            return "missing_signature"
        return None
    url = public_url_for(settings, path, websocket=True)
    problem = signature_problem(settings, url, {}, signature)
    if problem is not None:
        _log_rejection(path, problem, url=url)
    return problem


async def verified_form(request: Request) -> FormData:
    """The webhook's form parameters, all of them as received, once the signature checks out.

    Raises HTTPException: 413 (body over `max_webhook_bytes`), 415 (not form-encoded), 400
    (unparseable body), 403 (signature missing or wrong). Each refusal is logged with its
    reason and counted in `webhook_rejections`.
    """
    services = request.app.state.services
    settings: Settings = services.settings
    path = request.url.path

    def refuse(status: int, reason: str, url: str | None = None) -> HTTPException:
        services.metrics.webhook_rejections.labels(reason).inc()
        _log_rejection(path, reason, url=url)
        return HTTPException(status)

    body = await _read_capped(request, settings.max_webhook_bytes)
    if body is None:
        raise refuse(413, "too_large")
    media_type = request.headers.get("content-type", _FORM_TYPE).split(";", 1)[0].strip().lower()
    if media_type != _FORM_TYPE:
        raise refuse(415, "unsupported_media_type")
    try:
        text = body.decode("utf-8")
        pairs = parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_WEBHOOK_FIELDS)
    except ValueError:  # includes UnicodeDecodeError and too many fields
        raise refuse(400, "bad_body") from None
    form = FormData(pairs)

    query = request.scope.get("query_string", b"").decode("latin-1")
    url = public_url_for(settings, path, query)
    problem = signature_problem(settings, url, form, request.headers.get(SIGNATURE_HEADER))
    if problem is not None:
        raise refuse(403, problem, url=url)
    return form


async def _read_capped(request: Request, limit: int) -> bytes | None:
    """The request body, or None as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    # Starlette's Headers are case-insensitive; a plain dict (tests, other callers) may not be.
    return headers.get(name) or headers.get(name.lower())


_WHY = {
    "missing_signature": "no X-Twilio-Signature header",
    "bad_signature": "X-Twilio-Signature does not match (is PUBLIC_URL exactly the URL "
    "configured in Twilio, scheme and path prefix included?)",
    "no_auth_token": "X-Twilio-Signature does not match and TWILIO_AUTH_TOKEN is not configured "
    "(this process made up a random token); set TWILIO_AUTH_TOKEN",
    "too_large": "body over MAX_WEBHOOK_BYTES",
    "unsupported_media_type": f"body is not {_FORM_TYPE}",
    "bad_body": "body is not valid form encoding",
}


def _log_rejection(path: str, reason: str, *, url: str | None) -> None:
    log.warning(
        "rejected request to %s: %s",
        path,
        _WHY.get(reason, reason),
        extra={"reason": reason, "signed_url_expected": url},
    )
