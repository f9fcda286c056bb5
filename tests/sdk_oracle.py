"""The official openai SDK's Realtime event models as a schema oracle for tests.

Every event the bridge sends, and every event the local emulator sends, must validate here.

Stricter than `RealtimeClientEvent`/`RealtimeServerEvent` on purpose:
- the class is picked from an explicit `type -> class` table, and unknown types are rejected
  (the SDK's union silently parses unknown types as some other event);
- validation runs in pydantic strict mode;
- no unknown field is allowed at any depth (the SDK models allow extras, so a beta-shaped
  field such as `session.input_audio_format` or a typo would otherwise pass), except the
  session identity fields listed in `_UNTYPED_BUT_SENT`;
- the model must dump back to exactly the input, so nothing was coerced or dropped.

Usage: `assert_valid_client_event(event)` / `assert_valid_server_event(event)` with a dict or
JSON text; each returns the validated SDK model.
"""

from __future__ import annotations

from typing import Any

import orjson
from openai.types.realtime import (
    ConversationCreatedEvent,
    ConversationItemAdded,
    ConversationItemCreatedEvent,
    ConversationItemCreateEvent,
    ConversationItemDeletedEvent,
    ConversationItemDeleteEvent,
    ConversationItemDone,
    ConversationItemInputAudioTranscriptionCompletedEvent,
    ConversationItemInputAudioTranscriptionDeltaEvent,
    ConversationItemInputAudioTranscriptionFailedEvent,
    ConversationItemInputAudioTranscriptionSegment,
    ConversationItemRetrieveEvent,
    ConversationItemTruncatedEvent,
    ConversationItemTruncateEvent,
    InputAudioBufferAppendEvent,
    InputAudioBufferClearedEvent,
    InputAudioBufferClearEvent,
    InputAudioBufferCommitEvent,
    InputAudioBufferCommittedEvent,
    InputAudioBufferDtmfEventReceivedEvent,
    InputAudioBufferSpeechStartedEvent,
    InputAudioBufferSpeechStoppedEvent,
    InputAudioBufferTimeoutTriggered,
    McpListToolsCompleted,
    McpListToolsFailed,
    McpListToolsInProgress,
    OutputAudioBufferClearEvent,
    RateLimitsUpdatedEvent,
    RealtimeErrorEvent,
    ResponseAudioDeltaEvent,
    ResponseAudioDoneEvent,
    ResponseAudioTranscriptDeltaEvent,
    ResponseAudioTranscriptDoneEvent,
    ResponseCancelEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseCreateEvent,
    ResponseDoneEvent,
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseFunctionCallArgumentsDoneEvent,
    ResponseMcpCallArgumentsDelta,
    ResponseMcpCallArgumentsDone,
    ResponseMcpCallCompleted,
    ResponseMcpCallFailed,
    ResponseMcpCallInProgress,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
    SessionCreatedEvent,
    SessionUpdatedEvent,
    SessionUpdateEvent,
)
from openai.types.realtime.realtime_server_event import (
    ConversationItemRetrieved,
    OutputAudioBufferCleared,
    OutputAudioBufferStarted,
    OutputAudioBufferStopped,
)
from pydantic import BaseModel

CLIENT_EVENT_CLASSES: dict[str, type[BaseModel]] = {
    "session.update": SessionUpdateEvent,
    "input_audio_buffer.append": InputAudioBufferAppendEvent,
    "input_audio_buffer.commit": InputAudioBufferCommitEvent,
    "input_audio_buffer.clear": InputAudioBufferClearEvent,
    "conversation.item.create": ConversationItemCreateEvent,
    "conversation.item.retrieve": ConversationItemRetrieveEvent,
    "conversation.item.truncate": ConversationItemTruncateEvent,
    "conversation.item.delete": ConversationItemDeleteEvent,
    "response.create": ResponseCreateEvent,
    "response.cancel": ResponseCancelEvent,
    "output_audio_buffer.clear": OutputAudioBufferClearEvent,
}

