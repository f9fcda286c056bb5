"""Synthetic speech: deterministic audio that stands in for a voice in tests and demos.

There is no text-to-speech here on purpose. An utterance is a run of tones, one per word, with
short gaps between words, so it has the rhythm and energy of speech while every part of it
stays identifiable after the phone line: the tone of the n-th word is `segment_frequency(n)`
(all of them inside the 300-3400 Hz telephone band), so a test can take the audio a caller
actually heard, find the dominant frequency of each word slot and tell exactly how far into
the utterance playback got.

`caller_speech` is the other side: speech-like energy (a harmonic-rich buzz in syllables)
for the simulated caller, which the emulator's energy VAD hears as one utterance.
"""

from __future__ import annotations

import audioop
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np

from bridge.audio import pcm16_to_ulaw, ulaw_to_pcm16

AudioFormat = Literal["audio/pcm", "audio/pcmu", "audio/pcma"]

PCM_RATE = 24_000  # the only rate the Realtime API's audio/pcm format has
G711_RATE = 8_000

# 15 tones 200 Hz apart: far enough apart to tell apart in a 40 ms window, and all inside
# the band a phone line (and an anti-aliased 24 kHz -> 8 kHz resampler) lets through.
SEGMENT_FREQUENCIES_HZ: tuple[int, ...] = tuple(range(500, 3301, 200))

MS_PER_CHARACTER = 55  # about 15 characters a second, a relaxed speaking rate
MIN_WORD_MS = 120
GAP_MS = 40  # between words; far below any VAD silence duration
RAMP_MS = 5  # raised-cosine fade in/out, so word joins do not click
AMPLITUDE = 0.25  # of full scale, about -15 dBFS RMS: a clear, unclipped voice level

_WORD = re.compile(r"\S+")


def segment_frequency(index: int) -> int:
    """The tone of the `index`-th word of an utterance (the sequence repeats every 15 words)."""
    return SEGMENT_FREQUENCIES_HZ[index % len(SEGMENT_FREQUENCIES_HZ)]


def sample_rate(fmt: AudioFormat) -> int:
    return PCM_RATE if fmt == "audio/pcm" else G711_RATE


def bytes_per_ms(fmt: AudioFormat) -> int:
    """24 kHz 16-bit PCM is 48 bytes a millisecond; 8 kHz G.711 is 8."""
    return 48 if fmt == "audio/pcm" else 8


@dataclass(frozen=True, slots=True)
class Segment:
    """One word: a tone of `frequency_hz` from `start_ms` for `duration_ms`."""

    index: int
    word: str
    frequency_hz: int
    start_ms: int
    duration_ms: int

    @property
    def end_ms(self) -> int:
        return self.start_ms + self.duration_ms


@dataclass(frozen=True, slots=True)
class Utterance:
    """The timeline of a spoken text: word segments separated by short gaps."""

    text: str
    segments: tuple[Segment, ...]
    duration_ms: int

    def words_started_by(self, ms: float) -> int:
        """How many words have begun within the first `ms` of the utterance."""
        return sum(1 for segment in self.segments if segment.start_ms < ms)

    def segment_at(self, ms: float) -> Segment | None:
        for segment in self.segments:
            if segment.start_ms <= ms < segment.end_ms:
                return segment
        return None


def plan(text: str) -> Utterance:
    """Lay out `text` on a timeline: duration grows with the length of each word."""
    segments: list[Segment] = []
    cursor = 0
    for index, match in enumerate(_WORD.finditer(text)):
        word = match.group()
        duration = max(MIN_WORD_MS, MS_PER_CHARACTER * len(word))
        duration -= duration % 10  # whole 10 ms steps keep every boundary sample-exact
        segments.append(Segment(index, word, segment_frequency(index), cursor, duration))
        cursor += duration + GAP_MS
    return Utterance(" ".join(s.word for s in segments), tuple(segments), cursor)


def render_pcm16(utterance: Utterance, rate: int) -> np.ndarray:
    """The utterance as int16 samples at `rate`."""
    total = utterance.duration_ms * rate // 1000
    out = np.zeros(total, dtype=np.float64)
    ramp_len = RAMP_MS * rate // 1000
    ramp = 0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, ramp_len))
    for segment in utterance.segments:
        start = segment.start_ms * rate // 1000
        length = segment.duration_ms * rate // 1000
        t = np.arange(length) / rate
        tone = np.sin(2.0 * np.pi * segment.frequency_hz * t)
        tone[:ramp_len] *= ramp
        tone[-ramp_len:] *= ramp[::-1]
        out[start : start + length] = tone
    return np.round(out * (AMPLITUDE * 32767.0)).astype(np.int16)


