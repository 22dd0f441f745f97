"""What the agents' command lines and config name: a guest's address of dom0, dom0's VM sources.

Pure parsing, one parser for each kind of text:

* `parse_address`: an address naming the *peer*, the same string on both
  sides (`xen:DOMID[:PORT]`, `vsock:CID:PORT`, `unix:PATH`,
  `qrexec:[TARGET[:SERVICE]]`); the guest's `transport` setting.
* `parse_source`: how dom0 finds the VMs it serves (`xen`, `qrexec`,
  `unix:DIR`, `vsock:NAME=CID,...`); dom0's `transports` setting, whether it
  comes from the config file or a flag.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from qvaudio.core.xen import MAX_DOMID

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


# -- dom0's sources of VMs ---------------------------------------------------------------

#: Every form `parse_source` accepts, for its errors.
SOURCE_FORMS: Final = "xen, qrexec, unix:DIR or vsock:NAME=CID[,NAME=CID...]"


@dataclass(frozen=True)
class XenSource:
    """`xen`: the domains XenStore lists, each reached over the vchan it publishes."""

    def __str__(self) -> str:
        return "xen"


@dataclass(frozen=True)
class QrexecSource:
    """`qrexec`: VMs that call the qvaudio.Audio service (Qubes)."""

    def __str__(self) -> str:
        return "qrexec"


@dataclass(frozen=True)
class UnixDirSource:
    """`unix:DIR`: a directory of sockets, one per VM, each named after its VM."""

    directory: str

    def __str__(self) -> str:
        return f"unix:{self.directory}"


@dataclass(frozen=True)
class VsockSource:
    """`vsock:NAME=CID,...`: dom0's own map of VM names to vsock CIDs (KVM)."""

    cids: Mapping[str, int]

    def __str__(self) -> str:
        return "vsock:" + ",".join(f"{name}={cid}" for name, cid in self.cids.items())


Source = XenSource | QrexecSource | UnixDirSource | VsockSource


def parse_vsock_map(text: str) -> dict[str, int]:
    """`vsock:work=5,media=6`: which CID each VM has (the host's own mapping)."""
    mapping: dict[str, int] = {}
    for item in text.removeprefix("vsock:").split(","):
        name, sep, cid = item.partition("=")
        if not sep or not name or not cid.isdigit() or int(cid) < 3:
            raise ValueError(f"{item!r} is not NAME=CID with CID >= 3")
        mapping[name] = int(cid)
    return mapping


def parse_source(text: str) -> Source:
    """One of SOURCE_FORMS; ValueError saying why not."""
    if text == "xen":
        return XenSource()
    if text == "qrexec":
        return QrexecSource()
    if text.startswith("unix:"):
        return UnixDirSource(text.removeprefix("unix:"))
    if text.startswith("vsock:"):
        return VsockSource(parse_vsock_map(text))
    raise ValueError(f"{text!r} is not {SOURCE_FORMS}")
