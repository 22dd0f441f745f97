"""The guest's microphone writer (qvaudio/guest/pcm_threads.MicWriter) in a call,
against real audio servers (PulseAudio 16 and PipeWire's pulse server).

In a call (the VM plays while it records) the microphone's delay must hold
still for the VM's echo canceller: the reserve is at least a call's and is
not stepped down, and a call that starts while microphone audio flows gets
that reserve at once, as silence, not by the rate matcher's minutes-long glide.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pulsectl
import pytest

from qvaudio.core import tone
from qvaudio.core.formats import AudioFormat, SampleFormat
from qvaudio.guest.pcm_threads import MIC_CALL_RESERVE_MS, MIC_RESERVE_STEP_MS, MicWriter
from qvaudio.pulse import devices as pulse_devices
from tests.audio_daemons import AudioServer
from tests.waiting import wait_until

MONO = AudioFormat(48000, SampleFormat.S16LE, 1)
CHUNK_MS = 5


@pytest.fixture
def mic_sink(audio_server: AudioServer) -> Iterator[str]:
    """The null sink a guest's virtual microphone is backed by, for one test."""
    with pulsectl.Pulse("qvaudio-test", server=audio_server.server) as pulse:
        pulse_devices.ensure_null_sink(pulse, "t_mic_in", "test microphone", MONO)
        yield "t_mic_in"
        pulse_devices.remove_owned_modules(pulse, ["t_mic_in"])


class Dom0Microphone:
    """Puts a tone into the writer in 5 ms chunks at real time, as dom0 sends it."""

    def __init__(self, writer: MicWriter) -> None:
        self.writer = writer
        self.chunks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        chunk = tone.generate_sine(440.0, MONO, CHUNK_MS / 1000)
        start = time.monotonic()
        while not self._stop.is_set():
            self.writer.put(chunk)
            self.chunks += 1
            self._stop.wait(max(0.0, start + self.chunks * CHUNK_MS / 1000 - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def test_a_call_gets_its_reserve_at_once_as_silence_and_keeps_it(
    audio_server: AudioServer, mic_sink: str
) -> None:
    writer = MicWriter(audio_server.server, mic_sink, MONO)
    feeder = Dom0Microphone(writer)
    try:
        # Flowing: a second of audio written into the server (its gaps, if
        # the machine stalls, may grow the reserve beyond its start).
        wait_until(lambda: feeder.chunks > 200 and writer.latency_us() > 0, "audio to flow")
        before_ms = writer.status()["reserve_ms"]
        assert before_ms >= MIC_RESERVE_STEP_MS
        latency_before = writer.latency_us()
        writer.set_call(True)
        latency_after = writer.latency_us()
        reserve = writer.status()["reserve_ms"]
        assert reserve == max(before_ms, MIC_CALL_RESERVE_MS)
        # The queue took the difference as silence: the delay stepped now. The
        # writer may move a chunk into the server between the two reads, which
        # moves the figure by up to a chunk either way.
        step_ms = (latency_after - latency_before) / 1000
        expected = reserve - before_ms
        assert expected - CHUNK_MS <= step_ms <= expected + CHUNK_MS, (step_ms, expected)
        # Said again, nothing more goes in.
        writer.set_call(True)
        assert writer.status()["reserve_ms"] == reserve
    finally:
        feeder.stop()
        writer.stop()
        writer.join(5)


def test_outside_a_call_no_silence_is_put_and_the_reserve_is_left_alone(
    audio_server: AudioServer, mic_sink: str
) -> None:
    writer = MicWriter(audio_server.server, mic_sink, MONO)
    try:
        writer.set_call(False)
        assert writer.status()["reserve_ms"] == MIC_RESERVE_STEP_MS
        # A call before any audio flows: the reserve is the call's, and the
        # first audio will be held to it as any start is; nothing is queued now.
        writer.set_call(True)
        assert writer.status()["reserve_ms"] == MIC_CALL_RESERVE_MS
        assert writer.latency_us() == 0
    finally:
        writer.stop()
        writer.join(5)
