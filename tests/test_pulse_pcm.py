"""PcmStream against real PulseAudio and PipeWire daemons."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pulsectl
import pytest

from qvaudio.core import tone
from qvaudio.core.formats import CHANNEL_POSITIONS, MAX_CHANNELS, AudioFormat, SampleFormat
from qvaudio.pulse import devices as pulse_devices
from qvaudio.pulse.pcm import VOLUME_NORM, PcmStream, PulseError, StreamClosed, strerror
from tests.audio_daemons import AudioServer, PulseAudioServer
from tests.waiting import wait_until

STEREO_S16 = AudioFormat(48000, SampleFormat.S16LE, 2)
FIRST_DATA_TIMEOUT_S = 5.0


class Recorder:
    """Reads a record stream on a thread until stopped; keeps everything it got."""

    def __init__(self, stream: PcmStream, chunk_bytes: int) -> None:
        self.stream = stream
        self.chunk_bytes = chunk_bytes
        self.chunks: list[bytes] = []
        self.error: BaseException | None = None
        self.got_data = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.chunks.append(self.stream.read(self.chunk_bytes))
                self.got_data.set()
        except BaseException as exc:  # handed to the test thread in stop()
            self.error = exc
            self.got_data.set()

    def wait_for_data(self) -> None:
        # A new record stream on an idle monitor can take over a second to start.
        assert self.got_data.wait(FIRST_DATA_TIMEOUT_S), "record stream delivered nothing"

    def stop(self) -> bytes:
        self._stop.set()
        self._thread.join(FIRST_DATA_TIMEOUT_S)
        assert not self._thread.is_alive(), "recorder thread did not finish"
        if self.error is not None:
            raise self.error
        return b"".join(self.chunks)


@pytest.fixture
def pulse(audio_server: AudioServer) -> Iterator[pulsectl.Pulse]:
    with pulsectl.Pulse("qvaudio-test", server=audio_server.server) as p:
        yield p


@pytest.fixture
def test_sink(pulse: pulsectl.Pulse, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh null sink for one test, removed afterwards."""
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name)[-40:]
    pulse_devices.ensure_null_sink(pulse, name, "test sink", STEREO_S16)
    yield name
    pulse_devices.remove_owned_modules(pulse, [name])


def round_trip(
    server: str, sink: str, fmt: AudioFormat, freq: float, seconds: float
) -> list[float]:
    """Play a tone into `sink`, record its monitor, return the recorded first channel.

    Buffers are generous on purpose: this checks that the binding carries
    audio intact, not real-time behaviour (bench/ measures that). With a
    20 ms fragment, PipeWire ran its graph at that quantum and a stall of
    the CI machine once cost it half a quantum (a 10.6 ms gap).
    """
    fragment = fmt.bytes_for_ms(50)
    with PcmStream.record(server, f"{sink}.monitor", fmt, "qvaudio-test", "rec", fragment) as rec:
        recorder = Recorder(rec, fragment)
        recorder.wait_for_data()
        with PcmStream.playback(
            server, sink, fmt, "qvaudio-test", "tone", tlength_bytes=fmt.bytes_for_ms(200)
        ) as play:
            play.write(tone.generate_sine(freq, fmt, seconds))
            play.drain()
        time.sleep(0.2)  # the tail still travels through the monitor
        pcm = recorder.stop()
    return tone.decode_mono(pcm, fmt)


@pytest.mark.parametrize(
    "fmt",
    [
        STEREO_S16,
        AudioFormat(48000, SampleFormat.F32LE, 1),
        AudioFormat(44100, SampleFormat.S32LE, 2),
    ],
    ids=str,
)
def test_tone_survives_playback_and_record(
    audio_server: AudioServer, test_sink: str, fmt: AudioFormat
) -> None:
    samples = round_trip(audio_server.server, test_sink, fmt, 1000.0, 2.0)
    onset = tone.find_onset(samples, 0.01)
    assert onset is not None, "the tone never arrived"
    offset = tone.find_offset(samples, 0.01)
    assert offset is not None
    body = samples[onset : offset + 1]
    assert len(body) / fmt.rate == pytest.approx(2.0, abs=0.05)
    assert tone.estimate_frequency(body, fmt.rate) == pytest.approx(1000.0, rel=0.005)
    assert tone.nonsilent_fraction(samples, fmt.rate) >= 0.99
    assert tone.gaps(samples, fmt.rate, min_gap_ms=2.0) == []


