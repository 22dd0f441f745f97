"""Shared parts of the whole-pipeline benchmarks (latency, gaps, scale, revocation).

One "VM" PulseAudio and one "host" PulseAudio per method, both private
daemons (qvaudio.pulse.private), and three ways to carry what the VM plays to
the host: qvaudio's two agents over the Unix-socket transport, a
`parec | pacat` bridge, and PulseAudio's own `module-tunnel-sink`. Not a
benchmark itself; the bench_* scripts import it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from qvaudio.core.formats import DEFAULT_FORMAT, AudioFormat
from qvaudio.dom0.control import ControlError, request
from qvaudio.pulse.pcm import PcmStream
from qvaudio.pulse.private import SINK, PrivatePulse

FMT: AudioFormat = DEFAULT_FORMAT
REPO = Path(__file__).resolve().parent.parent
#: Latency flags of the parec | pacat bridge (recorded in every result).
PAREC_LATENCY_MS = 10
PACAT_LATENCY_MS = 20
RAW_FLAGS = ["--raw", "--format=s16le", "--rate=48000", "--channels=2"]
POLICY = """\
rules:
  - vm: '*'
    playback: allow
    capture: deny
"""
METHODS = ("qvaudio", "parec_pacat", "tunnel_sink")
GUEST_SINK = "qvaudio_out"
TUNNEL_SINK = "tunnel"


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    python = sys.version.split()[0]
    return {"cpus": os.cpu_count(), "python": python, "load_avg_start": load_average()}


def write_policy(directory: Path, text: str, name: str = "50-bench.yaml") -> float:
    """Save a policy file atomically, as an editor would; returns when it was renamed."""
    tmp = directory / f".{name}.tmp"
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, directory / name)
    return time.monotonic()


def wait_for(what: str, check: Callable[[], Any], timeout: float, logs: list[Path] = []) -> Any:  # noqa: B006
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.05)
    tails = "\n".join(f"--- {p} ---\n{p.read_text(errors='replace')[-2000:]}" for p in logs)
    raise RuntimeError(f"timed out waiting for {what}\n{tails}")


def pactl(server: PrivatePulse, *args: str) -> str:
    return subprocess.run(
        ["pactl", *args], env=server.full_env(), check=True, capture_output=True, text=True
    ).stdout


def default_sink(server: PrivatePulse) -> str:
    return pactl(server, "get-default-sink").strip()


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10) -> int | None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@dataclass
class Route:
    """One method carrying a VM server's audio to a host server."""

    method: str
    #: The VM's audio server: a private PulseAudio, or PipeWire with pipewire-pulse.
    vm: Any
    host: PrivatePulse
    #: Where to record what the VM plays (a source on the VM server).
    vm_monitor: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    control: Path | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def host_monitor(self) -> str:
        return f"{SINK}.monitor"

    def dom0_status(self) -> dict[str, Any] | None:
        if self.control is None:
            return None
        with contextlib.suppress(ControlError, OSError):
            return request(self.control, {"cmd": "status"}, timeout=2)
        return None

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc)
        self.procs.clear()
        self.vm.stop()
        self.host.stop()


def _agent(module: str, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
        )  # fmt: skip


def _setup_qvaudio(
    route: Route,
    root: Path,
    vm_name: str = "bench-vm",
    guest_args: tuple[str, ...] = (),
    dom0_args: tuple[str, ...] = (),
) -> None:
    """Both agents between the two servers; returns once dom0 plays the VM's stream."""
    vm_dir, policy_dir = root / "vms", root / "policy"
    for d in (vm_dir, policy_dir):
        d.mkdir(mode=0o700, exist_ok=True)
    write_policy(policy_dir, POLICY)
    route.control = root / "control.sock"
    route.vm_monitor = f"{GUEST_SINK}.monitor"
    route.settings = {"guest_args": list(guest_args), "dom0_args": list(dom0_args)}
    route.logs = [root / "dom0.log", root / "guest.log"]
    # The shipped config's defaults, not whatever /etc/qvaudio might hold.
    config = ["--config", str(REPO / "qvaudio.yaml")]
    route.procs.append(_agent(
        "qvaudio.agent_dom0",
        [*config, "--transport", f"unix:{vm_dir}", "--policy-dir", str(policy_dir),
         "--control-socket", str(route.control), "--no-notifications", *dom0_args],
        route.host.full_env(), route.logs[0],
    ))  # fmt: skip
    route.procs.append(_agent(
        "qvaudio.agent_guest",
        [*config, "--transport", f"unix:{vm_dir / vm_name}", *guest_args],
        route.vm.full_env(), route.logs[1],
    ))  # fmt: skip
    wait_for(
        "the guest's sink as the VM's default",
        lambda: _quiet(lambda: default_sink(route.vm) == GUEST_SINK),
        20,
        route.logs,
    )

    def playing() -> bool:
        playback = ((route.dom0_status() or {}).get("vms", {}).get(vm_name) or {}).get("playback")
        return isinstance(playback, dict) and bool(playback.get("active"))

    wait_for("dom0 to take the VM's playback", playing, 20, route.logs)


