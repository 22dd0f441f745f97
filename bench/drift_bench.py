"""Clock drift: VMs whose clocks run +N and -N ppm off the host's, played by
qvaudio and by a `parec | pacat` bridge, all four side by side in one run.

    .venv/bin/python -m bench.drift_bench [--minutes 10] [--ppm 300] [--host-ppm 0]
        [--json-out PATH]

One private host PulseAudio (tests/audio_daemons.py, a null sink) and the
real dom0 agent (tests/dom0_harness.py, the shipped qvaudio.yaml's settings,
Unix-socket VMs) serve four streams at once, each fed by a process of its
own (bench/drift_peer.py, so that no interpreter lock disturbs its pacing)
that sends a 48 kHz s16 stereo tone in 10 ms chunks at
`48000 * (1 + ppm * 1e-6)` frames per second of time.monotonic(), with no
accumulated error:

* qvaudio_plus / qvaudio_minus: VMs "drift-plus" (440 Hz, +N ppm) and
  "drift-minus" (660 Hz, -N ppm), guests speaking the real protocol
  (tests/fake_guest.py) to dom0, which plays each into the host server and
  matches its host stream's rate to the VM's clock (core/playout.py).
* pacat_plus / pacat_minus: the same tones at the same skews written into
  `pacat --playback --latency-msec=20 --raw` on the host server: a VM's
  `parec | pacat` bridge, whose pace is its `parec`'s, i.e. the VM sink's
  clock, skewed.

module-tunnel-sink is not run: its pace is the VM server's sink (the tunnel
sink's own timer in the VM's PulseAudio), whose clock in this test bed is the
host's system clock, the one the host's null sink runs on. A client writing
into it faster or slower than real time is throttled by the VM server or
runs it dry there: nothing drifts between the tunnel and the host, so there
is nothing to compare. (Between a real VM and a sound card it drifts like
the bridge; here it cannot be skewed.)

Measured every second, per stream (the mean of five looks at random
moments: every queue here is a 10 ms sawtooth, which looks taken once a
second, in step with it, alias into slow ramps that are not there): the host
server's latency for its sink input (`buffer_usec + sink_usec`, as `pactl
list sink-inputs` shows), and how late the peer sent its newest chunk (audio
it holds because its reader did not take it). qvaudio also: dom0's status
for the VM (`queued_ms`, host stream `latency_us`, `jitter_buffer_ms`,
`rate_hz`, `drift_ppm`, `late_drops` and the `underruns` / `host_underruns`
counters). pacat also: the bytes waiting in the pipe into it (FIONREAD), and
its "Stream underrun" messages (`pacat -v`). The depth of each stream's
queue, from the VM's newest sample to the host sink, is for qvaudio
`queued_ms + sink input + peer lag` (about what dom0's rate matcher holds
steady), and for pacat `pipe + sink input + peer lag`: pacat keeps the
server's buffer at its 20 ms and leaves any excess in the pipe, so a VM
clock running fast grows the pipe, not the sink input (pacat's own buffer,
at most one write, is not seen).

What the host plays of each stream is recorded on its own (`parec
--monitor-stream=INDEX` into a file) and, after the run, every silence of
1 ms or more in the tone (bench/gaps_bench.py's counter, from 2 s after the
tone's onset) is a gap. A gap is explained when a whole-machine stall
(tests/stalls.py, run alongside) was measured at that moment and the gap is
at most 60 ms longer (tests/hostile_harness.py's rule); a gap heard in
another stream within 100 ms too is marked shared (the host server's doing,
or the machine's). A recorded sample is dated by its index, against the
least delayed arrival of the recording's bytes in each half of the run.

The host's clock: those two datings also give the rate at which the host
sink took each stream's frames against time.monotonic() (`host_sink_ppm`).
It is not zero in this test bed: PulseAudio's null sink, at the low latency
a sound card would run at and with a resampled stream on it (dom0's
variable-rate ones are; a 44.1 kHz pacat stream does it too, with no
qvaudio there), takes every stream's frames a few hundred ppm faster than
real time (a 0 ppm pacat stream's sink input then drains by ~0.3 ms a
second). So each stream also reports its VM's skew against the host sink as
measured (`skew_vs_host_sink_ppm`): that, not `ppm`, is what a rate matcher
has to learn and what a bridge's queue creeps by. `--host-ppm` paces every
peer that much faster as well (an earlier run's `host_sink_ppm`), making
`--ppm` roughly the skew against the host sink.

Reported per stream: the queue target (None: dom0 holds its queue where it
settled 1 s after each start of the host stream and does not report where;
pacat aims at nothing beyond its server buffer), the depth's min / median /
max and largest distance from its median after the first 60 s (half the run
if it is shorter than two minutes), its slope in ms per minute, the final
`drift_ppm` and `rate_hz`, rate changes seen between samples, gaps (with
those a machine stall does not explain, and of those the shared ones),
trims (`late_drops` over the run) and underruns; and the per-second series.
Prints one JSON object (also written to `--json-out`).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import itertools
import json
import os
import random
import re
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import pulsectl

from bench.gaps_bench import STARTUP_S, GapCounter
from bench.pipeline import (
    FMT,
    PACAT_LATENCY_MS,
    RAW_FLAGS,
    REPO,
    load_average,
    machine,
    stop_process,
)
from qvaudio.common.config import load_config
from qvaudio.dom0.control import ControlError
from tests.audio_daemons import PulseAudioServer
from tests.dom0_harness import Dom0, start_null_sink_clock_once_dom0_plays
from tests.stalls import StallMonitor
from tests.waiting import wait_until

#: (side, sign of the skew, tone in Hz): one qvaudio VM and one pacat stream each.
SIDES = (("plus", 1, 440.0), ("minus", -1, 660.0))
SAMPLE_S = 1.0
#: Looks at the queues, at random moments, averaged into each second's sample.
LOOKS_PER_SAMPLE = 5
#: Queue statistics leave out the start (the rate matcher's acquisition).
SETTLE_S = 60.0
RECORD_LATENCY_MS = 10
#: A gap this much longer than the machine stall at that moment is not its doing.
STALL_SLACK_S = 0.06
LISTED = 50
#: Gaps of two streams this close together (seconds) were one event on the host.
SHARED_S = 0.1
BYTES_PER_MS = FMT.bytes_for_ms(1)
SHIPPED_CONFIG = REPO / "qvaudio.yaml"
#: What every private host server says as it starts (root, no cookie, no D-Bus): not news.
HOST_STARTUP_NOISE = r"run as root|cookie|authentication key|D-Bus"


class Peer:
    """A bench/drift_peer.py process, and what it says on stderr."""

    def __init__(self, args: list[str], stdout: int | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.drift_peer", *args],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL if stdout is None else stdout,
            stderr=subprocess.PIPE, text=True, cwd=REPO,
        )  # fmt: skip
        self.ready = threading.Event()
        self.done = threading.Event()
        self.started_at: float | None = None
        self.lag_ms = 0.0
        self._lag_max_ms = 0.0
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            word, _, rest = line.strip().partition(" ")
            with self._lock:
                if word == "ready":
                    self.ready.set()
                elif word == "started":
                    self.started_at = float(rest)
                elif word == "lag":
                    now, worst = map(float, rest.split())
                    self.lag_ms, self._lag_max_ms = now, max(self._lag_max_ms, worst)
                elif word == "done":
                    self.done.set()
                elif len(self.errors) < 40:  # "error ...", or a traceback
                    self.errors.append(line.rstrip())
        self.ready.set()  # whoever waits learns it ended (see wait_ready)
        self.done.set()

    def wait_ready(self, what: str, timeout: float = 20.0) -> None:
        if not self.ready.wait(timeout) or self.proc.poll() is not None:
            raise RuntimeError(f"{what} did not get ready: {self.errors[-10:]}")

    def play(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("play\n")
        self.proc.stdin.flush()

    def take_lag(self) -> tuple[float, float]:
        """The newest chunk's lateness, and the most since the last call, in ms."""
        with self._lock:
            worst, self._lag_max_ms = self._lag_max_ms, 0.0
            return self.lag_ms, worst

    def stop(self) -> None:
        stop_process(self.proc, 5)
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):  # a broken pipe to a peer that is gone
                self.proc.stdin.close()
        self._reader.join(5)


