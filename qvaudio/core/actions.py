"""Actions both sessions (dom0's and the guest's) hand to their I/O shells. No I/O."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Send:
    """Bytes for the peer, over the transport."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Log:
    level: int
    message: str


@dataclass(frozen=True, slots=True)
class Notify:
    """A desktop notification, where a notification service runs."""

    summary: str
    body: str
