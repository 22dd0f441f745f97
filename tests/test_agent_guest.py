"""The guest agent end to end: a real agent process, real PulseAudio and PipeWire, a dom0 stand-in.

Each test runs `python -m qvaudio.agent_guest` listening on a Unix socket;
`Dom0Peer` connects to it the way the dom0 agent would. Sound is played and
recorded by the ordinary command-line clients (`pacat`, `parec`), as any
application in the VM would.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pulsectl
import pytest

from qvaudio.core import tone
from qvaudio.core.events import CaptureRequest, Cork, Goodbye, StreamStatus
from qvaudio.core.formats import AudioFormat, SampleFormat
from qvaudio.guest import devices as guest_devices
from qvaudio.guest.loop import STATUS_EVERY_S
from qvaudio.pulse import devices as pulse_devices
from qvaudio.pulse.pcm import PcmStream, PulseError
from tests.audio_daemons import NULL_SINK, AudioServer
from tests.guest_peer import Dom0Peer
from tests.waiting import wait_until

SINK = "qvaudio_out"
MIC = "qvaudio_mic"
STEREO = AudioFormat(48000, SampleFormat.S16LE, 2)
MONO = AudioFormat(48000, SampleFormat.S16LE, 1)
DEADLINE_S = 15.0


#: The agent whose log a failed wait shows (tests run one at a time).
_current_log: list[Callable[[], str]] = []


def wait_for(check: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
    def agent_log() -> str:
        return "agent log:\n" + "\n".join(show() for show in _current_log)

    wait_until(check, what, timeout, interval=0.05, context=agent_log)


class Agent:
    """One qvaudio-guest process and what a test needs to see of it."""

    def __init__(self, server: AudioServer, base: Path, *extra: str) -> None:
        self.server = server
        self.base = base
        self.socket = str(base / "guest.sock")
        self.runtime = base / "run"
        self.env = server.full_env()
        # Its own runtime dir: the daemon's is wiped when the daemon restarts.
        self.env["XDG_RUNTIME_DIR"] = str(self.runtime)
        config = base / "qvaudio.yaml"
        config.write_text("guest:\n  idle_timeout_s: 0.5\n")
        self.log_path = base / "agent.log"
        _current_log.append(self.log)
        command = [sys.executable, "-m", "qvaudio.agent_guest", "--config", str(config)]
        command += ["--transport", f"unix:{self.socket}", "-v", *extra]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                command, env=self.env, stdin=subprocess.DEVNULL, stderr=log, stdout=log
            )

    @property
    def status_path(self) -> Path:
        return self.runtime / "qvaudio" / "guest-status.json"

    def status(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.status_path.read_text("utf-8")))
        except FileNotFoundError:
            return {"bytes_sent": 0, "state": None}

    def log(self) -> str:
        return self.log_path.read_text("utf-8", "replace")

    def pulse(self) -> Any:
        return pulsectl.Pulse("qvaudio-test-agent", server=self.server.server)

    def default_sink(self) -> str:
        """The default sink as a new client sees it: PipeWire's pulse server
        can keep a long-lived client's view of it stale."""
        with self.pulse() as p:
            return str(p.server_info().default_sink_name)

    def ready(self) -> bool:
        """Devices exist, ours are the defaults, and the monitor is being recorded."""
        assert self.proc.poll() is None, f"agent exited early:\n{self.log()}"
        try:
            with self.pulse() as p:
                info = p.server_info()
                if info.default_sink_name != SINK or info.default_source_name != MIC:
                    return False
                monitor = p.get_source_by_name(f"{SINK}.monitor")
                return any(o.source == monitor.index for o in p.source_output_list())
        except pulsectl.PulseError:
            return False

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"agent did not stop on {sig.name}:\n{self.log()}", pytrace=False)


