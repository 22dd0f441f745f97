"""When dom0 may next connect to a VM. No I/O, no clock: time is an argument."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from qvaudio.core.events import GoodbyeCode

#: A session that lasted this long was healthy: reconnect quickly after it.
HEALTHY_SESSION = 10.0
#: Sessions shorter than this count towards "reconnecting in a loop".
SHORT_SESSION = 1.0
LOOP_WINDOW = 30.0
LOOP_SESSIONS = 10


#: First wait after an attempt found nobody listening; doubles up to RETRY_MAX.
RETRY_FIRST = 0.25
RETRY_MAX = 5.0
#: First wait after a cut-off or a reconnect loop; doubles up to PENALTY_MAX.
PENALTY_FIRST = 5.0
PENALTY_MAX = 60.0


@dataclass
class Backoff:
    """When dom0 may next connect to a VM. Pure: time is an argument.

    Two waits, kept apart. Attempts that find nobody listening (the guest
    agent still starting) wait 0.25 s, doubling to 5 s; any connection that
    works resets that, so the waits of one restart never carry over into the
    next. A guest that was cut off, or whose sessions keep ending within a
    second (ten in thirty seconds: reconnecting in a loop), waits at least
    5 s, doubling to a minute until it has a healthy session; reconnecting
    gains it nothing but a longer wait, and costs dom0 next to nothing. A
    guest whose session simply ended (agent restarted, VM resumed) is
    reconnected at once.
    """

    next_attempt: float = 0.0
    retry_delay: float = RETRY_FIRST
    penalty: float = 0.0
    epoch: object = None
    misbehaved: bool = False
    short_sessions: collections.deque[float] = field(default_factory=collections.deque)

    @property
    def looping(self) -> bool:
        return len(self.short_sessions) >= LOOP_SESSIONS

    def failed(self, now: float) -> None:
        """A connection attempt failed (nobody listening yet)."""
        self.next_attempt = now + self.retry_delay
        self.retry_delay = min(self.retry_delay * 2, RETRY_MAX)

    def published(self, epoch: object) -> None:
        """The guest's endpoint as discovery sees it now: published afresh (a new
        epoch, e.g. its agent restarted) means try at once, unless it misbehaved."""
        if epoch == self.epoch:
            return
        self.epoch = epoch
        if not self.misbehaved:
            self.next_attempt = 0.0

    def connected(self) -> None:
        """A connection attempt worked: the guest listens again."""
        self.retry_delay = RETRY_FIRST

    def ended(self, now: float, lasted: float, code: GoodbyeCode | None) -> None:
        """A session ended after `lasted` seconds; `code` if dom0 cut it off."""
        if lasted < SHORT_SESSION:
            self.short_sessions.append(now)
        while self.short_sessions and now - self.short_sessions[0] > LOOP_WINDOW:
            self.short_sessions.popleft()
        cut_off = code not in (None, GoodbyeCode.NORMAL, GoodbyeCode.SHUTDOWN)
        self.misbehaved = cut_off or self.looping
        if self.misbehaved:
            self.penalty = min(max(PENALTY_FIRST, self.penalty * 2), PENALTY_MAX)
            self.next_attempt = now + self.penalty
            return
        if lasted > HEALTHY_SESSION:
            self.penalty = 0.0
        self.next_attempt = now + 0.1
