"""G.711 μ-law codec and streaming 8 kHz ⇄ 24 kHz resamplers for the call audio path.

Sans-I/O: plain functions and small stateful classes over ``bytes`` (PCM16 is always
little-endian mono). Twilio Media Streams carry μ-law at 8 kHz; the Realtime API's ``audio/pcm``
is 24 kHz PCM16, so in ``pcm16`` mode every 20 ms frame goes through one of the transcoders below.

Everything expensive (the μ-law tables and the resampling filter) is built once at import; the
per-frame work is a handful of vectorised numpy calls on 160 / 480 samples into preallocated
working buffers, with no Python loop over samples (only small temporaries and the returned
``bytes`` are allocated per frame).
"""

from __future__ import annotations

from typing import Final

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

# Both resamplers evaluate the FIR as one small matrix product per call, in blocks of _UP_INS
# inputs (interpolator) or _DOWN_OUTS outputs (decimator). Each block matrix row is the window
# of input samples those need, read in place from the stream buffer; the rows overlap, so numpy
# copies them once (a few KB) and hands a dense product to BLAS. That is ~2.5x faster than one
# dot per output window (overlapping 85-sample windows would be copied 28x over) and needs no
# Python loop. The zeros in the block matrices cost a little arithmetic, not accuracy: the sums
# are exact (see above), so the block sizes change no output bit and are a speed choice only.
# 16 per row (10 rows for a 20 ms frame) measured fastest in both directions, ~0.3 µs per frame
# each under 32 per row (tried 8 to 40).
_UP_INS: Final = 16

# Decimator: output m = sum_j taps[j] * x[3m - j]. The taps are symmetric, so dotting the same
# vector with the window x[3m - 84 .. 3m] (oldest first) gives that sum. A block row starts at
# the window of output 16a and spans the 3 * 15 + 85 input samples of 16 windows; column b
# holds the taps shifted by 3b, so row a yields outputs 16a .. 16a + 15.
_DOWN_OUTS: Final = 16
_DOWN_STRIDE: Final = _RATIO * _DOWN_OUTS  # input samples between block rows
_DOWN_ROW: Final = _RATIO * (_DOWN_OUTS - 1) + _TAPS
_DOWN_BLOCK: Final = np.zeros((_DOWN_ROW, _DOWN_OUTS))
for _b in range(_DOWN_OUTS):
    _DOWN_BLOCK[_RATIO * _b : _RATIO * _b + _TAPS, _b] = _quantise(_LOWPASS)
_DOWN_BLOCK.flags.writeable = False