def leave_daemon_clean(server: AudioServer) -> None:
    """Whatever a test did, the next one finds the daemon as the fixture made it."""
    server.ensure_running()
    with pulsectl.Pulse("qvaudio-test-cleanup", server=server.server) as p:
        pulse_devices.remove_owned_modules(p, [SINK, MIC])
        if p.server_info().default_sink_name != NULL_SINK:
            with contextlib.suppress(pulsectl.PulseOperationFailed):
                p.sink_default_set(NULL_SINK)


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short: a Unix socket path must fit in 107 bytes.
    with tempfile.TemporaryDirectory(prefix="qvg-") as path:
        yield Path(path)


@pytest.fixture
def agent(audio_server: AudioServer, workdir: Path) -> Iterator[Agent]:
    running = Agent(audio_server, workdir)
    try:
        yield running
    finally:
        running.stop()
        _current_log.clear()
        leave_daemon_clean(audio_server)


@pytest.fixture
def peer(agent: Agent) -> Iterator[Dom0Peer]:
    dom0 = Dom0Peer(agent.socket)
    wait_for(lambda: dom0.playback_format is not None, "format negotiation")
    wait_for(agent.ready, "the agent's devices and monitor stream")
    yield dom0
    dom0.close()


def play(agent: Agent, freq: float, seconds: float) -> subprocess.Popen[bytes]:
    """Play a tone into the default sink, as an ordinary application would."""
    raw = agent.base / f"tone-{freq:g}.raw"
    raw.write_bytes(tone.generate_sine(freq, STEREO, seconds))
    return subprocess.Popen(
        ["pacat", "--raw", "--format=s16le", "--rate=48000", "--channels=2", str(raw)],
        env=agent.env,
    )


def assert_tone(pcm: bytes, fmt: AudioFormat, freq: float, log: str = "") -> None:
    samples = tone.decode_mono(pcm, fmt)
    onset, offset = tone.find_onset(samples), tone.find_offset(samples)
    assert onset is not None and offset is not None, f"only silence arrived\n{log}"
    assert offset - onset > fmt.rate // 2, "less than half a second of the tone arrived"
    gaps = tone.gaps(samples, fmt.rate)
    assert tone.estimate_frequency(samples[onset:offset], fmt.rate) == pytest.approx(
        freq, rel=0.005
    ), f"gaps: {gaps[:10]}, tone from {onset / fmt.rate:.3f} s to {offset / fmt.rate:.3f} s"
    assert tone.nonsilent_fraction(samples, fmt.rate) >= 0.99


def play_and_check(agent: Agent, peer: Dom0Peer, freq: float, seconds: float = 1.5) -> None:
    start = peer.pcm_length
    player = play(agent, freq, seconds)
    assert player.wait(DEADLINE_S) == 0
    time.sleep(0.3)  # the last periods are on their way
    assert peer.playback_format is not None
    assert_tone(peer.pcm_since(start), peer.playback_format, freq, agent.log())


# -- playback -----------------------------------------------------------------------------


def test_tone_played_into_the_default_sink_reaches_dom0(agent: Agent, peer: Dom0Peer) -> None:
    play_and_check(agent, peer, 440.0)
    # Rewritten every couple of seconds at most.
    wait_for(lambda: agent.status()["bytes_sent"] >= STEREO.bytes_per_second, "bytes in the status")
    status = agent.status()
    assert status["transport"] == f"unix:{agent.socket}"
    assert status["format"] == "s16le:48000:2"
    assert status["latency_us"] is None or 0 < status["latency_us"] < 1_000_000
    with agent.pulse() as p:
        assert p.get_sink_by_name(SINK).description == "qvaudio: dom0 speakers"
    # Logged only once it describes sound that flowed (at connect, an idle
    # null sink's monitor alone used to make it ~2 s).
    logged = [
        float(ms) for ms in re.findall(r"end-to-end playback latency ([\d.]+) ms", agent.log())
    ]
    assert all(0 < ms < 1000 for ms in logged), logged


