"""`qvaudio demo`: the whole path on one machine, measured.

Two private PulseAudio daemons stand in for a VM's audio server and dom0's;
`qvaudio-guest` and `qvaudio-dom0` run between them over the Unix-socket
transport, exactly as installed agents would over a vchan. A 440 Hz tone is
played in the "VM" by an ordinary client, the monitor of the sink dom0
played it to is recorded, and the result is printed: frequency, non-silent
fraction, signal-to-noise ratio, the tone's onset delay and the policy
decision that let it through.

dom0 uses the policy a real qvaudio-dom0 would (so the demo also shows what
your own rules decide); where none is installed, the demo writes its own,
which lets the demo VM play, rather than showing a deny-all.

Every way it can end answers at once and says why: an agent or daemon that
stops is reported with its own log, a policy that does not load with its
problems, and `--json` prints one JSON object whatever happens. Nothing it
starts outlives it (see `private_pulse.die_with_parent`).
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
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from qvaudio.common.config import Config, ConfigError, default_config_path, load_config
from qvaudio.core.errors import QvaudioError
from qvaudio.core.formats import DEFAULT_FORMAT, AudioFormat
from qvaudio.core.policy import Access
from qvaudio.dom0.control import ControlError, request
from qvaudio.dom0.policy_loader import DEFAULT_POLICY_DIR, POLICY_DIR_ENV, SOURCE_POLICY_DIR
from qvaudio.pulse.private import SINK, PrivatePulse, PulseUnavailable, die_with_parent, log_tail

VM_NAME = "demo-vm"
FREQ = 440.0
#: The guest's virtual sink, named on its command line so a config that
#: renames it cannot make the demo wait for the wrong one.
GUEST_SINK = "qvaudio_out"
#: The range `--seconds` accepts: under half a second the measurements mean
#: little; over a minute the pure-Python analysis takes longer than the tone.
MIN_SECONDS = 0.5
MAX_SECONDS = 60.0
#: What "the tone arrived intact" means.
MAX_FREQ_ERROR_PERCENT = 0.5
MIN_NONSILENT_PERCENT = 99.0
#: The demo's own policy, for a machine with none installed.
OWN_POLICY = f"""\
# Written by `qvaudio demo` because no policy is installed: the demo VM may
# play, nothing may record. Your own policy goes in /etc/qvaudio/policy.d.
rules:
  - vm: {VM_NAME}
    playback: allow
    capture: deny
