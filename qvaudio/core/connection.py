"""The protocol's state machine for one end of a connection. No I/O.

`Connection` wraps the codec with the rules about order: nothing but a hello
(or goodbye) before the handshake, PCM only in a negotiated format and in
whole audio frames, microphone audio only while capture runs, nothing after
goodbye. The same class runs on both ends; `role` says which end. What the
peer does wrong raises `RemoteProtocolError`; what we would do wrong raises
`LocalProtocolError`, before a byte is produced.

Format negotiation, per stream (playback and capture are independent):

    guest: FormatOffer -> pending -> dom0: FormatAccept(one of them) -> active
                                   -> dom0: FormatRefuse(reason)     -> none

The guest may offer again at any time (to change format). Until dom0
answers, the old format stays current, because microphone PCM dom0 sent
before it saw the new offer is still in the old one; the guest itself sends
no playback PCM while its offer is pending.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from qvaudio.core.codec import Decoder, encode
from qvaudio.core.events import (
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    SENDERS,
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
    ProtocolError,
    RemoteProtocolError,
    Role,
    StreamKind,
    StreamStatus,
    clip_reason,
)
from qvaudio.core.formats import AudioFormat


class ConnectionState(enum.Enum):
    HANDSHAKE = "handshake"  # waiting for one or both hellos
    OPEN = "open"
    CLOSED = "closed"  # a goodbye went one way or the other
    FAILED = "failed"  # the peer broke the protocol


@dataclass(slots=True)
class StreamNegotiation:
    """Where one direction's format negotiation stands."""

    format: AudioFormat | None = None
    offered: tuple[AudioFormat, ...] = ()
    pending: bool = False

    def offer(self, formats: tuple[AudioFormat, ...]) -> None:
        self.offered = formats
        self.pending = True

    def settle(self, fmt: AudioFormat | None) -> None:
        self.format = fmt
        self.pending = False