def _quiet(check: Callable[[], bool]) -> bool:
    try:
        return check()
    except subprocess.CalledProcessError:
        return False


def _setup_bridge(route: Route, root: Path) -> None:
    """`parec` on the VM's sink monitor piped into `pacat` on the host."""
    route.settings = {
        "parec_latency_msec": PAREC_LATENCY_MS,
        "pacat_latency_msec": PACAT_LATENCY_MS,
    }
    read_end, write_end = os.pipe()
    route.logs = [root / "bridge.log"]
    try:
        with route.logs[0].open("wb") as log:
            route.procs.append(subprocess.Popen(
                ["parec", f"--device={SINK}.monitor", f"--latency-msec={PAREC_LATENCY_MS}",
                 "--client-name=bridge", *RAW_FLAGS],
                env=route.vm.full_env(), stdout=write_end, stderr=log,
            ))  # fmt: skip
            route.procs.append(subprocess.Popen(
                ["pacat", "--playback", f"--latency-msec={PACAT_LATENCY_MS}",
                 "--client-name=bridge", *RAW_FLAGS],
                env=route.host.full_env(), stdin=read_end, stderr=log,
            ))  # fmt: skip
    finally:
        os.close(read_end)
        os.close(write_end)
    wait_for("the bridge's host stream", lambda: _has_sink_input(route.host), 10, route.logs)


def _has_sink_input(server: PrivatePulse) -> bool:
    return bool(_quiet(lambda: bool(pactl(server, "list", "short", "sink-inputs").strip())))


def _setup_tunnel(route: Route, root: Path) -> None:
    """module-tunnel-sink in the VM server, pointing at the host's sink, as its default."""
    route.vm_monitor = f"{TUNNEL_SINK}.monitor"
    # The same format as the other methods; left alone it would be the VM
    # server's default, 44.1 kHz, and the host would resample.
    args = (
        f"server={route.host.server} sink={SINK} sink_name={TUNNEL_SINK}"
        f" rate={FMT.rate} channels={FMT.channels} format=s16le"
    )
    route.settings = {"module": "module-tunnel-sink", "arguments": args}
    pactl(route.vm, "load-module", "module-tunnel-sink", *args.split())
    wait_for("the tunnel sink", lambda: _quiet(lambda: TUNNEL_SINK in pactl(
        route.vm, "list", "short", "sinks")), 10)  # fmt: skip
    pactl(route.vm, "set-default-sink", TUNNEL_SINK)


_SETUP: dict[str, Callable[..., None]] = {
    "qvaudio": _setup_qvaudio,
    "parec_pacat": _setup_bridge,
    "tunnel_sink": _setup_tunnel,
}


def vm_server(root: Path, kind: str) -> Any:
    """The VM's audio server: PulseAudio 16, or PipeWire (the tests' private daemon set)."""
    if kind == "pipewire":
        from tests.audio_daemons import PipeWireServer

        return PipeWireServer("vm", root / "vm-pw")
    return PrivatePulse(root, "vm")


