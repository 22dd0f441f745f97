"""The guest agent's blocking PCM work, one thread per stream, and how threads reach the loop.

A stream's reads and writes block (`qvaudio.pulse.pcm`), so each stream gets
a thread: `MonitorReader` records the virtual output's monitor and posts each
period to the main loop;
`MicWriter` plays dom0's microphone audio into the virtual microphone
(its backing sink, or on PipeWire its node). Threads never touch the loop's state: they `post` to a
`Mailbox`, which wakes the loop's selector through a pipe.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Final

from qvaudio.core.formats import AudioFormat
from qvaudio.core.playout_queue import JitterReserve, PlayoutQueue, ReserveLimits
from qvaudio.guest.devices import restart_sink_clock
from qvaudio.pulse.feed import PlaybackStream, feed
from qvaudio.pulse.pcm import PcmStream, PulseError
from qvaudio.pulse.pipewire_node import NodeFeed, PipeWireError, SourceNode

log = logging.getLogger(__name__)

APP_NAME: Final = "qvaudio-guest"
#: A (re)started microphone stream's queue is measured for drift after this long.
SETTLE_S: Final = 1.0
#: A passive monitor's read blocked this long spanned a stop of PipeWire's graph.
PAUSED_AFTER_S: Final = 0.1
#: The virtual microphone's reserve starts at this and moves by it (it is
#: never less than the chunk dom0 sends, whatever its size: a chunk comes whole).
MIC_RESERVE_STEP_MS: Final = 5
MIC_RESERVE_MAX_MS: Final = 40
#: A step of reserve goes after this long without a gap; a gap soon after
#: a step down doubles the wait, up to MIC_RESERVE_MAX_DECAY_S.
MIC_RESERVE_DECAY_S: Final = 120.0
MIC_RESERVE_MAX_DECAY_S: Final = 480.0
#: Gaps this close together are one stall: one more step, not two.
MIC_SAME_STALL_S: Final = 0.25
#: A gap alone after a quiet while grows nothing; the second in a row does.
MIC_RESERVE_GAPS_TO_GROW: Final = 2
#: The virtual microphone stream's buffer in the VM's audio server.
MIC_SERVER_BUFFER_MS: Final = 20
#: A queue this far over the reserve for a while is a backlog.
MIC_TRIM_MARGIN_MS: Final = 10
#: Microphone audio after a pause this long starts a new flow (dom0 started capturing).
MIC_PAUSE_S: Final = 0.5
#: How often the microphone's node is asked how much of its buffer was never needed.
MIC_SLACK_WINDOW_S: Final = 1.0
#: Gaps in a flow's first this long do not grow the reserve.
MIC_STARTUP_S: Final = 0.5


class Mailbox:
    """Messages from worker threads to the main loop; `fileno` turns readable on arrival."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def fileno(self) -> int:
        return self._read_fd

    @property
    def wakeup_fd(self) -> int:
        """For `signal.set_wakeup_fd`: a signal wakes the loop like a message does."""
        return self._write_fd

    def post(self, message: object) -> None:
        self._queue.put(message)
        # A full pipe holds wake-ups enough: the loop will come.
        with contextlib.suppress(BlockingIOError):
            os.write(self._write_fd, b"\0")

    def drain(self) -> list[object]:
        """Everything posted so far; call when `fileno` is readable."""
        try:
            while os.read(self._read_fd, 4096):
                pass
        except BlockingIOError:
            pass
        messages = []
        while True:
            try:
                messages.append(self._queue.get_nowait())
            except queue.Empty:
                return messages

    def close(self) -> None:
        os.close(self._read_fd)
        os.close(self._write_fd)


@dataclass(frozen=True, slots=True)
class MonitorAudio:
    reader: MonitorReader
    pcm: bytes


@dataclass(frozen=True, slots=True)
class MonitorFailed:
    reader: MonitorReader
    reason: str


