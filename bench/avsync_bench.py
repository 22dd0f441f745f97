"""A/V sync as a video player in the VM would get it: does a click land on the host when
the player's own latency query says it will? (issue 14)

    .venv/bin/python -m bench.avsync_bench [--impulses 100] [--methods qvaudio,...]
        [--vm-server pulseaudio|pipewire] [--stall-ms MS --stall-at S]

With `--impulses 400 --stall-ms 300` it is issue 14's reported-versus-
measured run: two minutes of clicks, the host's server stopped for 300 ms
40 s in (dom0's host stream runs dry and its reserve grows: the true
latency changes mid-stream), and the error given per 10 s (`per_10_s`)
with what the player read, so a reported figure that does not follow the
change shows as a step in the error.

For each method (bench/pipeline.py's: qvaudio with both agents, `parec |
pacat`, module-tunnel-sink), a fresh VM/host pair of private PulseAudio
daemons. A player in the VM, an ordinary client (`PcmStream`, 40 ms
buffer) playing into the VM's default sink, does what a video player does
to place its frames: after every write it asks its stream's latency
(`PcmStream.latency_us`, libpulse's timing info: what `pa_stream_get_latency`
reports) and so predicts when the frame it just wrote will be heard:
write time + latency - (frames written after that frame) / rate. It plays
5 ms 1 kHz clicks 250-350 ms apart (latency_bench's schedule). The host
sink's monitor (the "speaker") is recorded with capture stamps.

Per click: host onset minus the player's prediction (predictions smoothed
over the surrounding 2 s of writes, as latency_bench smooths write
times). Zero means a player would be in sync; qvaudio's error is the part of
the path its virtual sink does not report (docs/architecture.md,
"Latency: where it is measured, and where it is reported"). Every click is
counted. Beside it, the host sink's own latency figure sampled every 0.2 s
(`host_sink_own_latency_ms`): what the test bed's null-sink "speaker"
hears early (see `SinkLatencySampler`). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pulsectl

from bench.latency_bench import SETTLE_S, impulse_train, onset_times, schedule, stats_ms
from bench.pipeline import FMT, Recorder, ServerAddress, load_average, run_methods, running
from qvaudio.pulse.pcm import PcmStream
from qvaudio.pulse.private import SINK

METHODS = ("qvaudio", "parec_pacat", "tunnel_sink")
#: How often the host sink's own latency is sampled.
SINK_LATENCY_EVERY_S = 0.2
#: Predictions this far either side of a click are smoothed into its own.
SMOOTH_S = 1.0


def stamping_player(
    server: ServerAddress, starts: list[int]
) -> tuple[threading.Thread, list[tuple[float, int, float]]]:
    """Plays the clicks; after each write, (time, frames written, the stream's latency in s)."""
    marks: list[tuple[float, int, float]] = []

    def run() -> None:
        frames = 0
        with PcmStream.playback(
            server.server, None, FMT, "bench-video-player", "movie", FMT.bytes_for_ms(40)
        ) as stream:
            for chunk in impulse_train(starts):
                stream.write(chunk)
                frames += len(chunk) // FMT.frame_size
                marks.append((time.monotonic(), frames, stream.latency_us() / 1e6))
            stream.drain()

    thread = threading.Thread(target=run, name="video-player", daemon=True)
    thread.start()
    return thread, marks


def predictions(starts: list[int], marks: list[tuple[float, int, float]]) -> list[float]:
    """When the player expects each click to be heard."""
    t = np.asarray([m[0] for m in marks])
    frames = np.asarray([m[1] for m in marks], dtype=float)
    latency = np.asarray([m[2] for m in marks])
    # When frame 0 would be heard, according to each write.
    origin = t + latency - frames / FMT.rate
    out = []
    for n in starts:
        at = n / FMT.rate
        near = np.abs(frames / FMT.rate - at) <= SMOOTH_S
        out.append(float(np.median(origin[near])) + at)
    return out


def heard_minus_predicted(predicted: list[float], heard: list[float]) -> list[float | None]:
    """Per prediction, the nearest onset heard minus it; None if none is within 300 ms
    (clicks are at least 260 ms apart, and a lost click must not pair with the next)."""
    errors: list[float | None] = []
    for p in predicted:
        near = [h - p for h in heard if abs(h - p) < 0.3]
        errors.append(min(near, key=abs) if near else None)
    return errors


def stall_host(route: Any, after_s: float, stall_ms: int) -> threading.Thread:
    """Stop the host's audio server for `stall_ms` after `after_s`: the true latency
    changes mid-stream (dom0's reserve grows when its host stream runs dry)."""

    def run() -> None:
        time.sleep(after_s)
        pid = route.host.proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(stall_ms / 1000)
        finally:
            os.kill(pid, signal.SIGCONT)

    thread = threading.Thread(target=run, name="host-stall", daemon=True)
    thread.start()
    return thread


class SinkLatencySampler:
    """The host sink's own latency figure, sampled while the clicks play.

    The test bed's "speaker" is a null sink's monitor, which gets each block
    when the sink renders it, while the sink (and so dom0's host stream,
    and every figure built on it) counts the block as heard only when it
    would have finished playing on a real card. Sampled in the same run,
    this is the part of an over-report that the test bed itself makes."""

    def __init__(self, server: ServerAddress, sink: str) -> None:
        self._server = server.server
        self._sink = sink
        self.samples_ms: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sink-latency", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with pulsectl.Pulse("bench-sink-latency", server=self._server) as pulse:
            while not self._stop.wait(SINK_LATENCY_EVERY_S):
                sink = pulse.get_sink_by_name(self._sink)
                self.samples_ms.append(sink.latency / 1000)

    def stop(self) -> dict[str, Any] | None:
        self._stop.set()
        self._thread.join(5)
        if not self.samples_ms:
            return None
        ordered = sorted(self.samples_ms)
        return {
            "samples": len(ordered),
            "median": round(statistics.median(ordered), 2),
            "min": round(ordered[0], 2),
            "max": round(ordered[-1], 2),
        }


def windows(
    starts: list[int], errors: list[float | None], marks: list[tuple[float, int, float]]
) -> list[dict[str, Any]]:
    """Per 10 s of the clicks: the error, and what the player read as its latency."""
    out = []
    span = 10 * FMT.rate
    for first in range(0, starts[-1] + 1, span):
        picked = [e for n, e in zip(starts, errors, strict=True) if first <= n < first + span]
        read = [m[2] * 1000 for m in marks if first <= m[1] < first + span]
        out.append({
            "from_s": first // FMT.rate,
            "heard_minus_predicted_ms": stats_ms(picked),
            "player_read_ms_median": round(statistics.median(read), 1) if read else None,
        })  # fmt: skip
    return out


def measure(
    method: str, base: Path, impulses: int, vm_kind: str, stall_at_s: float = 0,
    stall_ms: int = 0,
) -> dict[str, Any]:  # fmt: skip
    starts = schedule(impulses)
    load_before = load_average()
    with running(method, base, method, vm_kind=vm_kind) as route:
        host_rec = Recorder(route.host, route.host_monitor, "host-monitor")
        host_rec.started.wait(10)
        if host_rec.error is not None:
            raise host_rec.error
        time.sleep(SETTLE_S + 0.5)
        sink_latency = SinkLatencySampler(route.host, SINK)
        player, marks = stamping_player(route.vm, starts)
        if stall_ms:
            stall_host(route, stall_at_s, stall_ms)
        player.join(len(starts) * 0.4 + 30)
        host_sink_latency = sink_latency.stop()
        time.sleep(1.0)
        host_rec.stop()
        settings = route.settings
    if host_rec.error is not None:
        raise host_rec.error
    predicted = predictions(starts, marks)
    heard, _ = onset_times(host_rec)
    errors = heard_minus_predicted(predicted, heard)
    reported = [m[2] * 1000 for m in marks]
    return {
        "method": method,
        "vm_server": vm_kind,
        "settings": settings,
        "impulses_counted": impulses,
        "heard_minus_predicted_ms": stats_ms(errors),
        "abs_error_ms": stats_ms([None if e is None else abs(e) for e in errors]),
        "unpaired": sum(e is None for e in errors),
        "player_reported_latency_ms": {
            "median": round(statistics.median(reported), 1),
            "min": round(min(reported), 1),
            "max": round(max(reported), 1),
        },
        "host_sink_own_latency_ms": host_sink_latency,
        "stall": {"at_s": stall_at_s, "ms": stall_ms} if stall_ms else None,
        "per_10_s": windows(starts, errors, marks),
        "per_impulse_heard_minus_predicted_ms": [
            None if e is None else round(e * 1000, 1) for e in errors
        ],
        "load_avg_before": load_before,
        "load_avg_after": load_average(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--impulses", type=int, default=100)
    parser.add_argument(
        "--vm-server", choices=("pulseaudio", "pipewire"), default="pulseaudio",
        help="the VM's audio server (on PipeWire qvaudio reports the path behind its output)",
    )  # fmt: skip
    parser.add_argument(
        "--stall-ms",
        type=int,
        default=0,
        help="stop the host's audio server this long mid-run (0: never)",
    )
    parser.add_argument("--stall-at", type=float, default=40.0,
                        help="seconds into the clicks to stall the host")  # fmt: skip
    run_methods(
        parser,
        METHODS,
        "A/V sync: a VM player's own latency-based prediction vs the host sink",
        lambda method, base, args: measure(
            method, base, args.impulses, args.vm_server, args.stall_at, args.stall_ms
        ),
    )


if __name__ == "__main__":
    main()