def test_a_variable_rate_stream_plays_at_the_rate_asked(
    audio_server: AudioServer, test_sink: str
) -> None:
    """Clock-drift control changes the host stream's rate while it plays:
    a 1 kHz tone of 48 kHz samples said to be 60 kHz is heard at 1.25 kHz."""
    fmt = STEREO_S16
    fragment = fmt.bytes_for_ms(50)
    server = audio_server.server
    with PcmStream.record(server, f"{test_sink}.monitor", fmt, "t", "rec", fragment) as rec:
        recorder = Recorder(rec, fragment)
        recorder.wait_for_data()
        with PcmStream.playback(
            server, test_sink, fmt, "t", "tone", fmt.bytes_for_ms(200), variable_rate=True
        ) as play:
            play.set_rate(60000)
            assert play.rate == 60000
            play.write(tone.generate_sine(1000.0, fmt, 2.0))
            play.drain()
        time.sleep(0.2)  # the tail still travels through the monitor
        samples = tone.decode_mono(recorder.stop(), fmt)
    onset, offset = tone.find_onset(samples, 0.01), tone.find_offset(samples, 0.01)
    assert onset is not None and offset is not None, "the tone never arrived"
    body = samples[onset + fmt.rate // 10 : offset - fmt.rate // 10]
    assert tone.estimate_frequency(body, fmt.rate) == pytest.approx(1250.0, rel=0.005)
    assert (offset - onset) / fmt.rate == pytest.approx(1.6, abs=0.05)


def test_the_server_reports_an_underflow(audio_server: AudioServer, test_sink: str) -> None:
    """The host stream's underflow event, which pa_simple never passed on."""
    fmt = STEREO_S16
    with PcmStream.playback(
        audio_server.server, test_sink, fmt, "t", "short", fmt.bytes_for_ms(40)
    ) as play:
        assert play.underflows == 0
        play.write(bytes(fmt.bytes_for_ms(100)))
        before = time.monotonic()
        wait_until(lambda: play.underflows >= 1, "the underflow event")
        assert before - 1.0 < play.last_underflow_at <= time.monotonic()


def test_volume_is_read_and_set_on_the_stream_itself(
    audio_server: AudioServer, test_sink: str, pulse: pulsectl.Pulse
) -> None:
    """dom0 sets a VM's starting volume through the stream's own connection."""
    fmt = STEREO_S16
    with PcmStream.playback(
        audio_server.server,
        test_sink,
        fmt,
        "t",
        "vol",
        fmt.bytes_for_ms(40),
        props={"org.qvaudio.test": "vol"},
    ) as play:
        assert play.volume() == [VOLUME_NORM, VOLUME_NORM]
        play.set_volume(VOLUME_NORM // 4)
        assert play.volume() == [VOLUME_NORM // 4] * 2

        def seen_by_others() -> bool:
            # Another connection (the desktop's mixer) sees it too; on
            # PipeWire a moment later.
            (ours,) = [
                i for i in pulse.sink_input_list() if i.proplist.get("org.qvaudio.test") == "vol"
            ]
            assert ours.index == play.index
            return bool(abs(ours.volume.value_flat - 0.25) < 0.001)

        wait_until(seen_by_others, "the mixer to see 25 %")


def test_latency_is_positive_and_plausible(audio_server: AudioServer, test_sink: str) -> None:
    server = audio_server.server
    with PcmStream.playback(
        server, test_sink, STEREO_S16, "qvaudio-test", "lat", STEREO_S16.bytes_for_ms(60)
    ) as play:
        play.write(tone.generate_sine(440.0, STEREO_S16, 0.2))
        playback_latency = play.latency_us()
        play.flush()
    assert 0 < playback_latency < 1_000_000
    fragment = STEREO_S16.bytes_for_ms(20)
    with PcmStream.record(
        server, f"{test_sink}.monitor", STEREO_S16, "qvaudio-test", "lat", fragment
    ) as rec:
        rec.read(fragment)
        record_latency = rec.latency_us()
    assert 0 <= record_latency < 1_000_000


def test_stream_properties_reach_the_server(
    audio_server: AudioServer, pulse: pulsectl.Pulse, test_sink: str
) -> None:
    props = {
        "application.icon_name": "appvm-red",
        "application.process.binary": "qvaudio-dom0",
        "qvaudio.vm": "work 'quoted' \"vm\"",
    }
    fmt = STEREO_S16
    with (
        PcmStream.playback(
            audio_server.server,
            test_sink,
            fmt,
            "work",
            "work playback",
            fmt.bytes_for_ms(60),
            props=props,
        ) as play,
        PcmStream.record(
            audio_server.server,
            f"{test_sink}.monitor",
            fmt,
            "work-rec",
            "work capture",
            fmt.bytes_for_ms(20),
            props={"media.role": "phone"},
        ),
    ):
        play.write(bytes(fmt.bytes_for_ms(100)))
        inputs = [
            s for s in pulse.sink_input_list() if s.proplist.get("media.name") == "work playback"
        ]
        outputs = [
            s for s in pulse.source_output_list() if s.proplist.get("media.name") == "work capture"
        ]
    assert len(inputs) == 1
    assert inputs[0].proplist["application.name"] == "work"
    for key, value in props.items():
        assert inputs[0].proplist[key] == value
    assert len(outputs) == 1
    assert outputs[0].proplist["application.name"] == "work-rec"
    assert outputs[0].proplist["media.role"] == "phone"
    # Scoped to opening the streams: nothing left behind for later clients.
    assert not [k for k in os.environ if k.startswith("PULSE_PROP_OVERRIDE_")]


def test_every_channel_count_opens_with_the_standard_map(
    audio_server: AudioServer, pulse: pulsectl.Pulse
) -> None:
    """Every format qvaudio accepts must be one the host can open: without an
    explicit map, 7- and 8-channel streams were refused ("Invalid argument")."""
    for channels in range(1, MAX_CHANNELS + 1):
        fmt = AudioFormat(48000, SampleFormat.F32LE, channels)
        with PcmStream.playback(
            audio_server.server, None, fmt, "qvaudio-test", f"{channels} ch",
            tlength_bytes=fmt.bytes_for_ms(50), props={"qvaudio.test": f"ch{channels}"},
        ) as stream:  # fmt: skip
            stream.write(bytes(fmt.bytes_for_ms(10)))
            (ours,) = [
                i
                for i in pulse.sink_input_list()
                if i.proplist.get("qvaudio.test") == f"ch{channels}"
            ]
            assert list(ours.channel_list) == list(CHANNEL_POSITIONS[channels]), channels


def test_unreachable_server_raises_pulse_error_with_text(tmp_path: object) -> None:
    with pytest.raises(PulseError) as info:
        PcmStream.playback("unix:/nonexistent/socket", None, STEREO_S16, "t", "t", 3840)
    assert info.value.code == 6  # PA_ERR_CONNECTIONREFUSED
    assert info.value.message == "Connection refused" == strerror(6)
    assert "Connection refused" in str(info.value)
    assert "unix:/nonexistent/socket" in str(info.value)


def test_missing_device_on_pulseaudio_raises_pulse_error(pulse_server: AudioServer) -> None:
    with pytest.raises(PulseError) as info:
        PcmStream.record(
            pulse_server.server, "no_such_source", STEREO_S16, "t", "t", STEREO_S16.bytes_for_ms(20)
        )
    assert info.value.code == 5  # PA_ERR_NOENTITY
    assert info.value.message == "No such entity"


def test_missing_device_on_pipewire_falls_back_to_the_default(
    pipewire_server: AudioServer,
) -> None:
    """pipewire-pulse connects a stream whose device is missing to the default one.

    So callers must check that their device exists (pulse_devices) before
    opening a stream on it; this test notices if PipeWire ever changes.
    """
    with (
        pulsectl.Pulse("t", server=pipewire_server.server) as pulse,
        PcmStream.record(
            pipewire_server.server,
            "no_such_source",
            STEREO_S16,
            "t",
            "fallback",
            STEREO_S16.bytes_for_ms(20),
        ) as rec,
    ):
        rec.read(STEREO_S16.bytes_for_ms(20))
        default = pulse.get_source_by_name(pulse_devices.get_default_source(pulse))
        ours = [o for o in pulse.source_output_list() if o.proplist.get("media.name") == "fallback"]
    assert len(ours) == 1
    assert ours[0].source == default.index


def test_argument_errors_are_caught_before_libpulse(audio_server: AudioServer) -> None:
    server = audio_server.server
    with pytest.raises(ValueError, match="fragsize"):
        PcmStream.record(server, None, STEREO_S16, "t", "t", 3)
    with pytest.raises(ValueError, match="property"):
        PcmStream.playback(server, None, STEREO_S16, "t", "t", 3840, props={"bad key": "x"})
    with PcmStream.playback(server, None, STEREO_S16, "t", "t", 3840) as play:
        with pytest.raises(ValueError, match="whole"):
            play.write(b"\0\0\0")
        play.close()
        play.close()  # idempotent
        assert play.closed
        with pytest.raises(ValueError, match="closed"):
            play.write(bytes(4))
        with pytest.raises(ValueError, match="closed"):
            play.latency_us()


def test_server_death_fails_a_blocked_read(
    make_pulse_server: Callable[[str], PulseAudioServer],
) -> None:
    doomed = make_pulse_server("doomed")
    fragment = STEREO_S16.bytes_for_ms(20)
    with PcmStream.record(doomed.server, "null.monitor", STEREO_S16, "t", "t", fragment) as rec:
        recorder = Recorder(rec, fragment)
        recorder.wait_for_data()
        doomed.kill()
        with pytest.raises(PulseError) as info:
            recorder.stop()
    assert info.value.code in (7, 11)  # protocol error / connection terminated
    assert info.value.message


def test_close_interrupts_a_read_in_progress(audio_server: AudioServer, test_sink: str) -> None:
    """A read of 30 s of audio is waiting when another thread closes the
    stream: it returns at once with StreamClosed (no reaper, no server round
    trip), and the stream refuses any later call."""
    fragment = STEREO_S16.bytes_for_ms(20)
    rec = PcmStream.record(
        audio_server.server, f"{test_sink}.monitor", STEREO_S16, "t", "t", fragment
    )
    outcome: list[BaseException] = []
    started = threading.Event()

    def read_long() -> None:
        started.set()
        try:
            rec.read(STEREO_S16.bytes_for_ms(30_000))
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    reader = threading.Thread(target=read_long, daemon=True)
    reader.start()
    assert started.wait(5)
    # The read is under way once it holds the stream (a call in progress).
    wait_until(lambda: rec._busy == 1, "the read to start", 5)
    rec.close()
    reader.join(10)  # a ceiling: the read returns as soon as it is woken
    assert not reader.is_alive(), "close did not interrupt the read"
    assert len(outcome) == 1 and isinstance(outcome[0], StreamClosed), outcome
    assert rec.closed
    with pytest.raises(ValueError, match="closed"):
        rec.read(fragment)


def test_a_stream_opened_alongside_never_takes_anothers_properties(
    audio_server: AudioServer, test_sink: str, pulse: pulsectl.Pulse
) -> None:
    """Each stream's properties are its own: a stream opened at the same
    moment by another thread, without properties, must not see them (they
    once went through the environment)."""
    fmt = STEREO_S16
    opened: list[PcmStream] = []
    lock = threading.Lock()

    def open_many(props: dict[str, str] | None, name: str) -> None:
        for _ in range(15):
            stream = PcmStream.record(
                audio_server.server, f"{test_sink}.monitor", fmt, name, name, 1920, props=props
            )
            with lock:
                opened.append(stream)

    threads = [
        threading.Thread(target=open_many, args=({"org.qvaudio.mark": "yes"}, "marked")),
        threading.Thread(target=open_many, args=(None, "plain")),
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        outputs = [o for o in pulse.source_output_list() if o.name in ("marked", "plain")]
        assert len(outputs) == 30
        marked = {o.name for o in outputs if o.proplist.get("org.qvaudio.mark") == "yes"}
        assert marked == {"marked"}
        assert sum(o.name == "marked" for o in outputs) == 15
    finally:
        for stream in opened:
            stream.close()


# Run in a child process: the bug this guards against was a segfault.
_STREAMS_AND_CONTEXTS_AT_ONCE = """
import sys, threading, time
from qvaudio.core.formats import AudioFormat, SampleFormat
from qvaudio.pulse.devices import connect
from qvaudio.pulse.pcm import PcmStream

server, seconds = sys.argv[1], float(sys.argv[2])
fmt = AudioFormat(48000, SampleFormat.S16LE, 2)
stop = time.monotonic() + seconds

def streams(name):
    props = {f"org.qvaudio.k{j}": "v" * 50 for j in range(20)}
    while time.monotonic() < stop:
        with PcmStream.playback(server, None, fmt, name, name, 5760, props=props):
            pass

def contexts():
    while time.monotonic() < stop:
        with connect("contexts", server) as pulse:
            pulse.server_info()

threads = [threading.Thread(target=streams, args=(f"s{i}",)) for i in range(2)]
threads += [threading.Thread(target=contexts) for _ in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("survived")
"""


def test_streams_and_connections_opened_at_once_never_crash_the_process(
    audio_server: AudioServer,
) -> None:
    """Found by CI: the guest agent died silently just after dom0 connected.

    Its microphone thread made a pulsectl context while its monitor thread
    had stream properties in the environment, and glibc's setenv moved the
    environment under libpulse's getenv: a segfault (without the shared lock,
    this reproduced in about half of 3 s runs here)."""
    done = subprocess.run(
        [sys.executable, "-c", _STREAMS_AND_CONTEXTS_AT_ONCE, audio_server.server, "5"],
        env=audio_server.full_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0 and "survived" in done.stdout, (
        f"exit status {done.returncode}\n{done.stderr[-3000:]}"
    )


def test_a_passive_opening_that_waits_holds_up_no_other_connection(
    pipewire_server: AudioServer, tmp_path: Path
) -> None:
    """On PipeWire a passive record stream on an idle sink opens only once
    its graph runs. Seen in the guest agent: such an opening held the lock of
    every libpulse context for up to 30 s, so its watcher could not connect,
    not even to end that stream. Now an opening holds no lock while it waits."""
    server = pipewire_server.server
    sink = "t_passive_waits"
    with pulse_devices.connect("qvaudio-test", server) as p:
        pulse_devices.ensure_null_sink(p, sink, "test sink", STEREO_S16)
    outcome: list[str] = []

    def open_passive() -> None:
        props = {"node.passive": "true", "org.qvaudio.test": "waits"}
        try:
            monitor = f"{sink}.monitor"
            with PcmStream.record(server, monitor, STEREO_S16, "t", "passive", 1920, props):
                outcome.append("opened")
        except PulseError as exc:
            outcome.append(exc.message)

    opener = threading.Thread(target=open_passive, daemon=True)
    try:
        opener.start()
        opener.join(1.0)
        assert opener.is_alive(), f"the passive opening did not wait: {outcome}"
        # A new connection, made while the opening waits, sees the waiting stream.
        with pulse_devices.connect("qvaudio-test", server) as p:
            waiting = [
                o for o in p.source_output_list() if o.proplist.get("org.qvaudio.test") == "waits"
            ]
        assert waiting, "the waiting stream is not on the server"
    finally:
        # A sound runs the graph, which is what the opening waits for.
        raw = tmp_path / "tone.raw"
        raw.write_bytes(tone.generate_sine(440.0, STEREO_S16, 0.3))
        pacat = ["pacat", "--raw", "--format=s16le", "--rate=48000", "--channels=2"]
        subprocess.run([*pacat, "-d", sink, str(raw)], env=pipewire_server.full_env(), check=True)
        opener.join(40.0)
        with pulse_devices.connect("qvaudio-test", server) as p:
            pulse_devices.remove_owned_modules(p, [sink])
