"""Measure the audio path's quality: the figures behind the resamplers' quality bars.

`python -m bridge.audio_quality` (or `switchboard bench audio`) prints them; the tests in
`tests/test_audio.py` assert the bars with the same measurements, so the printed figures and
the tested ones cannot drift apart.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from bridge.audio import ROUND_TRIP_DELAY_MS, Downsampler24to8, Upsampler8to24

RATE_LOW = 8000
RATE_HIGH = 24000
STOPBAND_HZ = np.linspace(4600, 12000, 75)  # every 100 Hz, both band edges included
PASSBAND_HZ = np.linspace(300, 3400, 32)
# Settling time after a stream starts from silence, in output samples (> one filter length).
SETTLE_LOW = 64
SETTLE_HIGH = 3 * SETTLE_LOW


def pcm(samples: np.ndarray) -> bytes:
    return np.asarray(samples).astype("<i2").tobytes()


def samples_of(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2").astype(np.float64)


def tone(
    freq: float, rate: int, seconds: float, amplitude: float, phase: float = 0.3
) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return np.rint(amplitude * np.cos(2 * np.pi * freq * t + phase)).astype(np.int16)


def chirp(rate: int, start: int, seconds: float, total: int) -> np.ndarray:
    """A Hann-windowed 300 -> 3400 Hz linear chirp starting at sample `start`."""
    t = np.arange(round(rate * seconds)) / rate
    sweep = np.sin(2 * np.pi * (300 * t + (3400 - 300) / (2 * seconds) * t**2))
    x = np.zeros(total)
    x[start : start + len(t)] = 16000 * np.hanning(len(t)) * sweep
    return x


def upsample(x: np.ndarray) -> np.ndarray:
    return samples_of(Upsampler8to24().process(pcm(x)))


def downsample(x: np.ndarray) -> np.ndarray:
    return samples_of(Downsampler24to8().process(pcm(x)))


def fitted_amplitude(y: np.ndarray, freq: float, rate: int) -> tuple[float, np.ndarray]:
    """Least-squares fit of a sinusoid at `freq`: its amplitude and the residual."""
    w = 2 * np.pi * freq * np.arange(len(y)) / rate
    basis = np.column_stack([np.cos(w), np.sin(w)])
    coef, *_ = np.linalg.lstsq(basis, y, rcond=None)
    return float(np.hypot(*coef)), y - basis @ coef


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x.astype(np.float64)))))


def db(ratio: float) -> float:
    return 20 * math.log10(ratio) if ratio > 0 else -math.inf  # 0: below int16 resolution


def lag_of(y: np.ndarray, x: np.ndarray) -> int:
    corr = np.correlate(y, x, mode="full")
    return int(np.argmax(corr)) - (len(x) - 1)


def stopband_levels_db() -> list[float]:
    """24k -> 8k: output level of a full-scale tone in 4.6–12 kHz (all of it is alias)."""
    levels = []
    for freq in STOPBAND_HZ:
        x = tone(freq, RATE_HIGH, 0.25, 30000)
        levels.append(db(rms(downsample(x)[SETTLE_LOW:]) / rms(x)))
    return levels


def passband_gains_db(direction: str) -> list[float]:
    """Gain of 300–3400 Hz tones through the downsampler ("down") or upsampler ("up")."""
    gains = []
    for freq in PASSBAND_HZ:
        if direction == "down":
            out = downsample(tone(freq, RATE_HIGH, 0.25, 10000))[SETTLE_LOW:]
            amplitude, _ = fitted_amplitude(out, freq, RATE_LOW)
        else:
            out = upsample(tone(freq, RATE_LOW, 0.25, 10000))[SETTLE_HIGH:]
            amplitude, _ = fitted_amplitude(out, freq, RATE_HIGH)
        gains.append(db(amplitude / 10000))
    return gains


def image_levels_db() -> list[float]:
    """8k -> 24k: what is left besides the tone (images at 8k±f, plus rounding), per tone."""
    levels = []
    for freq in PASSBAND_HZ:
        out = upsample(tone(freq, RATE_LOW, 0.25, 30000))[SETTLE_HIGH:]
        amplitude, residual = fitted_amplitude(out, freq, RATE_HIGH)
        levels.append(db(rms(residual) / (amplitude / math.sqrt(2))))
    return levels


def round_trip_delay_ms() -> float:
    """8k -> 24k -> 8k delay, from the cross-correlation peak of a chirp."""
    x = np.rint(chirp(RATE_LOW, 400, 0.5, 6000))
    return lag_of(downsample(upsample(x)), x) * 1000 / RATE_LOW


def framewise_error_db(freq: float = 1000.0, frame_ms: int = 20) -> float:
    """A sine resampled 24k -> 8k in 20 ms frames vs. in one piece (-inf: identical)."""
    x = pcm(tone(freq, RATE_HIGH, 1.0, 20000))
    whole = samples_of(Downsampler24to8().process(x))
    framed = Downsampler24to8()
    step = RATE_HIGH * frame_ms // 1000 * 2
    parts = samples_of(b"".join(framed.process(x[i : i + step]) for i in range(0, len(x), step)))
    return db(rms(parts - whole) / rms(whole))


@dataclass(frozen=True, slots=True)
class QualityReport:
    stopband_worst_db: float
    stopband_worst_at_hz: float
    down_passband_ripple_db: float
    up_passband_ripple_db: float
    up_image_worst_db: float
    framewise_error_db: float
    round_trip_delay_ms: float
    declared_round_trip_delay_ms: float


def measure() -> QualityReport:
    stop = stopband_levels_db()
    worst = int(np.argmax(stop))
    down, up = passband_gains_db("down"), passband_gains_db("up")
    return QualityReport(
        stopband_worst_db=stop[worst],
        stopband_worst_at_hz=float(STOPBAND_HZ[worst]),
        down_passband_ripple_db=max(down) - min(down),
        up_passband_ripple_db=max(up) - min(up),
        up_image_worst_db=max(image_levels_db()),
        framewise_error_db=framewise_error_db(),
        round_trip_delay_ms=round_trip_delay_ms(),
        declared_round_trip_delay_ms=ROUND_TRIP_DELAY_MS,
    )


def main() -> None:
    report = measure()
    bars = {
        "stopband_worst_db": "<= -60 dB (4.6-12 kHz, 24k->8k)",
        "down_passband_ripple_db": "<= 0.5 dB (300-3400 Hz)",
        "up_passband_ripple_db": "<= 0.5 dB (300-3400 Hz)",
        "up_image_worst_db": "<= -60 dB",
        "framewise_error_db": "<= -60 dB (20 ms frames vs one piece)",
        "round_trip_delay_ms": "<= 5 ms",
    }
    print("Audio path quality (bridge.audio resamplers)")
    for key, value in asdict(report).items():
        print(f"  {key:32s} {value:10.3f}   {bars.get(key, '')}")


if __name__ == "__main__":
    main()
