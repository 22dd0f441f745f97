from __future__ import annotations

import pytest

from qvaudio.core.reported_latency import ReportedLatency


def test_nothing_is_published_before_a_measurement() -> None:
    report = ReportedLatency()
    assert report.update(None) is None
    assert report.published_us is None


def test_the_first_measurement_is_published_to_the_millisecond() -> None:
    report = ReportedLatency()
    assert report.update(41_400) == 41_000
    assert report.published_us == 41_000


def test_jitter_within_most_of_a_step_leaves_the_figure() -> None:
    report = ReportedLatency()
    report.update(41_000)
    for jitter in (41_700, 40_300, 41_600):
        assert report.update(jitter) is None
    assert report.published_us == 41_000


def test_a_real_change_is_published_at_once() -> None:
    report = ReportedLatency()
    report.update(41_000)
    assert report.update(52_300) == 52_000
    assert report.update(30_900) == 31_000


def test_rounding_hides_the_exact_figure() -> None:
    report = ReportedLatency(round_ms=10)
    assert report.update(43_900) == 40_000
    assert report.update(46_000) is None  # under 7.5 ms away
    assert report.update(48_000) == 50_000


def test_a_lost_measurement_keeps_the_last_figure() -> None:
    report = ReportedLatency()
    report.update(41_000)
    assert report.update(None) is None
    assert report.published_us == 41_000


def test_a_negative_measurement_is_published_as_zero() -> None:
    assert ReportedLatency().update(-5_000) == 0


def test_negative_rounding_is_refused() -> None:
    with pytest.raises(ValueError):
        ReportedLatency(round_ms=-1)
