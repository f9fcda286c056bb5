"""G.711 μ-law codec and streaming 8 kHz ⇄ 24 kHz resamplers for the call audio path.

Sans-I/O: plain functions and small stateful classes over ``bytes`` (PCM16 is always
little-endian mono). Twilio Media Streams carry μ-law at 8 kHz; the Realtime API's ``audio/pcm``
is 24 kHz PCM16, so in ``pcm16`` mode every 20 ms frame goes through one of the transcoders below.

Everything expensive (the μ-law tables, the resampling filter and the compiled resampler
kernels) is built once at import; the per-frame work is one compiled kernel call into
preallocated working buffers (only the returned ``bytes`` are allocated per frame).
"""

from __future__ import annotations

from typing import Final

import numba as nb
import numpy as np
import numpy.typing as npt

__all__ = [
    "DOWNSAMPLE_DELAY_MS",
    "ROUND_TRIP_DELAY_MS",
    "UPSAMPLE_DELAY_MS",
    "Downsampler24to8",
    "InboundTranscoder",
    "OutboundTranscoder",
    "Upsampler8to24",
    "pcm16_to_ulaw",
    "ulaw_to_pcm16",
]

# --------------------------------------------------------------------------------------------
# G.711 μ-law
# --------------------------------------------------------------------------------------------

# The 16-bit ("bias 0x84, clip 32635") form of the G.711 encoder, as in the CCITT reference
# g711.c. Its decoder is bit-identical to audioop.ulaw2lin. audioop's *encoder* instead works on
# x >> 2 (14 bits), which floors negative inputs (381 of them land one level lower, e.g. -1 on
# -8); the 16-bit form rounds symmetrically (-1 -> 0x7F, "negative zero"). Both are valid G.711.
_ULAW_BIAS: Final = 0x84
_ULAW_CLIP: Final = 32635


def _build_ulaw_decode_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF  # all bits are transmitted inverted
    t = (((u & 0x0F) << 3) + _ULAW_BIAS) << ((u & 0x70) >> 4)
    table = np.where(u & 0x80, _ULAW_BIAS - t, t - _ULAW_BIAS).astype("<i2")
    table.flags.writeable = False
    return table


def _build_ulaw_encode_table() -> np.ndarray:
    x = np.arange(-32768, 32768, dtype=np.int32)
    sign = np.where(x < 0, 0x80, 0x00)
    magnitude = np.minimum(np.abs(x), _ULAW_CLIP) + _ULAW_BIAS  # 132 .. 32767
    # Segment = position of the highest set bit above bit 7; frexp's exponent is the bit length.
    exponent = np.frexp(magnitude.astype(np.float64))[1] - 8  # 0 .. 7, exact for integers
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    codes = ~(sign | (exponent << 4) | mantissa) & 0xFF
    table = np.empty(65536, dtype=np.uint8)
    # Index by the int16 bit pattern read as uint16, so encoding is one gather with no casts.
    table[x.astype(np.int16).view(np.uint16)] = codes
    table.flags.writeable = False
    return table


_ULAW_DECODE: Final = _build_ulaw_decode_table()  # 256 x int16
_ULAW_ENCODE: Final = _build_ulaw_encode_table()  # 65536 x uint8
# The same decode table in the resamplers' working type, so the inbound transcoder can decode
# straight into the filter's input buffer (one gather, no intermediate int16 array).
_ULAW_DECODE_F64: Final = _ULAW_DECODE.astype(np.float64)


def ulaw_to_pcm16(ulaw: bytes) -> bytes:
    """Decode G.711 μ-law bytes to PCM16 little-endian (one sample per input byte)."""
    return _ULAW_DECODE[np.frombuffer(ulaw, dtype=np.uint8)].tobytes()


def pcm16_to_ulaw(pcm: bytes) -> bytes:
    """Encode PCM16 little-endian to G.711 μ-law (one byte per sample; 0 encodes as 0xFF)."""
    if len(pcm) % 2:
        raise ValueError(f"PCM16 data must be a whole number of 2-byte samples, got {len(pcm)}")
    return _ULAW_ENCODE[np.frombuffer(pcm, dtype="<u2")].tobytes()


