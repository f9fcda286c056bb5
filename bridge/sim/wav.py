"""WAV files for the simulated caller: record what it heard, play a file as what it says.

Phone audio is 8 kHz mono; recordings are 16-bit PCM WAV at that rate so any player opens
them. A file to speak may be any PCM WAV (8 or 16 bit, mono or stereo, any rate); it is
converted to 8 kHz mu-law, the only format a Twilio media stream carries.
"""

from __future__ import annotations

import audioop
import wave
from pathlib import Path

from bridge.audio import Downsampler24to8, pcm16_to_ulaw

PHONE_RATE = 8000


def write_wav(path: Path, pcm16: bytes, *, rate: int = PHONE_RATE) -> None:
    """Write mono 16-bit little-endian PCM to `path` as a WAV file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm16)


def read_wav(path: Path) -> tuple[bytes, int]:
    """A WAV file's audio as mono 16-bit PCM, and its sample rate."""
    try:
        with wave.open(str(path), "rb") as src:
            channels, width, rate = src.getnchannels(), src.getsampwidth(), src.getframerate()
            frames = src.readframes(src.getnframes())
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"{path}: not a PCM WAV file ({exc})") from exc
    if width not in (1, 2, 3, 4):
        raise ValueError(f"{path}: unsupported sample width {width}")
    if width == 1:
        frames = audioop.bias(frames, 1, -128)  # WAV stores 8-bit audio unsigned
    if width != 2:
        frames = audioop.lin2lin(frames, width, 2)
    if channels == 2:
        frames = audioop.tomono(frames, 2, 0.5, 0.5)
    elif channels != 1:
        raise ValueError(f"{path}: {channels} channels; use mono or stereo")
    return frames, rate


def read_wav_as_ulaw(path: Path) -> bytes:
    """A WAV file as 8 kHz mu-law, ready to send as Twilio media."""
    pcm, rate = read_wav(path)
    if rate == 24_000:
        pcm = Downsampler24to8().process(pcm)  # anti-aliased
    elif rate != PHONE_RATE:
        # Other rates are rare for test prompts; audioop's converter is good enough for them.
        pcm, _ = audioop.ratecv(pcm, 2, 1, rate, PHONE_RATE, None)
    return pcm16_to_ulaw(pcm)
