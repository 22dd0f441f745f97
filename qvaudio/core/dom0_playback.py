"""dom0's playback side of one VM: format, host stream, pacing, the jitter reserve. No I/O.

Part of `VmSession` (see `dom0_session`). It agrees a playback format within
the policy, opens and closes the VM's host stream (and waits out a host that
refuses it), applies the volume cap to every sample, joins short frames,
and sizes the reserve the host stream keeps: 10 ms on a quiet machine, a
step more after each gap from late audio (audio arriving after the audio
before it played out, or the host running dry with none of it waiting in
dom0) but the first after a quiet while, a step less after each quiet 2
minutes.
"""

from __future__ import annotations

import logging

from qvaudio.core.actions import Log
from qvaudio.core.dom0_actions import Action, Play, StartPlayback, StopPlayback
from qvaudio.core.dom0_base import VmSessionBase
from qvaudio.core.events import (
    FormatAccept,
    FormatRefuse,
    GoodbyeCode,
    PlaybackState,
    StreamKind,
    StreamStatus,
    clip_reason,
)
from qvaudio.core.formats import AudioFormat
from qvaudio.core.gain import apply_gain, percent_to_gain
from qvaudio.core.playout_queue import JitterReserve, ReserveLimits
from qvaudio.core.policy import Direction, choose_format


