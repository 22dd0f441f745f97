"""Qubes qrexec transport: the guest calls dom0's `qvaudio.Audio` service.

Unlike vchan and vsock, the *guest* starts the connection here: qrexec is
Qubes' policy-checked RPC, and a VM may only call services, not accept them.

guest:  `QrexecDialer` runs ``qrexec-client-vm @default qvaudio.Audio`` with
        one end of a socketpair as its stdin and stdout; the other end is the
        guest's stream. When the call ends, the next `accept` dials again
        (after a back-off, so a refused call is not retried in a tight loop).
dom0:   qrexec runs /etc/qubes-rpc/qvaudio.Audio (`handler_main`) with the
        VM's stream as stdin/stdout and the caller's name in
        ``QREXEC_REMOTE_DOMAIN``. The handler passes both fds and that name
        to the running dom0 agent over a Unix socket (SCM_RIGHTS), then waits
        until the agent is done, so qrexec keeps the call open meanwhile.
        `HandoffListener` is the agent's end; each accepted `FdPairStream`
        carries ``remote_domain``, which came from qrexec, never from the VM.
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import re
import select
import selectors
import socket
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Final

from qvaudio.common.runtime import runtime_path
from qvaudio.transport.base import (
    LevelTriggeredStream,
    Listener,
    Stream,
    StreamState,
    TransportError,
    TransportUnavailable,
)
from qvaudio.transport.sockets import SocketStream, ioctl_int

log = logging.getLogger(__name__)

SERVICE: Final = "qvaudio.Audio"
CLIENT: Final = "qrexec-client-vm"
#: The handoff message: magic, version, the VM name qrexec gave the handler.
MAGIC: Final = b"qvaudio-qrexec-handoff 1 "
MAX_MESSAGE: Final = 256
#: Qubes VM names: a letter, then letters, digits, '_', '.', '-'; at most 31.
VM_NAME: Final = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]{0,30}")
#: The dom0 agent waits at most this long for a connected handler's message.
HANDOFF_TIMEOUT_S: Final = 0.5
BACKOFF_S: Final = (0.0, 1.0, 2.0, 5.0, 10.0, 30.0)
#: A call that lasted this long was a real session: the back-off starts over.
HEALTHY_CALL_S: Final = 10.0
F_GETPIPE_SZ: Final = 1032  # fcntl.F_GETPIPE_SZ exists only from Python 3.10 on Linux builds
_INT: Final = struct.Struct("i")


def default_handoff_path() -> Path:
    """$QVAUDIO_QREXEC_SOCKET, else qvaudio/qrexec.sock in the user's runtime dir."""
    return runtime_path("qrexec.sock", "QVAUDIO_QREXEC_SOCKET")


