"""Python binding of libxenvchan, the Xen shared-memory byte stream between two domains.

Why cffi's ABI mode (``ffi.dlopen``) and not API mode (a compiled extension):

* qvaudio ships as a pure wheel / noarch RPM. ABI mode needs no compiler and
  no ``libxen-dev`` at install time, only the runtime library at run time.
* It loads whichever Xen the system has. The soname carries the Xen version
  (``libxenvchan.so.4.17``), so a compiled extension would be tied to one
  release; here we try several sonames (see `SONAMES`) or take the path in
  ``$QVAUDIO_LIBXENVCHAN``.
* The price of ABI mode is that cffi cannot check our declarations against the
  header. The declarations (``qvaudio/decl/libxenvchan.h``) include the full
  ``struct libxenvchan``, whose layout has not changed across Xen 4.x, and
  tests/test_vchan.py compares cffi's layout with gcc's view of the real header.

The library is loaded lazily, once, on first use, so importing this module
never fails on a machine without Xen. Every failure of the C library becomes a
`VchanError` subclass carrying ``errno`` and a ``hint`` a person can act on;
see `check`.

A `Vchan` is not thread-safe: use it from one thread (the agents' event loop).
"""

from __future__ import annotations

import enum
import errno as errno_mod
import logging
import os
import select
import threading
from importlib import resources
from typing import Any, Final, NoReturn

import cffi

from qvaudio.common.closing import Closing
from qvaudio.core.errors import QvaudioError
from qvaudio.core.xen import MAX_DOMID, XENBUS_PATH, XENSTORED_ENV, XENSTORED_SOCKETS, vchan_path

log = logging.getLogger(__name__)

#: Try the release we test against first, then newer, then older ones, then the
#: development symlink. ``$QVAUDIO_LIBXENVCHAN`` (a soname or a path) overrides.
SONAMES: Final[tuple[str, ...]] = (
    "libxenvchan.so.4.17",
    *(f"libxenvchan.so.4.{minor}" for minor in range(24, 17, -1)),
    *(f"libxenvchan.so.4.{minor}" for minor in range(16, 5, -1)),
    "libxenvchan.so",
)
ENV_LIBRARY: Final = "QVAUDIO_LIBXENVCHAN"
#: libxenvchan refuses rings larger than this (each direction).
MAX_RING_SIZE: Final = 1 << 20

_INSTALL_HINT: Final = (
    "install libxenvchan: Debian/Ubuntu package libxenmisc4.17 (or the one matching "
    f"your Xen), Fedora xen-libs; or set {ENV_LIBRARY} to the library's path"
)
_NO_GNTALLOC_HINT: Final = "not running in a Xen domain (no /dev/xen/gntalloc)"
_NO_XENSTORE_HINT: Final = "no XenStore reachable (not in a Xen domain, or xenstored not running)"
_GNTALLOC = "/dev/xen/gntalloc"  # module attributes, so tests can point them elsewhere
_GNTDEV = "/dev/xen/gntdev"
_EVTCHN = "/dev/xen/evtchn"
_XENSTORE_PATHS: Final = (*XENSTORED_SOCKETS, XENBUS_PATH)


# --------------------------------------------------------------------- errors
class VchanError(QvaudioError, OSError):
    """A libxenvchan call failed. ``errno`` is the C errno (0 if it set none)."""

    def __init__(self, err: int, message: str, hint: str = "") -> None:
        super().__init__(err, message)
        self.hint = hint

    def __str__(self) -> str:
        name = errno_mod.errorcode.get(self.errno or 0, str(self.errno))
        text = f"{self.strerror} [{name}]"
        return f"{text}: {self.hint}" if self.hint else text


class LibraryNotFoundError(VchanError):
    """No libxenvchan shared library could be loaded."""


class XenUnavailableError(VchanError):
    """This machine is not a Xen domain (no grant devices, or no XenStore)."""


class VchanPeerNotFoundError(VchanError):
    """The client found no server ring at the XenStore path (server not up yet?)."""


class VchanQuotaError(VchanError):
    """xenstored's per-domain transaction quota is exhausted (ENOSPC)."""


class VchanClosedError(VchanError):
    """The peer has gone away, or this end was closed with `Vchan.close`."""


# -------------------------------------------------------------------- loading
def _read_cdef() -> str:
    return (resources.files("qvaudio") / "decl" / "libxenvchan.h").read_text(encoding="utf-8")


ffi: Final = cffi.FFI()
ffi.cdef(_read_cdef())
# free() lives in its own cdef: it comes from libc, not libxenvchan.
ffi.cdef("void free(void *ptr);")

_lock = threading.Lock()
_lib: Any = None
_libc: Any = None