@dataclass
class Stream:
    """One of the four: its peer, how to find its sink input, its recording and series."""

    name: str
    method: str
    ppm: float
    freq: float
    #: The sink input's property and value that identify it on the host server.
    key: tuple[str, str]
    recording: Path
    #: The peer's pace against time.monotonic(): `ppm` plus --host-ppm.
    peer_ppm: float = 0.0
    peer: Peer | None = None
    vm: str | None = None
    pacat: subprocess.Popen[bytes] | None = None
    pacat_log: Path | None = None
    #: The write end of the pipe into pacat, kept open to count what waits in
    #: it (not the read end: a pacat that died must break the peer's pipe).
    pipe_fd: int | None = None
    sink_input: int | None = None
    recorder: subprocess.Popen[bytes] | None = None
    #: Seconds into the run when its recorder ended (its sink input went away), if it did.
    recorder_ended_at: float | None = None
    #: (time.monotonic(), bytes recorded so far), once a second.
    recorded: list[tuple[float, int]] = field(default_factory=list)
    series: list[dict[str, Any]] = field(default_factory=list)


def pipe_bytes(fd: int) -> int:
    buf = fcntl.ioctl(fd, termios.FIONREAD, struct.pack("i", 0))
    return int(struct.unpack("i", buf)[0])