def logged_latencies(agent: Agent) -> list[float]:
    return [float(ms) for ms in re.findall(r"end-to-end playback latency ([\d.]+) ms", agent.log())]


def test_latency_is_reported_only_for_sound_that_flowed(
    audio_server: AudioServer, workdir: Path
) -> None:
    # A long idle timeout: connected and uncorked with nothing playing, as
    # the first seconds after dom0 connects are in the field.
    agent = Agent(audio_server, workdir, "--idle-timeout", "60")
    peer: Dom0Peer | None = None
    try:
        peer = Dom0Peer(agent.socket)
        # Streaming silence, or corked at once where the server says nothing plays.
        wait_for(lambda: agent.status()["state"] in ("streaming", "idle"), "a playback format")
        # Only an absence, so only a window shows it: two of the agent's
        # reporting periods with dom0's position reports coming in (every
        # 0.5 s) would have logged a figure; a line ends the wait at once.
        window_ends = time.monotonic() + 2 * STATUS_EVERY_S + 1
        wait_for(
            lambda: time.monotonic() >= window_ends or bool(logged_latencies(agent)),
            "the end of the window",
            timeout=2 * STATUS_EVERY_S + 10,
        )
        assert logged_latencies(agent) == [], agent.log()
        assert agent.status()["latency_us"] is None
        player = play(agent, 440.0, 4.0)
        try:
            wait_for(lambda: bool(logged_latencies(agent)), "a latency line while sound plays")
            figure = agent.status()["latency_us"]
        finally:
            assert player.wait(DEADLINE_S) == 0
        assert all(0 < ms < 1000 for ms in logged_latencies(agent)), agent.log()
        assert figure is None or 0 < figure < 1_000_000
    finally:
        if peer is not None:
            peer.close()
        agent.stop()
        _current_log.clear()
        leave_daemon_clean(audio_server)


class AskingApplication:
    """An application whose stream runs in a thread (`_run`) while the test asks the
    stream's latency (`pa_stream_get_latency`, through the server's pulse protocol)."""

    def __init__(self, stream: PcmStream) -> None:
        self.stream = stream
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        raise NotImplementedError

    def latency_ms(self, samples: int = 15) -> float:
        """The median of what the application reads over `samples` looks 50 ms apart."""
        values = []
        for _ in range(samples):
            time.sleep(0.05)
            values.append(self.stream.latency_us() / 1000)
        return statistics.median(values)

    def close(self) -> None:
        self._stop.set()
        self.stream.close()
        self._thread.join(5)


class LatencyAsker(AskingApplication):
    """Plays a tone into the virtual output and asks its latency, as a video player would."""

    def __init__(self, agent: Agent) -> None:
        super().__init__(PcmStream.playback(
            agent.server.server, SINK, STEREO, "latency-asker", "latency asker",
            STEREO.bytes_for_ms(40),
        ))  # fmt: skip

    def _run(self) -> None:
        tone_pcm = tone.generate_sine(440.0, STEREO, 1.0)
        chunk = STEREO.bytes_for_ms(10)
        try:
            while not self._stop.is_set():
                for start in range(0, len(tone_pcm), chunk):
                    self.stream.write(tone_pcm[start : start + chunk])
        except PulseError:
            pass


@pytest.mark.parametrize("audio_server", ["pipewire"], indirect=True)
def test_an_applications_latency_query_moves_when_dom0s_buffer_grows(
    agent: Agent, peer: Dom0Peer
) -> None:
    """What an application in the VM reads as its latency includes the path behind the
    virtual output, and follows it when dom0's host buffer grows mid-stream.

    PipeWire only: PulseAudio 16 cannot be told (a null sink reports only
    itself; docs/architecture.md). dom0 is the protocol stand-in here, its
    POSITION reports carrying the larger buffer, so the change comes at a
    known moment; what the real dom0 reports is tested in
    tests/test_dom0_session.py."""
    assert "PipeWire node reporting the latency behind it" in agent.log()
    asker = LatencyAsker(agent)
    try:
        wait_for(lambda: "virtual output reports" in agent.log(), "the path measured and published")
        before = asker.latency_ms()
        peer.playback_latency_us = 120_000
        wait_for(lambda: asker.latency_ms() > before + 80, "the larger buffer, seen by the app")
        after = asker.latency_ms(samples=30)
        # The whole 100 ms, to within PipeWire's quantum and the in-flight audio's jitter.
        assert after - before == pytest.approx(100, abs=12), (before, after)
    finally:
        asker.close()


