"""The host audio server side of dom0: one playback stream per VM, one record
stream per VM that may use the microphone.

Each stream is a blocking `PcmStream` in its own thread. Playback is fed
from a queue whose size the agent bounds (it stops reading a guest whose
queue is full: that is the back-pressure), and the blocking write paces it
at real time. The VM's clock and the host sound card's differ, so the
stream's rate follows the VM's (`core.playout.RateMatcher`, fed the queue
after every write): the queue stays where it is instead of creeping up
into latency or down into gaps. If the host server goes away (restart,
crash) the thread re-opens the stream with back-off, so VMs' audio comes
back by itself.

Every VM's stream is named after the VM (application.name, media.name) with
an icon, so the desktop mixer shows it like any application and remembers
its volume per VM.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from qvaudio.core.formats import AudioFormat
from qvaudio.core.playout import RateMatcher
from qvaudio.core.playout_queue import PlayoutQueue
from qvaudio.pulse.feed import feed
from qvaudio.pulse.pcm import VOLUME_NORM, PcmStream, PulseError

log = logging.getLogger(__name__)

ICON_NAME = "qvaudio-vm"
#: Stream property carrying the VM's name, so the agent can find its streams.
VM_PROPERTY = "qvaudio.vm"
#: Reopening a stream on the local host server is cheap, and each second
#: waited after the server came back is a second of silence for the VM.
RETRY_MAX_S = 0.5
#: 100 % as a float (the mixer's percent / 100).
FULL_VOLUME = 1.0
#: Audio that comes this long after the host stream ran dry is a pause (the
#: guest stopped sending), not an underrun; shorter, the listener heard a gap.
PAUSE_S = 0.5
#: A (re)started host stream's queue is measured for drift after this long.
SETTLE_S = 1.0
#: Audio shorter than this is joined to the chunk queued before it: the host
#: stream gets few, larger writes whatever size of frames a guest sends.
COALESCE_MS = 10
#: PA_ERR_* codes that mean the server is there and will not open this stream
#: (access, invalid argument, no such entity, too large, not supported, not
#: implemented): retrying at once would fail the same way, so the VM's session
#: decides when to try again. Anything else (connection refused, server gone)
#: is a server restarting, retried here within half a second.
REFUSED_CODES = frozenset({1, 3, 5, 18, 19, 23})


def stream_properties(vm_name: str, label: str | None, kind: str) -> dict[str, str]:
    props = {
        "application.name": vm_name,
        "application.icon_name": ICON_NAME,
        "media.name": f"{vm_name} {kind}",
        VM_PROPERTY: vm_name,
    }
    if label:
        props["qvaudio.label"] = label
    return props


class _HostThread:
    """What both host streams share: a daemon thread that `stop` ends without
    waiting, and what it reports to the agent's loop (polled, one-shot)."""

    vm_name: str
    _kind: str
    _thread: threading.Thread
    _refusal: str | None = None
    _opened: bool = False

    def stop(self) -> None:
        raise NotImplementedError

    def take_refusal(self) -> str | None:
        """Why the host server refused the stream (the thread has ended), once."""
        refusal, self._refusal = self._refusal, None
        return refusal

    def take_opened(self) -> bool:
        """Whether the stream opened since last asked."""
        opened, self._opened = self._opened, False
        return opened

    def _refused(self, exc: PulseError) -> bool:
        """Report a refusal for the session to handle; True if `exc` was one."""
        if exc.code not in REFUSED_CODES:
            return False
        log.debug("%s: host %s stream refused: %s", self.vm_name, self._kind, exc)
        self._refusal = exc.message
        return True

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float = 3.0) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("%s: host %s thread did not stop", self.vm_name, self._kind)

    def close(self) -> None:
        self.stop()
        self.join()


