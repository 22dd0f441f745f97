"""The tone helpers on synthetic signals whose answers are known exactly."""

from __future__ import annotations

import math
import random
import struct
import time

import pytest

from qvaudio.core import tone
from qvaudio.core.formats import AudioFormat, SampleFormat

RATE = 48000
MONO_F32 = AudioFormat(RATE, SampleFormat.F32LE, 1)


def sine(freq: float, seconds: float, amplitude: float = 0.5, rate: int = RATE) -> list[float]:
    step = 2 * math.pi * freq / rate
    return [amplitude * math.sin(step * i) for i in range(round(seconds * rate))]


@pytest.mark.parametrize("sample_format", list(SampleFormat))
@pytest.mark.parametrize("channels", [1, 2, 6])
def test_generate_then_decode_round_trips(sample_format: SampleFormat, channels: int) -> None:
    fmt = AudioFormat(RATE, sample_format, channels)
    pcm = tone.generate_sine(1000.0, fmt, 0.1, amplitude=0.5)
    assert len(pcm) == 4800 * fmt.frame_size
    decoded = tone.decode_mono(pcm, fmt)
    expected = sine(1000.0, 0.1)
    assert len(decoded) == len(expected)
    assert max(abs(a - b) for a, b in zip(decoded, expected, strict=True)) < 1e-4


def test_generated_pcm_is_little_endian_and_interleaved() -> None:
    fmt = AudioFormat(RATE, SampleFormat.S16LE, 2)
    pcm = tone.generate_sine(RATE / 4, fmt, 4 / RATE, amplitude=1.0)  # 0, +1, 0, -1
    left_right = struct.unpack("<8h", pcm)
    assert left_right == (0, 0, 32767, 32767, 0, 0, -32767, -32767)


def test_full_scale_does_not_overflow_any_integer_format() -> None:
    for sample_format in (SampleFormat.S16LE, SampleFormat.S32LE):
        fmt = AudioFormat(RATE, sample_format, 1)
        samples = tone.decode_mono(tone.generate_sine(997.0, fmt, 0.05, amplitude=1.0), fmt)
        assert 0.999 < max(samples) <= 1.0
        assert -1.0 <= min(samples) < -0.999


def test_amplitude_outside_range_is_refused() -> None:
    with pytest.raises(ValueError, match="amplitude"):
        tone.generate_sine(440.0, MONO_F32, 0.1, amplitude=1.5)


def test_decode_ignores_a_partial_trailing_frame_and_can_mix_channels() -> None:
    fmt = AudioFormat(RATE, SampleFormat.S16LE, 2)
    pcm = struct.pack("<4h", 16384, 0, -16384, 16384) + b"\x01"
    assert tone.decode_mono(pcm, fmt) == [0.5, -0.5]
    assert tone.decode_mono(pcm, fmt, mix=True) == [0.25, 0.0]


def test_onset_and_offset() -> None:
    samples = [0.0] * 100 + sine(1000.0, 0.01) + [0.0] * 50
    onset = tone.find_onset(samples, 0.01)
    offset = tone.find_offset(samples, 0.01)
    assert onset is not None and 100 < onset < 105
    assert offset is not None and len(samples) - 55 < offset < len(samples) - 50
    assert tone.find_onset([0.0] * 10, 0.01) is None
    assert tone.find_offset([0.0] * 10, 0.01) is None


@pytest.mark.parametrize("freq", [100.0, 440.0, 997.0, 1000.0, 5123.4])
def test_frequency_estimate_is_far_better_than_required(freq: float) -> None:
    estimate = tone.estimate_frequency(sine(freq, 2.0), RATE)
    assert estimate == pytest.approx(freq, rel=1e-4)


def test_frequency_estimate_survives_noise_and_offset_start() -> None:
    rng = random.Random(1)
    samples = [0.0] * 5000 + [x + rng.gauss(0, 0.02) for x in sine(1000.0, 3.0, 0.3)]
    assert tone.estimate_frequency(samples, RATE) == pytest.approx(1000.0, rel=5e-4)


def test_a_dropout_does_not_bend_the_frequency_estimate() -> None:
    # 10.7 ms missing from 1.5 s of 700 Hz (a PipeWire half-quantum): once
    # read as 695 Hz, 0.7% low; the gap is the non-silent fraction's business.
    tone_ = sine(700.0, 1.5)
    cut = len(tone_) // 2
    samples = tone_[:cut] + [0.0] * 512 + tone_[cut + 512 :]
    assert tone.estimate_frequency(samples, RATE) == pytest.approx(700.0, rel=1e-3)
    assert tone.nonsilent_fraction(samples, RATE) < 1.0


