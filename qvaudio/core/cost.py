"""What one VM may cost dom0, counted in the core. No I/O, no clock.

A guest may be compromised, and protocol-valid traffic can still cost dom0
work: many frames, format and microphone storms, log lines. Each of those
is metered here per VM with time passed in, so the session can throttle or
cut off the one VM that exceeds its share and the shell only carries out
the decision.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(slots=True)
class TokenBucket:
    """`rate` tokens a second up to `burst`; `tokens` may go negative (a debt
    taken by work already done, repaid before more is allowed)."""

    rate: float
    burst: float
    tokens: float
    updated: float

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> TokenBucket:
        return cls(rate, burst, burst, now)

    def refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.updated = now

    def take(self, amount: float, now: float) -> bool:
        """Take `amount` if there is that much; False (and nothing taken) otherwise."""
        self.refill(now)
        if self.tokens < amount:
            return False
        self.tokens -= amount
        return True

    def charge(self, amount: float, now: float) -> None:
        """Take `amount` whatever is left: work that was already done."""
        self.refill(now)
        self.tokens -= amount


_NUMBERS = re.compile(r"\d+(\.\d+)?")


def log_key(message: str) -> str:
    """Messages that differ only in their numbers are the same message."""
    return _NUMBERS.sub("#", message)


@dataclass(slots=True)
class _Suppressed:
    example: str
    level: int
    count: int = 0


@dataclass
class LogLimiter:
    """At most `per_key` lines of each message and `total` lines in all per
    `window` seconds; what is held back is counted and told once the window
    ends ("... 468 more like this in the last 10 s")."""

    window: float = 10.0
    per_key: int = 3
    total: int = 20
    #: Summaries told per window at most; beyond, one line counts the rest.
    summaries: int = 5
    _started: float | None = None
    _lines: int = 0
    _per_key: dict[str, int] = field(default_factory=dict)
    _held: dict[str, _Suppressed] = field(default_factory=dict)

    def allow(
        self, level: int, message: str, now: float, *, exempt: bool = False
    ) -> tuple[bool, list[tuple[int, str]]]:
        """Whether to log `message` now, and the summaries of a window that ended.

        An `exempt` line is always logged, and still counted: it spends the
        window's budget like any other."""
        told = self.flush(now)
        if self._started is None:
            self._started = now
        key = log_key(message)
        seen = self._per_key.get(key, 0)
        if exempt or (seen < self.per_key and self._lines < self.total):
            self._per_key[key] = seen + 1
            self._lines += 1
            return True, told
        held = self._held.get(key)
        if held is None:
            if len(self._held) >= 1000:  # a bound on memory, whatever the keys
                key = "(other messages)"
                held = self._held.setdefault(key, _Suppressed("other messages", level))
            else:
                held = self._held[key] = _Suppressed(message, level)
        held.count += 1
        held.level = max(held.level, level)
        return False, told

    def flush(self, now: float) -> list[tuple[int, str]]:
        """Summaries of the lines held back, once their window has ended."""
        if self._started is None or now - self._started < self.window:
            return []
        told = self._summaries(f"{self.window:g} s")
        self._started = None
        self._lines = 0
        self._per_key.clear()
        return told

    def release(self, now: float) -> list[tuple[int, str]]:
        """Summaries of the lines held back so far, without waiting for the
        window to end: for a VM that went away, whose next line (which would
        have carried them) may never come. The window's counts stay, so a VM
        cannot buy more lines by ending sessions."""
        if self._started is None or not self._held:
            return []
        return self._summaries(f"{max(1, round(now - self._started))} s")

    def _summaries(self, span: str) -> list[tuple[int, str]]:
        told: list[tuple[int, str]] = []
        held = sorted(self._held.values(), key=lambda h: -h.count)
        for item in held[: self.summaries]:
            told.append((item.level, f"{item.example} ({item.count} more like this in {span})"))
        rest = sum(item.count for item in held[self.summaries :])
        if rest:
            level = max(item.level for item in held[self.summaries :])
            told.append((level, f"{rest} more log lines held back in {span}"))
        self._held.clear()
        return told
