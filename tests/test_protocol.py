"""The codec byte by byte: exact layouts, round trips, and hostile input."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qvaudio.core.codec import Decoder, encode, encode_pcm, pcm_chunks
from qvaudio.core.events import (
    MAX_FRAME,
    MAX_PAYLOAD,
    MAX_REASON_BYTES,
    CaptureData,
    CaptureRequest,
    CaptureState,
    CaptureStatus,
    Cork,
    Event,
    FormatAccept,
    FormatOffer,
    FormatRefuse,
    Goodbye,
    GoodbyeCode,
    Hello,
    LocalProtocolError,
    PlaybackData,
    PlaybackState,
    Position,
    RemoteProtocolError,
    Role,
    StreamKind,
    StreamStatus,
    clip_reason,
)
from qvaudio.core.formats import AudioFormat, SampleFormat

S16_48K_2 = AudioFormat(48000, SampleFormat.S16LE, 2)
F32_44K_6 = AudioFormat(44100, SampleFormat.F32LE, 6)


# --- exact bytes: the layout in docs/protocol.md ------------------------------

EXACT: list[tuple[Event, bytes]] = [
    (Hello(1), bytes.fromhex("01 00 0800") + b"QVAU" + bytes.fromhex("0100 0000")),
    (Goodbye(GoodbyeCode.NORMAL, "bye"), bytes.fromhex("02 00 0500 0000") + b"bye"),
    (
        FormatOffer(StreamKind.PLAYBACK, (S16_48K_2,)),
        bytes.fromhex("10 00 0a00 00 01") + struct.pack("<IBBH", 48000, 1, 2, 0),
    ),
    (
        FormatAccept(StreamKind.CAPTURE, F32_44K_6),
        bytes.fromhex("11 00 0900 01") + struct.pack("<IBBH", 44100, 3, 6, 0),
    ),
    (FormatRefuse(StreamKind.PLAYBACK, "no"), bytes.fromhex("12 00 0300 00") + b"no"),
    (PlaybackData(b"\x01\x02\x03\x04"), bytes.fromhex("20 00 0400 01020304")),
    (CaptureData(b"\xff\xfe"), bytes.fromhex("21 00 0200 fffe")),
    (Cork(True), bytes.fromhex("30 00 0100 01")),
    (CaptureRequest(False), bytes.fromhex("31 00 0100 00")),
    (CaptureState(CaptureStatus.DENIED, "policy"), bytes.fromhex("32 00 0700 02") + b"policy"),
    (PlaybackState(StreamStatus.DENIED, "no"), bytes.fromhex("33 00 0300 02") + b"no"),
    (
        Position(480, 240, 12_000, 5_000),
        bytes.fromhex("40 00 1800") + struct.pack("<QQII", 480, 240, 12_000, 5_000),
    ),
]

GUEST_SENT = (Hello, Goodbye, FormatOffer, PlaybackData, Cork, CaptureRequest)


def sender_of(event: Event) -> Role:
    return Role.GUEST if isinstance(event, GUEST_SENT) else Role.DOM0


@pytest.mark.parametrize(("event", "wire"), EXACT, ids=lambda v: type(v).__name__)
def test_exact_encoding(event: Event, wire: bytes) -> None:
    assert encode(event) == wire


@pytest.mark.parametrize(("event", "wire"), EXACT, ids=lambda v: type(v).__name__)
def test_exact_decoding_whole_and_byte_by_byte(event: Event, wire: bytes) -> None:
    assert Decoder(sender_of(event)).feed(wire) == [event]
    decoder = Decoder(sender_of(event))
    events: list[Event] = []
    for i in range(len(wire)):
        events += decoder.feed(wire[i : i + 1])
        if i < len(wire) - 1:
            assert events == [], "no event before the frame is complete"
    assert events == [event]
    assert decoder.buffered == 0


# --- malformed input: always RemoteProtocolError, with a useful message -------

BAD_FRAMES: list[tuple[str, Role, bytes, str]] = [
    ("unknown type", Role.GUEST, bytes.fromhex("7f 00 0000"), "unknown frame type 127"),
    ("nonzero flags", Role.GUEST, bytes.fromhex("30 80 0100 00"), "flags must be 0"),
    ("oversized", Role.GUEST, bytes.fromhex("20 00 fdff"), "exceeds 65532"),
    ("wrong direction", Role.GUEST, encode(CaptureData(b"\0\0")), "may not be sent by the guest"),
    (
        "dom0 offers",
        Role.DOM0,
        encode(FormatOffer(StreamKind.PLAYBACK, (S16_48K_2,))),
        "by the dom0",
    ),
    ("bad magic", Role.GUEST, bytes.fromhex("01 00 0800") + b"XXXX\x01\0\0\0", "magic"),
    ("hello short", Role.GUEST, bytes.fromhex("01 00 0400") + b"QVAU", "expected 8"),
    ("version 0", Role.GUEST, bytes.fromhex("01 00 0800") + b"QVAU\0\0\0\0", "version 0"),
    ("hello reserved", Role.GUEST, bytes.fromhex("01 00 0800") + b"QVAU\x01\0\x01\0", "reserved"),
    ("goodbye short", Role.GUEST, bytes.fromhex("02 00 0100 00"), "too short"),
    ("goodbye code", Role.GUEST, bytes.fromhex("02 00 0200 6300"), "unknown goodbye code 99"),
    ("reason utf8", Role.GUEST, bytes.fromhex("02 00 0300 0000 ff"), "UTF-8"),
    ("reason ctrl", Role.GUEST, bytes.fromhex("02 00 0400 0000 410a"), "non-printable"),
    (
        "reason long",
        Role.GUEST,
        struct.pack("<BBH", 2, 0, 2 + 201) + b"\0\0" + b"a" * 201,
        "at most 200",
    ),
    ("offer empty", Role.GUEST, bytes.fromhex("10 00 0200 0000"), "1 to 16 formats, not 0"),
    ("offer 17", Role.GUEST, bytes.fromhex("10 00 0200 0011"), "not 17"),
    ("offer short", Role.GUEST, bytes.fromhex("10 00 0600 0001 80bb0000"), "expected 10"),
    ("offer stream", Role.GUEST, bytes.fromhex("10 00 0a00 0501 80bb0000 0102 0000"), "stream 5"),
    ("offer rate", Role.GUEST, bytes.fromhex("10 00 0a00 0001 22560000 0102 0000"), "rate 22050"),
    ("offer sfmt", Role.GUEST, bytes.fromhex("10 00 0a00 0001 80bb0000 0902 0000"), "format 9"),
    ("offer ch 0", Role.GUEST, bytes.fromhex("10 00 0a00 0001 80bb0000 0100 0000"), "channel"),
    ("offer ch 9", Role.GUEST, bytes.fromhex("10 00 0a00 0001 80bb0000 0109 0000"), "channel"),
    ("offer resv", Role.GUEST, bytes.fromhex("10 00 0a00 0001 80bb0000 0102 0100"), "reserved"),
    ("empty pcm", Role.GUEST, bytes.fromhex("20 00 0000"), "empty PCM"),
    ("cork 2", Role.GUEST, bytes.fromhex("30 00 0100 02"), "0 or 1"),
    ("cork long", Role.GUEST, bytes.fromhex("30 00 0200 0100"), "expected 1"),
    ("capreq empty", Role.GUEST, bytes.fromhex("31 00 0000"), "expected 1"),
    ("capstate 3", Role.DOM0, bytes.fromhex("32 00 0100 03"), "stream status 3"),
    ("capstate empty", Role.DOM0, bytes.fromhex("32 00 0000"), "too short"),
    ("playstate 7", Role.DOM0, bytes.fromhex("33 00 0100 07"), "stream status 7"),
    ("playstate empty", Role.DOM0, bytes.fromhex("33 00 0000"), "too short"),
    ("position short", Role.DOM0, bytes.fromhex("40 00 0400 00000000"), "expected 24"),
    ("accept short", Role.DOM0, bytes.fromhex("11 00 0100 00"), "expected 9"),
    ("refuse empty", Role.DOM0, bytes.fromhex("12 00 0000"), "too short"),
]


@pytest.mark.parametrize(
    ("sender", "wire", "message"), [b[1:] for b in BAD_FRAMES], ids=[b[0] for b in BAD_FRAMES]
)
def test_malformed_frames_raise_remote_error(sender: Role, wire: bytes, message: str) -> None:
    decoder = Decoder(sender)
    with pytest.raises(RemoteProtocolError, match=message):
        decoder.feed(wire)
    # A decoder that lost framing stays failed.
    with pytest.raises(RemoteProtocolError):
        decoder.feed(encode(Hello()))


def test_oversized_header_fails_before_the_payload_arrives() -> None:
    # Only the header is needed to refuse a frame: dom0 never waits for (or
    # buffers) 64 KiB a hostile guest announces but does not send.
    decoder = Decoder(Role.GUEST)
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        decoder.feed(struct.pack("<BBH", 0x20, 0, MAX_PAYLOAD + 1))


def test_largest_frame_decodes() -> None:
    pcm = bytes(range(256)) * (MAX_PAYLOAD // 256) + b"\0" * (MAX_PAYLOAD % 256)
    wire = encode(PlaybackData(pcm))
    assert len(wire) == MAX_FRAME
    assert Decoder(Role.GUEST).feed(wire) == [PlaybackData(pcm)]


# --- what we refuse to send ---------------------------------------------------

LOCAL_ERRORS: list[tuple[Event, str]] = [
    (PlaybackData(b""), "at least one byte"),
    (Goodbye(GoodbyeCode.NORMAL, "x" * (MAX_REASON_BYTES + 1)), "at most 200"),
    (Goodbye(GoodbyeCode.NORMAL, "line\nforged"), "non-printable"),
    (FormatOffer(StreamKind.PLAYBACK, ()), "1 to 16"),
    (FormatOffer(StreamKind.PLAYBACK, (S16_48K_2,) * 17), "1 to 16"),
    (PlaybackData(b"\0" * (MAX_PAYLOAD + 1)), "exceeds"),
    (Position(-1, 0, 0, 0), "64 bits"),
    (Position(0, 0, 2**32, 0), "32 bits"),
    (Hello(0), "does not fit"),
]


@pytest.mark.parametrize(("event", "message"), LOCAL_ERRORS, ids=lambda v: repr(v)[:30])
def test_encoding_invalid_events_raises_local_error(event: Event, message: str) -> None:
    with pytest.raises(LocalProtocolError, match=message):
        encode(event)


def test_encode_pcm_splits_on_whole_frames() -> None:
    fmt = F32_44K_6  # 24-byte frames: MAX_PAYLOAD is not a multiple of them
    pcm = bytes(fmt.frame_size * 6000)
    frames = list(encode_pcm(StreamKind.PLAYBACK, pcm, fmt.frame_size))
    events = Decoder(Role.GUEST).feed(b"".join(frames))
    assert b"".join(e.pcm for e in events if isinstance(e, PlaybackData)) == pcm
    assert all(len(e.pcm) % fmt.frame_size == 0 for e in events if isinstance(e, PlaybackData))
    assert len(frames) == 3


@given(
    st.sampled_from([S16_48K_2, F32_44K_6, AudioFormat(48000, SampleFormat.S32LE, 8)]),
    st.integers(1, 200_000),
)
def test_pcm_chunks_are_whole_frames_of_nearly_equal_size(fmt: AudioFormat, frames: int) -> None:
    pcm = bytes(fmt.frame_size * frames)
    chunks = list(pcm_chunks(pcm, fmt.frame_size))
    assert b"".join(chunks) == pcm
    assert all(0 < len(c) <= MAX_PAYLOAD and len(c) % fmt.frame_size == 0 for c in chunks)
    # No small remainder: a PCM frame must carry 1 ms unless it ends a sound.
    assert max(len(c) for c in chunks) - min(len(c) for c in chunks) <= fmt.frame_size


# --- property-based: random events, random splits, random garbage --------------

formats = st.builds(
    AudioFormat,
    st.sampled_from([44100, 48000]),
    st.sampled_from(list(SampleFormat)),
    st.integers(1, 8),
)
reasons = st.text(
    st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs")),
    max_size=40,
)
streams = st.sampled_from(list(StreamKind))
pcm = st.binary(min_size=1, max_size=3000)

guest_events = st.one_of(
    st.builds(Hello, st.integers(1, 0xFFFF)),
    st.builds(Goodbye, st.sampled_from(list(GoodbyeCode)), reasons),
    st.builds(FormatOffer, streams, st.lists(formats, min_size=1, max_size=16).map(tuple)),
    st.builds(PlaybackData, pcm),
    st.builds(Cork, st.booleans()),
    st.builds(CaptureRequest, st.booleans()),
)
dom0_events = st.one_of(
    st.builds(Hello, st.integers(1, 0xFFFF)),
    st.builds(Goodbye, st.sampled_from(list(GoodbyeCode)), reasons),
    st.builds(FormatAccept, streams, formats),
    st.builds(FormatRefuse, streams, reasons),
    st.builds(CaptureData, pcm),
    st.builds(CaptureState, st.sampled_from(list(CaptureStatus)), reasons),
    st.builds(PlaybackState, st.sampled_from(list(StreamStatus)), reasons),
    st.builds(
        Position,
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**64 - 1),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
    ),
)
role_and_events = st.one_of(
    st.tuples(st.just(Role.GUEST), st.lists(guest_events, max_size=20)),
    st.tuples(st.just(Role.DOM0), st.lists(dom0_events, max_size=20)),
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=300)
@given(role_and_events, st.lists(st.integers(0, 10**6), max_size=30))
def test_any_split_yields_the_same_events(
    role_events: tuple[Role, list[Event]], cuts: list[int]
) -> None:
    role, events = role_events
    wire = b"".join(encode(e) for e in events)
    whole = Decoder(role).feed(wire)
    assert whole == events
    decoder = Decoder(role)
    pieces: list[Event] = []
    for chunk in split(wire, cuts):
        pieces += decoder.feed(chunk)
    assert pieces == events
    one_by_one = Decoder(role)
    singles: list[Event] = []
    for i in range(len(wire)):
        singles += one_by_one.feed(wire[i : i + 1])
    assert singles == events


def decode_all(role: Role, data: bytes, chunk: int) -> tuple[list[Event], Exception | None]:
    decoder = Decoder(role)
    events: list[Event] = []
    try:
        for i in range(0, len(data), chunk):
            events += decoder.feed(data[i : i + chunk])
            assert decoder.buffered < MAX_FRAME
    except RemoteProtocolError as exc:
        return events, exc
    return events, None


@settings(max_examples=500)
@given(st.sampled_from(list(Role)), st.binary(max_size=4000), st.integers(1, 300))
def test_random_bytes_only_ever_raise_remote_protocol_error(
    role: Role, data: bytes, chunk: int
) -> None:
    events, error = decode_all(role, data, chunk)
    whole, whole_error = decode_all(role, data, len(data) or 1)
    # However the bytes are split, the outcome is the same: the same events
    # or the same error (a chunked feed may have returned events before it).
    assert str(error) == str(whole_error)
    if error is None:
        assert events == whole


@settings(max_examples=400)
@given(
    role_and_events,
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(1, 64),
)
def test_mutated_streams_decode_or_fail_cleanly(
    role_events: tuple[Role, list[Event]], mutations: list[tuple[int, int]], chunk: int
) -> None:
    role, events = role_events
    wire = bytearray(b"".join(encode(e) for e in events) or b"\0")
    for position, value in mutations:
        wire[position % len(wire)] = value
    decoded, error = decode_all(role, bytes(wire), chunk)
    whole, whole_error = decode_all(role, bytes(wire), len(wire))
    assert str(error) == str(whole_error)
    if error is None:
        assert decoded == whole
    # Whatever decoded is re-encodable: every field was validated on the way in.
    for event in decoded:
        assert Decoder(role).feed(encode(event)) == [event]


def test_clip_reason_makes_any_text_a_valid_reason() -> None:
    clipped = clip_reason("é" * 300 + "\nforged")
    assert len(clipped.encode()) <= MAX_REASON_BYTES and clipped == "é" * 100
    assert clip_reason("line\nbreak") == "line?break"
    encode(Goodbye(GoodbyeCode.NORMAL, clip_reason("✓" * 500)))  # never raises
