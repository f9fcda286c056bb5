"""Audio core: G.711 μ-law and the streaming 8 kHz ⇄ 24 kHz resamplers.

Quality bars are measured on real signals (tones, chirps, impulses), not read off the design.
"""

from __future__ import annotations

import audioop  # stdlib on 3.11/3.12 (audioop-lts on 3.13+): the independent G.711 oracle
import itertools
import math
from collections.abc import Callable, Iterable
from typing import Protocol

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge import audio
from bridge import audio_quality as quality
from bridge.audio import (
    DOWNSAMPLE_DELAY_MS,
    ROUND_TRIP_DELAY_MS,
    UPSAMPLE_DELAY_MS,
    Downsampler24to8,
    InboundTranscoder,
    OutboundTranscoder,
    Upsampler8to24,
    pcm16_to_ulaw,
    ulaw_to_pcm16,
)
from bridge.audio_quality import (
    PASSBAND_HZ as PASSBAND,
)
from bridge.audio_quality import (
    RATE_HIGH,
    RATE_LOW,
    SETTLE_LOW,
    chirp,
    db,
    downsample,
    lag_of,
    pcm,
    rms,
    samples_of,
    tone,
    upsample,
)
from bridge.audio_quality import (
    STOPBAND_HZ as STOPBAND,
)
from bridge.codec_bench import run_codec_bench

ALL_INT16 = np.arange(-32768, 32768, dtype=np.int16)
STATEFUL = (Upsampler8to24, Downsampler24to8, InboundTranscoder, OutboundTranscoder)


class Processor(Protocol):
    def process(self, data: bytes, /) -> bytes: ...


# ----------------------------------------------------------------------------- helpers


def feed(processor: Processor, data: bytes, sizes: Iterable[int]) -> bytes:
    """Feed ``data`` in consecutive chunks of the given sizes (cycled), concatenating outputs."""
    out, start = [], 0
    for size in itertools.cycle(sizes):
        if start >= len(data):
            break
        out.append(processor.process(data[start : start + size]))
        start += size
    return b"".join(out)


