"""Microphone path latency, host microphone to a VM application, by impulse onset:
qvaudio beside a `parec | pacat` bridge and PulseAudio's module-tunnel-source,
in one run.

    .venv/bin/python -m bench.capture_bench [--impulses 100] [--first-audio-trials 5]
        [--vm-server pulseaudio|pipewire] [--methods qvaudio,qvaudio_no_node,...]

For each method, a fresh "VM" and "host" PulseAudio pair (private daemons).
The host's "microphone" is its default source, made the monitor of its null
sink; the VM application is an ordinary client (`qvaudio.pulse.pcm.PcmStream`, 10 ms fragments)
recording the VM's *default* source, which each method sets up:

* qvaudio: both agents (shipped qvaudio.yaml, Unix-socket transport), a
  policy with `capture: allow`; the VM's default source is the guest's
  virtual microphone (qvaudio_mic), and dom0 records the host's default
  source once the application opens it.
* qvaudio_no_node: the same with the guest's `--no-report-latency`: on a
  PipeWire VM its devices are then a null sink and a remapped monitor, as
  on PulseAudio, instead of the agent's own nodes (on a PulseAudio VM the
  same as qvaudio).
* parec_pacat: `parec` on the host monitor (--latency-msec=10) piped into
  `pacat` (--latency-msec=20) playing into the VM's null sink, whose monitor
  is made the VM's default source (bench/pipeline.py's bridge, reversed).
* tunnel_source: module-tunnel-source in the VM server pointing at the host
  monitor (48 kHz, 2 ch, s16le), made the VM's default source.

Two measurements per method, on the same pair of servers:

1. Time to first audio, first (so that qvaudio's first trial is the first
   capture dom0 ever opens): the host plays a continuous 1 kHz tone into its
   sink, and the bench waits until a recorder on the host microphone hears
   it (a fresh server can take ~2 s to start a stream) plus 0.5 s. Then the
   VM application opens its record stream (for qvaudio, that is what asks
   dom0 for the microphone) and reads until a chunk holds a sample of the
   tone. Reported per trial: ms from just before the application opens the
   stream to the read that returned the first tone sample (what the
   application sees), and to the stream being ready. Between trials the
   application closes and, for qvaudio, the bench waits until dom0 has
   stopped capturing, then 1 s more so that nothing left in a buffer can
   pass for a fast start.
2. Latency: with the application recording (and, for qvaudio, dom0's
   capture running and sending), a player on the host plays 1 kHz bursts of
   5 ms into the host's sink, 250-350 ms apart (latency_bench's schedule:
   irregular, so no impulse can be paired with its neighbour). The host
   microphone (its sink's monitor) and the VM application are recorded at
   the same time, in 10 ms chunks. A host chunk is stamped with when its
   last sample was captured (time.monotonic() minus the record stream's
   latency); a VM chunk with when the application's read of it returned.
   Each onset's time comes from the median of those times over the
   surrounding 2 s (latency_bench's onset_times), which absorbs scheduling
   noise. Per impulse: VM application onset - host microphone onset, the
   headline figure. Also given: the same to the VM *source* (the VM chunks'
   capture stamps instead of read times, i.e. without the application's own
   record buffer; not a clock for the tunnel, whose source reports a latency
   that puts its audio before the host's), and from the player's write of
   each impulse. Every impulse is counted (the first plays 0.3 s after the
   player's stream starts); the first 5 are also reported on their own.
   Missed: no onset in the VM within 100 ms of the usual delay
   (latency_bench's pair_up).

CPU: utime+stime of the method's own processes (both agents; parec and
pacat; none for the tunnel, which runs inside the servers) and of each
server, from the impulse player's start to its end, as % of one core.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from bench.drift_bench import STALL_SLACK_S, IndexedGaps
from bench.gaps_bench import STARTUP_S
from bench.latency_bench import (
    AMPLITUDE,
    BURST_HZ,
    BURST_MS,
    CHUNK,
    FIRST,
    SETTLE_S,
    THRESHOLD,
    _cpu_seconds,
    _guest_status,
    app_times,
    impulse_train,
    onset_times,
    pair_up,
    schedule,
    stats_ms,
)
from bench.pipeline import (
    FMT,
    PACAT_LATENCY_MS,
    PAREC_LATENCY_MS,
    RAW_FLAGS,
    REPO,
    Recorder,
    Route,
    _agent,
    _has_sink_input,
    _quiet,
    load_average,
    machine,
    pactl,
    play,
    vm_server,
    wait_for,
    write_policy,
)
from qvaudio.core.tone import generate_sine
from qvaudio.pulse.pcm import PcmStream, PulseError
from qvaudio.pulse.private import SINK, PrivatePulse
from tests.stalls import StallMonitor

METHODS = ("qvaudio", "qvaudio_no_node", "parec_pacat", "tunnel_source")
VM_NAME = "bench-vm"
GUEST_SOURCE = "qvaudio_mic"
TUNNEL_SOURCE = "tunnel_mic"
HOST_MIC = f"{SINK}.monitor"
POLICY = """\
rules:
  - vm: '*'
    playback: allow
    capture: allow
