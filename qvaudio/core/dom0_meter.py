"""What one VM's guest costs dom0, metered per VM. No I/O, no clock: time is an argument.

A guest may be compromised, and even protocol-valid traffic costs dom0 work:
frames (whatever they carry), audio beyond real time, control frames, host
stream opens, notifications. `GuestMeter` counts each with the token
buckets of `cost` and says when the guest is out of budget; `VmSession`
decides what follows (not reading, or cutting it off).
"""

from __future__ import annotations

from qvaudio.core.cost import TokenBucket
from qvaudio.core.dom0_limits import Limits
from qvaudio.core.formats import AudioFormat

#: What a turn may read while only control frames may come (handshake, negotiation).
CONTROL_READ = 4096


class GuestMeter:
    """Everything one guest may still cost dom0 now, from the `Limits`."""

    def __init__(self, limits: Limits, now: float) -> None:
        self.limits = limits
        self._control = TokenBucket(
            limits.control_frames_per_second, limits.control_burst, limits.control_burst, now
        )
        #: Audio read at most `read_rate_factor` x real time; made for the agreed format.
        self._pcm: TokenBucket | None = None
        per_second = limits.frames_per_second
        self._frames = TokenBucket.full(per_second, per_second / 5, now)
        #: Seconds the guest had more waiting while out of frame budget (see `backlog`).
        self._work_pressure = 0.0
        self._work_checked = now
        #: Seconds of audio sent ahead of real time (see `audio`).
        self._ahead = 0.0
        self._ahead_checked = now
        per_minute = limits.host_opens_per_minute
        self._host_opens = TokenBucket.full(per_minute / 60, per_minute, now)
        per_minute = limits.notifications_per_minute
        self._notifications = TokenBucket.full(per_minute / 60, per_minute, now)

    def read_budget(self, now: float, audio: AudioFormat | None) -> int:
        """How many bytes dom0 may read from the guest now; `audio` None while
        only control frames may come (PCM needs an agreed format).

        Reading less than the guest sends is how dom0 throttles: the guest's
        ring fills and it waits. Nothing here grows with what a guest sends.
        """
        self._frames.refill(now)
        if self._frames.tokens <= 0:
            return 0  # out of work budget: nothing more is read until it refills
        if audio is None:
            return CONTROL_READ  # handshake and negotiation frames are small
        # Paced by a token bucket, not by the host queue: the queue drops its
        # oldest audio when full, so a backlog drains and latency recovers,
        # while reading stays bounded at a multiple of real time. The same
        # bucket paces audio that is discarded (playback stopped by policy or
        # by the host): a guest may not push more of it either.
        if self._pcm is None:
            rate = audio.bytes_per_second * self.limits.read_rate_factor
            self._pcm = TokenBucket(rate, rate / 5, rate / 5, now)
        self._pcm.refill(now)
        return max(int(self._pcm.tokens), 0)

    def new_audio_format(self) -> None:
        """Playback (re)starts, perhaps in a new format: pace audio afresh."""
        self._pcm = None

    def frames(self, count: int, now: float) -> None:
        """`count` frames were decoded: work already done, charged whatever they carry."""
        self._frames.charge(count, now)

    def control_frame(self, now: float) -> bool:
        """A control frame came: False when the guest sends them faster than allowed."""
        return self._control.take(1, now)

    def audio(self, nbytes: int, fmt: AudioFormat | None, now: float) -> str | None:
        """Audio came; why the guest is flooding, if it is.

        Audio beyond real time is summed: a guest `flood_grace` seconds of
        audio ahead of the clock is flooding, whatever its pace or the host's
        state. An honest guest never gets far ahead: its outbox is bounded (it
        drops its oldest audio instead), so a backlog after a stall is a
        fraction of a second. 5% of slack covers any clock drift between VM
        and dom0.
        """
        if self._pcm is not None:
            self._pcm.charge(nbytes, now)
        if fmt is None:
            return None
        rate = fmt.bytes_per_second
        elapsed = max(0.0, now - self._ahead_checked)
        self._ahead_checked = now
        self._ahead = max(0.0, self._ahead - elapsed * rate * 1.05) + nbytes
        grace = self.limits.flood_grace
        if self._ahead > grace * rate:
            return f"sent audio faster than real time ({grace:g} s of audio ahead of the clock)"
        return None

    def backlog(self, now: float, guest_has_more: bool) -> str | None:
        """After a turn's read: why the guest costs too much work, if it does.

        Out of its frame budget dom0 reads nothing more from a guest; one
        that keeps more waiting while out of budget for most of `work_grace`
        seconds costs dom0 more than any honest guest does. The time is
        summed (waiting turns add, others take away), so a guest whose
        backlog blinks empty between turns gains nothing by it.
        """
        elapsed = max(0.0, now - self._work_checked)
        self._work_checked = now
        self._frames.refill(now)
        if guest_has_more and self._frames.tokens <= 0:
            self._work_pressure += elapsed
        else:
            self._work_pressure = max(0.0, self._work_pressure - elapsed)
        limits = self.limits
        if self._work_pressure > limits.work_grace:
            return (
                f"sent more than {limits.frames_per_second:g} frames a second "
                f"for over {limits.work_grace:g} s"
            )
        return None

    def host_open(self, now: float) -> bool:
        """dom0 is to open a host stream for the guest: False when it asked too often."""
        return self._host_opens.take(1, now)

    def notification(self, now: float) -> bool:
        """Notifications are the user's attention, shared by every VM: one VM
        gets a few a minute, and the log keeps every event anyway."""
        return self._notifications.take(1, now)
