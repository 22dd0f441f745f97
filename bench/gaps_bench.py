"""Gaps (dropouts) in a continuous tone over N minutes: qvaudio beside a
`parec | pacat` bridge and PulseAudio's module-tunnel-sink, all three at once.

    .venv/bin/python -m bench.gaps_bench [--minutes 10]

Three independent "VM"/"host" PulseAudio pairs, one per method, run at the
same time (so the wall clock is N minutes, not 3N, and all three see the same
machine load). In each VM an ordinary client (`qvaudio.pulse.pcm.PcmStream`, 100 ms buffer)
plays a 1 kHz sine at half scale into the default sink; the host sink's
monitor is recorded and every silent run of 1 ms or more
(`qvaudio.core.tone.gaps(..., min_gap_ms=1)`) is a gap. The recording is analysed
every 10 s, carrying the samples since the last sound into the next block,
so memory stays bounded and a gap across two blocks counts once. The VM
sink's monitor is analysed the same way as a control: a gap there is the
player's or the VM server's, not the method's.

Every host gap is placed on `time.monotonic()` (the recorder stamps each
chunk with when its last sample was captured) and judged against the
whole-machine stalls measured in the same run (tests/stalls.py): a gap is
the machine's only when a stall was measured just before it and the gap is
no longer than that stall plus STALL_SLACK_S. The rest are the method's.

`--self-check` cuts 20 ms of silence into the played tone once, 5 s in, and
every method must then report it (in the VM and on the host).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import multiprocessing
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench.pipeline import (
    FMT,
    METHODS,
    Recorder,
    Route,
    load_average,
    machine,
    play,
    running,
)
from qvaudio.core.tone import decode_mono, find_offset, gaps, generate_sine
from tests.stalls import StallMonitor

TONE_HZ = 1000.0
MIN_GAP_MS = 1.0
BLOCK_S = 10.0
#: A longer outage than this is reported as one gap without keeping its samples.
MAX_CARRY_S = 60.0
#: Gaps this early are listed apart: a stream starting up is not a dropout in steady state.
STARTUP_S = 2.0
LISTED = 50
#: Gaps of two methods this close together are one event on the machine.
SHARED_WINDOW_S = 0.3
#: A gap this much longer than the machine stall before it is not the stall's doing.
STALL_SLACK_S = 0.06


class GapCounter:
    """tone.gaps over an endless recording, one block at a time."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.found: list[tuple[float, float]] = []  # (start s, duration ms) from the first sound
        self.found_at: list[float | None] = []  # each gap's start, time.monotonic()
        # (sample index just past a chunk, when that chunk's last sample was captured)
        self._chunk_ends: list[tuple[int, float]] = []
        self._received = 0
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._carry: list[float] = []
        self._carry_start = 0  # sample index of _carry[0] since the recording began
        self._first_sound: int | None = None
        self._lock = threading.Lock()
        self.samples = 0

    def feed(self, pcm: bytes, stamp: float) -> None:
        with self._lock:
            self._received += len(pcm) // FMT.frame_size
            self._chunk_ends.append((self._received, stamp))
            self._pending.append(pcm)
            self._pending_bytes += len(pcm)
            if self._pending_bytes >= FMT.bytes_for_ms(int(BLOCK_S * 1000)):
                self._analyse()

    def finish(self) -> None:
        with self._lock:
            self._analyse()

    def _analyse(self) -> None:
        fresh = decode_mono(b"".join(self._pending), FMT)
        self._pending, self._pending_bytes = [], 0
        start = self._carry_start
        samples = self._carry + fresh
        self.samples += len(fresh)
        last = find_offset(samples, 0.01)
        if last is None:
            if self._first_sound is None:  # nothing played yet: nothing to keep
                self._carry, self._carry_start = [], start + len(samples)
                self._forget_stamps_before(self._carry_start)
                return
            self._carry = samples
            if len(samples) > MAX_CARRY_S * FMT.rate:
                # An outage this long is counted now, and its samples let go.
                self._record(start, len(samples))
                self._carry, self._carry_start = [], start + len(samples)
                self._forget_stamps_before(self._carry_start)
            return
        if self._first_sound is None:
            first = next(i for i, x in enumerate(samples) if abs(x) > 0.01)
            self._first_sound = start + first
        for gap in gaps(samples, FMT.rate, min_gap_ms=MIN_GAP_MS):
            self._record(start + round(gap.start_s * FMT.rate), round(gap.duration_s * FMT.rate))
        # Keep from the last sound on: a silent run reaching past this block's
        # end is measured whole next time, and nothing before it is seen twice.
        self._carry, self._carry_start = samples[last:], start + last
        self._forget_stamps_before(self._carry_start)

    def _forget_stamps_before(self, sample: int) -> None:
        """Gaps are only found from `sample` on: older chunks' stamps may go."""
        del self._chunk_ends[: bisect.bisect_right(self._chunk_ends, (sample, math.inf))]

    def _record(self, start: int, length: int) -> None:
        first = self._first_sound or 0
        self.found.append(((start - first) / FMT.rate, length / FMT.rate * 1000))
        self.found_at.append(self._captured_at(start))

    def _captured_at(self, sample: int) -> float | None:
        """When sample number `sample` was captured, from its chunk's stamp."""
        i = bisect.bisect_right(self._chunk_ends, (sample, math.inf))
        if i >= len(self._chunk_ends):
            return None
        end, stamp = self._chunk_ends[i]
        return stamp - (end - sample) / FMT.rate

    def summary(self) -> dict[str, Any]:
        steady = [g for g in self.found if g[0] >= STARTUP_S]
        return {
            "gaps": len(steady),
            "gaps_in_first_2s": len(self.found) - len(steady),
            "gap_ms_total": round(sum(d for _, d in steady), 1),
            "longest_gap_ms": round(max((d for _, d in steady), default=0.0), 1),
            "analysed_s": round(self.samples / FMT.rate, 1),
            "first_gaps": [{"at_s": round(t, 3), "ms": round(d, 1)} for t, d in self.found][
                :LISTED
            ],
            "gap_times_s": [round(t, 3) for t, _ in steady],
            "steady_gaps": [
                {"ms": round(d, 1), "monotonic": at}
                for (t, d), at in zip(self.found, self.found_at, strict=True)
                if t >= STARTUP_S
            ],
        }