def test_silence_corks_and_sound_uncorks(agent: Agent, peer: Dom0Peer) -> None:
    play_and_check(agent, peer, 440.0, seconds=1.0)
    wait_for(
        lambda: bool(peer.events_of(Cork)) and peer.events_of(Cork)[-1].event == Cork(True),
        "Cork(True) after the tone",
    )
    corked_at = peer.pcm_length
    time.sleep(1.0)
    assert peer.pcm_length == corked_at, "PCM kept flowing while corked"
    corks = len(peer.events_of(Cork))
    play_and_check(agent, peer, 1000.0, seconds=1.0)
    assert Cork(False) in [a.event for a in peer.events_of(Cork)[corks:]]
    wait_for(lambda: agent.status()["state"] == "idle", "state idle in the status file")


def monitor_streams(agent: Agent) -> list[Any]:
    with agent.pulse() as p:
        monitor = p.get_source_by_name(f"{SINK}.monitor")
        return [o for o in p.source_output_list() if o.source == monitor.index]


def sink_suspended(agent: Agent) -> bool:
    with agent.pulse() as p:
        return bool(p.get_sink_by_name(SINK).state == "suspended")


def test_idle_output_costs_nothing_yet_keeps_the_whole_sound(
    audio_server: AudioServer, agent: Agent, peer: Dom0Peer
) -> None:
    """While nothing plays the monitor delivers nothing: on PulseAudio the
    virtual output is suspended; on PipeWire the monitor stream is passive,
    so the server pauses it with the graph. Either runs again for an
    application's sound, which arrives whole."""
    pulseaudio = audio_server.kind == "pulseaudio"

    def quiet() -> bool:
        if pulseaudio:
            return sink_suspended(agent)
        # One stream: while the passive one opens, the agent also runs a short
        # ordinary one ("dom0 speakers (opening)"), which must then go.
        streams = monitor_streams(agent)
        return (
            len(streams) == 1
            and streams[0].proplist.get("node.passive") == "true"
            and bool(streams[0].corked)
        )

    wait_for(quiet, "the idle virtual output quiet")
    start = peer.pcm_length
    player = play(agent, 440.0, 1.0)
    wait_for(lambda: not quiet(), "the virtual output recorded for the sound")
    assert player.wait(DEADLINE_S) == 0
    time.sleep(0.3)
    assert peer.playback_format is not None
    pcm = peer.pcm_since(start)
    assert_tone(pcm, peer.playback_format, 440.0, agent.log())
    samples = tone.decode_mono(pcm, peer.playback_format)
    onset, offset = tone.find_onset(samples), tone.find_offset(samples)
    assert onset is not None and offset is not None
    # Not a timing check: the tone's samples themselves, all but a period of them.
    assert offset - onset >= 0.98 * peer.playback_format.rate, "the start of the sound was lost"
    wait_for(quiet, "the virtual output quiet again")
    if not pulseaudio:
        # Ours is never suspended by the agent on PipeWire (WirePlumber may
        # suspend it after its own idle timeout, which is not ours to judge).
        assert f"suspended {SINK}" not in agent.log()