# ------------------------------------------------------------------ guest
class QrexecDialer(Listener):
    """The guest's "listener": each `accept` places one qrexec call to dom0.

    `fileno` is an epoll fd that is readable when a call may be placed: at
    first, and after the previous call's process has exited and its back-off
    has passed (the back-off runs inside the child, as a sleep before exec,
    so the loop never waits and no timer fd is needed).
    """

    def __init__(self, target: str = "@default", service: str = SERVICE) -> None:
        super().__init__(f"qrexec:{target}:{service}")
        self._argv = [CLIENT, target, service]
        # The call gets this copy, taken at start: with no env, exec reads
        # the C environment as another thread may be changing it (an older
        # pulse.pcm set stream properties there; a fork in the middle of
        # that failed with EFAULT).
        self._env = dict(os.environ)
        self._epoll: select.epoll | None = select.epoll()
        # A pipe holding one byte is the "dial now" signal: always readable.
        self._ready_r, self._ready_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        os.write(self._ready_w, b"!")
        self._epoll.register(self._ready_r, select.EPOLLIN)
        self._child: subprocess.Popen[bytes] | None = None
        self._pidfd = -1
        self._started = 0.0
        self._failures = 0

    def _live(self) -> select.epoll:
        if self._epoll is None:
            raise TransportError(f"{self.address}: dialer was closed")
        return self._epoll

    def fileno(self) -> int:
        return self._live().fileno()

    def _reap(self) -> bool:
        """True when no call is in progress (the last one, if any, has ended)."""
        child = self._child
        if child is None:
            return True
        if child.poll() is None:
            return False
        lasted = time.monotonic() - self._started
        self._failures = 0 if lasted >= HEALTHY_CALL_S else self._failures + 1
        level = logging.INFO if self._failures == 0 else logging.WARNING
        log.log(level, "%s: call ended (exit %s after %.1f s)", self, child.returncode, lasted)
        self._live().unregister(self._pidfd)
        os.close(self._pidfd)
        self._child, self._pidfd = None, -1
        return True

    def accept(self) -> Stream | None:
        epoll = self._live()
        if not self._reap():
            return None
        delay = BACKOFF_S[min(self._failures, len(BACKOFF_S) - 1)]
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = self._argv
        if delay:
            # Waiting in the child keeps the agent's loop free.
            argv = ["/bin/sh", "-c", f'sleep {delay:g} && exec "$@"', "sh", *argv]
        try:
            child = subprocess.Popen(
                argv, stdin=theirs.fileno(), stdout=theirs.fileno(), env=self._env
            )
        except FileNotFoundError as exc:
            ours.close()
            raise TransportUnavailable(
                f"{self.address}: {CLIENT} not found",
                "qrexec: works only inside a Qubes VM (package qubes-core-agent)",
            ) from exc
        finally:
            theirs.close()
        self._child, self._started = child, time.monotonic()
        self._pidfd = os.pidfd_open(child.pid)
        # From now on only the end of a call makes the dialer readable.
        epoll.modify(self._ready_r, 0)
        epoll.register(self._pidfd, select.EPOLLIN)
        log.info("%s: calling dom0 (after %g s)", self, delay)
        return SocketStream(ours, self.address)

    def close(self) -> None:
        epoll, self._epoll = self._epoll, None
        if epoll is None:
            return
        child = self._child
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(1.0)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if self._pidfd >= 0:
            os.close(self._pidfd)
        epoll.close()
        os.close(self._ready_r)
        os.close(self._ready_w)


# ------------------------------------------------------------------- dom0
def _set_nonblocking(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)


