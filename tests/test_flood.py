"""One caller floods its media stream; another call on the same server must not notice.

Injected: a media socket (with a valid token) that sends thousands of audio frames as fast as
the socket takes them, far beyond Twilio's 50 per second, while a well-behaved caller talks in
real time on a second call. Kept: the flood is cut to the per-stream limit (CallProtocol's
`max_frames_per_s`, drop reason `rate_limited`) and counted in
`switchboard_frames_dropped_total`; the flooding call itself is not torn down; the other
call's audio all reaches the model and its echo comes back.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import xml.etree.ElementTree as ET

import httpx
import websockets

from app.embedded import wait_until
from app.metrics import metric_sample
from bridge import twilio_media as tw
from bridge.sim.caller import ECHO_SCRIPT, place_call
from bridge.sim.emulator import SessionRecord
from tests.e2e import (
    AUTH_TOKEN,
    BUSINESS_NUMBER,
    CALLER_NUMBER,
    call_stack,
    incoming_call,
    wait_until_idle,
)

FLOOD_FRAMES = 5_000
FRAME = b"\x10\x90" * 80  # 20 ms of mu-law that is not silence
APPEND = "input_audio_buffer.append"


def frames_appended(session: SessionRecord) -> int:
    """20 ms frames of caller audio the model received (the bridge may batch several frames
    into one append): 24 kHz 16-bit PCM is 48 bytes per millisecond."""
    pcm = sum(len(base64.b64decode(e["audio"])) for e in session.received(APPEND))
    return round(pcm / 48 / 20)


# Counters not yet incremented are absent from the exposition: they count as 0.
sample = functools.partial(metric_sample, absent=0.0)


async def test_a_flooding_caller_is_limited_and_another_call_is_unaffected(
    sqlite_url: str, tmp_path
) -> None:
    async with call_stack("echo", database_url=sqlite_url, spool_dir=tmp_path / "s") as stack:
        services = stack.services
        # The well-behaved caller: real-time pace (50 frames a second), echo comes back.
        polite = asyncio.create_task(
            place_call(
                server_url=stack.url,
                auth_token=AUTH_TOKEN,
                to=BUSINESS_NUMBER,
                from_=CALLER_NUMBER,
                script=ECHO_SCRIPT,
                pace=1.0,
            )
        )
        await wait_until(lambda: len(services.calls) == 1 or polite.done(), 20)

        flood_sid = "CA" + "f" * 32
        answer = await incoming_call(stack, flood_sid, From="+15005550123")
        stream = ET.fromstring(answer.text).find("./Connect/Stream/Parameter[@name='token']")
        assert stream is not None, answer.text
        ws = await websockets.connect(stack.url.replace("http", "ws") + "/media-stream")
        writer = tw.TwilioStreamWriter("MZ" + "f" * 32, flood_sid, "AC" + "0" * 32)
        await ws.send(writer.connected())
        await ws.send(writer.start({"token": stream.attrib["value"]}))
        await wait_until(lambda: flood_sid in services.calls, 10)
        for _ in range(FLOOD_FRAMES):
            await ws.send(writer.media(FRAME))
        still_open = ws.state is websockets.protocol.State.OPEN
        await ws.send(writer.stop())
        await ws.close()

        report = await asyncio.wait_for(polite, 60)
        await wait_until_idle(stack)
        async with httpx.AsyncClient(base_url=stack.url) as http:
            metrics = (await http.get("/metrics")).text
        polite_session, flood_session = stack.emulator.sessions

    limited = sample(metrics, "switchboard_frames_dropped_total", reason="rate_limited")
    flood_in = frames_appended(flood_session)
    polite_in = frames_appended(polite_session)
    polite_sent = round(report.audio_sent_ms / 20)
    print(
        f"injected: {FLOOD_FRAMES} frames as fast as possible on {flood_sid}; kept: "
        f"{flood_in} reached the model, {limited:.0f} dropped as rate_limited; the other call "
        f"sent {polite_sent} frames at real-time pace and the model got {polite_in}"
    )
    # The flood was cut down and counted, without hanging up on the caller.
    assert still_open
    assert limited > 0
    # Every frame is accounted for by the server: let through or dropped as rate_limited.
    frames_in = sample(metrics, "switchboard_frames_in_total")
    assert frames_in + limited == FLOOD_FRAMES + polite_sent
    assert flood_in <= frames_in - polite_sent < FLOOD_FRAMES
    # The other call: every frame reached the model, its echo was heard, nothing went wrong.
    assert report.violations == []
    assert polite_in >= 0.99 * polite_sent
    assert report.audio_played_ms > 0