def test_dom0_reconnecting_while_idle_leaves_one_monitor_stream(
    agent: Agent, peer: Dom0Peer
) -> None:
    """A stopped reader blocked on a quiet monitor does not linger with its stream."""
    for _ in range(2):
        before = {o.index for o in monitor_streams(agent)}
        peer.close()
        peer = Dom0Peer(agent.socket)

        def only_a_new_stream(old: set[int] = before) -> bool:
            indexes = {o.index for o in monitor_streams(agent)}
            return len(indexes) == 1 and not indexes & old

        wait_for(only_a_new_stream, "the new connection's monitor stream alone")
    try:
        play_and_check(agent, peer, 440.0)
    finally:
        peer.close()


# -- microphone ---------------------------------------------------------------------------


def record_mic(agent: Agent, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            "parec",
            "-d",
            MIC,
            "--raw",
            "--format=s16le",
            "--rate=48000",
            "--channels=1",
            "--latency-msec=20",
        ],
        env=agent.env,
        stdout=out.open("wb"),
    )


def capture_requests(peer: Dom0Peer) -> list[bool]:
    return [a.event.start for a in peer.events_of(CaptureRequest)]


def test_microphone_audio_from_dom0_reaches_a_recording_application(
    agent: Agent, peer: Dom0Peer
) -> None:
    recorded = agent.base / "mic.raw"
    recorder = record_mic(agent, recorded)
    try:
        wait_for(lambda: capture_requests(peer) == [True], "CaptureRequest(start)")
        assert peer.capture_format == MONO
        peer.set_capture(StreamStatus.RUNNING)
        peer.send_mic(tone.generate_sine(700.0, MONO, 1.5)).join(DEADLINE_S)
        time.sleep(0.3)
    finally:
        recorder.send_signal(signal.SIGINT)
        recorder.wait(DEADLINE_S)
    wait_for(lambda: capture_requests(peer) == [True, False], "CaptureRequest(stop)")
    assert_tone(recorded.read_bytes(), MONO, 700.0, agent.log())


def test_a_microphone_backlog_is_cut_not_kept_as_latency(agent: Agent, peer: Dom0Peer) -> None:
    """dom0 stalls, then sends 100 ms at once: the VM's queue sheds it within a second
    instead of keeping it as latency for the rest of the call (issue 14)."""
    recorded = agent.base / "mic.raw"
    recorder = record_mic(agent, recorded)
    try:
        wait_for(lambda: capture_requests(peer) == [True], "CaptureRequest(start)")
        peer.set_capture(StreamStatus.RUNNING)
        peer.send_mic(tone.generate_sine(700.0, MONO, 1.0)).join(DEADLINE_S)
        assert agent.status()["mic"].get("late_drops", 0) == 0, "nothing late yet"
        peer.send_mic(tone.generate_sine(700.0, MONO, 0.1), paced=False).join(DEADLINE_S)
        sender = peer.send_mic(tone.generate_sine(700.0, MONO, 3.0))
        wait_for(lambda: agent.status()["mic"].get("late_drops", 0) > 0, "the backlog cut")
        sender.join(DEADLINE_S)
    finally:
        recorder.send_signal(signal.SIGINT)
        recorder.wait(DEADLINE_S)
    assert_tone(recorded.read_bytes(), MONO, 700.0, agent.log())


class LatencyRecorder(AskingApplication):
    """Records the virtual microphone and asks its latency, as an echo canceller lining
    up what it hears with what it played would."""

    def __init__(self, agent: Agent) -> None:
        self.audio = bytearray()
        super().__init__(PcmStream.record(
            agent.server.server, MIC, MONO, "latency-recorder", "latency recorder",
            MONO.bytes_for_ms(10),
        ))  # fmt: skip

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.audio += self.stream.read(MONO.bytes_for_ms(10))
        except PulseError:
            pass


