"""What the hostile-guest tests share: a good VM that plays beside the attacks,
in a process of its own and recorded on the host with arrival times, the
machine's stalls measured meanwhile, and dom0's CPU and log lines counted.

A gap in the good VM's sound counts against dom0 unless a whole-machine
stall (tests/stalls.py) explains it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from qvaudio.core.tone import decode_mono, find_offset, find_onset, gaps
from qvaudio.pulse.pcm import PcmStream
from tests.audio_daemons import NULL_SINK
from tests.dom0_harness import S16, Dom0, start_null_sink_clock_once_dom0_plays
from tests.fake_guest import FakeGuest, lower_priority
from tests.guest_process import GoodGuest
from tests.stalls import StallMonitor
from tests.waiting import wait_until

TONE_S = 8.0
#: Attackers stand for other VMs, which on a real machine run on their own
#: virtual CPUs: here they share two cores with dom0, so their threads run
#: at a lower priority than dom0's and the good VM's, or a test would blame
#: dom0 for CPU the simulation itself took from it.
ATTACKER_NICE = 10
#: One block of dom0's host stream (a quarter of its 30 ms), with some margin.
BLOCK_S = 0.010
#: The share of the good VM's sound that short, unexplained gaps may take
#: during an attack before a test calls it starved (see GoodVm.starved).
MAX_LOST_FRACTION = 0.01
#: The hostile tests' dom0 starts each VM with 30 ms in reserve instead of 10.
#: This machine's virtual CPUs stall one at a time for up to ~10 ms several
#: times a minute (tests/stalls.py sees them), and the default reserve turns
#: such a stall of dom0's audio thread into a gap, after which it grows (that
#: is its design). What an attack costs a VM (the starvation these tests look
#: for was 70 ms to seconds of lost sound) still shows through 30 ms.
HOSTILE_DOM0_CONFIG = "dom0:\n  playback_reserve_ms: 30\n"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class TimedRecording:
    """The host sink's monitor, 10 ms at a time, with when each chunk arrived."""

    chunks: list[tuple[float, bytes]] = field(default_factory=list)
    error: BaseException | None = None


def record_with_times(dom0: Dom0, seconds: float) -> tuple[threading.Thread, TimedRecording]:
    out = TimedRecording()
    period = S16.bytes_for_ms(10)

    def run() -> None:
        try:
            with PcmStream.record(
                dom0.host.server, f"{NULL_SINK}.monitor", S16, "test", "listen", period
            ) as stream:
                for _ in range(int(seconds * 100)):
                    chunk = stream.read(period)
                    out.chunks.append((time.monotonic(), chunk))
        except BaseException as exc:  # shown by the test
            out.error = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_until(lambda: out.chunks or out.error, "the host recorder's first audio")
    return thread, out


class HostStreamEvents:
    """When other streams appeared on or left the host server (pulsectl events).

    PulseAudio 16 rewinds its sink when a stream comes or goes, and a
    low-latency stream beside it can lose one block (7.5 ms for dom0's 30 ms
    host stream): its own log says "Implicit underrun of 'work playback'" at
    that moment. Seen with no qvaudio at all (two plain clients, one opening
    and closing a stream), so it is the host server's doing, not dom0's; a gap
    of one block right after such an event is blamed on it, nothing more."""

    def __init__(self, server: str) -> None:
        import pulsectl

        self.times: list[float] = []
        self._stop = threading.Event()
        self._pulse = pulsectl.Pulse("test-stream-events", server=server)
        self._pulse.event_mask_set("sink_input")
        self._pulse.event_callback_set(self._on_event)
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _on_event(self, event: object) -> None:
        if getattr(event, "t", None) in ("new", "remove"):
            self.times.append(time.monotonic())
        if self._stop.is_set():
            import pulsectl

            raise pulsectl.PulseLoopStop

    def _listen(self) -> None:
        while not self._stop.is_set():
            self._pulse.event_listen(timeout=0.2)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._pulse.close()

    def blame(self, heard_at: float, duration_s: float) -> bool:
        if duration_s > BLOCK_S:
            return False
        return any(t - 0.05 <= heard_at <= t + 0.8 for t in self.times)


