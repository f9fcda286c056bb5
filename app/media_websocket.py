"""The media socket as its handler sees it: Starlette's WebSocket API, served by picows.

`app.media.media_stream` and `bridge.call.CallSession` use a small part of Starlette's
WebSocket: `app`, `headers`, `url`, `accept()`, `receive()`, `receive_text()`, `send_text()`,
`close()`. `MediaWebSocket` offers exactly that part, with the same messages and exceptions,
on top of a picows connection (it is the connection's `WSListener`), so the handler runs
unchanged whichever server carries it; what changes is the cost of a frame.

Per frame: picows calls `on_ws_frame`, which hands the message to a waiting `receive()` or
appends it to a deque; `receive()` returns at once while messages are waiting and otherwise
awaits one future. `send_text()` writes synchronously through picows. Nothing per frame
allocates a future, a task or a queue entry beyond the message itself.

Beyond Starlette's API, a fast path for the reader's hot messages (`set_fast_path`,
`send_text_nowait`, `writable`): a waiting reader's wakeup (a future, a task step, a coroutine
resume) costs more than a media frame's handling, so a handler may take a message right in the
frame callback, while the reader is parked in `receive()`.

The socket's life: CONNECTING (the upgrade request is held; the handler decides) -> OPEN (after
`accept()`, picows has answered 101) -> CLOSING (a close frame went out or came in) -> CLOSED
(the TCP connection is gone). Until it is CLOSED the socket is in uvicorn's
`server_state.connections`, so a server shutdown calls `shutdown()` and waits for it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport
from starlette.datastructures import URL, Headers
from starlette.websockets import WebSocketDisconnect
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

log = logging.getLogger("switchboard.media_socket")
# The access-log lines uvicorn writes for its own WebSocket connections, in the same place.
access_log = logging.getLogger("uvicorn.error")

# Messages received but not yet read by the handler. Twilio sends 50 a second and the bridge
# reads each at once, so a backlog means a stalled handler or a flood. Above PAUSE_READING_AT
# the socket stops reading (TCP pushes back on the sender) until the backlog is down to
# RESUME_READING_AT; a burst that still piles up past MAX_WAITING_MESSAGES (one read can carry
# thousands of tiny frames) closes the socket with 1008 rather than grow without bound.
PAUSE_READING_AT = 1_000
RESUME_READING_AT = 100
MAX_WAITING_MESSAGES = 10_000
# After our close frame, how long the peer has to answer it before the connection is dropped
# (uvicorn's own WebSocket implementations wait as long).
CLOSE_TIMEOUT_S = 10.0
# A close reason must fit a control frame: 125 bytes less the 2-byte code.
MAX_CLOSE_REASON_BYTES = 123
# Codes that only report a situation locally (RFC 6455 7.4.1): never sent in a close frame.
_LOCAL_ONLY_CODES = frozenset({0, 1005, 1006, 1015})

_TEXT = WSMsgType.TEXT
_BINARY = WSMsgType.BINARY
_CONTINUATION = WSMsgType.CONTINUATION
_CLOSE = WSMsgType.CLOSE
_RECEIVE = "websocket.receive"
_DISCONNECT = "websocket.disconnect"

Message = dict[str, Any]


class _State(enum.Enum):
    CONNECTING = "connecting"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class Handshake(Protocol):
    """The pending upgrade (app.media_socket holds it until the handler decides)."""

    def complete(self, listener: WSListener) -> None:
        """Hand the connection to picows, which answers 101 and calls `on_ws_connected`."""

    def refuse(self, status: int) -> None:
        """Answer the upgrade request with this HTTP status and close the connection."""


class MediaWebSocket(WSListener):
    """One media socket: the handler's Starlette-like WebSocket and picows's listener."""

    def __init__(
        self,
        *,
        app: Any,
        scope: dict[str, Any],
        handshake: Handshake,
        connections: set[Any],
        max_message_bytes: int,
    ) -> None:
        self.app = app
        self.scope = scope
        self.headers = Headers(scope=scope)
        self.url = URL(scope=scope)
        self.close_code: int | None = None  # how the socket ended, once it has
        self._loop = asyncio.get_running_loop()
        self._handshake = handshake
        self._connections = connections
        self._max_message_bytes = max_message_bytes
        self._ws: WSTransport | None = None
        self._state = _State.CONNECTING
        # True exactly while a whole text frame can be delivered without further checks: the
        # socket is OPEN and no fragmented message is being put together.
        self._plain = False
        self._messages: deque[Message] = deque()
        self._waiter: asyncio.Future[Message] | None = None
        self._disconnect_queued = False
        self._backlog_at = min(PAUSE_READING_AT, MAX_WAITING_MESSAGES + 1)
        self._reading_paused = False
        self._fragments: list[bytes] = []
        self._fragments_type = _TEXT
        self._fragments_size = 0
        # True while send_text cannot write straight away (not OPEN, or the transport's buffer
        # is full): the one check on the sending path.
        self._send_blocked = True
        self._writing_paused = False
        self._writable: asyncio.Future[None] | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._fast_path: Callable[[str], bool] | None = None
        connections.add(self)

    # -- the handler's side (Starlette's WebSocket API) ----------------------------------------
    async def accept(self) -> None:
        if self._state is not _State.CONNECTING:
            if self._state is _State.CLOSED:  # the caller left, or the server shut down, first
                raise WebSocketDisconnect(1006)
            raise RuntimeError('Cannot call "accept" on a socket that was already accepted.')
        self._handshake.complete(self)
        if self._ws is None:  # picows refused the request: it answered 400 and hung up
            self._gone(1006)
            raise WebSocketDisconnect(1006)
        access_log.info(
            '%s - "WebSocket %s" [accepted]',
            get_client_addr(self.scope),  # type: ignore[arg-type]
            get_path_with_query_string(self.scope),  # type: ignore[arg-type]
        )

    async def receive(self) -> Message:
        messages = self._messages
        if messages:
            message = messages.popleft()
            if self._reading_paused and len(messages) <= RESUME_READING_AT:
                self._resume_reading()
            return message
        return await self._next_message()

    async def receive_text(self) -> str:
        message = await self.receive()
        if message["type"] == _DISCONNECT:
            raise WebSocketDisconnect(message["code"], message.get("reason"))
        return message["text"]  # type: ignore[no-any-return]  # KeyError on binary, as Starlette

    async def send_text(self, data: str) -> None:
        if self._send_blocked:
            await self._until_writable()
        self._ws.send(_TEXT, data)  # type: ignore[union-attr]  # set once OPEN

    # -- the fast path (beyond Starlette's API; bridge.call uses it when it is there) ---------
    def set_fast_path(self, handler: Callable[[str], bool] | None) -> None:
        """Offer each whole text message to `handler` first, in the frame callback.

        The handler is called only while the reader is parked in `receive()`: then nothing is
        queued and the reader has finished with every earlier message, so taking this one here
        keeps the order. True: the message is handled, `receive()` never sees it; False: it is
        delivered as usual. The handler must decide before changing anything, and must not
        raise (picows would fail the connection). Fragmented and binary messages, and the
        disconnect, always go to `receive()`. None removes the handler.
        """
        self._fast_path = handler

    @property
    def writable(self) -> bool:
        """Open, and the write buffer below its high-water mark: a send now does not wait."""
        return not self._send_blocked

    def send_text_nowait(self, data: str) -> bool:
        """`send_text` without waiting: False (nothing sent) once the socket is not open.

        A full write buffer takes the message all the same (its limit is soft); callers check
        `writable` first. A socket that refuses a send here has queued its disconnect message,
        so the reader learns of the end from `receive()` as well.
        """
        if self._state is not _State.OPEN:
            return False
        self._ws.send(_TEXT, data)  # type: ignore[union-attr]  # set once OPEN
        return True

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        """Close with `code`; before `accept()` that refuses the upgrade with HTTP 403.

        Closing a socket that is already closing or closed does nothing.
        """
        if self._state is _State.CONNECTING:
            self._refuse(403)
        elif self._state is _State.OPEN:
            self._close(code, reason or "")

    # -- run by app.media_socket ---------------------------------------------------------------
    async def serve(self, handler: Callable[[MediaWebSocket], Awaitable[None]]) -> None:
        """Run the handler on this socket, then make sure the socket ends."""
        failed = False
        try:
            await handler(self)
        except WebSocketDisconnect:
            pass  # the caller went away (during the handshake or a read): nothing failed here
        except Exception:
            log.exception("media socket handler failed")
            failed = True
        except BaseException:  # cancelled: uvicorn's graceful-shutdown timeout ran out
            failed = True
            raise
        finally:
            self._end_after_handler(failed=failed)

    def shutdown(self) -> None:
        """uvicorn is stopping: 1012 (service restart) to an open socket, 503 before accept."""
        if self._state is _State.CONNECTING:
            self._refuse(503)
        elif self._state is _State.OPEN:
            self._fail(1012, "server shutting down", quietly=True)
        elif self._state is _State.CLOSING and self._ws is not None:
            self._ws.disconnect()

    def lost_before_accept(self) -> None:
        """The TCP connection ended while the upgrade was still pending (or refused)."""
        self._gone(1006)

    # -- picows's side (WSListener) ------------------------------------------------------------
    def on_ws_connected(self, transport: WSTransport) -> None:
        self._ws = transport
        self._state = _State.OPEN
        self._plain = True
        self._send_blocked = self._writing_paused

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        # The hot path: a whole text frame on an open socket (every Twilio message is one).
        # After a protocol error picows has sent its close frame but goes on parsing (the
        # connection ends 10 ms later): what it parses then is not delivered.
        if (
            self._plain
            and frame.msg_type is _TEXT
            and frame.fin
            and not transport.is_close_frame_sent
        ):
            try:
                text = frame.get_payload_as_utf8_text()
            except UnicodeDecodeError:
                self._fail(WSCloseCode.INVALID_TEXT, "invalid UTF-8 in a text frame")
                return
            fast = self._fast_path
            if fast is not None:
                # A parked reader (its future still pending) has nothing queued before this
                # message: the handler may take it here, in order, and spare the wakeup.
                waiter = self._waiter
                if waiter is not None and not waiter.done() and fast(text):
                    return
            self._queue({"type": _RECEIVE, "text": text})
            return
        self._other_frame(transport, frame)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        handshake = transport.close_handshake
        code, reason = 1006, ""
        if handshake is not None:
            info = handshake.recv or handshake.sent
            if info is not None:
                code, reason = int(info.code), info.reason
        self._gone(code, reason)

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._send_blocked = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._send_blocked = self._state is not _State.OPEN
        self._wake_writer()

    # -- receiving -----------------------------------------------------------------------------
    def _other_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind == _CLOSE:
            self._peer_closed(transport, frame)
            return
        if (
            self._state is not _State.OPEN
            or transport.is_close_frame_sent
            or kind not in (_TEXT, _BINARY, _CONTINUATION)
        ):
            return  # frames after a close, and pongs: nothing for the handler
        if kind == _CONTINUATION:
            if not self._fragments:
                self._fail(WSCloseCode.PROTOCOL_ERROR, "continuation frame without a message")
                return
        elif self._fragments:
            self._fail(WSCloseCode.PROTOCOL_ERROR, "new message inside a fragmented one")
            return
        else:
            self._fragments_type = kind
            self._fragments_size = 0
        self._fragments_size += frame.payload_size
        if self._fragments_size > self._max_message_bytes:
            self._fail(WSCloseCode.MESSAGE_TOO_BIG, "message too big")
            return
        self._fragments.append(frame.get_payload_as_bytes())
        if not frame.fin:
            self._plain = False
            return
        payload = b"".join(self._fragments)
        self._fragments = []
        self._plain = True
        if self._fragments_type == _BINARY:
            self._queue({"type": _RECEIVE, "bytes": payload})
            return
        try:
            text = payload.decode()
        except UnicodeDecodeError:
            self._fail(WSCloseCode.INVALID_TEXT, "invalid UTF-8 in a text message")
            return
        self._queue({"type": _RECEIVE, "text": text})

    def _peer_closed(self, transport: WSTransport, frame: WSFrame) -> None:
        if self._state is _State.CLOSING:  # the answer to our close frame: the handshake is done
            transport.disconnect()
            return
        if self._state is not _State.OPEN:
            return
        code, reason = int(frame.get_close_code()), frame.get_close_reason()
        self._stop_sending()
        # Answer with the same code (RFC 6455 5.5.1); a close without one gets an empty one.
        if code in _LOCAL_ONLY_CODES:
            transport.send(_CLOSE, b"")
            code = 1005
        else:
            transport.send_close(code)
        self._queue_disconnect(code, reason)
        transport.disconnect()

    def _queue(self, message: Message) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():  # a cancelled reader leaves a cancelled future behind
                waiter.set_result(message)
                return
        messages = self._messages
        messages.append(message)
        if len(messages) >= self._backlog_at:
            self._backlog(len(messages))

    def _backlog(self, waiting: int) -> None:
        if waiting > MAX_WAITING_MESSAGES:
            self._fail(WSCloseCode.POLICY_VIOLATION, f"more than {MAX_WAITING_MESSAGES} unread")
        elif waiting >= PAUSE_READING_AT and not self._reading_paused and self._ws is not None:
            self._reading_paused = True
            self._ws.underlying_transport.pause_reading()

    def _resume_reading(self) -> None:
        self._reading_paused = False
        if self._ws is not None and not self._ws.underlying_transport.is_closing():
            self._ws.underlying_transport.resume_reading()

    async def _next_message(self) -> Message:
        # Misuse, as Starlette reports it: reading before accepting, or after the disconnect.
        if self._state is _State.CONNECTING:
            raise RuntimeError('WebSocket is not connected. Need to call "accept" first.')
        if self._disconnect_queued:  # queued, and (nothing is waiting) already read
            raise RuntimeError('Cannot call "receive" once a disconnect message has been received.')
        waiter = self._waiter = self._loop.create_future()
        try:
            return await waiter
        except asyncio.CancelledError:
            # Cancelled after the message arrived but before the reader resumed: keep it.
            if waiter.done() and not waiter.cancelled():
                self._messages.appendleft(waiter.result())
            raise
        finally:
            if self._waiter is waiter:
                self._waiter = None

    def _queue_disconnect(self, code: int, reason: str = "") -> None:
        """The handler's last message: after any still unread, never subject to the backlog."""
        if self._disconnect_queued:
            return
        self._disconnect_queued = True
        self.close_code = code = int(code)  # picows's codes are an IntEnum; Starlette's are ints
        message = {"type": _DISCONNECT, "code": code, "reason": reason}
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(message)
                return
        self._messages.append(message)

    # -- sending and closing -------------------------------------------------------------------
    async def _until_writable(self) -> None:
        while True:
            if self._state is _State.CONNECTING:
                raise RuntimeError('WebSocket is not connected. Need to call "accept" first.')
            if self._state is not _State.OPEN:
                raise WebSocketDisconnect(self.close_code or 1006)
            if not self._writing_paused:
                return
            if self._writable is None:
                self._writable = self._loop.create_future()
            await self._writable

    def _wake_writer(self) -> None:
        if self._writable is not None:
            if not self._writable.done():
                self._writable.set_result(None)
            self._writable = None

    def _stop_sending(self) -> None:
        self._state = _State.CLOSING
        self._plain = False
        self._send_blocked = True
        self._wake_writer()  # a sender waiting for room learns the socket is closing

    def _close(self, code: int, reason: str) -> None:
        """Our close frame out; the connection ends with the peer's answer or the timeout."""
        ws = self._ws
        assert ws is not None
        self._stop_sending()
        ws.send_close(code, _fit_reason(reason))
        self._queue_disconnect(code, reason)
        if self._reading_paused:  # the answer has to be read
            self._resume_reading()
        self._close_timer = self._loop.call_later(CLOSE_TIMEOUT_S, ws.disconnect, False)

    def _fail(self, code: int, reason: str, *, quietly: bool = False) -> None:
        """End the connection now: close frame out, then the TCP connection, no waiting."""
        if not quietly:
            log.warning("media socket closed with %d: %s", code, reason)
        ws = self._ws
        assert ws is not None
        self._messages.clear()  # the handler is told at once; unread messages no longer matter
        self._stop_sending()
        ws.send_close(code, _fit_reason(reason))
        self._queue_disconnect(code, reason)
        ws.disconnect()

    def _refuse(self, status: int) -> None:
        self._state = _State.CLOSED
        self._queue_disconnect(1006)
        access_log.info(
            '%s - "WebSocket %s" %d',
            get_client_addr(self.scope),  # type: ignore[arg-type]
            get_path_with_query_string(self.scope),  # type: ignore[arg-type]
            status,
        )
        self._handshake.refuse(status)

    def _end_after_handler(self, *, failed: bool) -> None:
        if self._state is _State.CONNECTING:
            if not failed:
                log.error("media socket handler returned without accepting or closing")
            self._refuse(500)
        elif self._state is _State.OPEN:
            self._close(1011 if failed else 1000, "")

    def _gone(self, code: int, reason: str = "") -> None:
        """The TCP connection is over: wake whoever waits, leave uvicorn's connection set."""
        self._state = _State.CLOSED
        self._plain = False
        self._send_blocked = True
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self._queue_disconnect(code, reason)
        self._wake_writer()
        self._connections.discard(self)


def _fit_reason(reason: str) -> bytes:
    encoded = reason.encode()
    if len(encoded) <= MAX_CLOSE_REASON_BYTES:
        return encoded
    # Cut on a character boundary: a close reason must be valid UTF-8.
    return encoded[:MAX_CLOSE_REASON_BYTES].decode(errors="ignore").encode()