def pacat_underruns(log: Path | None) -> int:
    if log is None or not log.exists():
        return 0
    return log.read_text(errors="replace").count("Stream underrun")


def start_streams(
    base: Path, dom0: Dom0, ppm: float, host_ppm: float, seconds: float
) -> list[Stream]:
    """Every peer and pacat, each qvaudio VM's format accepted by dom0; nothing plays yet."""

    def paced(skew: float) -> float:
        return round(((1 + skew * 1e-6) * (1 + host_ppm * 1e-6) - 1) * 1e6, 3)

    streams: list[Stream] = []
    for side, sign, freq in SIDES:
        vm = f"drift-{side}"
        s = Stream(
            f"qvaudio_{side}", "qvaudio", sign * ppm, freq, ("qvaudio.vm", vm),
            base / f"qvaudio_{side}.raw", paced(sign * ppm), vm=vm,
        )  # fmt: skip
        streams.append(s)
        s.peer = Peer(["qvaudio", str(dom0.vm_dir / vm), str(freq), str(s.peer_ppm), str(seconds)])
    for s in streams:
        assert s.peer is not None
        s.peer.wait_ready(f"{s.name}'s guest (dom0's log: {dom0.log})")
    # The first dom0 stream is on the host: restart the null sink's clock at
    # its latency, as a sound card would (tests/dom0_harness.py).
    start_null_sink_clock_once_dom0_plays(dom0.host)
    for side, sign, freq in SIDES:
        client = f"pacat-{side}"
        s = Stream(
            f"pacat_{side}", "parec_pacat", sign * ppm, freq, ("application.name", client),
            base / f"pacat_{side}.raw", paced(sign * ppm), pacat_log=base / f"{client}.log",
        )  # fmt: skip
        streams.append(s)
        read_end, write_end = os.pipe()
        s.pipe_fd = write_end
        try:
            s.peer = Peer(["stdout", str(freq), str(s.peer_ppm), str(seconds)], stdout=write_end)
            assert s.pacat_log is not None
            with s.pacat_log.open("wb") as log:
                s.pacat = subprocess.Popen(
                    ["pacat", "--playback", f"--latency-msec={PACAT_LATENCY_MS}", "-v",
                     f"--client-name={client}", f"--stream-name={client}", *RAW_FLAGS],
                    env=dom0.host.full_env(), stdin=read_end, stdout=log, stderr=log,
                )  # fmt: skip
        finally:
            os.close(read_end)
        s.peer.wait_ready(s.name)
    return streams


def find_sink_inputs(pulse: pulsectl.Pulse, streams: list[Stream]) -> bool:
    inputs = pulse.sink_input_list()
    for s in streams:
        prop, value = s.key
        found = [si.index for si in inputs if si.proplist.get(prop) == value]
        s.sink_input = found[0] if found else None
    return all(s.sink_input is not None for s in streams)


