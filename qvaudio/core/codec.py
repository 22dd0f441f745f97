"""The qvaudio wire protocol's codec: events to frames and frames to events. No I/O.

Bytes go in and events come out (`Decoder.feed`); events go in and bytes come
out (`encode`). This module only knows what a well-formed frame is; the
events themselves are `qvaudio.core.events`, and which may be sent when is
`qvaudio.core.connection`. The byte layout is described in docs/protocol.md.

Every frame is a 4-byte header followed by a payload:

    type: u8 | flags: u8 (must be 0) | length: u16 little-endian | payload

Everything a peer sends is validated here, field by field, because the dom0
side treats every guest as hostile: malformed input raises
`RemoteProtocolError` (never anything else), and the decoder never holds more
than one incomplete frame.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from typing import Final, TypeVar

from qvaudio.core.events import (
    HEADER_SIZE,
    MAGIC,
    MAX_OFFERED_FORMATS,
    MAX_PAYLOAD,
    MAX_REASON_BYTES,
    SENDERS,
    CaptureData,
    CaptureRequest,
    CaptureState,
    Cork,
    Event,
    FormatAccept,
    FormatOffer,
    FormatRefuse,
    FrameType,
    Goodbye,
    GoodbyeCode,
    Hello,
    LocalProtocolError,
    PlaybackData,
    PlaybackState,
    Position,
    ProtocolError,
    RemoteProtocolError,
    Role,
    StreamKind,
    StreamStatus,
)
from qvaudio.core.formats import AudioFormat, FormatError, SampleFormat

HEADER = struct.Struct("<BBH")
assert HEADER.size == HEADER_SIZE
_HELLO = struct.Struct("<4sHH")
_GOODBYE_CODE = struct.Struct("<H")
_FORMAT = struct.Struct("<IBBH")
_STREAM_COUNT = struct.Struct("<BB")
_POSITION = struct.Struct("<QQII")


_U32_MAX: Final = 0xFFFF_FFFF
_E = TypeVar("_E", bound=enum.IntEnum)
_U64_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF


# --- encoding -----------------------------------------------------------------


def _check_reason(reason: str, error: type[ProtocolError]) -> bytes:
    # Reasons end up in dom0's logs and notifications: only short printable text,
    # so that a hostile guest cannot forge log lines or flood them.
    if not reason.isprintable():
        raise error("reason text contains non-printable characters")
    data = reason.encode("utf-8")
    if len(data) > MAX_REASON_BYTES:
        raise error(f"reason text is {len(data)} bytes (at most {MAX_REASON_BYTES})")
    return data


def _encode_format(fmt: AudioFormat) -> bytes:
    return _FORMAT.pack(fmt.rate, fmt.sample_format.value, fmt.channels, 0)


def _encode_payload(event: Event) -> bytes:
    err = LocalProtocolError
    match event:
        case Hello(version=version):
            if not 0 < version <= 0xFFFF:
                raise err(f"protocol version {version} does not fit the hello frame")
            return _HELLO.pack(MAGIC, version, 0)
        case Goodbye(code=code, reason=reason):
            return _GOODBYE_CODE.pack(GoodbyeCode(code).value) + _check_reason(reason, err)
        case FormatOffer(stream=stream, formats=formats):
            if not 1 <= len(formats) <= MAX_OFFERED_FORMATS:
                raise err(f"an offer lists 1 to {MAX_OFFERED_FORMATS} formats, not {len(formats)}")
            head = _STREAM_COUNT.pack(StreamKind(stream).value, len(formats))
            return head + b"".join(_encode_format(f) for f in formats)
        case FormatAccept(stream=stream, format=fmt):
            return bytes([StreamKind(stream).value]) + _encode_format(fmt)
        case FormatRefuse(stream=stream, reason=reason):
            return bytes([StreamKind(stream).value]) + _check_reason(reason, err)
        case PlaybackData(pcm=pcm) | CaptureData(pcm=pcm):
            if not pcm:
                raise err("a PCM frame must carry at least one byte")
            return bytes(pcm)
        case Cork(corked=flag) | CaptureRequest(start=flag):
            return bytes([1 if flag else 0])
        case (
            CaptureState(status=status, reason=reason) | PlaybackState(status=status, reason=reason)
        ):
            return bytes([StreamStatus(status).value]) + _check_reason(reason, err)
        case Position(
            received_frames=received,
            played_frames=played,
            playback_latency_us=play_lat,
            capture_latency_us=cap_lat,
        ):
            if not (0 <= received <= _U64_MAX and 0 <= played <= _U64_MAX):
                raise err("frame counters must fit in 64 bits")
            if not (0 <= play_lat <= _U32_MAX and 0 <= cap_lat <= _U32_MAX):
                raise err("latencies must fit in 32 bits")
            return _POSITION.pack(received, played, play_lat, cap_lat)
    raise err(f"not a protocol event: {event!r}")


def encode(event: Event) -> bytes:
    """One event as one frame. Raises LocalProtocolError for what can't be sent."""
    payload = _encode_payload(event)
    if len(payload) > MAX_PAYLOAD:
        raise LocalProtocolError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(event.frame_type.value, 0, len(payload)) + payload


