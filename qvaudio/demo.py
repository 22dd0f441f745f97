"""`qvaudio demo`: the whole path on one machine, measured.

Two private PulseAudio daemons stand in for a VM's audio server and dom0's;
`qvaudio-guest` and `qvaudio-dom0` run between them over the Unix-socket
transport with the shipped qvaudio.yaml and policy/, exactly as installed
agents would over a vchan. A 440 Hz tone is played in the "VM" by an
ordinary client, dom0's sink is recorded, and the result is printed:
frequency, non-silent fraction, signal-to-noise ratio, the tone's onset
delay and the policy decision that let it through.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from qvaudio.control import ControlError, request
from qvaudio.formats import DEFAULT_FORMAT
from qvaudio.policy import Access
from qvaudio.private_pulse import SINK, PrivatePulse, PulseUnavailable

VM_NAME = "demo-vm"
FREQ = 440.0


class DemoError(Exception):
    """Something the person running the demo can act on."""


def _progress(args: argparse.Namespace, text: str) -> None:
    if not args.json:
        print(f"... {text}", file=sys.stderr, flush=True)


def _wait(what: str, check: Any, timeout: float, logs: list[Path]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    tails = "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-1500:]}" for p in logs)
    raise DemoError(f"timed out waiting for {what}\n{tails}")


def _agent(
    module: str, extra: list[str], env: dict[str, str], log: Path
) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", module, *extra],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _status(control: Path) -> dict[str, Any] | None:
    with contextlib.suppress(ControlError, OSError):
        return request(control, {"cmd": "status"}, timeout=2)
    return None


def _playing(control: Path) -> dict[str, Any] | None:
    vm = _vm_status(control)
    if vm is not None and vm["playback"].get("active"):
        return vm
    return None


def _decided(control: Path) -> dict[str, Any] | None:
    """The VM's status once dom0 plays it or its policy has refused it.

    A person whose policy denies playback learns that at once, and the demo
    still plays the tone to show that nothing gets through.
    """
    vm = _vm_status(control)
    if vm is not None and (vm["playback"].get("active") or _denied(vm)):
        return vm
    return None


def _denied(vm: dict[str, Any]) -> bool:
    return bool(vm["playback"].get("decision") == Access.DENY)


def _vm_status(control: Path) -> dict[str, Any] | None:
    status = _status(control)
    vm = (status or {}).get("vms", {}).get(VM_NAME)
    if vm and isinstance(vm.get("playback"), dict):
        return vm  # type: ignore[no-any-return]
    return None


def run_demo(args: argparse.Namespace) -> int:
    try:
        result = _run(args)
    except (DemoError, PulseUnavailable) as exc:
        print(f"qvaudio demo: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        _print(result)
    return 0 if result["tone_arrived"] else 1


def _run(args: argparse.Namespace) -> dict[str, Any]:
    from qvaudio.pulse_pcm import PcmStream
    from qvaudio.tone import (
        decode_mono,
        estimate_frequency,
        find_offset,
        find_onset,
        generate_sine,
        nonsilent_fraction,
        snr_db,
    )

    fmt = DEFAULT_FORMAT
    with tempfile.TemporaryDirectory(prefix="qvaudio-demo-") as tmp:
        base = Path(tmp)
        vm_dir = base / "vms"
        vm_dir.mkdir(mode=0o700)
        control = base / "control.sock"
        vm_pulse = PrivatePulse(base, "vm-audio")
        host_pulse = None if args.speakers else PrivatePulse(base, "dom0-audio")
        agents: list[subprocess.Popen[bytes]] = []
        logs = [base / "dom0.log", base / "guest.log"]
        try:
            _progress(args, "starting the VM's audio server")
            vm_pulse.start()
            host_env = dict(os.environ)
            if host_pulse is not None:
                _progress(args, "starting dom0's audio server")
                host_pulse.start()
                host_env = host_pulse.full_env()
            host_server = host_pulse.server if host_pulse else None
            _progress(
                args, "starting qvaudio-dom0 (its usual config and policy, Unix-socket transport)"
            )
            agents.append(_agent(
                "qvaudio.agent_dom0",
                ["--transport", f"unix:{vm_dir}", "--control-socket", str(control),
                 "--no-notifications"],
                host_env, logs[0],
            ))  # fmt: skip
            _progress(args, f"starting qvaudio-guest in the VM {VM_NAME!r}")
            agents.append(_agent(
                "qvaudio.agent_guest",
                ["--transport", f"unix:{vm_dir / VM_NAME}"],
                vm_pulse.full_env(), logs[1],
            ))  # fmt: skip
            _wait("the guest's virtual sink", lambda: _default_sink_is_ours(vm_pulse), 20, logs)
            vm_status = _wait("dom0 to take the VM's playback", lambda: _decided(control), 20, logs)
            if _denied(vm_status):
                _progress(args, f"dom0's policy denies playback for {VM_NAME!r}: "
                                f"{vm_status['playback'].get('rule')}")  # fmt: skip
            _progress(args, f"playing {FREQ:g} Hz for {args.seconds:g} s in the VM")
            recorded: list[bytes] = []
            period = fmt.bytes_for_ms(10)
            seconds = args.seconds + 3.0
            record_started = threading.Event()
            arrivals: list[float] = []

            def record() -> None:
                device = f"{SINK}.monitor" if host_pulse else None
                with PcmStream.record(host_server, device, fmt, "qvaudio-demo", "listen",
                                      period) as stream:  # fmt: skip
                    record_started.set()
                    for _ in range(int(seconds * 100)):
                        recorded.append(stream.read(period))
                        # When the chunk's last sample was captured: now minus
                        # the record stream's own latency.
                        arrivals.append(time.monotonic() - stream.latency_us() / 1e6)

            recorder = threading.Thread(target=record, daemon=True)
            recorder.start()
            record_started.wait(5)
            # A fresh record stream on a null sink's monitor settles its latency
            # over the first second or so; measure only after that.
            time.sleep(2.0)
            tone = generate_sine(FREQ, fmt, args.seconds, amplitude=0.5)
            with PcmStream.playback(vm_pulse.server, None, fmt, "demo-player", "tone",
                                    fmt.bytes_for_ms(40)) as player:  # fmt: skip
                play_t0 = time.monotonic()
                for start in range(0, len(tone), period):
                    player.write(tone[start : start + period])
                player.drain()
            recorder.join(seconds + 5)
            if args.keep_recording:
                Path(args.keep_recording).write_bytes(b"".join(recorded))
            samples = decode_mono(b"".join(recorded), fmt)
            onset, offset = find_onset(samples, 0.05), find_offset(samples, 0.05)
            arrived = onset is not None and offset is not None and offset - onset > fmt.rate // 10
            # Measured whether or not the tone arrived: 0.0 then says that
            # nothing (not a quieter tone) reached dom0.
            coverage = nonsilent_fraction(samples, fmt.rate)
            freq = snr = 0.0
            onset_ms = None
            if arrived and onset is not None and offset is not None:
                tone_only = samples[onset:offset]
                freq = estimate_frequency(tone_only, fmt.rate)
                snr = snr_db(tone_only, fmt.rate, freq)
                # Each chunk says when its audio was captured; the median over
                # chunks of "capture time minus position" is when recording began.
                starts = sorted(t - (i + 1) * 0.01 for i, t in enumerate(arrivals))
                started = starts[len(starts) // 2]
                onset_ms = round((started + onset / fmt.rate - play_t0) * 1000, 1)
            final = _playing(control) or vm_status
            policy_dir = ((_status(control) or {}).get("policy") or {}).get("dir")
            playback = final.get("playback", {})
            return {
                "vm": VM_NAME,
                "tone_hz": FREQ,
                "measured_hz": round(freq, 2),
                "frequency_error_percent": round(abs(freq - FREQ) / FREQ * 100, 3),
                "nonsilent_fraction": round(coverage, 4),
                "snr_db": round(snr, 1),
                "onset_delay_ms": onset_ms,
                "reported_latency_ms": round(playback.get("latency_us", 0) / 1000, 1),
                "policy_decision": playback.get("decision"),
                "policy_rule": playback.get("rule"),
                "policy_dir": policy_dir,
                "format": playback.get("format"),
                "played_to": "your audio server" if args.speakers else "a private dom0 server",
                "tone_arrived": arrived and abs(freq - FREQ) / FREQ < 0.005 and coverage >= 0.99,
            }
        finally:
            for agent in agents:
                with contextlib.suppress(ProcessLookupError):
                    agent.send_signal(signal.SIGTERM)
            for agent in agents:
                try:
                    agent.wait(10)
                except subprocess.TimeoutExpired:
                    agent.kill()
            vm_pulse.stop()
            if host_pulse is not None:
                host_pulse.stop()


def _default_sink_is_ours(vm: PrivatePulse) -> bool:
    import pulsectl

    from qvaudio.pulse_devices import connect

    try:
        with connect("qvaudio-demo", vm.server) as pulse:
            return bool(pulse.server_info().default_sink_name == "qvaudio_out")
    except pulsectl.PulseError:
        return False


def _print(result: dict[str, Any]) -> None:
    verdict = "the tone arrived" if result["tone_arrived"] else "THE TONE DID NOT ARRIVE INTACT"
    onset = result["onset_delay_ms"]
    print(f"qvaudio demo: {verdict}")
    print(f"  VM               {result['vm']} ({result['format']}) -> {result['played_to']}")
    print(f"  policy           playback {result['policy_decision']} ({result['policy_rule']})")
    print(f"  policy files     {result['policy_dir']}")
    print(
        f"  frequency        {result['measured_hz']} Hz (played {result['tone_hz']:g} Hz, "
        f"error {result['frequency_error_percent']}%)"
    )
    print(f"  non-silent       {result['nonsilent_fraction'] * 100:.2f}% of 10 ms windows")
    print(f"  signal-to-noise  {result['snr_db']} dB")
    print(f"  onset delay      {onset} ms (VM player -> dom0 sink, incl. both servers' buffers)")
    print(f"  latency (status) {result['reported_latency_ms']} ms on dom0's side")
