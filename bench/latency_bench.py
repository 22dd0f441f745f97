"""Added latency, VM sink to host sink, by impulse onset: qvaudio beside a
`parec | pacat` bridge and PulseAudio's module-tunnel-sink, in one run.

    .venv/bin/python -m bench.latency_bench [--impulses 100] [--no-extra]

For each method, a fresh "VM" and "host" PulseAudio pair (private daemons);
an ordinary client (`qvaudio.pulse.pcm.PcmStream`, 40 ms buffer) plays 1 kHz bursts of 5 ms into
the VM's default sink, 250-350 ms apart (irregular, so that no impulse can be
paired with its neighbour whatever the latency). The VM sink's monitor and
the host sink's monitor are recorded at the same time; every 10 ms chunk is
stamped with when its last sample was captured (time.monotonic() minus the
record stream's latency), and each onset's time comes from the median of
those stamps over the surrounding 2 s. Reported per method: median, p99 and
max of (host onset - VM onset); the same from the player's write of each
impulse to the host (the fair figure for the tunnel, whose own monitor is
filled in bursts and is no clock); and impulses missed on the host (no
onset within 100 ms of the usual delay). Every impulse is counted: the
first comes 0.3 s after the player's stream starts on an idle VM sink,
which is when users hear the start of a sound; the first 5 (the first
1.5 s) are also reported on their own, and so are the rest.

CPU: utime+stime of the method's own processes (both agents; parec and
pacat; none for the tunnel, which runs inside the servers) and of each
server, from the player's start to its end, as % of one core.

Rows marked "non-default" rerun qvaudio with smaller buffers to show the
trade-off (--no-extra skips them). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bench.pipeline import (
    FMT,
    METHODS,
    Recorder,
    Route,
    load_average,
    machine,
    percentile,
    play,
    proc_cpu_seconds,
    running,
)

BURST_HZ = 1000.0
BURST_MS = 5
AMPLITUDE = 0.5
THRESHOLD = 0.1
#: The impulses reported on their own as the start of a sound (the first 1.5 s).
FIRST = 5
#: Seconds after the recorders start before their stamps are trusted.
SETTLE_S = 1.5
#: An onset is the first loud sample after at least this much quiet.
QUIET_BEFORE_S = 0.1
CHUNK = FMT.bytes_for_ms(10)
EXTRA_ROWS: dict[str, dict[str, tuple[str, ...]]] = {
    "qvaudio, non-default: guest --no-report-latency": {"guest_args": ("--no-report-latency",)},
    "qvaudio, non-default: dom0 --latency-ms 10": {"dom0_args": ("--latency-ms", "10")},
    "qvaudio, non-default: guest --period-ms 5, dom0 --latency-ms 10": {
        "guest_args": ("--period-ms", "5"),
        "dom0_args": ("--latency-ms", "10"),
    },
}


def schedule(count: int) -> list[int]:
    """Frame index of each impulse: 300 ms apart on average, +-40 ms in a fixed pattern."""
    frames, at = [], int(0.3 * FMT.rate)
    for k in range(count):
        frames.append(at)
        at += int((0.3 + ((k * 37) % 81 - 40) / 1000) * FMT.rate)
    return frames


def impulse_train(starts: list[int]) -> Iterator[bytes]:
    """The whole signal, 10 ms at a time: silence with a burst at each start frame."""
    burst_frames = FMT.rate * BURST_MS // 1000
    t = np.arange(burst_frames) / FMT.rate
    burst = np.round(AMPLITUDE * 32767 * np.sin(2 * np.pi * BURST_HZ * t)).astype("<i2")
    total = starts[-1] + int(0.5 * FMT.rate)
    signal = np.zeros((total, FMT.channels), dtype="<i2")
    for start in starts:
        signal[start : start + burst_frames] = burst[:, None]
    pcm = signal.tobytes()
    for pos in range(0, len(pcm), CHUNK):
        yield pcm[pos : pos + CHUNK].ljust(CHUNK, b"\0")


def onset_times(recorder: Recorder) -> tuple[list[float], dict[str, float]]:
    """Capture time of every impulse onset in a recording, and how steady the stamps were."""
    frames_per_chunk = CHUNK // FMT.frame_size
    pcm = b"".join(recorder.chunks)
    left = np.frombuffer(pcm, dtype="<i2")[:: FMT.channels].astype(np.float32) / 32768
    loud = np.flatnonzero(np.abs(left) > THRESHOLD)
    if loud.size == 0:
        return [], {}
    quiet = int(QUIET_BEFORE_S * FMT.rate)
    onsets = loud[np.concatenate(([True], np.diff(loud) > quiet))]
    # Where sample 0 would have been captured, according to each chunk's stamp.
    ends = (np.arange(len(recorder.stamps)) + 1) * frames_per_chunk
    origin = np.asarray(recorder.stamps) - ends / FMT.rate
    # A new monitor stream hands over its first second or so in a lump, with
    # stamps that say nothing; the signal starts later than that anyway.
    settle = int(SETTLE_S * 100)
    origin[:settle] = origin[settle] if len(origin) > settle else origin[:settle]
    times = []
    for n in onsets:
        k = int(n) // frames_per_chunk
        near = origin[max(0, k - 100) : k + 100]
        times.append(float(np.median(near)) + int(n) / FMT.rate)
    centred = (origin - np.median(origin)) * 1000
    spread = {
        "stamp_spread_p1_ms": round(float(np.percentile(centred, 1)), 2),
        "stamp_spread_p99_ms": round(float(np.percentile(centred, 99)), 2),
    }
    return times, spread


def pair_up(vm: list[float], host: list[float]) -> tuple[float | None, list[float | None]]:
    """The common lag (the most frequent host-VM difference), then each VM onset's delay.

    An impulse with no host onset within 100 ms of the common lag is missed (None).
    """
    diffs = [h - v for v in vm for h in host if 0 <= h - v < 2.0]
    if not diffs:
        return None, [None] * len(vm)
    bins: dict[int, int] = {}
    for d in diffs:
        bins[int(d * 500)] = bins.get(int(d * 500), 0) + 1
    best = max(bins, key=lambda b: (bins[b], -b))
    lag = statistics.median(d for d in diffs if int(d * 500) in (best - 1, best, best + 1))
    delays: list[float | None] = []
    for v in vm:
        near = [h - v for h in host if abs(h - v - lag) < 0.1]
        delays.append(min(near, key=lambda d: abs(d - lag)) if near else None)
    return lag, delays


def app_times(starts: list[int], writes: list[tuple[float, int]]) -> list[float]:
    """When the player handed each impulse to its server, on the writes' real-time pace.

    A write returns once the server has taken it, and the player's buffer
    is full from the first 40 ms on, so writes return at real-time pace;
    the median over the surrounding 2 s absorbs scheduling noise.
    """
    t = np.asarray([w[0] for w in writes])
    frames = np.asarray([w[1] for w in writes]) / FMT.frame_size
    origin = t - frames / FMT.rate
    out = []
    for n in starts:
        k = int(np.searchsorted(frames, n))
        out.append(float(np.median(origin[max(0, k - 100) : k + 100])) + n / FMT.rate)
    return out


def stats_ms(values: list[float | None]) -> dict[str, float | None]:
    ms = [v * 1000 for v in values if v is not None]
    if not ms:
        return {"median": None, "p99": None, "min": None, "max": None}
    return {
        "median": round(statistics.median(ms), 2),
        "p99": round(percentile(ms, 99), 2),
        "min": round(min(ms), 2),
        "max": round(max(ms), 2),
    }


def measure(method: str, base: Path, label: str, impulses: int, **kwargs: Any) -> dict[str, Any]:
    starts = schedule(impulses)
    load_before = load_average()
    with running(method, base, label, **kwargs) as route:
        vm_rec = Recorder(route.vm, route.vm_monitor, "vm-monitor")
        host_rec = Recorder(route.host, route.host_monitor, "host-monitor")
        for rec in (vm_rec, host_rec):
            rec.started.wait(10)
            if rec.error is not None:
                raise rec.error
        # A new monitor stream settles its latency over the first second or so.
        time.sleep(SETTLE_S + 0.5)
        cpu_before = _cpu_seconds(route)
        played_from = time.monotonic()
        player, writes = play(route.vm, impulse_train(starts))
        player.join(len(starts) * 0.4 + 30)
        cpu_used = {k: v - cpu_before[k] for k, v in _cpu_seconds(route).items()}
        played_s = time.monotonic() - played_from
        time.sleep(1.0)
        vm_rec.stop()
        host_rec.stop()
        status = route.dom0_status()
        guest_status = _guest_status(route)
    app = app_times(starts, writes)
    vm_times, vm_spread = onset_times(vm_rec)
    host_times, host_spread = onset_times(host_rec)
    _, to_vm = pair_up(app, vm_times)
    _, to_host = pair_up(app, host_times)
    sink_to_sink = [
        None if v is None or h is None else h - v for v, h in zip(to_vm, to_host, strict=True)
    ]
    result: dict[str, Any] = {
        "method": method,
        "settings": route.settings,
        "impulses_counted": impulses,
        "vm_sink_to_host_sink_ms": stats_ms(sink_to_sink),
        f"first_{FIRST}_vm_sink_to_host_sink_ms": stats_ms(sink_to_sink[:FIRST]),
        f"after_first_{FIRST}_vm_sink_to_host_sink_ms": stats_ms(sink_to_sink[FIRST:]),
        "missed_on_host": sum(h is None for h in to_host),
        "missed_in_vm_monitor": sum(v is None for v in to_vm),
        "app_to_host_sink_ms": stats_ms(to_host),
        "app_to_vm_sink_ms": stats_ms(to_vm),
        "cpu_pct_of_one_core": {k: round(100 * v / played_s, 2) for k, v in cpu_used.items()},
        "vm_monitor_stamps": vm_spread,
        "host_monitor_stamps": host_spread,
        "load_avg_before": load_before,
        "load_avg_after": load_average(),
        "per_impulse_vm_sink_to_host_sink_ms": [
            None if d is None else round(d * 1000, 1) for d in sink_to_sink
        ],
    }
    if status is not None:
        result["dom0_status_playback"] = _playback_summary(status)
    if guest_status is not None:
        result["guest_status"] = {
            k: guest_status.get(k)
            for k in ("latency_us", "reported_latency_us", "dropped_bytes", "state")
        }
    return result


def _cpu_seconds(route: Route) -> dict[str, float]:
    """CPU used so far by the method's own processes, and by each server."""
    own = 0.0
    for proc in route.procs:
        with contextlib.suppress(OSError):
            own += proc_cpu_seconds(proc.pid)
    servers = {}
    for name, server in (("vm_server", route.vm), ("host_server", route.host)):
        assert server.proc is not None, f"{name} is not running"
        servers[name] = proc_cpu_seconds(server.proc.pid)
    return {"method_processes": own, **servers}


