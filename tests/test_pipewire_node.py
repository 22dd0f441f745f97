"""qvaudio's own PipeWire nodes, against a real PipeWire with pipewire-pulse."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pulsectl
import pytest

from qvaudio.core import tone
from qvaudio.core.formats import AudioFormat
from qvaudio.pulse.pcm import PcmStream
from qvaudio.pulse.pipewire_node import (
    MIN_SOURCE_VERSION,
    STALE_S,
    NodeFeed,
    PipeWireError,
    SinkNode,
    SourceNode,
    _version_tuple,
    ffi,
)
from tests.audio_daemons import PipeWireServer
from tests.waiting import wait_until

FMT = AudioFormat.parse("s16le:48000:2")


def remote(server: PipeWireServer) -> str:
    return str(Path(server.env["PIPEWIRE_RUNTIME_DIR"]) / "pipewire-0")


def record_from(server: PipeWireServer, source: str) -> PcmStream:
    """An application's record stream on `source`, in 10 ms fragments."""
    return PcmStream.record(server.server, source, FMT, "node-test", "rec", FMT.bytes_for_ms(10))


def sink_names(server: PipeWireServer) -> set[str]:
    with pulsectl.Pulse("qvaudio-test-node", server=server.server) as pulse:
        return {sink.name for sink in pulse.sink_list()}


def test_the_declared_layouts_are_the_c_compilers() -> None:
    # gcc's sizeof/offsetof on libpipewire 0.3.65's own headers (x86-64).
    assert ffi.sizeof("struct pw_stream_events") == 96
    assert ffi.sizeof("struct pw_buffer") == 32
    assert ffi.sizeof("struct spa_buffer") == 24
    assert ffi.sizeof("struct spa_data") == 40
    assert ffi.offsetof("struct spa_data", "data") == 24
    assert ffi.offsetof("struct spa_data", "chunk") == 32


def test_a_node_is_a_sink_of_the_pulse_server_until_closed(
    pipewire_server: PipeWireServer,
) -> None:
    node = SinkNode.open("qvaudio_node_test", "node test", FMT, remote=remote(pipewire_server))
    try:
        assert node.alive
        wait_until(lambda: "qvaudio_node_test" in sink_names(pipewire_server), "the node", 10)
        node.set_latency_ns(40_000_000)
        assert node.latency_ns == 40_000_000
    finally:
        node.close()
    node.close()  # idempotent
    assert not node.alive
    wait_until(lambda: "qvaudio_node_test" not in sink_names(pipewire_server), "it gone", 10)
    # A late update from another thread is an error, not a use of the freed loop.
    with pytest.raises(PipeWireError):
        node.set_latency_ns(50_000_000)


def test_no_server_at_the_remote_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PipeWireError, match="cannot connect the PipeWire node"):
        SinkNode.open("qvaudio_nowhere", "nowhere", FMT, remote=str(tmp_path / "pipewire-0"))