class PlaybackSide(VmSessionBase):
    """What dom0 decides about one VM's playback."""

    def _init_playback(self, now: float) -> None:
        """The playback side's state (`VmSession.__init__` calls it)."""
        self.playback_active = False
        #: Short PCM frames joined until they make `coalesce_ms` (see _play).
        self._held = bytearray()
        self._held_since = now
        self._held_after_idle = False
        #: The host server refused this VM's playback stream: not before this time again.
        self._host_retry_at: float | None = None
        self._host_retry_wait = self.limits.host_retry_first
        self._host_refused_reason = ""
        self._denial_logged: set[Direction] = set()
        #: When the host will have played all the audio sent so far (estimate).
        self._playout_end: float | None = None
        limits = self.limits
        self._reserve = JitterReserve(
            ReserveLimits(
                start_ms=limits.jitter_start_ms,
                step_ms=limits.jitter_step_ms,
                max_ms=limits.jitter_max_ms,
                decay_s=limits.jitter_decay_s,
                same_stall_s=limits.jitter_same_stall_s,
                max_decay_s=limits.jitter_max_decay_s,
                gaps_to_grow=limits.jitter_gaps_to_grow,
            ),
            now,
        )
        # The host stream's running counts as last reported (new with each stream).
        self._host_dry_seen = 0
        self._host_stalls_seen = 0

    # -- what the shell asks ---------------------------------------------------------

    @property
    def jitter_ms(self) -> int:
        """The jitter reserve: audio kept before the host stream (re)starts."""
        return self._reserve.ms

    @jitter_ms.setter
    def jitter_ms(self, ms: int) -> None:
        self._reserve.ms = ms

    @property
    def jitter_decay_s(self) -> float:
        """The quiet wait before the reserve shrinks (longer after early gaps)."""
        return self._reserve.decay_s

    @property
    def gain(self) -> float:
        return percent_to_gain(self._playback.settings.volume_max.value)

    def playback_queue_limit(self) -> int:
        """Bytes of capped audio the shell may queue for the host stream at most."""
        fmt = self.playback_format
        if fmt is None:
            return 0
        # The host takes audio in blocks up to its own buffer (PulseAudio's
        # minreq), so the queue must hold that much on top of the reserve.
        limits = self.limits
        cap_ms = max(
            limits.playback_queue_ms,
            self.jitter_ms + 2 * limits.trim_margin_ms + limits.host_buffer_ms,
        )
        return max(fmt.bytes_for_ms(cap_ms), fmt.frame_size)

    def playback_hold(self) -> int:
        """Bytes the shell keeps in reserve before (re)starting the host stream."""
        fmt = self.playback_format
        return fmt.bytes_for_ms(self.jitter_ms) if fmt is not None else 0

    def playback_trim(self) -> int:
        """A queue above this many bytes for `trim_after_s` is trimmed to the hold."""
        fmt = self.playback_format
        if fmt is None:
            return 0
        limits = self.limits
        return fmt.bytes_for_ms(self.jitter_ms + limits.trim_margin_ms + limits.host_buffer_ms)

    # -- what the host side reports ----------------------------------------------------

    def host_underruns(self, count: int, stalls: int, now: float) -> None:
        """The running counts of times the host stream (since StartPlayback) ran dry,
        and of those, the stalls: the VM's audio was waiting in dom0's queue.

        Every gap is counted (a listener heard it), but only a gap from late
        audio grows the reserve: in a stall dom0's writer or the host server
        was late, a larger reserve in dom0's queue would not have reached the
        server any sooner, and growing it would only move the delay.
        """
        late_before = self._host_dry_seen - self._host_stalls_seen
        if count > self._host_dry_seen:
            self.counters.host_underruns += count - self._host_dry_seen
            self._host_dry_seen = count
        if stalls > self._host_stalls_seen:
            self.counters.host_stalls += stalls - self._host_stalls_seen
            self._host_stalls_seen = stalls
        if count - stalls > late_before:
            self._grow_jitter(now)

    def host_playback_failed(self, reason: str, now: float) -> list[Action]:
        """The host server refused to open this VM's playback stream (not merely
        unreachable: that the shell retries by itself).

        The guest is told to stop sending audio nobody can hear, and the
        stream is tried again after a wait that doubles while it keeps failing,
        so a format the host will not take costs one attempt a minute, not one
        a frame."""
        if self.closed or not self.playback_active:
            return []
        wait = self._host_retry_wait
        self._host_retry_at = now + wait
        self._host_retry_wait = min(wait * 2, self.limits.host_retry_max)
        why = self._host_refused_reason = f"the host audio server refused the stream: {reason}"
        return [
            *self._stop_playback(why),
            *self._send(PlaybackState(StreamStatus.STOPPED, clip_reason(why))),
            Log(logging.WARNING, f"playback stopped: {why}; trying again in {wait:g} s"),
        ]

    def host_playback_opened(self) -> None:
        """The host stream opened: a later refusal starts its wait from the beginning."""
        self._host_retry_wait = self.limits.host_retry_first

    # -- deciding -----------------------------------------------------------------------

    def _negotiate_playback(self, formats: tuple[AudioFormat, ...], now: float) -> list[Action]:
        fmt, why = choose_format(formats, self._playback)
        if fmt is None:
            actions: list[Action] = self._stop_playback("format renegotiated")
            actions += self._send(FormatRefuse(StreamKind.PLAYBACK, clip_reason(why)))
            actions += self._log_denial(Direction.PLAYBACK, f"playback refused: {why}")
            return actions
        if self.playback_active and fmt == self.playback_format:
            # The same format again: the host stream it plays on stays as it is.
            return [*self._send(FormatAccept(StreamKind.PLAYBACK, fmt))]
        actions = self._stop_playback("format renegotiated")
        actions += self._send(FormatAccept(StreamKind.PLAYBACK, fmt))
        actions.append(Log(logging.INFO, f"playback format {fmt} ({self._playback.reason})"))
        refusal = self._host_refusal(now)
        if refusal is not None:
            # Agreed, but not to be played yet: the guest waits for PLAYBACK_STATE.
            return actions + self._send(PlaybackState(StreamStatus.STOPPED, clip_reason(refusal)))
        return actions + self._start_playback(fmt, now)

    def _reconcile_playback(self, now: float) -> list[Action]:
        fmt = self.playback_format
        if fmt is None:
            return []
        allowed_fmt, why = choose_format((fmt,), self._playback)
        if self.playback_active and allowed_fmt is None:
            return [
                *self._stop_playback(why),
                *self._send(PlaybackState(StreamStatus.DENIED, clip_reason(why))),
                *self._log_denial(Direction.PLAYBACK, f"playback stopped: {why}"),
            ]
        if not self.playback_active and allowed_fmt is not None and self._host_refusal(now) is None:
            return [
                *self._send(PlaybackState(StreamStatus.RUNNING)),
                Log(logging.INFO, f"playback allowed again ({self._playback.reason})"),
                *self._start_playback(fmt, now),
            ]
        return []

    def _log_denial(self, direction: Direction, message: str) -> list[Action]:
        # Logged once per policy snapshot, so that a guest re-offering in a
        # loop cannot flood the journal.
        if direction in self._denial_logged:
            return []
        self._denial_logged.add(direction)
        return [Log(logging.WARNING, message)]

    def _host_refusal(self, now: float) -> str | None:
        """Why playback waits for the host (it refused the stream), if it still does."""
        if self._host_retry_at is None or now >= self._host_retry_at:
            return None
        return self._host_refused_reason

    def _start_playback(self, fmt: AudioFormat, now: float) -> list[Action]:
        if not self._meter.host_open(now):
            return self._too_many_host_opens()
        settings = self._playback.settings
        cap, default = settings.volume_max.value, settings.volume_default.value
        # The mixer's scale is cubic in amplitude for the stream and for the
        # cap alike, so the two multiply as percents: slider x cap = default.
        initial = 1.0 if cap == 0 else min(1.0, default / cap)
        self.playback_active = True
        self._meter.new_audio_format()
        self._playout_end = None
        self._host_dry_seen = self._host_stalls_seen = 0
        return [StartPlayback(fmt, initial)]

    def _stop_playback(self, reason: str) -> list[Action]:
        self._held.clear()
        if not self.playback_active:
            return []
        self.playback_active = False
        return [StopPlayback(reason)]

    # -- the audio ---------------------------------------------------------------------

    def _play(self, pcm: bytes, now: float) -> list[Action]:
        fmt = self.playback_format
        flooding = self._meter.audio(len(pcm), fmt, now)
        if flooding is not None:
            return self._cut_off(GoodbyeCode.RATE_EXCEEDED, flooding)
        if not self.playback_active or fmt is None:
            self.counters.bytes_discarded += len(pcm)
            return []
        self.counters.bytes_received += len(pcm)
        # Underruns: audio that comes after the audio before it has played out,
        # with the host's buffer as slack. An estimate from arrival times: the
        # host's own clock is not visible through the PulseAudio protocol.
        # Half the host buffer: PulseAudio refills its buffer in blocks, so a
        # stream often holds well under its nominal length between refills.
        slack = (self.limits.host_buffer_ms / 2 + self.jitter_ms) / 1000
        if self._playout_end is not None and now > self._playout_end + slack:
            self.counters.underruns += 1
            self._grow_jitter(now)
        if self._playout_end is None:
            self._held_after_idle = True
        start = now if self._playout_end is None else max(self._playout_end, now)
        self._playout_end = start + len(pcm) / fmt.bytes_per_second
        # Short frames are joined before the gain and the host stream see
        # them: each Play costs the same work whatever it carries. Guests send
        # whole periods of 10 ms, which pass at once.
        if not self._held and len(pcm) >= fmt.bytes_for_ms(self.limits.coalesce_ms):
            return self._played(pcm, fmt)
        if not self._held:
            self._held_since = now
        self._held += pcm
        if len(self._held) < fmt.bytes_for_ms(self.limits.coalesce_ms):
            return []
        return self._release_held()

    def _played(self, pcm: bytes, fmt: AudioFormat) -> list[Action]:
        after_idle, self._held_after_idle = self._held_after_idle, False
        return [Play(apply_gain(pcm, fmt, self.gain), after_idle)]

    def _release_held(self) -> list[Action]:
        """Play what short frames left waiting (at a cork, or when it has waited long)."""
        fmt = self.playback_format
        if not self._held or fmt is None or not self.playback_active:
            self._held.clear()
            return []
        pcm = bytes(self._held)
        self._held.clear()
        return self._played(pcm, fmt)

    def _corked(self, corked: bool) -> list[Action]:
        """The guest corked (nothing plays) or uncorked."""
        self._playout_end = None  # idle is not late
        if corked:
            return [*self._release_held(), Log(logging.DEBUG, "corked")]
        return [Log(logging.DEBUG, "uncorked")]

    def _tick_playback(self, now: float) -> list[Action]:
        """Time passed: held audio, a host refusal's wait, the reserve's decay."""
        limits = self.limits
        actions: list[Action] = []
        if self._held and now - self._held_since >= limits.coalesce_ms / 1000:
            actions += self._release_held()  # the tail of a sound, with no cork after it
        if self._host_retry_at is not None and now >= self._host_retry_at:
            self._host_retry_at = None
            actions += self._reconcile_playback(now)
            if self.closed:
                return actions
        self._reserve.tick(now)
        return actions

    def _grow_jitter(self, now: float) -> None:
        # One stall is often seen twice, as a late arrival and as the host
        # running dry a moment later: the reserve counts it once.
        self._reserve.gap(now)