"""
#: How long a first-audio trial waits for the tone before calling it missed.
FIRST_AUDIO_TIMEOUT_S = 10.0
#: After a trial (and qvaudio's capture has stopped), before the next one.
BETWEEN_TRIALS_S = 1.0


def default_source(server: PrivatePulse) -> str:
    return pactl(server, "get-default-source").strip()


# -- the three methods ------------------------------------------------------------------------


def _setup_qvaudio(route: Route, root: Path, *guest_args: str) -> None:
    """Both agents; returns once dom0 serves the VM and its microphone is the VM's default."""
    vm_dir, policy_dir = root / "vms", root / "policy"
    for d in (vm_dir, policy_dir):
        d.mkdir(mode=0o700, exist_ok=True)
    write_policy(policy_dir, POLICY)
    route.control = root / "control.sock"
    route.vm_monitor = GUEST_SOURCE
    route.settings = {"policy": "capture: allow", "config": "qvaudio.yaml (shipped)"}
    route.logs = [root / "dom0.log", root / "guest.log"]
    config = ["--config", str(REPO / "qvaudio.yaml")]
    route.procs.append(_agent(
        "qvaudio.agent_dom0",
        [*config, "--transport", f"unix:{vm_dir}", "--policy-dir", str(policy_dir),
         "--control-socket", str(route.control), "--no-notifications"],
        route.host.full_env(), route.logs[0],
    ))  # fmt: skip
    route.procs.append(_agent(
        "qvaudio.agent_guest",
        [*config, "--transport", f"unix:{vm_dir / VM_NAME}", *guest_args],
        route.vm.full_env(), route.logs[1],
    ))  # fmt: skip
    if guest_args:
        route.settings["guest"] = " ".join(guest_args)
    wait_for(
        "the guest's microphone as the VM's default source",
        lambda: _quiet(lambda: default_source(route.vm) == GUEST_SOURCE),
        20,
        route.logs,
    )
    wait_for(
        "dom0 to serve the VM",
        lambda: (_vm_status(route) or {}).get("state") == "open",
        20,
        route.logs,
    )


def _setup_bridge(route: Route, root: Path) -> None:
    """`parec` on the host microphone piped into `pacat` into the VM's null sink."""
    route.vm_monitor = f"{SINK}.monitor"
    route.settings = {
        "parec_latency_msec": PAREC_LATENCY_MS,
        "pacat_latency_msec": PACAT_LATENCY_MS,
    }
    pactl(route.vm, "set-default-source", route.vm_monitor)
    read_end, write_end = os.pipe()
    route.logs = [root / "bridge.log"]
    try:
        with route.logs[0].open("wb") as log:
            route.procs.append(subprocess.Popen(
                ["parec", f"--device={HOST_MIC}", f"--latency-msec={PAREC_LATENCY_MS}",
                 "--client-name=bridge", *RAW_FLAGS],
                env=route.host.full_env(), stdout=write_end, stderr=log,
            ))  # fmt: skip
            route.procs.append(subprocess.Popen(
                ["pacat", "--playback", f"--device={SINK}", f"--latency-msec={PACAT_LATENCY_MS}",
                 "--client-name=bridge", *RAW_FLAGS],
                env=route.vm.full_env(), stdin=read_end, stderr=log,
            ))  # fmt: skip
    finally:
        os.close(read_end)
        os.close(write_end)
    wait_for("the bridge's VM stream", lambda: _has_sink_input(route.vm), 10, route.logs)