class Feeder:
    """Writes a tone into a source node's feed from a thread, as the mic writer does."""

    def __init__(self, feed: NodeFeed, seconds: float = 30.0) -> None:
        self.feed = feed
        self.error: Exception | None = None
        self.written = 0
        self._pcm = tone.generate_sine(700.0, FMT, seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        chunk = FMT.bytes_for_ms(10)
        try:
            for start in range(0, len(self._pcm), chunk):
                if self._stop.is_set():
                    return
                self.feed.write(self._pcm[start : start + chunk])
                self.written += chunk
        except PipeWireError as exc:
            if not self._stop.is_set():
                self.error = exc

    def stop(self) -> None:
        self._stop.set()
        self.feed.close()
        self._thread.join(5)


def test_a_source_node_gives_a_recorder_what_it_is_fed(pipewire_server: PipeWireServer) -> None:
    with SourceNode.open("qvaudio_src_test", "src", FMT, remote=remote(pipewire_server)) as node:
        feeder = Feeder(node.feed(FMT.bytes_for_ms(20), FMT.bytes_for_ms(5)))
        recorder = record_from(pipewire_server, "qvaudio_src_test")
        try:
            pcm = b"".join(recorder.read(FMT.bytes_for_ms(10)) for _ in range(150))
        finally:
            recorder.close()
            feeder.stop()
        assert feeder.error is None
    samples = tone.decode_mono(pcm, FMT, mix=True)
    onset = tone.find_onset(samples)
    assert onset is not None, "only silence was recorded"
    assert tone.estimate_frequency(samples[onset:], FMT.rate) == pytest.approx(700, rel=0.005)
    assert tone.nonsilent_fraction(samples[onset:], FMT.rate) >= 0.99


def test_a_source_nodes_rate_takes_more_of_the_feed_per_cycle(
    pipewire_server: PipeWireServer,
) -> None:
    """The mic writer's rate matching: a rate above the audio's makes the node take
    more per graph cycle (drains a queue that grows), below it less."""
    with SourceNode.open("qvaudio_rate_test", "rate", FMT, remote=remote(pipewire_server)) as node:
        feed = node.feed(FMT.bytes_for_ms(20), FMT.bytes_for_ms(5))
        feeder = Feeder(feed)
        recorder = record_from(pipewire_server, "qvaudio_rate_test")
        reading = threading.Thread(
            target=lambda: [recorder.read(FMT.bytes_for_ms(10)) for _ in range(400)], daemon=True
        )
        reading.start()
        try:
            wait_until(lambda: node.cycle_frames > 0, "the graph running the node", 10)
            nominal = node.cycle_frames
            feed.set_rate(FMT.rate * 102 // 100)
            wait_until(lambda: node.cycle_frames > nominal, "more taken per cycle", 10)
            feed.set_rate(FMT.rate * 98 // 100)
            wait_until(lambda: node.cycle_frames < nominal, "less taken per cycle", 10)
        finally:
            feeder.stop()
            reading.join(10)
            recorder.close()


def test_a_feed_nobody_records_keeps_the_newest_and_closing_it_ends_writes(
    pipewire_server: PipeWireServer,
) -> None:
    with SourceNode.open("qvaudio_idle_src", "idle", FMT, remote=remote(pipewire_server)) as node:
        feed = node.feed(FMT.bytes_for_ms(20), FMT.bytes_for_ms(5))
        assert not node.streaming
        for _ in range(5):  # 50 ms into a 20 ms buffer: paced, not blocked
            feed.write(bytes(FMT.bytes_for_ms(10)))
        assert feed.latency_us() <= 20_000 + node.cycle_frames * 1_000_000 // FMT.rate
        feed.close()
        feed.close()  # idempotent
        with pytest.raises(PipeWireError, match="closed"):
            feed.write(bytes(FMT.bytes_for_ms(10)))


def test_a_recorder_hears_nothing_of_what_an_earlier_recording_left(
    pipewire_server: PipeWireServer,
) -> None:
    """The last 20 ms fed before the recorder went stay in the node's buffer (it keeps
    the newest while nobody records): a recorder that comes much later must not get
    them as the start of its recording."""
    with SourceNode.open("qvaudio_stale_src", "stale", FMT, remote=remote(pipewire_server)) as node:
        feed = node.feed(FMT.bytes_for_ms(20), FMT.bytes_for_ms(5))
        feed.write(tone.generate_sine(700.0, FMT, 0.020))
        assert feed.latency_us() >= 20_000
        assert feed.slack_us() is None, "no cycle played yet"
        time.sleep(STALE_S * 2)  # it ages; nothing else is written
        recorder = record_from(pipewire_server, "qvaudio_stale_src")
        try:
            pcm = b"".join(recorder.read(FMT.bytes_for_ms(10)) for _ in range(20))
            wait_until(lambda: feed.starts == 1, "the node to count the recorder", 10)
        finally:
            recorder.close()
    assert tone.find_onset(tone.decode_mono(pcm, FMT, mix=True)) is None, "the old audio played"


def test_a_source_node_says_how_much_of_its_buffer_no_cycle_needed(
    pipewire_server: PipeWireServer,
) -> None:
    """A feed that keeps the 20 ms buffer full (it writes whenever there is room)
    leaves most of it untaken by cycles of 5-10 ms: the figure says so, and never
    more than the buffer holds. Polled: a stalled writer makes a window's figure 0."""
    with SourceNode.open("qvaudio_slack_src", "slack", FMT, remote=remote(pipewire_server)) as node:
        feed = node.feed(FMT.bytes_for_ms(20), FMT.bytes_for_ms(5))
        feeder = Feeder(feed)
        recorder = record_from(pipewire_server, "qvaudio_slack_src")
        stop = threading.Event()

        def read() -> None:
            while not stop.is_set():
                recorder.read(FMT.bytes_for_ms(10))

        reading = threading.Thread(target=read, daemon=True)
        reading.start()
        seen: list[int | None] = []

        def some_never_needed() -> bool:
            seen.append(feed.slack_us())
            return (seen[-1] or 0) >= 2_000

        try:
            wait_until(some_never_needed, "a window with 2 ms never taken", 10, interval=0.2,
                       context=lambda: f"seen {seen[-10:]}")  # fmt: skip
        finally:
            stop.set()
            reading.join(5)
            recorder.close()
            feeder.stop()
        assert feeder.error is None
    assert all(slack is None or 0 <= slack <= 20_000 for slack in seen), seen


def test_a_library_before_0_3_49_is_too_old_for_a_source_node() -> None:
    # pw_buffer.requested, which a source node reads, came in 0.3.49.
    assert _version_tuple("0.3.48") < MIN_SOURCE_VERSION <= _version_tuple("0.3.49")
    assert _version_tuple("1.0.5") > MIN_SOURCE_VERSION
    assert _version_tuple("0.3.65-rc1") == (0, 3, 65)
