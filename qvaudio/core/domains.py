"""Who a Xen domain is, as dom0's XenStore says: the pure half of XenStore handling. No I/O.

The dom0 agent knows a VM only by its Xen domain and by what the toolstack
wrote about it; nothing here trusts a value a guest could have written.
Names are validated, because a name is what policy matches and what the host
mixer shows; tags and labels likewise. A `Snapshot` is what XenStore said at
one moment, and `diff_snapshots` turns two of them into events. The I/O
(reading xenstored, watches) is `qvaudio.dom0.xenstore`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from qvaudio.core.errors import QvaudioError
from qvaudio.core.xen import DOM0, MAX_DOMID, vchan_path

# The toolstack writes identity nodes from dom0; a node owned by anyone else
# was written (or re-owned) by a guest and cannot vouch for identity.
TOOLSTACK_DOMID: Final = DOM0

MAX_NAME_LEN: Final = 64
MAX_TAGS: Final = 64

# Stricter than "printable": names end up in policy files, mixer UIs and log
# lines, so no spaces, no shell/glob/policy metacharacters, no non-ASCII
# look-alikes. Qubes' own rule is a subset (letter first, at most 31 chars).
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# A guest must never pass for the control domain in policy or in the mixer.
_RESERVED_NAMES: Final = frozenset({"dom0", "domain-0"})
_TAG_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_LABEL_RE: Final = re.compile(r"[a-z][a-z0-9_-]{0,31}")
_DOMID_RE: Final = re.compile(rb"0|[1-9][0-9]{0,4}")
_UINT_RE: Final = re.compile(rb"[0-9]{1,10}")
# pyxs (and xenstored) accept only these characters in paths.
_PATH_RE: Final = re.compile(r"/[A-Za-z0-9_@/-]*")


class InvalidName(QvaudioError, ValueError):
    """A domain name that must not be used for policy or display."""


def validate_name(raw: bytes) -> str:
    """Return `raw` as a name fit for policy and the mixer, or raise InvalidName."""
    if not raw:
        raise InvalidName("empty")
    if len(raw) > MAX_NAME_LEN:
        raise InvalidName(f"longer than {MAX_NAME_LEN} bytes")
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidName("not ASCII") from None
    if not _NAME_RE.fullmatch(name):
        raise InvalidName("only letters, digits and '_.-' allowed, starting alphanumeric")
    if name.lower() in _RESERVED_NAMES:
        raise InvalidName("reserved for the control domain")
    return name


def parse_tags(raw: bytes) -> frozenset[str]:
    """Whitespace-separated tag list; raises ValueError if any tag is malformed."""
    try:
        words = raw.decode("ascii").split()
    except UnicodeDecodeError:
        raise ValueError("tags not ASCII") from None
    if len(words) > MAX_TAGS:
        raise ValueError(f"more than {MAX_TAGS} tags")
    bad = [w for w in words if not _TAG_RE.fullmatch(w)]
    if bad:
        raise ValueError(f"malformed tag {bad[0]!r}")
    return frozenset(words)


def parse_label(raw: bytes) -> str:
    """A label colour name such as 'red'; raises ValueError otherwise."""
    text = raw.decode("ascii", errors="replace")
    if not _LABEL_RE.fullmatch(text):
        raise ValueError(f"malformed label {text!r}")
    return text


def parse_domid(raw: bytes) -> int | None:
    """A child name of /local/domain as a guest-range domid, else None."""
    if not _DOMID_RE.fullmatch(raw):
        return None
    domid = int(raw)
    return domid if domid <= MAX_DOMID else None


def parse_owner(perms: list[bytes]) -> int | None:
    """Owner domid from a XenStore permission list (first entry, e.g. b'n0')."""
    if not perms or len(perms[0]) < 2 or perms[0][:1] not in b"nrwb":
        return None
    return int(perms[0][1:]) if _UINT_RE.fullmatch(perms[0][1:]) else None


def parse_vchan_signature(ring_ref: bytes, event_channel: bytes) -> tuple[int, int] | None:
    """A published vchan's (ring-ref, event-channel), or None if either is malformed.

    A changed pair means the guest published a new ring (a re-publish)."""
    if not (_UINT_RE.fullmatch(ring_ref) and _UINT_RE.fullmatch(event_channel)):
        return None
    return int(ring_ref), int(event_channel)


@dataclass(frozen=True)
class VmInfo:
    """A guest domain as the toolstack describes it."""

    domid: int
    name: str
    tags: frozenset[str] = frozenset()
    label: str | None = None

    def __post_init__(self) -> None:
        # Constructing a VmInfo is the proof that the name was checked.
        validate_name(self.name.encode("ascii", errors="replace"))
        if not 0 < self.domid <= MAX_DOMID:
            raise ValueError(f"domid {self.domid} is not a guest domain")

    def vchan_path(self, port: int, client_domid: int = 0) -> str:
        return vchan_path(self.domid, client_domid, port)


@dataclass(frozen=True)
class MetadataLayout:
    """Where optional VM metadata lives; `{domid}` is substituted, None disables.

    Qubes keeps tags and labels in qubesd (Admin API), not in XenStore, so there
    is nothing standard to read: a dom0 hook may publish them here. Both nodes
    must be owned by the toolstack domain; nodes under /local/domain/<id> that
    dom0 creates are read-only to the guest by default.
    """

    tags: str | None = "/local/domain/{domid}/qvaudio/tags"
    label: str | None = "/local/domain/{domid}/qvaudio/label"

    def __post_init__(self) -> None:
        for template in (self.tags, self.label):
            if template is not None and not _PATH_RE.fullmatch(template.format(domid=1)):
                raise ValueError(f"not a usable XenStore path template: {template!r}")


@dataclass(frozen=True)
class Snapshot:
    """What XenStore said at one moment; compared by `diff_snapshots`."""

    domains: Mapping[int, VmInfo] = field(default_factory=dict)
    # (domid, port) -> (ring-ref, event-channel): a changed pair is a re-publish.
    vchans: Mapping[tuple[int, int], tuple[int, int]] = field(default_factory=dict)
    # Introduced guest domains, usable or not: the watcher follows their nodes
    # so a name written late, or fixed, is noticed.
    present: frozenset[int] = frozenset()


@dataclass(frozen=True)
class DomainAdded:
    vm: VmInfo


@dataclass(frozen=True)
class DomainRemoved:
    domid: int


@dataclass(frozen=True)
class DomainUpdated:
    """Same domain and name, new tags or label: re-evaluate policy."""

    vm: VmInfo


@dataclass(frozen=True)
class VchanPublished:
    domid: int
    port: int


DomainEvent = DomainAdded | DomainRemoved | DomainUpdated | VchanPublished


def diff_snapshots(old: Snapshot, new: Snapshot) -> list[DomainEvent]:
    """Events that turn `old` into `new`: removals, then additions, then vchans.

    A domid whose name changed is a different VM (ids are reused), so it is
    removed and added again, and its published vchans are announced afresh.
    """
    events: list[DomainEvent] = []
    fresh: set[int] = set()
    for domid in sorted(old.domains):
        now = new.domains.get(domid)
        if now is None or now.name != old.domains[domid].name:
            events.append(DomainRemoved(domid))
    for domid in sorted(new.domains):
        vm, before = new.domains[domid], old.domains.get(domid)
        if before is None or before.name != vm.name:
            events.append(DomainAdded(vm))
            fresh.add(domid)
        elif before != vm:
            events.append(DomainUpdated(vm))
    for key in sorted(new.vchans):
        domid, port = key
        if domid in new.domains and (domid in fresh or old.vchans.get(key) != new.vchans[key]):
            events.append(VchanPublished(domid, port))
    return events