def direct_fir(x: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Causal FIR by plain convolution, saturated to the int16 range but not rounded."""
    return np.clip(np.convolve(x.astype(np.float64), taps)[: len(x)], -32768, 32767)


# The implementation rounds its taps to a 2**-30 grid (for exact arithmetic); against the
# unrounded design that moves outputs by < 0.01, so correct rounding stays within 0.51.
ROUNDING_TOLERANCE = 0.51


# ----------------------------------------------------------------------------- quality bar 1


def test_downsampler_attenuates_4k6_to_12k_by_at_least_60_db() -> None:
    levels = quality.stopband_levels_db()  # everything that comes out is alias
    worst = max(levels)
    assert worst <= -60.0, f"worst stopband level {worst:.1f} dB at {STOPBAND[np.argmax(levels)]}"


def test_stopband_measurement_detects_aliasing() -> None:
    # The same measurement on audioop.ratecv (no anti-alias filter) must fail loudly, or the
    # test above would prove nothing.
    x = tone(5000, RATE_HIGH, 0.25, 30000)
    y, _ = audioop.ratecv(pcm(x), 2, 1, RATE_HIGH, RATE_LOW, None)
    assert db(rms(samples_of(y)[SETTLE_LOW:]) / rms(x)) > -10.0


# ----------------------------------------------------------------------------- quality bar 2


@pytest.mark.parametrize("direction", ["down", "up"])
def test_passband_ripple_at_most_half_db(direction: str) -> None:
    gains = quality.passband_gains_db(direction)
    assert max(gains) - min(gains) <= 0.5
    assert max(abs(g) for g in gains) <= 0.5  # and centred on unity gain


def test_upsampler_rejects_images_by_at_least_60_db() -> None:
    # Zero-stuffing puts images of f at 8k - f and 8k + f; whatever is left after removing the
    # tone itself is image (plus int16 rounding).
    levels = quality.image_levels_db()
    assert max(levels) <= -60.0, PASSBAND[int(np.argmax(levels))]


# ----------------------------------------------------------------------------- quality bar 3


def error_db(reference: bytes, candidate: bytes) -> float:
    ref, cand = samples_of(reference), samples_of(candidate)
    assert len(ref) == len(cand)
    error = float(np.sum(np.square(ref - cand)))
    return -math.inf if error == 0 else 10 * math.log10(error / float(np.sum(np.square(ref))))


@pytest.mark.parametrize("freq", [440.0, 1000.0, 3100.0])
def test_upsampler_frame_by_frame_matches_one_piece(freq: float) -> None:
    x = pcm(tone(freq, RATE_LOW, 1.0, 16000))
    whole = Upsampler8to24().process(x)
    framed = feed(Upsampler8to24(), x, [320])  # 20 ms at 8 kHz
    assert error_db(whole, framed) <= -60.0


@pytest.mark.parametrize("freq", [440.0, 1000.0, 3100.0])
@pytest.mark.parametrize("sizes", [[960], [1, 7, 333, 959, 2, 961, 13, 480]])
def test_downsampler_frame_by_frame_matches_one_piece(freq: float, sizes: list[int]) -> None:
    x = pcm(tone(freq, RATE_HIGH, 1.0, 16000))
    whole = Downsampler24to8().process(x)
    framed = feed(Downsampler24to8(), x, sizes)  # 20 ms frames, then odd byte counts
    assert error_db(whole, framed) <= -60.0


def test_transcoders_frame_by_frame_match_one_piece() -> None:
    ulaw = pcm16_to_ulaw(pcm(tone(1000, RATE_LOW, 1.0, 16000)))
    assert error_db(InboundTranscoder().process(ulaw), feed(InboundTranscoder(), ulaw, [160])) < -60
    x = pcm(tone(1000, RATE_HIGH, 1.0, 16000))
    whole = ulaw_to_pcm16(OutboundTranscoder().process(x))
    framed = ulaw_to_pcm16(feed(OutboundTranscoder(), x, [960, 7, 331]))
    assert error_db(whole, framed) <= -60.0


def test_resamplers_equal_a_direct_form_fir() -> None:
    # The polyphase/block machinery must compute exactly the textbook filter: zero-stuff and
    # convolve with 3 x taps (up), convolve then keep every third sample (down).
    taps = audio._LOWPASS  # the designed filter (module-private on purpose)
    rng = np.random.default_rng(7)
    x8 = rng.integers(-20000, 20000, 2000)
    stuffed = np.zeros(3 * len(x8))
    stuffed[::3] = x8
    up = samples_of(feed(Upsampler8to24(), pcm(x8), [320, 3, 5]))
    assert np.max(np.abs(up - direct_fir(stuffed, 3 * taps))) <= ROUNDING_TOLERANCE
    x24 = rng.integers(-20000, 20000, 6000)
    down = samples_of(feed(Downsampler24to8(), pcm(x24), [960, 5, 77]))
    assert np.max(np.abs(down - direct_fir(x24, taps)[::3])) <= ROUNDING_TOLERANCE


def test_filter_is_linear_phase() -> None:
    taps = audio._LOWPASS
    assert np.array_equal(taps, taps[::-1])
    assert math.isclose(float(taps.sum()), 1.0)


# ----------------------------------------------------------------------------- quality bar 4


def test_round_trip_delay_is_measured_at_most_5_ms_and_matches_constant() -> None:
    measured_ms = quality.round_trip_delay_ms()
    assert measured_ms == ROUND_TRIP_DELAY_MS
    lag = round(measured_ms * RATE_LOW / 1000)
    assert ROUND_TRIP_DELAY_MS <= 5.0
    # An impulse comes back as a symmetric pulse centred on the same delay.
    impulse = np.zeros(400)
    impulse[100] = 30000
    pulse = downsample(upsample(impulse))
    peak = int(np.argmax(pulse))
    assert peak - 100 == lag
    assert np.allclose(pulse[peak - 20 : peak], pulse[peak + 20 : peak : -1], atol=2)


def test_each_direction_delay_matches_its_constant() -> None:
    # Compare against the same chirp synthesised directly at the other rate.
    lag_up = lag_of(
        upsample(np.rint(chirp(RATE_LOW, 400, 0.5, 6000))), chirp(RATE_HIGH, 1200, 0.5, 18000)
    )
    assert lag_up * 1000 / RATE_HIGH == UPSAMPLE_DELAY_MS
    lag_down = lag_of(
        downsample(np.rint(chirp(RATE_HIGH, 1200, 0.5, 18000))), chirp(RATE_LOW, 400, 0.5, 6000)
    )
    assert lag_down * 1000 / RATE_LOW == DOWNSAMPLE_DELAY_MS
    assert UPSAMPLE_DELAY_MS + DOWNSAMPLE_DELAY_MS == ROUND_TRIP_DELAY_MS


# ----------------------------------------------------------------------------- quality bar 5


ALL_CODES = bytes(range(256))


def decoded_levels() -> np.ndarray:
    return np.unique(samples_of(ulaw_to_pcm16(ALL_CODES)))


def test_ulaw_decode_matches_audioop_for_all_codes() -> None:
    assert ulaw_to_pcm16(ALL_CODES) == audioop.ulaw2lin(ALL_CODES, 2)


def test_ulaw_reference_points() -> None:
    decoded = dict(zip(ALL_CODES, samples_of(ulaw_to_pcm16(ALL_CODES)), strict=True))
    assert decoded[0xFF] == 0 and decoded[0x7F] == 0  # positive and negative zero
    assert decoded[0x00] == -32124 and decoded[0x80] == 32124
    assert decoded[0x7E] == -8 and decoded[0xFE] == 8
    assert pcm16_to_ulaw(pcm([0])) == b"\xff"  # digital silence
    assert pcm16_to_ulaw(pcm([-1])) == b"\x7f"


def test_ulaw_encode_picks_a_bracketing_level_for_every_int16() -> None:
    x = ALL_INT16.astype(np.float64)
    y = samples_of(ulaw_to_pcm16(pcm16_to_ulaw(ALL_INT16.tobytes())))
    levels = decoded_levels()
    inside = np.abs(x) <= 32124
    upper = levels[np.searchsorted(levels, x[inside], side="left")]
    lower = levels[np.searchsorted(levels, x[inside], side="right") - 1]
    assert np.all((y[inside] == lower) | (y[inside] == upper))
    assert np.all(y[~inside] == np.sign(x[~inside]) * 32124)  # beyond the last level: saturate
    # Quantisation error bound of the μ-law segments: at most half a step, ~3 % of the level.
    assert np.all(np.abs(y - x) <= (np.abs(x) + 132) / 32)


def test_ulaw_encode_agrees_with_audioop_or_is_closer() -> None:
    ours = np.frombuffer(pcm16_to_ulaw(ALL_INT16.tobytes()), np.uint8)
    theirs = np.frombuffer(audioop.lin2ulaw(ALL_INT16.tobytes(), 2), np.uint8)
    differ = ours != theirs
    # audioop floors negatives to 14 bits; we round them. Positive inputs must agree exactly.
    assert not np.any(differ & (ALL_INT16 >= 0))
    x = ALL_INT16[differ].astype(np.float64)
    err_ours = np.abs(samples_of(ulaw_to_pcm16(ours[differ].tobytes())) - x)
    err_theirs = np.abs(samples_of(audioop.ulaw2lin(theirs[differ].tobytes(), 2)) - x)
    assert np.all(err_ours <= err_theirs)
    assert np.all(np.abs(ours[differ].astype(int) - theirs[differ].astype(int)) == 1)


def test_ulaw_decode_then_encode_is_identity_except_negative_zero() -> None:
    again = pcm16_to_ulaw(ulaw_to_pcm16(ALL_CODES))
    expected = bytearray(ALL_CODES)
    expected[0x7F] = 0xFF  # -0 decodes to 0, which encodes as +0
    assert again == bytes(expected)


@given(st.lists(st.integers(-32768, 32767), max_size=400))
def test_ulaw_round_trip_within_g711_quantisation(values: list[int]) -> None:
    x = np.array(values, dtype=np.float64)
    encoded = pcm16_to_ulaw(pcm(x))
    assert len(encoded) == len(values)
    y = samples_of(ulaw_to_pcm16(encoded))
    levels = decoded_levels()
    clipped = np.clip(x, -32124, 32124)
    lower = levels[np.searchsorted(levels, clipped, side="right") - 1]
    upper = levels[np.minimum(np.searchsorted(levels, clipped, side="left"), len(levels) - 1)]
    assert np.all((y == lower) | (y == upper))


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@pytest.mark.parametrize("processor", STATEFUL, ids=lambda c: c.__name__)
@settings(deadline=None, max_examples=60)
@given(data=st.binary(max_size=3000), cuts=st.lists(st.integers(0, 3000), max_size=25))
def test_any_chunking_gives_identical_output(
    processor: Callable[[], Processor], data: bytes, cuts: list[int]
) -> None:
    whole = processor().process(data)
    stream = processor()
    pieces = b"".join(stream.process(chunk) for chunk in chunked(data, cuts))
    assert pieces == whole


@pytest.mark.parametrize("processor", STATEFUL, ids=lambda c: c.__name__)
def test_random_chunking_of_noise_gives_identical_output(
    processor: Callable[[], Processor],
) -> None:
    # Full-scale noise makes every history sample matter (hypothesis favours sparse bytes).
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, 20001, dtype=np.uint8).tobytes()
    whole = processor().process(data)
    for _ in range(5):
        sizes = rng.choice([0, 1, 2, 3, 5, 160, 320, 959, 960, 961, 4000], size=60).tolist()
        assert feed(processor(), data, [*sizes, 1000]) == whole


@settings(deadline=None, max_examples=60)
@given(st.binary(max_size=2000))
def test_transcoders_equal_codec_plus_resampler(data: bytes) -> None:
    assert InboundTranscoder().process(data) == Upsampler8to24().process(ulaw_to_pcm16(data))
    even = data[: len(data) // 2 * 2]
    assert OutboundTranscoder().process(even) == pcm16_to_ulaw(Downsampler24to8().process(even))


# ----------------------------------------------------------------------------- edges


def square_wave(rate: int, freq: float, seconds: float) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return np.where(np.sin(2 * np.pi * freq * t + 0.1) >= 0, 32767, -32768)


def test_overshoot_saturates_instead_of_wrapping() -> None:
    x8 = square_wave(RATE_LOW, 500, 0.1)
    stuffed = np.zeros(3 * len(x8))
    stuffed[::3] = x8
    unclipped = np.convolve(stuffed, 3 * audio._LOWPASS)[: len(stuffed)]
    assert unclipped.max() > 33000 and unclipped.min() < -33000  # Gibbs overshoot is real
    up = upsample(x8)
    assert np.max(np.abs(up - direct_fir(stuffed, 3 * audio._LOWPASS))) <= ROUNDING_TOLERANCE
    assert up.max() == 32767 and up.min() == -32768
    x24 = square_wave(RATE_HIGH, 500, 0.1)
    down = downsample(x24)
    assert down.max() == 32767 and down.min() == -32768
    assert np.all(np.sign(down) == np.sign(np.convolve(x24, audio._LOWPASS)[: len(x24)][::3]))
    assert OutboundTranscoder().process(pcm(x24)) == pcm16_to_ulaw(pcm(down))


def test_lengths() -> None:
    assert len(Upsampler8to24().process(bytes(320))) == 960  # 20 ms: 160 -> 480 samples
    assert len(InboundTranscoder().process(bytes(160))) == 960
    down = Downsampler24to8()
    assert [len(down.process(bytes(960))) for _ in range(3)] == [320, 320, 320]
    out = OutboundTranscoder()
    assert [len(out.process(bytes(960))) for _ in range(3)] == [160, 160, 160]
    assert Upsampler8to24().process(b"") == b"" and Downsampler24to8().process(b"") == b""


def test_odd_byte_waits_for_its_partner() -> None:
    up = Upsampler8to24()
    assert up.process(b"\x10") == b""
    assert len(up.process(b"\x00")) == 6  # one sample in, three out
    down = Downsampler24to8()
    assert down.process(b"\x01") == b""
    assert len(down.process(bytes(959))) == 320


def test_silence_stays_silent() -> None:
    assert InboundTranscoder().process(b"\xff" * 160) == bytes(960)
    assert OutboundTranscoder().process(bytes(960)) == b"\xff" * 160


@pytest.mark.parametrize("processor", STATEFUL, ids=lambda c: c.__name__)
def test_non_bytes_input_is_rejected_clearly(processor: Callable[[], Processor]) -> None:
    with pytest.raises(TypeError):
        processor().process("not audio")  # type: ignore[arg-type]


def test_encode_rejects_half_samples() -> None:
    with pytest.raises(ValueError, match="2-byte samples"):
        pcm16_to_ulaw(b"\x00\x01\x02")
    with pytest.raises(TypeError):
        ulaw_to_pcm16("not audio")  # type: ignore[arg-type]


def test_codec_bench_runs() -> None:
    results = run_codec_bench(frames=20, repeats=2)
    assert {"inbound_pcm16_us", "outbound_pcm16_us", "inbound_g711_us", "outbound_g711_us"} <= set(
        results
    )
    assert all(math.isfinite(v) and v > 0 for v in results.values())


KERNELS = ("_upsample_ulaw", "_upsample_pcm16", "_downsample_pcm16", "_downsample_ulaw")


def test_kernels_are_compiled_at_import_and_never_during_a_call() -> None:
    """Each compiled kernel has exactly its declared signature, before and after frames of
    every buffer type a caller may pass: a new specialisation would be compiled in the event
    loop, stalling every call for about a second."""
    kernels = [getattr(audio, name) for name in KERNELS]
    assert all(len(kernel.signatures) == 1 for kernel in kernels)
    ulaw, pcm = bytes(range(160)), bytes(range(256)) * 3 + bytes(192)  # 480 samples
    for wrap in (bytearray, memoryview):
        for processor in STATEFUL:
            frame = ulaw if processor is InboundTranscoder else pcm
            expected = processor().process(frame)
            assert len(expected) > 100
            assert processor().process(wrap(frame)) == expected  # type: ignore[arg-type]
    assert all(len(kernel.signatures) == 1 for kernel in kernels)
    assert all(kernel._can_compile is False for kernel in kernels)
