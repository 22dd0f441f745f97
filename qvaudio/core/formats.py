"""PCM formats that qvaudio can carry, shared by the protocol, policy and PCM I/O.

The set is deliberately small: what desktop audio servers produce natively and
what a dom0 mixer accepts without resampling surprises. Anything outside it is
refused at negotiation, so no later stage has to cope with odd formats.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from qvaudio.core.errors import QvaudioError

SUPPORTED_RATES: tuple[int, ...] = (44100, 48000)
MIN_CHANNELS = 1
MAX_CHANNELS = 8

#: The order of channels in interleaved PCM, per channel count, in PulseAudio's
#: position names: the standard WAVEFORMATEXTENSIBLE layouts (mono, stereo,
#: 3.0, quad, 5.0, 5.1, 6.1, 7.1). Both agents open every stream with this
#: map, so a format qvaudio accepts is one the host server can open (without
#: a map PulseAudio has no default for 7 or 8 channels and refuses them).
CHANNEL_POSITIONS: dict[int, tuple[str, ...]] = {
    1: ("mono",),
    2: ("front-left", "front-right"),
    3: ("front-left", "front-right", "front-center"),
    4: ("front-left", "front-right", "rear-left", "rear-right"),
    5: ("front-left", "front-right", "front-center", "rear-left", "rear-right"),
    6: ("front-left", "front-right", "front-center", "lfe", "rear-left", "rear-right"),
    7: ("front-left", "front-right", "front-center", "lfe", "rear-center",
        "side-left", "side-right"),
    8: ("front-left", "front-right", "front-center", "lfe", "rear-left", "rear-right",
        "side-left", "side-right"),
}  # fmt: skip


class SampleFormat(enum.IntEnum):
    """Sample encodings; the values are the protocol's wire codes."""

    S16LE = 1
    S32LE = 2
    F32LE = 3

    @property
    def width(self) -> int:
        """Bytes per sample."""
        return 2 if self is SampleFormat.S16LE else 4

    @property
    def pulse_name(self) -> str:
        """The name PulseAudio tools use (`pacat --format=...`)."""
        return {
            SampleFormat.S16LE: "s16le",
            SampleFormat.S32LE: "s32le",
            SampleFormat.F32LE: "float32le",
        }[self]

    @classmethod
    def parse(cls, text: str) -> SampleFormat:
        """Accept the names people write in config: s16le, s32le, f32le/float32le."""
        key = text.strip().lower()
        aliases = {"float32le": "f32le"}
        key = aliases.get(key, key)
        try:
            return cls[key.upper()]
        except KeyError:
            names = ", ".join(m.name.lower() for m in cls)
            raise ValueError(f"unknown sample format {text!r} (expected one of {names})") from None


class FormatError(QvaudioError, ValueError):
    """A format outside what qvaudio carries."""


@dataclass(frozen=True, slots=True)
class AudioFormat:
    """An interleaved PCM format: rate, sample encoding and channel count."""

    rate: int
    sample_format: SampleFormat
    channels: int

    def __post_init__(self) -> None:
        if self.rate not in SUPPORTED_RATES:
            raise FormatError(f"unsupported rate {self.rate} Hz (supported: 44100, 48000)")
        if not isinstance(self.sample_format, SampleFormat):
            raise FormatError(f"unsupported sample format {self.sample_format!r}")
        if not MIN_CHANNELS <= self.channels <= MAX_CHANNELS:
            raise FormatError(
                f"unsupported channel count {self.channels} "
                f"(supported: {MIN_CHANNELS} to {MAX_CHANNELS})"
            )

    @property
    def frame_size(self) -> int:
        """Bytes per frame (one sample for every channel)."""
        return self.sample_format.width * self.channels

    @property
    def bytes_per_second(self) -> int:
        return self.frame_size * self.rate

    @property
    def channel_map(self) -> str:
        """The channel order as PulseAudio writes a map ("front-left,front-right")."""
        return ",".join(CHANNEL_POSITIONS[self.channels])

    @property
    def min_pcm_bytes(self) -> int:
        """The least audio a PCM frame may carry (docs/protocol.md): 1 ms, whole frames.

        Every frame costs the receiver the same work whatever it carries, so
        a peer sending one-sample frames at real time would cost it a frame
        per sample."""
        return self.rate // 1000 * self.frame_size

    def bytes_for_ms(self, ms: float) -> int:
        """Whole frames covering `ms` milliseconds, in bytes."""
        return int(self.rate * ms / 1000) * self.frame_size

    def duration_us(self, nbytes: int) -> int:
        """How long `nbytes` of this format plays, in microseconds."""
        return nbytes // self.frame_size * 1_000_000 // self.rate

    def __str__(self) -> str:
        return f"{self.sample_format.name.lower()} {self.rate} Hz {self.channels} ch"

    @classmethod
    def parse(cls, text: str) -> AudioFormat:
        """Parse "s16le:48000:2" (the form used in config and on command lines)."""
        parts = text.split(":")
        if len(parts) != 3:
            raise FormatError(f"format {text!r} is not SAMPLEFORMAT:RATE:CHANNELS")
        try:
            sample_format = SampleFormat.parse(parts[0])
            rate, channels = int(parts[1]), int(parts[2])
        except ValueError as exc:
            raise FormatError(f"format {text!r}: {exc}") from None
        return cls(rate, sample_format, channels)

    def spec(self) -> str:
        """The inverse of `parse`."""
        return f"{self.sample_format.name.lower()}:{self.rate}:{self.channels}"


#: What both agents prefer when nothing is configured: what host mixers run at.
DEFAULT_FORMAT = AudioFormat(48000, SampleFormat.S16LE, 2)
