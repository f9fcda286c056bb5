"""A loopback stand-in for Twilio's REST API: `POST /2010-04-01/Accounts/{Sid}/Messages.json`.

It refuses what Twilio refuses, with Twilio's status codes and error codes: no or wrong HTTP
basic auth (401, 20003), an account in the path other than the authenticated one (404, 20404),
a missing `To` (21604), a missing `From` and `MessagingServiceSid` (21603), a missing `Body`
and `MediaUrl` (21602), a body over 1600 characters (21617). Accepted messages get a 201 with
Twilio-shaped JSON (an `SM…` sid, status `queued`) and are kept in `messages` for assertions.
`fail_next(n)` makes the next `n` requests fail with a 500 first (retry tests).

    async with run_twilio_rest(account_sid, auth_token) as twilio:
        ... TWILIO_API_URL = twilio.url ...
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bridge.sim.loopback_http import serve_loopback

API_VERSION = "2010-04-01"
MAX_BODY_CHARS = 1600
_FORM = "application/x-www-form-urlencoded"


@dataclass(slots=True)
class SentMessage:
    sid: str
    account_sid: str
    to: str
    from_: str | None
    messaging_service_sid: str | None
    body: str
    media_urls: list[str]
    status_callback: str | None
    form: dict[str, str]


@dataclass(slots=True)
class FakeTwilio:
    account_sid: str
    auth_token: str
    url: str = ""
    messages: list[SentMessage] = field(default_factory=list)
    # Every request that reached the messages route (accepted, refused or failed on purpose).
    attempts: int = 0
    _failures_left: int = 0
    _failure_status: int = 500

    def fail_next(self, count: int, status: int = 500) -> None:
        """Answer the next `count` requests with `status` (an internal error, as Twilio can)."""
        self._failures_left = count
        self._failure_status = status


def _error(status: int, code: int, message: str) -> JSONResponse:
    return JSONResponse(
        {
            "code": code,
            "message": message,
            "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status,
        },
        status_code=status,
    )


def _authenticated(request: Request, twilio: FakeTwilio) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return secrets.compare_digest(user, twilio.account_sid) and secrets.compare_digest(
        password, twilio.auth_token
    )


def build_app(twilio: FakeTwilio) -> Starlette:
    async def create_message(request: Request) -> JSONResponse:
        twilio.attempts += 1
        if twilio._failures_left > 0:
            twilio._failures_left -= 1
            return _error(twilio._failure_status, 20500, "Internal Server Error")
        if not _authenticated(request, twilio):
            return _error(401, 20003, "Authenticate")
        account = request.path_params["account_sid"]
        if account != twilio.account_sid:
            return _error(404, 20404, "The requested resource was not found")
        media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type != _FORM:
            return _error(400, 20001, f"Content-Type must be {_FORM}")
        try:
            # Form bodies are small; parse_qsl keeps repeated fields (MediaUrl) in order.
            form = FormData(parse_qsl((await request.body()).decode(), keep_blank_values=True))
        except (UnicodeDecodeError, ValueError):
            return _error(400, 20001, "Unable to parse the request body")
        to = str(form.get("To") or "")
        from_ = str(form.get("From") or "") or None
        service = str(form.get("MessagingServiceSid") or "") or None
        body = str(form.get("Body") or "")
        media = [str(u) for u in form.getlist("MediaUrl") if u]
        if not to:
            return _error(400, 21604, "A 'To' phone number is required.")
        if from_ is None and service is None:
            return _error(400, 21603, "A 'From' phone number is required.")
        if not body and not media:
            return _error(400, 21602, "Message body is required.")
        if len(body) > MAX_BODY_CHARS:
            return _error(
                400, 21617, "The concatenated message body exceeds the 1600 character limit."
            )
        sid = "SM" + secrets.token_hex(16)
        callback = str(form.get("StatusCallback") or "") or None
        twilio.messages.append(
            SentMessage(
                sid=sid,
                account_sid=account,
                to=to,
                from_=from_,
                messaging_service_sid=service,
                body=body,
                media_urls=media,
                status_callback=callback,
                form={k: str(v) for k, v in form.items()},
            )
        )
        return JSONResponse(_message_json(account, sid, to, from_, service, body, media), 201)

    route = f"/{API_VERSION}/Accounts/{{account_sid}}/Messages.json"
    return Starlette(routes=[Route(route, create_message, methods=["POST"])])


def _message_json(
    account: str,
    sid: str,
    to: str,
    from_: str | None,
    service: str | None,
    body: str,
    media: list[str],
) -> dict[str, Any]:
    now = format_datetime(datetime.now(UTC), usegmt=True)
    uri = f"/{API_VERSION}/Accounts/{account}/Messages/{sid}.json"
    return {
        "account_sid": account,
        "api_version": API_VERSION,
        "body": body,
        "date_created": now,
        "date_sent": None,
        "date_updated": now,
        "direction": "outbound-api",
        "error_code": None,
        "error_message": None,
        "from": from_,
        "messaging_service_sid": service,
        "num_media": str(len(media)),
        "num_segments": str(max(1, -(-len(body) // 153))),
        "price": None,
        "price_unit": "USD",
        "sid": sid,
        "status": "accepted" if service and not from_ else "queued",
        "subresource_uris": {"media": uri.removesuffix(".json") + "/Media.json"},
        "to": to,
        "uri": uri,
    }


@contextlib.asynccontextmanager
async def run_twilio_rest(
    account_sid: str, auth_token: str, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[FakeTwilio]:
    """Run the fake for the block; its `url` is the value for TWILIO_API_URL."""
    twilio = FakeTwilio(account_sid=account_sid, auth_token=auth_token)
    async with serve_loopback(build_app(twilio), host, port) as url:
        twilio.url = url
        yield twilio