# --------------------------------------------------------------------------------------------
# Resampling filter: one linear-phase lowpass at 24 kHz, used for both directions
# --------------------------------------------------------------------------------------------
#
# Requirements: flat 300-3400 Hz (telephone band, ripple <= 0.5 dB), >= 60 dB rejection from
# 4.6 kHz up (everything at 24 kHz above 4.6 kHz would fold into 0-3.4 kHz at 8 kHz; 4-4.6 kHz
# only folds into 3.4-4 kHz, above the voice band), and up + down together <= 5 ms of delay.
#
# A Kaiser-windowed sinc trades taps for transition width: with a 1.2 kHz transition (3.4 -> 4.6
# kHz) at 24 kHz, ~73 taps reach 60 dB. We take 85 taps for margin, and place the cutoff below
# 4 kHz (3870 Hz) because the passband may droop by 0.5 dB while the stopband must reach 60 dB:
#   85 taps, Kaiser beta 7.5, cutoff 3870 Hz  ->  passband ripple ~0.2 dB over 300-3400 Hz,
#   stopband >= ~75 dB from 4.6 kHz to 12 kHz, -10 dB at 4 kHz. tests/test_audio.py measures
#   ripple 0.20 dB (both directions) and a worst stopband level of -75.5 dB (at 4.6 kHz).
# Linear phase: delay (85 - 1) / 2 = 42 samples at 24 kHz = 1.75 ms per direction. 84 is a
# multiple of 3, so the 8k -> 24k -> 8k round trip is a whole 28 samples at 8 kHz (3.5 ms).
#
# Arithmetic: float64 with the taps rounded to multiples of 2**-30. Samples are integers of at
# most 2**15 and each output's taps have an absolute sum below 4 (1.83 down, 2.09 up), so every
# product and partial sum is a multiple of 2**-30 below 2**17: an exact float64. The output
# therefore does not depend on summation order (BLAS kernel, block size), which is what makes
# any chunking of a stream produce bit-identical output to one-piece input.

_RATIO: Final = 3  # 24000 / 8000, exactly: no fractional phases
_RATE_HIGH: Final = 24_000
_TAPS: Final = 85
_KAISER_BETA: Final = 7.5
_CUTOFF_HZ: Final = 3870.0
_TAP_QUANTUM: Final = 2.0**-30


def _design_lowpass() -> np.ndarray:
    n = np.arange(_TAPS) - (_TAPS - 1) / 2
    wc = 2 * _CUTOFF_HZ / _RATE_HIGH  # cutoff as a fraction of Nyquist
    taps = wc * np.sinc(wc * n) * np.kaiser(_TAPS, _KAISER_BETA)
    taps = (taps + taps[::-1]) / 2  # exact symmetry -> exactly linear phase
    return taps / taps.sum()  # unity gain at DC


def _quantise(taps: np.ndarray) -> np.ndarray:
    return np.round(taps / _TAP_QUANTUM) * _TAP_QUANTUM


_LOWPASS: Final = _design_lowpass()
_LOWPASS.flags.writeable = False

# The resampler cores are small loops compiled by numba: each 20 ms frame is one call that
# decodes, filters, rounds and encodes. The numpy formulation this replaces (block matrix
# products over overlapping windows, then clip / rint / cast / table gather as separate array
# calls) spent most of its time in per-call overhead and touched ~50 KB per frame; in a server
# carrying 100 calls it cost 12 + 11 µs per frame pair (inbound + outbound), against about
# 8 + 9.5 µs for these loops (perf_counter around each `process` call inside a
# `loadtest --calls 100` worker).
#
# Signatures are explicit, so the kernels compile when this module is imported (or load from
# numba's on-disk cache): never in the middle of a call. fastmath lets LLVM vectorise the
# multiply-accumulate loops by reassociating the sums, which changes no bit (see "Arithmetic"
# above); inputs are finite by construction (decoded samples). Callers guarantee buffer sizes,
# so bounds checks are off.

