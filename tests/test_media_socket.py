"""The media socket's transport (app.media_socket, app.media_websocket) under real uvicorn.

The server is uvicorn on loopback with the app's own config (`app.serving.server_config`); the
handler of /media-stream is replaced by a small echo handler so that each test can drive the
socket layer directly (close codes, fragments, floods, shutdown). Clients are real: websockets'
client, and picows's where a test needs frames websockets will not send (bad UTF-8, a
character split across fragments). Every test runs on asyncio's loop and on uvloop (which
`switchboard serve` uses): the connection changes protocol mid-flight, which each loop
implements on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

import picows
import pytest
import uvicorn
import uvloop
import websockets
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

import app.media
from app import media_websocket
from app.embedded import bind_loopback, wait_until
from app.media_websocket import MediaWebSocket
from app.serving import server_config
from app.settings import Settings

MAX_MESSAGE = 4096  # ws_max_size of the server under test


def on_both_loops(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test once on asyncio's loop and once on uvloop, each bounded in time.

    (A plain test that runs its own loop: pytest-asyncio chooses loops only through a hook in
    conftest.py, for every test at once.)
    """

    def on_loop(loop: str, **fixtures: Any) -> None:
        async def bounded() -> None:
            async with asyncio.timeout(60):
                await test(**fixtures)

        (uvloop.run if loop == "uvloop" else asyncio.run)(bounded())

    on_loop.__name__, on_loop.__doc__ = test.__name__, test.__doc__
    loop = inspect.Parameter("loop", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    on_loop.__signature__ = inspect.Signature(  # type: ignore[attr-defined]  # read by pytest
        [loop, *inspect.signature(test).parameters.values()]
    )
    return pytest.mark.parametrize("loop", ["asyncio", "uvloop"])(on_loop)


@dataclass
class EchoHandler:
    """Stands in for app.media.media_stream; says what it saw.

    Text "close CODE REASON" closes with that code, "raise" fails; other text is echoed, and a
    binary message is answered with its length.
    """

    refuse: bool = False  # close before accepting
    accept: bool = True
    stalled: asyncio.Event | None = None  # set: read nothing until it is set
    sockets: list[Any] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, websocket: Any) -> None:
        self.sockets.append(websocket)
        try:
            await self._run(websocket)
        finally:
            self.done.set()

    async def _run(self, websocket: Any) -> None:
        if self.refuse:
            await websocket.close(1008)
            return
        if not self.accept:
            return
        await websocket.accept()
        if self.stalled is not None:
            await self.stalled.wait()
        while True:
            message = await websocket.receive()
            self.received.append(message)
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                await websocket.send_text(f"{len(message['bytes'])} bytes")
            elif text.startswith("close "):
                _, code, reason = text.split(" ", 2)
                await websocket.close(int(code), reason)
            elif text == "raise":
                raise RuntimeError("a bug in the handler")
            else:
                await websocket.send_text(text)

    @property
    def disconnect(self) -> dict[str, Any]:
        (last,) = [m for m in self.received if m["type"] == "websocket.disconnect"]
        return last


@pytest.fixture
def handler(monkeypatch: pytest.MonkeyPatch) -> EchoHandler:
    echo = EchoHandler()
    monkeypatch.setattr(app.media, "media_stream", echo)
    return echo


@contextlib.asynccontextmanager
async def serving(app: Starlette | None = None) -> AsyncIterator[str]:
    """The app (default: one with no routes) on loopback with Switchboard's uvicorn config."""
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    config = server_config(
        app or Starlette(), settings, log_level="warning", ws_max_size=MAX_MESSAGE
    )
    server = uvicorn.Server(config)
    sock = bind_loopback()
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await wait_until(lambda: server.started or task.done(), 10)
        assert not task.done(), task.result()
        yield f"ws://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)
        sock.close()


@contextlib.contextmanager
def limits(**values: int) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        for name, value in values.items():
            patch.setattr(media_websocket, name, value)
        yield


async def close_code(ws: websockets.ClientConnection) -> int | None:
    """Read until the server closes; its close code."""
    with contextlib.suppress(websockets.ConnectionClosed):
        async with asyncio.timeout(10):
            async for _ in ws:
                pass
    return ws.close_code


class PicowsClient(picows.WSListener):
    """A client that can send any frame, and keeps what it receives."""

    def __init__(self) -> None:
        self.texts: asyncio.Queue[str] = asyncio.Queue()
        self.close: tuple[int, str] | None = None

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        if frame.msg_type == picows.WSMsgType.TEXT:
            self.texts.put_nowait(frame.get_payload_as_utf8_text())
        elif frame.msg_type == picows.WSMsgType.CLOSE:
            self.close = (int(frame.get_close_code()), frame.get_close_reason())
            transport.disconnect()


