"""bridge.realtime_connection: the picows client socket to the Realtime API.

Every test runs the client against a real websockets server (or a raw TCP server) on
loopback: the contract under test is what websockets' client used to do, seen from the
outside (frames in order, close codes, `ConnectionClosed*`, `InvalidStatus`), plus the
bounds picows does not give for free (receive queue, write back-pressure, close timeout).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import hashlib
import logging
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import uvloop
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import (
    ConnectionClosed,
    ConnectionClosedError,
    ConnectionClosedOK,
    InvalidStatus,
    InvalidURI,
)
from websockets.http11 import Request, Response

from bridge import realtime_connection as rc
from bridge.realtime import RealtimeConnection as ReExported
from bridge.realtime_connection import MAX_FRAME_BYTES, RealtimeConnection
from bridge.upstream import Verdict, classify_close, classify_connect_error

Handler = Callable[[ServerConnection], Awaitable[None]]
Start = Callable[..., Awaitable[str]]


async def drain(connection: RealtimeConnection) -> list[bytes]:
    return [frame async for frame in connection]


def deaf_peer() -> tuple[Handler, asyncio.Event]:
    """A server that completes the handshake, then reads nothing until the event is set."""
    release = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        ws.transport.pause_reading()
        await release.wait()

    return handler, release


def test_the_class_is_still_importable_from_bridge_realtime() -> None:
    assert ReExported is RealtimeConnection


# -- handshake ------------------------------------------------------------------------------


async def test_the_handshake_sends_the_key_the_model_and_no_extensions(realtime_server) -> None:
    seen: list[Request] = []

    async def handler(ws: ServerConnection) -> None:
        seen.append(ws.request)
        await ws.wait_closed()

    url = await realtime_server(handler)
    connection = await RealtimeConnection.connect(url, "gpt-realtime", "sk-test")
    await connection.close()

    request = seen[0]
    assert request.path == "/v1/realtime?model=gpt-realtime"
    assert request.headers["Authorization"] == "Bearer sk-test"
    assert request.headers["User-Agent"].startswith("Python/3.")
    assert "Sec-WebSocket-Extensions" not in request.headers  # no compression offered
    assert "OpenAI-Beta" not in request.headers


def refuse_with(status: int) -> Callable[[ServerConnection, Request], Response]:
    def process_request(connection: ServerConnection, request: Request) -> Response:
        response = connection.respond(status, f"refused with {status}\n")
        response.headers["X-Request-Id"] = "req_123"
        return response

    return process_request


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (401, Verdict.FATAL),
        (403, Verdict.FATAL),
        (404, Verdict.FATAL),
        (400, Verdict.FATAL),
        (429, Verdict.RETRY),
        (500, Verdict.RETRY),
        (503, Verdict.RETRY),
    ],
)
async def test_a_refused_handshake_raises_invalid_status(
    realtime_server, status: int, verdict: Verdict
) -> None:
    async def handler(ws: ServerConnection) -> None:
        raise AssertionError("never upgraded")

    url = await realtime_server(handler, process_request=refuse_with(status))
    with pytest.raises(InvalidStatus) as refused:
        await RealtimeConnection.connect(url, "m", "sk-bad")
    response = refused.value.response
    assert response.status_code == status
    assert response.headers["X-Request-Id"] == "req_123"
    assert response.body.startswith(f"refused with {status}".encode())
    assert f"HTTP {status}" in str(refused.value)
    assert classify_connect_error(refused.value) is verdict


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("http://127.0.0.1:9/v1/realtime", InvalidURI),
        ("ws:///v1/realtime", InvalidURI),
        ("ws://[::1/v1/realtime", ValueError),
    ],
)
async def test_a_bad_url_is_a_configuration_error(url: str, error: type[Exception]) -> None:
    with pytest.raises(error) as raised:
        await RealtimeConnection.connect(url, "m", "k")
    assert classify_connect_error(raised.value) is Verdict.FATAL


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_a_refused_connection_raises_oserror() -> None:
    with pytest.raises(OSError) as raised:
        await RealtimeConnection.connect(f"ws://127.0.0.1:{closed_port()}/v1/realtime", "m", "k")
    assert classify_connect_error(raised.value) is Verdict.RETRY


async def raw_server(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"ws://127.0.0.1:{port}/v1/realtime"


async def test_a_connection_closed_during_the_handshake_raises_oserror() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # read the upgrade request, then close
        writer.close()

    server, url = await raw_server(hang_up)
    try:
        with pytest.raises(OSError) as raised:
            await RealtimeConnection.connect(url, "m", "k")
    finally:
        server.close()
    assert classify_connect_error(raised.value) is Verdict.RETRY


async def test_a_silent_server_times_out_within_open_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accept TCP, never answer the HTTP upgrade
        writer.close()

    server, url = await raw_server(silent)
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError) as raised:
            await RealtimeConnection.connect(url, "m", "k", open_timeout=0.2)
    finally:
        server.close()
    assert time.monotonic() - started < 1.0
    assert classify_connect_error(raised.value) is Verdict.RETRY


async def test_a_handshake_that_completes_after_connect_gave_up_is_closed(realtime_server) -> None:
    closed = asyncio.Event()

    async def slow_upgrade(connection: ServerConnection, request: Request) -> None:
        await asyncio.sleep(0.3)  # the upgrade is answered after the client stopped waiting

    async def handler(ws: ServerConnection) -> None:
        await ws.wait_closed()
        closed.set()

    url = await realtime_server(handler, process_request=slow_upgrade)
    attempt = asyncio.create_task(RealtimeConnection.connect(url, "m", "k", open_timeout=5))
    await asyncio.sleep(0.1)
    attempt.cancel()
    with pytest.raises(asyncio.CancelledError):
        await attempt
    await asyncio.wait_for(closed.wait(), 2)  # nobody owns that socket: it must not stay open


# -- receiving ------------------------------------------------------------------------------


async def test_text_and_binary_messages_arrive_in_order_as_bytes(realtime_server) -> None:
    sent: list[str | bytes] = [
        f'{{"n":{i}}}' if i % 3 else f'{{"n":{i}}}'.encode() for i in range(500)
    ]

    async def handler(ws: ServerConnection) -> None:
        for message in sent:
            await ws.send(message)
        await ws.close()

    connection = await RealtimeConnection.connect(await realtime_server(handler), "m", "k")
    received = await drain(connection)
    assert all(type(frame) is bytes for frame in received)
    assert received == [m.encode() if isinstance(m, str) else m for m in sent]
    assert (connection.close_code, connection.close_reason) == (1000, "")


async def test_a_fragmented_message_is_reassembled_around_a_ping(realtime_server) -> None:
    pong_came = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        async def fragments() -> AsyncIterator[str]:
            yield '{"type":"conversation.item.retrieved",'
            pong = await ws.ping(b"mid-message")  # a control frame between fragments
            await asyncio.wait_for(pong, 2)
            pong_came.set()
            yield '"item":{"id":"x"}}'

        await ws.send("before")
        await ws.send(fragments())
        await ws.send([b"\x00\x01", b"", b"\x02"])  # binary fragments, one of them empty
        await ws.send("after")
        await ws.close()

    connection = await RealtimeConnection.connect(await realtime_server(handler), "m", "k")
    assert await drain(connection) == [
        b"before",
        b'{"type":"conversation.item.retrieved","item":{"id":"x"}}',
        b"\x00\x01\x02",
        b"after",
    ]
    assert pong_came.is_set()  # picows answered the ping


@pytest.mark.parametrize("code", [1000, 1001])
async def test_a_normal_close_ends_iteration_after_the_queued_messages(
    realtime_server, code: int
) -> None:
    async def handler(ws: ServerConnection) -> None:
        for i in range(3):
            await ws.send(str(i))
        await ws.close(code, "session over")

    connection = await RealtimeConnection.connect(await realtime_server(handler), "m", "k")
    await asyncio.sleep(0.1)  # everything, close frame included, has arrived
    assert await drain(connection) == [b"0", b"1", b"2"]
    assert (connection.close_code, connection.close_reason) == (code, "session over")
    with pytest.raises(StopAsyncIteration):  # and it stays ended
        await anext(connection)


@pytest.mark.parametrize(("code", "verdict"), [(4000, Verdict.FATAL), (1011, Verdict.RETRY)])
async def test_an_abnormal_close_raises_with_the_code_after_the_queued_messages(
    realtime_server, code: int, verdict: Verdict
) -> None:
    server_saw: list[int | None] = []

    async def handler(ws: ServerConnection) -> None:
        await ws.send("last words")
        await ws.close(code, "beta_api_shape_disabled")
        server_saw.append(ws.close_code)

    connection = await RealtimeConnection.connect(await realtime_server(handler), "m", "k")
    await asyncio.sleep(0.1)
    assert await anext(connection) == b"last words"
    with pytest.raises(ConnectionClosedError) as closed:
        await anext(connection)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (code, "beta_api_shape_disabled")
    assert closed.value.sent is not None and closed.value.sent.code == code  # echoed
    assert classify_close(closed.value.rcvd.code) is verdict
    assert (connection.close_code, connection.close_reason) == (code, "beta_api_shape_disabled")
    assert server_saw == [code]  # the closing handshake completed


async def test_a_dropped_connection_raises_without_a_close_frame(realtime_server) -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.send("one")
        await asyncio.sleep(0.05)
        ws.transport.abort()  # TCP reset, no close frame

    connection = await RealtimeConnection.connect(await realtime_server(handler), "m", "k")
    assert await anext(connection) == b"one"
    with pytest.raises(ConnectionClosedError) as closed:
        await anext(connection)
    assert closed.value.rcvd is None
    assert connection.close_code is None and connection.close_reason is None
    with pytest.raises(ConnectionClosedError):
        await connection.send("{}")
    await asyncio.wait_for(connection.close(), 0.5)  # quiet on a dead connection


async def test_a_waiting_consumer_is_woken_by_a_message_and_by_the_close(realtime_server) -> None:
    go = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        await go.wait()
        await ws.send("late")
        await asyncio.sleep(0.05)
        await ws.close(1011)

    connection = await RealtimeConnection.connect(await realtime_server(handler), "m", "k")
    waiting = asyncio.create_task(anext(connection))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    go.set()
    assert await asyncio.wait_for(waiting, 1) == b"late"
    with pytest.raises(ConnectionClosedError):
        await asyncio.wait_for(anext(connection), 1)


async def test_a_cancelled_wait_leaves_the_connection_usable(realtime_server) -> None:
    go = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        await go.wait()
        await ws.send("after the cancel")
        await ws.close()

    connection = await RealtimeConnection.connect(await realtime_server(handler), "m", "k")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(connection), 0.05)
    go.set()
    assert await drain(connection) == [b"after the cancel"]


async def test_a_frame_over_the_size_limit_fails_the_connection_1009(realtime_server) -> None:
    server_saw: list[int | None] = []

    async def handler(ws: ServerConnection) -> None:
        await ws.send("fine")
        with contextlib.suppress(ConnectionClosed):  # reset: the client stops reading
            await ws.send(b"x" * (MAX_FRAME_BYTES + 1))
        await ws.wait_closed()
        server_saw.append(ws.close_code)

    connection = await RealtimeConnection.connect(
        await realtime_server(handler, max_size=None), "m", "k"
    )
    assert await anext(connection) == b"fine"
    with pytest.raises(ConnectionClosedError) as closed:
        await asyncio.wait_for(anext(connection), 5)
    assert closed.value.sent is not None and closed.value.sent.code == 1009
    await asyncio.sleep(0.1)
    assert server_saw == [1009]


async def test_a_fragmented_message_over_the_size_limit_fails_the_connection_1009(
    realtime_server,
) -> None:
    half = b"x" * (MAX_FRAME_BYTES // 2 + 1)  # each fragment fits, the message does not

    async def handler(ws: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            await ws.send([half, half])
        await ws.wait_closed()

    connection = await RealtimeConnection.connect(
        await realtime_server(handler, max_size=None), "m", "k"
    )
    with pytest.raises(ConnectionClosedError) as closed:
        await asyncio.wait_for(anext(connection), 5)
    assert closed.value.sent is not None and closed.value.sent.code == 1009


async def test_a_flood_past_the_receive_queue_bound_fails_the_connection_1008(
    realtime_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rc, "MAX_QUEUED_MESSAGES", 50)
    server_saw: list[int | None] = []

    async def handler(ws: ServerConnection) -> None:
        try:
            for i in range(1000):
                await ws.send(f'{{"n":{i}}}')
        except ConnectionClosed:
            pass
        await ws.wait_closed()
        server_saw.append(ws.close_code)

    connection = await RealtimeConnection.connect(await realtime_server(handler), "m", "k")
    await asyncio.sleep(0.3)  # nobody consumes: the queue fills up
    with pytest.raises(ConnectionClosedError) as closed:
        await anext(connection)  # the stale backlog is dropped, not handed out
    assert closed.value.sent is not None and closed.value.sent.code == 1008
    assert classify_close(closed.value.sent.code) is Verdict.FATAL  # (what we sent, for info)
    assert server_saw == [1008]
    assert len(connection._queue) == 0


async def test_no_unretrieved_exception_is_logged_when_close_is_never_called(
    realtime_server, caplog: pytest.LogCaptureFixture
) -> None:
    async def handler(ws: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):  # picows fails the connection itself
            await ws.send(b"x" * (MAX_FRAME_BYTES + 1))
        await ws.wait_closed()

    connection = await RealtimeConnection.connect(
        await realtime_server(handler, max_size=None), "m", "k"
    )
    with pytest.raises(ConnectionClosedError):
        await asyncio.wait_for(anext(connection), 5)
    await asyncio.sleep(0.05)
    del connection
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        gc.collect()
        await asyncio.sleep(0)
    assert "never retrieved" not in caplog.text


# -- raw frames (what a websockets server will not send) -------------------------------------

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def server_frame(opcode: int, payload: bytes = b"", *, fin: bool = True) -> bytes:
    """One unmasked server frame (payloads under 126 bytes)."""
    assert len(payload) < 126
    return bytes([(0x80 if fin else 0) | opcode, len(payload)]) + payload


def client_close_code(data: bytes) -> int | None:
    """The code in the first frame the client sent, if it is a close frame (client frames are
    masked)."""
    if len(data) < 2 or data[0] & 0x0F != 0x8:
        return None
    length, mask = data[1] & 0x7F, data[2:6]
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(data[6 : 6 + length]))
    return int.from_bytes(payload[:2], "big")


async def raw_websocket_server(frames: bytes) -> tuple[asyncio.Server, str, asyncio.Future[bytes]]:
    """Accepts one client, upgrades by hand, writes `frames`; the future gets what the client
    sent until it closed."""
    received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        key = next(
            line.split(b":", 1)[1].strip()
            for line in request.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n" + frames
        )
        await writer.drain()
        data = await reader.read()  # until the client closes
        writer.close()
        received.set_result(data)

    server, url = await raw_server(handle)
    return server, url, received


@pytest.mark.parametrize(
    "frames",
    [
        server_frame(0x1, b"ok")
        + server_frame(0x0, b"orphan"),  # continuation, nothing to continue
        server_frame(0x1, b"ok") + server_frame(0x1, b"a", fin=False) + server_frame(0x1, b"b"),
    ],
    ids=["orphan-continuation", "interrupted-fragments"],
)
async def test_broken_fragmentation_fails_the_connection_1002(frames: bytes) -> None:
    server, url, received = await raw_websocket_server(frames)
    try:
        connection = await RealtimeConnection.connect(url, "m", "k")
        assert await anext(connection) == b"ok"
        with pytest.raises(ConnectionClosedError) as closed:
            await asyncio.wait_for(anext(connection), 2)
        assert closed.value.sent is not None and closed.value.sent.code == 1002
        assert client_close_code(await asyncio.wait_for(received, 2)) == 1002
    finally:
        server.close()


async def test_a_close_frame_without_a_code_is_a_normal_close() -> None:
    frames = server_frame(0x2, b"\x01") + server_frame(0x9, b"hi") + server_frame(0x8)
    server, url, received = await raw_websocket_server(frames)
    try:
        connection = await RealtimeConnection.connect(url, "m", "k")
        assert await drain(connection) == [b"\x01"]
        assert (connection.close_code, connection.close_reason) == (1005, "")
        sent = await asyncio.wait_for(received, 2)
    finally:
        server.close()
    assert sent[0] == 0x8A  # the PING was answered with a PONG first
    assert client_close_code(sent[6 + (sent[1] & 0x7F) :]) == 1000  # then the close answered


# -- sending --------------------------------------------------------------------------------


async def test_sent_text_arrives_in_order_as_text_frames(realtime_server) -> None:
    received: list[str | bytes] = []

    async def handler(ws: ServerConnection) -> None:
        async for message in ws:
            received.append(message)
            if message == "bye":
                await ws.close()

    connection = await RealtimeConnection.connect(await realtime_server(handler), "m", "k")
    events = [f'{{"type":"input_audio_buffer.append","audio":"{i:04d}é"}}' for i in range(300)]
    for event in [*events, "bye"]:
        await connection.send(event)
    assert await drain(connection) == []
    assert received == [*events, "bye"]  # str on the server side: TEXT frames, UTF-8


async def test_send_after_the_close_raises_connection_closed(realtime_server) -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.wait_closed()

    url = await realtime_server(handler)
    ours = await RealtimeConnection.connect(url, "m", "k")
    await ours.close()
    with pytest.raises(ConnectionClosedOK):
        await ours.send("{}")
    await ours.close()  # twice is fine

    async def closes(ws: ServerConnection) -> None:
        await ws.close(1000)

    theirs = await RealtimeConnection.connect(await realtime_server(closes), "m", "k")
    assert await drain(theirs) == []
    with pytest.raises(ConnectionClosedOK):
        await theirs.send("{}")

    async def fails(ws: ServerConnection) -> None:
        await ws.close(1011)

    failed = await RealtimeConnection.connect(await realtime_server(fails), "m", "k")
    with pytest.raises(ConnectionClosedError):
        await anext(failed)
    with pytest.raises(ConnectionClosedError) as closed:
        await failed.send("{}")
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011


async def test_send_waits_while_the_peer_does_not_read_then_goes_on(
    realtime_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rc, "WRITE_HIGH_WATER_BYTES", 64 * 1024)
    reading = asyncio.Event()
    got: list[int] = []

    async def handler(ws: ServerConnection) -> None:
        ws.transport.pause_reading()
        await reading.wait()
        ws.transport.resume_reading()
        async for message in ws:
            got.append(len(message))

    connection = await RealtimeConnection.connect(
        await realtime_server(handler, max_size=None), "m", "k"
    )
    chunk = "a" * (256 * 1024)
    blocked = None
    for _ in range(400):  # kernel buffers first, then the transport's, then we must wait
        send = asyncio.create_task(connection.send(chunk))
        await asyncio.sleep(0.01)
        if not send.done():
            blocked = send
            break
        send.result()
    assert blocked is not None, "send never waited for the peer"
    reading.set()
    await asyncio.wait_for(blocked, 5)
    await connection.close()
    assert got and all(size == len(chunk) for size in got)


async def test_send_to_a_peer_that_never_reads_gives_up(
    realtime_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rc, "WRITE_HIGH_WATER_BYTES", 64 * 1024)
    monkeypatch.setattr(rc, "DRAIN_TIMEOUT_S", 0.2)

    handler, release = deaf_peer()
    connection = await RealtimeConnection.connect(await realtime_server(handler), "m", "k")
    chunk = "a" * (256 * 1024)
    started = time.monotonic()
    with pytest.raises(ConnectionClosedError) as closed:
        for _ in range(400):
            await connection.send(chunk)
    assert time.monotonic() - started < 5
    assert closed.value.rcvd is None
    with pytest.raises(ConnectionClosedError):
        await anext(connection)  # the receiving side learns it too
    await asyncio.wait_for(connection.close(), 0.5)
    release.set()


# -- closing --------------------------------------------------------------------------------


async def test_close_completes_the_closing_handshake(realtime_server) -> None:
    server_saw: list[int | None] = []

    async def handler(ws: ServerConnection) -> None:
        await ws.wait_closed()
        server_saw.append(ws.close_code)

    connection = await RealtimeConnection.connect(await realtime_server(handler), "m", "k")
    await asyncio.wait_for(connection.close(), 1)
    assert connection.close_code == 1000  # the server's answer
    assert await drain(connection) == []
    await asyncio.sleep(0.05)
    assert server_saw == [1000]


async def test_close_on_an_unresponsive_peer_is_bounded_and_quiet(
    realtime_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rc, "CLOSE_TIMEOUT_S", 0.2)

    handler, release = deaf_peer()  # never sees our close frame, never answers
    connection = await RealtimeConnection.connect(await realtime_server(handler), "m", "k")
    started = time.monotonic()
    await connection.close()
    assert time.monotonic() - started < 1
    assert connection._transport is not None and connection._transport.is_disconnected
    with pytest.raises(ConnectionClosedError):  # we sent a close, none came back
        await anext(connection)
    release.set()


async def test_a_cancelled_close_still_aborts_the_socket(realtime_server) -> None:
    handler, release = deaf_peer()
    connection = await RealtimeConnection.connect(await realtime_server(handler), "m", "k")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(connection.close(), 0.05)
    await asyncio.sleep(0.05)
    assert connection._transport is not None and connection._transport.is_disconnected
    release.set()


# -- TLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    yield cert, key


async def test_wss_verifies_the_certificate(realtime_server, self_signed) -> None:
    cert, key = self_signed
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)

    async def handler(ws: ServerConnection) -> None:
        await ws.send(await ws.recv())
        await ws.close()

    url = (await realtime_server(handler, ssl=server_tls)).replace("ws://", "wss://")

    # The default context trusts the system CAs only: a self-signed server is refused. (FATAL,
    # as it was with websockets: SSLCertVerificationError is also a ValueError.)
    with pytest.raises(ssl.SSLCertVerificationError) as refused:
        await RealtimeConnection.connect(url, "m", "k")
    assert classify_connect_error(refused.value) is Verdict.FATAL

    trusting = ssl.create_default_context(cafile=str(cert))
    connection = await RealtimeConnection.connect(url, "m", "k", ssl_context=trusting)
    assert connection._transport is not None and connection._transport.is_secure
    await connection.send('{"type":"echo"}')
    assert await drain(connection) == [b'{"type":"echo"}']


# -- event loops ----------------------------------------------------------------------------


async def a_short_session() -> list[bytes]:
    async def handler(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)
            if message == "3":
                await ws.close(1001)

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        connection = await RealtimeConnection.connect(f"ws://127.0.0.1:{port}/", "m", "k")
        for i in range(4):
            await connection.send(str(i))
        frames = await drain(connection)
        await connection.close()
        return frames


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_runs_on_both_event_loops(loop_name: str) -> None:
    factory = uvloop.new_event_loop if loop_name == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        assert runner.run(a_short_session()) == [b"0", b"1", b"2", b"3"]
        assert type(runner.get_loop()).__module__.startswith(loop_name)
