"""dom0's logic for one VM's connection. No I/O, no clock: time is an argument.

`VmSession` is driven by bytes from the guest, the current policy snapshot,
microphone attach/detach and the passing of time; it answers with actions
(`Send`, `StartPlayback`, `Play`, `StartCapture`, `Log`, `Disconnect`, ...)
that the dom0 agent's I/O shell carries out. Everything about enforcement
lives here so it can be tested byte by byte:

- the VM's identity is what the shell gives (`VmIdentity` from XenStore or
  the transport); nothing the guest sends is consulted for it;
- playback and capture follow the policy, re-checked on every policy change
  and every microphone attach/detach;
- the volume cap is applied to the samples before they are handed on;
- a guest that breaks the protocol, never finishes its handshake, dribbles a
  frame forever, sends control frames in a flood, pushes audio faster than
  real time for long, or stops reading its microphone ring is cut off with a
  logged reason, and only it.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from qvaudio.core.actions import Log
from qvaudio.core.connection import ConnectionState
from qvaudio.core.dom0_actions import Action, Disconnect
from qvaudio.core.dom0_capture import CaptureSide
from qvaudio.core.dom0_grants import MicGrants
from qvaudio.core.dom0_limits import Limits
from qvaudio.core.dom0_playback import PlaybackSide
from qvaudio.core.events import (
    CaptureRequest,
    Cork,
    Event,
    FormatOffer,
    Goodbye,
    GoodbyeCode,
    Hello,
    PlaybackData,
    Position,
    RemoteProtocolError,
    Role,
    StreamKind,
    clip_reason,
)
from qvaudio.core.policy import Policy, VmIdentity


@dataclass(slots=True)
class _HostView:
    """What the shell last told us about the host side."""

    played_frames: int = 0
    playback_latency_us: int = 0
    capture_latency_us: int = 0


class VmSession(PlaybackSide, CaptureSide):
    """Everything dom0 decides about one connected VM.

    Its two sides decide apart (`PlaybackSide`, `CaptureSide`); the session
    itself reads the guest's bytes, watches the time (handshake, stalled
    frames, position reports) and ends the connection.
    """

    def __init__(
        self,
        vm: VmIdentity,
        policy: Policy,
        now: float,
        *,
        grants: MicGrants | None = None,
        limits: Limits | None = None,
    ) -> None:
        super().__init__(Role.DOM0)
        self._init_vm(vm, policy, now, grants, limits)
        self._init_playback(now)
        self._init_capture()
        self._started = now
        self._partial_since: float | None = None
        self._last_position = now
        self._host = _HostView()

    # -- what the shell asks ---------------------------------------------------------

    def read_budget(self, now: float, queued_bytes: int) -> int:
        """How many bytes the shell may read from the guest right now (`GuestMeter`)."""
        if self.closed:
            return 0
        negotiating = (
            self.conn.state is not ConnectionState.OPEN
            or self.conn.stream(StreamKind.PLAYBACK).pending
        )
        # Until a format is agreed (and while a new one is), PCM cannot come.
        return self._meter.read_budget(now, None if negotiating else self.playback_format)

    # -- inputs ------------------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        """The transport is up: greet the guest."""
        return [*self._send(Hello())]

    def receive(self, data: bytes, now: float) -> list[Action]:
        """Bytes read from the guest."""
        if self.closed:
            return []
        try:
            events = self.conn.receive_data(data)
        except RemoteProtocolError as exc:
            return self._cut_off(exc.code, f"protocol error: {exc}", exc)
        # A frame left half-sent is a stall only if no frame completes for a
        # while: a streaming guest often leaves a partial frame at a read boundary.
        if not self.conn.buffered:
            self._partial_since = None
        elif events or self._partial_since is None:
            self._partial_since = now
        self._meter.frames(len(events), now)
        actions: list[Action] = []
        for event in events:
            if not isinstance(event, PlaybackData) and not self._meter.control_frame(now):
                rate = self.limits.control_frames_per_second
                return actions + self._cut_off(
                    GoodbyeCode.RATE_EXCEEDED,
                    f"more than {rate:g} control frames per second",
                )
            handled = self._handle(event, now)
            actions += handled
            if any(isinstance(action, Disconnect) for action in handled):
                break  # this event ended the connection: the rest is not looked at
        return actions

    def update_policy(self, policy: Policy, now: float) -> list[Action]:
        """A new policy snapshot took effect: re-decide both directions."""
        if self.closed:
            return []
        old_playback = self._playback
        self._decide(policy)
        self._denial_logged.clear()
        actions: list[Action] = []
        if self.grants.revoke_if_denied(self._capture):
            actions.append(Log(logging.INFO, "microphone detached: the policy now denies it"))
        if old_playback.settings.volume_max != self._playback.settings.volume_max:
            actions.append(
                Log(
                    logging.INFO,
                    f"volume cap now {self._playback.settings.volume_max.value}% "
                    f"({self._playback.settings.volume_max.source})",
                )
            )
        actions += self._reconcile_playback(now)
        actions += self._reconcile_capture(now, requested=False)
        return actions

    def reidentify(self, vm: VmIdentity, policy: Policy, now: float) -> list[Action]:
        """dom0 learnt new things about this VM (its tags, say): decide again."""
        self.vm = vm
        return self.update_policy(policy, now)

    def host_status(
        self, played_frames: int, playback_latency_us: int, capture_latency_us: int
    ) -> None:
        """What the host side reports; sent on to the guest in POSITION frames."""
        self._host = _HostView(played_frames, playback_latency_us, capture_latency_us)
        self.counters.frames_played = played_frames

    def host_capture_status(self, capture_latency_us: int) -> None:
        """The host microphone's latency alone, while the VM plays nothing."""
        self._host.capture_latency_us = capture_latency_us

    def tick(self, now: float) -> list[Action]:
        """Time passed: timeouts and position reports."""
        if self.closed:
            return []
        limits = self.limits
        if self.conn.state is ConnectionState.HANDSHAKE and now - self._started > (
            limits.handshake_timeout
        ):
            return self._cut_off(
                GoodbyeCode.TIMEOUT, f"no hello within {limits.handshake_timeout:g} s"
            )
        if self._partial_since is not None and now - self._partial_since > (
            limits.partial_frame_timeout
        ):
            return self._cut_off(
                GoodbyeCode.TIMEOUT,
                f"frame left incomplete for over {limits.partial_frame_timeout:g} s",
            )
        if self.conn.state is not ConnectionState.OPEN:
            return []
        actions = self._tick_playback(now)
        if self.closed:
            return actions
        interval = (
            limits.position_interval
            if self.playback_active and not self.conn.corked
            else limits.idle_position_interval
        )
        if now - self._last_position < interval:
            return actions
        self._last_position = now
        report = Position(
            received_frames=self._received_frames(),
            played_frames=min(self._host.played_frames, 2**64 - 1),
            playback_latency_us=min(self._host.playback_latency_us, 2**32 - 1),
            capture_latency_us=min(self._host.capture_latency_us, 2**32 - 1),
        )
        return actions + self._send(report)

    def note_backlog(self, now: float, guest_has_more: bool) -> list[Action]:
        """After a turn's read: whether the guest still had data we did not take.

        A guest that keeps more waiting while out of its frame budget costs
        dom0 more than any honest guest does, and is cut off (`GuestMeter.backlog`).
        """
        if self.closed:
            return []
        too_much = self._meter.backlog(now, guest_has_more)
        if too_much is not None:
            return self._cut_off(GoodbyeCode.RATE_EXCEEDED, too_much)
        return []

    def shutdown(self, reason: str) -> list[Action]:
        """dom0 is stopping (or the VM went away): part politely."""
        if self.closed:
            return []
        actions = self._stop_streams(reason)
        actions += self._send(Goodbye(GoodbyeCode.SHUTDOWN, clip_reason(reason)))
        actions.append(Disconnect(GoodbyeCode.SHUTDOWN, reason))
        self._end(reason)
        return actions

    def transport_lost(self, reason: str) -> list[Action]:
        """The transport closed under us: tidy up without sending anything."""
        if self.closed:
            return []
        self._end(reason)
        return [
            *self._stop_streams(reason),
            Log(logging.INFO, f"disconnected: {reason}", once_per_session=True),
        ]

    # -- events ----------------------------------------------------------------------

    def _handle(self, event: Event, now: float) -> list[Action]:
        match event:
            case Hello(version=version):
                return [
                    Log(
                        logging.INFO,
                        f"connected (protocol version {version})",
                        once_per_session=True,
                    )
                ]
            case Goodbye(code=code, reason=reason):
                self._end(f"guest said goodbye ({code.name.lower()}: {reason})")
                return [
                    *self._stop_streams(self.close_reason),
                    Log(logging.INFO, self.close_reason, once_per_session=True),
                    Disconnect(GoodbyeCode.NORMAL, self.close_reason),
                ]
            case FormatOffer(stream=StreamKind.PLAYBACK, formats=formats):
                return self._negotiate_playback(formats, now)
            case FormatOffer(stream=StreamKind.CAPTURE, formats=formats):
                return self._negotiate_capture(formats, now)
            case PlaybackData(pcm=pcm):
                return self._play(pcm, now)
            case Cork(corked=corked):
                return self._corked(corked)
            case CaptureRequest(start=start):
                return self._reconcile_capture(now, requested=True, wanted=start)
        raise AssertionError(f"guest event not handled: {event!r}")  # pragma: no cover

    def _stop_streams(self, reason: str) -> list[Action]:
        return [*self._stop_playback(reason), *self._stop_capture_stream(reason)]

    def _received_frames(self) -> int:
        """Every frame taken from the transport, played or not: the guest counts
        what it sent minus this as in flight, and audio discarded here (playback
        not yet started, or stopped) is not on its way any more."""
        fmt = self.playback_format
        taken = self.counters.bytes_received + self.counters.bytes_discarded
        return taken // fmt.frame_size if fmt else 0

    def status(self) -> dict[str, object]:
        """A snapshot for `qvaudio status`."""
        pfmt, cfmt = self.playback_format, self.capture_format
        return {
            "state": "closed" if self.closed else self.conn.state.value,
            "playback": {
                "decision": str(self._playback.access),
                "rule": self._playback.reason,
                "active": self.playback_active,
                "format": str(pfmt) if pfmt else None,
                "volume_default": self._playback.settings.volume_default.value,
                "volume_max": self._playback.settings.volume_max.value,
                # Set while playback waits out a refusal by the host server.
                "host_refused": self._host_refused_reason if self._host_retry_at else None,
                "jitter_buffer_ms": self.jitter_ms,
                # How long the reserve must go without a gap before it shrinks.
                "jitter_decay_s": self.jitter_decay_s,
                "corked": self.conn.corked,
                "latency_us": self._host.playback_latency_us,
            },
            "capture": {
                "decision": str(self._capture.access),
                "rule": self._capture.reason,
                "mic_attached": self.mic_attached,
                "requested": self.capture_wanted,
                "running": self.capture_running,
                "format": str(cfmt) if cfmt else None,
                "latency_us": self._host.capture_latency_us,
            },
            "counters": dataclasses.asdict(self.counters),
            "close_reason": self.close_reason or None,
        }
