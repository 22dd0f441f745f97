"""Transports between the guest agent and the dom0 agent.

Addresses name the *peer* and are the same strings on both sides' command
lines:

    xen:DOMID[:PORT]   Xen vchan. Guest: DOMID is the peer allowed in (0 = dom0).
                       dom0: DOMID is the guest to connect to.
    vsock:CID:PORT     AF_VSOCK. Guest: CID is the only peer accepted (2 = host).
                       dom0/host: CID is the guest to connect to.
    unix:PATH          AF_UNIX socket at PATH (tests and local demos).
    qrexec:[TARGET[:SERVICE]]
                       Qubes qrexec, guest only: the guest calls SERVICE
                       (qvaudio.Audio) in TARGET (@default, i.e. dom0).

The guest always listens (`listen`) and dom0 always connects (`connect`),
except over qrexec, where the guest places the call (its `listen` returns a
dialer with the same interface) and dom0 receives it through a
`qvaudio.transport.qrexec.HandoffListener`.
"""

from __future__ import annotations

from typing import Any

from qvaudio.transport.addresses import (
    DEFAULT_PORT,
    GUEST_FORMS,
    Address,
    QrexecAddress,
    UnixAddress,
    VsockAddress,
    XenAddress,
    parse_address,
)
from qvaudio.transport.base import (
    Listener,
    PeerUnavailable,
    Stream,
    StreamClosed,
    StreamState,
    TransportError,
    TransportUnavailable,
)

__all__ = [
    "DEFAULT_PORT",
    "GUEST_FORMS",
    "Address",
    "Listener",
    "PeerUnavailable",
    "QrexecAddress",
    "Stream",
    "StreamClosed",
    "StreamState",
    "TransportError",
    "TransportUnavailable",
    "UnixAddress",
    "VsockAddress",
    "XenAddress",
    "connect",
    "listen",
    "parse_address",
]


def listen(address: Address, **opts: Any) -> Listener:
    """Listen for the peer named by ``address`` (the guest side).

    Options: xen: ``self_domid`` (skips the XenStore lookup), ``read_min``,
    ``write_min``; vsock: ``backlog``; unix: ``mode`` (default 0o600), ``backlog``.
    """
    match address:
        case XenAddress(domid, port):
            from qvaudio.transport.xen import listen_xen

            return listen_xen(domid, port, **opts)
        case VsockAddress(cid, port):
            from qvaudio.transport.sockets import listen_vsock

            return listen_vsock(cid, port, **opts)
        case UnixAddress(path):
            from qvaudio.transport.sockets import listen_unix

            return listen_unix(path, **opts)
        case QrexecAddress(target, service):
            from qvaudio.transport.qrexec import QrexecDialer

            return QrexecDialer(target, service, **opts)
    raise TypeError(f"not an address: {address!r}")


def connect(address: Address, **opts: Any) -> Stream:
    """Connect to the guest named by ``address`` (the dom0 side).

    Options: xen: ``self_domid`` (default 0); vsock: ``connect_timeout`` (seconds).
    Raises `PeerUnavailable` when nobody listens yet, `TransportUnavailable`
    when the mechanism cannot work here.
    """
    match address:
        case XenAddress(domid, port):
            from qvaudio.transport.xen import connect_xen

            return connect_xen(domid, port, **opts)
        case VsockAddress(cid, port):
            from qvaudio.transport.sockets import connect_vsock

            return connect_vsock(cid, port, **opts)
        case UnixAddress(path):
            from qvaudio.transport.sockets import connect_unix

            return connect_unix(path, **opts)
        case QrexecAddress():
            raise TransportUnavailable(
                f"dom0 cannot call {address}: qrexec calls come from the VM",
                "dom0 receives them through the qvaudio.Audio service handler",
            )
    raise TypeError(f"not an address: {address!r}")