def load_library() -> Any:
    """Return the loaded libxenvchan (loading it on the first call).

    Raises `LibraryNotFoundError` if no candidate soname can be loaded.
    """
    global _lib
    with _lock:
        if _lib is None:
            _lib = _dlopen_first()
        return _lib


def _dlopen_first() -> Any:
    override = os.environ.get(ENV_LIBRARY)
    candidates = (override,) if override else SONAMES
    errors: list[str] = []
    for name in candidates:
        try:
            lib = ffi.dlopen(name)
        except OSError as exc:
            errors.append(f"{name}: {exc}")
            continue
        log.debug("loaded %s", name)
        return lib
    log.debug("could not load libxenvchan: %s", "; ".join(errors))
    tried = override if override else f"{SONAMES[0]} ... {SONAMES[-1]}"
    raise LibraryNotFoundError(
        errno_mod.ENOENT, f"cannot load libxenvchan (tried {tried})", _INSTALL_HINT
    )


def _free(ptr: Any) -> None:
    global _libc
    if _libc is None:
        _libc = ffi.dlopen(None)  # None: the libc this process already uses
    _libc.free(ptr)


# ------------------------------------------------------------ error checking
def _xenstore_reachable() -> bool:
    override = os.environ.get(XENSTORED_ENV)
    paths = (override, *_XENSTORE_PATHS) if override else _XENSTORE_PATHS
    return any(os.path.exists(p) for p in paths)


def _raise_init_error(op: str, err: int, path: str, domain: int) -> NoReturn:
    where = f"{op}(domain={domain}, path={path!r})"
    message = f"{where} failed: {os.strerror(err) if err else 'no errno set'}"
    if err == errno_mod.ENOSPC:
        raise VchanQuotaError(
            err,
            message,
            "xenstored's transaction quota for this domain is exhausted (many vchans "
            "starting at once); retry shortly, or raise xenstored's transaction limit",
        )
    if err in (errno_mod.EACCES, errno_mod.EPERM):
        raise VchanError(
            err,
            message,
            "permission denied by the Xen devices or XenStore: run as root, and check "
            f"that the server grants access to domain {domain}"
            if op == "client_init"
            else "permission denied on /dev/xen/*: run as root",
        )
    if op == "server_init":
        if not os.path.exists(_GNTALLOC):
            raise XenUnavailableError(err, message, _NO_GNTALLOC_HINT)
        if not _xenstore_reachable():
            raise XenUnavailableError(err, message, _NO_XENSTORE_HINT)
        raise VchanError(err, message, "check the Xen kernel modules (xen_gntalloc, xen_evtchn)")
    if not _xenstore_reachable():
        raise XenUnavailableError(err, message, _NO_XENSTORE_HINT)
    if err in (0, errno_mod.ENOENT) and os.path.exists(_GNTDEV):
        raise VchanPeerNotFoundError(
            err,
            message,
            f"no vchan server published at {path} (is the agent in domain {domain} "
            "running and listening for this domain?)",
        )
    if not os.path.exists(_GNTDEV):
        raise XenUnavailableError(err, message, "no /dev/xen/gntdev: load the xen_gntdev module")
    if err == errno_mod.EINVAL:
        # Seen on real Xen: the server's process died without removing its
        # XenStore entries, so the grant and event channel they name are gone.
        raise VchanPeerNotFoundError(
            err,
            message,
            f"the vchan published at {path} is stale (the agent in domain {domain} "
            "stopped without removing it, or is restarting); retry when it is published again",
        )
    raise VchanError(err, message, "check the Xen kernel modules (xen_gntdev, xen_evtchn)")


def check(result: Any, op: str, vchan: Vchan | None = None, **context: Any) -> Any:
    """Turn a libxenvchan result into a value or a typed `VchanError`.

    ``result`` is what the C function returned: a pointer (NULL = failure) or
    an int (negative = failure). ``ffi.errno`` must have been cleared before
    the call, because libxenvchan returns some failures without setting it.
    ``context`` carries ``path`` and ``domain`` for the init functions.
    Returns ``result`` unchanged on success.
    """
    failed = result == ffi.NULL if isinstance(result, ffi.CData) else result < 0
    if not failed:
        return result
    err = ffi.errno
    if op in ("server_init", "client_init"):
        _raise_init_error(op, err, context["path"], context["domain"])
    if vchan is not None and vchan.state is VchanState.CLOSED:
        raise VchanClosedError(
            errno_mod.EPIPE,
            f"{op}: the peer closed the vchan",
            "the agent at the other end stopped, or its domain shut down",
        )
    raise VchanError(err, f"libxenvchan_{op} failed: {os.strerror(err) if err else 'no errno'}")


# ------------------------------------------------------------------- the API
class VchanState(enum.Enum):
    """`libxenvchan_is_open` as an enum."""

    CLOSED = 0
    CONNECTED = 1
    WAITING_FOR_PEER = 2  # a server whose client has not connected yet


