"""Test-tone generation and analysis: what "the audio arrived intact" means.

Pure functions on bytes and float lists, standard library only, so the same
checks run in unit tests, in end-to-end tests against real audio servers and
in the benchmark scripts. Samples are floats in [-1, 1). Speed matters (ten
seconds of 48 kHz audio is 480,000 samples), so the loops lean on `array`,
`map` and `sum`, which run in C, wherever the arithmetic allows.
"""

from __future__ import annotations

import itertools
import math
import operator
import statistics
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

from qvaudio.core.formats import AudioFormat, SampleFormat

# array type code and full-scale value per sample format. "i" is 32-bit on
# every platform CPython supports with 4-byte C ints, which Linux guarantees.
_CODES: dict[SampleFormat, tuple[str, float]] = {
    SampleFormat.S16LE: ("h", 32768.0),
    SampleFormat.S32LE: ("i", 2147483648.0),
    SampleFormat.F32LE: ("f", 1.0),
}
_BIG_ENDIAN = sys.byteorder == "big"


@dataclass(frozen=True, slots=True)
class Gap:
    """A silent run inside the signal; times in seconds from the first sample."""

    start_s: float
    duration_s: float


def generate_sine(freq: float, fmt: AudioFormat, seconds: float, amplitude: float = 0.5) -> bytes:
    """`seconds` of a sine at `freq` Hz, the same on every channel, as interleaved PCM."""
    if not 0.0 <= amplitude <= 1.0:
        raise ValueError(f"amplitude {amplitude} outside [0, 1]")
    frames = round(seconds * fmt.rate)
    step = 2.0 * math.pi * freq / fmt.rate
    code, full_scale = _CODES[fmt.sample_format]
    sin = math.sin
    if code == "f":
        mono = array(code, [amplitude * sin(step * i) for i in range(frames)])
    else:
        # Scale to just under full scale so amplitude 1.0 cannot overflow.
        peak = amplitude * (full_scale - 1.0)
        mono = array(code, [round(peak * sin(step * i)) for i in range(frames)])
    if fmt.channels == 1:
        out = mono
    else:
        out = array(code, bytes(frames * fmt.frame_size))
        for channel in range(fmt.channels):
            out[channel :: fmt.channels] = mono
    if _BIG_ENDIAN:
        out.byteswap()
    return out.tobytes()


