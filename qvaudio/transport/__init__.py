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

import re
from dataclasses import dataclass
from typing import Any, Final

from qvaudio.core.xen import MAX_DOMID
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

#: qvaudio's vchan port; Qubes's audio uses 4713/4714, so both can coexist.
DEFAULT_PORT: Final = 4790
MAX_XEN_PORT: Final = 65535
MAX_VSOCK: Final = 0xFFFFFFFE  # 0xFFFFFFFF is the "any" wildcard for CIDs and ports
UNIX_PATH_MAX: Final = 107  # sun_path is 108 bytes including the NUL

#: Every form `parse_address` accepts, for its errors and the guest's help
#: (only the guest names its peer with an address; dom0 finds its VMs).
GUEST_FORMS: Final = "xen:DOMID[:PORT], vsock:CID:PORT, unix:PATH or qrexec:[TARGET[:SERVICE]]"
FORMS: Final = GUEST_FORMS


@dataclass(frozen=True)
class XenAddress:
    domid: int
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        return f"xen:{self.domid}:{self.port}"


@dataclass(frozen=True)
class VsockAddress:
    cid: int
    port: int

    def __str__(self) -> str:
        return f"vsock:{self.cid}:{self.port}"


@dataclass(frozen=True)
class UnixAddress:
    path: str

    def __str__(self) -> str:
        return f"unix:{self.path}"


@dataclass(frozen=True)
class QrexecAddress:
    target: str = "@default"
    service: str = "qvaudio.Audio"

    def __str__(self) -> str:
        return f"qrexec:{self.target}:{self.service}"


Address = XenAddress | VsockAddress | UnixAddress | QrexecAddress

_NUMBER = re.compile(r"[0-9]+")
# qrexec targets (VM names or @keywords such as @default) and service names.
_QREXEC_TARGET = re.compile(r"@?[A-Za-z][A-Za-z0-9_.\-]{0,30}")
_QREXEC_SERVICE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def _number(text: str, what: str, low: int, high: int, original: str) -> int:
    if not _NUMBER.fullmatch(text):
        raise ValueError(f"bad address {original!r}: {what} must be a decimal number ({FORMS})")
    value = int(text)
    if not low <= value <= high:
        raise ValueError(f"bad address {original!r}: {what} must be {low}..{high}")
    return value


def parse_address(text: str) -> Address:
    """Parse one of GUEST_FORMS; ValueError if bad."""
    scheme, sep, rest = text.partition(":")
    if not sep:
        raise ValueError(f"bad address {text!r}: expected {FORMS}")
    if scheme == "unix":
        if not rest or "\0" in rest:
            raise ValueError(f"bad address {text!r}: unix:PATH needs a path")
        if len(rest.encode()) > UNIX_PATH_MAX:
            raise ValueError(f"bad address {text!r}: path longer than {UNIX_PATH_MAX} bytes")
        return UnixAddress(rest)
    parts = rest.split(":")
    if scheme == "qrexec" and len(parts) <= 2:
        target = parts[0] or "@default"
        service = parts[1] if len(parts) == 2 else "qvaudio.Audio"
        if not _QREXEC_TARGET.fullmatch(target) or not _QREXEC_SERVICE.fullmatch(service):
            raise ValueError(f"bad address {text!r}: expected qrexec:[TARGET[:SERVICE]]")
        return QrexecAddress(target, service)
    if scheme == "xen" and len(parts) in (1, 2):
        domid = _number(parts[0], "DOMID", 0, MAX_DOMID, text)
        if len(parts) == 1:
            return XenAddress(domid)
        return XenAddress(domid, _number(parts[1], "PORT", 0, MAX_XEN_PORT, text))
    if scheme == "vsock" and len(parts) == 2:
        cid = _number(parts[0], "CID", 1, MAX_VSOCK, text)
        return VsockAddress(cid, _number(parts[1], "PORT", 0, MAX_VSOCK, text))
    raise ValueError(f"bad address {text!r}: expected {FORMS}")


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