class Connection:
    """One end of a qvaudio connection, driven by bytes and events."""

    def __init__(
        self,
        role: Role,
        *,
        max_version: int = PROTOCOL_VERSION,
        min_version: int = MIN_PROTOCOL_VERSION,
    ) -> None:
        self.role = role
        self.max_version = max_version
        self.min_version = min_version
        self.state = ConnectionState.HANDSHAKE
        self.version: int | None = None
        self.capture_status = CaptureStatus.STOPPED
        #: dom0 may stop playback after agreeing its format (a live policy change).
        self.playback_status = StreamStatus.RUNNING
        self.corked = False
        self.goodbye_received: Goodbye | None = None
        self._decoder = Decoder(role.peer)
        self._hello_sent = False
        self._hello_received = False
        self._streams = {kind: StreamNegotiation() for kind in StreamKind}
        #: Size of the last playback PCM frame if it was under 1 ms: then the
        #: next playback frame must not be PCM.
        self._short_pcm: int | None = None

    # -- queries ---------------------------------------------------------------

    def stream(self, kind: StreamKind) -> StreamNegotiation:
        return self._streams[kind]

    def format(self, kind: StreamKind) -> AudioFormat | None:
        """The current format of a stream, or None while none is agreed."""
        return self._streams[kind].format

    @property
    def buffered(self) -> int:
        return self._decoder.buffered

    # -- receiving -------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes from the peer; returns the events they complete.

        Raises RemoteProtocolError on anything malformed or out of order and
        stays failed afterwards.
        """
        if self.state is ConnectionState.FAILED:
            raise RemoteProtocolError("connection already failed")
        events: list[Event] = []
        try:
            self._decoder.push(data)
            # One frame at a time: the first wrong one stops the work at once,
            # however many a hostile peer packed behind it.
            while (event := self._decoder.next_event()) is not None:
                self._process_received(event)
                events.append(event)
        except RemoteProtocolError as exc:
            self._decoder.fail(exc)
            self.state = ConnectionState.FAILED
            raise
        return events

    def _process_received(self, event: Event) -> None:
        if self.state is ConnectionState.CLOSED:
            raise RemoteProtocolError(f"{type(event).__name__} after goodbye")
        if isinstance(event, Goodbye):
            self.goodbye_received = event
            self.state = ConnectionState.CLOSED
            return
        if isinstance(event, Hello):
            self._receive_hello(event)
            return
        if not self._hello_received:
            raise RemoteProtocolError(f"{type(event).__name__} before hello")
        self._apply(event, sender=self.role.peer, error=RemoteProtocolError)

    def _receive_hello(self, hello: Hello) -> None:
        if self._hello_received:
            raise RemoteProtocolError("second hello")
        if hello.version < self.min_version:
            raise RemoteProtocolError(
                f"peer speaks protocol version {hello.version}, "
                f"we need {self.min_version} to {self.max_version}",
                GoodbyeCode.VERSION_UNSUPPORTED,
            )
        self._hello_received = True
        self.version = min(hello.version, self.max_version)
        if self._hello_sent:
            self.state = ConnectionState.OPEN

    # -- sending ---------------------------------------------------------------

    def send(self, event: Event) -> bytes:
        """Check that `event` may be sent now, update state, return its bytes."""
        if self.state in (ConnectionState.CLOSED, ConnectionState.FAILED) and not isinstance(
            event, Goodbye
        ):
            raise LocalProtocolError(f"cannot send {type(event).__name__}: connection closed")
        if self.role not in SENDERS[event.frame_type]:
            raise LocalProtocolError(f"the {self.role.value} may not send {type(event).__name__}")
        data = encode(event)
        if isinstance(event, Goodbye):
            if self.state is not ConnectionState.FAILED:
                self.state = ConnectionState.CLOSED
            return data
        if isinstance(event, Hello):
            if self._hello_sent:
                raise LocalProtocolError("hello already sent")
            self._hello_sent = True
            if self._hello_received:
                self.state = ConnectionState.OPEN
            return data
        if not self._hello_sent:
            raise LocalProtocolError(f"cannot send {type(event).__name__} before hello")
        self._apply(event, sender=self.role, error=LocalProtocolError)
        return data

    def abandon(self) -> None:
        """Its owner is done with it without a goodbye (the transport is gone):
        nothing more may be sent or received. A failed connection stays failed."""
        if self.state is not ConnectionState.FAILED:
            self.state = ConnectionState.CLOSED

    def goodbye_for(self, exc: ProtocolError) -> bytes:
        """The goodbye frame to send after `exc`, naming its reason."""
        return self.send(Goodbye(exc.code, clip_reason(str(exc))))

    # -- rules shared by both directions -------------------------------------------

    def _apply(self, event: Event, *, sender: Role, error: type[ProtocolError]) -> None:
        """Apply `event`, sent by `sender`, or raise `error` if it is out of order."""
        match event:
            case FormatOffer(stream=kind, formats=formats):
                negotiation = self._streams[kind]
                if negotiation.pending:
                    raise error(f"{kind.name.lower()} format offer while one is pending")
                negotiation.offer(formats)
                if kind is StreamKind.PLAYBACK:
                    self._short_pcm = None
            case FormatAccept(stream=kind, format=fmt):
                negotiation = self._expect_pending(kind, error)
                if fmt not in negotiation.offered:
                    raise error(f"accepted {kind.name.lower()} format {fmt} was not offered")
                negotiation.settle(fmt)
                if kind is StreamKind.PLAYBACK:
                    self.playback_status = StreamStatus.RUNNING
            case FormatRefuse(stream=kind):
                self._expect_pending(kind, error)
                self._streams[kind].settle(None)
                if kind is StreamKind.CAPTURE:
                    self.capture_status = CaptureStatus.STOPPED
            case PlaybackData(pcm=pcm):
                negotiation = self._streams[StreamKind.PLAYBACK]
                # The guest both offers and sends playback, so in its view and
                # ours alike no PCM may follow an unanswered offer.
                if negotiation.pending:
                    raise error("playback PCM while a format offer is pending")
                # PCM already in flight when dom0 stopped playback is fine to
                # receive; the guest itself stops sending once it knows.
                if sender is self.role and self.playback_status is not StreamStatus.RUNNING:
                    status = self.playback_status.name.lower()
                    raise error(f"playback PCM while playback is {status}")
                self._check_pcm(StreamKind.PLAYBACK, pcm, error)
                self._check_pcm_length(pcm, error)
            case CaptureData(pcm=pcm):
                if sender is self.role and self._streams[StreamKind.CAPTURE].pending:
                    raise error("capture PCM while the guest's format offer is unanswered")
                if self.capture_status is not CaptureStatus.RUNNING:
                    raise error("capture PCM while capture is not running")
                self._check_pcm(StreamKind.CAPTURE, pcm, error)
            case CaptureState(status=status):
                if status is CaptureStatus.RUNNING and self.format(StreamKind.CAPTURE) is None:
                    raise error("capture running without an agreed capture format")
                self.capture_status = status
            case PlaybackState(status=status):
                if self.format(StreamKind.PLAYBACK) is None:
                    raise error("playback state without an agreed playback format")
                self.playback_status = status
            case Cork(corked=corked):
                self.corked = corked
                self._short_pcm = None
            case CaptureRequest() | Position():
                pass
            case _:
                raise error(f"unexpected {type(event).__name__}")

    def _check_pcm_length(self, pcm: bytes, error: type[ProtocolError]) -> None:
        """Playback PCM carries at least 1 ms of audio, but for the last frame before a
        cork or a new offer (docs/protocol.md): the receiver's work per frame is
        then bounded per second of audio, whatever the sender packs."""
        if self._short_pcm is not None:
            raise error(
                f"playback PCM frame of {self._short_pcm} bytes (under 1 ms of audio) "
                "was not the last before a cork or a format offer"
            )
        fmt = self._streams[StreamKind.PLAYBACK].format
        assert fmt is not None  # _check_pcm made sure
        if len(pcm) < fmt.min_pcm_bytes:
            self._short_pcm = len(pcm)

    def _expect_pending(self, kind: StreamKind, error: type[ProtocolError]) -> StreamNegotiation:
        negotiation = self._streams[kind]
        if not negotiation.pending:
            raise error(f"{kind.name.lower()} format answer without an offer")
        return negotiation

    def _check_pcm(self, kind: StreamKind, pcm: bytes, error: type[ProtocolError]) -> None:
        fmt = self._streams[kind].format
        if fmt is None:
            raise error(f"{kind.name.lower()} PCM before a format was agreed")
        if len(pcm) % fmt.frame_size:
            raise error(
                f"{kind.name.lower()} PCM of {len(pcm)} bytes is not whole frames "
                f"of {fmt.frame_size} bytes"
            )