def start_recorders(host: PulseAudioServer, streams: list[Stream]) -> None:
    """Each stream's sink input, as the host sink renders it, into a file of its own."""
    for s in streams:
        with s.recording.open("wb") as out:
            s.recorder = subprocess.Popen(
                ["parec", f"--monitor-stream={s.sink_input}",
                 f"--latency-msec={RECORD_LATENCY_MS}", f"--client-name=record-{s.name}",
                 *RAW_FLAGS],
                env=host.full_env(), stdout=out, stderr=subprocess.DEVNULL,
            )  # fmt: skip


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def probe(streams: list[Stream], dom0: Dom0, pulse: pulsectl.Pulse) -> dict[str, dict[str, Any]]:
    """One look at every stream now: {stream: {quantity: value}}."""
    vms: dict[str, Any] = {}
    status_error = None
    try:
        vms = dom0.status()["vms"]
    except (ControlError, OSError) as exc:
        status_error = repr(exc)
    inputs = {}
    for si in pulse.sink_input_list():
        for s in streams:
            if si.proplist.get(s.key[0]) == s.key[1]:
                inputs[s.name] = si
    seen: dict[str, dict[str, Any]] = {}
    for s in streams:
        si = inputs.get(s.name)
        sink_input_ms = None if si is None else (si.buffer_usec + si.sink_usec) / 1000
        look: dict[str, Any] = {"sink_input_ms": sink_input_ms}
        if s.method == "qvaudio":
            vm = vms.get(s.vm or "", {})
            playback, counters = vm.get("playback") or {}, vm.get("counters") or {}
            latency_us = playback.get("latency_us")
            look.update({
                "state": vm.get("state", status_error or "absent"),
                "queued_ms": playback.get("queued_ms"),
                "host_latency_ms": None if latency_us is None else latency_us / 1000,
                "jitter_buffer_ms": playback.get("jitter_buffer_ms"),
                "rate_hz": playback.get("rate_hz"),
                "drift_ppm": playback.get("drift_ppm"),
                "late_drops": playback.get("late_drops"),
                "underruns": counters.get("underruns"),
                "host_underruns": counters.get("host_underruns"),
            })  # fmt: skip
            parts = (look["queued_ms"], sink_input_ms)
        else:
            assert s.pipe_fd is not None
            look["pipe_ms"] = pipe_bytes(s.pipe_fd) / BYTES_PER_MS
            parts = (look["pipe_ms"], sink_input_ms)
        look["depth_ms"] = None if None in parts else sum(p or 0.0 for p in parts)
        seen[s.name] = look
    return seen


def _mean(looks: list[dict[str, Any]], key: str) -> float | None:
    values = [x[key] for x in looks if x.get(key) is not None]
    return round(statistics.fmean(values), 2) if values else None


def _last(looks: list[dict[str, Any]], key: str) -> Any:
    values = [x[key] for x in looks if x.get(key) is not None]
    return values[-1] if values else None


def sample_second(
    streams: list[Stream], dom0: Dom0, pulse: pulsectl.Pulse, t0: float, until: float
) -> None:
    """One row of every stream's series: looks at random moments until `until`, averaged.

    Every queue here is a sawtooth (10 ms chunks, the server's blocks); looked
    at once a second, in step with the chunks, it aliases into a slow ramp
    that is not there. Looks at random moments average it out.
    """
    start = time.monotonic()
    moments = sorted(random.uniform(start, until) for _ in range(LOOKS_PER_SAMPLE))
    looks: dict[str, list[dict[str, Any]]] = {s.name: [] for s in streams}
    for moment in moments:
        time.sleep(max(0.0, moment - time.monotonic()))
        for name, look in probe(streams, dom0, pulse).items():
            looks[name].append(look)
    now = time.monotonic()
    for s in streams:
        with contextlib.suppress(FileNotFoundError):
            s.recorded.append((now, s.recording.stat().st_size))
        ended = s.recorder is not None and s.recorder.poll() is not None
        if ended and s.recorder_ended_at is None:
            s.recorder_ended_at = round(now - t0, 2)
        assert s.peer is not None
        lag_ms, lag_max_ms = s.peer.take_lag()
        mine = looks[s.name]
        depth = _mean(mine, "depth_ms")
        row: dict[str, Any] = {
            "t": round(now - t0, 2),
            "depth_ms": None if depth is None else round(depth + lag_ms, 2),
            "sink_input_ms": _mean(mine, "sink_input_ms"),
            "peer_lag_ms": lag_ms,
            "peer_lag_max_ms": lag_max_ms,
        }
        if s.method == "qvaudio":
            latencies = [x["host_latency_ms"] for x in mine if x["host_latency_ms"] is not None]
            row.update({
                "queued_ms": _mean(mine, "queued_ms"),
                "host_latency_ms": _ms(statistics.median(latencies)) if latencies else None,
                "host_latency_max_ms": _ms(max(latencies)) if latencies else None,
                **{
                    key: _last(mine, key)
                    for key in ("state", "jitter_buffer_ms", "rate_hz", "drift_ppm",
                                "late_drops", "underruns", "host_underruns")
                },
            })  # fmt: skip
        else:
            row["pipe_ms"] = _mean(mine, "pipe_ms")
            row["underruns"] = pacat_underruns(s.pacat_log)
        s.series.append(row)