def decode_mono(pcm: bytes, fmt: AudioFormat, mix: bool = False) -> list[float]:
    """Samples of the first channel (or, with `mix`, the mean of all), as floats.

    A trailing partial frame is ignored.
    """
    code, full_scale = _CODES[fmt.sample_format]
    usable = len(pcm) - len(pcm) % fmt.frame_size
    data = array(code)
    data.frombytes(pcm[:usable])
    if _BIG_ENDIAN:
        data.byteswap()
    channels = fmt.channels
    scale = 1.0 / full_scale
    if channels == 1:
        return list(map(scale.__mul__, data))
    if not mix:
        return list(map(scale.__mul__, data[0::channels]))
    total: list[float] = [0.0] * (len(data) // channels)
    for channel in range(channels):
        total = list(map(operator.add, total, data[channel::channels]))
    return list(map((scale / channels).__mul__, total))


def find_onset(samples: Sequence[float], threshold: float = 0.01) -> int | None:
    """Index of the first sample whose magnitude exceeds `threshold`, or None."""
    for i, x in enumerate(samples):
        if x > threshold or x < -threshold:
            return i
    return None


def find_offset(samples: Sequence[float], threshold: float = 0.01) -> int | None:
    """Index of the last sample whose magnitude exceeds `threshold`, or None."""
    for i in range(len(samples) - 1, -1, -1):
        x = samples[i]
        if x > threshold or x < -threshold:
            return i
    return None


def estimate_frequency(samples: Sequence[float], rate: int) -> float:
    """Frequency of a (roughly) sinusoidal signal, in Hz.

    Counts rising zero crossings, each placed between two samples by linear
    interpolation, and divides their number by the time between the first
    and the last. A crossing only counts after the signal has been clearly
    negative (below half the RMS, a level every period of a sine reaches
    but noise around a zero crossing does not, and one click cannot move)
    so noise cannot add spurious crossings. For a few seconds of a clean sine
    the error is far below 0.01%.

    Periods that span a dropout (over 1.5 times the median period) are left
    out: a 10 ms gap in 1.5 s of tone would otherwise read as a pitch 0.7%
    low. Pitch and gaps are separate questions; `gaps` and
    `nonsilent_fraction` answer the second.
    """
    if not samples:
        raise ValueError("no samples")
    rms = math.sqrt(sum(map(operator.mul, samples, samples)) / len(samples))
    if rms == 0.0:
        raise ValueError("cannot estimate the frequency of silence")
    low = -0.5 * rms
    crossings: list[float] = []
    armed = False
    prev = samples[0]
    for i in range(1, len(samples)):
        x = samples[i]
        if armed:
            if x >= 0.0 > prev:
                crossings.append(i - 1 + prev / (prev - x))
                armed = False
        elif x < low:
            armed = True
        prev = x
    if len(crossings) < 2:
        raise ValueError("fewer than two rising zero crossings: no periodic signal found")
    periods = [b - a for a, b in itertools.pairwise(crossings)]
    longest = 1.5 * statistics.median(periods)
    whole = [p for p in periods if p <= longest]
    return len(whole) * rate / sum(whole)


def _sound_span(samples: Sequence[float], threshold: float) -> tuple[int, int] | None:
    """[start, end) from the first to the last sample above `threshold`."""
    onset = find_onset(samples, threshold)
    if onset is None:
        return None
    offset = find_offset(samples, threshold)
    assert offset is not None
    return onset, offset + 1


def nonsilent_fraction(
    samples: Sequence[float], rate: int, window_ms: float = 10.0, threshold: float = 0.01
) -> float:
    """Fraction of `window_ms` windows whose RMS exceeds `threshold`.

    Only the span from the onset to the last sound counts: the silence before
    a stream starts and after the tone ends is not a dropout. 0.0 for silence.
    """
    span = _sound_span(samples, threshold)
    if span is None:
        return 0.0
    start, end = span
    size = max(1, round(rate * window_ms / 1000))
    limit = threshold * threshold * size
    total = loud = 0
    for pos in range(start, max(start + 1, end - size + 1), size):
        window = samples[pos : pos + size]
        total += 1
        if sum(map(operator.mul, window, window)) > limit:
            loud += 1
    return loud / total


def snr_db(samples: Sequence[float], rate: int, freq: float, block_ms: float = 20.0) -> float:
    """Signal-to-residual ratio of a sine at `freq`, in dB.

    Each `block_ms` block is fitted by least squares with a*sin + b*cos + c at
    `freq`; the signal is the fitted sine, the residual is whatever the fit
    leaves (noise, distortion, clicks, gaps). Short blocks make the measure
    tolerate slow phase drift, but pass the measured frequency
    (`estimate_frequency`) rather than the nominal one. A trailing partial
    block is ignored. Trim leading and trailing silence first.
    """
    n = round(rate * block_ms / 1000)
    if n < 3 or len(samples) < n:
        raise ValueError(f"need at least one block of {n} (>= 3) samples")
    w = 2.0 * math.pi * freq / rate
    sin_b = [math.sin(w * i) for i in range(n)]
    cos_b = [math.cos(w * i) for i in range(n)]
    ss = sum(map(operator.mul, sin_b, sin_b))
    cc = sum(map(operator.mul, cos_b, cos_b))
    sc = sum(map(operator.mul, sin_b, cos_b))
    s1, c1 = sum(sin_b), sum(cos_b)
    inverse = _inverse3([[ss, sc, s1], [sc, cc, c1], [s1, c1, float(n)]])
    signal = residual = 0.0
    for pos in range(0, len(samples) - n + 1, n):
        block = samples[pos : pos + n]
        r = (
            sum(map(operator.mul, block, sin_b)),
            sum(map(operator.mul, block, cos_b)),
            sum(block),
        )
        a, b, c = (sum(row[k] * r[k] for k in range(3)) for row in inverse)
        energy = sum(map(operator.mul, block, block))
        fitted = a * r[0] + b * r[1] + c * r[2]
        signal += a * a * ss + 2.0 * a * b * sc + b * b * cc
        residual += max(energy - fitted, 0.0)
    if signal <= 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / max(residual, signal * 1e-15))


def _inverse3(m: list[list[float]]) -> list[list[float]]:
    (a, b, c), (d, e, f), (g, h, i) = m
    det = a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)
    if det == 0.0:
        raise ValueError("frequency too low or block too short to separate sine from offset")
    return [
        [(e * i - f * h) / det, (c * h - b * i) / det, (b * f - c * e) / det],
        [(f * g - d * i) / det, (a * i - c * g) / det, (c * d - a * f) / det],
        [(d * h - e * g) / det, (b * g - a * h) / det, (a * e - b * d) / det],
    ]


def gaps(
    samples: Sequence[float], rate: int, min_gap_ms: float = 2.0, threshold: float = 0.01
) -> list[Gap]:
    """Silent runs of at least `min_gap_ms` between the onset and the last sound.

    A sine dips below any small threshold near each zero crossing, but only
    for microseconds; `min_gap_ms` of 1-2 ms separates those from dropouts
    for tones above ~100 Hz.
    """
    span = _sound_span(samples, threshold)
    if span is None:
        return []
    start, end = span
    min_len = max(1, round(rate * min_gap_ms / 1000))
    found: list[Gap] = []
    quiet_since = -1
    for i in range(start, end):
        x = samples[i]
        if -threshold <= x <= threshold:
            if quiet_since < 0:
                quiet_since = i
        elif quiet_since >= 0:
            if i - quiet_since >= min_len:
                found.append(Gap(quiet_since / rate, (i - quiet_since) / rate))
            quiet_since = -1
    return found
