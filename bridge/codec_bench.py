"""Per-frame cost of the call audio path, per direction and audio mode.

Run ``python -m bridge.codec_bench``. Each figure is the median over ``repeats`` runs of the mean
cost of one 20 ms frame, in microseconds, measured with ``time.perf_counter_ns`` over ``frames``
consecutive frames of a speech-band test signal (so the stateful resamplers run as in a call).

What each path does per frame (JSON parsing and socket I/O excluded, they are the same in both
modes):

* ``inbound_pcm16``: Twilio ``media.payload`` (base64 str of 160 μ-law bytes) -> decode ->
  InboundTranscoder -> base64 str of 960 PCM16 bytes for ``input_audio_buffer.append``.
* ``outbound_pcm16``: ``response.output_audio.delta`` (base64 str of 960 PCM16 bytes at 24 kHz)
  -> decode -> OutboundTranscoder -> base64 str of 160 μ-law bytes for a Twilio ``media``.
* ``inbound_g711``: with ``audio/pcmu`` on both sides the Twilio payload string is forwarded
  unchanged into ``input_audio_buffer.append``; the only per-frame work is a size check.
* ``outbound_g711``: the delta string is forwarded unchanged into a Twilio ``media``; the frame's
  μ-law byte count (for marks and truncation) is computed from the base64 length.
* ``*_transcoder_only``: the transcoder call alone, to separate base64 cost from DSP cost.
"""

from __future__ import annotations

import base64
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from pybase64 import b64decode, b64encode_as_string

from bridge.audio import InboundTranscoder, OutboundTranscoder, pcm16_to_ulaw

__all__ = ["main", "run_codec_bench"]

_FRAME_MS = 20
_DISTINCT_FRAMES = 250  # 5 s of test signal, cycled
_MAX_PAYLOAD_CHARS = 64_000  # the inbound size guard a bridge applies before forwarding


def _speech_band_signal(rate: int, frames: int) -> np.ndarray:
    """Deterministic speech-band test signal: a few partials plus a little noise."""
    t = np.arange(rate * _FRAME_MS // 1000 * frames) / rate
    rng = np.random.default_rng(0)
    x = sum(a * np.sin(2 * np.pi * f * t) for a, f in ((6000, 210), (3000, 630), (1500, 2300)))
    x = x + rng.normal(0, 300, len(t))
    return np.clip(np.rint(x), -32768, 32767).astype("<i2")


def _b64_frames(data: bytes, frame_bytes: int) -> list[str]:
    return [
        base64.b64encode(data[i : i + frame_bytes]).decode("ascii")
        for i in range(0, len(data), frame_bytes)
    ]


def _g711_inbound(payload: str) -> str | None:
    return payload if len(payload) <= _MAX_PAYLOAD_CHARS else None


def _g711_outbound(payload: str) -> tuple[str, int]:
    return payload, len(payload) * 3 // 4 - payload.count("=", -2)


def _time_per_frame_us(
    step: Callable[[Any], object], payloads: Sequence[Any], frames: int
) -> float:
    count = len(payloads)
    start = time.perf_counter_ns()
    for i in range(frames):
        step(payloads[i % count])
    return (time.perf_counter_ns() - start) / frames / 1000


def run_codec_bench(frames: int = 5000, repeats: int = 5) -> dict[str, float]:
    """Median per-20 ms-frame cost in µs of each audio path (see the module docstring)."""
    if frames < 1 or repeats < 1:
        raise ValueError("frames and repeats must be at least 1")
    pcm8 = _speech_band_signal(8000, _DISTINCT_FRAMES).tobytes()
    pcm24 = _speech_band_signal(24000, _DISTINCT_FRAMES).tobytes()
    ulaw_payloads = _b64_frames(pcm16_to_ulaw(pcm8), 160)
    pcm24_payloads = _b64_frames(pcm24, 960)
    ulaw_raw = [base64.b64decode(p) for p in ulaw_payloads]
    pcm24_raw = [base64.b64decode(p) for p in pcm24_payloads]

    def case(
        make_step: Callable[[], Callable[[Any], object]], payloads: Sequence[Any]
    ) -> Callable[[], float]:
        # A fresh transcoder per repeat, warmed up on a few frames so buffers are allocated.
        def run() -> float:
            step = make_step()
            for payload in payloads[:5]:
                step(payload)
            return _time_per_frame_us(step, payloads, frames)

        return run

    # The same base64 codec as the bridge's hot path (pybase64, validating decodes).
    def inbound_pcm16() -> Callable[[str], str]:
        process = InboundTranscoder().process
        return lambda p: b64encode_as_string(process(b64decode(p, None, True)))

    def outbound_pcm16() -> Callable[[str], str]:
        process = OutboundTranscoder().process
        return lambda p: b64encode_as_string(process(b64decode(p, None, True)))

    cases: dict[str, Callable[[], float]] = {
        "inbound_pcm16_us": case(inbound_pcm16, ulaw_payloads),
        "outbound_pcm16_us": case(outbound_pcm16, pcm24_payloads),
        "inbound_g711_us": case(lambda: _g711_inbound, ulaw_payloads),
        "outbound_g711_us": case(lambda: _g711_outbound, ulaw_payloads),
        "inbound_transcoder_only_us": case(lambda: InboundTranscoder().process, ulaw_raw),
        "outbound_transcoder_only_us": case(lambda: OutboundTranscoder().process, pcm24_raw),
    }
    # Interleave the cases across repeats so machine noise spreads over all of them equally.
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            samples[name].append(run())
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    results = run_codec_bench()
    print(f"{'path (per 20 ms frame)':<30} {'µs':>8}")
    for name, us in results.items():
        print(f"{name.removesuffix('_us'):<30} {us:8.2f}")
    both = results["inbound_pcm16_us"] + results["outbound_pcm16_us"]
    print(f"pcm16 both directions: {both:.1f} µs per 20 ms -> {20_000 / both:.0f} calls per core")
    print("(audio codec work only; JSON, websockets and the event loop come on top)")
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    print(f"load average {load:.1f} on {cores} cores (figures inflate when load exceeds cores)")


if __name__ == "__main__":
    main()
