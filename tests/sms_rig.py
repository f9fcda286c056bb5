"""The SMS test rig: the real server on loopback, the Chat Completions emulator, the fake
Twilio REST API and a lead webhook receiver; helpers to text the server the way Twilio does."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import httpx
import orjson
from openai.types.chat import ChatCompletion
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from twilio.request_validator import RequestValidator

from app.embedded import RunningServer, bind_loopback, running_server
from app.settings import Settings
from bridge.sim.chat_emulator import ChatEmulator, run_chat_emulator
from bridge.sim.loopback_http import serve_loopback
from bridge.sim.twilio_rest import FakeTwilio, run_twilio_rest
from prompts.profiles import DEMO_PROFILES_FILE
from tools.lead_webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify

AUTH_TOKEN = "sms-test-auth-token"
ACCOUNT_SID = "AC" + "d" * 32
BUSINESS = "+15005550006"  # acme-plumbing
OWNER = "+15005550100"
CUSTOMER = "+15555550177"
WEBHOOK_SECRET = "lead-hook-secret"


@dataclass(slots=True)
class HookReceiver:
    url: str = ""
    received: list[dict[str, Any]] = field(default_factory=list)
    bad_signatures: int = 0


@dataclass(slots=True)
class SmsStack:
    server: RunningServer
    chat: ChatEmulator | None
    twilio: FakeTwilio
    hooks: HookReceiver

    @property
    def services(self) -> Any:
        return self.server.app.state.services

    @property
    def url(self) -> str:
        return self.server.url

    async def settle(self) -> None:
        """Until every queued text, webhook and deferred reply has finished."""
        assert await self.services.notifier.drain(20)


@contextlib.asynccontextmanager
async def _hook_receiver() -> AsyncIterator[HookReceiver]:
    hooks = HookReceiver()

    async def receive(request: Request) -> Response:
        body = await request.body()
        if not verify(
            WEBHOOK_SECRET,
            request.headers.get(TIMESTAMP_HEADER, ""),
            body,
            request.headers.get(SIGNATURE_HEADER, ""),
        ):
            hooks.bad_signatures += 1
            return Response(status_code=401)
        hooks.received.append(orjson.loads(body))
        return Response(status_code=204)

    async with serve_loopback(Starlette(routes=[Route("/hook", receive, methods=["POST"])])) as url:
        hooks.url = url + "/hook"
        yield hooks


@contextlib.asynccontextmanager
async def sms_stack(
    tmp_path: Path,
    *,
    database_url: str,
    redis_url: str | None = None,
    with_model: bool = True,
    **overrides: Any,
) -> AsyncIterator[SmsStack]:
    async with contextlib.AsyncExitStack() as stack:
        chat = await stack.enter_async_context(run_chat_emulator()) if with_model else None
        twilio = await stack.enter_async_context(run_twilio_rest(ACCOUNT_SID, AUTH_TOKEN))
        hooks = await stack.enter_async_context(_hook_receiver())
        profiles = tmp_path / "profiles.toml"
        profiles.write_text(
            DEMO_PROFILES_FILE.read_text().replace(
                '# webhook_url = "https://hook.example.com/lead"', f'webhook_url = "{hooks.url}"'
            )
        )
        sock = bind_loopback()
        values: dict[str, Any] = {
            "public_url": f"http://127.0.0.1:{sock.getsockname()[1]}",
            "twilio_auth_token": AUTH_TOKEN,
            "twilio_account_sid": ACCOUNT_SID,
            "twilio_api_url": twilio.url,
            "database_url": database_url,
            "redis_url": redis_url,
            "profiles_file": profiles,
            "sms_send_backoff_s": 0.01,
            "lead_webhook_secret": WEBHOOK_SECRET,
            "sms_model_fast": "emu-fast",
            "sms_model_standard": "emu-standard",
            "sms_model_reasoning": "emu-reasoning",
        }
        if chat is not None:
            values |= {"openai_base_url": chat.base_url, "openai_api_key": "sk-test"}
        config = Settings(_env_file=None, **(values | overrides))  # type: ignore[call-arg]
        server = await stack.enter_async_context(running_server(config, sock))
        yield SmsStack(server, chat, twilio, hooks)
    # Everything the engine was answered with is a ChatCompletion as the openai SDK defines it.
    for raw in chat.responses if chat is not None else []:
        ChatCompletion.model_validate(raw, strict=True)


def inbound_params(
    body: str,
    *,
    sid: str | None = None,
    from_: str = CUSTOMER,
    to: str = BUSINESS,
    media: Sequence[str] = (),
) -> dict[str, str]:
    params = {
        "MessageSid": sid or "SM" + secrets.token_hex(16),
        "AccountSid": ACCOUNT_SID,
        "From": from_,
        "To": to,
        "Body": body,
        "NumMedia": str(len(media)),
        "NumSegments": "1",
        "SmsStatus": "received",
        "ApiVersion": "2010-04-01",
    }
    for index, url in enumerate(media):
        params[f"MediaUrl{index}"] = url
        params[f"MediaContentType{index}"] = "image/jpeg"
    return params


async def post_signed(
    stack: SmsStack, path: str, params: dict[str, str], *, token: str = AUTH_TOKEN
) -> httpx.Response:
    url = stack.url + path
    signature = RequestValidator(token).compute_signature(url, params)
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(url, data=params, headers={"X-Twilio-Signature": signature})


async def text(stack: SmsStack, body: str, **kw: Any) -> httpx.Response:
    """Text the business as a customer (a signed /sms/incoming, as Twilio sends it)."""
    return await post_signed(stack, "/sms/incoming", inbound_params(body, **kw))


def replies(response: httpx.Response) -> list[str]:
    """The <Message> bodies of a TwiML answer (validated as XML with a <Response> root)."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/xml")
    root = ElementTree.fromstring(response.text)
    assert root.tag == "Response"
    return [m.text or "" for m in root.findall("Message")]
