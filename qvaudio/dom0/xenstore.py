"""Which VMs exist, and which have published their vchan, as seen from dom0's XenStore.

The dom0 agent knows a VM only by its Xen domain and by what the toolstack wrote
about it; nothing here trusts a value a guest could have written. Every identity
node (name, tags, label) must be owned by the toolstack domain, and names are
validated, because a name is what policy matches and what the host mixer shows.

pyxs (unmaintained since 2019) is used only inside this module, so it can be
swapped without touching callers. The pure parts (validation, parsing,
`diff_snapshots`) are separate from the I/O (`XenStore`, `DomainWatcher`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import pyxs
import pyxs.exceptions

from qvaudio.core.errors import QvaudioError

log = logging.getLogger(__name__)

# The toolstack writes identity nodes from dom0; a node owned by anyone else
# was written (or re-owned) by a guest and cannot vouch for identity.
TOOLSTACK_DOMID: Final = 0
# Xen's DOMID_FIRST_RESERVED: ids from here on are special, never a guest.
_DOMID_LIMIT: Final = 0x7FF0

MAX_NAME_LEN: Final = 64
MAX_TAGS: Final = 64
DEFAULT_SOCKET_PATHS: Final = ("/run/xenstored/socket", "/var/run/xenstored/socket")
_NOT_REACHABLE_HINT: Final = "not in dom0, or xenstored not running"

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


class XenStoreError(QvaudioError):
    """XenStore could not be used; `hint` says what to check."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}: {self.hint}" if self.hint else self.message


class InvalidName(QvaudioError, ValueError):
    """A domain name that must not be used for policy or display."""


# ---------------------------------------------------------------- pure core


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
    return domid if domid < _DOMID_LIMIT else None


def parse_owner(perms: list[bytes]) -> int | None:
    """Owner domid from a XenStore permission list (first entry, e.g. b'n0')."""
    if not perms or len(perms[0]) < 2 or perms[0][:1] not in b"nrwb":
        return None
    return int(perms[0][1:]) if _UINT_RE.fullmatch(perms[0][1:]) else None


def vchan_path(server_domid: int, port: int, client_domid: int = 0) -> str:
    """Where libxenvchan's server publishes its ring for `client_domid`."""
    return f"/local/domain/{server_domid}/data/vchan/{client_domid}/{port}"


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
        if not 0 < self.domid < _DOMID_LIMIT:
            raise ValueError(f"domid {self.domid} is not a guest domain")

    def vchan_path(self, port: int, client_domid: int = 0) -> str:
        return vchan_path(self.domid, port, client_domid)


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


# ---------------------------------------------------------------- I/O


def default_socket_path() -> str:
    """$XENSTORED_PATH, else the first standard socket that exists."""
    env = os.environ.get("XENSTORED_PATH")
    if env:
        return env
    for path in DEFAULT_SOCKET_PATHS:
        if os.path.exists(path):
            return path
    return DEFAULT_SOCKET_PATHS[0]


def _errno_of(exc: Exception) -> int | None:
    code = exc.args[0] if exc.args else None
    return code if isinstance(code, int) else None


class XenStore:
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

    def __enter__(self) -> XenStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

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
        base = vchan_path(domid, port, self.own_domid)
        ring_ref, evtchn = self.read(f"{base}/ring-ref"), self.read(f"{base}/event-channel")
        if ring_ref is None or evtchn is None:
            return None
        if not (_UINT_RE.fullmatch(ring_ref) and _UINT_RE.fullmatch(evtchn)):
            log.debug("domain %d: malformed vchan entries for port %d", domid, port)
            return None
        return int(ring_ref), int(evtchn)

    # -- watches (used by DomainWatcher only)

    def _open_watch(self) -> _Watch:
        return _Watch(self)


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


class _Stop:
    """Queued by `_Watch.interrupt` to wake the watch thread."""


_STOP: Final = _Stop()


class _Watch:
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

    def get(self, timeout: float | None) -> bytes | _Stop | None:
        """Path of the next event, `_STOP` if interrupted, None on timeout."""
        try:
            item = self._monitor.events.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, _Stop):
            return item
        path: bytes = item.path
        return path

    def pending(self) -> bool:
        return not self._monitor.events.empty()

    def interrupt(self) -> None:
        self._monitor.events.put(_STOP)

    def close(self) -> None:
        for path in list(self._tokens):
            try:
                self.remove(path)
            except XenStoreError:
                self._tokens.clear()  # connection gone: xenstored dropped them
                return


# Fire on domain creation and destruction (XS_INTRODUCE / XS_RELEASE or death).
SPECIAL_WATCHES: Final = ("@introduceDomain", "@releaseDomain")


