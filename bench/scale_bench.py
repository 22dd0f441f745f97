"""dom0 agent CPU per 48 kHz stereo stream from 1 to 32 VMs, and RSS at 32, beside
one `pacat` per VM (the Qubes-style host side: one player process per VM).

    .venv/bin/python -m bench.scale_bench [--seconds 20] [--steps 1,2,4,8,16,32]

qvaudio: one `qvaudio-dom0` and one private host PulseAudio; each VM is a
scripted guest (tests/fake_guest.py's FakeGuest for the handshake) and one
pacing thread sends every guest 10 ms of a 1 kHz sine every 10 ms, as a guest
agent would. Alternative: N `pacat --playback --latency-msec=20` processes
on a fresh host server, each fed the same PCM from a pipe at the same pace.
CPU is utime+stime from /proc/PID/stat over `--seconds` per step, after 3 s
of settling; memory is VmRSS (and Pss, which splits shared pages) from
/proc. The senders' own CPU (this process) is not counted; the host
server's CPU is reported beside each, since both methods drive it.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from bench.pipeline import (
    FMT,
    PACAT_LATENCY_MS,
    POLICY,
    RAW_FLAGS,
    REPO,
    load_average,
    machine,
    proc_cpu_seconds,
    proc_memory_kib,
    stop_process,
    wait_for,
    write_policy,
)
from qvaudio.core.codec import encode
from qvaudio.core.events import FormatAccept, PlaybackData
from qvaudio.core.tone import generate_sine
from qvaudio.dom0.control import ControlError, request
from qvaudio.pulse.private import PrivatePulse
from tests.fake_guest import FakeGuest
from tests.waiting import WaitTimeout

SETTLE_S = 3.0
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class Pacer:
    """One thread writing 10 ms of audio to every target every 10 ms, on a fixed clock."""

    def __init__(self) -> None:
        self.targets: list[Callable[[int], None]] = []
        self.late = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pacer", daemon=True)
        self._thread.start()

    def add(self, target: Callable[[int], None]) -> None:
        with self._lock:
            self.targets.append(target)

    def _run(self) -> None:
        tick = 0
        start = time.monotonic()
        while not self._stop.is_set():
            delay = start + tick * 0.01 - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -0.05:
                # Held up (a new stream's first write can block while the
                # host sink wakes): carry on from now rather than burst.
                self.late += 1
                start -= delay
            with self._lock:
                targets = list(self.targets)
            for target in targets:
                with contextlib.suppress(OSError, AssertionError):
                    target(tick % 100)
            tick += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


def sine_periods() -> list[bytes]:
    second = generate_sine(1000.0, FMT, 1.0, amplitude=0.5)
    step = FMT.bytes_for_ms(10)
    return [second[i : i + step] for i in range(0, len(second), step)]


def cpu_over(pids: list[int], seconds: float) -> float:
    """CPU seconds the processes used over `seconds` of wall clock, as % of one core."""
    before = sum(proc_cpu_seconds(p) for p in pids)
    t0 = time.monotonic()
    time.sleep(seconds)
    used = sum(proc_cpu_seconds(p) for p in pids) - before
    return round(used / (time.monotonic() - t0) * 100, 2)


def memory(pids: list[int]) -> dict[str, int]:
    total = {"rss_kib": 0, "pss_kib": 0}
    for pid in pids:
        for key, value in proc_memory_kib(pid).items():
            total[key] += value
    return total


def run_qvaudio(base: Path, steps: list[int], seconds: float) -> dict[str, Any]:
    host = PrivatePulse(base, "qv-host")
    vm_dir, policy_dir = base / "vms", base / "policy"
    for d in (vm_dir, policy_dir):
        d.mkdir(mode=0o700)
    write_policy(policy_dir, POLICY)
    control = base / "control.sock"
    log = base / "dom0.log"
    guests: list[FakeGuest] = []
    pacer: Pacer | None = None
    dom0: subprocess.Popen[bytes] | None = None
    try:
        host.start()
        with log.open("wb") as out:
            dom0 = subprocess.Popen(
                [sys.executable, "-m", "qvaudio.agent_dom0",
                 "--config", str(REPO / "qvaudio.yaml"), "--transport", f"unix:{vm_dir}",
                 "--policy-dir", str(policy_dir), "--control-socket", str(control),
                 "--no-notifications"],
                env=host.full_env(), stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
            )  # fmt: skip
        wait_for("dom0's control socket", control.exists, 15, [log])
        assert host.proc is not None
        pids = {"dom0": dom0.pid, "host_pulseaudio": host.proc.pid}
        time.sleep(SETTLE_S)
        rows = [_step(0, pids, seconds, control)]
        frames = [encode(PlaybackData(p)) for p in sine_periods()]
        pacer = Pacer()
        for n in steps:
            while len(guests) < n:
                guest = FakeGuest(vm_dir / f"vm{len(guests):02d}")
                guests.append(guest)
                if not guest.connected.wait(10):
                    raise RuntimeError(f"dom0 did not connect to {guest.path.name}")
                guest.offer(FMT)
                try:
                    guest.wait_for(lambda e: isinstance(e, FormatAccept), timeout=10)
                except WaitTimeout as exc:
                    tail = log.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"{exc}\n--- dom0 log ---\n{tail}") from exc
                pacer.add(partial(_send_period, guest, frames))
            time.sleep(SETTLE_S)
            rows.append(_step(n, pids, seconds, control))
        return {"steps": rows, "pacer_late_ticks": pacer.late}
    finally:
        if pacer is not None:
            pacer.stop()
        for guest in guests:
            guest.close()
        if dom0 is not None:
            stop_process(dom0)
        host.stop()


def _step(n: int, pids: dict[str, int], seconds: float, control: Path) -> dict[str, Any]:
    before = _counters(control)
    load = load_average()
    dom0_cpu = cpu_over([pids["dom0"]], seconds)
    after = _counters(control)
    row: dict[str, Any] = {
        "vms": n,
        "dom0_cpu_percent": dom0_cpu,
        "dom0_cpu_percent_per_stream": round(dom0_cpu / n, 2) if n else None,
        "host_pulseaudio_cpu_percent": cpu_over([pids["host_pulseaudio"]], 2.0),
        "dom0_memory": memory([pids["dom0"]]),
        "streams_playing": after["playing"],
        "late_drops_during_step": after["late_drops"] - before["late_drops"],
        "load_avg": load,
    }
    return row


def _counters(control: Path) -> dict[str, int]:
    try:
        status = request(control, {"cmd": "status"}, timeout=5)
    except (ControlError, OSError):
        return {"playing": -1, "late_drops": 0}
    playing = drops = 0
    for vm in status.get("vms", {}).values():
        playback = vm.get("playback") or {}
        playing += bool(playback.get("active"))
        drops += int(playback.get("late_drops") or 0)
    return {"playing": playing, "late_drops": drops}


def run_pacat(base: Path, steps: list[int], seconds: float) -> dict[str, Any]:
    host = PrivatePulse(base, "pacat-host")
    procs: list[subprocess.Popen[bytes]] = []
    pacer: Pacer | None = None
    periods = sine_periods()
    try:
        host.start()
        assert host.proc is not None
        pacer = Pacer()
        rows = []
        for n in steps:
            while len(procs) < n:
                proc = subprocess.Popen(
                    ["pacat", "--playback", f"--latency-msec={PACAT_LATENCY_MS}",
                     f"--client-name=vm{len(procs):02d}", *RAW_FLAGS],
                    env=host.full_env(), stdin=subprocess.PIPE, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                procs.append(proc)
                assert proc.stdin is not None
                fd = proc.stdin.fileno()
                # One page of pipe (~21 ms), so a stall cannot park seconds of
                # audio in the pipe as latency for the rest of the run.
                fcntl.fcntl(fd, F_SETPIPE_SZ, 4096)
                pacer.add(partial(_write_period, fd, periods))
            time.sleep(SETTLE_S)
            pids = [p.pid for p in procs]
            load = load_average()
            cpu = cpu_over(pids, seconds)
            rows.append({
                "vms": n,
                "pacat_cpu_percent_sum": cpu,
                "pacat_cpu_percent_per_stream": round(cpu / n, 2),
                "host_pulseaudio_cpu_percent": cpu_over([host.proc.pid], 2.0),
                "pacat_memory_sum": memory(pids),
                "pacat_alive": sum(p.poll() is None for p in procs),
                "load_avg": load,
            })  # fmt: skip
        return {"steps": rows, "pacer_late_ticks": pacer.late}
    finally:
        if pacer is not None:
            pacer.stop()
        for proc in procs:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            stop_process(proc)
        host.stop()


def _send_period(guest: FakeGuest, frames: list[bytes], tick: int) -> None:
    guest.send_raw(frames[tick])


def _write_period(fd: int, periods: list[bytes], tick: int) -> None:
    _write_all(fd, periods[tick])


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--steps", default="1,2,4,8,16,32")
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    out: dict[str, Any] = {
        "benchmark": "dom0-side CPU and memory per 48 kHz stereo s16le stream, 1..32 VMs",
        "machine": machine(),
        "seconds_per_step": args.seconds,
        "pacat_latency_msec": PACAT_LATENCY_MS,
    }
    with tempfile.TemporaryDirectory(prefix="qvaudio-scale-") as tmp:
        base = Path(tmp)
        (base / "qv").mkdir()
        (base / "pacat").mkdir()
        out["qvaudio"] = run_qvaudio(base / "qv", steps, args.seconds)
        out["pacat_per_vm"] = run_pacat(base / "pacat", steps, args.seconds)
    out["load_avg_end"] = load_average()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
