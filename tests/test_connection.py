"""The state machine: who may send what, when, driven through both ends."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qvaudio.core.codec import encode
from qvaudio.core.connection import Connection, ConnectionState
from qvaudio.core.events import (
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
)
from qvaudio.core.formats import AudioFormat, SampleFormat

S16 = AudioFormat(48000, SampleFormat.S16LE, 2)
F32 = AudioFormat(44100, SampleFormat.F32LE, 1)


def pair() -> tuple[Connection, Connection]:
    """A guest and a dom0 end, through the handshake."""
    guest, dom0 = Connection(Role.GUEST), Connection(Role.DOM0)
    assert dom0.receive_data(guest.send(Hello())) == [Hello()]
    assert guest.receive_data(dom0.send(Hello())) == [Hello()]
    assert guest.state is dom0.state is ConnectionState.OPEN
    assert guest.version == dom0.version == 1
    return guest, dom0


def deliver(sender: Connection, receiver: Connection, event: Event) -> list[Event]:
    return receiver.receive_data(sender.send(event))


def negotiated() -> tuple[Connection, Connection]:
    guest, dom0 = pair()
    deliver(guest, dom0, FormatOffer(StreamKind.PLAYBACK, (F32, S16)))
    deliver(dom0, guest, FormatAccept(StreamKind.PLAYBACK, S16))
    deliver(guest, dom0, FormatOffer(StreamKind.CAPTURE, (S16,)))
    deliver(dom0, guest, FormatAccept(StreamKind.CAPTURE, S16))
    return guest, dom0


def test_full_session() -> None:
    guest, dom0 = negotiated()
    assert guest.format(StreamKind.PLAYBACK) == dom0.format(StreamKind.PLAYBACK) == S16
    pcm = bytes(S16.bytes_for_ms(10))
    assert deliver(guest, dom0, PlaybackData(pcm)) == [PlaybackData(pcm)]
    assert deliver(dom0, guest, Position(480, 0, 20_000, 0)) == [Position(480, 0, 20_000, 0)]
    deliver(guest, dom0, Cork(True))
    assert dom0.corked and guest.corked
    deliver(guest, dom0, CaptureRequest(True))
    deliver(dom0, guest, CaptureState(CaptureStatus.RUNNING))
    assert guest.capture_status is dom0.capture_status is CaptureStatus.RUNNING
    assert deliver(dom0, guest, CaptureData(pcm)) == [CaptureData(pcm)]
    deliver(dom0, guest, CaptureState(CaptureStatus.STOPPED, "revoked"))
    deliver(guest, dom0, Goodbye(GoodbyeCode.NORMAL, "shutting down"))
    assert guest.state is dom0.state is ConnectionState.CLOSED
    assert dom0.goodbye_received == Goodbye(GoodbyeCode.NORMAL, "shutting down")


def test_hellos_may_cross() -> None:
    guest, dom0 = Connection(Role.GUEST), Connection(Role.DOM0)
    to_dom0, to_guest = guest.send(Hello()), dom0.send(Hello())
    assert guest.state is ConnectionState.HANDSHAKE
    guest.receive_data(to_guest)
    dom0.receive_data(to_dom0)
    assert guest.state is dom0.state is ConnectionState.OPEN


def test_newer_peer_falls_back_to_our_version() -> None:
    dom0 = Connection(Role.DOM0)
    dom0.send(Hello())
    dom0.receive_data(encode(Hello(7)))
    assert dom0.version == 1 and dom0.state is ConnectionState.OPEN


def test_too_old_peer_is_refused_with_version_code() -> None:
    dom0 = Connection(Role.DOM0, max_version=3, min_version=2)
    with pytest.raises(RemoteProtocolError) as info:
        dom0.receive_data(encode(Hello(1)))
    assert info.value.code is GoodbyeCode.VERSION_UNSUPPORTED
    assert dom0.state is ConnectionState.FAILED
    goodbye = Connection(Role.GUEST)
    goodbye.send(Hello())
    # The goodbye naming the reason can still be sent after the failure.
    wire = dom0.goodbye_for(info.value)
    assert goodbye.receive_data(wire) == [
        Goodbye(GoodbyeCode.VERSION_UNSUPPORTED, "peer speaks protocol version 1, we need 2 to 3")
    ]


# Remote violations: each is (setup, raw frames the guest sends to dom0, message).
S16_PCM = bytes(S16.bytes_for_ms(10))
REMOTE_VIOLATIONS: list[tuple[str, bool, list[Event], str]] = [
    ("data before hello", False, [Cork(True)], "before hello"),
    ("second hello", True, [Hello()], "second hello"),
    ("pcm before format", True, [PlaybackData(S16_PCM)], "before a format was agreed"),
    (
        "pcm while offer pending",
        True,
        [FormatOffer(StreamKind.PLAYBACK, (S16,)), PlaybackData(S16_PCM)],
        "pending",
    ),
    (
        "double offer",
        True,
        [FormatOffer(StreamKind.PLAYBACK, (S16,)), FormatOffer(StreamKind.PLAYBACK, (S16,))],
        "while one is pending",
    ),
    ("after goodbye", True, [Goodbye(GoodbyeCode.NORMAL), Cork(False)], "after goodbye"),
]


@pytest.mark.parametrize(
    ("handshake", "frames", "message"),
    [v[1:] for v in REMOTE_VIOLATIONS],
    ids=[v[0] for v in REMOTE_VIOLATIONS],
)
def test_remote_order_violations(handshake: bool, frames: list[Event], message: str) -> None:
    dom0 = Connection(Role.DOM0)
    dom0.send(Hello())
    wire = (encode(Hello()) if handshake else b"") + b"".join(encode(f) for f in frames)
    with pytest.raises(RemoteProtocolError, match=message):
        dom0.receive_data(wire)
    assert dom0.state is ConnectionState.FAILED
    with pytest.raises(RemoteProtocolError):
        dom0.receive_data(encode(Cork(True)))


def test_partial_audio_frame_is_refused() -> None:
    _guest, dom0 = negotiated()
    with pytest.raises(RemoteProtocolError, match="not whole frames of 4 bytes"):
        dom0.receive_data(encode(PlaybackData(b"\0" * 6)))


def test_a_frame_under_1_ms_may_only_be_the_last_before_a_cork_or_offer() -> None:
    guest, dom0 = negotiated()
    short = PlaybackData(bytes(S16.min_pcm_bytes - S16.frame_size))
    one_ms = PlaybackData(bytes(S16.min_pcm_bytes))
    # Exactly 1 ms is a full frame; a shorter one ends a sound, then a cork or offer.
    assert deliver(guest, dom0, one_ms) == [one_ms]
    assert deliver(guest, dom0, short) == [short]
    assert deliver(guest, dom0, Cork(True)) == [Cork(True)]
    deliver(guest, dom0, Cork(False))
    deliver(guest, dom0, short)
    deliver(guest, dom0, FormatOffer(StreamKind.PLAYBACK, (S16,)))
    deliver(dom0, guest, FormatAccept(StreamKind.PLAYBACK, S16))
    # Our own guest is stopped before it sends a second frame after a short one.
    deliver(guest, dom0, short)
    with pytest.raises(
        LocalProtocolError, match=r"8 bytes \(under 1 ms of audio\) was not the last"
    ):
        guest.send(one_ms)


def test_tiny_frames_are_refused_at_the_second_and_decoding_stops_there() -> None:
    _guest, dom0 = negotiated()
    tiny = encode(PlaybackData(bytes(S16.frame_size)))
    # A thousand one-sample frames and garbage behind them: the error names the
    # second frame, so nothing after it was even decoded.
    wire = tiny * 1000 + b"\x7f\x00\x00\x00"
    with pytest.raises(
        RemoteProtocolError, match=r"4 bytes \(under 1 ms of audio\) was not the last"
    ):
        dom0.receive_data(wire)
    assert dom0.state is ConnectionState.FAILED
    assert dom0.buffered == 0


def test_capture_pcm_only_while_running() -> None:
    guest, dom0 = negotiated()
    with pytest.raises(LocalProtocolError, match="not running"):
        dom0.send(CaptureData(S16_PCM))
    with pytest.raises(RemoteProtocolError, match="not running"):
        guest.receive_data(encode(CaptureData(S16_PCM)))


def test_capture_running_needs_an_agreed_format() -> None:
    _guest, dom0 = pair()
    with pytest.raises(LocalProtocolError, match="without an agreed capture format"):
        dom0.send(CaptureState(CaptureStatus.RUNNING))


def test_revocation_stops_later_samples() -> None:
    guest, dom0 = negotiated()
    deliver(dom0, guest, CaptureState(CaptureStatus.RUNNING))
    deliver(dom0, guest, CaptureData(S16_PCM))
    deliver(dom0, guest, CaptureState(CaptureStatus.DENIED, "policy changed"))
    with pytest.raises(LocalProtocolError, match="not running"):
        dom0.send(CaptureData(S16_PCM))


def test_playback_denied_mid_stream() -> None:
    guest, dom0 = negotiated()
    in_flight = guest.send(PlaybackData(S16_PCM))
    deliver(dom0, guest, PlaybackState(StreamStatus.DENIED, "policy changed"))
    # What the guest sent before it knew still arrives (dom0 discards it) ...
    assert dom0.receive_data(in_flight) == [PlaybackData(S16_PCM)]
    # ... but the guest sends nothing more until playback is allowed again.
    with pytest.raises(LocalProtocolError, match="playback is denied"):
        guest.send(PlaybackData(S16_PCM))
    deliver(dom0, guest, PlaybackState(StreamStatus.RUNNING))
    assert deliver(guest, dom0, PlaybackData(S16_PCM)) == [PlaybackData(S16_PCM)]


def test_playback_state_needs_an_agreed_format() -> None:
    _guest, dom0 = pair()
    with pytest.raises(LocalProtocolError, match="without an agreed playback format"):
        dom0.send(PlaybackState(StreamStatus.DENIED))


def test_accept_must_be_one_of_the_offered() -> None:
    guest, dom0 = pair()
    deliver(guest, dom0, FormatOffer(StreamKind.PLAYBACK, (F32,)))
    with pytest.raises(LocalProtocolError, match="was not offered"):
        dom0.send(FormatAccept(StreamKind.PLAYBACK, S16))
    with pytest.raises(RemoteProtocolError, match="without an offer"):
        guest.receive_data(encode(FormatAccept(StreamKind.CAPTURE, S16)))


def test_refusal_leaves_no_format_and_allows_a_new_offer() -> None:
    guest, dom0 = pair()
    deliver(guest, dom0, FormatOffer(StreamKind.PLAYBACK, (F32,)))
    assert deliver(dom0, guest, FormatRefuse(StreamKind.PLAYBACK, "f32le not allowed")) == [
        FormatRefuse(StreamKind.PLAYBACK, "f32le not allowed")
    ]
    assert guest.format(StreamKind.PLAYBACK) is None
    with pytest.raises(LocalProtocolError, match="before a format"):
        guest.send(PlaybackData(S16_PCM))
    deliver(guest, dom0, FormatOffer(StreamKind.PLAYBACK, (S16,)))
    deliver(dom0, guest, FormatAccept(StreamKind.PLAYBACK, S16))
    assert deliver(guest, dom0, PlaybackData(S16_PCM)) == [PlaybackData(S16_PCM)]


def test_capture_renegotiation_accepts_in_flight_pcm_in_old_format() -> None:
    guest, dom0 = negotiated()
    deliver(dom0, guest, CaptureState(CaptureStatus.RUNNING))
    in_flight = dom0.send(CaptureData(S16_PCM))  # sent before dom0 sees the new offer
    offer = guest.send(FormatOffer(StreamKind.CAPTURE, (F32,)))
    assert guest.receive_data(in_flight) == [CaptureData(S16_PCM)]
    dom0.receive_data(offer)
    with pytest.raises(LocalProtocolError, match="unanswered"):
        dom0.send(CaptureData(S16_PCM))
    deliver(dom0, guest, FormatAccept(StreamKind.CAPTURE, F32))
    f32_pcm = bytes(F32.frame_size * 3)
    assert deliver(dom0, guest, CaptureData(f32_pcm)) == [CaptureData(f32_pcm)]


def test_local_errors_change_nothing() -> None:
    guest, _dom0 = pair()
    with pytest.raises(LocalProtocolError, match="may not send"):
        guest.send(Position(0, 0, 0, 0))
    with pytest.raises(LocalProtocolError, match="hello already sent"):
        guest.send(Hello())
    assert guest.state is ConnectionState.OPEN
    fresh = Connection(Role.GUEST)
    with pytest.raises(LocalProtocolError, match="before hello"):
        fresh.send(Cork(True))
    guest.send(Goodbye(GoodbyeCode.SHUTDOWN))
    with pytest.raises(LocalProtocolError, match="closed"):
        guest.send(Cork(True))


guest_moves = st.one_of(
    st.just(Cork(True)),
    st.just(CaptureRequest(True)),
    st.builds(FormatOffer, st.sampled_from(list(StreamKind)), st.just((S16, F32))),
    st.just(PlaybackData(S16_PCM)),
)
dom0_moves = st.one_of(
    st.builds(FormatAccept, st.sampled_from(list(StreamKind)), st.sampled_from([S16, F32])),
    st.builds(FormatRefuse, st.sampled_from(list(StreamKind)), st.just("no")),
    st.builds(CaptureState, st.sampled_from(list(CaptureStatus)), st.just("")),
    st.just(CaptureData(S16_PCM)),
    st.builds(PlaybackState, st.sampled_from(list(StreamStatus)), st.just("")),
    st.just(Position(1, 1, 1, 1)),
)


@settings(max_examples=300)
@given(st.lists(st.tuples(st.booleans(), guest_moves, dom0_moves), max_size=30))
def test_whatever_one_end_may_send_the_other_accepts(
    moves: list[tuple[bool, Event, Event]],
) -> None:
    """Both ends apply the same rules: anything send() lets out is accepted."""
    guest, dom0 = pair()
    for guest_first, guest_event, dom0_event in moves:
        order = [(guest, dom0, guest_event), (dom0, guest, dom0_event)]
        for sender, receiver, event in order if guest_first else reversed(order):
            try:
                wire = sender.send(event)
            except LocalProtocolError:
                continue
            assert receiver.receive_data(wire) == [event]
    assert guest.state is dom0.state is ConnectionState.OPEN
    assert guest.capture_status is dom0.capture_status
    assert guest.playback_status is dom0.playback_status
