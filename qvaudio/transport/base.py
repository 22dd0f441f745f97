"""The one stream interface the agents use, whatever carries the bytes.

Everything is non-blocking and meant for a `selectors` loop:

    sel.register(stream.fileno(), stream.poll_events(want_write), stream)
    ... when the fd is ready:
    stream.handle_wakeup()          # always first: vchan must consume its event
    data = stream.read(65536)       # b"" = nothing now; StreamClosed = gone
    n = stream.write(pending)       # partial; 0 = full, try after the next wakeup

A vchan has a single event fd that signals "data arrived" as well as "space
freed", which is why `poll_events` exists: sockets need EVENT_WRITE to hear
about space, a vchan hears about it through EVENT_READ.
"""

from __future__ import annotations

import abc
import enum
from typing import Generic, Protocol, TypeVar

from qvaudio.common.closing import Closing
from qvaudio.core.errors import QvaudioError


class StreamState(enum.Enum):
    WAITING = "waiting"  # set up, the peer has not connected yet
    CONNECTED = "connected"
    CLOSED = "closed"  # closed here, or the peer went away


class TransportError(QvaudioError):
    """A transport failed; ``hint`` says what a person can do about it."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        message = super().__str__()
        return f"{message} ({self.hint})" if self.hint else message


class StreamClosed(TransportError):
    """The peer went away or the stream ended; or it was closed on this side."""


class TransportUnavailable(TransportError):
    """The mechanism cannot work on this machine (no Xen, vsock refused by the kernel...)."""


class PeerUnavailable(TransportError):
    """The mechanism works but nobody is listening at the address (yet): retry later."""


class Stream(Closing, abc.ABC):
    """A connected, non-blocking byte stream."""

    def __init__(self, address: str) -> None:
        #: Human-readable description of the peer, e.g. ``unix:/run/x.sock``.
        self.address = address

    @abc.abstractmethod
    def fileno(self) -> int:
        """The fd to register with the event loop (see `poll_events`)."""

    @abc.abstractmethod
    def handle_wakeup(self) -> None:
        """Call whenever `fileno` is readable, before reading or writing."""

    @property
    @abc.abstractmethod
    def state(self) -> StreamState: ...

    @abc.abstractmethod
    def read(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` available now; b"" if none. Raises `StreamClosed` at the end."""

    @abc.abstractmethod
    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Queue what fits now; returns the count, 0 when full. Raises `StreamClosed`."""

    @abc.abstractmethod
    def data_ready(self) -> int:
        """Bytes that `read` would return now."""

    @abc.abstractmethod
    def buffer_space(self) -> int:
        """Bytes that `write` would accept now (an estimate for sockets)."""

    @abc.abstractmethod
    def poll_events(self, want_write: bool) -> int:
        """The `selectors` event mask to register `fileno` with."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close; calling it again does nothing. Later I/O raises `StreamClosed`."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.address} {self.state.value}>"


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


H = TypeVar("H", bound=_HasFileno)


class LevelTriggeredStream(Stream, Generic[H]):
    """A stream over one level-triggered handle (a socket, an epoll over pipes).

    Nothing is consumed when it wakes; it is closed on this side once its
    handle is gone, and at its end once `_gone` said so.
    """

    #: What a person can do about a peer that went away (the `StreamClosed` hint).
    GONE_HINT = "the peer agent stopped or restarted"

    def __init__(self, address: str, handle: H) -> None:
        super().__init__(address)
        self._handle: H | None = handle
        self._eof = False

    def _live(self) -> H:
        if self._handle is None:
            raise StreamClosed(f"{self.address}: stream was closed on this side")
        return self._handle

    def _gone(self, why: str) -> StreamClosed:
        self._eof = True
        return StreamClosed(f"{self.address}: {why}", self.GONE_HINT)

    def fileno(self) -> int:
        return self._live().fileno()

    def handle_wakeup(self) -> None:
        """Nothing to consume: readiness is level-triggered."""


class Listener(Closing, abc.ABC):
    """Waits for the peer to connect; the guest side."""

    def __init__(self, address: str) -> None:
        self.address = address

    @abc.abstractmethod
    def fileno(self) -> int:
        """The fd to watch for readability.

        It may change after any `accept` call (the vchan listener publishes a
        fresh server for the next peer, and the old fd goes with the old
        server): compare it after each `accept` and re-register if it changed.
        """

    @abc.abstractmethod
    def accept(self) -> Stream | None:
        """A newly connected stream, or None if nobody (acceptable) connected."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop listening (idempotent). Streams already accepted stay open."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.address}>"