class IndexedGaps(GapCounter):
    """bench/gaps_bench.py's counter, also keeping where each gap starts in the recording."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        #: (first sample, samples) of each gap, in the order of `found`.
        self.at: list[tuple[int, int]] = []

    def _record(self, start: int, length: int) -> None:
        super()._record(start, length)
        self.at.append((start, length))


def render_clock(
    recorded: list[tuple[float, int]],
) -> tuple[Callable[[float], float], float | None] | None:
    """When the host played each moment of a recording, and how fast it played.

    From (time.monotonic(), bytes recorded by then) once a second: the
    arrival least delayed in each half of the run dates the audio, and the
    two together give the rate at which the host sink took the stream's
    frames, in ppm off nominal against time.monotonic() (None: too short a
    run to tell). Returns (seconds of audio -> monotonic time, ppm), or None
    before anything was recorded.
    """
    points = [(n / FMT.bytes_per_second, t - n / FMT.bytes_per_second) for t, n in recorded if n]
    if not points:
        return None
    half = len(points) // 2
    if half < 5:
        d0 = min(d for _, d in points)
        return (lambda x: d0 + x), None
    x1, d1 = min(points[:half], key=lambda p: p[1])
    x2, d2 = min(points[half:], key=lambda p: p[1])
    slope = (d2 - d1) / (x2 - x1)
    return (lambda x: d1 + x + slope * (x - x1)), round((1 / (1 + slope) - 1) * 1e6, 1)


def heard_gaps(s: Stream, stalls: StallMonitor, t0: float) -> dict[str, Any]:
    """The stream's recording, analysed: its gaps, each placed in time and judged."""
    counter = IndexedGaps(s.name)
    with s.recording.open("rb") as f:
        while block := f.read(FMT.bytes_for_ms(1000)):
            counter.feed(block, 0.0)
    counter.finish()
    clock = render_clock(s.recorded)
    if clock is None or counter.samples == 0:
        return {"recorded_s": round(counter.samples / FMT.rate, 1)}
    played_at, render_ppm = clock
    steady: list[dict[str, Any]] = []
    early = 0
    for (since_onset_s, ms), (first, _) in zip(counter.found, counter.at, strict=True):
        if since_onset_s < STARTUP_S:
            early += 1
            continue
        heard_at = played_at(first / FMT.rate)
        stall = stalls.blame(heard_at)
        cpu = stalls.one_cpu(heard_at)
        steady.append({
            "t": round(heard_at - t0, 2),
            "ms": round(ms, 1),
            "machine_stall": stall is not None and ms / 1000 <= stall.duration_s + STALL_SLACK_S,
            "one_cpu_stall_ms": None if cpu is None else round(cpu.duration_s * 1000, 1),
        })  # fmt: skip
    unexplained = [g for g in steady if not g["machine_stall"]]
    return {
        "recorded_s": round(counter.samples / FMT.rate, 1),
        "host_sink_ppm": render_ppm,
        "gaps": len(steady),
        "gaps_unexplained": len(unexplained),
        "gap_ms_total": round(sum(g["ms"] for g in steady), 1),
        "gap_ms_unexplained": round(sum(g["ms"] for g in unexplained), 1),
        "gaps_in_first_2s": early,
        "gap_list": steady,
    }