# Interpolator, polyphase: zero-stuffing x by 3 and filtering with 3 * taps gives
#   y[3n + p] = sum_k 3 * taps[3k + p] * x[n - k],   p = 0, 1, 2,
# i.e. each input sample produces 3 outputs from its last _PHASE_LEN inputs (taps zero-padded
# to a multiple of 3). _UP_PHASES[j, p] multiplies x[n - (_PHASE_LEN - 1) + j] (window oldest
# first). A block row spans 16 + _PHASE_LEN - 1 input samples; columns 3b .. 3b + 2 hold the
# phases shifted by b, so row a yields the 48 interleaved outputs of inputs 16a .. 16a + 15.
_PHASE_LEN: Final = -(-_TAPS // _RATIO)
_padded = np.zeros(_PHASE_LEN * _RATIO)
_padded[:_TAPS] = _RATIO * _LOWPASS  # gain 3 restores the level lost to zero-stuffing
_UP_PHASES: Final = _quantise(_padded.reshape(_PHASE_LEN, _RATIO)[::-1])
_UP_ROW: Final = _UP_INS + _PHASE_LEN - 1
_UP_BLOCK: Final = np.zeros((_UP_ROW, _RATIO * _UP_INS))
for _b in range(_UP_INS):
    _UP_BLOCK[_b : _b + _PHASE_LEN, _RATIO * _b : _RATIO * _b + _RATIO] = _UP_PHASES
_UP_BLOCK.flags.writeable = False
del _padded, _b

_DELAY_SAMPLES_24K: Final = (_TAPS - 1) / 2  # group delay of a symmetric FIR
UPSAMPLE_DELAY_MS: Final[float] = 1000.0 * _DELAY_SAMPLES_24K / _RATE_HIGH
DOWNSAMPLE_DELAY_MS: Final[float] = 1000.0 * _DELAY_SAMPLES_24K / _RATE_HIGH
ROUND_TRIP_DELAY_MS: Final[float] = UPSAMPLE_DELAY_MS + DOWNSAMPLE_DELAY_MS

# The outbound path encodes filter output directly: a 2**17-entry table over -65536..65535
# (negative indices address it from the end) that saturates to the int16 range, so rounding and
# indexing replace clip + cast + encode. Decimator output is bounded by 32768 * sum(|taps|).
_ULAW_ENCODE_SATURATING: Final = np.empty(1 << 17, dtype=np.uint8)
_ULAW_ENCODE_SATURATING[:] = np.roll(
    _ULAW_ENCODE[np.clip(np.arange(-65536, 65536), -32768, 32767).astype(np.int16).view(np.uint16)],
    -65536,
)
_ULAW_ENCODE_SATURATING.flags.writeable = False
if 32768 * np.abs(_DOWN_BLOCK[:, 0]).sum() >= 65536:
    raise RuntimeError("decimator output could exceed the saturating μ-law table")

_INITIAL_CAPACITY: Final = 960  # input samples; 20 ms at 24 kHz is 480, bigger chunks grow it
_ITEM: Final = np.dtype(np.float64).itemsize

# Per-frame numpy call overhead matters as much as the arithmetic on 160 / 480 samples, so the
# hot path avoids the Python-level layers in front of the C code: dtype objects are passed
# positionally (a dtype string or keyword is parsed per call), ndarray methods replace np.*
# wrappers that go through fromnumeric._wrapfunc, and ufuncs are called directly. np.clip in
# particular is three Python layers over the clip ufunc (~2.3 µs vs ~0.5 µs on 480 samples);
# for finite input the ufunc is exactly min(max(y, lo), hi). Its bounds are 0-d arrays because
# Python float bounds are converted on every call (~0.3 µs more).
_U8: Final = np.dtype(np.uint8)
_I16: Final = np.dtype("<i2")
_clip: Final = np._core.umath.clip
_rint: Final = np.rint
_PCM16_MIN: Final = np.array(-32768.0)
_PCM16_MAX: Final = np.array(32767.0)
_PCM16_MIN.flags.writeable = False
_PCM16_MAX.flags.writeable = False


def _to_pcm16(y: np.ndarray, scratch: np.ndarray) -> bytes:
    """Saturate and round filter output to int16 LE bytes (overshoot clips, never wraps).

    ``y`` is the core's own output buffer, so it is rounded in place; the cast of the rounded
    (integral, in-range) floats is exact, and a plain assignment does it ~3x faster than rint
    writing to int16 through the ufunc's casting buffer.
    """
    _clip(y, _PCM16_MIN, _PCM16_MAX, y)
    _rint(y, y)
    scratch[...] = y
    return scratch.tobytes()


def _to_ulaw(y: np.ndarray, scratch: np.ndarray) -> bytes:
    """Round filter output and μ-law encode it through the saturating table (one gather)."""
    _rint(y, y)  # in place, then an exact cast: as for _to_pcm16
    scratch[...] = y  # scratch is intp: a ready-made index array (negative ones wrap)
    return _ULAW_ENCODE_SATURATING[scratch].tobytes()


class _OddByteCarry:
    """Splits a PCM16 byte stream into whole samples, keeping a trailing odd byte for later."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def samples(self, pcm: bytes) -> np.ndarray:
        if not self._pending and not len(pcm) % 2:
            return np.frombuffer(pcm, _I16)  # the common case: no copy
        data = self._pending + bytes(memoryview(pcm))  # TypeError for non-bytes input
        whole = len(data) - len(data) % 2
        self._pending = data[whole:]
        return np.frombuffer(data, dtype=_I16, count=whole // 2)


def _block_rows(buf: np.ndarray, rows: int, stride: int, width: int) -> np.ndarray:
    """View of ``rows`` windows buf[a*stride : a*stride + width] (overlapping, no copy)."""
    return np.ndarray((rows, width), dtype=np.float64, buffer=buf, strides=(stride * _ITEM, _ITEM))


# Both cores below keep every view a call needs (where the input goes, the block windows, the
# output rows, the history shift, the returned slices) for the last frame shape they saw, and
# rebuild them only when it changes (and whenever the buffers are reallocated, which only
# happens then). Frames almost always have the same length, so a steady-state call creates no
# views at all: making one costs ~0.2 µs, and there would be seven per call.


class _Interpolator:
    """8 kHz -> 24 kHz polyphase FIR core working on float64 samples.

    State is the last _PHASE_LEN - 1 input samples, kept at the front of ``_buf`` so that every
    output sees a full filter window: frame joins are seamless and the output is identical
    however the input is chunked. Starts from silence (zero history). Past the new samples the
    buffer holds stale (finite) samples: they only feed outputs beyond the ones returned.

    Per frame: ``slot(n)`` says where to write the n new samples, ``run()`` filters them.
    """

    __slots__ = (
        "_buf",
        "_history_dst",
        "_history_src",
        "_n",
        "_out",
        "_out_rows",
        "_scratch",
        "_slot",
        "_windows",
        "_y",
        "pcm",
    )

    _HISTORY: Final = _PHASE_LEN - 1

    def __init__(self) -> None:
        self._allocate(_INITIAL_CAPACITY)

    def _allocate(self, capacity: int) -> None:
        rows = -(-capacity // _UP_INS)
        buf = np.zeros(self._HISTORY + rows * _UP_INS)  # a row reads _HISTORY past its block
        if hasattr(self, "_buf"):
            buf[: self._HISTORY] = self._buf[: self._HISTORY]
        self._buf = buf
        self._out = np.empty((rows, _RATIO * _UP_INS))
        self._scratch = np.empty(rows * _RATIO * _UP_INS, dtype=_I16)
        self._n = -1  # no views yet

    def _prepare(self, n: int) -> None:
        """Build the views for frames of ``n`` input samples (growing the buffers if needed)."""
        if n > len(self._out) * _UP_INS:
            self._allocate(max(n, 2 * len(self._out) * _UP_INS))
        buf, history = self._buf, self._HISTORY
        rows = -(-n // _UP_INS)
        self._slot = buf[history : history + n]
        self._windows = _block_rows(buf, rows, _UP_INS, _UP_ROW)
        self._out_rows = self._out[:rows]
        self._history_dst = buf[:history]
        self._history_src = buf[n : n + history]  # overlaps _history_dst when n < history
        self._y = self._out_rows.reshape(-1)[: _RATIO * n]
        self.pcm = self._scratch[: _RATIO * n]  # the caller's int16 output for 3n samples
        self._n = n

    def slot(self, n: int) -> np.ndarray:
        """Where the caller writes the next ``n`` input samples (then calls ``run()``)."""
        if n != self._n:
            self._prepare(n)
        return self._slot

    def run(self) -> np.ndarray:
        """Filter the samples just written; returns 3n floats (valid until the next call)."""
        self._windows.dot(_UP_BLOCK, self._out_rows)
        self._history_dst[...] = self._history_src  # overlap-safe in numpy
        return self._y


class _Decimator:
    """24 kHz -> 8 kHz polyphase FIR core (computes only every third output).

    ``_buf[:_fill]`` holds the unconsumed input: the last _TAPS - 3 .. _TAPS - 1 samples, i.e.
    the start of the next output's window, which completes once enough new samples arrive. So
    any input length works and the output is identical however the input is chunked. Starts
    from silence. Past ``_fill`` the buffer holds stale (finite) samples: they only feed
    outputs beyond the ones returned.
    """

    __slots__ = (
        "_buf",
        "_fill",
        "_history_dst",
        "_history_src",
        "_next_fill",
        "_out",
        "_out_rows",
        "_scratch",
        "_scratch_dtype",
        "_slot",
        "_view_fill",
        "_view_len",
        "_windows",
        "_y",
        "out",
    )

    def __init__(self, scratch_dtype: npt.DTypeLike) -> None:
        """``scratch_dtype``: what the caller converts outputs into ("<i2" PCM16, np.intp μ-law)."""
        self._scratch_dtype = scratch_dtype
        self._fill = _TAPS - 1
        self._allocate(_TAPS + _INITIAL_CAPACITY)

    def _allocate(self, size: int) -> None:
        buf = np.zeros(size)
        if hasattr(self, "_buf"):
            buf[: self._fill] = self._buf[: self._fill]
        self._buf = buf
        rows = (size - _DOWN_ROW) // _DOWN_STRIDE + 1  # the most block rows ``buf`` can hold
        self._out = np.empty((rows, _DOWN_OUTS))
        self._scratch = np.empty(rows * _DOWN_OUTS, dtype=self._scratch_dtype)
        self._view_len = -1  # no views yet

    def _prepare(self, k: int) -> None:
        """Build the views for pushing ``k`` samples onto the current ``_fill``."""
        fill = self._fill + k
        m = (fill - _TAPS) // _RATIO + 1 if fill >= _TAPS else 0
        rows = -(-m // _DOWN_OUTS)
        # The last row reads _DOWN_ROW samples, past the final output's window when m is not a
        # multiple of _DOWN_OUTS (the extra outputs are computed from stale samples, unused).
        size = max(fill, (rows - 1) * _DOWN_STRIDE + _DOWN_ROW)
        if size > len(self._buf):
            self._allocate(max(size, 2 * len(self._buf)))
        buf = self._buf
        consumed = _RATIO * m
        self._slot = buf[self._fill : fill]
        self._windows = _block_rows(buf, rows, _DOWN_STRIDE, _DOWN_ROW)
        self._out_rows = self._out[:rows]
        self._next_fill = fill - consumed
        self._history_dst = buf[: self._next_fill]
        self._history_src = buf[consumed:fill]  # may overlap _history_dst
        self._y = self._out_rows.reshape(-1)[:m]
        self.out = self._scratch[:m]  # the caller's converted output for the m samples
        self._view_fill, self._view_len = self._fill, k

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Append input samples; returns the float outputs now complete (valid until next call).

        ``out`` is then the caller's scratch array of the same length.
        """
        if len(samples) != self._view_len or self._fill != self._view_fill:
            self._prepare(len(samples))
        self._slot[...] = samples
        self._windows.dot(_DOWN_BLOCK, self._out_rows)
        self._history_dst[...] = self._history_src  # overlap-safe in numpy
        self._fill = self._next_fill
        return self._y


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
        samples = self._carry.samples(pcm)
        n = len(samples)
        if not n:
            return b""
        core = self._core
        core.slot(n)[...] = samples
        return _to_pcm16(core.run(), core.pcm)


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
        core = self._core
        return _to_pcm16(core.push(self._carry.samples(pcm)), core.out)


class InboundTranscoder:
    """Twilio -> model in pcm16 mode: μ-law 8 kHz bytes -> PCM16 LE 24 kHz bytes (3 x 2 bytes each).

    Decoding and upsampling are fused: the μ-law table gather writes straight into the
    resampler's input buffer.
    """

    __slots__ = ("_core",)

    def __init__(self) -> None:
        self._core = _Interpolator()

    def process(self, ulaw: bytes) -> bytes:
        codes = np.frombuffer(ulaw, _U8)
        n = len(codes)
        if not n:
            return b""
        core = self._core
        _ULAW_DECODE_F64.take(codes, None, core.slot(n), "clip")  # uint8: always in range
        return _to_pcm16(core.run(), core.pcm)


class OutboundTranscoder:
    """Model -> Twilio in pcm16 mode: PCM16 LE 24 kHz bytes (any length) -> μ-law 8 kHz bytes.

    Anti-aliased decimation then μ-law encoding of the rounded, saturated result; leftover
    samples and an odd byte carry over to the next call.
    """

    __slots__ = ("_carry", "_core")

    def __init__(self) -> None:
        self._carry = _OddByteCarry()
        self._core = _Decimator(np.intp)  # rounded outputs index the saturating μ-law table

    def process(self, pcm: bytes) -> bytes:
        core = self._core
        return _to_ulaw(core.push(self._carry.samples(pcm)), core.out)
