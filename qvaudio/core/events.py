"""The qvaudio wire protocol's vocabulary: frame types, events, who may send what. No I/O.

What the two agents say to each other, as values: `Hello`, `FormatOffer`,
`PlaybackData`, ... (the `Event` union), the enums their fields use, which
side may send each frame type (`SENDERS`), the protocol's limits, and its
errors. How events become bytes and back is `qvaudio.core.codec`; in which
order they may come, `qvaudio.core.connection`. The byte layout is in
docs/protocol.md.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar, Final

from qvaudio.core.errors import QvaudioError
from qvaudio.core.formats import AudioFormat

PROTOCOL_VERSION: Final = 1
MIN_PROTOCOL_VERSION: Final = 1
MAGIC: Final = b"QVAU"

#: type: u8 | flags: u8 | length: u16 (little-endian); the codec's HEADER packs it.
HEADER_SIZE: Final = 4
#: Largest payload of any frame; a frame of 4 + 65532 bytes fits in 64 KiB.
MAX_PAYLOAD: Final = 65532
MAX_FRAME: Final = HEADER_SIZE + MAX_PAYLOAD
#: Reasons are for logs and notifications: short, printable text.
MAX_REASON_BYTES: Final = 200
#: A guest may list this many formats in one offer, in preference order.
MAX_OFFERED_FORMATS: Final = 16


class Role(enum.Enum):
    """Which end of the connection: the guest agent or the dom0 agent."""

    GUEST = "guest"
    DOM0 = "dom0"

    @property
    def peer(self) -> Role:
        return Role.DOM0 if self is Role.GUEST else Role.GUEST


class StreamKind(enum.IntEnum):
    """The two directions audio flows in; the values are wire codes."""

    PLAYBACK = 0  # guest -> dom0: what the VM plays
    CAPTURE = 1  # dom0 -> guest: the microphone


class StreamStatus(enum.IntEnum):
    """Whether audio of a stream flows; dom0 says so for both directions."""

    STOPPED = 0
    RUNNING = 1
    DENIED = 2


CaptureStatus = StreamStatus


class GoodbyeCode(enum.IntEnum):
    NORMAL = 0
    PROTOCOL_ERROR = 1
    VERSION_UNSUPPORTED = 2
    POLICY_DENIED = 3
    TIMEOUT = 4
    RATE_EXCEEDED = 5
    INTERNAL_ERROR = 6
    SHUTDOWN = 7


class FrameType(enum.IntEnum):
    HELLO = 0x01
    GOODBYE = 0x02
    FORMAT_OFFER = 0x10
    FORMAT_ACCEPT = 0x11
    FORMAT_REFUSE = 0x12
    PLAYBACK_PCM = 0x20
    CAPTURE_PCM = 0x21
    CORK = 0x30
    CAPTURE_REQUEST = 0x31
    CAPTURE_STATE = 0x32
    PLAYBACK_STATE = 0x33
    POSITION = 0x40


class ProtocolError(QvaudioError):
    """Base of the protocol's errors; `code` is what a goodbye should carry."""

    def __init__(self, message: str, code: GoodbyeCode = GoodbyeCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol forbids: a bug on our side."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed or out of order: cut it off."""


# --- events ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """First frame from each side; `version` is the highest the sender speaks."""

    version: int = PROTOCOL_VERSION
    frame_type: ClassVar[FrameType] = FrameType.HELLO


@dataclass(frozen=True, slots=True)
class Goodbye:
    """Last frame: why the sender is closing."""

    code: GoodbyeCode
    reason: str = ""
    frame_type: ClassVar[FrameType] = FrameType.GOODBYE


@dataclass(frozen=True, slots=True)
class FormatOffer:
    """Guest: formats it can produce (playback) or take (capture), best first."""

    stream: StreamKind
    formats: tuple[AudioFormat, ...]
    frame_type: ClassVar[FrameType] = FrameType.FORMAT_OFFER


@dataclass(frozen=True, slots=True)
class FormatAccept:
    """dom0: the one offered format it chose within policy."""

    stream: StreamKind
    format: AudioFormat
    frame_type: ClassVar[FrameType] = FrameType.FORMAT_ACCEPT


@dataclass(frozen=True, slots=True)
class FormatRefuse:
    """dom0: none of the offered formats is allowed (or the stream is denied)."""

    stream: StreamKind
    reason: str
    frame_type: ClassVar[FrameType] = FrameType.FORMAT_REFUSE


@dataclass(frozen=True, slots=True)
class PlaybackData:
    """Guest: interleaved PCM in the negotiated playback format."""

    pcm: bytes
    frame_type: ClassVar[FrameType] = FrameType.PLAYBACK_PCM


@dataclass(frozen=True, slots=True)
class CaptureData:
    """dom0: microphone PCM in the negotiated capture format."""

    pcm: bytes
    frame_type: ClassVar[FrameType] = FrameType.CAPTURE_PCM


@dataclass(frozen=True, slots=True)
class Cork:
    """Guest: nothing is playing (corked) or sound starts again (uncorked)."""

    corked: bool
    frame_type: ClassVar[FrameType] = FrameType.CORK


@dataclass(frozen=True, slots=True)
class CaptureRequest:
    """Guest: an application opened (start) or closed (stop) the microphone."""

    start: bool
    frame_type: ClassVar[FrameType] = FrameType.CAPTURE_REQUEST


@dataclass(frozen=True, slots=True)
class CaptureState:
    """dom0: whether microphone audio flows, and why not when it doesn't."""

    status: CaptureStatus
    reason: str = ""
    frame_type: ClassVar[FrameType] = FrameType.CAPTURE_STATE


@dataclass(frozen=True, slots=True)
class PlaybackState:
    """dom0: playback was denied (or allowed again) after the format was agreed.

    Sent when a live policy change flips a VM's playback, so the guest stops
    streaming audio nobody will hear and can tell its user why.
    """

    status: StreamStatus
    reason: str = ""
    frame_type: ClassVar[FrameType] = FrameType.PLAYBACK_STATE


@dataclass(frozen=True, slots=True)
class Position:
    """dom0: how far playback has got, and the latency on dom0's side.

    `received_frames` counts playback frames dom0 has taken from the
    transport; `played_frames` those the host audio server has consumed.
    `playback_latency_us` is the time from dom0 receiving a frame to it being
    heard (agent queue plus host server latency); `capture_latency_us` the
    age of microphone audio when dom0 sends it.
    """

    received_frames: int
    played_frames: int
    playback_latency_us: int
    capture_latency_us: int
    frame_type: ClassVar[FrameType] = FrameType.POSITION


Event = (
    Hello
    | Goodbye
    | FormatOffer
    | FormatAccept
    | FormatRefuse
    | PlaybackData
    | CaptureData
    | Cork
    | CaptureRequest
    | CaptureState
    | PlaybackState
    | Position
)

#: Who may send each frame type. Anything else from a peer is an error.
SENDERS: Final[dict[FrameType, frozenset[Role]]] = {
    FrameType.HELLO: frozenset({Role.GUEST, Role.DOM0}),
    FrameType.GOODBYE: frozenset({Role.GUEST, Role.DOM0}),
    FrameType.FORMAT_OFFER: frozenset({Role.GUEST}),
    FrameType.FORMAT_ACCEPT: frozenset({Role.DOM0}),
    FrameType.FORMAT_REFUSE: frozenset({Role.DOM0}),
    FrameType.PLAYBACK_PCM: frozenset({Role.GUEST}),
    FrameType.CAPTURE_PCM: frozenset({Role.DOM0}),
    FrameType.CORK: frozenset({Role.GUEST}),
    FrameType.CAPTURE_REQUEST: frozenset({Role.GUEST}),
    FrameType.CAPTURE_STATE: frozenset({Role.DOM0}),
    FrameType.PLAYBACK_STATE: frozenset({Role.DOM0}),
    FrameType.POSITION: frozenset({Role.DOM0}),
}


def clip_reason(text: str) -> str:
    """Any text as a valid reason: printable, at most MAX_REASON_BYTES of UTF-8."""
    printable = "".join(ch if ch.isprintable() else "?" for ch in text)
    return printable.encode("utf-8")[:MAX_REASON_BYTES].decode("utf-8", "ignore")