class DomainWatcher:
    """Turns XenStore watch firings into DomainEvents for a selector loop.

    A background thread waits for watches, re-reads a snapshot (coalescing
    bursts) and queues the differences; `fileno()` becomes readable when
    `drain()` has something. Per present domain it also watches the name,
    metadata and vchan nodes, so late names and (re)published rings are seen.
    The store is shared, not owned: close it after `stop()`.
    """

    def __init__(
        self,
        store: XenStore,
        ports: Iterable[int] = (),
        *,
        min_interval: float = 0.05,
        health_interval: float = 1.0,
    ) -> None:
        self._store = store
        self._ports = tuple(sorted(set(ports)))
        self._min_interval = min_interval
        self._health_interval = health_interval
        self._events: queue.SimpleQueue[DomainEvent] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._failure: XenStoreError | None = None
        self._snapshot = Snapshot()
        self._watch: _Watch | None = None
        self._thread: threading.Thread | None = None
        self._wake_fd = -1

    def __enter__(self) -> DomainWatcher:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def snapshot(self) -> Snapshot:
        """The last snapshot the events so far correspond to."""
        return self._snapshot

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("DomainWatcher already started")
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._watch = self._store._open_watch()
        self._thread = threading.Thread(target=self._run, name="xenstore-watch", daemon=True)
        self._thread.start()

    def fileno(self) -> int:
        if self._wake_fd < 0:
            raise RuntimeError("DomainWatcher not started")
        return self._wake_fd

    def drain(self) -> list[DomainEvent]:
        """Events queued so far; raises XenStoreError once the watch has failed."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.fileno())
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                break
        if not events and self._failure is not None:
            raise self._failure
        return events

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread, drop the watches and close the wake-up fd."""
        if self._thread is None:
            return
        self._stopping.set()
        if self._watch is not None:
            self._watch.interrupt()
        self._thread.join(timeout)
        if self._thread.is_alive():
            # Stuck in a pyxs call: keep its fd open rather than let a reused
            # fd number receive its write.
            log.error("xenstore watch thread did not stop within %.1fs", timeout)
            return
        self._thread = None
        os.close(self._wake_fd)
        self._wake_fd = -1

    # -- background thread

    def _run(self) -> None:
        assert self._watch is not None
        watch = self._watch
        followed: dict[int, list[str]] = {}
        try:
            for path in SPECIAL_WATCHES:
                watch.add(path)  # fires at once: that firing takes the initial snapshot
            last_scan, retry = 0.0, False
            while not self._stopping.is_set():
                fired = watch.get(self._health_interval)
                if isinstance(fired, _Stop):
                    break
                if fired is None:
                    if not self._store.alive:
                        raise XenStoreError(
                            f"lost connection to xenstored at {self._store.socket_path}",
                            "xenstored stopped or restarted",
                        )
                    if not retry:
                        continue
                # Coalesce a burst (a guest can write its own nodes at will) into one scan.
                delay = last_scan + self._min_interval - time.monotonic()
                if delay > 0 and self._stopping.wait(delay):
                    break
                while watch.pending():
                    if isinstance(watch.get(0), _Stop):
                        return
                last_scan = time.monotonic()
                try:
                    snapshot = self._store.snapshot(self._ports)
                    self._follow(watch, followed, snapshot.present)
                except XenStoreError as e:
                    if not self._store.alive:
                        raise
                    # Not fatal while xenstored still answers: retry after a pause.
                    log.warning("xenstore scan failed, retrying: %s", e)
                    retry = True
                    continue
                retry = False
                self._publish(diff_snapshots(self._snapshot, snapshot), snapshot)
        except XenStoreError as e:
            self._fail(e)
        except Exception as e:
            log.exception("xenstore watch thread crashed")
            self._fail(XenStoreError(f"xenstore watch failed: {e!r}"))
        finally:
            watch.close()

    def _follow(
        self, watch: _Watch, followed: dict[int, list[str]], present: frozenset[int]
    ) -> None:
        for domid in set(followed) - present:
            for path in followed.pop(domid):
                watch.remove(path)
        for domid in present - set(followed):
            paths = [f"/local/domain/{domid}/name"]
            layout = self._store.layout
            paths += [t.format(domid=domid) for t in (layout.tags, layout.label) if t]
            paths += [vchan_path(domid, p, self._store.own_domid) for p in self._ports]
            followed[domid] = paths
            for path in paths:
                watch.add(path)

    def _publish(self, events: list[DomainEvent], snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        if not events:
            return
        for event in events:
            log.debug("%s", event)
            self._events.put(event)
        os.eventfd_write(self._wake_fd, 1)

    def _fail(self, error: XenStoreError) -> None:
        log.error("%s", error)
        self._failure = error
        os.eventfd_write(self._wake_fd, 1)
