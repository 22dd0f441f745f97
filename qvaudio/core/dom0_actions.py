"""What dom0's session of one VM asks its shell to do. No I/O.

Besides the `Send`, `Log` and `Notify` both sessions use: open, feed and
close the VM's host streams, and close the transport.
"""

from __future__ import annotations

from dataclasses import dataclass

from qvaudio.core.actions import Log, Notify, Send
from qvaudio.core.events import GoodbyeCode
from qvaudio.core.formats import AudioFormat

__all__ = [
    "Action",
    "Disconnect",
    "Log",
    "Notify",
    "Play",
    "Send",
    "StartCapture",
    "StartPlayback",
    "StopCapture",
    "StopPlayback",
]


@dataclass(frozen=True, slots=True)
class StartPlayback:
    """Open the VM's stream on the host audio server.

    `initial_volume` is the stream's starting mixer volume as pulsectl takes
    it (the mixer's percent / 100). Both policy volumes are the mixer's
    percent: the cap is already in the samples, so the stream starts at
    default / max of its own range and sounds as loud as any application at
    the mixer's `default` (docs/policy.md).
    """

    format: AudioFormat
    initial_volume: float


@dataclass(frozen=True, slots=True)
class StopPlayback:
    reason: str


@dataclass(frozen=True, slots=True)
class Play:
    """PCM for the VM's host stream, already capped. `after_idle`: the first
    audio after the guest was idle (or the stream started), so a host that
    ran dry before it paused rather than underran."""

    pcm: bytes
    after_idle: bool = False


@dataclass(frozen=True, slots=True)
class StartCapture:
    """Open a record stream on the host microphone for this VM."""

    format: AudioFormat


@dataclass(frozen=True, slots=True)
class StopCapture:
    reason: str


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Close the transport. Any goodbye was already sent as a `Send` before it."""

    code: GoodbyeCode
    reason: str


Action = (
    Send
    | StartPlayback
    | StopPlayback
    | Play
    | StartCapture
    | StopCapture
    | Log
    | Notify
    | Disconnect
)
