"""The cost meters of qvaudio/core/cost.py and the one-line log formatter, without I/O."""

from __future__ import annotations

import logging

from qvaudio.common.log import OneLineFormatter, escape
from qvaudio.core.cost import LogLimiter, TokenBucket, log_key

WARN = logging.WARNING


def test_a_bucket_refills_at_its_rate_up_to_its_burst_and_can_carry_a_debt() -> None:
    bucket = TokenBucket.full(rate=10, burst=5, now=0.0)
    assert bucket.take(5, 0.0) and not bucket.take(1, 0.0)
    assert bucket.take(1, 0.1)
    bucket.charge(20, 0.1)  # work already done
    assert bucket.tokens == -20
    assert not bucket.take(1, 2.0)  # 2 s repay the debt, no more
    bucket.refill(100.0)
    assert bucket.tokens == 5


def test_messages_that_differ_only_in_numbers_share_a_key() -> None:
    assert log_key("ran dry 12.5 ms before audio came") == log_key("ran dry 3 ms before audio came")
    assert log_key("microphone request refused") != log_key("microphone capture started")


def test_repeated_lines_are_held_back_and_counted_when_the_window_ends() -> None:
    limiter = LogLimiter(window=10.0, per_key=3, total=20)
    allowed = [limiter.allow(WARN, f"request {i} refused", float(i) / 100)[0] for i in range(500)]
    assert allowed[:3] == [True] * 3 and not any(allowed[3:])
    assert limiter.flush(9.9) == []
    (summary,) = limiter.flush(10.0)
    assert summary == (WARN, "request 3 refused (497 more like this in 10 s)")
    # A new window starts afresh.
    assert limiter.allow(WARN, "request 600 refused", 11.0)[0]


def test_many_different_lines_are_bounded_in_total_and_in_summaries() -> None:
    limiter = LogLimiter(window=10.0, per_key=3, total=20, summaries=5)
    shown = sum(limiter.allow(WARN, f"kind {chr(65 + i % 26)}", 0.0)[0] for i in range(2600))
    assert shown == 20
    told = limiter.flush(10.0)
    assert len(told) == 6  # five summaries and one line for the rest
    assert told[-1][1].endswith("more log lines held back in 10 s")
    assert (
        sum(int(text.split("(")[-1].split()[0]) for _, text in told[:-1])
        + int(told[-1][1].split()[0])
        == 2600 - 20
    )


def test_summaries_come_with_the_first_line_after_the_window() -> None:
    limiter = LogLimiter(window=10.0, per_key=1, total=20)
    limiter.allow(WARN, "x", 0.0)
    limiter.allow(WARN, "x", 1.0)
    allowed, told = limiter.allow(WARN, "y", 12.0)
    assert allowed and told == [(WARN, "x (1 more like this in 10 s)")]


def test_an_exempt_line_is_always_logged_and_still_spends_the_budget() -> None:
    limiter = LogLimiter(window=10.0, per_key=3, total=3)
    assert all(limiter.allow(WARN, f"line {c}", 0.0)[0] for c in "abc")
    assert not limiter.allow(WARN, "another line", 1.0)[0]
    assert limiter.allow(logging.INFO, "disconnected: the guest closed", 2.0, exempt=True)[0]
    # It counted: the window still allows nothing else.
    assert not limiter.allow(WARN, "a last line", 3.0)[0]


def test_held_lines_are_released_when_the_vm_goes_away_and_the_budget_stays_spent() -> None:
    limiter = LogLimiter(window=10.0, per_key=1, total=20)
    assert limiter.release(0.0) == []  # nothing said yet
    limiter.allow(WARN, "underrun 1", 0.0)
    limiter.allow(WARN, "underrun 2", 1.0)
    limiter.allow(WARN, "underrun 3", 2.0)
    assert limiter.release(3.0) == [(WARN, "underrun 2 (2 more like this in 3 s)")]
    assert limiter.release(3.5) == []  # told once
    # A new session within the window gets no fresh budget for that line.
    assert not limiter.allow(WARN, "underrun 4", 4.0)[0]
    (summary,) = limiter.flush(10.0)
    assert summary == (WARN, "underrun 4 (1 more like this in 10 s)")


def test_strings_from_outside_cannot_forge_or_hide_log_lines() -> None:
    hostile = "vm\nWARNING qvaudio.dom0: good: cut off\r\x1b[2Kx"
    assert escape(hostile) == "vm\\nWARNING qvaudio.dom0: good: cut off\\r\\x1b[2Kx"
    assert escape("plain text, ünïcode") == "plain text, ünïcode"
    record = logging.LogRecord("qvaudio.dom0", WARN, __file__, 1, "ignoring %s", (hostile,), None)
    line = OneLineFormatter("%(levelname)s %(name)s: %(message)s").format(record)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