def _check_domid(name: str, value: int) -> None:
    if not 0 <= value <= MAX_DOMID:
        raise ValueError(f"{name} must be a domain id between 0 and {MAX_DOMID}, not {value}")


def _resolve_path(
    xs_path: str | None, port: int | None, server: int | None, client: int | None
) -> str:
    if xs_path is not None:
        if port is not None:
            raise ValueError("give xs_path or port, not both")
        if not xs_path.startswith("/") or "\0" in xs_path:
            raise ValueError(f"xs_path must be an absolute XenStore path, not {xs_path!r}")
        return xs_path
    if port is None or server is None or client is None:
        raise ValueError("give xs_path, or port (a server also needs self_domid)")
    if port < 0:
        raise ValueError(f"port must be >= 0, not {port}")
    return vchan_path(server, client, port)


def _ring_size(name: str, value: int) -> int:
    if not 1 <= value <= MAX_RING_SIZE:
        raise ValueError(f"{name} must be between 1 and {MAX_RING_SIZE} bytes, not {value}")
    return value


class Vchan(Closing):
    """One end of a vchan. Create with `Vchan.server` or `Vchan.client`.

    Non-blocking by default: `read`/`write` move what they can now, and the
    caller waits for `fileno` to become readable, then calls `wait` to consume
    the event. The event fd signals both "data arrived" and "space freed".
    """

    def __init__(self, ctrl: Any, *, path: str, domain: int, server: bool) -> None:
        """Wrap a pointer from an init function. Use the classmethods instead."""
        self._lib = load_library()
        self._ctrl: Any = ffi.gc(ctrl, self._lib.libxenvchan_close)
        self._buf: Any = None
        self.path = path
        self.domain = domain
        self.is_server = server

    # ------------------------------------------------------------ creation
    @classmethod
    def server(
        cls,
        domain: int,
        xs_path: str | None = None,
        port: int | None = None,
        *,
        self_domid: int | None = None,
        read_min: int = 4096,
        write_min: int = 65536,
        blocking: bool = False,
    ) -> Vchan:
        """Publish a ring that domain ``domain`` may connect to.

        The ring is published at ``xs_path``, or at the conventional path built
        from ``port`` and our own domain id ``self_domid``. Ring sizes are
        minimums: libxenvchan rounds them up to powers of two (max 1 MiB).
        """
        _check_domid("domain", domain)
        path = _resolve_path(xs_path, port, self_domid, domain)
        lib = load_library()
        if os.path.exists(_GNTALLOC) and not os.path.exists(_EVTCHN):
            # server_init's cleanup after an event-channel failure frees an
            # uninitialised xs_path (Xen 4.17): never let it get that far.
            raise XenUnavailableError(
                errno_mod.ENOENT,
                f"server_init(domain={domain}, path={path!r}): no {_EVTCHN}",
                "load the xen_evtchn kernel module",
            )
        ffi.errno = 0
        ctrl = lib.libxenvchan_server_init(
            ffi.NULL,
            domain,
            path.encode(),
            _ring_size("read_min", read_min),
            _ring_size("write_min", write_min),
        )
        vchan = cls._made(ctrl, "server_init", path, domain, blocking)
        log.debug("vchan server for domain %d published at %s", domain, path)
        return vchan

    @classmethod
    def client(
        cls,
        domain: int,
        xs_path: str | None = None,
        port: int | None = None,
        *,
        self_domid: int = 0,
        blocking: bool = False,
    ) -> Vchan:
        """Connect to the ring domain ``domain`` published for us.

        With ``port``, the path is the convention
        ``/local/domain/<domain>/data/vchan/<self_domid>/<port>``; ``self_domid``
        defaults to 0 because the client is dom0 in qvaudio.
        """
        _check_domid("domain", domain)
        path = _resolve_path(xs_path, port, domain, self_domid)
        lib = load_library()
        ffi.errno = 0
        ctrl = lib.libxenvchan_client_init(ffi.NULL, domain, path.encode())
        vchan = cls._made(ctrl, "client_init", path, domain, blocking)
        log.debug("vchan client connected to domain %d at %s", domain, path)
        return vchan

    @classmethod
    def _made(cls, ctrl: Any, op: str, path: str, domain: int, blocking: bool) -> Vchan:
        """The end an init function made (or its typed error, if it made none)."""
        check(ctrl, op, path=path, domain=domain)
        vchan = cls(ctrl, path=path, domain=domain, server=op == "server_init")
        vchan.blocking = blocking
        return vchan

    # ----------------------------------------------------------- lifecycle
    @property
    def closed(self) -> bool:
        return self._ctrl is None

    def close(self) -> None:
        """Close this end (idempotent). A server also removes its XenStore entries."""
        ctrl, self._ctrl = self._ctrl, None
        if ctrl is not None:
            ffi.release(ctrl)

    def __repr__(self) -> str:
        role = "server" if self.is_server else "client"
        status = "closed" if self.closed else self.state.name.lower()
        return f"<Vchan {role} domain={self.domain} path={self.path!r} {status}>"

    def _live(self) -> Any:
        if self._ctrl is None:
            raise VchanClosedError(
                errno_mod.EBADF,
                "I/O on a closed Vchan",
                "close() was called on this end; create a new Vchan",
            )
        return self._ctrl

    def disown_xs_path(self) -> None:
        """Keep `close` from deleting this server's XenStore directory.

        A listener that publishes a new server at the same path after a client
        connected needs this: otherwise closing the first connection would
        delete the entries of the server now waiting there.
        """
        ctrl = self._live()
        if ctrl.is_server and ctrl.xs_path != ffi.NULL:
            path, ctrl.xs_path = ctrl.xs_path, ffi.NULL
            _free(path)

    # -------------------------------------------------------------- status
    @property
    def state(self) -> VchanState:
        if self._ctrl is None:
            return VchanState.CLOSED
        return VchanState(self._lib.libxenvchan_is_open(self._ctrl))

    @property
    def blocking(self) -> bool:
        return bool(self._live().blocking)

    @blocking.setter
    def blocking(self, value: bool) -> None:
        self._live().blocking = 1 if value else 0

    @property
    def read_capacity(self) -> int:
        """Size in bytes of the ring we read from."""
        return 1 << int(self._live().read.order)

    @property
    def write_capacity(self) -> int:
        """Size in bytes of the ring we write to."""
        return 1 << int(self._live().write.order)

    def fileno(self) -> int:
        """The event-channel fd: readable when the peer wrote, read or closed."""
        return int(self._lib.libxenvchan_fd_for_select(self._live()))

    def data_ready(self) -> int:
        return int(self._lib.libxenvchan_data_ready(self._live()))

    def buffer_space(self) -> int:
        return int(self._lib.libxenvchan_buffer_space(self._live()))

    def wait(self) -> None:
        """Consume the pending event. Blocks if none is pending: call it only
        when `fileno` is readable (or use `wait_if_pending`)."""
        ctrl = self._live()
        ffi.errno = 0
        check(self._lib.libxenvchan_wait(ctrl), "wait", self)

    def wait_if_pending(self) -> bool:
        """Consume the event if one is pending, without blocking. True if it was."""
        readable, _, _ = select.select([self.fileno()], [], [], 0)
        if readable:
            self.wait()
        return bool(readable)

    # ------------------------------------------------------------------ I/O
    def _scratch(self, size: int) -> Any:
        if self._buf is None or len(self._buf) < size:
            self._buf = ffi.new("char[]", max(size, 4096))
        return self._buf

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes. Non-blocking: b"" if nothing is there now.

        After the peer closed, the rest of the ring is still returned; then
        `VchanClosedError` is raised.
        """
        if n <= 0:
            raise ValueError(f"read size must be positive, not {n}")
        ctrl = self._live()
        buf = self._scratch(n)
        ffi.errno = 0
        got = check(self._lib.libxenvchan_read(ctrl, buf, n), "read", self)
        return bytes(ffi.buffer(buf, got))

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write what fits now; returns the count (0 when the ring is full)."""
        ctrl = self._live()
        if not data:
            return 0
        ffi.errno = 0
        sent = self._lib.libxenvchan_write(ctrl, ffi.from_buffer(data), len(data))
        return int(check(sent, "write", self))

    def send(self, data: bytes | bytearray | memoryview) -> bool:
        """Write all of ``data`` or nothing. False when the ring lacks room now.

        Raises ValueError if ``data`` could never fit: libxenvchan would report
        "no room" forever.
        """
        ctrl = self._live()
        if len(data) > self.write_capacity:
            raise ValueError(
                f"message of {len(data)} bytes exceeds the write ring ({self.write_capacity})"
            )
        if not data:
            return True
        ffi.errno = 0
        sent = self._lib.libxenvchan_send(ctrl, ffi.from_buffer(data), len(data))
        return bool(check(sent, "send", self))

    def recv(self, n: int) -> bytes:
        """Exactly ``n`` bytes, or b"" if fewer are there now (non-blocking)."""
        ctrl = self._live()
        if not 0 < n <= self.read_capacity:
            raise ValueError(f"recv size must be between 1 and {self.read_capacity}, not {n}")
        buf = self._scratch(n)
        ffi.errno = 0
        got = check(self._lib.libxenvchan_recv(ctrl, buf, n), "recv", self)
        return bytes(ffi.buffer(buf, got))
