"""End to end through both real agents and two real PulseAudio daemons.

Playback: a tone from an ordinary client in the VM's server reaches dom0's
server with its frequency within 0.5 % and at least 99 % non-silent 10 ms
windows after onset (Qubes's own acceptance test asks for 95 % and +-20 %).
Capture: a tone on dom0's microphone reaches an application recording in
the VM only while policy allows; after revocation nothing does. Once with
a PipeWire VM, whose recorder is also told how old the audio is.
"""

from __future__ import annotations

import statistics
import subprocess
import threading
import time

import pulsectl

from qvaudio.core.formats import AudioFormat, SampleFormat
from qvaudio.core.tone import (
    decode_mono,
    find_offset,
    find_onset,
    gaps,
    generate_sine,
    nonsilent_fraction,
)
from qvaudio.dom0.control import request
from qvaudio.pulse.pcm import PcmStream
from tests.audio_daemons import NULL_SINK
from tests.dom0_harness import S16, pitch, record_monitor, write_policy
from tests.pipeline_harness import Pipeline
from tests.waiting import wait_until

MONO = AudioFormat(48000, SampleFormat.S16LE, 1)


def record_host(pipe: Pipeline, seconds: float) -> tuple[threading.Thread, list[bytes]]:
    return record_monitor(pipe.host.server, f"{NULL_SINK}.monitor", seconds)


def test_tone_from_a_vm_application_reaches_dom0_intact(idle_pipeline: Pipeline) -> None:
    pipe = idle_pipeline

    def vm1_playback_active() -> bool:
        vms = pipe.dom0.status()["vms"]
        return "vm1" in vms and bool(vms["vm1"].get("playback", {}).get("active"))

    wait_until(
        vm1_playback_active, "vm1's playback to be active", 15, interval=0.1, context=pipe.logs
    )
    recorder, recorded = record_host(pipe, 5.5)
    time.sleep(1.5)  # a new record stream on a null sink's monitor settles first
    tone = pipe.base / "tone440.raw"
    tone.write_bytes(generate_sine(440, S16, 3.0, amplitude=0.5))
    subprocess.run(
        ["pacat", "--raw", "--format=s16le", "--rate=48000", "--channels=2", str(tone)],
        env=pipe.vm.full_env(), check=True, timeout=20,
    )  # fmt: skip
    recorder.join()
    samples = decode_mono(b"".join(recorded), S16)
    onset, offset = find_onset(samples, 0.05), find_offset(samples, 0.05)
    assert onset is not None and offset is not None, f"no tone reached dom0\n{pipe.logs()}"
    freq = pitch(samples)
    coverage = nonsilent_fraction(samples, 48000)
    holes = gaps(samples[onset:offset], 48000, 1.0)
    assert abs(freq - 440) / 440 < 0.005, f"{freq} Hz, gaps {holes}\n{pipe.logs()}"
    assert coverage >= 0.99, f"{coverage:.4f} non-silent"
    assert (offset - onset) / 48000 > 2.9, "the whole tone arrived"