def start_method(
    method: str, base: Path, label: str, vm_kind: str = "pulseaudio", **kwargs: Any
) -> Route:
    """A fresh VM/host server pair joined by `method`; stopped again if setup fails."""
    root = base / label
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    vm = vm_server(root, vm_kind)
    route = Route(method, vm, PrivatePulse(root, "host"), f"{SINK}.monitor")
    try:
        route.vm.start()
        route.host.start()
        _SETUP[method](route, root, **kwargs)
    except BaseException:
        route.stop()
        raise
    return route


@contextlib.contextmanager
def running(method: str, base: Path, label: str, **kwargs: Any) -> Iterator[Route]:
    route: Route | None = None
    try:
        route = start_method(method, base, label, **kwargs)
        yield route
    finally:
        if route is not None:
            route.stop()


class ServerAddress(Protocol):
    """All a recorder or a player needs of an audio server: where it listens."""

    server: str


class Recorder:
    """Records a source in 10 ms chunks, each stamped with when its last sample was captured.

    The stamp is `time.monotonic()` minus the record stream's own latency
    (what the server holds that we have not read yet), so a late wake-up of
    this thread does not show up as audio arriving late.
    """

    def __init__(
        self,
        server: ServerAddress,
        device: str,
        name: str,
        on_chunk: Callable[[bytes, float], None] | None = None,
    ) -> None:
        self.chunks: list[bytes] = []
        self.stamps: list[float] = []
        self.started = threading.Event()
        self.error: BaseException | None = None
        self._server, self._device, self._name = server, device, name
        self._on_chunk = on_chunk
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rec-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        period = FMT.bytes_for_ms(10)
        try:
            with PcmStream.record(
                self._server.server, self._device, FMT, "bench-recorder", self._name, period
            ) as stream:
                self.started.set()
                while not self._stop.is_set():
                    pcm = stream.read(period)
                    stamp = time.monotonic() - stream.latency_us() / 1e6
                    if self._on_chunk is not None:
                        self._on_chunk(pcm, stamp)
                    else:
                        self.chunks.append(pcm)
                        self.stamps.append(stamp)
        except BaseException as exc:  # reported by the caller, not lost in a thread
            self.error = exc
            self.started.set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def play(
    server: PrivatePulse, chunks: Iterator[bytes], tlength_ms: int = 40, name: str = "player"
) -> tuple[threading.Thread, list[tuple[float, int]]]:
    """An ordinary client playing into the server's default sink, from a thread.

    Returns the thread and (time each write returned, bytes written so far).
    """
    writes: list[tuple[float, int]] = []

    def run() -> None:
        total = 0
        with PcmStream.playback(
            server.server, None, FMT, "bench-player", name, FMT.bytes_for_ms(tlength_ms)
        ) as stream:
            for chunk in chunks:
                stream.write(chunk)
                total += len(chunk)
                writes.append((time.monotonic(), total))
            stream.drain()

    thread = threading.Thread(target=run, name=f"play-{name}", daemon=True)
    thread.start()
    return thread, writes


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def proc_memory_kib(pid: int) -> dict[str, int]:
    """VmRSS from /proc/PID/status and Pss from smaps_rollup (shared pages split)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                out["rss_kib"] = int(line.split()[1])
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                out["pss_kib"] = int(line.split()[1])
    return out


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def run_methods(
    parser: argparse.ArgumentParser,
    known: Sequence[str],
    description: str,
    measure: Callable[[str, Path, argparse.Namespace], dict[str, Any]],
) -> None:
    """A bench's main: `--methods` (a comma-separated subset of `known`), then
    `measure(method, folder, args)` for each in a shared temporary folder, printed
    as one JSON object. SIGTERM ends the run through the `finally` blocks, so every
    daemon and agent a measurement started is stopped."""
    parser.add_argument(
        "--methods", default=",".join(known), help="a subset of " + ", ".join(known)
    )
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    if unknown := sorted(set(methods) - set(known)):
        parser.error(f"unknown method(s): {', '.join(unknown)}")
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    out: dict[str, Any] = {"benchmark": description, "machine": machine(), "rows": {}}
    with tempfile.TemporaryDirectory(prefix="qvaudio-bench-") as tmp:
        for method in methods:
            out["rows"][method] = measure(method, Path(tmp), args)
    out["load_avg_end"] = load_average()
    print(json.dumps(out, indent=2))
