"""The bridge's client socket to the OpenAI Realtime API, on picows.

Per-message WebSocket overhead dominated the server's CPU with websockets' asyncio client;
picows (Cython, callback based) moves the same frames for a third to a half of the CPU. The
external contract is still websockets': callers catch `websockets.exceptions.ConnectionClosed`
and `upstream.classify_connect_error` reads `InvalidStatus` / `InvalidURI`, so this module
translates picows' outcomes into those exceptions and nothing else changes.

Only moves bytes: received TEXT and BINARY messages are handed out as `bytes` (orjson parses
them without a decode), sent events are `str`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
import sys
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from time import perf_counter
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import picows
from picows import (
    WSCloseCode,
    WSFrame,
    WSHandshakeError,
    WSInvalidURL,
    WSListener,
    WSMsgType,
    WSTransport,
    ws_connect,
)
from websockets.datastructures import Headers
from websockets.exceptions import (
    ConnectionClosed,
    ConnectionClosedError,
    ConnectionClosedOK,
    InvalidMessage,
    InvalidStatus,
    InvalidURI,
)
from websockets.frames import OK_CLOSE_CODES, Close, CloseCode
from websockets.http11 import Response
from websockets.proxy import get_proxy
from websockets.uri import parse_uri

if TYPE_CHECKING:
    from picows.picows import WSCloseInfo

# Realtime frames are small except `conversation.item.retrieved` (carries audio) and
# `session.updated` with long instructions; 16 MiB bounds memory without refusing real traffic.
# It bounds whole messages too: a fragmented message may not grow past it either.
MAX_FRAME_BYTES = 16 * 1024 * 1024

# Received messages wait in a deque until the call's pump takes them. Nothing pauses reading
# (picows reads as fast as the socket delivers), so a broken or hostile upstream could grow
# the deque without bound. A pump this far behind (minutes of audio deltas) is not coming
# back: fail the session (1008) and let the call restore a new one rather than grow memory.
MAX_QUEUED_MESSAGES = 10_000

# Writes are buffered by the transport; above this much unsent data `send` waits for it to
# drain. 1 MiB is 15 s to minutes of audio appends: only a stalled peer gets there.
WRITE_HIGH_WATER_BYTES = 1024 * 1024
# A peer that takes nothing from a full write buffer for this long is dead for a live call.
DRAIN_TIMEOUT_S = 10.0

# How long `close()` waits for the peer's close frame and TCP close before aborting. Below
# call.py's CLOSE_OLD_UPSTREAM_S (2 s) would not matter: a cancelled close() aborts too.
CLOSE_TIMEOUT_S = 2.0

# After an abort the transport reports the connection lost on the loop's next turn.
ABORT_TIMEOUT_S = 0.5

# Keepalive as websockets' client did by default (ping_interval=20, ping_timeout=20): a
# half-open TCP connection (NAT timeout, dead host) is noticed instead of waiting forever.
# picows pings only after this much silence, so a busy session sends no pings at all.
KEEPALIVE_IDLE_S = 20.0
KEEPALIVE_REPLY_S = 20.0

USER_AGENT = f"Python/{sys.version_info.major}.{sys.version_info.minor} picows/{picows.__version__}"

# Module-level aliases: the frame callback compares enum members by identity, no lookups.
_TEXT = WSMsgType.TEXT
_BINARY = WSMsgType.BINARY
_CONTINUATION = WSMsgType.CONTINUATION
_CLOSE = WSMsgType.CLOSE
_NO_CLOSE_CODE = WSCloseCode.NO_INFO


def realtime_url(url: str, model: str) -> str:
    """`url` with `model=<model>` set in its query string (other query parameters kept)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "model"]
    query.append(("model", model))
    return urlunsplit(parts._replace(query=urlencode(query)))


@functools.cache
def _default_ssl_context() -> ssl.SSLContext:
    # Certificate and hostname verification on, system CAs. Built once: loading the CA store
    # costs milliseconds, and every session (restores, renewals) would pay it again.
    return ssl.create_default_context()


