"""Socket transports: AF_VSOCK (VMs without Xen) and AF_UNIX (tests, local demos).

Both are SOCK_STREAM sockets, so one `SocketStream` and one `SocketListener`
serve both; the functions at the bottom differ only in how they create the
socket and in how they explain failures.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import selectors
import socket
import stat
import struct
import termios
from collections.abc import Callable
from typing import Any, Final

from qvaudio.transport.base import (
    LevelTriggeredStream,
    Listener,
    PeerUnavailable,
    Stream,
    StreamState,
    TransportError,
    TransportUnavailable,
)

log = logging.getLogger(__name__)

DEFAULT_BACKLOG: Final = 4
DEFAULT_CONNECT_TIMEOUT: Final = 2.0
VMADDR_CID_LOCAL: Final = 1  # loopback; not exported by the socket module
_INT: Final = struct.Struct("i")
_GONE: Final = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, TimeoutError)


def ioctl_int(fd: int, request: int) -> int:
    result = fcntl.ioctl(fd, request, _INT.pack(0))
    return int(_INT.unpack(result)[0])


class SocketStream(LevelTriggeredStream[socket.socket]):
    """A connected stream socket, switched to non-blocking mode."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        sock.setblocking(False)
        super().__init__(address, sock)

    @property
    def state(self) -> StreamState:
        if self._handle is None or self._eof:
            return StreamState.CLOSED
        try:
            peeked = self._handle.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return StreamState.CONNECTED
        except _GONE:
            return StreamState.CLOSED
        return StreamState.CONNECTED if peeked else StreamState.CLOSED

    def read(self, max_bytes: int) -> bytes:
        sock = self._live()
        if self._eof:
            raise self._gone("end of stream")
        try:
            data = sock.recv(max_bytes)
        except (BlockingIOError, InterruptedError):
            return b""
        except _GONE as exc:
            raise self._gone(f"connection lost ({exc.strerror})") from exc
        if not data:
            raise self._gone("the peer closed the stream")
        return data

    def write(self, data: bytes | bytearray | memoryview) -> int:
        sock = self._live()
        if not data:
            return 0
        try:
            # MSG_NOSIGNAL: a vanished peer must be an exception, not SIGPIPE.
            return sock.send(data, socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return 0
        except _GONE as exc:
            raise self._gone(f"connection lost ({exc.strerror})") from exc

    def data_ready(self) -> int:
        sock = self._live()
        try:
            return ioctl_int(sock.fileno(), termios.FIONREAD)
        except OSError:
            pass  # older vsock kernels lack FIONREAD; peeking works everywhere
        try:
            return len(sock.recv(1 << 16, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except (BlockingIOError, InterruptedError):
            return 0
        except _GONE:
            return 0

    def buffer_space(self) -> int:
        sock = self._live()
        sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        try:
            queued = ioctl_int(sock.fileno(), termios.TIOCOUTQ)  # SIOCOUTQ
        except OSError:
            return sndbuf  # no SIOCOUTQ (older vsock): the best we can say
        # The kernel counts its bookkeeping overhead in both figures, so this
        # is an estimate, but it reaches ~0 when writes start returning 0.
        return max(0, sndbuf - queued)

    def poll_events(self, want_write: bool) -> int:
        return selectors.EVENT_READ | (selectors.EVENT_WRITE if want_write else 0)

    def close(self) -> None:
        sock, self._handle = self._handle, None
        if sock is not None:
            sock.close()


class SocketListener(Listener):
    """A listening stream socket; optionally drops peers that fail ``allow_peer``."""

    def __init__(
        self,
        sock: socket.socket,
        address: str,
        *,
        describe_peer: Callable[[Any], str],
        allow_peer: Callable[[Any], bool] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(address)
        sock.setblocking(False)
        self._sock: socket.socket | None = sock
        self._describe_peer = describe_peer
        self._allow_peer = allow_peer
        self._on_close = on_close

    def _live(self) -> socket.socket:
        if self._sock is None:
            raise TransportError(f"{self.address}: listener was closed")
        return self._sock

    def fileno(self) -> int:
        """Stays the same for the listener's whole life."""
        return self._live().fileno()

    def accept(self) -> Stream | None:
        sock = self._live()
        while True:
            try:
                conn, peer = sock.accept()
            except (BlockingIOError, InterruptedError):
                return None
            except ConnectionAbortedError:
                continue  # the peer gave up while queued; look at the next one
            except OSError as exc:
                raise TransportError(
                    f"{self.address}: accept failed: {exc.strerror}",
                    "out of file descriptors?" if exc.errno == errno.EMFILE else "",
                ) from exc
            name = self._describe_peer(peer)
            if self._allow_peer is not None and not self._allow_peer(peer):
                log.warning("%s: refused connection from %s (not the configured peer)", self, name)
                conn.close()
                continue
            log.info("%s: accepted %s", self, name)
            return SocketStream(conn, name)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
            if self._on_close is not None:
                self._on_close()


# ------------------------------------------------------------------ unix
def _unix_peer_unavailable(path: str, exc: OSError) -> PeerUnavailable:
    return PeerUnavailable(
        f"nobody is listening at unix:{path} ({exc.strerror})",
        "start the guest agent listening there, or check the path",
    )


def _remove_stale_socket(path: str) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise TransportError(
            f"refusing to listen at {path}: it exists and is not a socket",
            "choose another path or remove the file",
        )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        if probe.connect_ex(path) not in (errno.ECONNREFUSED, errno.ENOENT):
            raise TransportError(
                f"another process is already listening at unix:{path}",
                "stop the other agent, or choose another path",
            )
    log.info("removing stale socket %s", path)
    os.unlink(path)


def listen_unix(path: str, *, mode: int = 0o600, backlog: int = DEFAULT_BACKLOG) -> Listener:
    """Listen at ``path``, replacing a stale socket; the file gets ``mode``."""
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Linux gives the file that bind creates the mode of the socket inode,
        # so the file never exists with wider permissions than asked for.
        os.fchmod(sock.fileno(), mode)
        sock.bind(path)
        os.chmod(path, mode)
        sock.listen(backlog)
        identity = os.stat(path)
    except OSError as exc:
        sock.close()
        raise TransportError(
            f"cannot listen at unix:{path}: {exc.strerror}",
            "check that the directory exists and is writable by this user",
        ) from exc

    def unlink_if_ours() -> None:
        # Only remove the file if it is still the one we created.
        try:
            now = os.stat(path)
        except OSError:
            return
        if (now.st_dev, now.st_ino) == (identity.st_dev, identity.st_ino):
            os.unlink(path)

    return SocketListener(
        sock,
        f"unix:{path}",
        describe_peer=lambda _peer: f"unix:{path}",
        on_close=unlink_if_ours,
    )


def connect_unix(path: str) -> Stream:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError, BlockingIOError) as exc:
        sock.close()
        raise _unix_peer_unavailable(path, exc) from exc
    except OSError as exc:
        sock.close()
        raise TransportError(
            f"cannot connect to unix:{path}: {exc.strerror}",
            "check the socket's permissions (it is created mode 0600 by default)",
        ) from exc
    return SocketStream(sock, f"unix:{path}")


# ----------------------------------------------------------------- vsock
def _vsock_route_hint(cid: int) -> str:
    if cid == VMADDR_CID_LOCAL:
        return "vsock loopback (CID 1) needs the vsock_loopback kernel module"
    if cid == socket.VMADDR_CID_HOST:
        return "reaching the host (CID 2) needs a vsock device in this VM"
    return (
        f"no vsock route to CID {cid}: is that VM running with a vsock device, "
        "and vhost_vsock loaded on the host?"
    )


def _vsock_socket() -> socket.socket:
    family = getattr(socket, "AF_VSOCK", None)
    hint = "load the vsock modules (vmw_vsock_virtio_transport in a VM, vhost_vsock on a host)"
    if family is None:
        raise TransportUnavailable("this platform has no AF_VSOCK", "use xen: or unix: instead")
    try:
        return socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise TransportUnavailable(f"cannot create a vsock socket: {exc.strerror}", hint) from exc


def listen_vsock(peer_cid: int, port: int, *, backlog: int = DEFAULT_BACKLOG) -> Listener:
    """Listen on (any CID, ``port``); accept only connections from ``peer_cid``."""
    sock = _vsock_socket()
    try:
        sock.bind((socket.VMADDR_CID_ANY, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise TransportError(
                f"vsock port {port} is already in use", "is another guest agent running?"
            ) from exc
        raise TransportUnavailable(
            f"the kernel refused to listen on vsock port {port}: {exc.strerror}",
            "no usable vsock transport here (is this VM started with a vsock device?), "
            "or a sandbox forbids vsock",
        ) from exc
    return SocketListener(
        sock,
        f"vsock:{peer_cid}:{port}",
        describe_peer=lambda peer: f"vsock:{peer[0]}:{peer[1]}",
        allow_peer=lambda peer: bool(peer[0] == peer_cid),
    )


def connect_vsock(
    cid: int, port: int, *, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
) -> Stream:
    """Connect to (``cid``, ``port``).

    Waits up to ``connect_timeout`` seconds for the handshake, so that a
    missing vsock route is reported here rather than as a stream that never
    connects. A reachable peer answers within milliseconds.
    """
    where = f"vsock:{cid}:{port}"
    sock = _vsock_socket()
    sock.setblocking(False)
    err = sock.connect_ex((cid, port))
    if err == errno.EINPROGRESS:
        with selectors.DefaultSelector() as sel:
            sel.register(sock, selectors.EVENT_WRITE)
            ready = sel.select(connect_timeout)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if ready else errno.ETIMEDOUT
    if err == 0:
        return SocketStream(sock, where)
    sock.close()
    reason = os.strerror(err)
    if err in (errno.ECONNRESET, errno.ECONNREFUSED):
        raise PeerUnavailable(
            f"nothing is listening on {where} ({reason})",
            f"start the guest agent in the VM with CID {cid}",
        )
    if err == errno.ETIMEDOUT:
        reason = f"no answer within {connect_timeout:g} s"
    raise TransportUnavailable(f"cannot connect to {where}: {reason}", _vsock_route_hint(cid))
