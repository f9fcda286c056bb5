"""Run the server in this process on a loopback socket (demo, end-to-end tests, load tests).

The socket is bound before the app is built so that PUBLIC_URL (which signatures and TwiML
depend on) can name the real port.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import uvicorn
from starlette.applications import Starlette

from app.serving import server_config
from app.settings import Settings


@dataclass(slots=True)
class RunningServer:
    app: Starlette
    settings: Settings
    url: str  # http://127.0.0.1:PORT


def bind_loopback(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    return sock


@contextlib.asynccontextmanager
async def running_server(
    settings: Settings, sock: socket.socket | None = None
) -> AsyncIterator[RunningServer]:
    """Serve create_app(settings) until the block exits; waits until it accepts connections.

    Pass a socket bound with `bind_loopback()` when the settings must know the port first.
    """
    from app.main import create_app

    sock = sock or bind_loopback()
    host, port = sock.getsockname()[:2]
    app = create_app(settings)
    # Messages up to 1 MiB reach the bridge, which drops (and counts) media frames over
    # MAX_FRAME_BYTES itself: what the tests of oversized frames look at.
    config = server_config(app, settings, log_level="warning", ws_max_size=1 << 20)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()  # startup failed: raise its error here
                raise RuntimeError("server stopped during startup")
            await asyncio.sleep(0.01)
        yield RunningServer(app=app, settings=settings, url=f"http://{host}:{port}")
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=10)
        sock.close()


async def wait_until(
    condition: Callable[[], object], timeout_s: float, poll_s: float = 0.02
) -> None:
    """Wait, bounded, for state owned by other tasks that offer no event to wait on.

    Raises TimeoutError if `condition()` is still false after `timeout_s`.
    """
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - the state has no event; polling is bounded
            await asyncio.sleep(poll_s)