class GoodVm:
    """'work' playing a tone through dom0, recorded on the host, stalls measured."""

    def __init__(self, dom0: Dom0, stalls: StallMonitor, seconds: float = TONE_S) -> None:
        self.dom0 = dom0
        self.stalls = stalls
        self.guest = GoodGuest(dom0.vm_dir / "work", seconds=seconds)
        self.guest.wait_accepted()
        self.stream_events = HostStreamEvents(dom0.host.server)
        # dom0 opened work's host stream on accepting its format: start the
        # test bed's null sink at that stream's latency, as a sound card would.
        start_null_sink_clock_once_dom0_plays(dom0.host)
        self.recorder, self.recording = record_with_times(dom0, seconds + 2.5)
        time.sleep(0.3)
        self.guest.play()
        self.started = time.monotonic()
        self.dom0_view = "(dom0's view of work not seen)"

    def finish(self) -> None:
        # What dom0 saw of the good VM, while it still plays: a gap's cause.
        wait_until(
            lambda: self.guest.proc.poll() is not None or self._seen_by_dom0(), "dom0's view"
        )
        self.guest.join()
        self.recorder.join(10)
        self.stream_events.close()
        assert self.recording.error is None, self.recording.error

    def _seen_by_dom0(self) -> bool:
        work = self.dom0.status()["vms"].get("work", {})
        if work.get("state") != "open":
            return False
        playback = work["playback"]
        self.dom0_view = (
            f"dom0 saw {work['counters']['underruns']} late arrivals and "
            f"{work['counters']['host_underruns']} host underruns from work; reserve "
            f"{playback['jitter_buffer_ms']} ms, {playback.get('late_drops')} chunks dropped late"
        )
        return True

    def starved(self, since: float) -> list[str]:
        """What an attack that started at `since` cost the good VM beyond what a
        loaded machine costs it anyway: empty when every unexplained gap is
        within one block of dom0's host stream and together they are under
        MAX_LOST_FRACTION of the tone heard since; else every gap, described.

        Starvation is what these tests look for: before per-VM cost limits an
        attack took 70 ms to seconds of the good VM's sound. Gaps of a few
        milliseconds happen without any attack on this 2-core machine under
        load (bench/hostile_bench.py's honest baseline: 2.4-9.1 ms, with no
        CPU stall at those moments; here one of 3.2 ms in five runs with two
        busy loops beside the suite), so a test judges with this ceiling and
        the bench reports every gap."""
        heard, listened_s = self._heard(since)
        unexplained = [gap.duration_s for gap in heard if not gap.explained]
        if all(d <= BLOCK_S for d in unexplained) and (
            sum(unexplained) <= MAX_LOST_FRACTION * listened_s
        ):
            return []
        return self._described(heard)

    def unexplained_gaps(self, since: float) -> list[str]:
        """Gaps in the tone heard after `since` that no machine stall explains."""
        return self._described(self._heard(since)[0])

    def _described(self, heard: list[HeardGap]) -> list[str]:
        found = [gap.described(self.started) for gap in heard if not gap.explained]
        if found:
            found.append(self.dom0_view)
        return found

    def _heard(self, since: float) -> tuple[list[HeardGap], float]:
        heard = self.heard_gaps(since)
        assert heard is not None, "the good VM's tone never arrived"
        return heard

    def heard_gaps(self, since: float) -> tuple[list[HeardGap], float] | None:
        """Every gap in the tone heard after `since`, with what was measured at
        that moment, and the seconds of tone heard after `since`; None when no
        tone arrived."""
        chunks = self.recording.chunks
        samples = decode_mono(b"".join(c for _, c in chunks), S16)
        onset, offset = find_onset(samples, 0.05), find_offset(samples, 0.05)
        if onset is None or offset is None:
            return None
        per_chunk = S16.bytes_for_ms(10) // S16.frame_size
        heard_after = sum(
            1 for i in range(onset // per_chunk, offset // per_chunk) if chunks[i][0] >= since
        )
        found = []
        for gap in gaps(samples[onset:offset], 48000, 1.0):
            first = onset + int(gap.start_s * 48000)
            heard_at = chunks[min(first // per_chunk, len(chunks) - 1)][0]
            if heard_at < since:
                continue
            stall = self.stalls.blame(heard_at)
            cpu_stall = self.stalls.one_cpu(heard_at)
            found.append(
                HeardGap(
                    duration_s=gap.duration_s,
                    heard_at=heard_at,
                    machine_stall=stall is not None and gap.duration_s <= stall.duration_s + 0.06,
                    one_cpu_stall=cpu_stall is not None
                    and gap.duration_s <= cpu_stall.duration_s + 0.005,
                    host_stream_event=self.stream_events.blame(heard_at, gap.duration_s),
                )
            )
        return found, heard_after * per_chunk / 48000


@dataclass(frozen=True, slots=True)
class HeardGap:
    """A gap in the good VM's tone, and what was measured when it was heard."""

    duration_s: float
    heard_at: float
    #: The whole machine stopped then (tests/stalls.py), at least this long.
    machine_stall: bool
    #: One CPU stopped then; weaker (dom0's thread may have been on the other).
    one_cpu_stall: bool
    #: A host stream opened or closed then (PulseAudio rewinds its sink).
    host_stream_event: bool

    @property
    def explained(self) -> bool:
        """Caused by the machine or the host server, not by anything dom0 did."""
        return self.machine_stall or self.host_stream_event

    def described(self, tone_started: float) -> str:
        # The wall-clock time too, to find the moment in dom0's log.
        wall = time.time() - (time.monotonic() - self.heard_at)
        return (
            f"{self.duration_s * 1000:.1f} ms heard {self.heard_at - tone_started:.2f} s "
            f"into the tone (at {time.strftime('%H:%M:%S', time.localtime(wall))}"
            f".{int(wall % 1 * 1000):03d})"
        )


@contextmanager
def acting_as_other_vms() -> Iterator[None]:
    """Run the calling thread (the test's, making attackers) at the attackers' priority."""
    tid = threading.get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, tid)
    os.setpriority(os.PRIO_PROCESS, tid, ATTACKER_NICE)
    try:
        yield
    finally:
        os.setpriority(os.PRIO_PROCESS, tid, before)  # root may raise it again


@contextmanager
def good_vm_beside(dom0: Dom0, seconds: float = TONE_S) -> Iterator[GoodVm]:
    with StallMonitor() as stalls:
        good = GoodVm(dom0, stalls, seconds)
        try:
            yield good
        finally:
            good.guest.close()


@contextmanager
def dom0_cpu_share(dom0: Dom0) -> Iterator[list[float]]:
    """The share of one core dom0 used inside the block (filled in at its end)."""
    assert dom0.proc is not None
    share: list[float] = []
    t0, c0 = time.monotonic(), cpu_seconds(dom0.proc.pid)
    yield share
    share.append((cpu_seconds(dom0.proc.pid) - c0) / (time.monotonic() - t0))


def log_lines_about(dom0: Dom0, vm: str) -> list[str]:
    return [ln for ln in dom0.log_text(tail=None).splitlines() if f" {vm}: " in ln]


def paced(guest: FakeGuest, frame: bytes, per_second: float, seconds: float) -> threading.Thread:
    """Send `frame` (raw bytes) `per_second` times a second (0: as fast as possible)."""

    def run() -> None:
        lower_priority(ATTACKER_NICE)
        start = time.monotonic()
        i = 0
        while time.monotonic() - start < seconds and not guest.closed_by_peer.is_set():
            if per_second:
                delay = start + i / per_second - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            guest.send_raw(frame)
            i += 1

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread
