"""The PipeWire parameters the guest's virtual devices publish, as SPA POD bytes.

PipeWire takes a node's parameters as SPA PODs: little binary records of
(size, type, body) with every body padded to 8 bytes. libspa builds them with
inline C functions, which a binding in cffi's ABI mode cannot call, and the
objects needed here are small and fixed in shape, so they are written
out here: the raw audio format the virtual devices take or give
(`audio_format`) and the latency of the path behind them
(`playback_latency` to the host's speakers, `capture_latency` from the
host's microphone). Pure functions,
checked byte by byte against what libspa 0.3.65's own builders produce
(tests/test_spa_pod.py).

The numbers are SPA's ABI (spa/utils/type.h, spa/param/param.h,
spa/param/format.h, spa/param/audio/raw.h, spa/param/latency.h): stable
across PipeWire releases, as every client compiled against an older
libspa depends on them.
"""

from __future__ import annotations

import struct
from typing import Final

from qvaudio.core.formats import CHANNEL_POSITIONS, AudioFormat, SampleFormat

# Value types (enum spa_type).
_ID: Final = 3
_INT: Final = 4
_LONG: Final = 5
_FLOAT: Final = 6
_ARRAY: Final = 13
_OBJECT: Final = 15

# Object types (SPA_TYPE_OBJECT_*) and parameter ids (enum spa_param_type).
_OBJECT_FORMAT: Final = 0x40003
_OBJECT_LATENCY: Final = 0x4000B
PARAM_ENUM_FORMAT: Final = 3
PARAM_LATENCY: Final = 15

# Format keys (enum spa_format) and their values.
_FORMAT_MEDIA_TYPE: Final = 1
_FORMAT_MEDIA_SUBTYPE: Final = 2
_FORMAT_AUDIO_FORMAT: Final = 0x10001
_FORMAT_AUDIO_RATE: Final = 0x10003
_FORMAT_AUDIO_CHANNELS: Final = 0x10004
_FORMAT_AUDIO_POSITION: Final = 0x10005
_MEDIA_TYPE_AUDIO: Final = 1
_MEDIA_SUBTYPE_RAW: Final = 1

# Latency keys (enum spa_param_latency).
_LATENCY_DIRECTION: Final = 1
_LATENCY_MIN_QUANTUM: Final = 2
_LATENCY_MAX_QUANTUM: Final = 3
_LATENCY_MIN_RATE: Final = 4
_LATENCY_MAX_RATE: Final = 5
_LATENCY_MIN_NS: Final = 6
_LATENCY_MAX_NS: Final = 7
#: enum spa_direction: a sink's input port reports the latency downstream of
#: it (to the speakers), a source's output port the latency upstream of it
#: (since the sound was made).
DIRECTION_INPUT: Final = 0
DIRECTION_OUTPUT: Final = 1

_SAMPLE_FORMATS: Final = {
    SampleFormat.S16LE: 0x103,
    SampleFormat.S32LE: 0x10B,
    SampleFormat.F32LE: 0x11B,
}
#: enum spa_audio_channel, by the names `qvaudio.core.formats` uses.
_CHANNELS: Final = {
    "mono": 2,
    "front-left": 3,
    "front-right": 4,
    "front-center": 5,
    "lfe": 6,
    "side-left": 7,
    "side-right": 8,
    "rear-center": 11,
    "rear-left": 12,
    "rear-right": 13,
}
#: A latency this large is a bug upstream, not a path: refused rather than published.
MAX_LATENCY_NS: Final = 60 * 1_000_000_000


def _pad(body: bytes) -> bytes:
    return body + bytes(-len(body) % 8)


def _pod(kind: int, body: bytes) -> bytes:
    """Header with the body's true size; the body padded to 8 bytes."""
    return struct.pack("<II", len(body), kind) + _pad(body)


def _prop(key: int, value: bytes) -> bytes:
    return struct.pack("<II", key, 0) + value


def _object(object_type: int, param_id: int, props: list[bytes]) -> bytes:
    return _pod(_OBJECT, struct.pack("<II", object_type, param_id) + b"".join(props))


def _id(value: int) -> bytes:
    return _pod(_ID, struct.pack("<I", value))


def _int(value: int) -> bytes:
    return _pod(_INT, struct.pack("<i", value))


def _long(value: int) -> bytes:
    return _pod(_LONG, struct.pack("<q", value))


def _float(value: float) -> bytes:
    return _pod(_FLOAT, struct.pack("<f", value))


def _id_array(values: list[int]) -> bytes:
    child = struct.pack("<II", 4, _ID)
    return _pod(_ARRAY, child + b"".join(struct.pack("<I", v) for v in values))


def audio_format(fmt: AudioFormat) -> bytes:
    """An EnumFormat parameter offering exactly `fmt` (interleaved, with its channel map)."""
    positions = [_CHANNELS[name] for name in CHANNEL_POSITIONS[fmt.channels]]
    return _object(
        _OBJECT_FORMAT,
        PARAM_ENUM_FORMAT,
        [
            _prop(_FORMAT_MEDIA_TYPE, _id(_MEDIA_TYPE_AUDIO)),
            _prop(_FORMAT_MEDIA_SUBTYPE, _id(_MEDIA_SUBTYPE_RAW)),
            _prop(_FORMAT_AUDIO_FORMAT, _id(_SAMPLE_FORMATS[fmt.sample_format])),
            _prop(_FORMAT_AUDIO_RATE, _int(fmt.rate)),
            _prop(_FORMAT_AUDIO_CHANNELS, _int(fmt.channels)),
            _prop(_FORMAT_AUDIO_POSITION, _id_array(positions)),
        ],
    )


def playback_latency(latency_ns: int) -> bytes:
    """A Latency parameter for a sink's input: `latency_ns` from it to the speakers.

    Only the nanosecond part is set (min = max): the path behind qvaudio's
    virtual output is measured in time, not in graph quanta or samples."""
    return _latency(DIRECTION_INPUT, latency_ns)


def capture_latency(latency_ns: int) -> bytes:
    """A Latency parameter for a source's output: `latency_ns` since the microphone heard it."""
    return _latency(DIRECTION_OUTPUT, latency_ns)


def _latency(direction: int, latency_ns: int) -> bytes:
    if not 0 <= latency_ns <= MAX_LATENCY_NS:
        raise ValueError(f"latency {latency_ns} ns is outside 0..{MAX_LATENCY_NS}")
    return _object(
        _OBJECT_LATENCY,
        PARAM_LATENCY,
        [
            _prop(_LATENCY_DIRECTION, _id(direction)),
            _prop(_LATENCY_MIN_QUANTUM, _float(0.0)),
            _prop(_LATENCY_MAX_QUANTUM, _float(0.0)),
            _prop(_LATENCY_MIN_RATE, _int(0)),
            _prop(_LATENCY_MAX_RATE, _int(0)),
            _prop(_LATENCY_MIN_NS, _long(latency_ns)),
            _prop(_LATENCY_MAX_NS, _long(latency_ns)),
        ],
    )