class FdPairStream(LevelTriggeredStream[select.epoll]):
    """A stream over a read fd and a write fd (qrexec's stdin and stdout).

    The event loop wants one fd per stream, so `fileno` is an epoll fd
    watching both: readable when there is data, or room while want_write.
    """

    GONE_HINT = "the VM's agent stopped, or qrexec ended"

    def __init__(
        self,
        read_fd: int,
        write_fd: int,
        address: str,
        *,
        remote_domain: str,
        keepalive: socket.socket | None = None,
    ) -> None:
        #: The calling VM's name as qrexec reported it to the service handler.
        self.remote_domain = remote_domain
        self._rfd, self._wfd = read_fd, write_fd
        for fd in {read_fd, write_fd}:
            _set_nonblocking(fd)
        self._keepalive = keepalive  # closing it lets the handler, and the call, end
        epoll = select.epoll()
        epoll.register(read_fd, select.EPOLLIN | select.EPOLLRDHUP)
        epoll.register(write_fd, 0)
        super().__init__(address, epoll)
        self._want_write = False

    @property
    def state(self) -> StreamState:
        if self._handle is None or self._eof:
            return StreamState.CLOSED
        return StreamState.CONNECTED

    def read(self, max_bytes: int) -> bytes:
        self._live()
        if self._eof:
            raise self._gone("end of stream")
        try:
            data = os.read(self._rfd, max_bytes)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError as exc:
            raise self._gone(f"read failed ({exc.strerror})") from exc
        if not data:
            raise self._gone("the VM closed the stream")
        return data

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._live()
        if not data:
            return 0
        try:
            return os.write(self._wfd, data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:  # EPIPE: Python ignores SIGPIPE, so this is an error
            raise self._gone(f"write failed ({exc.strerror})") from exc

    def data_ready(self) -> int:
        self._live()
        try:
            return ioctl_int(self._rfd, termios.FIONREAD)
        except OSError:
            return 0

    def buffer_space(self) -> int:
        self._live()
        try:
            size = fcntl.fcntl(self._wfd, F_GETPIPE_SZ)
        except OSError:  # not a pipe: a socket
            sndbuf = socket.socket(fileno=os.dup(self._wfd))
            try:
                size = sndbuf.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            finally:
                sndbuf.close()
            queued = ioctl_int(self._wfd, termios.TIOCOUTQ)
            return max(0, size - queued)
        return max(0, size - ioctl_int(self._wfd, termios.FIONREAD))

    def poll_events(self, want_write: bool) -> int:
        epoll = self._live()
        if want_write != self._want_write:
            epoll.modify(self._wfd, select.EPOLLOUT if want_write else 0)
            self._want_write = want_write
        return selectors.EVENT_READ

    def close(self) -> None:
        epoll, self._handle = self._handle, None
        if epoll is None:
            return
        epoll.close()
        for fd in {self._rfd, self._wfd}:
            os.close(fd)
        if self._keepalive is not None:
            self._keepalive.close()


class HandoffListener(Listener):
    """The dom0 agent's end of the handoff socket: yields one stream per qrexec call."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"qrexec-handoff:{path}")
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.is_socket():
            path.unlink()  # a stale one: the agent is single-instance per user
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # the handler runs as this user; nobody else may hand off
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        sock.listen(16)
        sock.setblocking(False)
        self._sock: socket.socket | None = sock
        self._path = path
        self._inode = path.stat().st_ino

    def fileno(self) -> int:
        if self._sock is None:
            raise TransportError(f"{self.address}: listener was closed")
        return self._sock.fileno()

    def accept(self) -> FdPairStream | None:
        if self._sock is None:
            raise TransportError(f"{self.address}: listener was closed")
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return None
        try:
            return self._receive(conn)
        except TransportError as exc:
            log.warning("%s: refused a handoff: %s", self, exc)
            conn.close()
            return None

    def _receive(self, conn: socket.socket) -> FdPairStream:
        uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        if uid != os.getuid():
            raise TransportError(f"handler runs as uid {uid}, not {os.getuid()}")
        # The handler writes its message right after connecting; bound the wait
        # so a stuck local process cannot stall the agent's loop for long.
        conn.settimeout(HANDOFF_TIMEOUT_S)
        fds = array.array("i")
        try:
            msg, ancdata, flags, _ = conn.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(2 * fds.itemsize))
        except (TimeoutError, OSError) as exc:
            raise TransportError(f"no handoff message ({exc})") from exc
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        try:
            if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC) or len(fds) != 2:
                raise TransportError(f"bad handoff: {len(fds)} fds, flags {flags:#x}")
            if not msg.startswith(MAGIC):
                raise TransportError("bad handoff message")
            name = msg.removeprefix(MAGIC).decode("ascii", "replace")
            if not VM_NAME.fullmatch(name):
                raise TransportError(f"bad VM name {name!r}")
        except TransportError:
            for fd in fds:
                os.close(fd)
            raise
        conn.setblocking(False)
        log.info("%s: %s called %s", self, name, SERVICE)
        return FdPairStream(fds[0], fds[1], f"qrexec:{name}", remote_domain=name, keepalive=conn)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        sock.close()
        try:
            if self._path.stat().st_ino == self._inode:
                self._path.unlink()
        except OSError:
            pass


# --------------------------------------------------------- service handler
def handler_main() -> int:
    """/etc/qubes-rpc/qvaudio.Audio: hand this call's stdin/stdout to the dom0 agent."""
    name = os.environ.get("QREXEC_REMOTE_DOMAIN", "")
    if not VM_NAME.fullmatch(name):
        print(f"qvaudio.Audio: no valid QREXEC_REMOTE_DOMAIN ({name!r})", file=sys.stderr)
        return 2
    for fd in (0, 1):
        try:
            os.fstat(fd)
        except OSError:
            print(f"qvaudio.Audio: fd {fd} is not open", file=sys.stderr)
            return 2
    path = default_handoff_path()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(str(path))
    except OSError as exc:
        print(f"qvaudio.Audio: the dom0 agent is not running ({path}: {exc.strerror})",
              file=sys.stderr)  # fmt: skip
        return 1
    with sock:
        fds = array.array("i", [0, 1])
        try:
            sock.sendmsg([MAGIC + name.encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        except OSError as exc:
            print(f"qvaudio.Audio: the dom0 agent hung up ({exc.strerror})", file=sys.stderr)
            return 1
        # The agent holds the stream now; stay until it lets go, since qrexec
        # may end the call when this process exits.
        while True:
            try:
                if not sock.recv(64):
                    return 0
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno == errno.ECONNRESET:
                    return 0
                raise


if __name__ == "__main__":
    sys.exit(handler_main())