def encode_pcm16(samples: np.ndarray, fmt: AudioFormat) -> bytes:
    """int16 samples (already at the format's rate) as the wire bytes of `fmt`."""
    pcm = samples.astype("<i2", copy=False).tobytes()
    if fmt == "audio/pcm":
        return pcm
    if fmt == "audio/pcmu":
        return pcm16_to_ulaw(pcm)
    return audioop.lin2alaw(pcm, 2)  # A-law only exists here for API fidelity


def decode_to_pcm16(data: bytes, fmt: AudioFormat) -> np.ndarray:
    """Wire bytes of `fmt` as int16 samples at the format's own rate."""
    if fmt == "audio/pcm":
        usable = len(data) - len(data) % 2
        return np.frombuffer(data[:usable], dtype="<i2")
    pcm = ulaw_to_pcm16(data) if fmt == "audio/pcmu" else audioop.alaw2lin(data, 2)
    return np.frombuffer(pcm, dtype="<i2")


def synthesize(text: str, fmt: AudioFormat) -> tuple[Utterance, bytes]:
    """Speak `text`: its timeline and its audio in `fmt`."""
    utterance = plan(text)
    return utterance, encode_pcm16(render_pcm16(utterance, sample_rate(fmt)), fmt)


# --- the caller's voice ----------------------------------------------------------------------

CALLER_SYLLABLE_MS = 180
CALLER_SYLLABLE_GAP_MS = 60
_CALLER_PITCHES_HZ = (130.0, 150.0, 170.0, 145.0, 120.0)


def caller_speech(duration_ms: int, *, pitch_offset: int = 0) -> bytes:
    """`duration_ms` of speech-like mu-law audio at 8 kHz (whole 20 ms frames).

    Syllables of a buzzy, harmonic-rich tone (a fundamental near a male voice's pitch plus
    harmonics up to 3 kHz) with short pauses between them: loud enough for any energy VAD,
    with no pause long enough to end the utterance early.
    """
    if duration_ms <= 0:
        return b""
    duration_ms -= duration_ms % 20
    total = duration_ms * G711_RATE // 1000
    out = np.zeros(total, dtype=np.float64)
    step = CALLER_SYLLABLE_MS + CALLER_SYLLABLE_GAP_MS
    syllable_len = CALLER_SYLLABLE_MS * G711_RATE // 1000
    envelope = np.sin(np.linspace(0.0, np.pi, syllable_len))
    t = np.arange(syllable_len) / G711_RATE
    for n, start_ms in enumerate(range(0, duration_ms, step)):
        start = start_ms * G711_RATE // 1000
        f0 = _CALLER_PITCHES_HZ[(n + pitch_offset) % len(_CALLER_PITCHES_HZ)]
        harmonics = range(1, int(3000 // f0) + 1)
        wave = sum(np.sin(2.0 * np.pi * f0 * k * t) / k for k in harmonics)
        chunk = (wave * envelope)[: total - start]
        out[start : start + len(chunk)] = chunk
    peak = float(np.max(np.abs(out))) or 1.0
    return encode_pcm16(np.round(out * (0.5 * 32767.0 / peak)).astype(np.int16), "audio/pcmu")


# --- analysis, for tests and reports ----------------------------------------------------------


def dominant_frequency(samples: np.ndarray, rate: int) -> float:
    """The strongest frequency in `samples` (Hann-windowed FFT peak), 0.0 for silence."""
    if len(samples) == 0 or not np.any(samples):
        return 0.0
    x = samples.astype(np.float64) * np.hanning(len(samples))
    spectrum = np.abs(np.fft.rfft(x))
    spectrum[0] = 0.0
    return float(np.argmax(spectrum) * rate / len(samples))


def nearest_segment_index(frequency_hz: float) -> int | None:
    """The word position (modulo 15) a tone of `frequency_hz` stands for, if it is one of ours."""
    if frequency_hz <= 0.0:
        return None
    best = min(SEGMENT_FREQUENCIES_HZ, key=lambda f: abs(f - frequency_hz))
    if abs(best - frequency_hz) > 60.0:
        return None
    return SEGMENT_FREQUENCIES_HZ.index(best)


def rms(samples: np.ndarray) -> float:
    if len(samples) == 0:
        return 0.0
    x = samples.astype(np.float64)
    return float(np.sqrt(np.mean(x * x)))