# Decimator: output m = sum_j taps[j] * x[3m + j] over a window starting at 3m (the taps are
# symmetric, so this order gives the convolution).
_DOWN_TAPS: Final = _quantise(_LOWPASS)
_DOWN_TAPS.flags.writeable = False
# Interpolator, polyphase: zero-stuffing x by 3 and filtering with 3 * taps gives
#   y[3n + p] = sum_k 3 * taps[3k + p] * x[n - k],   p = 0, 1, 2,
# i.e. each input yields 3 outputs from its last _PHASE_LEN inputs (gain 3 restores the level
# lost to zero-stuffing; the taps are zero-padded to 3 * _PHASE_LEN). Stored oldest first:
# _UP_PHASES[p, j] multiplies x[n - _HISTORY + j].
_PHASE_LEN: Final = -(-_TAPS // _RATIO)  # 29
_HISTORY: Final = _PHASE_LEN - 1  # input samples of history the interpolator keeps
_padded = np.zeros(_PHASE_LEN * _RATIO)
_padded[:_TAPS] = _RATIO * _LOWPASS
_UP_PHASES: Final = np.ascontiguousarray(_quantise(_padded).reshape(_PHASE_LEN, _RATIO)[::-1].T)
_UP_PHASES.flags.writeable = False
del _padded

_DELAY_SAMPLES_24K: Final = (_TAPS - 1) / 2  # group delay of a symmetric FIR
UPSAMPLE_DELAY_MS: Final[float] = 1000.0 * _DELAY_SAMPLES_24K / _RATE_HIGH
DOWNSAMPLE_DELAY_MS: Final[float] = 1000.0 * _DELAY_SAMPLES_24K / _RATE_HIGH
ROUND_TRIP_DELAY_MS: Final[float] = UPSAMPLE_DELAY_MS + DOWNSAMPLE_DELAY_MS

# The outbound path encodes filter output directly: a 2**17-entry table over -65536..65535
# (indexed modulo 2**17, so negative values address it from the end) that saturates to the
# int16 range, so one rounding and one lookup replace clip + cast + encode. Decimator output
# is bounded by 32768 * sum(|taps|) < 65536 (checked below).
_ULAW_ENCODE_SATURATING: Final = np.empty(1 << 17, dtype=np.uint8)
_ULAW_ENCODE_SATURATING[:] = np.roll(
    _ULAW_ENCODE[np.clip(np.arange(-65536, 65536), -32768, 32767).astype(np.int16).view(np.uint16)],
    -65536,
)
_ULAW_ENCODE_SATURATING.flags.writeable = False
if 32768 * np.abs(_DOWN_TAPS).sum() >= 65536:
    raise RuntimeError("decimator output could exceed the saturating μ-law table")

_U8: Final = np.dtype(np.uint8)
_I16: Final = np.dtype("<i2")
_INITIAL_CAPACITY: Final = 960  # input samples; 20 ms at 24 kHz is 480, bigger chunks grow it

_F64 = nb.float64[::1]
# Inputs are the frames' bytes themselves: numba reads a bytes object through the buffer
# protocol, where wrapping it in an array first (np.frombuffer) cost 0.3 µs and an object per
# frame. Other buffers (bytearray, memoryview) are copied to bytes by the callers.
_BYTES_IN = nb.types.Bytes(nb.uint8, 1, "C", readonly=True)
_KERNEL: Final = {"cache": True, "fastmath": True, "boundscheck": False, "nogil": True}


@nb.njit(inline="always")
def _rounded_pcm16(v: float) -> np.int16:
    return np.int16(np.rint(min(max(v, -32768.0), 32767.0)))  # saturates, never wraps


@nb.njit(inline="always")
def _pcm16_sample(data: bytes, i: int) -> int:
    """Sample i of little-endian PCM16 bytes."""
    v = data[2 * i] | (data[2 * i + 1] << 8)
    return v - 65536 if v >= 32768 else v


@nb.njit(inline="always")
def _interpolate(buf: np.ndarray, n: int, out: np.ndarray) -> None:
    """The 3n outputs of the n inputs at buf[_HISTORY:], rounded into out; then keep history.

    One output triple per input, each a 29-tap dot product that LLVM vectorises over the taps.
    """
    for i in range(n):
        y0 = y1 = y2 = 0.0
        for j in range(_PHASE_LEN):
            x = buf[i + j]
            y0 += _UP_PHASES[0, j] * x
            y1 += _UP_PHASES[1, j] * x
            y2 += _UP_PHASES[2, j] * x
        out[_RATIO * i] = _rounded_pcm16(y0)
        out[_RATIO * i + 1] = _rounded_pcm16(y1)
        out[_RATIO * i + 2] = _rounded_pcm16(y2)
    for j in range(_HISTORY):  # ascending: safe although the ranges overlap when n < _HISTORY
        buf[j] = buf[n + j]


@nb.njit(inline="always")
def _decimate(buf: np.ndarray, fill: int, out: np.ndarray, encode: bool) -> int:
    """Each complete output of buf[:fill], rounded into out; returns m + (new fill << 32).

    Output m is the 85-tap dot product with the window buf[3m : 3m + 85] (the taps are
    symmetric, so this order gives the convolution), vectorised over the taps. The unconsumed
    tail, the start of the next output's window, moves to the front of buf. ``encode``
    (a compile-time constant) selects μ-law through the saturating table over PCM16.
    """
    m = (fill - _TAPS) // _RATIO + 1 if fill >= _TAPS else 0
    for o in range(m):
        y = 0.0
        base = _RATIO * o
        for j in range(_TAPS):
            y += _DOWN_TAPS[j] * buf[base + j]
        if encode:
            out[o] = _ULAW_ENCODE_SATURATING[np.int64(np.rint(y)) & 0x1FFFF]
        else:
            out[o] = _rounded_pcm16(y)
    consumed = _RATIO * m
    rest = fill - consumed
    for j in range(rest):  # ascending: safe although the ranges may overlap
        buf[j] = buf[consumed + j]
    return m | (rest << 32)


@nb.njit(nb.void(_BYTES_IN, _F64, nb.int16[::1]), **_KERNEL)
def _upsample_ulaw(codes: bytes, buf: np.ndarray, out: np.ndarray) -> None:
    for i in range(len(codes)):
        buf[_HISTORY + i] = _ULAW_DECODE_F64[codes[i]]
    _interpolate(buf, len(codes), out)


@nb.njit(nb.void(_BYTES_IN, _F64, nb.int16[::1]), **_KERNEL)
def _upsample_pcm16(data: bytes, buf: np.ndarray, out: np.ndarray) -> None:
    n = len(data) // 2
    for i in range(n):
        buf[_HISTORY + i] = _pcm16_sample(data, i)
    _interpolate(buf, n, out)


@nb.njit(nb.int64(_BYTES_IN, _F64, nb.int64, nb.int16[::1]), **_KERNEL)
def _downsample_pcm16(data: bytes, buf: np.ndarray, fill: int, out: np.ndarray) -> int:
    """Append the samples after buf[:fill] and decimate; returns m + (new fill << 32), one int
    being cheaper for numba to return than a tuple."""
    n = len(data) // 2
    for i in range(n):
        buf[fill + i] = _pcm16_sample(data, i)
    return _decimate(buf, fill + n, out, False)


@nb.njit(nb.int64(_BYTES_IN, _F64, nb.int64, nb.uint8[::1]), **_KERNEL)
def _downsample_ulaw(data: bytes, buf: np.ndarray, fill: int, out: np.ndarray) -> int:
    """As _downsample_pcm16, μ-law encoding each output."""
    n = len(data) // 2
    for i in range(n):
        buf[fill + i] = _pcm16_sample(data, i)
    return _decimate(buf, fill + n, out, True)


class _OddByteCarry:
    """Splits a PCM16 byte stream into whole samples, keeping a trailing odd byte for later."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def whole_samples(self, pcm: bytes) -> bytes:
        """The bytes of the whole samples so far: an even length."""
        if not self._pending and type(pcm) is bytes and not len(pcm) % 2:
            return pcm  # the common case: no copy
        data = self._pending + bytes(memoryview(pcm))  # TypeError for non-bytes input
        whole = len(data) - len(data) % 2
        self._pending = data[whole:]
        return data[:whole]


class _Interpolator:
    """8 kHz -> 24 kHz polyphase FIR state: exactly 3 outputs per input, any chunking.

    ``_buf`` starts with the last _HISTORY input samples (silence at first), so frame joins are
    seamless and the output is identical however the input is chunked. The buffers grow when
    a chunk is longer than any before (rare: Twilio frames are 160 samples).
    """

    __slots__ = ("_buf", "_n", "_out", "_out_view")

    def __init__(self) -> None:
        self._buf = np.zeros(_HISTORY)  # the silent history _allocate carries over
        self._allocate(_INITIAL_CAPACITY)

    def _allocate(self, capacity: int) -> None:
        buf = np.zeros(_HISTORY + capacity)
        buf[:_HISTORY] = self._buf[:_HISTORY]
        self._buf = buf
        self._out = np.empty(_RATIO * capacity, dtype=_I16)
        self._n = -1

    def run(self, kernel: nb.core.dispatcher.Dispatcher, data: bytes, n: int) -> bytes:
        """The kernel's output for `data`, which holds n samples."""
        if n != self._n:
            capacity = len(self._buf) - _HISTORY
            if n > capacity:
                self._allocate(max(n, 2 * capacity))
            self._out_view = self._out[: _RATIO * n]  # reused while frames keep their length
            self._n = n
        kernel(data, self._buf, self._out)
        return self._out_view.tobytes()


class _Decimator:
    """24 kHz -> 8 kHz polyphase FIR state: computes only every third output.

    ``_buf[:_fill]`` holds the unconsumed input, the start of the next output's window (at
    most _TAPS - 1 samples), so any chunk length works and the output is identical however
    the input is chunked. Starts from silence.
    """

    __slots__ = ("_buf", "_fill", "_out", "_out_dtype")

    def __init__(self, out_dtype: npt.DTypeLike) -> None:
        self._fill = _TAPS - 1
        self._buf = np.zeros(self._fill)  # the silent start _allocate carries over
        self._out_dtype = np.dtype(out_dtype)
        self._allocate(_INITIAL_CAPACITY)

    def _allocate(self, capacity: int) -> None:
        buf = np.zeros(_TAPS + capacity)
        buf[: self._fill] = self._buf[: self._fill]
        self._buf = buf
        self._out = np.empty((_TAPS - 1 + capacity) // _RATIO + 1, dtype=self._out_dtype)

    def run(self, kernel: nb.core.dispatcher.Dispatcher, pcm: bytes) -> bytes:
        """The kernel's output for `pcm`, PCM16 bytes of an even length."""
        n = len(pcm) // 2
        if n > len(self._buf) - _TAPS:
            self._allocate(max(n, 2 * (len(self._buf) - _TAPS)))
        packed = kernel(pcm, self._buf, self._fill, self._out)
        self._fill = packed >> 32
        return self._out[: packed & 0xFFFFFFFF].tobytes()


class Upsampler8to24:
    """Streaming 8 kHz -> 24 kHz PCM16 LE resampler: exactly 3 output samples per input sample.

    Accepts any byte length (a trailing odd byte waits for its partner). Output lags the input
    by UPSAMPLE_DELAY_MS (linear-phase filter).
    """

    __slots__ = ("_carry", "_core")

    def __init__(self) -> None:
        self._carry = _OddByteCarry()
        self._core = _Interpolator()

    def process(self, pcm: bytes) -> bytes:
        data = self._carry.whole_samples(pcm)
        return self._core.run(_upsample_pcm16, data, len(data) // 2) if data else b""


class Downsampler24to8:
    """Streaming, anti-aliased 24 kHz -> 8 kHz PCM16 LE resampler.

    Accepts any byte length; leftover samples (and an odd byte) carry over to the next call, so
    480 input samples give 160 outputs in steady state and odd chunks give a varying count.
    Output lags the input by DOWNSAMPLE_DELAY_MS.
    """

    __slots__ = ("_carry", "_core")

    def __init__(self) -> None:
        self._carry = _OddByteCarry()
        self._core = _Decimator(_I16)

    def process(self, pcm: bytes) -> bytes:
        return self._core.run(_downsample_pcm16, self._carry.whole_samples(pcm))


class InboundTranscoder:
    """Twilio -> model in pcm16 mode: μ-law 8 kHz bytes -> PCM16 LE 24 kHz bytes (3 x 2 bytes each).

    Decoding and upsampling are one kernel call.
    """

    __slots__ = ("_core",)

    def __init__(self) -> None:
        self._core = _Interpolator()

    def process(self, ulaw: bytes) -> bytes:
        if not ulaw:
            return b""
        if type(ulaw) is not bytes:
            ulaw = bytes(memoryview(ulaw))  # TypeError for non-bytes input
        return self._core.run(_upsample_ulaw, ulaw, len(ulaw))


class OutboundTranscoder:
    """Model -> Twilio in pcm16 mode: PCM16 LE 24 kHz bytes (any length) -> μ-law 8 kHz bytes.

    Anti-aliased decimation then μ-law encoding of the rounded, saturated result, in one
    kernel call; leftover samples and an odd byte carry over to the next call.
    """

    __slots__ = ("_carry", "_core")

    def __init__(self) -> None:
        self._carry = _OddByteCarry()
        self._core = _Decimator(_U8)

    def process(self, pcm: bytes) -> bytes:
        return self._core.run(_downsample_ulaw, self._carry.whole_samples(pcm))