class HostPlayback(_HostThread):
    """A VM's playback stream on the host server, fed through a bounded queue."""

    def __init__(
        self,
        vm_name: str,
        fmt: AudioFormat,
        *,
        server: str | None,
        latency_ms: int,
        initial_volume: float,
        label: str | None = None,
    ) -> None:
        self.vm_name = vm_name
        self.format = fmt
        self._server = server
        self._tlength = fmt.bytes_for_ms(latency_ms)
        self._initial_volume = initial_volume
        self._props = stream_properties(vm_name, label, "playback")
        self._cond = threading.Condition()
        self._stop = False
        #: Set with _stop: what a retry waits on, so that queued audio never wakes it.
        self._stopped = threading.Event()
        self._stream: PcmStream | None = None
        #: The queue and its decisions (reserve, backlog, gaps, rate); under _cond.
        self._playout = PlayoutQueue(
            fmt.rate,
            fmt.frame_size,
            # Not judged until a buffer's worth is written after each (re)start:
            # PulseAudio plays nothing before then.
            judge_after=self._tlength,
            coalesce=fmt.bytes_for_ms(COALESCE_MS),
            pause_s=PAUSE_S,
            settle_s=SETTLE_S,
            drift_ppm=_learned_drift.get(server),
        )
        self.last_write = time.monotonic()
        #: The stream's latency after the last write (us), and when that was.
        self._written_latency = (0, self.last_write)
        self.open_failures = 0
        self._kind = "playback"
        self._thread = threading.Thread(target=self._run, name=f"play-{vm_name}", daemon=True)
        self._thread.start()

    @property
    def queued_bytes(self) -> int:
        return self._playout.queued

    @property
    def waiting_bytes(self) -> int:
        """Audio dom0 holds that the stream does not yet: the queue, and the chunk a
        write is waiting to hand over (while a reserve is queued, the stream is full
        and every write waits; counted out, a 10 ms chunk went missing from the
        latency each time, bench/avsync_bench.py)."""
        return self._playout.queued + self._playout.writing

    def latency_now_us(self, now: float) -> int:
        """What the host stream holds now: its figure after the last write, less what
        has played since.

        That figure is the stream's buffer at its fullest, just after a write;
        until the next chunk comes it drains. POSITION goes out on a loop
        turn, which while sound flows comes with the VM's next chunk, so
        reported as it was it over-stated dom0's share by up to a chunk
        (bench/avsync_bench.py on a PipeWire VM: a player's clicks 9 ms
        early, 0.7 ms late after). What dom0 holds besides is the
        caller's to add (`waiting_bytes`)."""
        latency_us, at = self._written_latency
        # Rounded: (at + 0.005) - at is 4999.99... µs in floating point.
        return max(0, latency_us - round((now - at) * 1_000_000))

    @property
    def played_bytes(self) -> int:
        return self._playout.taken

    @property
    def played_frames(self) -> int:
        return self.played_bytes // self.format.frame_size

    @property
    def late_drops(self) -> int:
        """Chunks dropped: over the limit, a backlog cut, or late after a gap."""
        return self._playout.late_drops

    @property
    def underruns(self) -> int:
        """Times the host stream ran dry while the VM was playing: gaps heard."""
        return self._playout.underruns

    def gaps(self) -> tuple[int, int]:
        """`underruns`, and of them the stalls (the VM's audio was waiting in dom0:
        dom0 or the host server was late, not the VM), read together: the host
        thread counts a stall's underrun a moment before the stall, and read
        apart the pair could show a late gap that never was."""
        with self._cond:
            return self._playout.underruns, self._playout.stalls

    @property
    def rate_matcher(self) -> RateMatcher:
        """The host stream's rate, following the VM's clock."""
        return self._playout.matcher

    @property
    def consuming(self) -> bool:
        """The host takes audio: it wrote recently, or has nothing to write."""
        return self._stream is not None and (
            self._playout.queued == 0 or time.monotonic() - self.last_write < 0.5
        )

    def put(
        self,
        pcm: bytes,
        limit: int,
        hold: int = 0,
        trim: int | None = None,
        *,
        after_idle: bool = False,
    ) -> None:
        """Queue `pcm` (the session's numbers: see VmSession.playback_* and
        `PlayoutQueue.put`)."""
        now = time.monotonic()
        with self._cond:
            self._playout.put(pcm, now, limit=limit, hold=hold, trim=trim, after_idle=after_idle)
            self._cond.notify()

    def stop(self) -> None:
        """Stop without waiting: the agent's loop must never block on the host server."""
        with self._cond:
            self._stop = True
            self._stopped.set()
            self._playout.clear()
            self._cond.notify()

    # -- the thread -----------------------------------------------------------------

    def _run(self) -> None:
        delay = 0.1
        while not self._stop:
            try:
                self._stream = PcmStream.playback(
                    self._server,
                    None,
                    self.format,
                    self.vm_name,
                    f"{self.vm_name} playback",
                    self._tlength,
                    props=self._props,
                    variable_rate=True,
                )
            except PulseError as exc:
                self._discard_while_down()
                if self._refused(exc):
                    return
                self.open_failures += 1
                if self.open_failures in (1, 10) or self.open_failures % 100 == 0:
                    log.warning("%s: cannot open host stream: %s (retrying)", self.vm_name, exc)
                self._stopped.wait(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            if self.open_failures:
                log.info("%s: host stream open again", self.vm_name)
            self.open_failures = 0
            self._opened = True
            delay = 0.1
            self._apply_initial_volume(self._stream)
            try:
                self._pump(self._stream)
            except PulseError as exc:
                log.warning("%s: host stream lost: %s (reopening)", self.vm_name, exc)
            finally:
                stream, self._stream = self._stream, None
                if stream is not None:
                    stream.close()

    def _pump(self, stream: PcmStream) -> None:
        def after_write(latency_us: int, _ran_dry: bool) -> None:
            self.last_write = time.monotonic()
            # After every write, a backlog's too: then the stream stays full
            # and the figure stays fresh (`latency_now_us` drains it in between).
            # One tuple: the loop reads both halves from another thread.
            self._written_latency = (latency_us, self.last_write)
            _learned_drift[self._server] = self._playout.matcher.drift_ppm

        feed(stream, self._playout, self._cond, lambda: self._stop, self.vm_name, after_write)

    def _discard_while_down(self) -> None:
        # Keep the queue from holding stale audio while the host server is down;
        # the agent stops reading the guest meanwhile, so nothing accumulates.
        with self._cond:
            self._playout.clear()

    def _apply_initial_volume(self, stream: PcmStream) -> None:
        """Start at the policy's default volume unless the mixer restored one.

        A fresh stream comes up at 100 %; any other volume means the desktop
        remembered the user's choice for this VM, and that wins.
        """
        if self._initial_volume >= FULL_VOLUME:
            return
        try:
            volumes = stream.volume()
            if volumes and all(abs(v - VOLUME_NORM) <= VOLUME_NORM // 100 for v in volumes):
                stream.set_volume(round(self._initial_volume * VOLUME_NORM))
        except PulseError as exc:
            log.warning("%s: could not set the initial volume: %s", self.vm_name, exc)


#: The clocks' ratio the last stream to each host server learned, in ppm: a
#: new stream starts at it instead of learning it again (the sound card and
#: the machine's clock are the same ones for every VM).
_learned_drift: dict[str | None, float] = {}


class HostCapture(_HostThread):
    """The host microphone recorded for one VM; chunks go to `deliver`."""

    def __init__(
        self,
        vm_name: str,
        fmt: AudioFormat,
        *,
        server: str | None,
        period_ms: int,
        deliver: Callable[[str, bytes], None],
        label: str | None = None,
    ) -> None:
        self.vm_name = vm_name
        self.format = fmt
        self._server = server
        self._period = fmt.bytes_for_ms(period_ms)
        self._deliver = deliver
        self._props = stream_properties(vm_name, label, "microphone")
        self._stop = threading.Event()
        self.latency_us = 0
        self._kind = "microphone"
        self._thread = threading.Thread(target=self._run, name=f"mic-{vm_name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop without waiting; a chunk read meanwhile is dropped, never delivered."""
        self._stop.set()

    def _run(self) -> None:
        delay = 0.1
        failures = 0
        while not self._stop.is_set():
            try:
                stream = PcmStream.record(
                    self._server,
                    None,
                    self.format,
                    self.vm_name,
                    f"{self.vm_name} microphone",
                    self._period,
                    props=self._props,
                )
            except PulseError as exc:
                if self._refused(exc):
                    return
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    log.warning("%s: cannot open the microphone: %s (retrying)", self.vm_name, exc)
                self._stop.wait(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            if failures:
                log.info("%s: microphone stream open again", self.vm_name)
            failures = 0
            self._opened = True
            delay = 0.1
            try:
                while not self._stop.is_set():
                    chunk = stream.read(self._period)
                    if self._stop.is_set():
                        break  # revoked while we waited: this chunk goes nowhere
                    self.latency_us = stream.latency_us()
                    self._deliver(self.vm_name, chunk)
            except PulseError as exc:
                log.warning("%s: microphone stream lost: %s (reopening)", self.vm_name, exc)
            finally:
                stream.close()