def _setup_tunnel(route: Route, root: Path) -> None:
    """module-tunnel-source in the VM server, from the host microphone, as the VM's default."""
    route.vm_monitor = TUNNEL_SOURCE
    args = (
        f"server={route.host.server} source={HOST_MIC} source_name={TUNNEL_SOURCE}"
        f" rate={FMT.rate} channels={FMT.channels} format=s16le"
    )
    route.settings = {"module": "module-tunnel-source", "arguments": args}
    pactl(route.vm, "load-module", "module-tunnel-source", *args.split())
    wait_for("the tunnel source", lambda: _quiet(lambda: TUNNEL_SOURCE in pactl(
        route.vm, "list", "short", "sources")), 10)  # fmt: skip
    pactl(route.vm, "set-default-source", TUNNEL_SOURCE)


def _setup_qvaudio_no_node(route: Route, root: Path) -> None:
    """qvaudio with the guest's devices made by modules (on PipeWire: without its nodes)."""
    _setup_qvaudio(route, root, "--no-report-latency")


_SETUP: dict[str, Callable[[Route, Path], None]] = {
    "qvaudio": _setup_qvaudio,
    "qvaudio_no_node": _setup_qvaudio_no_node,
    "parec_pacat": _setup_bridge,
    "tunnel_source": _setup_tunnel,
}


@contextlib.contextmanager
def running(
    method: str,
    base: Path,
    label: str,
    setup: Callable[[Route, Path], None] | None = None,
    vm_kind: str = "pulseaudio",
) -> Iterator[Route]:
    """A fresh VM/host pair, the host's default source its sink monitor, joined by `method`
    (or by `setup`, another bench's, which also says what `route.vm_monitor` is)."""
    root = base / label
    root.mkdir(mode=0o700, parents=True)
    route = Route(method, vm_server(root, vm_kind), PrivatePulse(root, "host"), "")
    try:
        route.vm.start()
        route.host.start()
        pactl(route.host, "set-default-source", HOST_MIC)
        (setup or _SETUP[method])(route, root)
        actual = default_source(route.vm)
        if setup is None and actual != route.vm_monitor:
            raise RuntimeError(f"VM default source is {actual!r}, not {route.vm_monitor!r}")
        yield route
    finally:
        route.stop()


def _vm_status(route: Route) -> dict[str, Any] | None:
    vm = ((route.dom0_status() or {}).get("vms") or {}).get(VM_NAME)
    return vm if isinstance(vm, dict) else None


def _capture(route: Route) -> dict[str, Any]:
    """dom0's capture status and bytes sent, for qvaudio ({} otherwise)."""
    vm = _vm_status(route) or {}
    capture = dict(vm.get("capture") or {})
    capture["capture_bytes_sent"] = (vm.get("counters") or {}).get("capture_bytes_sent", 0)
    return capture


def _guest_mic(route: Route) -> dict[str, Any] | None:
    """The guest's virtual microphone (its reserve, gaps heard, chunks dropped late)."""
    status = _guest_status(route)
    return None if status is None else status.get("mic")


def wait_capture_flows(route: Route) -> None:
    """For qvaudio: dom0 captures for the VM and has sent audio since (others: always on)."""
    if route.method != "qvaudio":
        return
    wait_for("dom0 to capture for the VM", lambda: _capture(route).get("running"), 10, route.logs)
    sent = _capture(route)["capture_bytes_sent"]
    wait_for(
        "microphone audio to be sent",
        lambda: _capture(route)["capture_bytes_sent"] > sent + FMT.bytes_for_ms(100) // 2,
        10,
        route.logs,
    )


def wait_capture_stopped(route: Route) -> None:
    if route.method == "qvaudio":
        wait_for(
            "dom0 to stop capturing",
            lambda: not _capture(route).get("running") and not _capture(route).get("requested"),
            10,
            route.logs,
        )


# -- the host microphone's signals ------------------------------------------------------------


