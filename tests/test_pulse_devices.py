"""The guest's virtual devices on real PulseAudio and PipeWire daemons."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pulsectl
import pytest

from qvaudio.core import tone
from qvaudio.core.formats import AudioFormat, SampleFormat
from qvaudio.pulse import devices
from qvaudio.pulse.devices import DeviceState
from qvaudio.pulse.pcm import PcmStream
from tests.audio_daemons import NULL_SINK, AudioServer
from tests.test_pulse_pcm import Recorder
from tests.waiting import wait_until

FMT = AudioFormat(48000, SampleFormat.S16LE, 2)


def eventually(check: Callable[[], bool], what: str) -> None:
    """Poll `check`: servers apply some changes asynchronously (PipeWire's session manager)."""
    wait_until(check, what, 5.0, interval=0.05)


@pytest.fixture
def pulse(audio_server: AudioServer) -> Iterator[Any]:
    with devices.connect("qvaudio-test-devices", audio_server.server) as p:
        yield p
        # Leave the shared daemon as the next test expects it.
        devices.remove_owned_modules(p, ["vsink", "vmic"])
        if devices.get_default_sink(p) != NULL_SINK:
            devices.set_default_sink(p, NULL_SINK)


def modules_named(pulse: Any, device: str) -> list[Any]:
    return [m for m in pulse.module_list() if f"_name={device} " in f"{m.argument or ''} "]


def test_null_sink_is_created_with_its_description(pulse: Any) -> None:
    index = devices.ensure_null_sink(pulse, "vsink", "Work VM's audio", FMT)
    sink = pulse.get_sink_by_name("vsink")
    assert sink.index == index
    assert sink.description == "Work VM\u2019s audio"
    assert pulse.get_source_by_name("vsink.monitor") is not None


def test_second_ensure_adopts_instead_of_duplicating(pulse: Any) -> None:
    first = devices.ensure_null_sink(pulse, "vsink", "VM", FMT)
    second = devices.ensure_null_sink(pulse, "vsink", "VM", FMT)
    assert first == second
    assert len(modules_named(pulse, "vsink")) == 1
    assert [s.name for s in pulse.sink_list()].count("vsink") == 1


def test_a_sink_left_by_a_crashed_run_is_adopted(pulse: Any) -> None:
    # What a previous agent process left loaded before dying.
    pulse.module_load("module-null-sink", "sink_name=vsink rate=48000 channels=2")
    leftover = pulse.get_sink_by_name("vsink").index
    assert devices.ensure_null_sink(pulse, "vsink", "VM", FMT) == leftover
    assert len(modules_named(pulse, "vsink")) == 1


def test_remove_unloads_only_our_modules(pulse: Any) -> None:
    devices.ensure_null_sink(pulse, "vsink", "VM", FMT)
    devices.ensure_virtual_source(pulse, "vmic", "VM mic", FMT)
    assert devices.remove_owned_modules(pulse, ["vsink", "vmic"]) == 3
    sinks = {s.name for s in pulse.sink_list()}
    sources = {s.name for s in pulse.source_list()}
    assert not {"vsink", "vmic_in"} & sinks
    assert "vmic" not in sources
    assert NULL_SINK in sinks  # the daemon's own sink is not ours
    assert devices.remove_owned_modules(pulse, ["vsink", "vmic"]) == 0


def test_bad_names_are_refused_before_reaching_the_server(pulse: Any) -> None:
    for name in ("", "a b", "x=y", "s'q"):
        with pytest.raises(ValueError, match="device name"):
            devices.ensure_null_sink(pulse, name, "d", FMT)


def test_virtual_source_is_created_once(pulse: Any) -> None:
    index = devices.ensure_virtual_source(pulse, "vmic", "VM microphone", FMT)
    again = devices.ensure_virtual_source(pulse, "vmic", "VM microphone", FMT)
    assert index == again
    source = pulse.get_source_by_name("vmic")
    assert source.index == index
    assert source.description == "VM microphone"
    assert source.monitor_of_sink == 0xFFFFFFFF  # an input device, not a "Monitor of"
    assert len(modules_named(pulse, "vmic")) == 1
    assert len(modules_named(pulse, "vmic_in")) == 1


def test_audio_fed_to_the_virtual_mic_is_what_a_recorder_reads(
    audio_server: AudioServer, pulse: Any
) -> None:
    devices.ensure_virtual_source(pulse, "vmic", "VM microphone", FMT)
    server = audio_server.server
    fragment = FMT.bytes_for_ms(20)
    with PcmStream.record(server, "vmic", FMT, "some-app", "mic capture", fragment) as rec:
        recorder = Recorder(rec, fragment)
        recorder.wait_for_data()
        with PcmStream.playback(
            server,
            devices.backing_sink_name("vmic"),
            FMT,
            "qvaudio-guest",
            "mic feed",
            FMT.bytes_for_ms(60),
        ) as feed:
            feed.write(tone.generate_sine(700.0, FMT, 1.5))
            feed.drain()
        time.sleep(0.2)
        samples = tone.decode_mono(recorder.stop(), FMT)
    onset = tone.find_onset(samples)
    offset = tone.find_offset(samples)
    assert onset is not None and offset is not None, "nothing reached the virtual mic"
    assert tone.estimate_frequency(samples[onset:offset], FMT.rate) == pytest.approx(700, rel=0.005)
    assert tone.nonsilent_fraction(samples, FMT.rate) >= 0.99


def test_source_output_count_follows_recorders(audio_server: AudioServer, pulse: Any) -> None:
    devices.ensure_virtual_source(pulse, "vmic", "VM microphone", FMT)
    assert devices.source_output_count(pulse, "vmic") == 0
    fragment = FMT.bytes_for_ms(20)
    with PcmStream.record(audio_server.server, "vmic", FMT, "app", "rec", fragment):
        eventually(lambda: devices.source_output_count(pulse, "vmic") == 1, "one recorder on vmic")
    eventually(lambda: devices.source_output_count(pulse, "vmic") == 0, "no recorder on vmic")
    with pytest.raises(LookupError):
        devices.source_output_count(pulse, "no_such_source")


def test_sink_state_is_running_while_something_plays(audio_server: AudioServer, pulse: Any) -> None:
    devices.ensure_null_sink(pulse, "vsink", "VM", FMT)
    assert devices.sink_state(pulse, "vsink") in (DeviceState.IDLE, DeviceState.SUSPENDED)
    with PcmStream.playback(
        audio_server.server, "vsink", FMT, "app", "play", FMT.bytes_for_ms(60)
    ) as play:
        play.write(tone.generate_sine(440.0, FMT, 0.3))
        eventually(
            lambda: devices.sink_state(pulse, "vsink") is DeviceState.RUNNING, "vsink running"
        )
        play.drain()
    assert isinstance(devices.source_state(pulse, "vsink.monitor"), DeviceState)
    with pytest.raises(LookupError):
        devices.sink_state(pulse, "no_such_sink")


def test_default_sink_and_source_can_be_moved(pulse: Any) -> None:
    devices.ensure_null_sink(pulse, "vsink", "VM", FMT)
    devices.ensure_virtual_source(pulse, "vmic", "VM microphone", FMT)
    assert devices.get_default_sink(pulse) == NULL_SINK
    devices.set_default_sink(pulse, "vsink")
    devices.set_default_source(pulse, "vmic")
    eventually(lambda: devices.get_default_sink(pulse) == "vsink", "vsink the default sink")
    eventually(lambda: devices.get_default_source(pulse) == "vmic", "vmic the default source")
    devices.set_default_sink(pulse, NULL_SINK)
    eventually(lambda: devices.get_default_sink(pulse) == NULL_SINK, "null the default sink again")


def test_connect_gives_a_working_pulsectl_client(audio_server: AudioServer) -> None:
    with devices.connect("qvaudio-test-connect", audio_server.server) as p:
        assert isinstance(p, pulsectl.Pulse)
        assert p.server_info().default_sink_name == NULL_SINK


def test_devices_are_recreated_after_the_server_restarts(
    make_pulse_server: Callable[[str], AudioServer],
) -> None:
    server = make_pulse_server("restarting")
    with devices.connect("t", server.server) as p:
        devices.ensure_null_sink(p, "vsink", "VM", FMT)
    server.restart()
    assert server.alive
    with devices.connect("t", server.server) as p:
        assert "vsink" not in {s.name for s in p.sink_list()}
        devices.ensure_null_sink(p, "vsink", "VM", FMT)
        assert "vsink" in {s.name for s in p.sink_list()}
    server.kill()
    assert not server.alive
    with pytest.raises(pulsectl.PulseError):
        devices.connect("t", server.server)