# -- the handshake -------------------------------------------------------------------------


@on_both_loops
async def test_the_media_path_is_served_by_picows_with_an_rfc6455_handshake(
    handler: EchoHandler,
) -> None:
    async with serving() as url:
        async with websockets.connect(url + "/media-stream?x=1") as ws:
            await ws.send("hello")
            echoed = await ws.recv()
            response = ws.response
        transport, client = await picows.ws_connect(PicowsClient, url + "/media-stream")
        transport.send(picows.WSMsgType.TEXT, b"from picows")
        echoed_to_picows = await asyncio.wait_for(client.texts.get(), 5)
        transport.disconnect()
        await transport.wait_disconnected()

    # websockets checked Sec-WebSocket-Accept against its key; picows did the same.
    assert response.status_code == 101 and "Sec-WebSocket-Accept" in response.headers
    assert (echoed, echoed_to_picows) == ("hello", "from picows")
    assert [type(s) for s in handler.sockets] == [MediaWebSocket] * 2
    socket = handler.sockets[0]
    assert socket.url.path == "/media-stream" and socket.url.query == "x=1"
    assert socket.headers["upgrade"].lower() == "websocket"
    assert isinstance(socket.app, Starlette)


@on_both_loops
async def test_a_close_before_accept_refuses_the_upgrade_with_http_403(
    handler: EchoHandler,
) -> None:
    handler.refuse = True
    async with serving() as url:
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(url + "/media-stream")
    assert refused.value.response.status_code == 403


@on_both_loops
async def test_a_handler_that_never_accepts_answers_500(handler: EchoHandler) -> None:
    handler.accept = False
    async with serving() as url:
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(url + "/media-stream")
    assert refused.value.response.status_code == 500


@on_both_loops
async def test_a_malformed_upgrade_is_refused_before_the_handler_runs(
    handler: EchoHandler,
) -> None:
    async with serving() as url:
        host, port = url.removeprefix("ws://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"GET /media-stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: not-a-key\r\n\r\n"
        )
        status = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
    assert status.startswith(b"HTTP/1.1 400")
    assert handler.sockets == []


