"""A finished call leaves nothing behind for the cyclic garbage collector.

Objects in reference cycles are freed only by a full collection: a call whose objects formed a
cycle kept its transcoders, transcript and sockets in memory until then, so memory rose with
every call between collections, and each collection (walking all of it) stalled every live
call's audio. Freed by reference counting, a call's memory is returned the moment it ends.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from app.media_websocket import MediaWebSocket
from bridge.call import CallSession
from bridge.call_protocol import CallProtocol
from bridge.realtime_connection import RealtimeConnection
from tests.e2e import call_stack, simulated_call
from tools.context import ToolContext

# What one call builds and should free: the session, its protocol state, its tool context and
# both sockets.
PER_CALL = (CallSession, CallProtocol, ToolContext, MediaWebSocket, RealtimeConnection)


def live(kinds: tuple[type, ...]) -> list[str]:
    """Names of the objects of these kinds the collector can see (alive, or unreachable
    garbage waiting for a collection)."""
    # By exact type: isinstance() on a weak proxy to a dead object raises.
    return [type(o).__name__ for o in gc.get_objects() if type(o) in kinds]


@pytest.fixture
def no_cyclic_collector() -> Iterator[None]:
    """Only reference counting frees objects meanwhile."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.parametrize("audio_mode", ["pcm16", "g711"])
async def test_a_finished_call_is_freed_without_a_garbage_collection(
    audio_mode: str, sqlite_url: str, no_cyclic_collector: None
) -> None:
    async with call_stack("demo", database_url=sqlite_url, audio_mode=audio_mode) as stack:
        assert live(PER_CALL) == []
        report = await simulated_call(stack)  # the demo call: tools, a confirmation, a hang-up
        (session,) = stack.emulator.sessions
        assert report.violations == [] and report.closed_by == "server"
        tools = [t.name for t in session.tool_calls]
        assert tools == ["capture_lead", "confirm_action", "end_call"]
        assert live(PER_CALL) == []