def tone_chunks(seconds: float, cut_at_s: float | None) -> Iterator[bytes]:
    """The sine, 10 ms at a time; one second of it repeats exactly (1000 whole cycles)."""
    second = generate_sine(TONE_HZ, FMT, 1.0, amplitude=0.5)
    step = FMT.bytes_for_ms(10)
    cut = None if cut_at_s is None else int(cut_at_s * 100)
    for i in range(int(seconds * 100)):
        pos = (i % 100) * step
        chunk = second[pos : pos + step]
        if cut is not None and cut <= i < cut + 2:
            chunk = bytes(step)  # 20 ms of silence: the gap every method must report
        yield chunk


def _drops(route: Route) -> dict[str, Any] | None:
    status = route.dom0_status()
    if status is None:
        return None
    for vm in status.get("vms", {}).values():
        playback = vm.get("playback") or {}
        counters = vm.get("counters") or {}
        return {
            **{k: playback.get(k) for k in ("late_drops", "latency_us", "jitter_buffer_ms")},
            **{k: counters.get(k) for k in ("underruns", "host_underruns")},
        }
    return None


def _listen(route: Route, seconds: float, report: Connection) -> None:
    """Child process: record and analyse one method's host and VM monitors.

    The analysis runs niced, in a process of its own, so its bursts of CPU
    every 10 s neither hold up the players (another process) nor look like
    a dropout in what is measured; the servers buffer what it reads late.
    """
    os.nice(10)
    host, vm = GapCounter("host"), GapCounter("vm")
    recorders = [
        Recorder(route.host, route.host_monitor, "host", host.feed),
        Recorder(route.vm, route.vm_monitor, "vm", vm.feed),
    ]
    for rec in recorders:
        rec.started.wait(10)
    report.send("recording")
    report.poll(seconds + 60)
    report.recv()
    for rec in recorders:
        rec.stop()
    host.finish()
    vm.finish()
    error = next((repr(r.error) for r in recorders if r.error is not None), None)
    # A host gap within 250 ms of one in the VM's own monitor began upstream
    # (the player or the VM server starved), not in the method under test.
    own = [
        t for t, _ in host.found if t >= STARTUP_S and all(abs(t - v) > 0.25 for v, _ in vm.found)
    ]
    report.send({
        "host": host.summary(),
        "vm_control": vm.summary(),
        "host_gaps_without_vm_gap": len(own),
        "error": error,
    })  # fmt: skip


def _player(route: Route, seconds: float, cut_at_s: float | None) -> None:
    """Child process: an ordinary client playing the tone, with a GIL of its own."""
    thread, _ = play(route.vm, tone_chunks(seconds, cut_at_s), 100, route.method)
    thread.join()


def _mark_shared_gaps(rows: dict[str, Any]) -> None:
    """Count each method's host gaps that another method had at the same moment.

    The players start together, so the recordings share a clock to within
    the methods' latencies. A gap that several independent pipelines have at
    once comes from the machine (a stall of every process, as a virtual CPU
    descheduled by its hypervisor), not from any one method.
    """
    times = {label: (row.get("host") or {}).get("gap_times_s", []) for label, row in rows.items()}
    for label, row in rows.items():
        others = [t for other, ts in times.items() if other != label for t in ts]
        row["host_gaps_also_in_another_method"] = sum(
            1 for t in times[label] if any(abs(t - u) <= SHARED_WINDOW_S for u in others)
        )