def mark_shared(reports: dict[str, dict[str, Any]]) -> None:
    """Note, for every gap, the other streams that had one at the same moment.

    A gap heard in several streams at once came from the host server (or
    the machine), not from how one stream is fed: PulseAudio rewinds its
    sink when a stream stops or starts, and its neighbours can lose a block
    (tests/hostile_harness.py, HostStreamEvents). Then each list is cut to
    its first LISTED gaps.
    """
    for name, report in reports.items():
        listed = report.get("gap_list", [])
        for gap in listed:
            gap["shared_with"] = [
                other
                for other, theirs in reports.items()
                if other != name
                and any(abs(g["t"] - gap["t"]) <= SHARED_S for g in theirs.get("gap_list", []))
            ]
        report["gaps_unexplained_shared"] = sum(
            1 for g in listed if not g["machine_stall"] and g["shared_with"]
        )
    for report in reports.values():
        if "gap_list" in report:
            report["gap_list"] = report["gap_list"][:LISTED]


def _delta(rows: list[dict[str, Any]], key: str) -> int | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return values[-1] - values[0] if values else None


def _slope_per_min(points: list[tuple[float, float]]) -> float | None:
    if len(points) < 3:
        return None
    mt = statistics.fmean(t for t, _ in points)
    mv = statistics.fmean(v for _, v in points)
    var = sum((t - mt) ** 2 for t, _ in points)
    return round(60 * sum((t - mt) * (v - mv) for t, v in points) / var, 2) if var else None


def summary(s: Stream, settle_s: float, gap_report: dict[str, Any]) -> dict[str, Any]:
    rows = s.series
    settled = [
        (r["t"], r["depth_ms"]) for r in rows if r["t"] >= settle_s and r["depth_ms"] is not None
    ]
    depths = [d for _, d in settled]
    out: dict[str, Any] = {"ppm": s.ppm, "peer_ppm": s.peer_ppm, "tone_hz": s.freq}
    # Neither has a fixed target: dom0 holds the queue where it settled 1 s
    # after each (re)start of the host stream, and does not report it; pacat
    # keeps only its server buffer at 20 ms.
    out["queue_target_ms"] = None
    if depths:
        median = statistics.median(depths)
        out["depth_ms"] = {
            "min": min(depths),
            "median": round(median, 2),
            "max": max(depths),
            "max_abs_dev_from_median": round(max(abs(d - median) for d in depths), 2),
            "slope_ms_per_min": _slope_per_min(settled),
            "first": depths[0],
            "last": depths[-1],
        }
    else:
        out["depth_ms"] = None
    if s.method == "qvaudio":
        rates = [r["rate_hz"] for r in rows if r.get("rate_hz") is not None]
        drifts = [r["drift_ppm"] for r in rows if r.get("drift_ppm") is not None]
        out.update({
            "final_drift_ppm": drifts[-1] if drifts else None,
            "final_rate_hz": rates[-1] if rates else None,
            "rate_hz_range": [min(rates), max(rates)] if rates else None,
            "rate_changes_seen": sum(1 for a, b in itertools.pairwise(rates) if a != b),
            "trims": _delta(rows, "late_drops"),
            "underruns": _delta(rows, "underruns"),
            "host_underruns": _delta(rows, "host_underruns"),
            "final_jitter_buffer_ms": rows[-1].get("jitter_buffer_ms") if rows else None,
        })  # fmt: skip
    else:
        # As sampled while the tone played: pacat's end of stream is one too.
        out.update({"trims": None, "underruns": rows[-1]["underruns"] if rows else None})
    out.update(gap_report)
    host_ppm = gap_report.get("host_sink_ppm")
    # The VM's clock against the host sink's as measured (see the module's docstring).
    out["skew_vs_host_sink_ppm"] = (
        None
        if host_ppm is None
        else round(((1 + s.peer_ppm * 1e-6) / (1 + host_ppm * 1e-6) - 1) * 1e6)
    )
    assert s.peer is not None
    out["peer_errors"] = s.peer.errors[-10:]
    return out


def log_problems(text: str, pattern: str, limit: int = 20) -> list[str]:
    found = [ln for ln in text.splitlines() if re.search(pattern, ln)]
    return found[:limit]