class RealtimeConnection(WSListener):
    """One Realtime WebSocket: send JSON text, iterate over received messages (bytes).

    Iteration ends when the server closes normally (1000/1001, e.g. the 60-minute cap) and
    raises `websockets.ConnectionClosedError` on an abnormal close (e.g. 4000 for a beta-shaped
    session) or a dropped connection, after every message received before it was handed out;
    `close_code`/`close_reason` say which (None: no close frame came). `send` after the close
    raises `ConnectionClosedOK`/`ConnectionClosedError` as websockets' client did.

    The connection is its own picows listener: picows calls `on_ws_frame` for each frame as
    it is parsed, which queues the payload; `__anext__` takes from that queue. A fast-path
    handler (`set_fast_path`) may take a message in that callback instead, while the consumer
    is parked in `__anext__`; `send_nowait` and `writable` are the synchronous side of sending.
    """

    __slots__ = (
        "_abandoned",
        "_drain_waiter",
        "_failed",
        "_fast_path",
        "_loop",
        "_open",
        "_partial",
        "_queue",
        "_transport",
        "_waiter",
        "_write_paused",
        "queued_since",
    )

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport: WSTransport | None = None  # set when the handshake completes
        self._queue: deque[bytes] = deque()
        self._waiter: asyncio.Future[None] | None = None  # the idle consumer, if any
        self._partial: bytearray | None = None  # a fragmented message being reassembled
        self._open = True  # False once closed, failed or dropped: nothing more will arrive
        self._failed: Close | None = None  # the close we sent when we failed the connection
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._abandoned = False  # connect() gave up (timeout, cancel) before it returned
        self._fast_path: Callable[[bytes], bool] | None = None
        # perf_counter() when the receive queue last went from empty to not empty: no message
        # now queued arrived earlier, so a consumer can bound how long one has waited.
        self.queued_since = 0.0

    # -- opening ----------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        url: str,
        model: str,
        api_key: str | None,
        *,
        open_timeout: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> RealtimeConnection:
        """Open a session; `open_timeout` bounds everything (DNS, TCP, TLS, HTTP upgrade).

        Raises `InvalidStatus` when the server refuses the upgrade (its HTTP status inside),
        `InvalidURI`/`ValueError` for a bad URL, `OSError`/`TimeoutError` when the server
        cannot be reached or does not answer. `ssl_context` replaces the default verifying
        one for wss:// (tests use it to trust a local certificate).
        """
        headers = [("Authorization", f"Bearer {api_key}")] if api_key else []
        return await cls.open(
            realtime_url(url, model), headers, open_timeout=open_timeout, ssl_context=ssl_context
        )

    @classmethod
    async def open(
        cls,
        full_url: str,
        headers: list[tuple[str, str]],
        *,
        open_timeout: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> RealtimeConnection:
        """Open a WebSocket to `full_url` as is, sending `headers` with the upgrade.

        `connect` is this with the Realtime API's URL and key; the load generator's simulated
        Twilio callers use it directly (the same lean client, for the same reason). Raises
        as `connect` does.
        """
        ws_uri = parse_uri(full_url)  # InvalidURI, worded as websockets' client did
        headers = [("User-Agent", USER_AGENT), *headers]
        if ws_uri.secure and ssl_context is None:
            ssl_context = _default_ssl_context()
        connection = cls()
        try:
            async with asyncio.timeout(open_timeout):
                await ws_connect(
                    lambda request, response: connection,
                    full_url,
                    ssl_context=ssl_context,
                    # Also picows' own timer: if the outer timeout abandons the handshake, the
                    # half-open socket still closes itself.
                    websocket_handshake_timeout=open_timeout,
                    max_frame_size=MAX_FRAME_BYTES,
                    extra_headers=headers,
                    # An HTTP(S)/SOCKS proxy from the environment, as websockets' client used.
                    proxy=get_proxy(ws_uri),
                    enable_auto_ping=True,
                    auto_ping_idle_timeout=KEEPALIVE_IDLE_S,
                    auto_ping_reply_timeout=KEEPALIVE_REPLY_S,
                    # No permessage-deflate is offered (picows has none): audio in base64
                    # barely compresses, compression would only cost CPU per frame.
                )
        except WSHandshakeError as error:
            connection._abandon()
            raise _handshake_error(error) from error
        except WSInvalidURL as error:
            connection._abandon()
            raise InvalidURI(full_url, str(error)) from error
        except BaseException:
            connection._abandon()
            raise
        if connection._transport is None:
            # picows returns without a listener when the server closed during the upgrade.
            raise ConnectionResetError("connection closed during the WebSocket handshake")
        return connection

    def _abandon(self) -> None:
        # connect() is not returning this connection: nobody would ever close it.
        self._abandoned = True
        if self._transport is not None:
            self._transport.disconnect(graceful=False)

    # -- picows callbacks (run inside the event loop's read callback) ------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self._transport = transport
        if self._abandoned:  # the handshake finished after connect() had given up
            transport.disconnect(graceful=False)
            return
        transport.underlying_transport.set_write_buffer_limits(high=WRITE_HIGH_WATER_BYTES)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if (
            (msg_type is _TEXT or msg_type is _BINARY)
            and frame.fin
            and self._partial is None
            and self._open
            and frame.payload_size <= MAX_FRAME_BYTES
        ):
            # The hot path: a whole message in one frame. One copy out of picows' read
            # buffer (the frame is only valid during this call), nothing else allocated.
            payload = frame.get_payload_as_bytes()
            waiter = self._waiter
            if waiter is not None:  # the consumer is idle
                fast = self._fast_path
                # Parked (its future still pending), it has nothing queued before this
                # message: the fast-path handler may take it here, in order, with no wakeup.
                if fast is not None and not waiter.done() and fast(payload):
                    return
                # Else wake the consumer (once, not per frame: later frames only queue).
                self._waiter = None
                self.queued_since = perf_counter()  # an idle consumer has nothing queued
                self._queue.append(payload)
                if not waiter.done():
                    waiter.set_result(None)
                return
            queue = self._queue
            if not queue:
                self.queued_since = perf_counter()
            elif len(queue) >= MAX_QUEUED_MESSAGES:
                self._fail(CloseCode.POLICY_VIOLATION, "receive queue full", discard=True)
                return
            queue.append(payload)
            return
        self._on_other_frame(transport, frame, msg_type)

    def _on_other_frame(self, transport: WSTransport, frame: WSFrame, msg_type: WSMsgType) -> None:
        if msg_type is _CLOSE:
            if not transport.is_close_frame_sent:
                # Echo the peer's close (code and reason) as RFC 6455 asks; a close without a
                # code is answered with 1000 (picows always writes a code).
                code = frame.get_close_code()
                transport.send_close(
                    WSCloseCode.OK if code == _NO_CLOSE_CODE else code, frame.get_close_message()
                )
            # The closing handshake is complete; closing the TCP side now (after the echo is
            # flushed) leaves no socket behind if the server is slow to close its side.
            transport.disconnect()
            self._finish()
            return
        if not self._open:
            return  # after a failure: what was still in the read buffer is dropped
        if msg_type is _CONTINUATION:
            partial = self._partial
            if partial is None:
                self._fail(CloseCode.PROTOCOL_ERROR, "unexpected continuation frame")
                return
            partial += frame.get_payload_as_memoryview()
            if len(partial) > MAX_FRAME_BYTES:
                self._fail(CloseCode.MESSAGE_TOO_BIG, "message too big")
                return
            if frame.fin:
                self._partial = None
                self._deliver(bytes(partial))
            return
        if msg_type is _TEXT or msg_type is _BINARY:
            if self._partial is not None:
                self._fail(CloseCode.PROTOCOL_ERROR, "expected a continuation frame")
            elif frame.payload_size > MAX_FRAME_BYTES:
                # picows refuses such a frame at its header, but only disconnects 10 ms later
                # and keeps parsing meanwhile: on a fast link the whole frame can still come.
                self._fail(CloseCode.MESSAGE_TOO_BIG, "frame too big")
            else:  # not fin (else the hot path took it): the first fragment of a message
                self._partial = bytearray(frame.get_payload_as_memoryview())
            return
        # PING is answered by picows (auto-pong) before it gets here; PONG needs nothing.

    def _deliver(self, payload: bytes) -> None:
        if not self._queue:
            self.queued_since = perf_counter()
        elif len(self._queue) >= MAX_QUEUED_MESSAGES:
            self._fail(CloseCode.POLICY_VIOLATION, "receive queue full", discard=True)
            return
        self._queue.append(payload)
        self._wake()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self._partial = None
        self._finish()
        # When picows itself failed the connection (a protocol violation, a frame over
        # MAX_FRAME_BYTES) it keeps the error for `wait_disconnected`; collect it so asyncio
        # does not log "exception was never retrieved" when close() is never called.
        self._loop.create_task(_collect_disconnect_error(transport))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain = self._drain_waiter
        if drain is not None:
            self._drain_waiter = None
            if not drain.done():
                drain.set_result(None)

    # -- ending -----------------------------------------------------------------------------

    def _finish(self) -> None:
        """Nothing more will arrive: wake whoever waits to receive or to write."""
        self._open = False
        self._wake()
        self.resume_writing()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, code: int, reason: str, *, discard: bool = False) -> None:
        """Fail the connection from our side: close frame `code`, then TCP close."""
        transport = self._transport
        self._partial = None
        if discard:
            # The queue overflowed: what is in it is stale by now, and memory is the point.
            self._queue.clear()
        if self._failed is None and transport is not None and not transport.is_close_frame_sent:
            self._failed = Close(code, reason)
            transport.send_close(code, reason)
        if transport is not None:
            transport.disconnect()  # graceful: the close frame goes out first
            # A graceful close waits for the write buffer to drain, which a dead peer never
            # lets happen: abort if the connection is still there after the close timeout.
            self._loop.call_later(CLOSE_TIMEOUT_S, transport.disconnect, False)
        self._finish()

    def _closed_error(self) -> ConnectionClosed:
        """The exception websockets' client raised for this closed connection."""
        rcvd = sent = None
        rcvd_then_sent: bool | None = None
        handshake = self._transport.close_handshake if self._transport is not None else None
        if handshake is not None:
            rcvd = _close_of(handshake.recv)
            sent = _close_of(handshake.sent)
            if rcvd is not None and sent is not None:
                rcvd_then_sent = handshake.recv_then_sent
        if sent is None:
            sent = self._failed
        if (
            rcvd is not None
            and sent is not None
            and rcvd.code in OK_CLOSE_CODES
            and sent.code in OK_CLOSE_CODES
        ):
            return ConnectionClosedOK(rcvd, sent, rcvd_then_sent)
        return ConnectionClosedError(rcvd, sent, rcvd_then_sent)

    # -- the Upstream protocol (bridge.call) -------------------------------------------------

    def set_fast_path(self, handler: Callable[[bytes], bool] | None) -> None:
        """Offer each whole message to `handler` first, in the frame callback.

        A consumer woken for every message (a future, a task step, a coroutine resume) costs
        more than a model audio delta's handling. The handler is called only while the
        consumer is parked in `__anext__`: nothing is queued then and every earlier message
        has been handed out and handled, so taking this one here keeps the order. True: the
        message is handled and never queued; False: it is queued as usual. The handler must
        decide before changing anything, and must not raise (picows would fail the
        connection). Fragmented messages always take the queue. None removes the handler.
        """
        self._fast_path = handler

    @property
    def writable(self) -> bool:
        """Open, and the write buffer below its high-water mark: `send` would not wait."""
        transport = self._transport
        return (
            self._open
            and not self._write_paused
            and transport is not None
            and not transport.is_close_frame_sent
        )

    def send_nowait(self, text: str) -> bool:
        """Queue `text` as one TEXT frame, never waiting; False (nothing sent) once closed.

        A full write buffer takes the frame all the same (the high-water mark is soft): callers
        check `writable` first when they may write more than a few frames.
        """
        transport = self._transport
        if not self._open or transport is None or transport.is_close_frame_sent:
            return False
        transport.send(_TEXT, text)
        return True

    async def send(self, text: str) -> None:
        """Queue `text` as one TEXT frame. Returns at once unless the peer stopped reading."""
        transport = self._transport
        assert transport is not None
        if not self._open or transport.is_close_frame_sent:
            raise self._closed_error()  # picows would drop the frame silently
        transport.send(_TEXT, text)
        if self._write_paused:
            await self._drain()

    async def _drain(self) -> None:
        drain = self._drain_waiter
        if drain is None:
            drain = self._drain_waiter = self._loop.create_future()
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT_S):
                # Shielded: several senders may share the future; one timing out or being
                # cancelled must not cancel it for the others.
                await asyncio.shield(drain)
        except TimeoutError:
            # The peer has taken nothing for DRAIN_TIMEOUT_S: treat it as dead.
            if self._transport is not None:
                self._transport.disconnect(graceful=False)
            self._finish()
            raise self._closed_error() from None
        if not self._open:
            raise self._closed_error()  # the connection ended while the data waited

    def __aiter__(self) -> RealtimeConnection:
        return self

    async def __anext__(self) -> bytes:
        queue = self._queue
        if queue:  # frames already waiting: no future, no suspension
            return queue.popleft()
        while not queue:
            if not self._open:
                error = self._closed_error()
                if isinstance(error, ConnectionClosedOK):
                    raise StopAsyncIteration
                raise error
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None
        return queue.popleft()

    async def close(self) -> None:
        """Send a close frame (1000) and wait, at most CLOSE_TIMEOUT_S, for the connection to
        end; then abort it. Never raises on a connection that is already gone."""
        transport = self._transport
        if transport is None or transport.is_disconnected:
            return
        if not transport.is_close_frame_sent:
            transport.send_close(WSCloseCode.OK)
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await transport.wait_disconnected()
        except TimeoutError:
            transport.disconnect(graceful=False)
            # An abort completes on the loop's next turn; return with the socket gone.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(ABORT_TIMEOUT_S):
                    await transport.wait_disconnected()
        except asyncio.CancelledError:
            transport.disconnect(graceful=False)  # nobody will come back to close it
            raise
        except Exception:
            pass  # picows failed the connection itself (protocol error): it is closed anyway

    @property
    def close_code(self) -> int | None:
        """The code of the peer's close frame (1005 when it had none); None if none came."""
        close = self._received_close()
        return None if close is None else close.code

    @property
    def close_reason(self) -> str | None:
        """The reason in the peer's close frame; None if no close frame came."""
        close = self._received_close()
        return None if close is None else close.reason

    def _received_close(self) -> Close | None:
        transport = self._transport
        if transport is None or transport.close_handshake is None:
            return None
        return _close_of(transport.close_handshake.recv)


def _close_of(info: WSCloseInfo | None) -> Close | None:
    if info is None:
        return None
    code = int(info.code)
    return Close(CloseCode.NO_STATUS_RCVD if code == 0 else code, info.reason or "")


async def _collect_disconnect_error(transport: WSTransport) -> None:
    with contextlib.suppress(Exception):
        await transport.wait_disconnected()


def _handshake_error(error: WSHandshakeError) -> Exception:
    """picows' handshake failure as the exception websockets' client raised for it."""
    response = error.response
    if response is not None and response.status != HTTPStatus.SWITCHING_PROTOCOLS:
        status = int(response.status)
        headers = Headers(list(response.headers.items()))
        body = error.raw_body or b""
        return InvalidStatus(Response(status, HTTPStatus(status).phrase, headers, body))
    return InvalidMessage(str(error))  # a malformed response, or a 101 with bad headers