@pytest.mark.parametrize("audio_server", ["pipewire"], indirect=True)
def test_a_recorders_latency_query_counts_the_path_from_the_host_microphone(
    agent: Agent, peer: Dom0Peer
) -> None:
    """What an application recording the virtual microphone reads as its latency is the
    path from the host's microphone, within bounds, and follows dom0's part of it.

    PipeWire only, as for playback: a PulseAudio remapped monitor reports
    only itself. dom0 is the protocol stand-in, its POSITION reports saying
    how old the microphone audio was when sent."""
    assert "virtual microphone qvaudio_mic is a PipeWire node" in agent.log()
    peer.capture_latency_us = 30_000
    recorder = LatencyRecorder(agent)
    sender = None
    try:
        wait_for(lambda: capture_requests(peer) == [True], "CaptureRequest(start)")
        peer.set_capture(StreamStatus.RUNNING)
        sender = peer.send_mic(tone.generate_sine(700.0, MONO, 12.0))
        wait_for(lambda: "virtual microphone reports" in agent.log(), "the path published")
        wait_for(
            lambda: agent.status().get("reported_capture_latency_us") is not None,
            "the published path in the status file",
        )
        published = agent.status()["reported_capture_latency_us"] / 1000
        # dom0's 30 ms, the guest's queue and node buffer (a reserve of 5 ms, a
        # buffer of 20): the application is told at least dom0's part, at
        # most all of it, to within a graph cycle.
        assert 30 <= published <= 30 + 40, published
        # A record stream's figure glides to a change over a few seconds
        # (measured: ~20 ms a second), so it is polled until it arrives.
        wait_for(lambda: abs(recorder.latency_ms() - published) <= 15, "the app told the path")
        before = recorder.latency_ms()
        peer.capture_latency_us = 130_000
        wait_for(lambda: recorder.latency_ms() > before + 80, "the older audio, seen by the app")
        after = recorder.latency_ms(samples=30)
        # The whole 100 ms reaches the application, and more: a pipewire-pulse
        # record stream's figure overshoots a change of its source's latency
        # (the node published exactly +100; the application read +114 to +120
        # here, and +135 to +145 with no agent at all, a bare node and a
        # recorder), which the ceiling allows for.
        assert 88 <= after - before <= 160, (before, after)
    finally:
        if sender is not None:
            sender.join(DEADLINE_S)
        recorder.close()
    # The audio itself came through the node whole.
    assert_tone(bytes(recorder.audio), MONO, 700.0, agent.log())


def test_refused_microphone_gives_silence_and_one_notice(agent: Agent, peer: Dom0Peer) -> None:
    recorded = agent.base / "mic.raw"
    recorder = record_mic(agent, recorded)
    try:
        wait_for(lambda: capture_requests(peer) == [True], "CaptureRequest(start)")
        peer.set_capture(StreamStatus.DENIED, "policy says no")
        peer.set_capture(StreamStatus.DENIED, "policy says no")
        wait_for(lambda: recorded.stat().st_size > MONO.bytes_per_second, "a second of audio")
        assert recorder.poll() is None, "the recording application failed"
    finally:
        recorder.send_signal(signal.SIGINT)
        recorder.wait(DEADLINE_S)
    assert recorded.read_bytes().count(0) == recorded.stat().st_size
    wait_for(lambda: "not allowed" in agent.log(), "the refusal in the log")
    assert agent.log().count("the microphone is not allowed for this VM") == 1


# -- recovery -----------------------------------------------------------------------------


def test_audio_server_restart_recreates_devices(
    audio_server: AudioServer, agent: Agent, peer: Dom0Peer
) -> None:
    audio_server.restart()
    wait_for(agent.ready, "devices recreated after the audio server restarted")
    play_and_check(agent, peer, 440.0)
    assert not peer.closed.is_set(), "the connection to dom0 was dropped"
    assert "recreated" in agent.log()


