"""Xen vchan transport: the guest publishes a vchan server, dom0 connects as client.

The guest is the server, as in Qubes: it grants its own memory and dom0 maps
it, so dom0 never has to offer pages to a guest. The ring is published at
``/local/domain/<guest>/data/vchan/<peer>/<port>`` and only ``<peer>`` (0 =
dom0) may map it.
"""

from __future__ import annotations

import logging
import os
import selectors
from collections.abc import Callable
from typing import Final

from qvaudio.core.xen import XENBUS_PATH, vchan_path
from qvaudio.transport.base import (
    Listener,
    PeerUnavailable,
    Stream,
    StreamClosed,
    StreamState,
    TransportError,
    TransportUnavailable,
)
from qvaudio.vchan import (
    LibraryNotFoundError,
    Vchan,
    VchanClosedError,
    VchanError,
    VchanPeerNotFoundError,
    VchanState,
    XenUnavailableError,
)

log = logging.getLogger(__name__)

#: Each direction; audio at 48 kHz, 16 bit, stereo fills 64 KiB in ~340 ms.
DEFAULT_RING_SIZE: Final = 65536

_STATES: Final = {
    VchanState.CONNECTED: StreamState.CONNECTED,
    VchanState.WAITING_FOR_PEER: StreamState.WAITING,
    VchanState.CLOSED: StreamState.CLOSED,
}


def _as_transport_error(exc: VchanError, address: str) -> TransportError:
    message = f"{address}: {exc.strerror}"
    if isinstance(exc, LibraryNotFoundError | XenUnavailableError):
        return TransportUnavailable(message, exc.hint)
    if isinstance(exc, VchanPeerNotFoundError):
        return PeerUnavailable(message, exc.hint)
    if isinstance(exc, VchanClosedError):
        return StreamClosed(message, exc.hint)
    return TransportError(message, exc.hint)


def own_domid() -> int:
    """This domain's id, read from XenStore over the guest's xenbus device."""
    hint = "not running in a Xen domain; pass self_domid to skip this lookup"
    if not os.path.exists(XENBUS_PATH):
        raise TransportUnavailable(f"cannot find our domain id: no {XENBUS_PATH}", hint)
    from pyxs import Client  # imported late: only guests on Xen need it

    try:
        with Client(xen_bus_path=XENBUS_PATH) as client:
            value = client.read(b"domid")
        return int(value)
    except Exception as exc:  # pyxs raises its own types as well as OSError
        raise TransportUnavailable(f"cannot read our domain id from XenStore: {exc}", hint) from exc


class XenStream(Stream):
    """A `Stream` over a connected (or, for a server, connecting) `Vchan`."""

    def __init__(self, vchan: Vchan, address: str) -> None:
        super().__init__(address)
        self._vchan = vchan

    def _fail(self, exc: VchanError) -> TransportError:
        return _as_transport_error(exc, self.address)

    def fileno(self) -> int:
        try:
            return self._vchan.fileno()
        except VchanError as exc:
            raise self._fail(exc) from exc

    def handle_wakeup(self) -> None:
        """Consume the event-channel notification, without blocking if there is none."""
        try:
            self._vchan.wait_if_pending()
        except VchanError as exc:
            raise self._fail(exc) from exc

    @property
    def state(self) -> StreamState:
        return _STATES[self._vchan.state]

    def read(self, max_bytes: int) -> bytes:
        try:
            return self._vchan.read(max_bytes)
        except VchanError as exc:
            raise self._fail(exc) from exc

    def write(self, data: bytes | bytearray | memoryview) -> int:
        try:
            return self._vchan.write(data)
        except VchanError as exc:
            raise self._fail(exc) from exc

    def data_ready(self) -> int:
        try:
            return self._vchan.data_ready()
        except VchanError as exc:
            raise self._fail(exc) from exc

    def buffer_space(self) -> int:
        try:
            return self._vchan.buffer_space()
        except VchanError as exc:
            raise self._fail(exc) from exc

    def poll_events(self, want_write: bool) -> int:
        # One event fd signals data and freed space alike, always as readable.
        return selectors.EVENT_READ

    def close(self) -> None:
        self._vchan.close()


