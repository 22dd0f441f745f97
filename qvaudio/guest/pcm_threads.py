"""The guest agent's blocking PCM work, one thread per stream, and how threads reach the loop.

A stream's reads and writes block (`qvaudio.pulse.pcm`), so each stream gets
a thread: `MonitorReader` records the virtual output's monitor and posts each
period to the main loop;
`MicWriter` plays dom0's microphone audio into the virtual microphone's
backing sink. Threads never touch the loop's state: they `post` to a
`Mailbox`, which wakes the loop's selector through a pipe.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Final

from qvaudio.core.formats import AudioFormat
from qvaudio.core.playout import RateMatcher
from qvaudio.guest.devices import restart_sink_clock
from qvaudio.pulse.pcm import PcmStream, PulseError

log = logging.getLogger(__name__)

APP_NAME: Final = "qvaudio-guest"
#: A (re)started microphone stream's queue is measured for drift after this long.
SETTLE_S: Final = 1.0
#: A passive monitor's read blocked this long spanned a stop of PipeWire's graph.
PAUSED_AFTER_S: Final = 0.1


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
    """Plays microphone PCM from dom0 into the virtual microphone's backing sink.

    Audio waits in a queue bounded to `max_queue_ms`; beyond it the oldest is
    dropped, because late microphone audio is worse than missing audio. When
    nothing comes (dom0 refused, or has not answered yet), nothing is written
    and recording applications read the null sink's silence.
    """

    def __init__(
        self,
        server: str | None,
        sink: str,
        fmt: AudioFormat,
        period_ms: int,
        max_queue_ms: int = 200,
    ) -> None:
        self.format = fmt
        self.dropped_bytes = 0
        self._server = server
        self._sink = sink
        self._period_ms = period_ms
        self._max_bytes = fmt.bytes_for_ms(max_queue_ms)
        self._chunks: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._cond = threading.Condition()
        self._stopping = False
        #: The virtual microphone's rate, following the host microphone's clock.
        self._matcher = RateMatcher(fmt.rate)
        self._underflows = 0
        self._measure_from = time.monotonic() + SETTLE_S
        self._thread = threading.Thread(target=self._run, name="mic-writer", daemon=True)
        self._thread.start()

    def put(self, pcm: bytes) -> None:
        with self._cond:
            self._chunks.append(pcm)
            self._queued += len(pcm)
            while self._queued > self._max_bytes and len(self._chunks) > 1:
                old = self._chunks.popleft()
                self._queued -= len(old)
                if not self.dropped_bytes:
                    log.warning(
                        "microphone audio arrives faster than it plays: dropping the oldest"
                    )
                self.dropped_bytes += len(old)
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _follow_clock(self, stream: PcmStream) -> None:
        """Keep the queue where it settled: the host microphone's clock is not the VM's.

        After each write, as dom0 does for playback (`core.playout`). A
        stream that ran dry (no microphone audio for a while, or a stall)
        starts again from its prebuffer: the queue is measured afresh."""
        now = time.monotonic()
        if stream.underflows != self._underflows:
            self._underflows = stream.underflows
            self._matcher.reset(now)
            self._measure_from = now + SETTLE_S
        if now < self._measure_from:
            return
        bytes_per_s = self.format.bytes_per_second
        queue_s = self._queued / bytes_per_s + stream.latency_us() / 1e6
        rate = self._matcher.update(now, queue_s)
        if rate is not None:
            stream.set_rate(rate)

    def _next(self) -> bytes | None:
        with self._cond:
            while not self._chunks and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            pcm = self._chunks.popleft()
            self._queued -= len(pcm)
            return pcm

    def _run(self) -> None:
        period = self.format.bytes_for_ms(self._period_ms)
        try:
            # The agent keeps this stream open while dom0 is connected, not
            # just while an application records: an open, underrun stream
            # costs nothing and keeps the null sink's period short, so the
            # first microphone audio plays at once (see restart_sink_clock).
            stream = PcmStream.playback(
                self._server,
                self._sink,
                self.format,
                APP_NAME,
                "dom0 microphone",
                tlength_bytes=period * 8,
                # Microphone audio crosses the transport in bursts; starting
                # (and restarting after an underrun) with four periods
                # queued absorbs that jitter instead of playing gaps.
                prebuf_bytes=period * 4,
                props={"application.id": "org.qvaudio.guest"},
                variable_rate=True,
            )
        except PulseError as exc:
            log.warning("cannot feed the virtual microphone: %s", exc)
            return
        restart_sink_clock(self._server, self._sink)
        try:
            while (pcm := self._next()) is not None:
                usable = len(pcm) - len(pcm) % self.format.frame_size
                if usable:
                    stream.write(pcm[:usable])
                    self._follow_clock(stream)
        except PulseError as exc:
            # The audio server went away; the watcher reports that and the
            # agent starts a new writer once the devices are back.
            log.warning("microphone feed stopped: %s", exc)
        finally:
            stream.close()
