"""The media socket's transport: WS /media-stream served by picows, on uvicorn's own port.

Twilio opens the media stream at PUBLIC_URL's host, the port the webhooks are on, so the media
socket cannot have a server of its own. uvicorn lets the WebSocket protocol be chosen
(`uvicorn.Config(ws=...)`); on an upgrade its HTTP protocol builds that class, calls
`connection_made(transport)`, `data_received(<the upgrade request, re-serialized>)`, and then
makes it the transport's protocol. `MediaSocketProtocol` is that class:

* /media-stream: the request is held and `app.media.media_stream` runs on a `MediaWebSocket`.
  When the handler accepts, the connection is handed to picows: its `WSProtocol` becomes the
  transport's protocol (asyncio and uvloop both switch a transport to a BufferedProtocol),
  is fed the held request and answers 101 with Sec-WebSocket-Accept. From then on every frame
  goes from the event loop to picows's parser and our listener with nothing in between.
  A handler that closes before accepting refuses the upgrade with HTTP 403, as Starlette does.
* any other path: uvicorn's own sans-I/O WebSocket protocol gets the connection, and through
  it the ASGI app, which answers as it always has (unknown routes: 403).

Measured on loopback (1.3 KB text echo, uvloop), server CPU per receive + send: 20 us with
uvicorn's websockets-sansio and Starlette, 5-9 us with picows.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import uvicorn
from picows import WSAutoPingStrategy, WSListener
from picows.picows import WSProtocol
from starlette.applications import Starlette
from uvicorn.protocols.utils import get_local_addr, get_remote_addr, is_ssl
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState

from app.media_websocket import MediaWebSocket

log = logging.getLogger("switchboard.media_socket")

MEDIA_PATH = "/media-stream"
# A client must wait for our 101 before it sends frames; a little read-ahead is tolerated
# (and fed to picows after the request), a stream of it is not.
MAX_EARLY_BYTES = 64 * 1024
# picows's read buffer to start with (it doubles as needed); a Twilio frame is ~400 bytes.
READ_BUFFER_BYTES = 16 * 1024
# Headers picows must not see as sent: uvicorn has already checked that Connection asks for
# the upgrade (picows insists on the single token), and an upgrade has no body.
_REWRITTEN_HEADERS = frozenset({b"connection", b"content-length"})


class _PicowsLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """picows's own log lines, at the level they mean here.

    picows logs two INFO lines per connection (uvicorn's access line already says it) and a
    client's protocol violation (say a frame over the size limit) as an ERROR, which is the
    client's fault and closed cleanly: DEBUG and WARNING. Failures with a traceback stay ERROR.
    """

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level == logging.INFO:
            level = logging.DEBUG
        elif level == logging.ERROR and not kwargs.get("exc_info"):
            level = logging.WARNING
        super().log(level, msg, *args, **kwargs)


_picows_log = _PicowsLog(logging.getLogger("switchboard.media_socket.picows"))


class MediaSocketProtocol(asyncio.Protocol):
    """uvicorn's WebSocket protocol class for the Switchboard app (see the module docstring)."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not config.loaded:
            config.load()
        self.config = config
        self.server_state = server_state
        self.app_state = app_state
        self.transport: asyncio.Transport | None = None
        self._stock: WebSocketsSansIOProtocol | None = None  # any path but the media stream
        self._socket: MediaWebSocket | None = None  # the media stream, until picows takes it
        self._request = b""  # the upgrade request as picows will read it
        self._early = bytearray()

    # -- asyncio.Protocol: only until the connection is handed over ----------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvicorn's are Transports

    def data_received(self, data: bytes) -> None:
        if self._stock is not None:
            self._stock.data_received(data)
        elif self._socket is not None:
            self._early += data
            if len(self._early) > MAX_EARLY_BYTES:
                self.refuse(HTTPStatus.BAD_REQUEST)
        else:
            self._route(data)

    def eof_received(self) -> bool | None:
        if self._stock is not None:
            return self._stock.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._stock is not None:
            self._stock.connection_lost(exc)
        elif self._socket is not None:
            self._socket.lost_before_accept()

    def pause_writing(self) -> None:
        if self._stock is not None:
            self._stock.pause_writing()

    def resume_writing(self) -> None:
        if self._stock is not None:
            self._stock.resume_writing()

    # -- the upgrade ---------------------------------------------------------------------------
    def _route(self, request: bytes) -> None:
        head = request.split(b"\r\n\r\n", 1)[0]
        request_line, *header_lines = head.split(b"\r\n")
        _, target, _ = request_line.split(b" ", 2)
        raw_path, _, query = target.partition(b"?")
        path = unquote(raw_path.decode("latin-1"))  # as Starlette matches routes
        app = _starlette_app(self.config)
        if path != MEDIA_PATH or app is None:
            self._to_stock(request)
            return
        headers = [_split_header(line) for line in header_lines]
        problem = _upgrade_problem(headers)
        if problem is not None:
            log.info("media socket upgrade refused: %s", problem)
            self.refuse(HTTPStatus.BAD_REQUEST)
            return
        self._request = _picows_request(target, headers)
        socket = self._socket = MediaWebSocket(
            app=app,
            scope=self._scope(app, raw_path, path, query, headers),
            handshake=self,
            connections=self.server_state.connections,
            max_message_bytes=self.config.ws_max_size,
        )
        task = asyncio.get_running_loop().create_task(socket.serve(_media_handler))
        self.server_state.tasks.add(task)
        task.add_done_callback(self.server_state.tasks.discard)

    def _to_stock(self, request: bytes) -> None:
        # Our object stays the transport's protocol (uvicorn sets it right after this call),
        # so everything that follows is passed on; these paths are rare and cheap to forward.
        stock = self._stock = WebSocketsSansIOProtocol(
            config=self.config, server_state=self.server_state, app_state=self.app_state
        )
        stock.connection_made(self.transport)  # type: ignore[arg-type]
        stock.data_received(request)

    def _scope(
        self,
        app: Starlette,
        raw_path: bytes,
        path: str,
        query: bytes,
        headers: list[tuple[bytes, bytes]],
    ) -> dict[str, Any]:
        """The ASGI scope uvicorn would give the app, for Starlette's Headers and URL."""
        transport = self.transport
        assert transport is not None
        root_path = self.config.root_path
        subprotocols = [
            token.strip()
            for name, value in headers
            if name == b"sec-websocket-protocol"
            for token in value.decode("latin-1").split(",")
        ]
        return {
            "type": "websocket",
            "asgi": {"version": self.config.asgi_version, "spec_version": "2.4"},
            "http_version": "1.1",
            "scheme": "wss" if is_ssl(transport) else "ws",
            "server": get_local_addr(transport),
            "client": get_remote_addr(transport),
            "root_path": root_path,
            "path": root_path + path,
            "raw_path": root_path.encode("ascii") + raw_path,
            "query_string": query,
            "headers": headers,
            "subprotocols": subprotocols,
            "state": self.app_state.copy(),
            "app": app,
        }

    # -- Handshake (called by the MediaWebSocket) ----------------------------------------------
    def complete(self, listener: WSListener) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # the caller is gone already; the listener never hears of a connection
        config = self.config
        ping_every = config.ws_ping_interval or 0.0
        protocol = WSProtocol(
            None,  # host and port: client side only
            None,  # path: client side only
            False,  # server side
            lambda request: listener,  # the handler has already decided to accept
            _picows_log,
            True,  # an exception in a listener callback closes the connection (1011)
            None,  # no handshake timeout: the whole request is fed below
            ping_every > 0,  # keepalive pings on a silent connection, as uvicorn sends them
            ping_every or 20.0,
            min(config.ws_ping_timeout or ping_every or 20.0, ping_every or 20.0),
            WSAutoPingStrategy.PING_WHEN_IDLE,
            True,  # answer pings
            config.ws_max_size,
            None,  # extra headers: client side only
            READ_BUFFER_BYTES,
        )
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        _feed(protocol, transport, self._request)
        _feed(protocol, transport, bytes(self._early))
        self._request, self._early = b"", bytearray()
        self._socket = None  # picows owns the connection now; we hear nothing more of it

    def refuse(self, status: int) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        phrase = HTTPStatus(status).phrase.encode()
        transport.write(
            b"HTTP/1.1 %d %b\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%b"
            % (status, phrase, len(phrase), phrase)
        )
        transport.close()


async def _media_handler(websocket: MediaWebSocket) -> None:
    # Imported on first use, as app.main does: the handler pulls in the whole bridge.
    from app.media import media_stream

    await media_stream(websocket)


def _starlette_app(config: uvicorn.Config) -> Starlette | None:
    """The Starlette app inside uvicorn's wrappers (proxy headers, ...), which keep it as .app."""
    app = config.loaded_app
    for _ in range(8):
        if isinstance(app, Starlette):
            return app
        app = getattr(app, "app", None)
    return None


def _split_header(line: bytes) -> tuple[bytes, bytes]:
    # uvicorn wrote each header as b"name: value" from the fields it parsed.
    name, _, value = line.partition(b":")
    return name.strip().lower(), value.strip()


def _upgrade_problem(headers: list[tuple[bytes, bytes]]) -> str | None:
    """Why this upgrade request is not one RFC 6455 allows (uvicorn checked Upgrade/Connection)."""
    fields = dict(headers)
    if fields.get(b"sec-websocket-version") != b"13":
        return "Sec-WebSocket-Version is not 13"
    try:
        key_ok = len(base64.b64decode(fields.get(b"sec-websocket-key", b""), validate=True)) == 16
    except binascii.Error:
        key_ok = False
    if not key_ok:
        return "bad Sec-WebSocket-Key"
    if b"transfer-encoding" in fields or fields.get(b"content-length", b"0").strip(b"0"):
        return "the upgrade request has a body"
    return None


def _picows_request(target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    lines = [b"GET " + target + b" HTTP/1.1"]
    lines += [name + b": " + value for name, value in headers if name not in _REWRITTEN_HEADERS]
    lines.append(b"connection: upgrade")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _feed(protocol: WSProtocol, transport: asyncio.Transport, data: bytes) -> None:
    """Give picows bytes the way the event loop does: into get_buffer(), then buffer_updated()."""
    view = memoryview(data)
    while view and not transport.is_closing():
        buffer = protocol.get_buffer(len(view))
        size = min(len(buffer), len(view))
        buffer[:size] = view[:size]
        protocol.buffer_updated(size)
        view = view[size:]
