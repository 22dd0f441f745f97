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
    #: A line a session says at most once (connected, disconnected, cut off).
    #: The reconnect backoff bounds how often those come, so the per-VM log
    #: limit never holds one back: a VM's last word is the line users look for.
    once_per_session: bool = False


@dataclass(frozen=True, slots=True)
class Notify:
    """A desktop notification, where a notification service runs."""

    summary: str
    body: str
