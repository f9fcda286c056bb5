"""The Chat Completions emulator, driven through the official openai SDK.

Every response is validated with `ChatCompletion.model_validate` (strictly, and dumped back to
the same JSON), so what the SMS engine is tested against is what the SDK accepts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletion

from bridge.sim.chat_emulator import (
    DEFAULT_TEXT,
    ChatEmulator,
    Reply,
    call,
    calls,
    run_chat_emulator,
    say,
)

TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "capture_lead",
            "description": "Take a job request.",
            "parameters": {"type": "object", "properties": {"name": {"type": "string"}}},
        },
    }
]


@pytest.fixture
async def chat() -> AsyncIterator[ChatEmulator]:
    async with run_chat_emulator(api_key="sk-test") as emulator:
        yield emulator


def _client(chat: ChatEmulator, key: str = "sk-test") -> AsyncOpenAI:
    return AsyncOpenAI(api_key=key, base_url=chat.base_url, max_retries=0, timeout=5)


def assert_valid_completion(raw: dict[str, Any]) -> ChatCompletion:
    completion = ChatCompletion.model_validate(raw, strict=True)
    assert completion.model_dump(mode="json", exclude_unset=True) == raw
    return completion


async def _raw(chat: ChatEmulator, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.post(
            f"{chat.base_url}/chat/completions",
            json=body,
            headers={"Authorization": "Bearer sk-test"},
        )


async def test_text_reply_through_the_sdk(chat: ChatEmulator) -> None:
    chat.script(say("Hello there!"))
    async with _client(chat) as client:
        completion = await client.chat.completions.create(
            model="gpt-4.1-mini", messages=[{"role": "user", "content": "hi"}]
        )
    assert completion.choices[0].message.content == "Hello there!"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "gpt-4.1-mini"
    assert chat.requests[0]["messages"] == [{"role": "user", "content": "hi"}]


async def test_every_kind_of_reply_validates_against_the_sdk(chat: ChatEmulator) -> None:
    chat.script(
        say("plain"),
        call("capture_lead", {"name": "Ann"}),
        calls(("capture_lead", {"name": "A"}), ("escalate", {"category": "emergency"})),
        call("capture_lead", "{not json"),
        Reply(text="both", tool_calls=call("x").tool_calls),
    )
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": TOOLS}
    kinds = []
    for _ in range(6):  # the sixth is the default reply
        response = await _raw(chat, body)
        assert response.status_code == 200
        completion = assert_valid_completion(response.json())
        message = completion.choices[0].message
        kinds.append((message.content, len(message.tool_calls or [])))
    assert kinds == [
        ("plain", 0),
        (None, 1),
        (None, 2),
        (None, 1),
        ("both", 1),
        (DEFAULT_TEXT, 0),
    ]


async def test_parallel_tool_calls_and_the_follow_up(chat: ChatEmulator) -> None:
    chat.script(
        calls(("capture_lead", {"name": "A"}), ("capture_lead", {"name": "B"})),
        say("Both saved."),
    )
    messages: list[Any] = [{"role": "user", "content": "two jobs"}]
    async with _client(chat) as client:
        first = await client.chat.completions.create(model="m", messages=messages, tools=TOOLS)
        message = first.choices[0].message
        assert first.choices[0].finish_reason == "tool_calls"
        tool_calls = message.tool_calls or []
        names = [orjson.loads(tc.function.arguments)["name"] for tc in tool_calls]  # type: ignore[union-attr]
        assert names == ["A", "B"]
        messages.append(message.model_dump(exclude_none=True))
        messages += [
            {"role": "tool", "tool_call_id": tc.id, "content": '{"status":"ok"}'}
            for tc in tool_calls
        ]
        second = await client.chat.completions.create(model="m", messages=messages, tools=TOOLS)
    assert second.choices[0].message.content == "Both saved."


async def test_a_responder_sees_the_request(chat: ChatEmulator) -> None:
    chat.script(lambda body: say(f"you said {body['messages'][-1]['content']}"))
    async with _client(chat) as client:
        completion = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "marco"}]
        )
    assert completion.choices[0].message.content == "you said marco"


async def test_refuses_what_openai_refuses(chat: ChatEmulator) -> None:
    async with _client(chat, key="sk-wrong") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}]
            )
    orphan_tool = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "x"},
            {"role": "tool", "tool_call_id": "call_1", "content": "{}"},
        ],
    }
    unanswered = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "x"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_9",
                        "type": "function",
                        "function": {"name": "f", "arguments": "{}"},
                    }
                ],
            },
            {"role": "user", "content": "hello?"},
        ],
    }
    for body in (orphan_tool, unanswered, {"messages": []}, {"model": "m", "messages": []}):
        response = await _raw(chat, body)
        assert response.status_code == 400, body
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert chat.requests == [] and len(chat.refusals) == 4


async def test_no_tool_calls_when_tools_are_not_allowed(chat: ChatEmulator) -> None:
    chat.script(call("capture_lead", {"name": "A"}), call("capture_lead", {"name": "B"}))
    messages: list[Any] = [{"role": "user", "content": "x"}]
    async with _client(chat) as client:
        forced_words = await client.chat.completions.create(
            model="m", messages=messages, tools=TOOLS, tool_choice="none"
        )
        no_tools = await client.chat.completions.create(model="m", messages=messages)
    for completion in (forced_words, no_tools):
        assert completion.choices[0].message.tool_calls is None
        assert completion.choices[0].message.content == DEFAULT_TEXT
