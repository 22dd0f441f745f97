#!/usr/bin/env python3
"""Driver of the real-Xen end-to-end test (tests/xen/run-xen-test.sh).

One file, several roles:

* ``dom0``: runs inside the PV dom0 (from its /init). Starts PulseAudio and
  ``qvaudio-dom0 --transport xen``, creates the domU ``qvtest`` with ``xl``,
  and runs every check, asking the domU's helper to act through XenStore
  (``/local/domain/<id>/data/qvtest/{cmd,ack}``). Prints the results as
  base64 chunks on the console (``@@QVRESULT``), then returns.
* ``domu``: runs inside the domU. Starts PulseAudio and then does what dom0
  asks: start or kill ``qvaudio-guest --transport xen:0``, play a tone with
  pacat, record the guest's virtual microphone with parec and measure it.
* ``smoke ROLE``: on the host, in a chroot of the image, before booting:
  imports and library loading.
* ``stamp``, ``collect``, ``summary``: on the host: timestamp the serial
  console, turn it into ``result.json``, print a short summary.

Only the standard library is imported at module level, so the host roles run
with any Python 3.11; the in-VM roles import qvaudio, pyxs and friends.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

RATE = 48000
PA_DIR = Path("/run/pa")
PULSE = f"unix:{PA_DIR}/native"
CONTROL = Path("/run/qv/control.sock")
POLICY_DIR = Path("/etc/qvaudio/policy.d")
XENSTORED_SOCKET = "/run/xenstored/socket"
VM_NAME = "qvtest"  # the name in the xl config; the domU's hostname is "imposter"
VCHAN_PORT = 4790
PLAY_HZ = 1000.0
# The agents' buffering settings (qvaudio.yaml / command line); the host script
# writes them to SETTINGS (from QV_XEN_* variables). The shipped defaults are
# 30 ms host latency and 10 ms periods.
SETTINGS = Path("/opt/qvtest/settings.json")
DOM0_CONFIG = Path("/run/qv/qvaudio.yaml")


def settings() -> dict[str, int]:
    values = {"dom0_latency_ms": 30, "dom0_capture_period_ms": 10, "guest_period_ms": 10}
    with contextlib.suppress(OSError, ValueError):
        values.update({k: int(v) for k, v in json.loads(SETTINGS.read_text()).items()})
    return values


MIC_HZ = 660.0
RESULT_TAG = "@@QVRESULT"
PCM_ARGS = ["--raw", "--format=s16le", f"--rate={RATE}"]

#: Every check the dom0 driver makes; one not reached counts as failed.
DOM0_CHECKS = (
    "dom0_agent_started",
    "domu_created",
    "guest_connected",
    "name_from_xenstore",
    "playback_frequency",
    "playback_coverage",
    "playback_duration",
    "deny_policy_applied",
    "deny_silence",
    "deny_guest_refused",
    "capture_policy_applied",
    "capture_frequency",
    "restart_disconnect_noticed",
    "restart_reconnected",
    "restart_frequency",
    "restart_coverage",
    "destroy_stream_existed",
    "destroy_noticed",
    "destroy_stream_removed",
    "dom0_agent_survived",
)
HOST_CHECKS = ("result_received", "qemu_finished", "eager_fpu_active", "no_process_crashes")

# Limits. Frequency and coverage get no slack; timings get plenty (emulation).
FREQ_TOLERANCE_PCT = 0.5
MIN_COVERAGE = 0.99
MIN_TONE_FRACTION = 0.8  # of the played length, from onset to the last sound
SILENCE_PEAK = 0.01
POLICY_RELOAD_MAX_S = 5.0
NOTICE_MAX_S = 15.0


def log(text: str) -> None:
    sys.stdout.write(f"{text}\n")
    sys.stdout.flush()


def uptime() -> float:
    try:
        return float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return -1.0


# ------------------------------------------------------------------ in the VMs: shared
def pump(stream: Any, prefix: str, keep: list[str] | None = None) -> threading.Thread:
    """Copy a child's output to the console, prefixed; optionally keep the lines."""

    def run() -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            if keep is not None:
                keep.append(line)
            log(f"{prefix} {line}")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def start_pulse(null_rate: int = RATE) -> subprocess.Popen[bytes]:
    """A private PulseAudio (root, no D-Bus) with one null sink "null"; waits for it."""
    env = {
        "HOME": str(PA_DIR / "home"),
        "XDG_RUNTIME_DIR": str(PA_DIR / "xdg"),
        "PULSE_RUNTIME_PATH": str(PA_DIR / "xdg" / "pulse"),
        "PULSE_SERVER": PULSE,
        "PULSE_CLIENTCONFIG": str(PA_DIR / "client.conf"),
    }
    for sub in ("home", "xdg"):
        (PA_DIR / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
    os.environ.update(env)
    (PA_DIR / "client.conf").write_text("autospawn = no\n")
    script = PA_DIR / "default.pa"
    script.write_text(
        f"load-module module-native-protocol-unix auth-anonymous=1 socket={PA_DIR}/native\n"
        f"load-module module-null-sink sink_name=null rate={null_rate} channels=2\n"
        "set-default-sink null\n"
        "set-default-source null.monitor\n"
    )
    logfile = (PA_DIR / "pulseaudio.log").open("wb")
    proc = subprocess.Popen(
        [
            "pulseaudio",
            "-n",
            "--daemonize=no",
            "--exit-idle-time=-1",
            "--disallow-exit",
            "--use-pid-file=no",
            "--log-target=stderr",
            # No real-time scheduling and no CPU limit: under emulation a busy daemon
            # is otherwise killed (RLIMIT_RTTIME, or its own CPU-load watchdog).
            "--realtime=no",
            "--high-priority=no",
            "--no-cpu-limit=yes",
            "-F",
            str(script),
        ],
        stdout=logfile,
        stderr=subprocess.STDOUT,
    )
    logfile.close()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        ok = subprocess.run(["pactl", "info"], capture_output=True).returncode == 0
        if ok:
            return proc
        time.sleep(0.2)
    tail = (PA_DIR / "pulseaudio.log").read_text(errors="replace")[-1500:]
    raise RuntimeError(f"PulseAudio did not come up:\n{tail}")


def default_device(kind: str) -> str:
    """ "Sink" or "Source": the server's current default, from pactl info."""
    out = subprocess.run(["pactl", "info"], capture_output=True, text=True).stdout
    match = re.search(rf"^Default {kind}: (\S+)", out, re.M)
    return match.group(1) if match else ""


def tone_file(freq: float, seconds: float, channels: int) -> Path:
    """A cached raw s16le tone at RATE, amplitude 0.5."""
    from qvaudio.core.formats import AudioFormat
    from qvaudio.core.tone import generate_sine

    path = Path(f"/tmp/tone-{freq:g}-{seconds:g}-{channels}.raw")
    if not path.exists():
        fmt = AudioFormat.parse(f"s16le:{RATE}:{channels}")
        path.write_bytes(generate_sine(freq, fmt, seconds, amplitude=0.5))
    return path


def start_pacat(freq: float, seconds: float, device: str | None = None) -> subprocess.Popen[bytes]:
    """An ordinary client playing a tone into `device` (None: the default sink)."""
    args = ["pacat", *PCM_ARGS, "--channels=2", "--client-name=tone-player", "--stream-name=tone"]
    if device:
        args.append(f"--device={device}")
    with tone_file(freq, seconds, 2).open("rb") as data:
        return subprocess.Popen(args, stdin=data)


def analyse(pcm: bytes, channels: int, freq: float) -> dict[str, Any]:
    """Onset, length, frequency and non-silent fraction of a recorded tone."""
    from qvaudio.core.formats import AudioFormat
    from qvaudio.core.tone import (
        decode_mono,
        estimate_frequency,
        find_offset,
        find_onset,
        gaps,
        nonsilent_fraction,
    )

    samples = decode_mono(pcm, AudioFormat.parse(f"s16le:{RATE}:{channels}"))
    peak = max(map(abs, samples), default=0.0)
    result: dict[str, Any] = {"recorded_s": round(len(samples) / RATE, 3), "peak": round(peak, 4)}
    onset, offset = find_onset(samples, 0.05), find_offset(samples, 0.05)
    if onset is None or offset is None or offset - onset < RATE // 10:
        result["tone"] = False
        return result
    measured = estimate_frequency(samples[onset : offset + 1], RATE)
    result.update(
        tone=True,
        onset_s=round(onset / RATE, 3),
        tone_s=round((offset - onset) / RATE, 3),
        freq_hz=round(measured, 3),
        freq_error_pct=round(abs(measured - freq) / freq * 100, 4),
        nonsilent_fraction=round(nonsilent_fraction(samples, RATE), 4),
    )
    found = gaps(samples, RATE, min_gap_ms=5.0)
    result["gaps"] = {
        "count": len(found),
        "total_ms": round(sum(g.duration_s for g in found) * 1000, 1),
        "first": [[round(g.start_s, 3), round(g.duration_s * 1000, 1)] for g in found[:4]],
    }
    return result


def print_diagnostics(side: str) -> None:
    """PulseAudio's log and the kernel's last lines, on the console (for failures)."""
    with contextlib.suppress(OSError):
        for line in (PA_DIR / "pulseaudio.log").read_text(errors="replace").splitlines()[-15:]:
            log(f"[{side}-pulseaudio] {line}")
    out = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
    for line in out.splitlines()[-12:]:
        log(f"[{side}-dmesg] {line}")


def crash_lines() -> list[str]:
    """Kernel lines saying a process crashed (what memory corruption looks like)."""
    out = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
    return [
        ln[:160] for ln in out.splitlines() if re.search(r"segfault at|traps:|general prot", ln)
    ]


# ------------------------------------------------------------------ domU helper
class Helper:
    """The domU side: acts on dom0's commands from XenStore, answers there too."""

    def __init__(self) -> None:
        from pyxs import Client

        self.xs = Client(xen_bus_path="/dev/xen/xenbus")
        self.xs.connect()
        self.domid = int(self.xs.read(b"domid"))
        self.base = f"/local/domain/{self.domid}/data/qvtest"
        self.guest: subprocess.Popen[bytes] | None = None
        self.guest_log: list[str] = []
        self.player: subprocess.Popen[bytes] | None = None

    def mark(self, name: str) -> None:
        log(f"@@UMARK {name} domU-uptime={uptime()}")

    def answer(self, reply: dict[str, Any]) -> None:
        text = json.dumps(reply, separators=(",", ":"))
        if len(text) > 1900:  # xenstored's default limit for one value is 2048 bytes
            reply = {k: v for k, v in reply.items() if k in ("seq", "ok", "error")}
            reply["truncated"] = True
            text = json.dumps(reply, separators=(",", ":"))
        self.xs.write(f"{self.base}/ack".encode(), text.encode())

    def command(self) -> dict[str, Any] | None:
        from pyxs.exceptions import PyXSError

        try:
            raw = self.xs.read(f"{self.base}/cmd".encode())
        except PyXSError:
            return None
        try:
            value = json.loads(raw)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def run(self) -> None:
        start_pulse()
        self.mark("pulseaudio-up")
        tone_file(PLAY_HZ, 3.0, 2)  # warm the cache outside the timed phases
        self.answer({"seq": 0, "ok": True, "domid": self.domid, "hostname": os.uname().nodename})
        self.mark("helper-ready")
        last = 0
        while True:
            cmd = self.command()
            if cmd is None or int(cmd.get("seq", 0)) <= last:
                time.sleep(0.2)
                continue
            last = int(cmd["seq"])
            op = str(cmd.get("op"))
            started = time.monotonic()
            try:
                reply = {"seq": last, "ok": True, **getattr(self, f"op_{op}")(cmd)}
            except Exception as exc:
                reply = {"seq": last, "ok": False, "error": f"{op}: {exc!r}"[:400]}
            reply["took_s"] = round(time.monotonic() - started, 3)
            log(f"[helper] {op} -> {json.dumps(reply)[:300]}")
            self.answer(reply)

    # -- commands
    def op_start_guest(self, cmd: dict[str, Any]) -> dict[str, Any]:
        started = time.monotonic()
        first = len(self.guest_log)
        self.guest = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "qvaudio.agent_guest",
                "--transport",
                "xen:0",
                "--pulse-server",
                PULSE,
                "--period-ms",
                str(settings()["guest_period_ms"]),
                "-v",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        pump(self.guest.stdout, "[guest-agent]", self.guest_log)
        deadline = started + float(cmd.get("timeout", 90))
        while time.monotonic() < deadline:
            if self.guest.poll() is not None:
                raise RuntimeError(f"qvaudio-guest exited with {self.guest.returncode}")
            ready = any("ready: applications play into" in ln for ln in self.guest_log[first:])
            if ready and default_device("Sink") == "qvaudio_out":
                return {"pid": self.guest.pid, "ready_s": round(time.monotonic() - started, 2)}
            time.sleep(0.2)
        raise RuntimeError("qvaudio-guest not ready (no 'ready:' line, or not the default sink)")

    def op_kill_guest(self, cmd: dict[str, Any]) -> dict[str, Any]:
        if self.guest is None:
            raise RuntimeError("no guest agent running")
        self.guest.send_signal(signal.SIGKILL)
        rc = self.guest.wait(10)
        self.guest = None
        return {"rc": rc}

    def op_play(self, cmd: dict[str, Any]) -> dict[str, Any]:
        freq, seconds = float(cmd["freq"]), float(cmd["seconds"])
        sink = default_device("Sink")
        tone_file(freq, seconds, 2)
        started = time.monotonic()
        player = start_pacat(freq, seconds)
        if cmd.get("background"):
            self.player = player
            return {"sink": sink}
        rc = player.wait(seconds + 60)
        return {"sink": sink, "rc": rc, "played_s": round(time.monotonic() - started, 2)}

    def op_record_mic(self, cmd: dict[str, Any]) -> dict[str, Any]:
        seconds, freq = float(cmd["seconds"]), float(cmd["freq"])
        want = int(seconds * RATE) * 2
        rec = subprocess.Popen(
            [
                "parec",
                "--device=qvaudio_mic",
                *PCM_ARGS,
                "--channels=1",
                "--client-name=mic-recorder",
                "--latency-msec=100",
            ],
            stdout=subprocess.PIPE,
        )
        assert rec.stdout is not None
        data = bytearray()
        deadline = time.monotonic() + seconds + 20
        while len(data) < want and time.monotonic() < deadline:
            ready, _, _ = select.select([rec.stdout], [], [], 0.5)
            if ready:
                chunk = os.read(rec.stdout.fileno(), 65536)
                if not chunk:
                    break
                data += chunk
        rec.kill()
        rec.wait(10)
        return {"bytes": len(data), **analyse(bytes(data[:want]), 1, freq)}

    def op_grep_log(self, cmd: dict[str, Any]) -> dict[str, Any]:
        pattern = re.compile(str(cmd["pattern"]))
        found = [ln[:160] for ln in self.guest_log if pattern.search(ln)]
        return {"count": len(found), "lines": found[-3:]}

    def op_status(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """The guest agent's own status file (state, format, bytes sent, mic)."""
        path = PA_DIR / "xdg" / "qvaudio" / "guest-status.json"
        try:
            status = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            return {"status": None, "why": str(exc)[:100]}
        keep = ("state", "format", "corked", "bytes_sent", "dropped_bytes", "players", "mic")
        return {"status": {k: status.get(k) for k in keep}}

    def op_diagnostics(self, cmd: dict[str, Any]) -> dict[str, Any]:
        print_diagnostics("domU")
        return {}

    def op_crashes(self, cmd: dict[str, Any]) -> dict[str, Any]:
        lines = crash_lines()
        return {"count": len(lines), "lines": lines[:3]}


# ------------------------------------------------------------------ dom0 driver
class CheckFailed(Exception):
    pass


class GuestChannel:
    """dom0's side of the XenStore command channel to the domU helper."""

    def __init__(self, domid: int) -> None:
        from pyxs import Client

        self.xs = Client(unix_socket_path=XENSTORED_SOCKET)
        self.xs.connect()
        self.base = f"/local/domain/{domid}/data/qvtest"
        self.seq = 0

    def read(self, path: str) -> bytes | None:
        from pyxs.exceptions import PyXSError

        try:
            value: bytes = self.xs.read(path.encode())
        except PyXSError:
            return None
        return value

    def wait_ack(self, seq: int, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            raw = self.read(f"{self.base}/ack")
            if raw:
                with contextlib.suppress(ValueError):
                    ack = json.loads(raw)
                    if isinstance(ack, dict) and ack.get("seq") == seq:
                        return ack
            time.sleep(0.2)
        raise CheckFailed(f"domU helper did not answer command {seq} within {timeout:.0f}s")

    def call(self, op: str, timeout: float = 60.0, **args: Any) -> dict[str, Any]:
        self.seq += 1
        cmd = json.dumps({"seq": self.seq, "op": op, **args})
        self.xs.write(f"{self.base}/cmd".encode(), cmd.encode())
        ack = self.wait_ack(self.seq, timeout)
        if not ack.get("ok"):
            raise CheckFailed(f"domU helper: {ack.get('error')}")
        return ack


class Recorder:
    """parec of dom0's null sink monitor, into a file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.out = path.open("wb")
        self.proc = subprocess.Popen(
            [
                "parec",
                "--device=null.monitor",
                *PCM_ARGS,
                "--channels=2",
                "--client-name=dom0-listener",
                "--latency-msec=100",
            ],
            stdout=self.out,
        )

    def stop(self) -> bytes:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.out.close()
        return self.path.read_bytes()


class Dom0Driver:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.phases: dict[str, dict[str, Any]] = {}
        self.checks: dict[str, dict[str, Any]] = {}
        self.figures: dict[str, Any] = {}
        self.agent: subprocess.Popen[bytes] | None = None
        self.agent_log: list[str] = []
        self.domid = -1
        self.guest: GuestChannel | None = None

    # -- bookkeeping
    def now(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    def check(self, name: str, passed: bool, detail: Any) -> None:
        self.checks[name] = {"pass": bool(passed), "detail": detail}
        log(f"@@CHECK {name} {'PASS' if passed else 'FAIL'} {json.dumps(detail)[:300]}")

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        entry: dict[str, Any] = {"start_s": self.now(), "dom0_uptime": uptime()}
        self.phases[name] = entry
        log(f"@@MARK {name} dom0-uptime={entry['dom0_uptime']}")
        try:
            yield
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"[:500]
            log(f"@@PHASE-ERROR {name}: {entry['error']}")
        finally:
            entry["duration_s"] = round(time.monotonic() - start, 2)

    def wait_for(self, what: str, probe: Callable[[], Any], timeout: float) -> tuple[Any, float]:
        """Poll `probe` until it returns something true; (value, seconds waited)."""
        start = time.monotonic()
        while True:
            value = probe()
            if value:
                return value, round(time.monotonic() - start, 2)
            if time.monotonic() - start > timeout:
                raise CheckFailed(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(0.25)

    # -- helpers
    def status(self) -> dict[str, Any]:
        from qvaudio.dom0.control import ControlError, request

        try:
            return request(CONTROL, {"cmd": "status"}, timeout=5)
        except (ControlError, OSError):
            return {}

    def vm_entry(self) -> dict[str, Any] | None:
        entry = self.status().get("vms", {}).get(VM_NAME)
        return entry if isinstance(entry, dict) else None

    def connected(self) -> dict[str, Any] | None:
        entry = self.vm_entry()
        if entry and entry.get("state") == "open" and "connected_s" in entry:
            return entry
        return None

    def not_connected(self) -> bool:
        return self.connected() is None

    def sink_inputs_named(self, name: str) -> int:
        out = subprocess.run(["pactl", "list", "sink-inputs"], capture_output=True, text=True)
        return len(re.findall(rf'application\.name = "{re.escape(name)}"', out.stdout))

    def brief_status(self) -> dict[str, Any] | None:
        entry = self.vm_entry()
        if entry is None:
            return None
        playback = entry.get("playback") or {}
        keep = ("active", "corked", "decision", "latency_us", "late_drops", "queued_ms")
        return {
            "state": entry.get("state"),
            "playback": {k: playback.get(k) for k in keep},
            "counters": entry.get("counters"),
        }

    def guest_status(self) -> Any:
        assert self.guest is not None
        try:
            return self.guest.call("status", timeout=30).get("status")
        except CheckFailed as exc:
            return str(exc)

    def write_policy(self, text: str) -> None:
        tmp = POLICY_DIR / "10-qvtest.tmp"
        tmp.write_text(text)
        tmp.chmod(0o644)
        os.replace(tmp, POLICY_DIR / "10-qvtest.yaml")

    def decision(self, direction: str) -> str | None:
        entry = self.vm_entry() or {}
        return (entry.get(direction) or {}).get("decision")

    def tone_through(self, label: str) -> None:
        """Play PLAY_HZ for 3 s in the domU; check what reaches dom0's sink."""
        assert self.guest is not None
        seconds = 3.0
        rec = Recorder(Path(f"/tmp/{label}.raw"))
        time.sleep(1.0)  # a new record stream on a monitor takes a moment to flow
        try:
            play = self.guest.call("play", freq=PLAY_HZ, seconds=seconds, timeout=60)
            time.sleep(2.0)  # the tail still in flight through both agents
        finally:
            pcm = rec.stop()
        result = analyse(pcm, 2, PLAY_HZ)
        result["guest_sink"] = play.get("sink")
        result["pacat_s"] = play.get("played_s")
        result["dom0_status"] = self.brief_status()
        result["guest_status"] = self.guest_status()
        self.figures[label] = result
        log(f"[driver] {label}: {result}")
        tone = bool(result.get("tone"))
        self.check(
            f"{label}_frequency",
            tone and result["freq_error_pct"] <= FREQ_TOLERANCE_PCT,
            {
                "measured_hz": result.get("freq_hz"),
                "error_pct": result.get("freq_error_pct"),
                "limit_pct": FREQ_TOLERANCE_PCT,
                "guest_sink": play.get("sink"),
            },
        )
        self.check(
            f"{label}_coverage",
            tone and result["nonsilent_fraction"] >= MIN_COVERAGE,
            {"nonsilent_fraction": result.get("nonsilent_fraction"), "min": MIN_COVERAGE},
        )
        if label == "playback":
            self.check(
                "playback_duration",
                tone and result["tone_s"] >= MIN_TONE_FRACTION * seconds,
                {
                    "tone_s": result.get("tone_s"),
                    "played_s": seconds,
                    "min_fraction": MIN_TONE_FRACTION,
                },
            )

    # -- the run
    def run(self) -> dict[str, Any]:
        try:
            self.steps()
        except Exception as exc:  # a bug in the driver itself: still report
            self.figures["driver_error"] = f"{type(exc).__name__}: {exc}"[:500]
        finally:
            self.finish()
        for name in DOM0_CHECKS:
            if name not in self.checks:
                failed = [f"{n}: {p['error']}" for n, p in self.phases.items() if "error" in p]
                self.checks[name] = {
                    "pass": False,
                    "detail": {"not_reached": failed[-1:] or "driver stopped"},
                }
        return {
            "phases": self.phases,
            "checks": self.checks,
            "figures": self.figures,
            "domid": self.domid,
            "dom0_uptime_end": uptime(),
        }

    def steps(self) -> None:
        with self.phase("dom0_setup"):
            start_pulse()
            CONTROL.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tuning = self.figures["settings"] = settings()
            DOM0_CONFIG.write_text(
                f"dom0:\n  capture_period_ms: {tuning['dom0_capture_period_ms']}\n"
            )
            self.agent = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "qvaudio.agent_dom0",
                    "--transport",
                    "xen",
                    "--policy-dir",
                    str(POLICY_DIR),
                    "--control-socket",
                    str(CONTROL),
                    "--pulse-server",
                    PULSE,
                    "--no-notifications",
                    "--config",
                    str(DOM0_CONFIG),
                    "--latency-ms",
                    str(tuning["dom0_latency_ms"]),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            pump(self.agent.stdout, "[dom0-agent]", self.agent_log)
            _, waited = self.wait_for("the dom0 agent's control socket", self.status, 60)
            self.check("dom0_agent_started", True, {"control_socket_after_s": waited})
        if "dom0_agent_started" not in self.checks:
            return

        with self.phase("domu_create"):
            started = time.monotonic()
            create = subprocess.run(
                ["xl", "create", "/etc/xen/qvtest.cfg"], capture_output=True, text=True
            )
            if create.returncode != 0:
                raise CheckFailed(f"xl create failed: {create.stderr[-800:]}")
            self.domid = int(
                subprocess.run(
                    ["xl", "domid", VM_NAME], capture_output=True, text=True, check=True
                ).stdout
            )
            tail = subprocess.Popen(
                ["tail", "-n", "+1", "-F", f"/var/log/xen/guest-{VM_NAME}.log"],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            pump(tail.stdout, "[domU]")
            self.guest = GuestChannel(self.domid)
            hello = self.guest.wait_ack(0, 120)
            self.figures["domu"] = {
                "domid": self.domid,
                "hostname": hello.get("hostname"),
                "xl_create_s": round(time.monotonic() - started, 2),
            }
            self.check("domu_created", True, self.figures["domu"])
        if self.guest is None or "domu_created" not in self.checks:
            return

        with self.phase("guest_start"):
            ack = self.guest.call("start_guest", timeout=120)
            entry, waited = self.wait_for("dom0 to connect to the guest", self.connected, 60)
            self.figures["guest_start"] = {
                "guest_ready_s": ack.get("ready_s"),
                "dom0_connected_after_s": waited,
            }
            self.check(
                "guest_connected",
                True,
                {"transport": entry.get("transport"), "origin": entry.get("origin")},
            )

        with self.phase("name_check"):
            cli = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "qvaudio.cli",
                    "--control-socket",
                    str(CONTROL),
                    "status",
                    "--json",
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            data = json.loads(cli.stdout) if cli.returncode == 0 else {}
            vms = data.get("vms", {})
            entry = vms.get(VM_NAME, {})
            xs_name = self.guest.read(f"/local/domain/{self.domid}/name")
            detail = {
                "status_vms": sorted(vms),
                "origin": entry.get("origin"),
                "transport": entry.get("transport"),
                "xenstore_name": xs_name.decode() if xs_name else None,
                "guest_hostname": self.figures["domu"].get("hostname"),
                "cli_rc": cli.returncode,
            }
            self.check(
                "name_from_xenstore",
                sorted(vms) == [VM_NAME]
                and entry.get("origin") == f"Xen domain {self.domid}"
                and entry.get("transport") == f"xen:{self.domid}:{VCHAN_PORT}"
                and detail["xenstore_name"] == VM_NAME,
                detail,
            )

        with self.phase("playback"):
            self.tone_through("playback")

        with self.phase("deny"):
            self.write_policy(f"rules:\n  - vm: {VM_NAME}\n    playback: deny\n")
            _, waited = self.wait_for(
                "the deny policy", lambda: self.decision("playback") == "deny", 30
            )
            self.check(
                "deny_policy_applied",
                waited <= POLICY_RELOAD_MAX_S,
                {"applied_after_s": waited, "max_s": POLICY_RELOAD_MAX_S},
            )
            rec = Recorder(Path("/tmp/deny.raw"))
            time.sleep(1.0)
            try:
                self.guest.call("play", freq=PLAY_HZ, seconds=2.0, timeout=60)
                time.sleep(2.0)
            finally:
                pcm = rec.stop()
            result = analyse(pcm, 2, PLAY_HZ)
            result["dom0_status"] = self.brief_status()
            self.figures["deny"] = result
            self.check(
                "deny_silence",
                result["peak"] < SILENCE_PEAK and not result.get("tone"),
                {
                    "peak": result["peak"],
                    "recorded_s": result["recorded_s"],
                    "max_peak": SILENCE_PEAK,
                },
            )
            refused = self.guest.call("grep_log", pattern="dom0 (refused|stopped) playback")
            self.check("deny_guest_refused", refused["count"] > 0, refused.get("lines"))

        with self.phase("capture"):
            self.write_policy(
                f"rules:\n  - vm: {VM_NAME}\n    playback: allow\n    capture: allow\n"
            )
            _, waited = self.wait_for(
                "the capture policy",
                lambda: (
                    self.decision("capture") == "allow" and self.decision("playback") == "allow"
                ),
                30,
            )
            self.check(
                "capture_policy_applied",
                waited <= POLICY_RELOAD_MAX_S,
                {"applied_after_s": waited, "max_s": POLICY_RELOAD_MAX_S},
            )
            source = default_device("Source")
            player = start_pacat(MIC_HZ, 15.0, "null")
            try:
                time.sleep(0.5)
                result = self.guest.call("record_mic", seconds=6.0, freq=MIC_HZ, timeout=90)
            finally:
                player.terminate()
                player.wait(10)
            result = {k: v for k, v in result.items() if k not in ("seq", "ok")}
            result["dom0_default_source"] = source
            result["dom0_status"] = self.brief_status()
            self.figures["capture"] = result
            self.check(
                "capture_frequency",
                bool(result.get("tone")) and result["freq_error_pct"] <= FREQ_TOLERANCE_PCT,
                {
                    "measured_hz": result.get("freq_hz"),
                    "error_pct": result.get("freq_error_pct"),
                    "limit_pct": FREQ_TOLERANCE_PCT,
                    "peak": result.get("peak"),
                },
            )

        with self.phase("guest_restart"):
            self.guest.call("kill_guest")
            _, noticed = self.wait_for(
                "dom0 to notice the guest agent died", self.not_connected, 60
            )
            self.check(
                "restart_disconnect_noticed",
                noticed <= NOTICE_MAX_S,
                {"noticed_after_s": noticed, "max_s": NOTICE_MAX_S},
            )
            ack = self.guest.call("start_guest", timeout=120)
            _, waited = self.wait_for("dom0 to reconnect", self.connected, 60)
            self.figures["restart"] = {
                "kill_noticed_s": noticed,
                "guest_ready_s": ack.get("ready_s"),
                "reconnected_after_s": waited,
            }
            self.check("restart_reconnected", True, self.figures["restart"])
            self.tone_through("restart")

        with self.phase("destroy"):
            self.guest.call("play", freq=PLAY_HZ, seconds=12.0, background=True, timeout=60)
            _, waited = self.wait_for(
                "a host stream named after the VM", lambda: self.sink_inputs_named(VM_NAME), 30
            )
            self.check("destroy_stream_existed", True, {"appeared_after_s": waited})
            started = time.monotonic()
            destroy = subprocess.run(
                ["xl", "destroy", str(self.domid)], capture_output=True, text=True
            )
            destroy_s = round(time.monotonic() - started, 2)
            if destroy.returncode != 0:
                raise CheckFailed(f"xl destroy failed: {destroy.stderr[-500:]}")
            _, noticed = self.wait_for("dom0 to drop the VM", self.not_connected, 60)
            noticed = round(noticed + destroy_s, 2)
            _, removed = self.wait_for(
                "the VM's host stream to go", lambda: self.sink_inputs_named(VM_NAME) == 0, 60
            )
            entry = self.vm_entry()
            self.figures["destroy"] = {
                "xl_destroy_s": destroy_s,
                "noticed_s": noticed,
                "stream_removed_after_s": removed,
                "status_entry": entry,
            }
            self.check(
                "destroy_noticed",
                noticed <= NOTICE_MAX_S and self.not_connected(),
                {"noticed_after_s": noticed, "max_s": NOTICE_MAX_S, "status_entry": entry},
            )
            self.check(
                "destroy_stream_removed",
                self.sink_inputs_named(VM_NAME) == 0,
                {"removed_after_s": removed},
            )

    def finish(self) -> None:
        failed = [n for n, c in self.checks.items() if not c["pass"]]
        if failed or any("error" in p for p in self.phases.values()):
            print_diagnostics("dom0")
            if self.guest is not None and "destroy_noticed" not in self.checks:
                with contextlib.suppress(Exception):
                    self.guest.call("diagnostics", timeout=30)
        with self.phase("dom0_stop"):
            crashes = crash_lines()
            self.figures["dom0_crash_lines"] = crashes[:3]
            agent = self.agent
            if agent is None:
                return
            alive = agent.poll() is None
            agent.send_signal(signal.SIGTERM)
            try:
                rc: int | None = agent.wait(20)
            except subprocess.TimeoutExpired:
                agent.kill()
                rc = None
            tracebacks = sum("Traceback" in ln for ln in self.agent_log)
            self.check(
                "dom0_agent_survived",
                alive and rc == 0 and tracebacks == 0,
                {
                    "alive_at_end": alive,
                    "exit_code_on_sigterm": rc,
                    "tracebacks_in_log": tracebacks,
                },
            )


def emit_result(result: dict[str, Any]) -> None:
    """Print the JSON as checksummed base64 lines (twice: serial lines can be mangled)."""
    blob = base64.b64encode(json.dumps(result, sort_keys=True).encode()).decode()
    digest = hashlib.sha256(blob.encode()).hexdigest()
    chunks = [blob[i : i + 120] for i in range(0, len(blob), 120)]
    for _ in range(2):
        for i, chunk in enumerate(chunks):
            log(f"{RESULT_TAG} {i} {len(chunks)} {chunk}")
        log(f"{RESULT_TAG}-SHA256 {digest}")


# ------------------------------------------------------------------ host side
def cmd_stamp(args: argparse.Namespace) -> int:
    """Prefix each console line with seconds since QEMU started."""
    out = sys.stdout.buffer
    for line in sys.stdin.buffer:
        out.write(b"[%7.2f] " % (time.time() - args.t0) + line)
        out.flush()
    return 0


def read_result(serial: str) -> dict[str, Any] | None:
    pattern = re.compile(rf"{RESULT_TAG} (\d+) (\d+) ([A-Za-z0-9+/=]+)\s*$")
    digests = re.findall(rf"{RESULT_TAG}-SHA256 ([0-9a-f]{{64}})", serial)
    chunks: dict[int, set[str]] = {}
    total = 0
    for line in serial.splitlines():
        match = pattern.search(line)
        if match:
            total = int(match.group(2))
            chunks.setdefault(int(match.group(1)), set()).add(match.group(3))
    if not total or len(chunks) < total or not digests:
        return None
    # Each chunk appears twice; pick the combination whose checksum matches.
    candidates = [""]
    for i in range(total):
        candidates = [c + part for c in candidates for part in chunks.get(i, ())][:64]
    for blob in candidates:
        if hashlib.sha256(blob.encode()).hexdigest() in digests:
            return json.loads(base64.b64decode(blob))  # type: ignore[no-any-return]
    return None


def cmd_collect(args: argparse.Namespace) -> int:
    out = Path(args.out)
    serial_path = out / "serial.log"
    serial = serial_path.read_text(errors="replace") if serial_path.exists() else ""
    phases: dict[str, float] = {}
    marks = []
    with contextlib.suppress(OSError):
        for line in (out / "host-phases.txt").read_text().splitlines():
            name, raw_stamp = line.split()
            marks.append((name, float(raw_stamp)))
    end = time.time()
    for (name, stamp), nxt in zip(marks, [*marks[1:], ("end", end)], strict=True):
        phases[name] = round(nxt[1] - stamp, 2)
    qemu: dict[str, str] = {}
    with contextlib.suppress(OSError):
        qemu = dict(kv.split("=", 1) for kv in (out / "qemu.txt").read_text().split())
    result: dict[str, Any] = {
        "test": "qvaudio on real Xen (Xen 4.17 under QEMU TCG, PV dom0 + PV domU)",
        "status": args.status,
        "reason": args.reason,
        "results_dir": str(out),
        "serial_log": str(serial_path),
        "total_s": round(end - args.t0, 1),
        "host_phases_s": phases,
    }
    if args.status == "skipped":
        (out / "result.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        return 0
    inner = read_result(serial) if serial else None
    checks: dict[str, dict[str, Any]] = {}
    if inner is not None:
        checks.update(inner["checks"])
        result["vm_phases"] = inner["phases"]
        result["figures"] = inner["figures"]
        result["domid"] = inner.get("domid")
    else:
        for name in DOM0_CHECKS:
            checks[name] = {"pass": False, "detail": "no result from dom0"}
    checks["result_received"] = {
        "pass": inner is not None,
        "detail": "dom0 printed a result" if inner else "no valid result",
    }
    checks["qemu_finished"] = {
        "pass": qemu.get("timed_out") == "0" and qemu.get("qemu_rc") == "0",
        "detail": qemu,
    }
    eager = re.search(r"Support for PV VMs:.*EAGER_FPU", serial)
    checks["eager_fpu_active"] = {
        "pass": bool(eager),
        "detail": eager.group(0)[-120:] if eager else "not in log",
    }
    crashes = [
        ln[:200]
        for ln in serial.splitlines()
        if re.search(r"segfault at|traps:|general protection|Kernel panic|Oops", ln)
    ]
    checks["no_process_crashes"] = {"pass": not crashes, "detail": crashes[:5]}
    result["checks"] = checks
    result["qemu"] = qemu
    failed = sorted(name for name, c in checks.items() if not c["pass"])
    result["failed_checks"] = failed
    if args.status == "pass" and failed:
        result["status"] = "fail"
    if result["status"] == "fail" and not result["reason"]:
        result["reason"] = f"failed checks: {', '.join(failed)}"
    (out / "result.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return 0 if result["status"] == "pass" else 1


def cmd_summary(args: argparse.Namespace) -> int:
    result = json.loads((Path(args.out) / "result.json").read_text())
    log(
        f"RESULT: {result['status'].upper()} in {result.get('total_s')} s "
        f"({result.get('reason') or 'all checks passed'})"
    )
    for name, check in sorted(result.get("checks", {}).items()):
        log(f"  {'ok  ' if check['pass'] else 'FAIL'} {name}: {json.dumps(check['detail'])[:150]}")
    log(f"  host phases (s): {result.get('host_phases_s')}")
    log(f"  results: {Path(args.out) / 'result.json'}")
    return 0


def cmd_smoke(args: argparse.Namespace) -> int:
    """In a chroot of an image, on the host: everything imports and loads."""
    import cffi  # noqa: F401
    import pulsectl  # noqa: F401
    import pyxs  # noqa: F401
    import yaml  # noqa: F401

    import qvaudio.agent_guest
    import qvaudio.core.tone
    import qvaudio.pulse.pcm
    import qvaudio.vchan

    qvaudio.vchan.load_library()
    qvaudio.pulse.pcm._load()
    if args.image == "dom0":
        import numpy  # noqa: F401

        import qvaudio.agent_dom0
        import qvaudio.cli
        import qvaudio.core.gain
    log(f"SMOKE OK {args.image}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="role", required=True)
    sub.add_parser("dom0")
    sub.add_parser("domu")
    smoke = sub.add_parser("smoke")
    smoke.add_argument("image", choices=("dom0", "domU"))
    stamp = sub.add_parser("stamp")
    stamp.add_argument("--t0", type=float, required=True)
    collect = sub.add_parser("collect")
    collect.add_argument("--out", required=True)
    collect.add_argument("--status", choices=("pass", "fail", "skipped"), required=True)
    collect.add_argument("--reason", default="")
    collect.add_argument("--t0", type=float, required=True)
    summary = sub.add_parser("summary")
    summary.add_argument("--out", required=True)
    args = parser.parse_args()
    match args.role:
        case "dom0":
            result = Dom0Driver().run()
            emit_result(result)
            return 0
        case "domu":
            Helper().run()
            return 0
        case "stamp":
            return cmd_stamp(args)
        case "collect":
            return cmd_collect(args)
        case "summary":
            return cmd_summary(args)
        case "smoke":
            return cmd_smoke(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
