"""Running qvaudio-dom0 as a process for tests: its host PulseAudio, policy
dir, VM socket dir and scripted guests (tests/fake_guest.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pulsectl
import pytest

from qvaudio.core.formats import AudioFormat, SampleFormat
from qvaudio.core.tone import (
    decode_mono,
    estimate_frequency,
    find_offset,
    find_onset,
    gaps,
    generate_sine,
    nonsilent_fraction,
)
from qvaudio.dom0.control import request
from qvaudio.pulse.pcm import PcmStream
from tests.audio_daemons import NULL_SINK, PulseAudioServer
from tests.fake_guest import FakeGuest
from tests.waiting import WaitTimeout, wait_until

S16 = AudioFormat(48000, SampleFormat.S16LE, 2)
MONO = AudioFormat(48000, SampleFormat.S16LE, 1)

POLICY = """\
rules:
  - vm: work
    playback: allow
    capture: attach-on-request
  - vm: quiet
    playback: allow
    volume: {default: 40, max: 50}
  - vm: open-mic
    playback: allow
    capture: allow
  - vm: blocked
    playback: deny
  - vm: '*'
    playback: allow
    capture: deny
"""


def write_policy(directory: Path, text: str, name: str = "50-test.yaml") -> None:
    # Atomic, as an editor (or `qvaudio policy set`) would save it.
    tmp = directory / f".{name}.tmp"
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, directory / name)


class Dom0:
    """A running qvaudio-dom0 with its host server, policy dir and VM socket dir."""

    def __init__(self, base: Path, host: PulseAudioServer) -> None:
        self.base = base
        self.host = host
        self.vm_dir = base / "vms"
        self.policy_dir = base / "policy"
        self.control = base / "control.sock"
        self.log = base / "dom0.log"
        for d in (self.vm_dir, self.policy_dir):
            d.mkdir(mode=0o700, exist_ok=True)
        write_policy(self.policy_dir, POLICY)
        self.guests: list[FakeGuest] = []
        #: Tests that check notifications turn them on (and give a bus).
        self.notifications = False
        #: qvaudio.yaml for the agent, if a test needs other settings than the defaults.
        self.config = ""
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *transports: str) -> None:
        """Start the agent; `transports` default to the socket directory."""
        env = self.host.full_env()
        env["QVAUDIO_QREXEC_SOCKET"] = str(self.base / "qrexec.sock")
        transport_args = [
            arg
            for spec in (transports or (f"unix:{self.vm_dir}",))
            for arg in ("--transport", spec)
        ]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "qvaudio.agent_dom0",
                    *transport_args,
                    "--policy-dir", str(self.policy_dir),
                    "--control-socket", str(self.control),
                    *(["--config", str(self.write_config())] if self.config else []),
                    *([] if self.notifications else ["--no-notifications"]), "-v",
                ],
                env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        proc = self.proc

        def control_socket() -> bool:
            if self.control.exists():
                return True
            assert proc.poll() is None, f"qvaudio-dom0 exited:\n{self.log_text()}"
            return False

        wait_until(
            control_socket,
            "qvaudio-dom0's control socket",
            10,
            interval=0.05,
            context=self.log_text,
        )

    def write_config(self) -> Path:
        path = self.base / "qvaudio.yaml"
        path.write_text(self.config)
        return path

    def guest(self, name: str, **kwargs: Any) -> FakeGuest:
        guest = FakeGuest(self.vm_dir / name, **kwargs)
        self.guests.append(guest)
        assert guest.connected.wait(5), f"dom0 never connected to {name}:\n{self.log_text()}"
        return guest

    def status(self) -> dict[str, Any]:
        return request(self.control, {"cmd": "status"})

    def log_text(self, tail: int | None = 6000) -> str:
        text = self.log.read_text(errors="replace")
        return text if tail is None else text[-tail:]

    def stop(self) -> int | None:
        for guest in self.guests:
            guest.close()
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return None


@pytest.fixture(scope="module")
def host(make_pulse_server: Callable[[str], PulseAudioServer]) -> PulseAudioServer:
    return make_pulse_server("dom0-host")


_AGENT = pytest.StashKey[Dom0]()


@pytest.fixture
def dom0_config() -> str:
    """The agent's qvaudio.yaml: the defaults. A test module may override this fixture."""
    return ""


@pytest.fixture
def dom0(
    request: pytest.FixtureRequest, tmp_path: Path, host: PulseAudioServer, dom0_config: str
) -> Iterator[Dom0]:
    host.ensure_running()
    agent = Dom0(tmp_path, host)
    agent.config = dom0_config
    request.node.stash[_AGENT] = agent
    agent.start()
    yield agent
    code = agent.stop()
    assert code == 0, f"qvaudio-dom0 did not stop cleanly ({code}):\n{agent.log_text()}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failing test that ran qvaudio-dom0 shows the agent's log."""
    report = yield
    agent = item.stash.get(_AGENT, None)
    if report.failed and agent is not None and agent.log.exists():
        report.sections.append(("qvaudio-dom0 log", agent.log_text(tail=12000)))
    return report