SERVER_EVENT_CLASSES: dict[str, type[BaseModel]] = {
    "error": RealtimeErrorEvent,
    "session.created": SessionCreatedEvent,
    "session.updated": SessionUpdatedEvent,
    "conversation.created": ConversationCreatedEvent,
    "conversation.item.added": ConversationItemAdded,
    "conversation.item.done": ConversationItemDone,
    "conversation.item.created": ConversationItemCreatedEvent,
    "conversation.item.retrieved": ConversationItemRetrieved,
    "conversation.item.truncated": ConversationItemTruncatedEvent,
    "conversation.item.deleted": ConversationItemDeletedEvent,
    "conversation.item.input_audio_transcription.delta": (
        ConversationItemInputAudioTranscriptionDeltaEvent
    ),
    "conversation.item.input_audio_transcription.completed": (
        ConversationItemInputAudioTranscriptionCompletedEvent
    ),
    "conversation.item.input_audio_transcription.segment": (
        ConversationItemInputAudioTranscriptionSegment
    ),
    "conversation.item.input_audio_transcription.failed": (
        ConversationItemInputAudioTranscriptionFailedEvent
    ),
    "input_audio_buffer.speech_started": InputAudioBufferSpeechStartedEvent,
    "input_audio_buffer.speech_stopped": InputAudioBufferSpeechStoppedEvent,
    "input_audio_buffer.committed": InputAudioBufferCommittedEvent,
    "input_audio_buffer.cleared": InputAudioBufferClearedEvent,
    "input_audio_buffer.timeout_triggered": InputAudioBufferTimeoutTriggered,
    "input_audio_buffer.dtmf_event_received": InputAudioBufferDtmfEventReceivedEvent,
    "response.created": ResponseCreatedEvent,
    "response.done": ResponseDoneEvent,
    "response.output_item.added": ResponseOutputItemAddedEvent,
    "response.output_item.done": ResponseOutputItemDoneEvent,
    "response.content_part.added": ResponseContentPartAddedEvent,
    "response.content_part.done": ResponseContentPartDoneEvent,
    "response.output_audio.delta": ResponseAudioDeltaEvent,
    "response.output_audio.done": ResponseAudioDoneEvent,
    "response.output_audio_transcript.delta": ResponseAudioTranscriptDeltaEvent,
    "response.output_audio_transcript.done": ResponseAudioTranscriptDoneEvent,
    "response.output_text.delta": ResponseTextDeltaEvent,
    "response.output_text.done": ResponseTextDoneEvent,
    "response.function_call_arguments.delta": ResponseFunctionCallArgumentsDeltaEvent,
    "response.function_call_arguments.done": ResponseFunctionCallArgumentsDoneEvent,
    "response.mcp_call_arguments.delta": ResponseMcpCallArgumentsDelta,
    "response.mcp_call_arguments.done": ResponseMcpCallArgumentsDone,
    "response.mcp_call.in_progress": ResponseMcpCallInProgress,
    "response.mcp_call.completed": ResponseMcpCallCompleted,
    "response.mcp_call.failed": ResponseMcpCallFailed,
    "mcp_list_tools.in_progress": McpListToolsInProgress,
    "mcp_list_tools.completed": McpListToolsCompleted,
    "mcp_list_tools.failed": McpListToolsFailed,
    "rate_limits.updated": RateLimitsUpdatedEvent,
    "output_audio_buffer.started": OutputAudioBufferStarted,
    "output_audio_buffer.stopped": OutputAudioBufferStopped,
    "output_audio_buffer.cleared": OutputAudioBufferCleared,
}


# Fields the live GA API sends that SDK 3.54 does not model (the API reference's own
# session.created example carries them). Allowed only at exactly these paths.
_SESSION_IDENTITY = frozenset({"session.object", "session.id", "session.expires_at"})
_UNTYPED_BUT_SENT: dict[str, frozenset[str]] = {
    "session.created": _SESSION_IDENTITY,
    "session.updated": _SESSION_IDENTITY,
}


def assert_valid_client_event(event: dict[str, Any] | str | bytes) -> BaseModel:
    """Assert `event` is a client->server Realtime event exactly as the SDK types it."""
    return _assert_valid(event, CLIENT_EVENT_CLASSES, "client")


def assert_valid_server_event(event: dict[str, Any] | str | bytes) -> BaseModel:
    """Assert `event` is a server->client Realtime event exactly as the SDK types it."""
    return _assert_valid(event, SERVER_EVENT_CLASSES, "server")


def _assert_valid(
    event: dict[str, Any] | str | bytes, classes: dict[str, type[BaseModel]], side: str
) -> BaseModel:
    data = orjson.loads(event) if isinstance(event, str | bytes) else event
    assert isinstance(data, dict), f"a Realtime event is a JSON object, got {type(data).__name__}"
    kind = data.get("type")
    cls = classes.get(kind)  # type: ignore[arg-type]
    assert cls is not None, f"{kind!r} is not a known {side} event type"
    model = cls.model_validate(data, strict=True)
    unknown = [f for f in _unknown_fields(model, "") if f not in _UNTYPED_BUT_SENT.get(kind, ())]
    assert not unknown, f"{kind}: fields the SDK does not define: {unknown}"
    dumped = model.model_dump(mode="json", exclude_unset=True, by_alias=True)
    assert dumped == data, f"{kind}: SDK model does not round-trip:\n{dumped}\n!=\n{data}"
    return model


def _unknown_fields(node: object, path: str) -> list[str]:
    found: list[str] = []
    if isinstance(node, BaseModel):
        found += [_join(path, name) for name in node.model_extra or {}]
        for name in type(node).model_fields:
            found += _unknown_fields(getattr(node, name), _join(path, name))
    elif isinstance(node, list | tuple):
        for index, item in enumerate(node):
            found += _unknown_fields(item, f"{path}[{index}]")
    elif isinstance(node, dict):
        for key, value in node.items():
            found += _unknown_fields(value, _join(path, key))
    return found


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def assert_every_event_valid(session: Any) -> None:
    """Every event of an emulator session (a `bridge.sim.emulator.SessionRecord`), both ways."""
    assert session.client_events and session.server_events
    for event in session.client_events:
        assert_valid_client_event(event)
    for event in session.server_events:
        assert_valid_server_event(event)
