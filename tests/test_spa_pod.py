"""The virtual output's PipeWire parameters, byte by byte.

The expected bytes were printed by libspa 0.3.65's own builders
(`spa_format_audio_raw_build`, `spa_latency_build`, both directions) from a small C program
compiled against libpipewire-0.3-dev; the encoder must match them exactly.
"""

from __future__ import annotations

import struct

import pytest

from qvaudio.core import spa_pod
from qvaudio.core.formats import AudioFormat

S16_48K_STEREO = bytes.fromhex(
    "a00000000f00000003000400030000000100000000000000040000000300000001000000"
    "000000000200000000000000040000000300000001000000000000000100010000000000"
    "040000000300000003010000000000000300010000000000040000000400000080bb0000"
    "000000000400010000000000040000000400000002000000000000000500010000000000"
    "100000000d00000004000000030000000300000004000000"
)
F32_44K_MONO = bytes.fromhex(
    "a00000000f00000003000400030000000100000000000000040000000300000001000000"
    "000000000200000000000000040000000300000001000000000000000100010000000000"
    "04000000030000001b010000000000000300010000000000040000000400000044ac0000"
    "000000000400010000000000040000000400000001000000000000000500010000000000"
    "0c0000000d00000004000000030000000200000000000000"
)
LATENCY_150_MS = bytes.fromhex(
    "b00000000f0000000b0004000f000000010000000000000004000000030000000000000000"
    "000000020000000000000004000000060000000000000000000000030000000000000004000000"
    "060000000000000000000000040000000000000004000000040000000000000000000000050000"
    "000000000004000000040000000000000000000000060000000000000008000000050000008"
    "0d1f008000000000700000000000000080000000500000080d1f00800000000"
)

#: Direction OUTPUT (a source's output port), 25 ms.
CAPTURE_LATENCY_25_MS = bytes.fromhex(
    "b00000000f0000000b0004000f00000001000000000000000400000003000000010000000000"
    "00000200000000000000040000000600000000000000000000000300000000000000040000000600"
    "00000000000000000000040000000000000004000000040000000000000000000000050000000000"
    "00000400000004000000000000000000000006000000000000000800000005000000"
    "40787d01000000000700000000000000080000000500000040787d0100000000"
)


def test_a_stereo_format_matches_libspa() -> None:
    assert spa_pod.audio_format(AudioFormat.parse("s16le:48000:2")) == S16_48K_STEREO


def test_a_mono_format_keeps_the_array_size_and_pads_the_body() -> None:
    pod = spa_pod.audio_format(AudioFormat.parse("f32le:44100:1"))
    assert pod == F32_44K_MONO
    assert len(pod) % 8 == 0


def test_a_latency_matches_libspa() -> None:
    assert spa_pod.playback_latency(150_000_000) == LATENCY_150_MS


def test_a_capture_latency_matches_libspa() -> None:
    assert spa_pod.capture_latency(25_000_000) == CAPTURE_LATENCY_25_MS


def test_every_channel_count_encodes_its_positions() -> None:
    for channels in range(1, 9):
        pod = spa_pod.audio_format(AudioFormat.parse(f"s32le:48000:{channels}"))
        size, kind = struct.unpack_from("<II", pod)
        assert kind == 15 and size + 8 == len(pod), channels
        # The array of positions closes the object: header, child header, ids.
        array_size = 8 + 4 * channels
        tail = pod[-(array_size + (-array_size % 8) + 8) :]
        assert struct.unpack_from("<II", tail) == (array_size, 13), channels


@pytest.mark.parametrize("bad", [-1, spa_pod.MAX_LATENCY_NS + 1])
def test_a_latency_outside_the_range_is_refused(bad: int) -> None:
    with pytest.raises(ValueError):
        spa_pod.playback_latency(bad)
    with pytest.raises(ValueError):
        spa_pod.capture_latency(bad)