class MonitorReader:
    """Records the monitor of the virtual output `sink` in `fmt`, one period per message.

    An idle monitor delivers nothing at all (on PulseAudio the sink is
    suspended; on PipeWire a `passive` stream is paused with the graph, see
    `qvaudio.core.guest_session.IdleMethod`) and the thread sleeps in C until an
    application plays.
    """

    def __init__(
        self,
        mailbox: Mailbox,
        server: str | None,
        sink: str,
        fmt: AudioFormat,
        period_ms: int,
        passive: bool = False,
    ) -> None:
        self.format = fmt
        self.passive = passive
        self._mailbox = mailbox
        self._server = server
        self._sink = sink
        self._period_bytes = fmt.bytes_for_ms(period_ms)
        #: Set by the loop while dom0 is told nothing plays: silence is then
        #: dropped here, since `GuestSession.audio` ignores silence while
        #: corked, and an idle VM should not wake the loop 100 times a second.
        self.drop_silence = False
        self._stop = threading.Event()
        self._stream: PcmStream | None = None
        self._thread = threading.Thread(target=self._run, name="monitor-reader", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the thread: its stream closes now, even while a read waits on an idle monitor."""
        if self._stop.is_set():
            return
        self._stop.set()
        stream = self._stream
        if stream is not None:
            stream.close()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _open(self) -> PcmStream:
        def record(name: str, props: dict[str, str]) -> PcmStream:
            # The fragment size bounds the latency the server adds: it hands
            # over audio once a period is recorded, not when its buffer is full.
            return PcmStream.record(
                self._server,
                f"{self._sink}.monitor",
                self.format,
                APP_NAME,
                name,
                self._period_bytes,
                props={"application.id": "org.qvaudio.guest", **props},
            )

        ours = {"media.role": "production"}
        if not self.passive:
            return record("dom0 speakers", ours)
        # PipeWire answers the opening of a passive stream only once the
        # graph runs, which on an idle sink is at the next sound, long after
        # the opening's time limit. A short ordinary stream runs the graph
        # while the passive one opens.
        with record("dom0 speakers (opening)", {}):
            return record("dom0 speakers", {**ours, "node.passive": "true"})

    def latency_us(self) -> int | None:
        """How old the oldest recorded byte not yet read is; None without a stream."""
        stream = self._stream
        if stream is None or self._stop.is_set():
            return None
        try:
            return stream.latency_us()
        except (PulseError, ValueError):
            return None

    def _run(self) -> None:
        try:
            stream = self._open()
        except PulseError as exc:
            self._mailbox.post(MonitorFailed(self, str(exc)))
            return
        self._stream = stream
        if self._stop.is_set():  # stopped while it opened: stop() saw no stream
            stream.close()
        restart_sink_clock(self._server, self._sink)
        try:
            while not self._stop.is_set():
                began = time.monotonic()
                pcm = stream.read(self._period_bytes)
                if self.passive and time.monotonic() - began > PAUSED_AFTER_S:
                    # The graph stopped while this period was part read:
                    # its start is the end of the last sound, held since.
                    log.debug("dropped a period that spans an idle pause")
                    continue
                if self.drop_silence and pcm.count(0) == len(pcm):
                    continue
                if not self._stop.is_set():
                    self._mailbox.post(MonitorAudio(self, pcm))
        except PulseError as exc:
            if not self._stop.is_set():
                self._mailbox.post(MonitorFailed(self, str(exc)))
        finally:
            self._stream = None
            stream.close()


class MicWriter:
    """Plays microphone PCM from dom0 into the virtual microphone: its backing sink, or
    on PipeWire the microphone's own node (`node`), fed like a playback stream.

    As little is kept queued as plays without a gap: one chunk when dom0's
    chunks come on time, 5 ms more after each gap heard because audio came
    late (the first after a quiet while, a gap as capture starts, or a stall
    with audio waiting, excepted)
    and 5 ms less after a quiet while (`MIC_RESERVE_*`), because a call
    needs the microphone early more than it needs it whole. Audio that piled
    up while the stream ran dry, or a backlog that stays, goes, and after a
    gap the delay is put back where it was (`qvaudio.core.playout_queue`);
    the stream's rate follows the host microphone's clock. When nothing
    comes (dom0 refused, or has not answered yet), nothing is written and
    recording applications read the null sink's silence.
    """

    def __init__(
        self,
        server: str | None,
        sink: str,
        fmt: AudioFormat,
        max_queue_ms: int = 200,
        node: SourceNode | None = None,
    ) -> None:
        self.format = fmt
        self._server = server
        self._sink = sink
        self._node = node
        #: What the stream held after the last write, in microseconds.
        self._stream_latency_us = 0
        self._stream: PlaybackStream | None = None
        self._prebuf = fmt.bytes_for_ms(MIC_RESERVE_STEP_MS)
        self._max_bytes = fmt.bytes_for_ms(max_queue_ms)
        self._cond = threading.Condition()
        self._stopping = False
        now = time.monotonic()
        self.reserve = JitterReserve(
            ReserveLimits(
                start_ms=MIC_RESERVE_STEP_MS,
                step_ms=MIC_RESERVE_STEP_MS,
                max_ms=MIC_RESERVE_MAX_MS,
                decay_s=MIC_RESERVE_DECAY_S,
                same_stall_s=MIC_SAME_STALL_S,
                max_decay_s=MIC_RESERVE_MAX_DECAY_S,
                gaps_to_grow=MIC_RESERVE_GAPS_TO_GROW,
            ),
            now,
        )
        self._playout = PlayoutQueue(
            fmt.rate,
            fmt.frame_size,
            judge_after=self._prebuf,
            settle_s=SETTLE_S,
        )
        self._gaps_seen = 0
        self._slack_asked = time.monotonic()
        self._last_put = -math.inf
        self._flowing_since = -math.inf
        self._thread = threading.Thread(target=self._run, name="mic-writer", daemon=True)
        self._thread.start()

    def status(self) -> dict[str, int]:
        """For the status file: the reserve, gaps heard (of them, stalls: audio was
        waiting), chunks dropped as late, times the delay was lowered to the need."""
        with self._cond:
            return {
                "reserve_ms": self.reserve.ms,
                "underruns": self._playout.underruns,
                "stalls": self._playout.stalls,
                "late_drops": self._playout.late_drops,
                "lowered": self._playout.lowerings,
            }

    def latency_us(self) -> int:
        """How long audio put now waits before an application can read it: the queue
        and the stream's buffer (a node's asked now: right after a write, as the
        stream's own figure is kept, its buffer is at its fullest)."""
        with self._cond:
            queued = self._playout.queued + self._playout.writing
        stream = self._stream
        held = stream.latency_us() if isinstance(stream, NodeFeed) else self._stream_latency_us
        return self.format.duration_us(queued) + held

    def put(self, pcm: bytes) -> None:
        usable = len(pcm) - len(pcm) % self.format.frame_size
        if not usable:
            return
        now = time.monotonic()
        with self._cond:
            if now - self._last_put > MIC_PAUSE_S:
                self._flowing_since = now
            self._last_put = now
            # Only gaps from late audio: a stall of this thread or of the VM's
            # server leaves audio waiting here, where a reserve cannot help.
            gaps = self._playout.late_gaps
            if gaps != self._gaps_seen:
                self._gaps_seen = gaps
                # A host record stream delivers unevenly as it starts: a gap
                # then is not the jitter the reserve is for, and growing it
                # would keep that latency for the whole call.
                if now - self._flowing_since > MIC_STARTUP_S:
                    self.reserve.gap(now)
            else:
                self.reserve.tick(now)
            hold = self.format.bytes_for_ms(self.reserve.ms)
            self._playout.put(
                pcm[:usable],
                now,
                limit=self._max_bytes,
                hold=hold,
                # A backlog (the VM's server stalled while dom0 sent on) is
                # cut back to the reserve: late microphone audio is worse than
                # missing audio.
                trim=hold + self.format.bytes_for_ms(MIC_TRIM_MARGIN_MS),
            )
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._playout.clear()
            self._cond.notify()
        stream = self._stream
        if isinstance(stream, NodeFeed):
            # A write waiting for room in the node's buffer ends now.
            stream.close()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self._stream = stream = self._open()
        except (PulseError, PipeWireError) as exc:
            log.warning("cannot feed the virtual microphone: %s", exc)
            return
        if self._node is None:
            restart_sink_clock(self._server, self._sink)

        def after_write(latency_us: int, _ran_dry: bool) -> None:
            self._stream_latency_us = latency_us
            if isinstance(stream, NodeFeed):
                self._lower_to_need(stream)

        try:
            feed(stream, self._playout, self._cond, lambda: self._stopping,
                 "virtual microphone", after_write)  # fmt: skip
        except (PulseError, PipeWireError) as exc:
            # The audio server went away; the watcher reports that and the
            # agent starts a new writer once the devices are back. (Or `stop`
            # closed a node's feed under a waiting write: nothing to report.)
            log.log(logging.DEBUG if self._stopping else logging.WARNING,
                    "microphone feed stopped: %s", exc)  # fmt: skip
        finally:
            stream.close()

    def _lower_to_need(self, stream: NodeFeed) -> None:
        """Once a second: what the node never needed beyond the reserve goes.

        The level a stream settles at is wherever it started (a burst as dom0's
        capture starts, a start a chunk over the node's threshold) and the rate
        matcher holds it there: on PipeWire, 5-10 ms more than the graph ever
        took (bench/capture_bench.py). The node knows the least it held at a
        cycle; keeping the reserve of that, the rest is latency for nothing."""
        now = time.monotonic()
        if now - self._slack_asked < MIC_SLACK_WINDOW_S:
            return
        self._slack_asked = now
        slack_us = stream.slack_us()
        if slack_us is None:
            return
        with self._cond:
            excess_s = slack_us / 1e6 - self.reserve.ms / 1000
            if self._playout.lower(excess_s, now):
                log.debug("virtual microphone: %.1f ms the node never needed went", excess_s * 1e3)

    def _open(self) -> PlaybackStream:
        # The agent keeps this stream open while dom0 is connected, not
        # just while an application records: an open, underrun stream
        # costs nothing and keeps the null sink's period short, so the
        # first microphone audio plays at once (see restart_sink_clock).
        # Small: a backlog beyond it waits in the queue, where it is cut,
        # not in the server, where it would stay as latency. The null sink
        # also takes its audio in blocks that grow with this buffer: at 40
        # ms and more it ran the stream dry several times a second
        # (bench/capture_bench.py). The queue keeps the reserve; the
        # stream starts at its first chunk.
        buffer_bytes = self.format.bytes_for_ms(MIC_SERVER_BUFFER_MS)
        if self._node is not None:
            return self._node.feed(buffer_bytes, self._prebuf)
        return PcmStream.playback(
            self._server,
            self._sink,
            self.format,
            APP_NAME,
            "dom0 microphone",
            tlength_bytes=buffer_bytes,
            prebuf_bytes=self._prebuf,
            props={"application.id": "org.qvaudio.guest"},
            variable_rate=True,
        )