def pcm_chunks(pcm: bytes, frame_size: int) -> Iterable[bytes]:
    """`pcm` in pieces that each fit one frame's payload and hold whole audio frames.

    The pieces are as equal as whole frames allow, so none is a small
    remainder: a frame must carry at least 1 ms of audio (docs/protocol.md),
    and every piece of PCM that does holds at least half a maximal frame.
    """
    if frame_size <= 0:
        raise LocalProtocolError("frame size must be positive")
    frames = len(pcm) // frame_size
    per_frame = MAX_PAYLOAD // frame_size
    count = max(1, -(-frames // per_frame))
    base, extra = divmod(frames, count)
    start = 0
    for i in range(count):
        end = start + (base + (1 if i < extra else 0)) * frame_size
        if i == count - 1:
            end = len(pcm)  # a partial frame at the end stays, for the caller's check
        yield pcm[start:end]
        start = end


def encode_pcm(kind: StreamKind, pcm: bytes, frame_size: int) -> Iterable[bytes]:
    """Split PCM into frames no larger than the maximum, each whole audio frames."""
    cls = PlaybackData if kind is StreamKind.PLAYBACK else CaptureData
    for chunk in pcm_chunks(pcm, frame_size):
        yield encode(cls(chunk))


# --- decoding -----------------------------------------------------------------


def _decode_reason(data: bytes) -> str:
    if len(data) > MAX_REASON_BYTES:
        raise RemoteProtocolError(f"reason text is {len(data)} bytes (at most {MAX_REASON_BYTES})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError("reason text is not valid UTF-8") from None
    if not text.isprintable():
        raise RemoteProtocolError("reason text contains non-printable characters")
    return text


def _decode_enum(cls: type[_E], value: int, what: str) -> _E:
    try:
        return cls(value)
    except ValueError:
        raise RemoteProtocolError(f"unknown {what} {value}") from None


def _decode_format(data: bytes) -> AudioFormat:
    rate, sample_format, channels, reserved = _FORMAT.unpack(data)
    if reserved:
        raise RemoteProtocolError("reserved bytes of a format are not zero")
    fmt_code = _decode_enum(SampleFormat, sample_format, "sample format")
    try:
        return AudioFormat(rate, fmt_code, channels)
    except FormatError as exc:
        raise RemoteProtocolError(str(exc)) from None


def _expect_size(kind: FrameType, payload: bytes, size: int) -> None:
    if len(payload) != size:
        raise RemoteProtocolError(f"{kind.name} payload is {len(payload)} bytes, expected {size}")


def _decode_payload(kind: FrameType, payload: bytes) -> Event:
    match kind:
        case FrameType.HELLO:
            _expect_size(kind, payload, _HELLO.size)
            magic, version, reserved = _HELLO.unpack(payload)
            if magic != MAGIC:
                raise RemoteProtocolError("hello does not start with the qvaudio magic")
            if reserved:
                raise RemoteProtocolError("reserved bytes of hello are not zero")
            if version == 0:
                raise RemoteProtocolError("protocol version 0 is invalid")
            return Hello(version)
        case FrameType.GOODBYE:
            if len(payload) < _GOODBYE_CODE.size:
                raise RemoteProtocolError("goodbye frame too short")
            (code,) = _GOODBYE_CODE.unpack_from(payload)
            return Goodbye(
                _decode_enum(GoodbyeCode, code, "goodbye code"),
                _decode_reason(payload[_GOODBYE_CODE.size :]),
            )
        case FrameType.FORMAT_OFFER:
            if len(payload) < _STREAM_COUNT.size:
                raise RemoteProtocolError("format offer too short")
            stream, count = _STREAM_COUNT.unpack_from(payload)
            if not 1 <= count <= MAX_OFFERED_FORMATS:
                raise RemoteProtocolError(
                    f"an offer lists 1 to {MAX_OFFERED_FORMATS} formats, not {count}"
                )
            _expect_size(kind, payload, _STREAM_COUNT.size + count * _FORMAT.size)
            body = payload[_STREAM_COUNT.size :]
            formats = tuple(
                _decode_format(body[i * _FORMAT.size : (i + 1) * _FORMAT.size])
                for i in range(count)
            )
            return FormatOffer(_decode_enum(StreamKind, stream, "stream"), formats)
        case FrameType.FORMAT_ACCEPT:
            _expect_size(kind, payload, 1 + _FORMAT.size)
            return FormatAccept(
                _decode_enum(StreamKind, payload[0], "stream"), _decode_format(payload[1:])
            )
        case FrameType.FORMAT_REFUSE:
            if len(payload) < 1:
                raise RemoteProtocolError("format refusal too short")
            return FormatRefuse(
                _decode_enum(StreamKind, payload[0], "stream"), _decode_reason(payload[1:])
            )
        case FrameType.PLAYBACK_PCM | FrameType.CAPTURE_PCM:
            if not payload:
                raise RemoteProtocolError("empty PCM frame")
            return PlaybackData(payload) if kind is FrameType.PLAYBACK_PCM else CaptureData(payload)
        case FrameType.CORK | FrameType.CAPTURE_REQUEST:
            _expect_size(kind, payload, 1)
            if payload[0] > 1:
                raise RemoteProtocolError(f"{kind.name} flag must be 0 or 1, not {payload[0]}")
            return (
                Cork(payload[0] == 1) if kind is FrameType.CORK else CaptureRequest(payload[0] == 1)
            )
        case FrameType.CAPTURE_STATE | FrameType.PLAYBACK_STATE:
            if len(payload) < 1:
                raise RemoteProtocolError(f"{kind.name} too short")
            status = _decode_enum(StreamStatus, payload[0], "stream status")
            reason = _decode_reason(payload[1:])
            if kind is FrameType.CAPTURE_STATE:
                return CaptureState(status, reason)
            return PlaybackState(status, reason)
        case FrameType.POSITION:
            _expect_size(kind, payload, _POSITION.size)
            return Position(*_POSITION.unpack(payload))
    raise AssertionError(f"unhandled frame type {kind!r}")  # pragma: no cover


class Decoder:
    """Turns a byte stream from one peer into events.

    Bytes go in with `feed`; `next_event` decodes one complete frame at a
    time, so a receiver that rejects an event stops decoding at once instead
    of first decoding everything a hostile peer packed into one read. The
    decoder never buffers more than what was fed, and after an error it stays
    failed: a stream that lost framing cannot be trusted again.
    """

    def __init__(self, sender: Role) -> None:
        self.sender = sender
        self._buffer = bytearray()
        self._offset = 0
        self._error: RemoteProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes fed and not yet decoded (after a full drain: at most MAX_FRAME - 1)."""
        return len(self._buffer) - self._offset

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Add bytes and return every event they complete (`push` plus draining)."""
        self.push(data)
        events: list[Event] = []
        while (event := self.next_event()) is not None:
            events.append(event)
        return events

    def push(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes from the peer without decoding them yet."""
        if self._error is not None:
            raise self._error
        if self._offset:
            del self._buffer[: self._offset]
            self._offset = 0
        self._buffer += data

    def next_event(self) -> Event | None:
        """The next complete frame's event, or None until more bytes come."""
        if self._error is not None:
            raise self._error
        available = len(self._buffer) - self._offset
        if available < HEADER_SIZE:
            return None
        try:
            kind_code, flags, length = HEADER.unpack_from(self._buffer, self._offset)
            kind = self._check_header(kind_code, flags, length)
            start = self._offset + HEADER_SIZE
            end = start + length
            if end > len(self._buffer):
                return None
            # One copy per frame: PCM needs its own bytes anyway, and no view
            # into the buffer may outlive a validation error.
            event = _decode_payload(kind, bytes(self._buffer[start:end]))
        except RemoteProtocolError as exc:
            self.fail(exc)
            raise
        self._offset = end
        return event

    def fail(self, exc: RemoteProtocolError) -> None:
        """Stay failed with `exc` (the receiver rejected an event) and drop the rest."""
        self._error = exc
        self._buffer.clear()
        self._offset = 0

    def _check_header(self, kind_code: int, flags: int, length: int) -> FrameType:
        kind = _decode_enum(FrameType, kind_code, "frame type")
        if self.sender not in SENDERS[kind]:
            raise RemoteProtocolError(f"{kind.name} may not be sent by the {self.sender.value}")
        if flags:
            raise RemoteProtocolError(f"frame flags must be 0, not {flags:#04x}")
        if length > MAX_PAYLOAD:
            raise RemoteProtocolError(f"frame of {length} bytes exceeds {MAX_PAYLOAD}")
        return kind
