"""The demo's run: private servers, both agents, the tone, and an answer whatever happens.

Every way it can end answers at once and says why: an agent or daemon that
stops is reported with its own log, a policy that does not load with its
problems, and `--json` prints one JSON object whatever happens. Nothing it
starts outlives it (see `qvaudio.pulse.private.die_with_parent`).
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
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from qvaudio.common.config import default_config_path
from qvaudio.core.formats import DEFAULT_FORMAT
from qvaudio.core.policy import Access
from qvaudio.demo import GUEST_SINK, VM_NAME, DemoError
from qvaudio.demo.measure import (
    FREQ,
    MAX_FREQ_ERROR_PERCENT,
    MIN_NONSILENT_PERCENT,
    Recorder,
    generate_tone,
    measure,
)
from qvaudio.demo.policy import PolicyChoice, choose_policy, load_config_or_none
from qvaudio.demo.report import print_result
from qvaudio.demo.servers import (
    check_your_server,
    decided,
    default_monitor,
    default_sink_is,
    denied,
    dom0_status,
    playing,
    stream_monitor,
)
from qvaudio.pulse.private import SINK, PrivatePulse, PulseUnavailable, die_with_parent, log_tail

T = TypeVar("T")


class _Stopped(BaseException):
    """A signal asked the demo to stop (BaseException: nothing on the way swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class _Child:
    """An agent the demo started, with the log that says why it stopped."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def exit_status(self) -> int | None:
        return self.proc.poll()


def _describe_exit(status: int) -> str:
    if status < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-status).name}"
    return f"exit status {status}"


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.splitlines())


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo and print its outcome; the exit status for the command."""
    facts: dict[str, Any] = {
        "vm": VM_NAME,
        "played_to": "your audio server" if args.speakers else "a private dom0 server",
    }

    def stop(signum: int, _frame: object) -> None:
        raise _Stopped(signum)

    # SIGINT arrives as KeyboardInterrupt; these would otherwise end the demo
    # without its cleanup.
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        result = _Demo(args, facts).run()
    except _Stopped as exc:
        return _failed(args, facts, f"stopped by {exc}", 128 + exc.signum)
    except KeyboardInterrupt:
        return _failed(args, facts, "interrupted (SIGINT)", 128 + signal.SIGINT)
    except (DemoError, PulseUnavailable) as exc:
        return _failed(args, facts, str(exc), 1)
    except Exception as exc:
        # A bug: its traceback is what a report needs, but --json still gets its object.
        traceback.print_exc()
        return _failed(args, facts, f"internal error: {exc!r} (please report it)", 1)
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print_result(result)
    return 0 if result["ok"] else 1


def _failed(args: argparse.Namespace, facts: dict[str, Any], error: str, code: int) -> int:
    if args.json:
        outcome = {**facts, "ok": False, "tone_arrived": False, "error": error}
        print(json.dumps(outcome, indent=2, sort_keys=True))
    else:
        print(f"qvaudio demo: {error}", file=sys.stderr)
    return code


class _Demo:
    #: The private temp dir: sockets, logs, the demo's own policy.
    base: Path

    def __init__(self, args: argparse.Namespace, facts: dict[str, Any]) -> None:
        self.args = args
        self.facts = facts
        self.children: list[_Child] = []
        self.pulses: list[PrivatePulse] = []

    def progress(self, text: str) -> None:
        if not self.args.json:
            print(f"... {text}", file=sys.stderr, flush=True)

    def check_alive(self, waiting_for: str) -> None:
        """Fail at once, with its own words, if anything the demo started has stopped."""
        started = [
            *((f"the private PulseAudio daemon {p.name!r}", p.exit_status(), p.log)
              for p in self.pulses),
            *((child.name, child.exit_status(), child.log) for child in self.children),
        ]  # fmt: skip
        for name, status, log in started:
            if status is not None:
                raise DemoError(
                    f"{name} stopped ({_describe_exit(status)}) while the demo waited for "
                    f"{waiting_for}; its log ends:\n{_indent(log_tail(log))}"
                )

    def wait(self, what: str, check: Callable[[], T | None], timeout: float) -> T:
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive(what)
            result = check()
            if result:
                return result
            if time.monotonic() >= deadline:
                logs = "\n".join(
                    f"{child.name}'s log ends:\n{_indent(log_tail(child.log))}"
                    for child in self.children
                )
                raise DemoError(f"timed out after {timeout:g} s waiting for {what}\n{logs}")
            time.sleep(0.1)

    def start_agent(self, name: str, module: str, extra: list[str], env: dict[str, str]) -> _Child:
        log = self.base / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", module, *extra],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent(),
            )
        child = _Child(name, proc, log)
        self.children.append(child)
        return child

    def run(self) -> dict[str, Any]:
        keep: IO[bytes] | None = None
        if self.args.keep_recording:
            # Opened first: a path that cannot be written fails now, not after the tone.
            try:
                keep = open(self.args.keep_recording, "wb")  # noqa: SIM115
            except OSError as exc:
                raise DemoError(
                    f"--keep-recording {self.args.keep_recording}: {exc.strerror}"
                ) from None
        try:
            with tempfile.TemporaryDirectory(prefix="qvaudio-demo-") as tmp:
                self.base = Path(tmp)
                try:
                    return self._run(keep)
                finally:
                    self._stop_all()
        finally:
            if keep is not None:
                keep.close()

    def _stop_all(self) -> None:
        for child in self.children:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
        for child in self.children:
            try:
                child.proc.wait(10)
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
        for pulse in self.pulses:
            pulse.stop()

    def _run(self, keep: IO[bytes] | None) -> dict[str, Any]:
        try:
            from qvaudio.pulse.pcm import PcmStream, PulseError
        except (ImportError, OSError) as exc:
            raise DemoError(f"the PulseAudio client library is missing: {exc}") from None
        args, facts, base = self.args, self.facts, self.base
        fmt = DEFAULT_FORMAT
        config = load_config_or_none()
        # The server the "dom0" agent plays to with --speakers: the one a real
        # qvaudio-dom0 would use.
        your_server = (config.dom0.pulse_server or None) if config else None
        if args.speakers:
            check_your_server(your_server)
        vm_dir = base / "vms"
        vm_dir.mkdir(mode=0o700)
        control = base / "control.sock"
        policy = choose_policy(config, base / "policy")
        facts.update(policy_dir=str(policy.directory), policy_source=policy.why)

        self.progress("starting the VM's audio server")
        vm_pulse = PrivatePulse(base, "vm-audio")
        self.pulses.append(vm_pulse)
        vm_pulse.start()
        host_server = your_server
        host_env = dict(os.environ)
        if not args.speakers:
            self.progress("starting dom0's audio server")
            host_pulse = PrivatePulse(base, "dom0-audio")
            self.pulses.append(host_pulse)
            host_pulse.start()
            host_server, host_env = host_pulse.server, host_pulse.full_env()
        config_text = config.source if config else str(default_config_path())
        self.progress(f"starting qvaudio-dom0 (config: {config_text}; Unix-socket transport)")
        dom0_args = ["--transport", f"unix:{vm_dir}", "--control-socket", str(control),
                     "--policy-dir", str(policy.directory), "--no-notifications"]  # fmt: skip
        if host_server:
            dom0_args += ["--pulse-server", host_server]
        dom0 = self.start_agent("qvaudio-dom0", "qvaudio.agent_dom0", dom0_args, host_env)
        self.progress(f"starting qvaudio-guest in the VM {VM_NAME!r}")
        guest_args = ["--transport", f"unix:{vm_dir / VM_NAME}", "--pulse-server",
                      vm_pulse.server, "--sink-name", GUEST_SINK]  # fmt: skip
        self.start_agent("qvaudio-guest", "qvaudio.agent_guest", guest_args, vm_pulse.full_env())
        status = self.wait("qvaudio-dom0's control socket", lambda: dom0_status(control), 20)
        self._report_policy(status.get("policy") or {}, policy)
        self.wait("the guest's virtual sink", lambda: default_sink_is(vm_pulse, GUEST_SINK), 20)
        vm_status = self.wait("dom0 to take the VM's playback", lambda: decided(control), 20)
        refused = denied(vm_status)
        if refused:
            self.progress(f"dom0's policy denies playback for {VM_NAME!r}: "
                          f"{vm_status['playback'].get('rule')}")  # fmt: skip
        if args.speakers:
            monitor = self._speakers_monitor(your_server, dom0.proc.pid, refused)
        else:
            monitor = f"{SINK}.monitor"
        facts["recorded_from"] = monitor
        recording = Recorder(host_server, monitor, fmt)
        recording.start()
        self.wait(f"a record stream on {monitor}", recording.ready, 20)
        # A fresh record stream on a null sink's monitor settles its latency
        # over the first second or so; measure only after that.
        time.sleep(2.0)
        self.check_alive("the record stream to settle")
        self.progress(f"playing {FREQ:g} Hz for {args.seconds:g} s in the VM")
        tone = generate_tone(fmt, args.seconds)
        period = fmt.bytes_for_ms(10)
        try:
            # Into the guest's sink by name: $PULSE_SINK, meant for your server,
            # must not send the tone elsewhere.
            with PcmStream.playback(vm_pulse.server, GUEST_SINK, fmt, "demo-player", "tone",
                                    fmt.bytes_for_ms(40)) as player:  # fmt: skip
                play_t0 = time.monotonic()
                for start in range(0, len(tone), period):
                    player.write(tone[start : start + period])
                player.drain()
        except PulseError as exc:
            self.check_alive("the tone to play")
            raise DemoError(f"playing the tone in the VM failed: {exc}") from None
        # The tail: what is still in dom0's queue and both servers' buffers.
        time.sleep(1.0)
        recorded = recording.finish()
        self.check_alive("the tone to arrive")
        if keep is not None:
            keep.write(recorded)
        final = playing(control) or vm_status
        measured = measure(recorded, fmt, recording.arrivals, play_t0)
        return self._result(measured, final)

    def _report_policy(self, status: dict[str, Any], policy: PolicyChoice) -> None:
        used = status.get("dir") or str(policy.directory)
        self.facts["policy_dir"] = used
        why = policy.why if used == str(policy.directory) else "as qvaudio-dom0 reports it"
        self.progress(f"policy: {used} ({why})")
        problems = status.get("problems") or []
        if not status.get("loaded") and problems:
            self.facts["policy_problems"] = problems
            listed = "\n".join(f"  {p}" for p in problems)
            raise DemoError(
                f"qvaudio-dom0 could not load the policy in {used} ({why}), so it would "
                f"deny all audio:\n{listed}"
            )

    def _speakers_monitor(self, server: str | None, dom0_pid: int, denied: bool) -> str:
        """The monitor of the sink dom0 plays to on your server: never a microphone."""
        if denied:
            # No stream of dom0's to follow: where it would play.
            return default_monitor(server)
        return self.wait(
            f"dom0's stream for {VM_NAME!r} on your audio server",
            lambda: stream_monitor(server, dom0_pid),
            20,
        )

    def _result(self, measured: dict[str, Any], final: dict[str, Any]) -> dict[str, Any]:
        playback = final.get("playback", {})
        result = {
            **self.facts,
            **measured,
            "reported_latency_ms": round(playback.get("latency_us", 0) / 1000, 1),
            "policy_decision": playback.get("decision"),
            "policy_rule": playback.get("rule"),
            "format": playback.get("format"),
            "pass_criteria": {
                "frequency_error_percent_max": MAX_FREQ_ERROR_PERCENT,
                "nonsilent_percent_min": MIN_NONSILENT_PERCENT,
            },
        }
        why = None
        if playback.get("decision") == Access.DENY:
            why = f"dom0's policy denies playback for {VM_NAME!r}"
        elif not measured["tone_arrived"]:
            why = "the tone did not arrive intact (see the pass criteria)"
        result["ok"] = why is None and measured["tone_arrived"]
        result["error"] = why
        return result
