"""The tool registry: typed async functions the model may call, and the schemas it sees.

A tool is declared once, with a pydantic model for its arguments; the JSON schema the model
receives (Realtime flat form, Chat Completions nested form) is derived from that model, so
the schema and the validation can never disagree.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import orjson
from pydantic import BaseModel

if TYPE_CHECKING:
    from tools.context import ToolContext

Risk = Literal["read", "low", "medium", "high"]
Handler = Callable[[Any, "ToolContext"], Awaitable[dict[str, Any]]]
Summary = Callable[[Any], str]


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str
    args: type[BaseModel]
    handler: Handler
    risk: Risk
    personas: frozenset[str]
    summary: Summary | None
    # Writes need the caller's confirmation. Conversation control (hanging up, transferring,
    # alerting the owner) acts on the call itself, not on business records, so it runs at once.
    needs_confirmation: bool

    def parameters(self) -> dict[str, Any]:
        return json_schema(self.args)

    def realtime_schema(self) -> dict[str, Any]:
        return {
            "type": "function",
            "name": self.name,
            "description": self.description,
            "parameters": self.parameters(),
        }

    def chat_schema(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters(),
            },
        }

    def spoken_summary(self, args: BaseModel) -> str:
        if self.summary is not None:
            return self.summary(args)
        fields = ", ".join(f"{k} {v}" for k, v in args.model_dump(exclude_none=True).items())
        return f"I'll {self.name.replace('_', ' ')}" + (f" with {fields}." if fields else ".")


REGISTRY: dict[str, Tool] = {}


def tool(
    name: str,
    *,
    args: type[BaseModel],
    risk: Risk,
    personas: set[str] | frozenset[str],
    summary: Summary | None = None,
    conversation_control: bool = False,
    description: str | None = None,
) -> Callable[[Handler], Handler]:
    """Register an async handler `(args, ctx) -> dict` as a tool.

    The description defaults to the handler's docstring: write it for the model.
    """

    def register(handler: Handler) -> Handler:
        if name in REGISTRY:
            raise ValueError(f"tool {name!r} registered twice")
        if not inspect.iscoroutinefunction(handler):
            raise TypeError(f"tool {name!r}: handler must be async")
        text = description or inspect.getdoc(handler)
        if not text:
            raise ValueError(f"tool {name!r} needs a description")
        REGISTRY[name] = Tool(
            name=name,
            description=text,
            args=args,
            handler=handler,
            risk=risk,
            personas=frozenset(personas),
            summary=summary,
            needs_confirmation=risk != "read" and not conversation_control,
        )
        return handler

    return register


def json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema, inlined (no $defs) because function schemas must stand alone.

    A fresh copy each time (callers may edit it); pydantic builds it once per model, since
    building it costs milliseconds and every call's session.update needs every tool's.
    """
    return orjson.loads(_json_schema_bytes(model))


@functools.cache
def _json_schema_bytes(model: type[BaseModel]) -> bytes:
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if ref is not None:
                return inline(defs[ref.rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in node.items() if k != "title"}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    out = inline(schema)
    out.setdefault("properties", {})
    out["type"] = "object"
    return orjson.dumps(out)


def tools_for(persona: str) -> list[Tool]:
    _load_catalogue()
    return [t for t in REGISTRY.values() if persona in t.personas]


def realtime_tools(persona: str) -> list[dict[str, Any]]:
    return [t.realtime_schema() for t in tools_for(persona)]


def chat_tools(persona: str) -> list[dict[str, Any]]:
    return [t.chat_schema() for t in tools_for(persona)]


def get_tool(name: str) -> Tool | None:
    _load_catalogue()
    return REGISTRY.get(name)


def _load_catalogue() -> None:
    # Importing the handler modules registers their tools; done lazily so that importing the
    # registry itself stays cheap and free of import cycles.
    import tools.handlers  # noqa: F401