class Tone:
    """A continuous 1 kHz tone into the host's sink (the microphone hears it)."""

    def __init__(self, host: PrivatePulse) -> None:
        self._host = host
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="host-tone", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        second = generate_sine(BURST_HZ, FMT, 1.0, amplitude=AMPLITUDE)
        # The server may go away first on an error; that is reported elsewhere.
        with (
            contextlib.suppress(PulseError),
            PcmStream.playback(
                self._host.server, None, FMT, "bench-mic", "tone", FMT.bytes_for_ms(40)
            ) as stream,
        ):
            while not self._stop.is_set():
                for pos in range(0, len(second), CHUNK):
                    stream.write(second[pos : pos + CHUNK])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(3)


class AppRecorder(Recorder):
    """The VM application: records the default source, and when each read returned."""

    def __init__(self, server: PrivatePulse, name: str) -> None:
        self.reads: list[float] = []
        # device None: the server's default source.
        super().__init__(server, None, name, on_chunk=self._keep)  # type: ignore[arg-type]

    def _keep(self, pcm: bytes, stamp: float) -> None:
        self.reads.append(time.monotonic())
        self.chunks.append(pcm)
        self.stamps.append(stamp)

    def by_reads(self) -> Recorder:
        """The same recording, each chunk timed by when the application's read returned."""
        timed = copy.copy(self)
        timed.stamps = self.reads
        return timed


def wait_host_mic_hears(route: Route) -> None:
    """Until the host microphone carries the tone (a fresh server can take ~2 s)."""
    heard = threading.Event()

    def on_chunk(pcm: bytes, stamp: float) -> None:
        if _first_loud(pcm) is not None:
            heard.set()

    rec = Recorder(route.host, HOST_MIC, "host-mic-check", on_chunk=on_chunk)
    try:
        if not heard.wait(10):
            raise RuntimeError(f"the tone never reached the host microphone: {rec.error}")
    finally:
        rec.stop()


def _first_loud(pcm: bytes) -> int | None:
    left = np.frombuffer(pcm, dtype="<i2")[:: FMT.channels].astype(np.float32) / 32768
    loud = np.flatnonzero(np.abs(left) > THRESHOLD)
    return int(loud[0]) if loud.size else None


# -- measurement 1: time to first audio -------------------------------------------------------


def first_audio_trial(route: Route) -> dict[str, float | None]:
    """Open the VM application's record stream; ms until the tone reaches it."""
    found = threading.Event()
    seen: dict[str, float] = {}

    def on_chunk(pcm: bytes, stamp: float) -> None:
        if not found.is_set() and _first_loud(pcm) is not None:
            seen["read"] = time.monotonic()
            found.set()

    opened_from = time.monotonic()
    rec = Recorder(route.vm, None, "vm-app", on_chunk=on_chunk)  # type: ignore[arg-type]
    try:
        rec.started.wait(10)
        if rec.error is not None:
            raise rec.error
        ready = time.monotonic()
        found.wait(FIRST_AUDIO_TIMEOUT_S)
    finally:
        rec.stop()
    if rec.error is not None:
        raise rec.error

    def ms(t: float | None) -> float | None:
        return None if t is None else round((t - opened_from) * 1000, 1)

    return {
        "stream_ready_ms": ms(ready),
        "first_audio_read_ms": ms(seen.get("read")),
    }


def first_audio(route: Route, trials: int) -> dict[str, Any]:
    tone = Tone(route.host)
    rows = []
    try:
        wait_host_mic_hears(route)
        time.sleep(0.5)  # and in the method's own buffers (parec, the tunnel) too
        for _ in range(trials):
            rows.append(first_audio_trial(route))
            wait_capture_stopped(route)
            time.sleep(BETWEEN_TRIALS_S)
    finally:
        tone.stop()
    read = [r["first_audio_read_ms"] for r in rows]
    return {
        "trials": rows,
        "first_audio_read_ms": stats_ms([None if v is None else v / 1000 for v in read]),
        "missed": sum(v is None for v in read),
    }


# -- measurement 2: latency by impulse onset --------------------------------------------------


