"""Which VMs exist, and which have published their vchan, as seen from dom0's XenStore.

The I/O half of XenStore handling: reading xenstored (`XenStore`) and its
watches (`Watch`); turning those into events for the agent's loop is
`qvaudio.dom0.xenstore_watch`. Every identity node (name, tags, label) must
be owned by the toolstack domain; what the values mean, and whether they are
acceptable, is `qvaudio.core.domains` (pure).

pyxs (unmaintained since 2019) is used only inside this module, so it can be
swapped without touching callers.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
from collections import Counter
from collections.abc import Iterable
from typing import Any, Final

import pyxs
import pyxs.exceptions

from qvaudio.common.closing import Closing
from qvaudio.core.domains import (
    TOOLSTACK_DOMID,
    InvalidName,
    MetadataLayout,
    Snapshot,
    VmInfo,
    parse_domid,
    parse_label,
    parse_owner,
    parse_tags,
    parse_vchan_signature,
    validate_name,
)
from qvaudio.core.errors import QvaudioError
from qvaudio.core.xen import XENSTORED_ENV, XENSTORED_SOCKETS, vchan_path

log = logging.getLogger(__name__)


class XenStoreError(QvaudioError):
    """XenStore could not be used; `hint` says what to check."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}: {self.hint}" if self.hint else self.message


_NOT_REACHABLE_HINT: Final = "not in dom0, or xenstored not running"


def default_socket_path() -> str:
    """$XENSTORED_PATH, else the first standard socket that exists."""
    env = os.environ.get(XENSTORED_ENV)
    if env:
        return env
    for path in XENSTORED_SOCKETS:
        if os.path.exists(path):
            return path
    return XENSTORED_SOCKETS[0]


def _errno_of(exc: Exception) -> int | None:
    code = exc.args[0] if exc.args else None
    return code if isinstance(code, int) else None


class XenStore(Closing):
    """A connection to xenstored over its Unix socket (dom0 only).

    Safe to share between threads as long as nobody starts a transaction
    (pyxs makes the whole client transactional).
    """

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        own_domid: int = 0,
        layout: MetadataLayout | None = None,
    ) -> None:
        self.socket_path = socket_path or default_socket_path()
        self.own_domid = own_domid
        self.layout = layout or MetadataLayout()
        self._client = _connect(self.socket_path)
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._client.close()

    @property
    def alive(self) -> bool:
        """False once closed or once xenstored dropped the connection."""
        return not self._closed and bool(self._client.router.thread.is_alive())

    # -- raw access

    def read(self, path: str) -> bytes | None:
        """Value at `path`, or None if it does not exist."""
        return self._call(self._client.read, path.encode())  # type: ignore[no-any-return]

    def _list(self, path: str) -> list[bytes] | None:
        return self._call(self._client.list, path.encode())  # type: ignore[no-any-return]

    def _introduced(self, domid: int) -> bool:
        return bool(self._call(self._client.is_domain_introduced, domid))

    def _call(self, fn: Any, *args: Any) -> Any:
        """Run a pyxs call; missing nodes give None, anything else XenStoreError."""
        try:
            return fn(*args)
        except pyxs.exceptions.ConnectionError as e:
            raise XenStoreError(
                f"lost connection to xenstored at {self.socket_path} ({e})",
                "xenstored stopped or restarted",
            ) from e
        except pyxs.exceptions.PyXSError as e:
            if _errno_of(e) == errno.ENOENT:
                return None
            raise XenStoreError(f"xenstored refused {fn.__name__}{args!r}: {e}") from e

    def _read_trusted(self, path: str) -> tuple[bytes | None, bool]:
        """(value, trusted): trusted means written under the toolstack's ownership."""
        perms = self._call(self._client.get_perms, path.encode())
        if perms is None:
            return None, True
        return self.read(path), parse_owner(perms) == TOOLSTACK_DOMID

    # -- domains

    def list_domains(self) -> dict[int, VmInfo]:
        """Usable guest domains by domid (not this domain, nor dom0)."""
        return dict(self.snapshot().domains)

    def snapshot(self, ports: Iterable[int] = ()) -> Snapshot:
        present: set[int] = set()
        candidates: dict[int, VmInfo] = {}
        for child in self._list("/local/domain") or []:
            domid = parse_domid(child)
            if domid is None or domid in (self.own_domid, TOOLSTACK_DOMID):
                continue
            # Only domains xenstored has been introduced to are alive: the
            # toolstack writes /local/domain/<id> before and removes it after.
            if not self._introduced(domid):
                continue
            present.add(domid)
            vm = self._read_vm(domid)
            if vm is not None:
                candidates[domid] = vm
        counts = Counter(vm.name for vm in candidates.values())
        domains = {}
        for domid, vm in candidates.items():
            if counts[vm.name] > 1:
                # Two live domains cannot both be "work" for policy: neither is.
                log.warning("domain %d: name %r is used by another domain; ignored", domid, vm.name)
            else:
                domains[domid] = vm
        vchans = {}
        for domid in domains:
            for port in ports:
                signature = self._vchan_signature(domid, port)
                if signature is not None:
                    vchans[(domid, port)] = signature
        return Snapshot(domains, vchans, frozenset(present))

    def _read_vm(self, domid: int) -> VmInfo | None:
        raw, trusted = self._read_trusted(f"/local/domain/{domid}/name")
        if raw is None:
            log.debug("domain %d has no name yet", domid)
            return None
        if not trusted:
            log.warning("domain %d: name node not owned by the toolstack; ignored", domid)
            return None
        try:
            name = validate_name(raw)
        except InvalidName as e:
            log.warning("domain %d: rejected name %r: %s", domid, raw[:80], e)
            return None
        tags: frozenset[str] = frozenset()
        if self.layout.tags is not None:
            raw, trusted = self._read_trusted(self.layout.tags.format(domid=domid))
            try:
                if raw is not None and not trusted:
                    raise ValueError("tags node not owned by the toolstack")
                tags = parse_tags(raw or b"")
            except ValueError as e:
                # Tags drive policy either way (allow or deny): guessing is unsafe.
                log.warning("domain %d (%s): %s; domain ignored", domid, name, e)
                return None
        label = None
        if self.layout.label is not None:
            raw, trusted = self._read_trusted(self.layout.label.format(domid=domid))
            if raw is not None and trusted:
                try:
                    label = parse_label(raw)
                except ValueError as e:
                    log.warning("domain %d (%s): %s", domid, name, e)
            elif raw is not None:
                log.warning("domain %d (%s): label not owned by the toolstack", domid, name)
        return VmInfo(domid, name, tags, label)

    # -- vchan

    def vchan_published(self, domid: int, port: int) -> bool:
        """Whether the guest's vchan server for `port` has published ring-ref and event-channel."""
        return self._vchan_signature(domid, port) is not None

    def _vchan_signature(self, domid: int, port: int) -> tuple[int, int] | None:
        base = vchan_path(domid, self.own_domid, port)
        ring_ref, evtchn = self.read(f"{base}/ring-ref"), self.read(f"{base}/event-channel")
        if ring_ref is None or evtchn is None:
            return None
        signature = parse_vchan_signature(ring_ref, evtchn)
        if signature is None:
            log.debug("domain %d: malformed vchan entries for port %d", domid, port)
        return signature

    # -- watches (for `qvaudio.dom0.xenstore_watch.DomainWatcher`)

    def open_watch(self) -> Watch:
        return Watch(self)