def _guest_status(route: Route) -> dict[str, Any] | None:
    """The guest agent's status file, which holds its own end-to-end latency estimate."""
    if route.method != "qvaudio":
        return None
    path = Path(route.vm.env["XDG_RUNTIME_DIR"]) / "qvaudio" / "guest-status.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _playback_summary(status: dict[str, Any]) -> dict[str, Any]:
    for vm in status.get("vms", {}).values():
        playback = vm.get("playback") or {}
        keep = ("latency_us", "underruns", "late_drops", "format")
        return {k: playback.get(k) for k in keep if k in playback}
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--impulses", type=int, default=100)
    parser.add_argument("--no-extra", action="store_true", help="skip the non-default rows")
    parser.add_argument(
        "--vm-server", choices=("pulseaudio", "pipewire"), default="pulseaudio",
        help="the VM's audio server",
    )  # fmt: skip
    args = parser.parse_args()
    rows: dict[str, Any] = {}
    out: dict[str, Any] = {
        "benchmark": "added latency, VM sink monitor -> host sink monitor, by impulse onset",
        "machine": machine(),
        "vm_server": args.vm_server,
        "signal": f"{BURST_MS} ms {BURST_HZ:g} Hz bursts, amplitude {AMPLITUDE}, 250-350 ms apart",
        "threshold": THRESHOLD,
        "impulses_reported_as_the_start": FIRST,
        "rows": rows,
    }
    with tempfile.TemporaryDirectory(prefix="qvaudio-latency-") as tmp:
        base = Path(tmp)
        for i, method in enumerate(METHODS):
            rows[f"{method} (default)" if method == "qvaudio" else method] = measure(
                method, base, f"m{i}", args.impulses, vm_kind=args.vm_server
            )
        if not args.no_extra:
            for i, (name, kwargs) in enumerate(EXTRA_ROWS.items()):
                rows[name] = measure(
                    "qvaudio", base, f"x{i}", args.impulses, vm_kind=args.vm_server, **kwargs
                )
    out["load_avg_end"] = load_average()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