def record_monitor(
    server: str, device: str, seconds: float
) -> tuple[threading.Thread, list[bytes]]:
    """Record `seconds` of a monitor in the background; returns once audio comes.

    A new record stream on a PulseAudio null sink's monitor may deliver its
    first bytes up to ~2 s late (the sink renders in large blocks until a
    reader asks for less); waiting for the first chunk keeps that start-up
    out of what the test measures.
    """
    chunks: list[bytes] = []
    delivering = threading.Event()

    def run() -> None:
        with PcmStream.record(
            server, device, S16, "test", "listen", S16.bytes_for_ms(10)
        ) as stream:
            for _ in range(int(seconds * 100)):
                chunks.append(stream.read(S16.bytes_for_ms(10)))
                delivering.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert delivering.wait(10), "the recorder got no audio within 10 s"
    return thread, chunks


def record_host(host: PulseAudioServer, seconds: float) -> tuple[threading.Thread, list[bytes]]:
    """Record the host's sink monitor (what the user would hear) in the background."""
    return record_monitor(host.server, f"{NULL_SINK}.monitor", seconds)


def pitch(samples: list[float], rate: int = 48000) -> float:
    """A tone's frequency, measured on its longest stretch without a gap.

    Counting zero crossings across a gap measures the gap, not the pitch;
    gaps are judged separately (non-silent fraction here, counts in bench/).
    """
    onset, offset = find_onset(samples, 0.05), find_offset(samples, 0.05)
    if onset is None or offset is None:
        return 0.0
    tone = samples[onset:offset]
    cuts = [0]
    for gap in gaps(tone, rate, 1.0):
        cuts += [int(gap.start_s * rate), int((gap.start_s + gap.duration_s) * rate)]
    cuts.append(len(tone))
    start, end = max(zip(cuts[::2], cuts[1::2], strict=True), key=lambda p: p[1] - p[0])
    assert end - start > rate // 2, f"no half second of tone without a gap: {gaps(tone, rate)}"
    return estimate_frequency(tone[start:end], rate)


def analyse(pcm: bytes) -> tuple[float, float, float]:
    samples = decode_mono(pcm, S16)
    peak = max((abs(x) for x in samples), default=0.0)
    if peak < 0.01:
        return 0.0, 0.0, peak
    return pitch(samples), nonsilent_fraction(samples, 48000), peak


def sink_inputs(host: PulseAudioServer) -> list[Any]:
    with pulsectl.Pulse("test", server=host.server) as pulse:
        return list(pulse.sink_input_list())


def play_into_host(host: PulseAudioServer, seconds: float) -> threading.Thread:
    """A tone into the host's sink, whose monitor is the host's default source (the 'mic')."""

    def run() -> None:
        tone = generate_sine(1000, S16, seconds, amplitude=0.5)
        with PcmStream.playback(
            host.server, NULL_SINK, S16, "mic", "mic", S16.bytes_for_ms(50)
        ) as s:
            for i in range(0, len(tone), S16.bytes_for_ms(10)):
                s.write(tone[i : i + S16.bytes_for_ms(10)])

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def record_streams(host: PulseAudioServer, vm: str) -> list[Any]:
    with pulsectl.Pulse("test", server=host.server) as pulse:
        return [so for so in pulse.source_output_list() if so.proplist.get("qvaudio.vm") == vm]


def start_null_sink_clock_once_dom0_plays(host: PulseAudioServer) -> None:
    """Test-bed only: make the fresh null sink behave like a sound card.

    A new PulseAudio null sink renders its first block at its 2 s maximum
    latency, so the first stream on it waits ~1.9 s whoever it is (see
    docs/benchmarks.md); a real device starts at the latency its streams ask
    for. Once dom0 has a stream there, one suspend/resume restarts the null
    sink's clock at that latency. dom0 itself never touches the host's sinks.
    """

    def restarted() -> bool:
        try:
            with pulsectl.Pulse("test", server=host.server) as pulse:
                if any(s.proplist.get("qvaudio.vm") for s in pulse.sink_input_list()):
                    sink = pulse.get_sink_by_name(NULL_SINK)
                    pulse.sink_suspend(sink.index, 1)
                    pulse.sink_suspend(sink.index, 0)
                    return True
        except pulsectl.PulseError:
            pass
        return False

    # Best effort: without a dom0 stream in 5 s the sink is left as it is,
    # and the test itself judges what reaches the host.
    with contextlib.suppress(WaitTimeout):
        wait_until(restarted, "a dom0 stream on the host", 5)