def test_microphone_reaches_the_vm_only_while_allowed(idle_pipeline: Pipeline) -> None:
    pipe = idle_pipeline
    write_policy(
        pipe.dom0.policy_dir,
        "rules:\n  - vm: vm1\n    playback: allow\n    capture: attach-on-request\n",
    )
    with pulsectl.Pulse("test", server=pipe.host.server) as pulse:
        pulse.source_default_set(f"{NULL_SINK}.monitor")  # dom0's "microphone"
    stop = threading.Event()
    threading.Thread(target=_microphone_tone, args=(pipe, stop), daemon=True).start()
    out = pipe.base / "vm-recording.raw"
    app = subprocess.Popen(
        ["parec", "-d", "qvaudio_mic", "--raw", "--format=s16le", "--rate=48000",
         "--channels=1", "--latency-msec=20"],
        env=pipe.vm.full_env(), stdout=out.open("wb"),
    )  # fmt: skip
    try:
        wait_until(  # the app reads (silence) first
            lambda: out.stat().st_size >= MONO.bytes_per_second,
            "a second of audio for the VM's app",
            10,
            interval=0.1,
            context=pipe.logs,
        )
        wait_until(
            lambda: pipe.dom0.status()["vms"]["vm1"]["capture"]["requested"],
            "the guest to ask for the microphone",
            10,
            interval=0.05,
            context=pipe.logs,
        )
        refused_until = out.stat().st_size
        assert request(pipe.dom0.control, {"cmd": "mic", "action": "attach", "vm": "vm1"})["ok"]
        time.sleep(3.0)
        attached_until = out.stat().st_size
        assert request(pipe.dom0.control, {"cmd": "mic", "action": "detach", "vm": "vm1"})["ok"]
        time.sleep(2.0)
    finally:
        app.terminate()
        app.wait(5)
        stop.set()
    samples = decode_mono(out.read_bytes(), MONO)
    before = samples[: refused_until // 2]
    during = samples[refused_until // 2 : attached_until // 2]
    after = samples[attached_until // 2 + 48000 // 2 :]  # half a second for the detach
    assert before and max(abs(x) for x in before) < 0.01, "the VM heard the mic before attach"
    onset, offset = find_onset(during, 0.05), find_offset(during, 0.05)
    assert onset is not None and offset is not None, f"no mic audio in the VM\n{pipe.logs()}"
    freq = pitch(during)
    assert abs(freq - 1000) / 1000 < 0.005, f"{freq} Hz"
    # Whole: the VM's small reserve must not crackle (issue 14: >= 99 % non-silent).
    coverage = nonsilent_fraction(during, 48000)
    assert coverage >= 0.99, f"{coverage:.4f} non-silent\n{pipe.logs()}"
    assert after and max(abs(x) for x in after) < 0.01, "mic audio after revocation"
    log = pipe.dom0.log_text(tail=None)
    assert "vm1: microphone capture started" in log
    assert "vm1: microphone capture stopped" in log


def test_a_pipewire_vm_records_the_microphone_and_is_told_how_old_it_is(
    pipewire_idle_pipeline: Pipeline,
) -> None:
    """The VM's audio server is PipeWire, so the guest's microphone is its own node:
    a recorder there gets the host microphone's tone whole while policy allows,
    silence once it is revoked, and its latency query counts the path from the host
    microphone (dom0's part as dom0 reports it, and the guest's)."""
    pipe = pipewire_idle_pipeline
    with pulsectl.Pulse("test", server=pipe.host.server) as pulse:
        pulse.source_default_set(f"{NULL_SINK}.monitor")  # dom0's "microphone"
    write_policy(
        pipe.dom0.policy_dir, "rules:\n  - vm: vm1\n    playback: allow\n    capture: allow\n"
    )
    stop = threading.Event()
    threading.Thread(target=_microphone_tone, args=(pipe, stop), daemon=True).start()
    recorder = PcmStream.record(
        pipe.vm.server, "qvaudio_mic", MONO, "vm-app", "recorder", MONO.bytes_for_ms(10)
    )
    recorded = bytearray()
    reading = threading.Thread(target=lambda: _record_until(recorder, recorded, stop), daemon=True)
    reading.start()
    try:
        wait_until(
            lambda: pipe.guest.status().get("reported_capture_latency_us") is not None,
            "the guest to publish the microphone's path",
            15,
            interval=0.1,
            context=pipe.logs,
        )

        def paths_ms() -> tuple[float, float]:
            """dom0's share as dom0 reports it, and the path the guest published."""
            dom0_part = pipe.dom0.status()["vms"]["vm1"]["capture"]["latency_us"] / 1000
            return dom0_part, pipe.guest.status()["reported_capture_latency_us"] / 1000

        def published_is_dom0s_part_and_the_guests() -> bool:
            # dom0's share (a few ms of its jitter allowed: the two are read at
            # different moments) and the guest's queue and node buffer, a
            # reserve, 20 ms and a cycle at most. Polled: a host record stream
            # just opened reports its first figures high (136 ms seen once).
            dom0_part, published = paths_ms()
            return dom0_part - 5 <= published <= dom0_part + 60

        wait_until(
            published_is_dom0s_part_and_the_guests,
            "the published path to be dom0's share and the guest's",
            10,
            interval=0.1,
            context=lambda: f"{paths_ms()}\n{pipe.logs()}",
        )

        told_seen: list[tuple[float, float]] = []

        def told() -> bool:
            seen = statistics.median(_sample_latency_ms(recorder) for _ in range(10))
            told_seen.append((seen, paths_ms()[1]))
            return abs(seen - told_seen[-1][1]) <= 15

        wait_until(
            told, "the recorder told the path", 10, interval=0.1,
            context=lambda: f"(recorder's query, published) ms: {told_seen[-5:]}\n{pipe.logs()}",
        )  # fmt: skip
        allowed_until = len(recorded)
        write_policy(
            pipe.dom0.policy_dir, "rules:\n  - vm: vm1\n    playback: allow\n    capture: deny\n"
        )
        wait_until(
            lambda: not pipe.dom0.status()["vms"]["vm1"]["capture"].get("running"),
            "dom0 to stop capturing",
            10,
            interval=0.05,
            context=pipe.logs,
        )
        revoked_at = len(recorded)
        wait_until(
            lambda: len(recorded) > revoked_at + MONO.bytes_per_second,
            "a second of recording after revocation",
            10,
            interval=0.1,
            context=pipe.logs,
        )
    finally:
        stop.set()
        reading.join(5)
        recorder.close()
    samples = decode_mono(bytes(recorded), MONO)
    during = samples[: allowed_until // 2]
    onset = find_onset(during, 0.05)
    assert onset is not None, f"no mic audio in the VM\n{pipe.logs()}"
    assert abs(pitch(during[onset:]) - 1000) / 1000 < 0.005
    assert nonsilent_fraction(during[onset:], 48000) >= 0.99, pipe.logs()
    # Half a second for what was on its way when dom0 stopped.
    after = samples[revoked_at // 2 + 48000 // 2 :]
    assert after and max(abs(x) for x in after) < 0.01, "mic audio after revocation"


def _microphone_tone(pipe: Pipeline, stop: threading.Event) -> None:
    """A 1 kHz tone into the host's null sink, whose monitor is dom0's "microphone"."""
    tone = generate_sine(1000, S16, 1.0, amplitude=0.5)
    with PcmStream.playback(
        pipe.host.server, NULL_SINK, S16, "mic", "mic", S16.bytes_for_ms(50)
    ) as stream:
        chunk = S16.bytes_for_ms(10)
        while not stop.is_set():
            # Stopped between chunks, not after a whole second: the test's host
            # server may go right after the test.
            for i in range(0, len(tone), chunk):
                if stop.is_set():
                    return
                stream.write(tone[i : i + chunk])


def _record_until(stream: PcmStream, into: bytearray, stop: threading.Event) -> None:
    while not stop.is_set():
        into += stream.read(MONO.bytes_for_ms(10))


def _sample_latency_ms(stream: PcmStream) -> float:
    time.sleep(0.05)
    return stream.latency_us() / 1000