def test_frequency_of_silence_or_dc_is_an_error() -> None:
    with pytest.raises(ValueError, match="silence"):
        tone.estimate_frequency([0.0] * 1000, RATE)
    with pytest.raises(ValueError, match="crossings"):
        tone.estimate_frequency([0.5] * 1000, RATE)


def test_clean_tone_with_silence_around_is_fully_nonsilent_and_gap_free() -> None:
    samples = [0.0] * 24000 + sine(1000.0, 2.0) + [0.0] * 24000
    assert tone.nonsilent_fraction(samples, RATE) == 1.0
    assert tone.gaps(samples, RATE, min_gap_ms=1.0) == []


def test_a_5ms_gap_is_found_where_it_is() -> None:
    samples = sine(1000.0, 2.0)
    gap_start = 48000  # 1.0 s
    samples[gap_start : gap_start + 240] = [0.0] * 240  # 5 ms
    found = tone.gaps(samples, RATE, min_gap_ms=2.0)
    assert len(found) == 1
    # The gap widens by the sine's own quiet stretch on either side (microseconds).
    assert found[0].start_s == pytest.approx(1.0, abs=1e-4)
    assert found[0].duration_s == pytest.approx(0.005, abs=2e-4)
    # Half-silent 10 ms windows still have sound in them; 2 ms windows see it.
    assert tone.nonsilent_fraction(samples, RATE, window_ms=10.0) == 1.0
    assert 0.99 <= tone.nonsilent_fraction(samples, RATE, window_ms=2.0) < 1.0
    # ...and costs SNR: the fit leaves the missing sine as residual.
    assert tone.snr_db(samples, RATE, 1000.0) < 30.0


def test_gap_count_and_positions_for_several_dropouts() -> None:
    samples = sine(440.0, 3.0)
    for start_s in (0.5, 1.25, 2.0):
        i = round(start_s * RATE)
        samples[i : i + 480] = [0.0] * 480  # 10 ms
    found = tone.gaps(samples, RATE, min_gap_ms=2.0)
    assert [round(g.start_s, 2) for g in found] == [0.5, 1.25, 2.0]
    assert all(g.duration_s == pytest.approx(0.01, abs=5e-4) for g in found)


def test_a_long_dropout_costs_its_share_of_10ms_windows() -> None:
    samples = sine(1000.0, 2.0)
    samples[48000 : 48000 + 2400] = [0.0] * 2400  # 50 ms: 4 or 5 windows of 200
    fraction = tone.nonsilent_fraction(samples, RATE)
    assert 0.97 <= fraction <= 0.98


def test_silence_has_no_sound_and_no_gaps() -> None:
    assert tone.nonsilent_fraction([0.0] * 4800, RATE) == 0.0
    assert tone.gaps([0.0] * 4800, RATE) == []


def test_snr_of_a_clean_quantised_tone_is_high_and_noise_lowers_it() -> None:
    fmt = AudioFormat(RATE, SampleFormat.S16LE, 1)
    clean = tone.decode_mono(tone.generate_sine(1000.0, fmt, 1.0), fmt)
    assert tone.snr_db(clean, RATE, 1000.0) > 80.0
    rng = random.Random(2)
    # Sine power 0.125, noise power 0.0125**2 * ... : 0.5 amplitude vs sigma 0.05 is 17 dB.
    noisy = [x + rng.gauss(0, 0.05) for x in clean]
    assert tone.snr_db(noisy, RATE, 1000.0) == pytest.approx(17.0, abs=0.5)


def test_snr_needs_a_whole_block() -> None:
    with pytest.raises(ValueError, match="block"):
        tone.snr_db([0.1] * 10, RATE, 1000.0)


def test_ten_seconds_of_48k_is_analysed_quickly() -> None:
    fmt = AudioFormat(RATE, SampleFormat.S16LE, 2)
    started = time.perf_counter()
    pcm = tone.generate_sine(1000.0, fmt, 10.0)
    samples = tone.decode_mono(pcm, fmt)
    freq = tone.estimate_frequency(samples, RATE)
    tone.nonsilent_fraction(samples, RATE)
    tone.gaps(samples, RATE)
    tone.snr_db(samples, RATE, freq)
    tone.find_onset(samples)
    elapsed = time.perf_counter() - started
    assert freq == pytest.approx(1000.0, rel=1e-5)
    assert elapsed < 3.0, f"analysis of 10 s took {elapsed:.2f} s"
