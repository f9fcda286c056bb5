"""A loopback stand-in for OpenAI's Chat Completions API (`POST /v1/chat/completions`).

Scripted: tests queue what the "model" answers next — text, one tool call, or several in
parallel — either as fixed replies or as functions of the request (to echo a confirmation id
the system prompt carried, say). With the queue empty it answers a fixed text.

It refuses what OpenAI refuses, so a client bug shows up here and not in production: no
bearer token (401), a body without `model` or `messages` (400), a `tool` message that answers
no preceding `tool_calls` id, or an assistant `tool_calls` message whose ids are not all
answered before the next turn (400). Every response is a `ChatCompletion` as the official
`openai` SDK parses it (tests validate that with `ChatCompletion.model_validate`).

    async with run_chat_emulator() as chat:
        chat.script(say("Hi!"), call("capture_lead", {...}), ...)
        AsyncOpenAI(api_key="x", base_url=chat.base_url)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bridge.sim.loopback_http import serve_loopback

DEFAULT_TEXT = "Thanks for your message. Someone from the team will get back to you shortly."


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: dict[str, Any] | str  # a str is sent as is (to test invalid JSON handling)


@dataclass(frozen=True, slots=True)
class Reply:
    """One scripted completion: text, tool calls, or both; optionally late by `delay_s`."""

    text: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    delay_s: float = 0.0


Responder = Callable[[dict[str, Any]], Reply]


def say(text: str, *, delay_s: float = 0.0) -> Reply:
    return Reply(text=text, delay_s=delay_s)


def call(
    name: str, arguments: dict[str, Any] | str | None = None, *, delay_s: float = 0.0
) -> Reply:
    return Reply(
        tool_calls=(ToolCall(name, {} if arguments is None else arguments),), delay_s=delay_s
    )


def calls(*tool_calls: tuple[str, dict[str, Any] | str]) -> Reply:
    """Several tool calls in one turn (parallel tool calls)."""
    return Reply(tool_calls=tuple(ToolCall(n, a) for n, a in tool_calls))


class RequestRefused(ValueError):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(slots=True)
class ChatEmulator:
    api_key: str | None = None  # None: any bearer token is accepted, as long as there is one
    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    responses: list[dict[str, Any]] = field(default_factory=list)  # what it answered, in order
    refusals: list[str] = field(default_factory=list)
    default: Reply = field(default_factory=lambda: Reply(text=DEFAULT_TEXT))
    _queue: deque[Reply | Responder] = field(default_factory=deque)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def base_url(self) -> str:
        """The value for OPENAI_BASE_URL / AsyncOpenAI(base_url=...)."""
        return self.url + "/v1"

    def script(self, *replies: Reply | Responder) -> None:
        """Queue what the next requests are answered with, in order."""
        self._queue.extend(replies)

    @property
    def pending(self) -> int:
        return len(self._queue)

    # -- the protocol (no I/O) --------------------------------------------------------------

    def check(self, body: Any) -> None:
        """Refuse a request body the way OpenAI would (raises RequestRefused)."""
        if not isinstance(body, dict):
            raise RequestRefused(400, "We could not parse the JSON body of your request.")
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise RequestRefused(400, "you must provide a model parameter", "missing_required")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestRefused(400, "'messages' must be a non-empty array", "missing_required")
        open_ids: set[str] = set()
        for index, message in enumerate(messages):
            role = message.get("role") if isinstance(message, dict) else None
            if role not in {"system", "developer", "user", "assistant", "tool"}:
                raise RequestRefused(400, f"messages[{index}]: invalid role {role!r}")
            if role == "tool":
                tool_call_id = message.get("tool_call_id")
                if tool_call_id not in open_ids:
                    raise RequestRefused(
                        400,
                        f"messages[{index}]: messages with role 'tool' must be a response to "
                        "a preceeding message with 'tool_calls'.",
                    )
                open_ids.discard(tool_call_id)
                continue
            if open_ids:
                raise RequestRefused(
                    400,
                    "An assistant message with 'tool_calls' must be followed by tool messages "
                    f"responding to each 'tool_call_id'. Missing: {sorted(open_ids)}",
                )
            if role == "assistant":
                for tool_call in message.get("tool_calls") or []:
                    open_ids.add(tool_call["id"])
        if open_ids:
            raise RequestRefused(400, f"tool calls without tool messages: {sorted(open_ids)}")

    def next_reply(self, body: dict[str, Any]) -> Reply:
        scripted = self._queue.popleft() if self._queue else self.default
        reply = scripted(body) if callable(scripted) else scripted
        if reply.tool_calls and (body.get("tool_choice") == "none" or not body.get("tools")):
            # The model cannot call tools it was not offered: it answers in words instead.
            return Reply(text=reply.text or self.default.text, delay_s=reply.delay_s)
        return reply

    def completion(self, body: dict[str, Any], reply: Reply) -> dict[str, Any]:
        tool_calls = [
            {
                "id": f"call_{secrets.token_hex(6)}",
                "type": "function",
                "function": {
                    "name": tc.name,
                    "arguments": tc.arguments
                    if isinstance(tc.arguments, str)
                    else orjson.dumps(tc.arguments).decode(),
                },
            }
            for tc in reply.tool_calls
        ]
        message: dict[str, Any] = {
            "role": "assistant",
            "content": reply.text,
            "refusal": None,
            "annotations": [],
        }
        if tool_calls:
            message["tool_calls"] = tool_calls
        prompt_tokens = sum(len(str(m.get("content") or "")) for m in body["messages"]) // 4
        completion_tokens = len(reply.text or "") // 4 + 10 * len(tool_calls)
        return {
            "id": f"chatcmpl-emu{next(self._ids):06d}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": "tool_calls" if tool_calls else "stop",
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "system_fingerprint": "fp_emulator",
        }

    # -- HTTP -------------------------------------------------------------------------------

    def _authorised(self, request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        return self.api_key is None or secrets.compare_digest(token, self.api_key)

    async def handle(self, request: Request) -> Response:
        if not self._authorised(request):
            return _error(401, "Incorrect API key provided.", "invalid_api_key")
        try:
            body = orjson.loads(await request.body())
            self.check(body)
        except orjson.JSONDecodeError:
            self.refusals.append("bad json")
            return _error(400, "We could not parse the JSON body of your request.", None)
        except RequestRefused as refused:
            self.refusals.append(str(refused))
            return _error(refused.status, str(refused), refused.code)
        self.requests.append(body)
        reply = self.next_reply(body)
        if reply.delay_s > 0:
            await asyncio.sleep(reply.delay_s)
        completion = self.completion(body, reply)
        self.responses.append(completion)
        return JSONResponse(completion)


def _error(status: int, message: str, code: str | None) -> JSONResponse:
    kind = "invalid_request_error"
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": code}},
        status_code=status,
    )


def build_app(emulator: ChatEmulator) -> Starlette:
    return Starlette(routes=[Route("/v1/chat/completions", emulator.handle, methods=["POST"])])


@contextlib.asynccontextmanager
async def run_chat_emulator(
    *, api_key: str | None = None, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[ChatEmulator]:
    """Run the emulator for the block; `base_url` is the value for OPENAI_BASE_URL."""
    emulator = ChatEmulator(api_key=api_key)
    async with serve_loopback(build_app(emulator), host, port) as url:
        emulator.url = url
        yield emulator