class XenListener(Listener):
    """Keeps one vchan server published; each connected client becomes a stream.

    After a client connects, its server object becomes the stream and a new
    server is published at the same path for the next connection (dom0 agent
    restart). So `fileno` changes whenever `accept` found the peer had come,
    including when it returned None because the peer had already left:
    compare `fileno` after each `accept` and re-register if it changed.
    """

    def __init__(self, address: str, make_server: Callable[[], Vchan]) -> None:
        super().__init__(address)
        self._make_server = make_server
        self._closed = False
        self._server: Vchan | None = None
        self._publish()

    def _publish(self) -> Vchan:
        if self._closed:
            raise TransportError(f"{self.address}: listener was closed")
        if self._server is None:
            try:
                self._server = self._make_server()
            except VchanError as exc:
                raise _as_transport_error(exc, self.address) from exc
        return self._server

    def fileno(self) -> int:
        try:
            return self._publish().fileno()
        except VchanError as exc:
            raise _as_transport_error(exc, self.address) from exc

    def accept(self) -> Stream | None:
        server = self._publish()
        try:
            # The peer may already have written: its connect and its first
            # write share one pending event, and libxenvchan notifies a write
            # only once until the reader reads again. Consuming that event here
            # would strand those bytes with nothing left to wake the stream
            # (seen on real Xen when dom0 connects the instant we publish). So
            # the event is consumed only while nobody is connected, and the
            # stream inherits it otherwise.
            state = server.state
            if state is VchanState.WAITING_FOR_PEER:
                server.wait_if_pending()
                state = server.state
                if state is VchanState.WAITING_FOR_PEER:
                    return None
                if state is VchanState.CONNECTED:
                    # Connected between the two looks (a tiny window): the
                    # event is gone, so at least re-arm the write notification
                    # (data_ready does); bytes already there are read with the
                    # peer's next write.
                    server.data_ready()
            self._server = None
            if state is VchanState.CONNECTED:
                # This connection must not delete the entries of the next server.
                server.disown_xs_path()
        except VchanError as exc:
            raise _as_transport_error(exc, self.address) from exc
        self._republish()
        if state is VchanState.CLOSED:
            log.info("%s: peer connected and left before accept", self)
            server.close()
            return None
        log.info("%s: peer connected", self)
        return XenStream(server, self.address)

    def _republish(self) -> None:
        try:
            self._publish()
        except TransportError as exc:
            # The next accept() or fileno() retries; keep what we have meanwhile.
            log.warning("%s: cannot publish the next server yet: %s", self, exc)

    def close(self) -> None:
        self._closed = True
        server, self._server = self._server, None
        if server is not None:
            server.close()


def listen_xen(
    peer_domid: int,
    port: int,
    *,
    self_domid: int | None = None,
    read_min: int = DEFAULT_RING_SIZE,
    write_min: int = DEFAULT_RING_SIZE,
) -> Listener:
    """Publish a vchan server that domain ``peer_domid`` may connect to."""
    if self_domid is None:
        self_domid = own_domid()
    path = vchan_path(self_domid, peer_domid, port)

    def make_server() -> Vchan:
        return Vchan.server(peer_domid, path, read_min=read_min, write_min=write_min)

    return XenListener(f"xen:{peer_domid}:{port}", make_server)


def connect_xen(domid: int, port: int, *, self_domid: int = 0) -> Stream:
    """Connect to the vchan server that guest ``domid`` published for us."""
    address = f"xen:{domid}:{port}"
    try:
        vchan = Vchan.client(domid, port=port, self_domid=self_domid)
    except VchanError as exc:
        raise _as_transport_error(exc, address) from exc
    return XenStream(vchan, address)