def _connect(path: str) -> Any:
    if not os.path.exists(path):
        raise XenStoreError(
            f"xenstored not reachable at {path}: no such socket", _NOT_REACHABLE_HINT
        )
    client = pyxs.Client(unix_socket_path=path)
    try:
        client.connect()
    except pyxs.exceptions.PyXSError as e:
        # pyxs opens its router's wake-up socketpair in the constructor and
        # closes it only from the router thread, which never started.
        client.router.r_terminator.close()
        client.router.w_terminator.close()
        raise XenStoreError(f"xenstored not reachable at {path} ({e})", _NOT_REACHABLE_HINT) from e
    return client


class Interrupted:
    """Queued by `Watch.interrupt` to wake the watch thread."""


INTERRUPTED: Final = Interrupted()


class Watch:
    """pyxs watches with a timeout and a way to interrupt a waiting thread.

    pyxs's Monitor.wait() blocks forever and cannot be interrupted, so this
    reads the Monitor's event queue (filled by the pyxs router thread) directly.
    """

    def __init__(self, store: XenStore) -> None:
        self._store = store
        self._monitor = store._client.monitor()
        self._tokens: dict[str, bytes] = {}
        self._serial = 0

    def add(self, path: str) -> None:
        if path in self._tokens:
            return
        # One token per path: pyxs delivers an event once per subscription of its token.
        self._serial += 1
        token = b"qvaudio-%x-%d" % (id(self), self._serial)
        self._store._call(self._monitor.watch, path.encode(), token)
        self._tokens[path] = token

    def remove(self, path: str) -> None:
        token = self._tokens.pop(path, None)
        if token is not None:
            self._store._call(self._monitor.unwatch, path.encode(), token)

    def get(self, timeout: float | None) -> bytes | Interrupted | None:
        """Path of the next event, `INTERRUPTED` if interrupted, None on timeout."""
        try:
            item = self._monitor.events.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, Interrupted):
            return item
        path: bytes = item.path
        return path

    def pending(self) -> bool:
        return not self._monitor.events.empty()

    def interrupt(self) -> None:
        self._monitor.events.put(INTERRUPTED)

    def close(self) -> None:
        for path in list(self._tokens):
            try:
                self.remove(path)
            except XenStoreError:
                self._tokens.clear()  # connection gone: xenstored dropped them
                return
