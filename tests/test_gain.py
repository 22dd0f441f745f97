"""The volume cap on the samples: the mixer's percent, measured on the samples it makes."""

from __future__ import annotations

import ctypes
import math

import pytest

from qvaudio.core.formats import AudioFormat, SampleFormat
from qvaudio.core.gain import apply_gain, peak, percent_to_gain
from qvaudio.core.tone import decode_mono, generate_sine

S16 = AudioFormat(48000, SampleFormat.S16LE, 2)
F32 = AudioFormat(48000, SampleFormat.F32LE, 2)
#: PA_VOLUME_NORM: what the mixer shows as 100 %.
VOLUME_NORM = 0x10000


def rms_db(pcm: bytes, fmt: AudioFormat) -> float:
    samples = decode_mono(pcm, fmt)
    return 10 * math.log10(sum(x * x for x in samples) / len(samples))


@pytest.mark.parametrize(("percent", "db"), [(100, 0.0), (80, -5.81), (50, -18.06), (10, -60.0)])
def test_the_cap_lowers_the_level_as_the_mixer_does(percent: int, db: float) -> None:
    for fmt in (S16, F32):
        tone = generate_sine(440, fmt, 0.5, amplitude=0.8)
        capped = apply_gain(tone, fmt, percent_to_gain(percent))
        # 60 log10(p): three times the decibels of the linear percent.
        assert rms_db(capped, fmt) - rms_db(tone, fmt) == pytest.approx(db, abs=0.05)
        assert peak(capped, fmt) == pytest.approx(0.8 * (percent / 100) ** 3, abs=1e-4)


def test_cap_zero_is_silence() -> None:
    tone = generate_sine(440, S16, 0.1, amplitude=0.8)
    assert apply_gain(tone, S16, percent_to_gain(0)) == bytes(len(tone))


def test_percent_is_pulseaudios_own_volume_scale() -> None:
    """The same factor PulseAudio applies for a stream the mixer shows at that percent."""
    libpulse = ctypes.CDLL("libpulse.so.0")
    libpulse.pa_sw_volume_to_linear.argtypes = [ctypes.c_uint32]
    libpulse.pa_sw_volume_to_linear.restype = ctypes.c_double
    for percent in range(101):
        volume = round(percent / 100 * VOLUME_NORM)
        pulse = libpulse.pa_sw_volume_to_linear(volume)
        # Only the mixer's own rounding to 1/65536 of 100 % tells them apart.
        assert percent_to_gain(percent) == pytest.approx(pulse, rel=2e-3, abs=1e-12), percent


def test_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="outside 0-100%"):
        percent_to_gain(101)
