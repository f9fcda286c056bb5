"""The end-to-end rig: the real server on loopback, the Realtime emulator, the simulated caller."""

from __future__ import annotations

import contextlib
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from twilio.request_validator import RequestValidator

from app.embedded import RunningServer, bind_loopback, running_server, wait_until
from app.settings import Settings
from bridge.sim import voice
from bridge.sim.caller import DEMO_SCRIPT, CallerScript, CallReport, place_call
from bridge.sim.emulator import Emulator, run_emulator
from bridge.sim.scenario import Scenario

AUTH_TOKEN = "e2e-test-auth-token"
BUSINESS_NUMBER = "+15005550006"  # acme-plumbing in the demo profiles
CALLER_NUMBER = "+15005550199"


@dataclass(slots=True)
class Stack:
    emulator: Emulator
    server: RunningServer

    @property
    def services(self) -> Any:
        return self.server.app.state.services

    @property
    def url(self) -> str:
        return self.server.url


@contextlib.asynccontextmanager
async def call_stack(
    scenario: Scenario | str,
    *,
    database_url: str,
    redis_url: str | None = None,
    audio_mode: str = "pcm16",
    speed: float = 0.0,
    **settings: Any,
) -> AsyncIterator[Stack]:
    async with run_emulator(scenario, speed=speed) as emulator:
        sock = bind_loopback()
        config = Settings(
            _env_file=None,  # type: ignore[call-arg]
            public_url=f"http://127.0.0.1:{sock.getsockname()[1]}",
            openai_realtime_url=emulator.url,
            twilio_auth_token=AUTH_TOKEN,
            database_url=database_url,
            redis_url=redis_url,
            audio_mode=audio_mode,
            **settings,
        )
        async with running_server(config, sock) as server:
            yield Stack(emulator, server)


def signed_headers(url: str, params: dict[str, str]) -> dict[str, str]:
    signature = RequestValidator(AUTH_TOKEN).compute_signature(url, params)
    return {"X-Twilio-Signature": signature}


async def incoming_call(stack: Stack, call_sid: str, **extra: str) -> httpx.Response:
    """POST a correctly signed /voice/incoming, as Twilio does when the number is dialled."""
    params = {
        "CallSid": call_sid,
        "AccountSid": "AC" + "0" * 32,
        "From": CALLER_NUMBER,
        "To": BUSINESS_NUMBER,
        "CallStatus": "ringing",
        "Direction": "inbound",
        **extra,
    }
    url = stack.url + "/voice/incoming"
    async with httpx.AsyncClient() as client:
        return await client.post(url, data=params, headers=signed_headers(url, params))


async def simulated_call(
    stack: Stack,
    script: CallerScript = DEMO_SCRIPT,
    *,
    caller: str = CALLER_NUMBER,
    pace: float = 0.0,
    **options: Any,
) -> CallReport:
    """A signed simulated Twilio call to the demo business, run to its end on the server."""
    report = await place_call(
        server_url=stack.url,
        auth_token=AUTH_TOKEN,
        to=BUSINESS_NUMBER,
        from_=caller,
        script=script,
        pace=pace,
        **options,
    )
    await wait_until_idle(stack)
    return report


async def wait_until_idle(stack: Stack, timeout_s: float = 10.0) -> None:
    """Until the server has finished every call (and so written its call records)."""
    await wait_until(lambda: not stack.services.calls, timeout_s)


def read_wav_pcm(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as wav:
        rate = wav.getframerate()
        samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    return samples.astype(np.float64), rate


def word_frequencies(samples: np.ndarray, rate: int) -> list[int]:
    """The synthetic voice's words as heard: runs of sound between gaps, by dominant tone.

    Each word of `bridge.sim.voice` is one tone; the tone tells the word's position in its
    utterance, so the sequence shows order and completeness of what the caller heard.
    """
    window = rate // 100  # 10 ms
    frames = len(samples) // window
    if frames == 0:
        return []
    blocks = samples[: frames * window].reshape(frames, window)
    loud = np.sqrt((blocks**2).mean(axis=1)) > 300
    words: list[int] = []
    start = None
    for i, on in enumerate([*loud, False]):
        if on and start is None:
            start = i
        elif not on and start is not None:
            if i - start >= 4:  # >= 40 ms: a word, not a click
                # The middle of the word: away from the fades at its ends.
                mid = samples[(start + 1) * window : (i - 1) * window]
                index = voice.nearest_segment_index(voice.dominant_frequency(mid, rate))
                if index is not None:
                    words.append(voice.segment_frequency(index))
            start = None
    return words


def expected_word_frequencies(texts: list[str]) -> list[int]:
    return [segment.frequency_hz for text in texts for segment in voice.plan(text).segments]