def latency(route: Route, impulses: int) -> dict[str, Any]:
    starts = schedule(impulses)
    time.sleep(0.5)  # the tone's last samples out of every buffer
    host_rec = Recorder(route.host, HOST_MIC, "host-mic")
    vm_rec = AppRecorder(route.vm, "vm-app")
    try:
        for rec in (vm_rec, host_rec):
            rec.started.wait(10)
            if rec.error is not None:
                raise rec.error
        wait_capture_flows(route)
        time.sleep(SETTLE_S + 0.5)
        capture_before = _capture(route)
        cpu_before = _cpu_seconds(route)
        played_from = time.monotonic()
        player, writes = play(route.host, impulse_train(starts))
        player.join(len(starts) * 0.4 + 30)
        cpu_used = {k: v - cpu_before[k] for k, v in _cpu_seconds(route).items()}
        played_s = time.monotonic() - played_from
        time.sleep(1.0)
        capture_after = _capture(route)
    finally:
        vm_rec.stop()
        host_rec.stop()
    for rec in (vm_rec, host_rec):
        if rec.error is not None:
            raise rec.error
    app = app_times(starts, writes)
    host_times, host_spread = onset_times(host_rec)
    vm_times, vm_spread = onset_times(vm_rec.by_reads())
    vm_source_times, vm_source_spread = onset_times(vm_rec)
    _, to_host = pair_up(app, host_times)
    _, to_vm = pair_up(app, vm_times)
    _, to_vm_source = pair_up(app, vm_source_times)
    mic_to_vm = _minus(to_vm, to_host)
    result: dict[str, Any] = {
        "impulses_counted": impulses,
        "host_mic_to_vm_app_ms": stats_ms(mic_to_vm),
        f"first_{FIRST}_host_mic_to_vm_app_ms": stats_ms(mic_to_vm[:FIRST]),
        f"after_first_{FIRST}_host_mic_to_vm_app_ms": stats_ms(mic_to_vm[FIRST:]),
        "missed_in_vm": sum(
            h is not None and v is None for h, v in zip(to_host, to_vm, strict=True)
        ),
        "missed_on_host_mic": sum(h is None for h in to_host),
        "host_mic_to_vm_source_ms": stats_ms(_minus(to_vm_source, to_host)),
        "host_player_to_host_mic_ms": stats_ms(to_host),
        "host_player_to_vm_app_ms": stats_ms(to_vm),
        "cpu_pct_of_one_core": {k: round(100 * v / played_s, 2) for k, v in cpu_used.items()},
        "vm_app_read_times": vm_spread,
        "vm_source_stamps": vm_source_spread,
        "host_mic_stamps": host_spread,
        "per_impulse_host_mic_to_vm_app_ms": [
            None if d is None else round(d * 1000, 1) for d in mic_to_vm
        ],
    }
    if route.method == "qvaudio":
        result["guest_mic_after"] = _guest_mic(route)
        sent = capture_after["capture_bytes_sent"] - capture_before["capture_bytes_sent"]
        result["dom0_capture"] = {
            **{k: capture_after.get(k) for k in ("format", "running")},
            "bytes_sent_while_measuring": sent,
        }
    return result


# -- measurement 3: a steady tone, for crackle --------------------------------------------


def _gaps_in(
    rec: AppRecorder | Recorder, times: list[float], stalls: StallMonitor
) -> dict[str, Any]:
    """The recording's gaps (>= 1 ms of silence inside the tone), each placed in time
    by the chunk it fell in, and blamed on the machine only if a stall was measured then."""
    counter = IndexedGaps("recording")
    starts: list[int] = []  # first sample of each chunk
    at = 0
    for pcm in rec.chunks:
        starts.append(at)
        at += len(pcm) // FMT.frame_size
        counter.feed(pcm, 0.0)
    counter.finish()
    listed: list[dict[str, Any]] = []
    for (since_onset_s, ms), (first, _) in zip(counter.found, counter.at, strict=True):
        if since_onset_s < STARTUP_S:
            continue
        chunk = max(0, int(np.searchsorted(starts, first, side="right")) - 1)
        when = times[chunk] if chunk < len(times) else None
        stall = None if when is None else stalls.blame(when, before=0.2, after=0.3)
        listed.append({
            "ms": round(ms, 1),
            "machine_stall": stall is not None and ms / 1000 <= stall.duration_s + STALL_SLACK_S,
        })  # fmt: skip
    return {
        "recorded_s": round(counter.samples / FMT.rate, 1),
        "gaps": len(listed),
        "gaps_unexplained": sum(not g["machine_stall"] for g in listed),
        "gap_ms_total": round(sum(g["ms"] for g in listed), 1),
        "gap_list": listed[:20],
    }