@on_both_loops
async def test_other_websocket_paths_go_to_the_asgi_app(handler: EchoHandler) -> None:
    async def shout(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text((await websocket.receive_text()).upper())
        await websocket.close(4000, "shouted")

    other = Starlette(routes=[WebSocketRoute("/shout", shout)])
    async with serving(other) as url:
        async with websockets.connect(url + "/shout") as ws:
            await ws.send("hi")
            shouted = await ws.recv()
            code = await close_code(ws)
        with pytest.raises(websockets.InvalidStatus) as unknown:
            await websockets.connect(url + "/media-stream/")  # not the media path
    assert (shouted, code) == ("HI", 4000)
    assert unknown.value.response.status_code == 403  # Starlette: no such WebSocket route
    assert handler.sockets == []


# -- messages ------------------------------------------------------------------------------


@on_both_loops
async def test_fragmented_messages_are_reassembled(handler: EchoHandler) -> None:
    async with serving() as url:
        async with websockets.connect(url + "/media-stream") as ws:
            await ws.send(["frag", "mented ", "text"])
            text = await ws.recv()
            await ws.send([b"ab", b"cde"])
            binary = await ws.recv()
        transport, client = await picows.ws_connect(PicowsClient, url + "/media-stream")
        # "é" is two bytes in UTF-8: split across two frames, it is still one character.
        transport.send(picows.WSMsgType.TEXT, b"caf\xc3", fin=False)
        transport.send(picows.WSMsgType.CONTINUATION, b"\xa9", fin=True)
        split = await asyncio.wait_for(client.texts.get(), 5)
        transport.disconnect()
        await transport.wait_disconnected()
    assert (text, binary, split) == ("fragmented text", "5 bytes", "café")


@on_both_loops
async def test_pings_are_answered(handler: EchoHandler) -> None:
    async with serving() as url, websockets.connect(url + "/media-stream") as ws:
        latency = await asyncio.wait_for(await ws.ping(), 5)
    assert latency >= 0


@on_both_loops
async def test_close_codes_and_reasons_travel_both_ways(handler: EchoHandler) -> None:
    async with serving() as url:
        async with websockets.connect(url + "/media-stream") as ws:
            await ws.send("close 1008 no valid start message")
            server_code = await close_code(ws)
            server_reason = ws.close_reason
        await asyncio.wait_for(handler.done.wait(), 5)
        by_server = handler.disconnect
        handler.received.clear()
        async with websockets.connect(url + "/media-stream") as ws:
            await ws.close(4001, "call over")
            echoed = ws.close_code
        await wait_until(lambda: len(handler.received) == 1, 5)
    assert (server_code, server_reason) == (1008, "no valid start message")
    assert (by_server["code"], by_server["reason"]) == (1008, "no valid start message")
    assert echoed == 4001  # the server answered the close with its code
    by_client = handler.disconnect
    assert (by_client["code"], by_client["reason"]) == (4001, "call over")


@on_both_loops
async def test_a_frame_over_the_size_limit_closes_with_1009(handler: EchoHandler) -> None:
    async with serving() as url:
        async with websockets.connect(url + "/media-stream") as ws:
            await ws.send("x" * (MAX_MESSAGE + 1))
            single = await close_code(ws)
        async with websockets.connect(url + "/media-stream") as ws:
            await ws.send(["x" * (MAX_MESSAGE // 2)] * 3)  # each frame fits, the message not
            fragmented = await close_code(ws)
        await wait_until(lambda: len(handler.received) == 2, 5)
    assert (single, fragmented) == (1009, 1009)
    # Neither message reached the handler: only the disconnects did.
    assert handler.received == [
        {"type": "websocket.disconnect", "code": 1009, "reason": reason}
        for reason in (
            "Received frame with payload size exceeding max allowed size, 4097 > 4096",
            "message too big",
        )
    ]


@on_both_loops
async def test_invalid_utf8_text_closes_with_1007(handler: EchoHandler) -> None:
    async with serving() as url:
        transport, client = await picows.ws_connect(PicowsClient, url + "/media-stream")
        transport.send(picows.WSMsgType.TEXT, b"\xff\xfe not utf-8")
        await asyncio.wait_for(transport.wait_disconnected(), 5)
        await asyncio.wait_for(handler.done.wait(), 5)
    assert client.close is not None and client.close[0] == 1007
    assert handler.disconnect["code"] == 1007


@on_both_loops
async def test_a_flood_of_unread_frames_closes_with_1008(handler: EchoHandler) -> None:
    handler.stalled = asyncio.Event()
    with limits(MAX_WAITING_MESSAGES=50, PAUSE_READING_AT=1_000_000):
        async with serving() as url:
            async with websockets.connect(url + "/media-stream") as ws:
                for i in range(200):
                    await ws.send(f"frame {i}")
                code = await close_code(ws)
            handler.stalled.set()
            await asyncio.wait_for(handler.done.wait(), 5)
    assert code == 1008
    # Nothing of the flood is kept: the handler's next read is the disconnect.
    assert handler.received == [
        {"type": "websocket.disconnect", "code": 1008, "reason": "more than 50 unread"}
    ]


@on_both_loops
async def test_a_stalled_reader_pauses_reading_and_loses_nothing(handler: EchoHandler) -> None:
    handler.stalled = asyncio.Event()
    frames = [f"frame {i}" for i in range(300)]
    with limits(PAUSE_READING_AT=20, RESUME_READING_AT=5):
        async with serving() as url, websockets.connect(url + "/media-stream") as ws:
            for frame in frames:
                await ws.send(frame)
            await wait_until(lambda: handler.sockets and handler.sockets[0]._reading_paused, 5)
            handler.stalled.set()
            echoes = [await asyncio.wait_for(ws.recv(), 5) for _ in frames]
            still_open = ws.state is websockets.protocol.State.OPEN
    assert echoes == frames
    assert still_open


# -- the end of a connection ---------------------------------------------------------------


@on_both_loops
async def test_a_client_that_vanishes_is_a_1006_disconnect(handler: EchoHandler) -> None:
    async with serving() as url:
        ws = await websockets.connect(url + "/media-stream")
        await ws.send("hello")
        await ws.recv()
        ws.transport.abort()  # no close frame: the TCP connection just ends
        await asyncio.wait_for(handler.done.wait(), 5)
    assert handler.disconnect["code"] == 1006


@on_both_loops
async def test_a_failing_handler_closes_with_1011(handler: EchoHandler) -> None:
    async with serving() as url, websockets.connect(url + "/media-stream") as ws:
        await ws.send("raise")
        code = await close_code(ws)
    assert code == 1011


@on_both_loops
async def test_server_shutdown_closes_an_open_media_socket_with_1012(
    handler: EchoHandler,
) -> None:
    async with serving() as url:
        ws = await websockets.connect(url + "/media-stream")
        await ws.send("hello")
        await ws.recv()
    # uvicorn's shutdown returned: it told the socket, and waited for the handler to finish.
    assert handler.done.is_set()
    assert handler.disconnect["code"] == 1012
    assert await close_code(ws) == 1012
