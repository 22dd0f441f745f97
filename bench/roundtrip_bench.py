"""Round trip, VM -> host speakers -> host microphone -> VM, by impulse onset, over minutes:
what an echo canceller in the VM has to find (issue 14: short and, above all, steady).

    .venv/bin/python -m bench.roundtrip_bench [--minutes 10] [--methods qvaudio,...]

For each method a fresh "VM" and "host" PulseAudio pair (private daemons).
The host's microphone is its default source, the monitor of its null sink,
so whatever reaches the host's speakers comes straight back as microphone
audio: the test bed's loop from speaker to microphone, with no air in it.
In the VM an ordinary player (`PcmStream`, 40 ms buffer) plays 5 ms 1 kHz
bursts 250-350 ms apart (after 2.5 s of silence, `LEAD_IN_S`) into the
VM's default sink, and an ordinary recorder (10 ms fragments) records the
VM's default source. Methods:

* qvaudio: both agents (shipped qvaudio.yaml), a policy allowing playback
  and capture; the VM's defaults are the guest's qvaudio_out / qvaudio_mic.
* parec_pacat: two bridges, `parec | pacat` from the VM sink's monitor to
  the host sink and from the host microphone into a second VM null sink
  whose monitor is the VM's default source (so the VM cannot hear itself
  except through the host).
* tunnel: module-tunnel-sink to the host sink and module-tunnel-source from
  the host microphone, loaded in the VM server as its defaults.

Per impulse: the VM recorder's onset (timed by when its reads returned,
smoothed over 2 s as in latency_bench) minus the onset on the VM sink's
monitor (stamped with capture time): the round trip from the moment the VM
server played the sound. Also split at the host microphone. Reported:
median, p1, p99, p99 - p1 (an AEC block is 4 ms) and the median of each
minute (drift would show as a trend). Every impulse is counted. Machine
stalls are measured in the same run. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.capture_bench import (
    AppRecorder,
    _guest_mic,
    _setup_qvaudio,
    running,
    wait_capture_flows,
)
from bench.latency_bench import _cpu_seconds, impulse_train, onset_times, pair_up, schedule
from bench.pipeline import (
    FMT,
    PACAT_LATENCY_MS,
    PAREC_LATENCY_MS,
    RAW_FLAGS,
    Recorder,
    Route,
    load_average,
    pactl,
    play,
    run_methods,
    wait_for,
)
from qvaudio.pulse.private import SINK, PrivatePulse
from tests.stalls import StallMonitor

METHODS = ("qvaudio", "parec_pacat", "tunnel")
HOST_MIC = f"{SINK}.monitor"
VM_MIC_SINK = "mic_in"
TUNNEL_SINK, TUNNEL_SOURCE = "tunnel_out", "tunnel_mic"
#: Impulses this far apart on average (latency_bench's schedule).
SPACING_S = 0.3
#: Silence the player plays before the first impulse. The VM sink resumes
#: when the player's stream appears, and a recorder of its monitor stamps
#: what it reads in the first seconds after a resume up to 2 s early (seen:
#: the first 11 clicks "heard" 2.0 s to 0.1 s before the schedule put them,
#: while the host microphone had every one on schedule): those clicks came
#: out 70-150 ms "late" or unpaired. The guest still wakes on the first
#: click, as it does for any sound after silence.
LEAD_IN_S = 2.5


def _bridge(route: Route, src: tuple[PrivatePulse, str], dst: tuple[PrivatePulse, str]) -> None:
    read_end, write_end = os.pipe()
    try:
        with route.logs[0].open("ab") as log:
            route.procs.append(subprocess.Popen(
                ["parec", f"--device={src[1]}", f"--latency-msec={PAREC_LATENCY_MS}",
                 "--client-name=bridge", *RAW_FLAGS],
                env=src[0].full_env(), stdout=write_end, stderr=log,
            ))  # fmt: skip
            route.procs.append(subprocess.Popen(
                ["pacat", "--playback", f"--device={dst[1]}",
                 f"--latency-msec={PACAT_LATENCY_MS}", "--client-name=bridge", *RAW_FLAGS],
                env=dst[0].full_env(), stdin=read_end, stderr=log,
            ))  # fmt: skip
    finally:
        os.close(read_end)
        os.close(write_end)


def _setup_bridges(route: Route, root: Path) -> None:
    route.vm_monitor = f"{SINK}.monitor"
    route.logs = [root / "bridges.log"]
    route.settings = {
        "parec_latency_msec": PAREC_LATENCY_MS,
        "pacat_latency_msec": PACAT_LATENCY_MS,
    }
    pactl(route.vm, "load-module", "module-null-sink", f"sink_name={VM_MIC_SINK}",
          f"rate={FMT.rate}", f"channels={FMT.channels}")  # fmt: skip
    pactl(route.vm, "set-default-source", f"{VM_MIC_SINK}.monitor")
    _bridge(route, (route.vm, f"{SINK}.monitor"), (route.host, SINK))
    _bridge(route, (route.host, HOST_MIC), (route.vm, VM_MIC_SINK))


def _setup_tunnels(route: Route, root: Path) -> None:
    common = f"server={route.host.server} rate={FMT.rate} channels={FMT.channels} format=s16le"
    sink_args = f"{common} sink={SINK} sink_name={TUNNEL_SINK}"
    source_args = f"{common} source={HOST_MIC} source_name={TUNNEL_SOURCE}"
    route.settings = {"modules": {"module-tunnel-sink": sink_args,
                                  "module-tunnel-source": source_args}}  # fmt: skip
    pactl(route.vm, "load-module", "module-tunnel-sink", *sink_args.split())
    pactl(route.vm, "load-module", "module-tunnel-source", *source_args.split())
    wait_for("the tunnels", lambda: TUNNEL_SOURCE in pactl(route.vm, "list", "short", "sources")
             and TUNNEL_SINK in pactl(route.vm, "list", "short", "sinks"), 10)  # fmt: skip
    pactl(route.vm, "set-default-sink", TUNNEL_SINK)
    pactl(route.vm, "set-default-source", TUNNEL_SOURCE)
    route.vm_monitor = f"{TUNNEL_SINK}.monitor"


def _setup_qvaudio_both_ways(route: Route, root: Path) -> None:
    _setup_qvaudio(route, root)
    route.vm_monitor = "qvaudio_out.monitor"


#: How each method joins the pair; each says where the VM's sink is recorded.
_SETUP: dict[str, Callable[[Route, Path], None]] = {
    "qvaudio": _setup_qvaudio_both_ways,
    "parec_pacat": _setup_bridges,
    "tunnel": _setup_tunnels,
}


def _pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1000, 2)


def _summary(delays: list[float | None]) -> dict[str, Any]:
    got = [d for d in delays if d is not None]
    if not got:
        return {"median": None}
    p1, p99 = _pct(got, 1), _pct(got, 99)
    return {
        "median": round(statistics.median(got) * 1000, 2),
        "p1": p1,
        "p99": p99,
        "p99_minus_p1": round(p99 - p1, 2),
        "min": round(min(got) * 1000, 2),
        "max": round(max(got) * 1000, 2),
    }


def measure(method: str, base: Path, minutes: float) -> dict[str, Any]:
    load_before = load_average()
    impulses = max(10, int(minutes * 60 / SPACING_S))
    lead_in = int(LEAD_IN_S * FMT.rate)
    starts = [frame + lead_in for frame in schedule(impulses)]
    with running(method, base, method, _SETUP[method]) as route:
        sink_rec = Recorder(route.vm, route.vm_monitor, "vm-sink")
        host_rec = Recorder(route.host, HOST_MIC, "host-mic")
        app_rec = AppRecorder(route.vm, "vm-app")
        try:
            for rec in (sink_rec, host_rec, app_rec):
                rec.started.wait(10)
                if rec.error is not None:
                    raise rec.error
            wait_capture_flows(route)
            time.sleep(1.5)
            with StallMonitor() as stalls:
                cpu_before = _cpu_seconds(route)
                played_from = time.monotonic()
                player, _ = play(route.vm, impulse_train(starts))
                player.join(impulses * SPACING_S * 1.5 + 60)
                played_s = time.monotonic() - played_from
                cpu_used = {k: v - cpu_before[k] for k, v in _cpu_seconds(route).items()}
                time.sleep(1.0)
                machine_stalls = stalls.whole_machine()
            guest_mic = _guest_mic(route)
        finally:
            for rec in (sink_rec, host_rec, app_rec):
                rec.stop()
        for rec in (sink_rec, host_rec, app_rec):
            if rec.error is not None:
                raise rec.error
        settings = route.settings
    sink_times, _ = onset_times(sink_rec)
    host_times, _ = onset_times(host_rec)
    app_times_, _ = onset_times(app_rec.by_reads())
    _, round_trip = pair_up(sink_times, app_times_)
    _, to_host = pair_up(sink_times, host_times)
    per_minute = []
    per = max(1, int(60 / SPACING_S))
    for i in range(0, len(round_trip), per):
        minute = [d for d in round_trip[i : i + per] if d is not None]
        per_minute.append(round(statistics.median(minute) * 1000, 2) if minute else None)
    return {
        "method": method,
        "settings": settings,
        "impulses_played": impulses,
        "impulses_on_vm_sink": len(sink_times),
        "round_trip_ms": _summary(round_trip),
        "missed": sum(d is None for d in round_trip),
        "vm_sink_to_host_mic_ms": _summary(to_host),
        "per_minute_median_ms": per_minute,
        "cpu_pct_of_one_core": {k: round(100 * v / played_s, 2) for k, v in cpu_used.items()},
        "machine_stalls": len(machine_stalls),
        "machine_stall_ms_max": round(
            max((s.duration_s for s in machine_stalls), default=0.0) * 1000, 1
        ),
        "guest_mic_after": guest_mic,
        "per_impulse_round_trip_ms": [
            None if d is None else round(d * 1000, 1) for d in round_trip
        ],
        "per_impulse_vm_sink_to_host_mic_ms": [
            None if d is None else round(d * 1000, 1) for d in to_host
        ],
        "load_avg_before": load_before,
        "load_avg_after": load_average(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    run_methods(
        parser,
        METHODS,
        "round trip VM sink -> host sink -> host microphone -> VM recorder",
        lambda method, base, args: measure(method, base, args.minutes),
    )


if __name__ == "__main__":
    main()