def run(base: Path, minutes: float, ppm: float, host_ppm: float) -> dict[str, Any]:
    seconds = minutes * 60
    settle_s = min(SETTLE_S, seconds / 2)
    config = load_config(SHIPPED_CONFIG).dom0
    host = PulseAudioServer("host", base / "host")
    (base / "dom0").mkdir()
    dom0 = Dom0(base / "dom0", host)
    dom0.config = SHIPPED_CONFIG.read_text()  # the shipped defaults, whatever /etc holds
    streams: list[Stream] = []
    pulse: pulsectl.Pulse | None = None
    try:
        host.start()
        dom0.start()
        with StallMonitor() as stalls:
            streams = start_streams(base, dom0, ppm, host_ppm, seconds)
            pulse = pulsectl.Pulse("drift-bench", server=host.server)
            p = pulse
            wait_until(lambda: find_sink_inputs(p, streams), "all four sink inputs", 10)
            start_recorders(host, streams)
            time.sleep(0.5)  # the recorders connect
            t0 = time.monotonic()
            for s in streams:
                assert s.peer is not None
                s.peer.play()
            tick = t0 + SAMPLE_S
            # The last sample a little before the peers stop, so every stream is still there.
            while tick < t0 + seconds - 0.5:
                sample_second(streams, dom0, pulse, t0, tick)
                tick += SAMPLE_S
            for s in streams:
                assert s.peer is not None
                s.peer.done.wait(15)
            time.sleep(1.0)  # the tails reach the recordings
            for s in streams:
                if s.recorder is not None:
                    stop_process(s.recorder)
            stopped_early = {
                s.name: s.recorder_ended_at for s in streams if s.recorder_ended_at is not None
            }
            gaps = {s.name: heard_gaps(s, stalls, t0) for s in streams}
            mark_shared(gaps)
            machine_stalls = [round(x.duration_s * 1000, 1) for x in stalls.whole_machine()]
        return {
            "per_stream": {
                s.name: {
                    "summary": summary(s, settle_s, gaps[s.name]),
                    "series": s.series,
                }
                for s in streams
            },
            "whole_machine_stalls_ms": machine_stalls,
            "recorders_ended_during_run_s": stopped_early,
            "dom0_log_problems": log_problems(
                dom0.log_text(tail=None), r"WARNING|ERROR|CRITICAL|Traceback"
            ),
            "host_server_problems": [
                ln
                for ln in log_problems(host.log_text(limit=200_000), r"\b[EW]: ", limit=200)
                if not re.search(HOST_STARTUP_NOISE, ln)
            ][:20],
            "settings_extra": {
                "settle_s": settle_s,
                "dom0_playback_latency_ms": config.playback_latency_ms,
                "dom0_playback_reserve_ms": config.playback_reserve_ms,
            },
        }
    finally:
        for s in streams:
            if s.peer is not None:
                s.peer.stop()
            for proc in (s.pacat, s.recorder):
                if proc is not None:
                    stop_process(proc, 5)
            if s.pipe_fd is not None:
                os.close(s.pipe_fd)
        if pulse is not None:
            pulse.close()
        dom0.stop()
        host.stop()


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally: all processes stopped


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--ppm", type=float, default=300.0)
    parser.add_argument(
        "--host-ppm",
        type=float,
        default=0.0,
        help="pace every peer this much faster too: the host sink's clock against "
        "time.monotonic() as an earlier run measured it (host_sink_ppm), so that --ppm "
        "is the skew against the host sink",
    )
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _terminate)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    load_before = load_average()
    info = machine()
    with tempfile.TemporaryDirectory(prefix="qv-drift-") as tmp:
        result = run(Path(tmp), args.minutes, args.ppm, args.host_ppm)
    extra = result.pop("settings_extra")
    report = {
        "bench": "drift",
        "started": started,
        "settings": {
            "minutes": args.minutes,
            "ppm": args.ppm,
            "host_ppm": args.host_ppm,
            "tones_hz": {side: freq for side, _, freq in SIDES},
            "pacat_latency_msec": PACAT_LATENCY_MS,
            "sample_s": SAMPLE_S,
            "looks_per_sample": LOOKS_PER_SAMPLE,
            **extra,
            "load_average": {"before": load_before, "after": load_average()},
            "machine": info,
        },
        **result,
    }
    text = json.dumps(report, indent=2)
    if args.json_out is not None:
        args.json_out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