"""

T = TypeVar("T")


class DemoError(QvaudioError):
    """Something the person running the demo can act on."""


class _Stopped(BaseException):
    """A signal asked the demo to stop (BaseException: nothing on the way swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def tone_seconds(text: str) -> float:
    """argparse type of `--seconds`."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    # Written so that NaN fails too.
    if not MIN_SECONDS <= value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(
            f"{text} is out of range: the tone lasts from {MIN_SECONDS:g} to {MAX_SECONDS:g} s"
        )
    return value


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


@dataclass
class PolicyChoice:
    directory: Path
    #: Why this one, in words.
    why: str


def choose_policy(config: Config | None, own_dir: Path) -> PolicyChoice:
    """The policy qvaudio-dom0 would use here; else the demo's own, written to `own_dir`.

    The same order as the agent (its flag aside): the config's
    dom0.policy_dir, $QVAUDIO_POLICY_DIR, /etc/qvaudio/policy.d, a source
    checkout's policy/. A directory the person named is used even if it does
    not exist: dom0 then reports the problem, and so does the demo.
    """
    if config is not None and config.dom0.policy_dir:
        return PolicyChoice(Path(config.dom0.policy_dir), f"dom0.policy_dir in {config.source}")
    configured = os.environ.get(POLICY_DIR_ENV)
    if configured:
        return PolicyChoice(Path(configured), f"from ${POLICY_DIR_ENV}")
    if DEFAULT_POLICY_DIR.exists():
        return PolicyChoice(DEFAULT_POLICY_DIR, "your installed policy")
    if SOURCE_POLICY_DIR.is_dir():
        return PolicyChoice(SOURCE_POLICY_DIR, "the policy shipped in this source checkout")
    own_dir.mkdir(mode=0o700)
    (own_dir / "50-demo.yaml").write_text(OWN_POLICY)
    return PolicyChoice(
        own_dir,
        f"the demo's own (allow {VM_NAME}), since no policy is installed in {DEFAULT_POLICY_DIR}",
    )


def _load_config() -> Config | None:
    """The config both agents will read, or None if it is broken (they report it)."""
    try:
        return load_config()
    except ConfigError:
        return None


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
        _print(result)
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
        for pulse in self.pulses:
            status = pulse.exit_status()
            if status is not None:
                raise DemoError(
                    f"the private PulseAudio daemon {pulse.name!r} stopped "
                    f"({_describe_exit(status)}) while the demo waited for {waiting_for}; "
                    f"its log ends:\n{_indent(log_tail(pulse.log))}"
                )
        for child in self.children:
            status = child.exit_status()
            if status is not None:
                raise DemoError(
                    f"{child.name} stopped ({_describe_exit(status)}) while the demo waited "
                    f"for {waiting_for}; its log ends:\n{_indent(log_tail(child.log))}"
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
        config = _load_config()
        # The server the "dom0" agent plays to with --speakers: the one a real
        # qvaudio-dom0 would use.
        your_server = (config.dom0.pulse_server or None) if config else None
        if args.speakers:
            _check_your_server(your_server)
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
        status = self.wait("qvaudio-dom0's control socket", lambda: _status(control), 20)
        self._report_policy(status.get("policy") or {}, policy)
        self.wait("the guest's virtual sink", lambda: _default_sink_is(vm_pulse, GUEST_SINK), 20)
        vm_status = self.wait("dom0 to take the VM's playback", lambda: _decided(control), 20)
        denied = _denied(vm_status)
        if denied:
            self.progress(f"dom0's policy denies playback for {VM_NAME!r}: "
                          f"{vm_status['playback'].get('rule')}")  # fmt: skip
        if args.speakers:
            monitor = self._speakers_monitor(your_server, dom0.proc.pid, denied)
        else:
            monitor = f"{SINK}.monitor"
        facts["recorded_from"] = monitor
        recording = _Recorder(host_server, monitor, fmt)
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
        final = _playing(control) or vm_status
        measured = _measure(recorded, fmt, recording.arrivals, play_t0)
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
            return _default_monitor(server)
        return self.wait(
            f"dom0's stream for {VM_NAME!r} on your audio server",
            lambda: _stream_monitor(server, dom0_pid),
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


class _Recorder:
    """Records `device` in a thread until told to stop; its errors come back to the caller."""

    def __init__(self, server: str | None, device: str, fmt: AudioFormat) -> None:
        self._server = server
        self._fmt = fmt
        self._device = device
        self.chunks: list[bytes] = []
        self.arrivals: list[float] = []
        self._started = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="demo-record", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def ready(self) -> bool:
        if self._error is not None:
            raise DemoError(f"cannot record {self._device}: {self._error}")
        return self._started.is_set()

    def finish(self) -> bytes:
        self._stop.set()
        self._thread.join(10)
        if self._error is not None:
            raise DemoError(f"recording {self._device} failed: {self._error}")
        return b"".join(self.chunks)

    def _run(self) -> None:
        period = self._fmt.bytes_for_ms(10)
        try:
            from qvaudio.pulse.pcm import PcmStream

            with PcmStream.record(
                self._server, self._device, self._fmt, "qvaudio-demo", "listen", period
            ) as stream:
                self._started.set()
                while not self._stop.is_set():
                    self.chunks.append(stream.read(period))
                    # When the chunk's last sample was captured: now minus
                    # the record stream's own latency.
                    self.arrivals.append(time.monotonic() - stream.latency_us() / 1e6)
        except Exception as exc:
            self._error = exc


def generate_tone(fmt: AudioFormat, seconds: float) -> bytes:
    from qvaudio.core.tone import generate_sine

    return generate_sine(FREQ, fmt, seconds, amplitude=0.5)


def _measure(
    recorded: bytes, fmt: AudioFormat, arrivals: list[float], play_t0: float
) -> dict[str, Any]:
    from qvaudio.core.tone import (
        decode_mono,
        estimate_frequency,
        find_offset,
        find_onset,
        nonsilent_fraction,
        snr_db,
    )

    samples = decode_mono(recorded, fmt)
    onset, offset = find_onset(samples, 0.05), find_offset(samples, 0.05)
    arrived = onset is not None and offset is not None and offset - onset > fmt.rate // 10
    # Measured whether or not the tone arrived: 0.0 then says that nothing
    # (not a quieter tone) reached dom0.
    coverage = nonsilent_fraction(samples, fmt.rate)
    freq = snr = 0.0
    onset_ms = None
    if arrived and onset is not None and offset is not None:
        tone_only = samples[onset:offset]
        freq = estimate_frequency(tone_only, fmt.rate)
        snr = snr_db(tone_only, fmt.rate, freq)
        # Each chunk says when its audio was captured; the median over chunks
        # of "capture time minus position" is when recording began.
        starts = sorted(t - (i + 1) * 0.01 for i, t in enumerate(arrivals))
        started = starts[len(starts) // 2]
        onset_ms = round((started + onset / fmt.rate - play_t0) * 1000, 1)
    error_percent = abs(freq - FREQ) / FREQ * 100
    return {
        "tone_hz": FREQ,
        "measured_hz": round(freq, 2),
        "frequency_error_percent": round(error_percent, 3),
        "nonsilent_fraction": round(coverage, 4),
        "snr_db": round(snr, 1),
        "onset_delay_ms": onset_ms,
        "tone_arrived": arrived
        and error_percent < MAX_FREQ_ERROR_PERCENT
        and coverage * 100 >= MIN_NONSILENT_PERCENT,
    }


# -- asking the servers and dom0 ---------------------------------------------------------


def _pulsectl() -> Any:
    try:
        import pulsectl
    except (ImportError, OSError) as exc:
        raise DemoError(f"the PulseAudio client library is missing: {exc}") from None
    return pulsectl


def _check_your_server(server: str | None) -> None:
    """Fail at once, in one line, when --speakers has no audio server to play to."""
    pulsectl = _pulsectl()
    from qvaudio.pulse.devices import connect

    try:
        with connect("qvaudio-demo", server):
            return
    except pulsectl.PulseError:
        pass
    where = server or os.environ.get("PULSE_SERVER") or "your session's default"
    raise DemoError(
        f"--speakers plays to your audio server, and none answers at {where}: start "
        "PulseAudio (or PipeWire's pulse server) in your session, or leave out --speakers"
    )


def _default_sink_is(vm: PrivatePulse, sink: str) -> bool:
    pulsectl = _pulsectl()
    from qvaudio.pulse.devices import connect

    try:
        with connect("qvaudio-demo", vm.server) as pulse:
            return bool(pulse.server_info().default_sink_name == sink)
    except pulsectl.PulseError:
        return False


def _stream_monitor(server: str | None, dom0_pid: int) -> str | None:
    """The monitor of the sink that the demo's dom0 plays the VM to, once it does."""
    pulsectl = _pulsectl()
    from qvaudio.dom0.host import VM_PROPERTY
    from qvaudio.pulse.devices import connect

    try:
        with connect("qvaudio-demo", server) as pulse:
            for stream in pulse.sink_input_list():
                if stream.proplist.get(VM_PROPERTY) != VM_NAME:
                    continue
                # Only ours: a real qvaudio-dom0 may be playing a VM of that name.
                pid = stream.proplist.get("application.process.id")
                if pid is None:
                    pid = pulse.client_info(stream.client).proplist.get("application.process.id")
                if pid == str(dom0_pid):
                    return str(pulse.sink_info(stream.sink).monitor_source_name)
    except pulsectl.PulseError:
        return None
    return None


def _default_monitor(server: str | None) -> str:
    pulsectl = _pulsectl()
    from qvaudio.pulse.devices import connect

    try:
        with connect("qvaudio-demo", server) as pulse:
            sink = pulse.get_sink_by_name(pulse.server_info().default_sink_name)
            return str(sink.monitor_source_name)
    except pulsectl.PulseError as exc:
        raise DemoError(f"cannot find your audio server's default output: {exc}") from None


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
    if vm is None:
        return None
    if vm.get("state") == "closed":
        raise DemoError(f"qvaudio-dom0 closed the VM's connection: {vm.get('close_reason')}")
    if vm["playback"].get("active") or _denied(vm):
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


# -- the text form -----------------------------------------------------------------------


def _mark(passed: bool) -> str:
    return "ok" if passed else "FAILED"


def _decision_text(decision: object, rule: object) -> str:
    """The decision once: dom0's rule text already starts with it ("playback allow by ...")."""
    said = f"playback {decision}"
    if not rule:
        return said
    return str(rule) if str(rule).startswith(said) else f"{said} ({rule})"


def _print(result: dict[str, Any]) -> None:
    verdict = "the tone arrived" if result["tone_arrived"] else "THE TONE DID NOT ARRIVE INTACT"
    heard = bool(result["measured_hz"])
    freq_ok = heard and result["frequency_error_percent"] < MAX_FREQ_ERROR_PERCENT
    coverage = result["nonsilent_fraction"] * 100
    onset = result["onset_delay_ms"]
    latency = result["reported_latency_ms"]
    print(f"qvaudio demo: {verdict}")
    if result.get("error"):
        print(f"  why              {result['error']}")
    print(f"  VM               {result['vm']} ({result['format'] or 'no format agreed'}) -> "
          f"{result['played_to']}")  # fmt: skip
    print(f"  policy           {_decision_text(result['policy_decision'], result['policy_rule'])}")
    print(f"  policy files     {result['policy_dir']} ({result['policy_source']})")
    played = "would play" if result["policy_decision"] == Access.DENY else "played"
    print(f"  recorded         {result['recorded_from']} (monitor of the sink dom0 {played} to)")
    measured = (
        f"{result['measured_hz']} Hz, off by {result['frequency_error_percent']} %"
        if heard
        else "no tone"
    )
    print(
        f"  frequency        {measured} (pass: within {MAX_FREQ_ERROR_PERCENT:g} % of "
        f"{result['tone_hz']:g} Hz)  {_mark(freq_ok)}"
    )
    print(
        f"  non-silent       {coverage:.2f} % of 10 ms windows "
        f"(pass: at least {MIN_NONSILENT_PERCENT:g} %)  "
        f"{_mark(coverage >= MIN_NONSILENT_PERCENT)}"
    )
    snr = f"{result['snr_db']} dB" if heard else "-"
    print(f"  signal-to-noise  {snr}")
    print(
        f"  onset delay      {'-' if onset is None else f'{onset} ms'} "
        "(VM player -> dom0 sink, incl. both servers' buffers)"
    )
    print(
        f"  latency (status) {f'{latency} ms' if latency else '-'} (the VM's audio dom0 holds: "
        "its queue + the host stream's buffer, as `qvaudio status` shows)"
    )
