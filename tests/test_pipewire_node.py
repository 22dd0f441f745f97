"""qvaudio's own PipeWire node, against a real PipeWire with pipewire-pulse."""

from __future__ import annotations

from pathlib import Path

import pulsectl
import pytest

from qvaudio.core.formats import AudioFormat
from qvaudio.pulse.pipewire_node import PipeWireError, SinkNode, ffi
from tests.audio_daemons import PipeWireServer
from tests.waiting import wait_until

FMT = AudioFormat.parse("s16le:48000:2")


def remote(server: PipeWireServer) -> str:
    return str(Path(server.env["PIPEWIRE_RUNTIME_DIR"]) / "pipewire-0")


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
