"""The uvicorn.Config the Switchboard app is served with, wherever it is served.

`switchboard serve`, the in-process server (demo, tests), the load-test workers and the tests
of the draining server all build their config here, so they all serve the media socket the same
way: on picows (app.media_socket), on the port of the webhooks.
"""

from __future__ import annotations

import asyncio
import gc
import socket
from typing import TYPE_CHECKING, Any

import uvicorn

from app.media_socket import MediaSocketProtocol

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from app.settings import Settings

# `ws` values: ours, or the name of one of uvicorn's own stacks (auto, websockets,
# websockets-sansio, wsproto), kept selectable to compare against.
PICOWS = "picows"
WS_CHOICES = (PICOWS, "auto", "websockets", "websockets-sansio", "wsproto")


def server_config(
    app: Starlette,
    settings: Settings,
    *,
    ws: str = PICOWS,
    ws_max_size: int | None = None,
    **options: Any,
) -> uvicorn.Config:
    """uvicorn's config for `app`: lifespan on, the media socket on picows unless `ws` names
    one of uvicorn's stacks; WebSocket messages up to `ws_max_size` bytes (default
    MAX_FRAME_BYTES). Other keyword arguments go to uvicorn.Config as they are."""
    protocol: type[asyncio.Protocol] | str = MediaSocketProtocol if ws == PICOWS else ws
    return uvicorn.Config(
        app,
        lifespan="on",
        ws=protocol,  # type: ignore[arg-type]  # uvicorn takes a class as well as a name
        ws_max_size=settings.max_frame_bytes if ws_max_size is None else ws_max_size,
        **options,
    )


class ProcessServer(uvicorn.Server):
    """The uvicorn server of a server process (`switchboard serve`, the load-test workers).

    Once started, everything alive is frozen out of the cyclic garbage collector's sight
    (`gc.freeze`): modules, the app, pydantic and SQLAlchemy models, the migrations' leftovers
    collected first. A full collection then walks only what calls created: measured with
    `switchboard loadtest --calls 100`, full collections walking the ~230 000 start-up objects
    (and the calls' garbage) paused 20-175 ms, stalling every call's audio (max round trips of
    76-95 ms). The freeze ends with serving, so a process that serves more than once (the
    tests) gets its objects collected as usual afterwards.
    """

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            gc.collect()
            gc.freeze()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().shutdown(sockets)
        finally:
            gc.unfreeze()