def _attribute(row: dict[str, Any], stalls: StallMonitor) -> None:
    """Split a row's host gaps into the machine's (a whole-machine stall
    measured just before, and the gap no longer than it allows) and the
    method's own."""
    host = row.get("host")
    if not host:
        return
    own: list[dict[str, Any]] = []
    machine_count = 0
    for gap in host.pop("steady_gaps", []):
        at = gap["monotonic"]
        stall = None if at is None else stalls.blame(at)
        if stall is not None and gap["ms"] / 1000 <= stall.duration_s + STALL_SLACK_S:
            machine_count += 1
        else:
            cpu = None if at is None else stalls.one_cpu(at)
            own.append({
                "ms": gap["ms"],
                "monotonic": None if at is None else round(at, 3),
                "one_cpu_stall_ms": None if cpu is None else round(cpu.duration_s * 1000, 1),
            })  # fmt: skip
    host["gaps_with_machine_stall"] = machine_count
    host["gaps_without_machine_stall"] = len(own)
    host["gaps_without_machine_stall_list"] = own[:LISTED]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--self-check", action="store_true", help="cut one 20 ms gap, 5 s in")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated subset of " + str(METHODS)
    )
    parser.add_argument(
        "--dom0-latency-ms",
        type=int,
        help="also run qvaudio with qvaudio-dom0 --latency-ms MS (a non-default row) at once",
    )
    parser.add_argument(
        "--guest-period-ms",
        type=int,
        help="with --dom0-latency-ms: that row's qvaudio-guest also runs with --period-ms MS",
    )
    args = parser.parse_args()
    # (row label, method, setup arguments)
    rows_to_run: list[tuple[str, str, dict[str, Any]]] = [
        (m, m, {}) for m in args.methods.split(",")
    ]
    if args.dom0_latency_ms:
        label = f"qvaudio, non-default: dom0 --latency-ms {args.dom0_latency_ms}"
        guest_args: tuple[str, ...] = ()
        if args.guest_period_ms:
            label += f", guest --period-ms {args.guest_period_ms}"
            guest_args = ("--period-ms", str(args.guest_period_ms))
        rows_to_run.append((
            label,
            "qvaudio",
            {"dom0_args": ("--latency-ms", str(args.dom0_latency_ms)), "guest_args": guest_args},
        ))  # fmt: skip
    seconds = args.minutes * 60
    cut = 5.0 if args.self_check else None
    ctx = multiprocessing.get_context("fork")
    out: dict[str, Any] = {
        "benchmark": "gaps in a continuous 1 kHz tone, host sink monitor",
        "machine": machine(),
        "minutes": args.minutes,
        "methods_run": "at the same time, one VM/host server pair each",
        "min_gap_ms": MIN_GAP_MS,
        "self_check_gap_at_s": cut,
    }
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="qvaudio-gaps-") as tmp, ExitStack() as stack:
        base = Path(tmp)
        routes = [
            stack.enter_context(running(method, base, f"m{i}", **kwargs))
            for i, (_, method, kwargs) in enumerate(rows_to_run)
        ]
        listeners = []
        for route in routes:
            mine, theirs = ctx.Pipe()
            child = ctx.Process(target=_listen, args=(route, seconds, theirs), daemon=True)
            child.start()
            listeners.append((child, mine))
        for _child, pipe in listeners:
            if not pipe.poll(15):
                raise RuntimeError("a recorder did not start")
            pipe.recv()
        time.sleep(2.0)
        drops_before = [_drops(r) for r in routes]
        out["load_avg_at_start"] = load_average()
        stalls = stack.enter_context(StallMonitor())
        players = [ctx.Process(target=_player, args=(r, seconds, cut), daemon=True) for r in routes]
        for player in players:
            player.start()
        loads = []
        deadline = time.monotonic() + seconds + 30
        while any(p.is_alive() for p in players) and time.monotonic() < deadline:
            time.sleep(min(60.0, max(1.0, seconds / 4)))
            loads.append(load_average()[0])
        time.sleep(1.0)
        drops_after = [_drops(r) for r in routes]
        for (child, pipe), route, before, after, (label, _, _) in zip(
            listeners, routes, drops_before, drops_after, rows_to_run, strict=True
        ):
            pipe.send("stop")
            row: dict[str, Any] = {"settings": route.settings}
            row.update(pipe.recv() if pipe.poll(120) else {"error": "no report"})
            child.join(10)
            if before is not None:
                row["dom0_status_before"], row["dom0_status_after"] = before, after
            _attribute(row, stalls)
            rows[label] = row
        machine_stalls = stalls.whole_machine()
        out["machine_stalls"] = len(machine_stalls)
        out["machine_stall_ms"] = [round(x.duration_s * 1000, 1) for x in machine_stalls][:LISTED]
    out["load_avg_1min_samples"] = loads
    out["load_avg_end"] = load_average()
    _mark_shared_gaps(rows)
    out["rows"] = rows
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
