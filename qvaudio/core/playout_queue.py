"""The queue in front of a stream that plays audio made on another clock. No I/O, no clock.

Two streams play audio that arrives from elsewhere, in bursts, on a clock
that is not the player's: dom0's host stream for each VM (the VM's audio
into the host's speakers) and the guest's virtual microphone (the host's
microphone into the VM). Both need the same decisions, and they are made
here, as pure code driven by bytes and times the shell passes in:

* how much to keep in reserve before a stream (re)starts, against late
  arrivals (`JitterReserve`: a step more after each gap heard, but the
  first after a quiet while, a step less after a quiet while);
* what a gap heard means: audio that piled up while the stream ran dry is
  late and goes, keeping the reserve; a stream that was paused (nothing to
  play for a while) restarts without counting a gap; and whose the gap was:
  the audio's (it came late: a larger reserve cures that) or the player's
  (audio was waiting, the writer or the server was late: a reserve in this
  queue cannot help, so it is a `stall` and the reserve is left alone);
* where the delay goes after a gap: back where it was. The first second's
  mean after a restart is compared with the delay before, and the
  difference is skipped from the audio to come, or padded with silence,
  once: an echo canceller hears a dropout, not a new delay;
* when a queue that stays above the reserve is a backlog to cut (after a
  stall, say), so latency returns instead of keeping every stall for ever;
* the rate to play at, so that clock drift never becomes latency or a gap
  (`qvaudio.core.playout.RateMatcher`, fed the queue after every write and
  aimed where the stream settled plus the reserve's moves).

The shell owns the stream, the thread and the lock: it `put`s what arrives,
`take`s what to write (None: wait, at most `wait_s`), reports the server's
underflow events (`ran_dry`) and, after each write, the server's latency (`written`),
and applies the rate that returns.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass

from qvaudio.core.playout import RateMatcher


@dataclass(frozen=True, slots=True)
class ReserveLimits:
    start_ms: int
    step_ms: int
    max_ms: int
    #: After this long without a gap, the reserve shrinks by a step.
    decay_s: float
    #: Gaps closer together than this are one stall seen twice (a late
    #: arrival, then the stream running dry a moment later): one step.
    same_stall_s: float
    #: The longest the quiet wait before a step down may grow to (see
    #: `JitterReserve`); equal to `decay_s`, the wait never grows.
    max_decay_s: float = 0.0
    #: Gaps it takes for a step more, each within the quiet wait of the one
    #: before: above 1, a gap alone after a quiet while grows nothing.
    gaps_to_grow: int = 1


class JitterReserve:
    """How much audio to keep queued against late arrivals, in ms.

    A step down that a gap follows sooner than the wait that allowed it was
    too early: what the machine does every minute or so (a periodic job, a
    host block that falls unluckily) is not a one-off stall. Then the wait
    before the next step down doubles, up to `max_decay_s`, so a machine
    that keeps needing the larger reserve keeps it, and its latency holds
    still instead of stepping down and back up with a gap each time (what an
    echo canceller hears as a moving delay). A full wait at the starting
    reserve without a gap halves the wait again.

    With `gaps_to_grow` 2, one gap after a quiet while is forgiven: a
    machine that stalls once every few minutes would otherwise carry a
    larger reserve for minutes after each stall and step down again, the
    delay moving twice for every gap (the queue puts the delay back after
    a gap, so a forgiven one leaves it where it was). A second gap within
    the quiet wait grows it, so jitter that recurs costs one gap more.
    """

    def __init__(self, limits: ReserveLimits, now: float) -> None:
        if (
            not 0 <= limits.start_ms <= limits.max_ms
            or limits.step_ms <= 0
            or limits.gaps_to_grow < 1
        ):
            raise ValueError(f"reserve limits do not make sense: {limits}")
        self.limits = limits
        self.ms = limits.start_ms
        #: The quiet wait before the next step down, now.
        self.decay_s = limits.decay_s
        self._longest_decay_s = max(limits.decay_s, limits.max_decay_s)
        self._changed = now
        self._last_gap = -math.inf
        #: Gaps in a row, each within the quiet wait of the one before.
        self._gaps_in_row = 0
        self._shrunk = -math.inf

    def gap(self, now: float) -> bool:
        """A gap was heard (or audio came too late): one step more, unless it is the
        first after a quiet while and `gaps_to_grow` forgives it; True if it grew."""
        if now - self._last_gap < self.limits.same_stall_s:
            return False
        if now - self._last_gap > self.decay_s:
            self._gaps_in_row = 0
        self._last_gap = now
        self._gaps_in_row += 1
        if self._gaps_in_row < self.limits.gaps_to_grow:
            self._changed = now  # not a quiet while: no step down for a while
            return False
        if now - self._shrunk < self.decay_s:
            self.decay_s = min(self.decay_s * 2, self._longest_decay_s)
        return self._step(now, +self.limits.step_ms)

    def tick(self, now: float) -> bool:
        """Time passed: after `decay_s` without a gap, one step less; True if it shrank."""
        limits = self.limits
        if now - self._changed <= self.decay_s:
            return False
        if self.ms > limits.start_ms:
            self._shrunk = now
            return self._step(now, -limits.step_ms)
        if self.decay_s > limits.decay_s:
            self.decay_s = max(self.decay_s / 2, limits.decay_s)
            self._changed = now
        return False

    def _step(self, now: float, step_ms: int) -> bool:
        limits = self.limits
        before = self.ms
        self.ms = min(max(self.ms + step_ms, limits.start_ms), limits.max_ms)
        self._changed = now
        return self.ms != before


class PlayoutQueue:
    """Audio waiting for a stream; what to write, what to drop, and how fast to play.

    `bytes_per_s` and `frame_size` describe the audio; `judge_after` is the
    bytes a (re)started stream must be given before it plays at all (its
    buffer or prebuffer): a stream running dry before then was not heard.
    `coalesce` joins chunks shorter than it to the one before (fewer,
    larger writes). `stall_margin_s`: audio that waited at least this long
    when the stream ran dry makes the gap a stall (the writer's wake-up and
    write take about a millisecond). `realign_s`: after a restart, a delay
    further than this from the one before is put back. `pause_s`: a
    stream dry this long before audio came was paused, not starved.
    `settle_s`: a (re)started stream's queue is not measured for drift
    until this long after (prebuffering, the server's first requests).
    `prime_timeout_s`: the longest a (re)start waits for the reserve; then
    what there is plays. `trim_after_s`: how long a queue may stay above
    the `trim` mark before it is cut to the reserve.
    """

    def __init__(
        self,
        rate: int,
        frame_size: int,
        *,
        judge_after: int,
        coalesce: int = 0,
        pause_s: float = 0.5,
        settle_s: float = 1.0,
        prime_timeout_s: float = 0.5,
        trim_after_s: float = 0.5,
        stall_margin_s: float = 0.002,
        realign_s: float = 0.001,
        drift_ppm: float | None = None,
    ) -> None:
        self.bytes_per_s = rate * frame_size
        self.frame_size = frame_size
        self.matcher = RateMatcher(rate, drift_ppm=drift_ppm)
        self._judge_after = judge_after
        self._coalesce = coalesce
        self._pause_s = pause_s
        self._settle_s = settle_s
        self._prime_timeout_s = prime_timeout_s
        self.trim_after_s = trim_after_s
        self._stall_margin_s = stall_margin_s
        self._realign_s = realign_s
        self._chunks: collections.deque[bytes] = collections.deque()
        self.queued = 0
        #: The reserve kept before the stream (re)starts, in bytes (set with every `put`).
        self.hold = 0
        #: Bytes handed out to be written, ever.
        self.taken = 0
        #: The chunk handed out and not yet reported `written`: it waits in the
        #: shell's write (a full stream blocks it), in neither queue nor stream.
        self.writing = 0
        #: Chunks dropped: over the limit, a backlog cut, or late after a gap.
        self.late_drops = 0
        #: Gaps heard: the stream ran dry mid-stream, not after a pause.
        self.underruns = 0
        #: Of those, the gaps with audio waiting here: the writer or the server was late.
        self.stalls = 0
        #: Times the delay was put back where it was after a restart.
        self.realigns = 0
        #: Times the delay was lowered because the stream held more than it needed.
        self.lowerings = 0
        #: When audio became available to write (True) or ran out (False), oldest
        #: first: whose a gap was is judged after the fact, from the gap's time.
        self._availability: collections.deque[tuple[float, bool]] = collections.deque(maxlen=64)
        #: Bytes of arriving audio still to skip to bring the delay back.
        self._skip = 0
        self._realign = False
        self._after_idle = False
        self._over_since: float | None = None
        self._trimmed = False
        self._priming = True
        self._prime_deadline: float | None = None
        self._restarting = False
        self._judged_from = judge_after
        self._dry_at: float | None = None
        #: How long the stream had been dry when the last gap's audio came.
        self.last_gap_dry_s = 0.0
        self._measure_from = math.inf
        self._base_s: float | None = None

    @property
    def late_gaps(self) -> int:
        """Gaps heard because the audio came late: what a larger reserve cures."""
        return self.underruns - self.stalls

    # -- what arrives ------------------------------------------------------------------

    def put(
        self,
        pcm: bytes,
        now: float,
        *,
        limit: int,
        hold: int = 0,
        trim: int | None = None,
        after_idle: bool = False,
    ) -> None:
        """Queue `pcm`. `limit`: never more than this queued, the oldest goes first.
        `hold`: the reserve. `trim`: a queue above this for `trim_after_s` is cut
        back to `hold`. `after_idle`: the first audio after the source was idle,
        so the stream running dry before it was a pause, not a gap."""
        self._after_idle = self._after_idle or after_idle
        self.hold = hold
        if self._skip:
            cut = min(self._skip, len(pcm))
            self._skip -= cut
            pcm = pcm[cut:]
            if not pcm:
                return
        if not self.queued + self.writing:
            self._availability.append((now, True))
        if self._chunks and len(self._chunks[-1]) < self._coalesce:
            self._chunks[-1] += pcm
        else:
            self._chunks.append(pcm)
        self.queued += len(pcm)
        self._drop_above(limit)
        if trim is None or self.queued <= trim:
            self._over_since = None
        elif self._over_since is None:
            self._over_since = now
        elif now - self._over_since > self.trim_after_s:
            self._drop_above(hold)
            self._over_since = None
            self._trimmed = True
            self._realign = self._base_s is not None

    def clear(self) -> None:
        """Forget what is queued (the stream is gone, or stopping)."""
        self._chunks.clear()
        self.queued = 0
        self.writing = 0
        self._availability.clear()
        self._skip = 0

    # -- what the shell writes -----------------------------------------------------------

    def stream_started(self) -> None:
        """A new stream was opened: it starts from the reserve, unjudged."""
        self._priming = True
        self._prime_deadline = None
        self._restarting = False
        self._dry_at = None
        self._judged_from = self.taken + self._judge_after
        self._skip = 0

    def ran_dry(self, at: float) -> None:
        """The server reported that the stream ran out of audio at `at`.

        Judged when audio comes next (`take`): how long it stayed dry tells
        a gap from a pause."""
        self._dry_at = at

    def take(self, now: float) -> bytes | None:
        """The next chunk to write, or None: nothing yet (wait, at most `wait_s`)."""
        if not self._chunks:
            return None
        if self._dry_at is not None:
            dry_at, self._dry_at = self._dry_at, None
            dry_for_s = now - dry_at
            heard = self.taken >= self._judged_from and dry_for_s < self._pause_s
            # Only a gap heard mid-stream makes what queued meanwhile late.
            self._restarting = heard and not self._after_idle
            if self._restarting:
                self.underruns += 1
                self.last_gap_dry_s = dry_for_s
                if self._audio_waited(dry_at):
                    self.stalls += 1
            self._priming = True  # ran dry: start again with a reserve
            self._prime_deadline = None
            self._judged_from = self.taken + self._judge_after
        self._after_idle = False
        if self._priming:
            if self._prime_deadline is None:
                self._prime_deadline = now + self._prime_timeout_s
            if self.queued < self.hold and now < self._prime_deadline:
                return None
            self._priming = False
            self._prime_deadline = None
            self._skip = 0
            if self._restarting:
                # Played in full, what piled up while the stream ran dry would
                # stay in the latency for as long as audio flows. Keep the
                # reserve, newest audio last.
                self._drop_above(self.hold + len(self._chunks[-1]))
            self.matcher.reset()
            self._measure_from = now + self._settle_s
            if not self._restarting:
                # A new stream, or one back from a pause: its delay starts afresh.
                self._base_s = None
            self._realign = self._base_s is not None
        self._restarting = False
        if self._trimmed:
            self._trimmed = False
            self.matcher.reset()
        chunk = self._chunks.popleft()
        self.queued -= len(chunk)
        self.taken += len(chunk)
        self.writing = len(chunk)
        return chunk

    def wait_s(self, now: float) -> float | None:
        """How long the shell may wait before calling `take` again if nothing arrives."""
        if self._priming and self._prime_deadline is not None:
            return max(0.0, self._prime_deadline - now)
        return None

    def written(self, now: float, server_s: float) -> int | None:
        """A chunk was written; the server holds `server_s` of audio. The new rate, or None.

        The target is where the stream settled when it (re)started (the
        server's share plus the reserve then), moving with the reserve, so
        a reserve grown by a stall is not kept as latency for ever."""
        self.writing = 0
        if not self.queued:
            self._availability.append((now, False))
        queue_s = self.queued / self.bytes_per_s + server_s
        if now < self._measure_from:
            return None
        hold_s = self.hold / self.bytes_per_s
        # Anchored on the matcher's first whole window, a mean: one measurement
        # falls anywhere on the write sawtooth and a burst's edge, and the queue
        # was then steered to wherever it fell (seen: 8 ms below where the
        # stream had settled, glided to over 40 s; an echo canceller's delay).
        target = None if self._base_s is None else self._base_s + hold_s
        rate = self.matcher.update(now, queue_s, target)
        anchor = self.matcher.anchor_s
        if anchor is not None:
            if self._base_s is None:
                self._base_s = anchor - hold_s
            elif self._realign:
                self._realign = False
                self._put_back(anchor - (self._base_s + hold_s), now)
        return rate

    def _audio_waited(self, at: float) -> bool:
        """Whether audio was here to write from `stall_margin_s` before `at` until `at`.

        Then the stream ran dry at `at` because the writer or the server was
        late (a scheduling stall), not the audio; audio that came within the
        margin was late by that much and the gap is the audio's."""
        since = at - self._stall_margin_s
        available = False
        for when, became in self._availability:
            if when <= since:
                available = became
            elif when <= at and not became:
                return False
        return available

    def _put_back(self, excess_s: float, now: float) -> None:
        """Bring a restarted stream's delay back to the one before: skip `excess_s`
        of the audio to come (what is queued first), or pad with silence."""
        frames = round(excess_s * self.bytes_per_s / self.frame_size)
        if abs(excess_s) <= self._realign_s or not frames:
            return
        nbytes = abs(frames) * self.frame_size
        self.realigns += 1
        self.matcher.reset()
        if frames < 0:
            if not self.queued + self.writing:
                self._availability.append((now, True))
            # Zero bytes are silence in every format carried (s16, s32, f32).
            self._chunks.appendleft(bytes(nbytes))
            self.queued += nbytes
            return
        self._skip_ahead(nbytes, now)

    def lower(self, excess_s: float, now: float) -> bool:
        """The stream held `excess_s` more than it ever needed, beyond the reserve (a
        shell that can tell: a PipeWire node knows the least it held at a cycle).
        Skip that much of the audio to come and keep the delay that much lower.
        True if it did: not before the delay is anchored, nor for a millisecond."""
        frames = int(excess_s * self.bytes_per_s) // self.frame_size
        if self._base_s is None or excess_s <= self._realign_s or not frames:
            return False
        self._base_s -= frames * self.frame_size / self.bytes_per_s
        self.lowerings += 1
        self.matcher.reset()
        self._skip_ahead(frames * self.frame_size, now)
        return True

    def _skip_ahead(self, nbytes: int, now: float) -> None:
        """Drop `nbytes` of the oldest audio queued, and of what comes next if too few are."""
        while nbytes and self._chunks:
            head = self._chunks[0]
            cut = min(nbytes, len(head))
            if cut == len(head):
                self._chunks.popleft()
            else:
                self._chunks[0] = head[cut:]
            self.queued -= cut
            nbytes -= cut
        self._skip = nbytes
        if not self.queued + self.writing:
            self._availability.append((now, False))

    def _drop_above(self, size: int) -> None:
        while self.queued > size and len(self._chunks) > 1:
            dropped = self._chunks.popleft()
            self.queued -= len(dropped)
            self.late_drops += 1
