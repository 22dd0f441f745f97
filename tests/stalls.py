"""Whole-machine stalls, measured in the same run as what they might explain.

This build machine is a virtual machine whose virtual CPUs are sometimes all
descheduled at once by the host: every process stops for ~10 ms about once
a minute, sometimes longer. No buffer shorter than such a stall can stay
gap-free, so a gap is only blamed on the machine when a stall was measured
at that moment.

The detector is a process of its own with one real-time (SCHED_FIFO) thread
pinned to each CPU, each sleeping 1 ms in a loop. A real-time thread runs
the moment it wakes whatever else the machine is doing, so when it wakes
late its CPU was not running anything of this machine's: ordinary load,
however heavy, does not register. A stall of the whole machine is a time at
which every CPU's thread was late at once.

    with StallMonitor() as stalls:
        ...
    machine = stalls.whole_machine()   # [Stall(start, end)], time.monotonic() times

`python -m tests.stalls` runs the detector itself (what StallMonitor starts).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from types import TracebackType

#: A wake-up this much later than asked is a stall of that CPU.
LATE_S = 0.005
SLEEP_S = 0.001
READY_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class Stall:
    """[start, end) in time.monotonic() seconds, when nothing of this machine ran."""

    start: float
    end: float

    @property
    def duration_s(self) -> float:
        return self.end - self.start

    def near(self, t: float, before: float, after: float) -> bool:
        """Whether `t` falls within [start - before, end + after]."""
        return self.start - before <= t <= self.end + after


def _detect(cpu: int, out: threading.Lock) -> None:
    os.sched_setaffinity(0, {cpu})  # on Linux, pid 0 is this thread
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(50))
    while True:
        asked = time.monotonic() + SLEEP_S
        time.sleep(SLEEP_S)
        woke = time.monotonic()
        if woke - asked > LATE_S:
            with out:
                sys.stdout.write(f"{cpu} {asked:.6f} {woke:.6f}\n")
                sys.stdout.flush()


def main() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    out = threading.Lock()
    # Fail loudly, not quietly measure nothing: real-time threads need root
    # (or CAP_SYS_NICE), which the test machine has.
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(50))
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    for cpu in cpus:
        threading.Thread(target=_detect, args=(cpu, out), daemon=True).start()
    sys.stdout.write(f"ready {' '.join(map(str, cpus))}\n")
    sys.stdout.flush()
    sys.stdin.read()  # until the parent closes it (or dies)


class StallMonitor:
    """Runs the detector beside a test or benchmark; `whole_machine()` afterwards."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.stalls"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )  # fmt: skip
        assert self._proc.stdout is not None
        first = self._proc.stdout.readline().split()
        if not first or first[0] != "ready":
            err = self._proc.stderr.read() if self._proc.stderr else ""
            raise RuntimeError(f"the stall detector did not start (needs root): {err[-2000:]}")
        self.cpus = [int(c) for c in first[1:]]
        self.late: dict[int, list[Stall]] = {cpu: [] for cpu in self.cpus}
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            cpu, asked, woke = line.split()
            with self._lock:
                self.late[int(cpu)].append(Stall(float(asked), float(woke)))

    def close(self) -> None:
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._reader.join(5)

    def __enter__(self) -> StallMonitor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def whole_machine(self, min_s: float = LATE_S) -> list[Stall]:
        """Times when every CPU's detector was late at once, at least `min_s` long."""
        with self._lock:
            per_cpu = [sorted(self.late[cpu], key=lambda s: s.start) for cpu in self.cpus]
        if not per_cpu:
            return []
        common = per_cpu[0]
        for other in per_cpu[1:]:
            common = _intersect(common, other)
        return [s for s in common if s.duration_s >= min_s]

    def blame(self, t: float, before: float = 0.05, after: float = 0.5) -> Stall | None:
        """A whole-machine stall that could explain something noticed at `t`, if any."""
        for stall in self.whole_machine():
            if stall.near(t, before, after):
                return stall
        return None

    def one_cpu(
        self, t: float, before: float = 0.05, after: float = 0.5, min_s: float = LATE_S
    ) -> Stall | None:
        """The longest stall of any single CPU near `t`, if any: the thread that
        should have run then may have been on it. Weaker evidence than a
        whole-machine stall (the scheduler may move a thread off a stalled
        CPU), so benchmarks report it as its own kind."""
        with self._lock:
            near = [
                s
                for cpu in self.cpus
                for s in self.late[cpu]
                if s.duration_s >= min_s and s.near(t, before, after)
            ]
        return max(near, key=lambda s: s.duration_s, default=None)


def _intersect(a: list[Stall], b: list[Stall]) -> list[Stall]:
    out: list[Stall] = []
    i = j = 0
    while i < len(a) and j < len(b):
        start, end = max(a[i].start, b[j].start), min(a[i].end, b[j].end)
        if start < end:
            out.append(Stall(start, end))
        if a[i].end < b[j].end:
            i += 1
        else:
            j += 1
    return out


if __name__ == "__main__":
    main()
