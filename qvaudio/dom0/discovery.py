"""Where dom0 finds VMs to serve, and who they are.

Every source answers the same question, `targets()`: VM name -> how to reach
it and its identity. The identity always comes from dom0's side (XenStore
nodes the toolstack owns, the name of a socket file in a directory dom0
controls, dom0's own vsock map), never from what a guest sends.

`epoch` changes when a guest re-publishes its endpoint (a new vchan ring, a
new socket), so the agent reconnects at once instead of waiting out a
back-off.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from qvaudio.core.domains import (
    DomainAdded,
    DomainRemoved,
    DomainUpdated,
    InvalidName,
    VchanPublished,
    validate_name,
)
from qvaudio.core.policy import VmIdentity
from qvaudio.dom0.xenstore import XenStore, XenStoreError
from qvaudio.dom0.xenstore_watch import DomainWatcher
from qvaudio.transport import Address, UnixAddress, VsockAddress, XenAddress

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Target:
    identity: VmIdentity
    address: Address
    epoch: object = None
    label: str | None = None
    #: Where the identity came from, for status and logs.
    origin: str = ""


class Discovery(Protocol):
    def fileno(self) -> int | None: ...
    def refresh(self) -> None: ...
    def targets(self) -> dict[str, Target]: ...
    def close(self) -> None: ...


class UnixDirDiscovery:
    """A directory of sockets, one per VM, each named after its VM.

    For running both agents on one machine (tests, the demo, local use). The
    directory should be writable only by the user running dom0's agent, since
    whoever can create a socket there can claim its name.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._targets: dict[str, Target] = {}
        self._warned: set[str] = set()

    def fileno(self) -> int | None:
        return None

    def refresh(self) -> None:
        found: dict[str, Target] = {}
        #: Names per socket (device, inode): a socket is one VM, whatever its links.
        names_of: dict[tuple[int, int], list[str]] = {}
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            entries = []
        except OSError as exc:
            log.warning("cannot read %s: %s", self.directory, exc.strerror)
            entries = []
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISSOCK(info.st_mode):
                continue
            try:
                name = validate_name(entry.name.encode("utf-8", "surrogateescape"))
            except InvalidName as exc:
                if entry.name not in self._warned:
                    self._warned.add(entry.name)
                    log.warning("ignoring socket %s: %s", entry.path, exc)
                continue
            found[name] = Target(
                identity=VmIdentity(name),
                address=UnixAddress(entry.path),
                epoch=(info.st_ino, info.st_mtime_ns),
                origin=f"socket {entry.path}",
            )
            names_of.setdefault((info.st_dev, info.st_ino), []).append(name)
        for names in names_of.values():
            if len(names) < 2:
                continue
            # Hard links: one guest under several names, so under whichever
            # rule each name matches. Which name is the VM's cannot be told.
            key = "\0".join(sorted(names))
            if key not in self._warned:
                self._warned.add(key)
                log.warning("ignoring sockets %s in %s: they are one socket (hard links), "
                            "so no name of it can be trusted", ", ".join(sorted(names)),
                            self.directory)  # fmt: skip
            for name in names:
                del found[name]
        self._targets = found

    def targets(self) -> dict[str, Target]:
        return self._targets

    def close(self) -> None:
        self._targets = {}


class VsockDiscovery:
    """KVM guests: dom0's own map of VM name to CID (the host assigns CIDs)."""

    def __init__(self, cids: dict[str, int], port: int) -> None:
        self._targets = {
            name: Target(VmIdentity(name), VsockAddress(cid, port), origin=f"vsock CID {cid}")
            for name, cid in cids.items()
        }

    def fileno(self) -> int | None:
        return None

    def refresh(self) -> None:
        pass

    def targets(self) -> dict[str, Target]:
        return self._targets

    def close(self) -> None:
        pass


class XenDiscovery:
    """Xen domains from XenStore: names and tags from toolstack-owned nodes,
    endpoints from the vchan each guest agent publishes.

    If xenstored is not reachable the agent keeps running and retries, so that
    starting before xenstored (or after it restarts) heals by itself.
    """

    def __init__(self, port: int, socket_path: str | None = None) -> None:
        self.port = port
        self._socket_path = socket_path
        self._store: XenStore | None = None
        self._watcher: DomainWatcher | None = None
        self._targets: dict[str, Target] = {}
        self._failed_logged = False

    def fileno(self) -> int | None:
        return self._watcher.fileno() if self._watcher is not None else None

    def refresh(self) -> None:
        if self._watcher is None:
            self._connect()
            if self._watcher is None:
                return
        try:
            events = self._watcher.drain()
        except XenStoreError as exc:
            log.warning("lost XenStore: %s (reconnecting)", exc)
            self.close()
            return
        for event in events:
            match event:
                case DomainAdded(vm=vm) | DomainUpdated(vm=vm):
                    log.info("domain %d is %r", vm.domid, vm.name)
                case DomainRemoved(domid=domid):
                    log.info("domain %d went away", domid)
                case VchanPublished(domid=domid):
                    log.debug("domain %d published its vchan", domid)
        snapshot = self._watcher.snapshot
        targets: dict[str, Target] = {}
        for domid, vm in snapshot.domains.items():
            signature = snapshot.vchans.get((domid, self.port))
            if signature is None:
                continue
            targets[vm.name] = Target(
                identity=VmIdentity(vm.name, vm.tags),
                address=XenAddress(domid, self.port),
                epoch=(domid, signature),
                label=vm.label,
                origin=f"Xen domain {domid}",
            )
        self._targets = targets

    def _connect(self) -> None:
        try:
            self._store = XenStore(self._socket_path)
            self._watcher = DomainWatcher(self._store, ports=(self.port,))
            self._watcher.start()
        except XenStoreError as exc:
            if not self._failed_logged:
                log.error("XenStore unavailable: %s (will keep trying)", exc)
                self._failed_logged = True
            self.close()
            return
        self._failed_logged = False
        log.info("watching XenStore for domains and their vchans (port %d)", self.port)

    def targets(self) -> dict[str, Target]:
        return self._targets

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        if self._store is not None:
            self._store.close()
            self._store = None
        self._targets = {}
