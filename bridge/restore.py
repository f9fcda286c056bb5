"""The conversation so far, kept so a new Realtime session can pick the call up. No I/O.

A Realtime session holds the conversation server-side; when its socket drops (or the
60-minute cap ends it) the new session starts empty. `ConversationHistory` keeps what is
needed to rebuild it, in conversation order, and `replay_events` turns that into the
`conversation.item.create` events to send after the new session's `session.update`:

- caller turns as user messages (their transcription; a turn whose transcription never
  arrived cannot be replayed and is skipped),
- the agent's turns as assistant messages (their transcript),
- function calls with their outputs, and function calls still running (their output is sent
  to the new session when the tool finishes, so the model sees one answer per call).

Caller turns take their place in the order they were committed (`caller_committed`), not
when their transcription arrives, which is asynchronous and often after the reply started.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["user", "assistant", "function_call"]


@dataclass(slots=True)
class _Entry:
    kind: Kind
    key: str  # item id (messages) or call id (function calls)
    text: str | None = None  # message text; None while a caller turn awaits transcription
    name: str = ""
    arguments: str = ""
    output: str | None = None  # None while the tool runs


class ConversationHistory:
    """Items of one call's conversation, in order, independent of any Realtime session."""

    def __init__(self, *, max_items: int = 400) -> None:
        # A bound on memory for very long calls: the oldest items are forgotten first
        # (the model's own context would truncate them too).
        self.max_items = max_items
        self._entries: list[_Entry] = []
        self._by_key: dict[str, _Entry] = {}

    # -- feeding ---------------------------------------------------------------------------
    def caller_committed(self, item_id: str) -> None:
        """The caller's audio turn `item_id` entered the conversation here."""
        if item_id not in self._by_key:
            self._add(_Entry("user", item_id))

    def caller_said(self, item_id: str, transcript: str) -> None:
        """The transcription of the caller's turn `item_id` arrived."""
        entry = self._by_key.get(item_id)
        if entry is None:  # the commit was not seen (e.g. it belonged to the old session)
            entry = self._add(_Entry("user", item_id))
        entry.text = transcript

    def agent_said(self, item_id: str, transcript: str) -> None:
        entry = self._by_key.get(item_id)
        if entry is None:
            self._add(_Entry("assistant", item_id, text=transcript))
        else:
            entry.text = transcript

    def tool_called(self, call_id: str, name: str, arguments: str) -> None:
        if call_id not in self._by_key:
            self._add(_Entry("function_call", call_id, name=name, arguments=arguments))

    def tool_answered(self, call_id: str, output: str) -> None:
        entry = self._by_key.get(call_id)
        if entry is not None and entry.kind == "function_call":
            entry.output = output

    # -- reading ---------------------------------------------------------------------------
    def answered(self, call_id: str) -> bool:
        """Whether the tool call `call_id` already has its output (so must not run again)."""
        entry = self._by_key.get(call_id)
        return entry is not None and entry.output is not None

    def known(self, call_id: str) -> bool:
        """Whether the tool call `call_id` was already dispatched, answered or not."""
        entry = self._by_key.get(call_id)
        return entry is not None and entry.kind == "function_call"

    @property
    def pending_calls(self) -> list[str]:
        return [e.key for e in self._entries if e.kind == "function_call" and e.output is None]

    @property
    def awaits_reply(self) -> bool:
        """Whether the model owes an answer: the last replayable item is not the agent's."""
        for entry in reversed(self._entries):
            if entry.kind == "user" and entry.text is None:
                continue
            if entry.kind == "function_call" and entry.output is None:
                return False  # the reply comes when the tool's output does
            return entry.kind != "assistant"
        return False

    def __len__(self) -> int:
        return len(self._entries)

    def replay_events(self) -> list[dict[str, Any]]:
        """`conversation.item.create` events rebuilding the conversation, oldest first."""
        events: list[dict[str, Any]] = []
        for entry in self._entries:
            if entry.kind == "function_call":
                events.append(_create(_function_call_item(entry)))
                if entry.output is not None:
                    events.append(_create(_function_call_output_item(entry)))
            elif entry.text:
                events.append(_create(_message_item(entry)))
        return events

    def _add(self, entry: _Entry) -> _Entry:
        self._entries.append(entry)
        self._by_key[entry.key] = entry
        if len(self._entries) > self.max_items:
            # Never drop a pending call: its output is still to be sent and must match.
            for index, old in enumerate(self._entries):
                if not (old.kind == "function_call" and old.output is None):
                    del self._entries[index]
                    self._by_key.pop(old.key, None)
                    break
        return entry


def _create(item: dict[str, Any]) -> dict[str, Any]:
    return {"type": "conversation.item.create", "item": item}


def _message_item(entry: _Entry) -> dict[str, Any]:
    if entry.kind == "user":
        content = [{"type": "input_text", "text": entry.text}]
        return {"type": "message", "role": "user", "content": content}
    content = [{"type": "output_text", "text": entry.text}]
    return {"type": "message", "role": "assistant", "content": content}


def _function_call_item(entry: _Entry) -> dict[str, Any]:
    return {
        "type": "function_call",
        "call_id": entry.key,
        "name": entry.name,
        "arguments": entry.arguments,
    }


def _function_call_output_item(entry: _Entry) -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": entry.key, "output": entry.output}