def steady_tone(route: Route, seconds: float) -> dict[str, Any]:
    """A continuous tone for `seconds`: gaps heard by the VM application and on the host
    microphone itself, and the machine's stalls, all in the same run."""
    time.sleep(0.5)
    host_rec = Recorder(route.host, HOST_MIC, "host-mic")
    vm_rec = AppRecorder(route.vm, "vm-app")
    tone: Tone | None = None
    try:
        with StallMonitor() as stalls:
            for rec in (vm_rec, host_rec):
                rec.started.wait(10)
                if rec.error is not None:
                    raise rec.error
            wait_capture_flows(route)
            tone = Tone(route.host)
            time.sleep(seconds)
            tone.stop()
            tone = None
            time.sleep(1.0)
            vm_rec.stop()
            host_rec.stop()
            machine = stalls.whole_machine()
    finally:
        if tone is not None:
            tone.stop()
        vm_rec.stop()
        host_rec.stop()
    for rec in (vm_rec, host_rec):
        if rec.error is not None:
            raise rec.error
    return {
        "seconds": seconds,
        "vm_app": _gaps_in(vm_rec, vm_rec.reads, stalls),
        "host_mic": _gaps_in(host_rec, host_rec.stamps, stalls),
        "guest_mic_after": _guest_mic(route),
        "machine_stalls": len(machine),
        "machine_stall_ms_max": round(max((s.duration_s for s in machine), default=0.0) * 1000, 1),
    }


def _minus(later: list[float | None], earlier: list[float | None]) -> list[float | None]:
    return [None if a is None or b is None else a - b for a, b in zip(later, earlier, strict=True)]


def measure(
    method: str,
    base: Path,
    label: str,
    impulses: int,
    trials: int,
    tone_s: float,
    vm_kind: str = "pulseaudio",
) -> dict[str, Any]:
    load_before = load_average()
    with running(method, base, label, vm_kind=vm_kind) as route:
        row: dict[str, Any] = {
            "method": method,
            "settings": route.settings,
            "vm_default_source": route.vm_monitor,
        }
        row["time_to_first_audio"] = first_audio(route, trials) if trials else None
        row.update(latency(route, impulses))
        row["steady_tone"] = steady_tone(route, tone_s) if tone_s else None
    row["load_avg_before"] = load_before
    row["load_avg_after"] = load_average()
    return row


def _terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM ends the run through the `finally` blocks, so every process is stopped."""
    sys.exit(128 + signum)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--impulses", type=int, default=100)
    parser.add_argument(
        "--first-audio-trials", type=int, default=5, help="0 skips time to first audio"
    )
    parser.add_argument(
        "--tone-seconds", type=float, default=60.0, help="0 skips the steady tone's gap count"
    )
    parser.add_argument(
        "--vm-server", choices=("pulseaudio", "pipewire"), default="pulseaudio",
        help="the VM's audio server (the host's is PulseAudio)",
    )  # fmt: skip
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated subset of " + ", ".join(METHODS),
    )
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s): {', '.join(unknown)}")
    signal.signal(signal.SIGTERM, _terminate)
    rows: dict[str, Any] = {}
    out: dict[str, Any] = {
        "benchmark": "microphone path: host default source -> VM application, by impulse onset",
        "machine": machine(),
        "signal": f"{BURST_MS} ms {BURST_HZ:g} Hz bursts, amplitude {AMPLITUDE}, 250-350 ms apart",
        "first_audio_signal": f"continuous {BURST_HZ:g} Hz tone, amplitude {AMPLITUDE}",
        "threshold": THRESHOLD,
        "impulses_reported_as_the_start": FIRST,
        "settings": {
            "impulses": args.impulses,
            "first_audio_trials": args.first_audio_trials,
            "vm_server": args.vm_server,
            "host_microphone": f"{HOST_MIC} (the host's default source)",
            "vm_application": "a PcmStream record of the VM's default source, 10 ms fragments",
        },
        "rows": rows,
    }
    with tempfile.TemporaryDirectory(prefix="qvaudio-capture-") as tmp:
        for i, method in enumerate(methods):
            rows[method] = measure(
                method, Path(tmp), f"m{i}", args.impulses, args.first_audio_trials,
                args.tone_seconds, args.vm_server,
            )  # fmt: skip
    out["load_avg_end"] = load_average()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
