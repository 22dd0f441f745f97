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

import collections
import dataclasses
import enum
import logging
import math
from dataclasses import dataclass, field

from qvaudio.core.actions import Log, Notify, Send
from qvaudio.core.codec import pcm_chunks
from qvaudio.core.connection import ConnectionState
from qvaudio.core.cost import TokenBucket
from qvaudio.core.dom0_grants import MicGrants
from qvaudio.core.events import (
    MAX_PAYLOAD,
    CaptureData,
    CaptureRequest,
    CaptureState,
    Cork,
    Event,
    FormatAccept,
    FormatOffer,
    FormatRefuse,
    Goodbye,
    GoodbyeCode,
    Hello,
    PlaybackData,
    PlaybackState,
    Position,
    ProtocolError,
    RemoteProtocolError,
    Role,
    StreamKind,
    StreamStatus,
    clip_reason,
)
from qvaudio.core.formats import AudioFormat
from qvaudio.core.gain import apply_gain, percent_to_gain
from qvaudio.core.policy import (
    Access,
    Decision,
    Direction,
    Policy,
    VmIdentity,
    choose_format,
    evaluate,
)
from qvaudio.core.session import Session

# --- actions ------------------------------------------------------------------


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


# --- limits -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limits:
    """How much a guest may get away with before it is cut off."""

    handshake_timeout: float = 5.0
    #: A frame begun and not finished within this long is a stalled guest.
    partial_frame_timeout: float = 5.0
    control_frames_per_second: float = 50.0
    control_burst: float = 200.0
    #: Audio is read at most this many times real time. Faster than real time
    #: lets a guest's backlog (after a host stall, say) drain; anything beyond is
    #: throttled by not reading, and a guest that gets `flood_grace` seconds of
    #: audio ahead of the clock (5 s at twice real time) is flooding.
    read_rate_factor: float = 2.0
    flood_grace: float = 5.0
    #: A guest whose microphone ring stays full this long is not reading it.
    capture_stall_timeout: float = 5.0
    position_interval: float = 0.25
    idle_position_interval: float = 1.0
    #: The least audio dom0 queues for a VM's host stream. The bound itself
    #: (`VmSession.playback_queue_limit`) is the larger of this and the jitter
    #: reserve + 2 x `trim_margin_ms` + `host_buffer_ms`, which the host takes
    #: in blocks: 80 ms at the defaults, 170 ms with the reserve at its most.
    #: Beyond it the oldest audio is dropped: late audio is worse than a skip,
    #: and memory stays bounded.
    playback_queue_ms: int = 60
    #: The host stream's buffer: audio arriving later than this after the
    #: previous audio played out means the host ran dry (an underrun).
    host_buffer_ms: int = 30
    #: Adaptive jitter buffer: audio held in dom0 on top of the host buffer.
    #: It starts at `jitter_start_ms`, grows by `jitter_step_ms` with every
    #: underrun up to `jitter_max_ms`, and shrinks by a step after each
    #: `jitter_decay_s` without one: a quiet machine keeps its low latency,
    #: a busy one trades some latency for no crackle.
    jitter_start_ms: int = 10
    jitter_step_ms: int = 10
    jitter_max_ms: int = 100
    jitter_decay_s: float = 30.0
    #: Underruns this close together are one stall, and grow the reserve once.
    jitter_same_stall_s: float = 0.25
    #: A backlog this far above the jitter target, kept for `trim_after_s`,
    #: is dropped down to the target (latency recovers after a stall).
    trim_margin_ms: int = 20
    trim_after_s: float = 0.5
    #: Every frame costs dom0 the same fixed work whatever it carries, so frames
    #: are budgeted too, not only bytes. A PCM frame carries at least 1 ms, so
    #: an honest guest sends at most 1000 a second at real time and 2000 while
    #: catching up at the read limit, plus a few control frames. Out of budget,
    #: it is not read; still pushing after `work_grace` seconds, it is cut off.
    frames_per_second: float = 2100.0
    work_grace: float = 1.0
    #: Host streams (re)opened for this VM by what it asks: format changes and
    #: microphone starts. Opening a stream costs the host server real work,
    #: and a storm of them would cost every VM's sound.
    host_opens_per_minute: float = 12.0
    #: Desktop notifications caused by this VM: the user's screen, and the
    #: global notification budget, are shared with every other VM.
    notifications_per_minute: float = 4.0
    #: PCM frames shorter than this are joined before gain and the host stream.
    coalesce_ms: int = 4
    #: After the host server refused to open a stream for this VM's format,
    #: wait this long before trying again (doubling up to `host_retry_max`).
    host_retry_first: float = 5.0
    host_retry_max: float = 60.0