def test_a_default_restored_at_start_up_is_taken_back_but_a_later_choice_is_kept(
    agent: Agent, peer: Dom0Peer
) -> None:
    # A session manager starting with the audio server restores its
    # remembered default a moment after the agent made its own the default.
    wait_for(agent.ready, "the agent's devices as the defaults")
    # Only a reclaim after the move counts: on PipeWire the agent may already
    # have set its defaults twice, when the first had not yet been applied.
    before = agent.log().count("made ours again")
    with agent.pulse() as p:
        p.sink_default_set(NULL_SINK)
    wait_for(lambda: agent.log().count("made ours again") > before, "the default taken back")
    wait_for(lambda: agent.default_sink() == SINK, "our sink the default again")
    # After the start-up window the user's choice stands.
    time.sleep(guest_devices.DEFAULTS_GRACE_S)
    reclaims = agent.log().count("made ours again")
    with agent.pulse() as p:
        p.sink_default_set(NULL_SINK)
    wait_for(lambda: agent.default_sink() == NULL_SINK, "the user's choice")
    time.sleep(1.0)
    assert agent.default_sink() == NULL_SINK
    assert agent.log().count("made ours again") == reclaims


def test_dom0_reconnecting_gets_audio_again(agent: Agent, peer: Dom0Peer) -> None:
    peer.close()
    second = Dom0Peer(agent.socket)
    try:
        wait_for(lambda: second.playback_format is not None, "format negotiation again")
        wait_for(agent.ready, "the monitor stream again")
        play_and_check(agent, second, 440.0)
    finally:
        second.close()
    assert agent.proc.poll() is None


def test_sigterm_removes_devices_and_restores_defaults(agent: Agent, peer: Dom0Peer) -> None:
    assert agent.status_path.exists()
    assert agent.stop(signal.SIGTERM) == 0
    with agent.pulse() as p:
        names = {s.name for s in p.sink_list()} | {s.name for s in p.source_list()}
        assert not [n for n in names if n.startswith("qvaudio")]
        assert not [m for m in p.module_list() if "qvaudio" in (m.argument or "")]
        wait_for(lambda: p.server_info().default_sink_name == NULL_SINK, "default sink restored")
    assert not agent.status_path.exists()
    wait_for(lambda: bool(peer.events_of(Goodbye)), "a goodbye to dom0")
    # On PipeWire the devices are nodes, gone when closed: closed before the
    # modules' removal waits for the devices to go, not after it gave up.
    assert "still present" not in agent.log()


def test_a_crashed_run_is_adopted_not_duplicated(
    audio_server: AudioServer, agent: Agent, workdir: Path
) -> None:
    first_peer = Dom0Peer(agent.socket)
    wait_for(agent.ready, "the first agent")
    agent.stop(signal.SIGKILL)
    first_peer.close()
    second = Agent(audio_server, workdir)
    try:
        peer = Dom0Peer(second.socket)
        wait_for(second.ready, "the second agent")
        with second.pulse() as p:
            assert [s.name for s in p.sink_list()].count(SINK) == 1
            # On PipeWire the output is the agent's node, gone with the crashed process.
            modules = [m for m in p.module_list() if f"sink_name={SINK} " in f"{m.argument} "]
            assert len(modules) == (1 if audio_server.kind == "pulseaudio" else 0)
        peer.close()
        assert second.stop() == 0
        with second.pulse() as p:
            # The first run's record of the user's default survived its crash.
            assert p.server_info().default_sink_name == NULL_SINK
    finally:
        second.stop()


# -- command line -------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qvaudio.agent_guest", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_config_error_names_file_and_line(tmp_path: Path) -> None:
    config = tmp_path / "qvaudio.yaml"
    config.write_text("guest:\n  period_ms: 1000\n")
    result = run_cli("--config", str(config))
    assert result.returncode == 2
    assert result.stderr.startswith(f"{config}:2: ")
    assert "Traceback" not in result.stderr


def test_help_explains_every_flag() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in (
        "--config",
        "--transport",
        "--format",
        "--period-ms",
        "--idle-timeout",
        "--pulse-server",
        "--sink-name",
        "--source-name",
        "--no-report-latency",
        "--verbose",
    ):
        assert flag in result.stdout