@dataclass(slots=True)
class Counters:
    bytes_received: int = 0
    frames_played: int = 0
    bytes_discarded: int = 0
    capture_bytes_sent: int = 0
    capture_bytes_dropped: int = 0
    #: Audio from the guest that came after the audio before it had played out.
    underruns: int = 0
    #: Times the host stream ran dry while the VM played (what a listener hears).
    host_underruns: int = 0


@dataclass(slots=True)
class _HostView:
    """What the shell last told us about the host side."""

    played_frames: int = 0
    playback_latency_us: int = 0
    capture_latency_us: int = 0


# --- reconnecting -------------------------------------------------------------------

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


# --- the session ------------------------------------------------------------------


class MicState(enum.Enum):
    """Where one VM's microphone stands, in dom0."""

    #: The VM does not ask for it (no application of its records).
    OFF = "off"
    #: The VM asks, and it does not run: the policy, the user's grant, an agreed
    #: format or the host stands in the way (the VM was told which).
    REQUESTED = "requested"
    #: dom0 records the host microphone for the VM.
    RUNNING = "running"


class VmSession(Session):
    """Everything dom0 decides about one connected VM."""

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
        self.vm = vm
        self.limits = limits or Limits()
        self.counters = Counters()
        #: The user's microphone grants: dom0's own set, shared by every session.
        self.grants = grants if grants is not None else MicGrants()
        self.mic = MicState.OFF
        self.playback_active = False
        self._policy = policy
        self._playback = evaluate(policy, vm, Direction.PLAYBACK)
        self._capture = evaluate(policy, vm, Direction.CAPTURE)
        self._started = now
        self._partial_since: float | None = None
        #: Seconds of audio sent ahead of real time (see _count_audio).
        self._ahead = 0.0
        self._ahead_checked = now
        self._capture_stalled_since: float | None = None
        self._last_position = now
        self._host = _HostView()
        self._control = TokenBucket(
            self.limits.control_frames_per_second,
            self.limits.control_burst,
            self.limits.control_burst,
            now,
        )
        self._pcm_tokens: TokenBucket | None = None
        per_second = self.limits.frames_per_second
        self._frames = TokenBucket.full(per_second, per_second / 5, now)
        #: Seconds the guest had more waiting while out of frame budget (see note_backlog).
        self._work_pressure = 0.0
        self._work_checked = now
        per_minute = self.limits.host_opens_per_minute
        self._host_opens = TokenBucket.full(per_minute / 60, per_minute, now)
        per_minute = self.limits.notifications_per_minute
        self._notifications = TokenBucket.full(per_minute / 60, per_minute, now)
        #: The host server refused this VM's playback stream: not before this time again.
        #: Short PCM frames joined until they make `coalesce_ms` (see _play).
        self._held = bytearray()
        self._held_since = now
        self._held_after_idle = False
        self._host_retry_at: float | None = None
        self._host_retry_wait = self.limits.host_retry_first
        self._host_refused_reason = ""
        self._denial_logged: set[Direction] = set()
        #: When the host will have played all the audio sent so far (estimate).
        self._playout_end: float | None = None
        self.jitter_ms = self.limits.jitter_start_ms
        self._jitter_changed = now
        self._jitter_grown = -math.inf
        self._host_dry_seen = 0

    # -- what the shell asks ---------------------------------------------------------

    @property
    def mic_attached(self) -> bool:
        """The user attached the microphone to this VM (`qvaudio mic attach`)."""
        return self.vm.name in self.grants

    @property
    def capture_wanted(self) -> bool:
        """The VM asks for the microphone (an application of its records)."""
        return self.mic is not MicState.OFF

    @property
    def capture_running(self) -> bool:
        """dom0 records the host microphone for this VM."""
        return self.mic is MicState.RUNNING

    @property
    def playback_decision(self) -> Decision:
        return self._playback

    @property
    def capture_decision(self) -> Decision:
        return self._capture

    @property
    def playback_format(self) -> AudioFormat | None:
        return self.conn.format(StreamKind.PLAYBACK)

    @property
    def capture_format(self) -> AudioFormat | None:
        return self.conn.format(StreamKind.CAPTURE)

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

    def read_budget(self, now: float, queued_bytes: int) -> int:
        """How many bytes the shell may read from the guest right now.

        Reading less than the guest sends is how dom0 throttles: the guest's
        ring fills and it waits. Nothing here grows with what a guest sends.
        """
        if self.closed:
            return 0
        self._frames.refill(now)
        if self._frames.tokens <= 0:
            return 0  # out of work budget: nothing more is read until it refills
        if (
            self.conn.state is not ConnectionState.OPEN
            or self.conn.stream(StreamKind.PLAYBACK).pending
        ):
            # Handshake and negotiation frames are small; PCM can't come yet.
            return 4096
        fmt = self.playback_format
        if fmt is None:
            return 4096  # only control frames may come: PCM needs an agreed format
        # Paced by a token bucket, not by the host queue: the queue drops its
        # oldest audio when full, so a backlog drains and latency recovers,
        # while reading stays bounded at a multiple of real time. The same
        # bucket paces audio that is discarded (playback stopped by policy or
        # by the host): a guest may not push more of it either.
        if self._pcm_tokens is None:
            rate = fmt.bytes_per_second * self.limits.read_rate_factor
            self._pcm_tokens = TokenBucket(rate, rate / 5, rate / 5, now)
        self._pcm_tokens.refill(now)
        return max(int(self._pcm_tokens.tokens), 0)

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
        self._frames.charge(len(events), now)
        actions: list[Action] = []
        for event in events:
            if not isinstance(event, PlaybackData) and not self._control.take(1, now):
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
        self._policy = policy
        self._playback = evaluate(policy, self.vm, Direction.PLAYBACK)
        self._capture = evaluate(policy, self.vm, Direction.CAPTURE)
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

    def set_mic_attached(self, attached: bool, now: float) -> list[Action]:
        """`qvaudio mic attach|detach`: grant or revoke for attach-on-request VMs."""
        self.grants.set(self.vm.name, attached)
        if self.closed:
            return []
        return self._reconcile_capture(now, requested=False)

    def host_status(
        self, played_frames: int, playback_latency_us: int, capture_latency_us: int
    ) -> None:
        """What the host side reports; sent on to the guest in POSITION frames."""
        self._host = _HostView(played_frames, playback_latency_us, capture_latency_us)
        self.counters.frames_played = played_frames

    def host_underruns(self, count: int, now: float) -> None:
        """The running count of times the host stream (since StartPlayback) ran dry.

        Whatever the cause (a late guest, a stall in dom0 or in the host
        server), a gap was heard: the reserve grows, as for late arrivals.
        """
        if count > self._host_dry_seen:
            self.counters.host_underruns += count - self._host_dry_seen
            self._host_dry_seen = count
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

    def host_capture_failed(self, reason: str, now: float) -> list[Action]:
        """The host server refused this VM's microphone stream: capture stops, and
        the guest may ask again (within its budget of host stream opens)."""
        if self.closed or not self.capture_running:
            return []
        why = f"the host audio server refused the microphone stream: {reason}"
        return [
            *self._stop_capture_stream(why, wanted=False),
            *self._send(CaptureState(StreamStatus.STOPPED, clip_reason(why))),
            Log(logging.WARNING, f"microphone capture stopped: {why}"),
            *self._notify(f"{self.vm.name} stopped recording", why, now),
        ]

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
        actions: list[Action] = []
        if self._held and now - self._held_since >= limits.coalesce_ms / 1000:
            actions += self._release_held()  # the tail of a sound, with no cork after it
        if self._host_retry_at is not None and now >= self._host_retry_at:
            self._host_retry_at = None
            actions += self._reconcile_playback(now)
            if self.closed:
                return actions
        if (
            self.jitter_ms > limits.jitter_start_ms
            and now - self._jitter_changed > limits.jitter_decay_s
        ):
            self._adapt_jitter(now, -limits.jitter_step_ms)
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

        Out of its frame budget dom0 reads nothing more from a guest; one
        that keeps more waiting while out of budget for most of `work_grace`
        seconds costs dom0 more than any honest guest does, and is cut off.
        The time is summed (waiting turns add, others take away), so a guest
        whose backlog blinks empty between turns gains nothing by it.
        """
        elapsed = max(0.0, now - self._work_checked)
        self._work_checked = now
        if self.closed:
            return []
        self._frames.refill(now)
        if guest_has_more and self._frames.tokens <= 0:
            self._work_pressure += elapsed
        else:
            self._work_pressure = max(0.0, self._work_pressure - elapsed)
        limits = self.limits
        if self._work_pressure > limits.work_grace:
            return self._cut_off(
                GoodbyeCode.RATE_EXCEEDED,
                f"sent more than {limits.frames_per_second:g} frames a second "
                f"for over {limits.work_grace:g} s",
            )
        return []

    def _count_audio(self, nbytes: int, fmt: AudioFormat, now: float) -> list[Action]:
        """Audio beyond real time, summed: a guest `flood_grace` seconds of audio
        ahead of the clock is flooding, whatever its pace or the host's state.

        An honest guest never gets far ahead: its outbox is bounded (it drops
        its oldest audio instead), so a backlog after a stall is a fraction of
        a second. 5% of slack covers any clock drift between VM and dom0."""
        rate = fmt.bytes_per_second
        elapsed = max(0.0, now - self._ahead_checked)
        self._ahead_checked = now
        self._ahead = max(0.0, self._ahead - elapsed * rate * 1.05) + nbytes
        grace = self.limits.flood_grace
        if self._ahead > grace * rate:
            return self._cut_off(
                GoodbyeCode.RATE_EXCEEDED,
                f"sent audio faster than real time ({grace:g} s of audio ahead of the clock)",
            )
        return []

    def capture_pcm(self, pcm: bytes, room: int, now: float) -> list[Action]:
        """Microphone audio from the host, with `room` bytes free towards the guest.

        A guest that does not drain its microphone ring loses audio (never
        dom0's memory), and is cut off if it stays stalled.
        """
        if self.closed or not self.capture_running:
            return []
        fmt = self.capture_format
        if fmt is None:
            return []
        frame_overhead = 4 * (len(pcm) // MAX_PAYLOAD + 1)
        if room < len(pcm) + frame_overhead:
            self.counters.capture_bytes_dropped += len(pcm)
            if self._capture_stalled_since is None:
                self._capture_stalled_since = now
            elif now - self._capture_stalled_since > self.limits.capture_stall_timeout:
                return self._cut_off(
                    GoodbyeCode.TIMEOUT,
                    "stopped reading microphone audio for over "
                    f"{self.limits.capture_stall_timeout:g} s",
                )
            return []
        self._capture_stalled_since = None
        actions: list[Action] = []
        for chunk in pcm_chunks(pcm, fmt.frame_size):
            actions += self._send(CaptureData(chunk))
        self.counters.capture_bytes_sent += len(pcm)
        return actions

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
        return [*self._stop_streams(reason), Log(logging.INFO, f"disconnected: {reason}")]

    # -- events ----------------------------------------------------------------------

    def _handle(self, event: Event, now: float) -> list[Action]:
        match event:
            case Hello(version=version):
                return [Log(logging.INFO, f"connected (protocol version {version})")]
            case Goodbye(code=code, reason=reason):
                self._end(f"guest said goodbye ({code.name.lower()}: {reason})")
                return [
                    *self._stop_streams(self.close_reason),
                    Log(logging.INFO, self.close_reason),
                    Disconnect(GoodbyeCode.NORMAL, self.close_reason),
                ]
            case FormatOffer(stream=StreamKind.PLAYBACK, formats=formats):
                return self._negotiate_playback(formats, now)
            case FormatOffer(stream=StreamKind.CAPTURE, formats=formats):
                return self._negotiate_capture(formats, now)
            case PlaybackData(pcm=pcm):
                return self._play(pcm, now)
            case Cork(corked=corked):
                self._playout_end = None  # idle is not late
                if corked:
                    return [*self._release_held(), Log(logging.DEBUG, "corked")]
                return [Log(logging.DEBUG, "uncorked")]
            case CaptureRequest(start=start):
                return self._reconcile_capture(now, requested=True, wanted=start)
        raise AssertionError(f"guest event not handled: {event!r}")  # pragma: no cover

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

    def _negotiate_capture(self, formats: tuple[AudioFormat, ...], now: float) -> list[Action]:
        # The format is agreed on its own merits; whether audio may flow is
        # decided per request, so that a later `mic attach` needs no re-offer.
        actions: list[Action] = []
        if self.capture_running:
            actions += self._stop_capture_stream("capture format renegotiated")
        as_if_allowed = dataclasses.replace(self._capture, access=Access.ALLOW)
        fmt, why = choose_format(formats, as_if_allowed)
        if fmt is None:
            actions += self._send(FormatRefuse(StreamKind.CAPTURE, clip_reason(why)))
            actions.append(Log(logging.INFO, f"capture format refused: {why}"))
            return actions
        actions += self._send(FormatAccept(StreamKind.CAPTURE, fmt))
        return actions + self._reconcile_capture(now, requested=False)

    def _play(self, pcm: bytes, now: float) -> list[Action]:
        fmt = self.playback_format
        if self._pcm_tokens is not None:
            self._pcm_tokens.charge(len(pcm), now)
        if fmt is not None:
            flooding = self._count_audio(len(pcm), fmt, now)
            if flooding:
                return flooding
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

    # -- reconciling state with policy ---------------------------------------------------

    def _grow_jitter(self, now: float) -> None:
        # One stall is often seen twice, as a late arrival and as the host
        # running dry a moment later: it earns one step, not two.
        if now - self._jitter_grown < self.limits.jitter_same_stall_s:
            return
        self._jitter_grown = now
        self._adapt_jitter(now, +self.limits.jitter_step_ms)

    def _adapt_jitter(self, now: float, step_ms: int) -> None:
        limits = self.limits
        self.jitter_ms = min(
            max(self.jitter_ms + step_ms, limits.jitter_start_ms), limits.jitter_max_ms
        )
        self._jitter_changed = now

    def _start_playback(self, fmt: AudioFormat, now: float) -> list[Action]:
        if not self._host_opens.take(1, now):
            return self._too_many_host_opens()
        settings = self._playback.settings
        cap, default = settings.volume_max.value, settings.volume_default.value
        # The mixer's scale is cubic in amplitude for the stream and for the
        # cap alike, so the two multiply as percents: slider x cap = default.
        initial = 1.0 if cap == 0 else min(1.0, default / cap)
        self.playback_active = True
        self._pcm_tokens = None
        self._playout_end = None
        self._host_dry_seen = 0
        return [StartPlayback(fmt, initial)]

    def _too_many_host_opens(self) -> list[Action]:
        per_minute = self.limits.host_opens_per_minute
        return self._cut_off(
            GoodbyeCode.RATE_EXCEEDED,
            f"made dom0 open host streams more than {per_minute:g} times a minute "
            "(format or microphone changes)",
        )

    def _host_refusal(self, now: float) -> str | None:
        """Why playback waits for the host (it refused the stream), if it still does."""
        if self._host_retry_at is None or now >= self._host_retry_at:
            return None
        return self._host_refused_reason

    def _stop_playback(self, reason: str) -> list[Action]:
        self._held.clear()
        if not self.playback_active:
            return []
        self.playback_active = False
        return [StopPlayback(reason)]

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

    def _capture_allowed(self) -> tuple[bool, str]:
        access = self._capture.access
        if access is Access.ALLOW:
            return True, self._capture.reason
        if access is Access.ATTACH_ON_REQUEST:
            if self.mic_attached:
                return True, "microphone attached by the user"
            return False, f"microphone not attached (run: qvaudio mic attach {self.vm.name})"
        return False, self._capture.reason

    def _reconcile_capture(
        self, now: float, *, requested: bool, wanted: bool | None = None
    ) -> list[Action]:
        """Start or stop the microphone as the VM asks (`wanted`, a new request, or
        its standing one) and as the policy and the user's grant allow."""
        running = self.mic is MicState.RUNNING
        if wanted is None:
            wanted = self.mic is not MicState.OFF
        if not running:
            self.mic = MicState.REQUESTED if wanted else MicState.OFF
        allowed, why = self._capture_allowed()
        fmt = self.capture_format
        name = self.vm.name
        if running and not (wanted and allowed and fmt):
            status = StreamStatus.STOPPED if not wanted else StreamStatus.DENIED
            reason = "the VM stopped recording" if not wanted else why
            return [
                *self._stop_capture_stream(reason, wanted=wanted),
                *self._send(CaptureState(status, clip_reason(reason))),
                Log(logging.INFO, f"microphone capture stopped: {reason}"),
                *self._notify(f"{name} stopped recording", reason, now),
            ]
        if not running and wanted and allowed and fmt is not None:
            if not self._host_opens.take(1, now):
                return self._too_many_host_opens()
            self.mic = MicState.RUNNING
            return [
                StartCapture(fmt),
                *self._send(CaptureState(StreamStatus.RUNNING)),
                Log(logging.INFO, f"microphone capture started ({why})"),
                *self._notify(f"{name} is recording from the microphone", why, now),
            ]
        if requested and wanted and not running:
            if fmt is None:
                why = "no capture format agreed"
            return [
                *self._send(CaptureState(StreamStatus.DENIED, clip_reason(why))),
                Log(logging.WARNING, f"microphone request refused: {why}"),
                *self._notify(f"{name} was refused the microphone", why, now),
            ]
        if requested and not wanted and not running:
            return [*self._send(CaptureState(StreamStatus.STOPPED))]
        return []

    def _notify(self, summary: str, body: str, now: float) -> list[Action]:
        # Notifications are the user's attention, shared by every VM: one VM
        # gets a few a minute, and the log keeps every event anyway.
        if not self._notifications.take(1, now):
            return []
        return [Notify(summary, body)]

    def _stop_capture_stream(self, reason: str, *, wanted: bool = True) -> list[Action]:
        """Stop the host microphone stream; the VM still asks for it unless not `wanted`."""
        if self.mic is not MicState.RUNNING:
            return []
        self.mic = MicState.REQUESTED if wanted else MicState.OFF
        self._capture_stalled_since = None
        return [StopCapture(reason)]

    def _stop_streams(self, reason: str) -> list[Action]:
        return [*self._stop_playback(reason), *self._stop_capture_stream(reason)]

    def _log_denial(self, direction: Direction, message: str) -> list[Action]:
        # Logged once per policy snapshot, so that a guest re-offering in a
        # loop cannot flood the journal.
        if direction in self._denial_logged:
            return []
        self._denial_logged.add(direction)
        return [Log(logging.WARNING, message)]

    def _cut_off(
        self, code: GoodbyeCode, reason: str, exc: ProtocolError | None = None
    ) -> list[Action]:
        actions: list[Action] = [
            Log(logging.WARNING, f"cut off: {reason}"),
            *self._stop_streams(reason),
        ]
        goodbye = (
            self.conn.goodbye_for(exc)
            if exc is not None
            else self.conn.send(Goodbye(code, clip_reason(reason)))
        )
        actions += [Send(goodbye), Disconnect(code, reason)]
        self._end(reason)
        return actions

    def _received_frames(self) -> int:
        fmt = self.playback_format
        return self.counters.bytes_received // fmt.frame_size if fmt else 0

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


__all__ = [
    "Action",
    "Backoff",
    "Disconnect",
    "Limits",
    "Log",
    "Notify",
    "Play",
    "Send",
    "StartCapture",
    "StartPlayback",
    "StopCapture",
    "StopPlayback",
    "VmSession",
]
