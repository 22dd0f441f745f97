"""The dom0 agent's control socket: `qvaudio status` and `qvaudio mic` talk to it.

One JSON object per line, one request and one answer per connection. The
socket lives in a directory only the agent's user can enter (0700) and is
itself 0600, so only that user can query status or attach a microphone;
the kernel enforces it, and the agent also checks the peer's uid.

The server side is non-blocking and lives in the agent's selector loop; a
client that connects and stalls is dropped after a few seconds, and requests
are bounded in size.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qvaudio.common.runtime import runtime_path
from qvaudio.core.errors import QvaudioError

log = logging.getLogger(__name__)

MAX_REQUEST = 4096
CLIENT_TIMEOUT = 3.0

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlError(QvaudioError):
    """The agent could not be reached, or refused the request."""


def default_socket_path() -> Path:
    """$QVAUDIO_CONTROL_SOCKET, else qvaudio/control.sock in the user's runtime dir."""
    return runtime_path("control.sock", "QVAUDIO_CONTROL_SOCKET")


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


@dataclass
class _Client:
    sock: socket.socket
    since: float
    buffer: bytearray = field(default_factory=bytearray)
    reply: bytes = b""


class ControlServer:
    """Accepts requests and answers them with `handler(request) -> reply`."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self._handler = handler
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)
        try:
            self.sock.bind(str(path))
        finally:
            os.umask(old_umask)
        self.sock.listen(8)
        self.sock.setblocking(False)
        self.clients: dict[int, _Client] = {}

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self, now: float) -> socket.socket | None:
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return None
        if _peer_uid(conn) not in (0, os.getuid()):
            conn.close()
            return None
        conn.setblocking(False)
        self.clients[conn.fileno()] = _Client(conn, now)
        return conn

    def service(self, fd: int, now: float) -> bool:
        """Read or write for client `fd`; False once it is finished (closed)."""
        client = self.clients.get(fd)
        if client is None:
            return False
        try:
            if client.reply:
                sent = client.sock.send(client.reply)
                client.reply = client.reply[sent:]
                if not client.reply:
                    self._drop(fd)
                    return False
                return True
            chunk = client.sock.recv(MAX_REQUEST)
        except BlockingIOError:
            return True
        except OSError:
            self._drop(fd)
            return False
        if not chunk:
            self._drop(fd)
            return False
        client.buffer += chunk
        if b"\n" not in client.buffer:
            if len(client.buffer) > MAX_REQUEST:
                client.reply = self._encode({"ok": False, "error": "request too large"})
            return True
        line = bytes(client.buffer.split(b"\n", 1)[0])
        client.reply = self._encode(self._answer(line))
        return self.service(fd, now)

    def wants_write(self, fd: int) -> bool:
        client = self.clients.get(fd)
        return client is not None and bool(client.reply)

    def expire(self, now: float) -> list[int]:
        stale = [fd for fd, c in self.clients.items() if now - c.since > CLIENT_TIMEOUT]
        for fd in stale:
            self._drop(fd)
        return stale

    def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except ValueError:
            return {"ok": False, "error": "not JSON"}
        if not isinstance(request, dict):
            return {"ok": False, "error": "expected a JSON object"}
        try:
            return self._handler(request)
        except Exception as exc:  # a bad request must never take the agent down
            log.exception("control request %r failed", request.get("cmd"))
            return {"ok": False, "error": f"internal error: {exc}"}

    @staticmethod
    def _encode(reply: dict[str, Any]) -> bytes:
        return json.dumps(reply, sort_keys=True).encode() + b"\n"

    def _drop(self, fd: int) -> None:
        client = self.clients.pop(fd, None)
        if client is not None:
            client.sock.close()

    def close(self) -> None:
        for fd in list(self.clients):
            self._drop(fd)
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def request(path: Path, payload: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Send one request to a running agent and return its answer."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            sock.sendall(json.dumps(payload).encode() + b"\n")
            data = bytearray()
            while b"\n" not in data and time.monotonic() < deadline:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except FileNotFoundError:
            raise ControlError(f"no dom0 agent is running (no socket at {path})") from None
        except ConnectionRefusedError:
            raise ControlError(f"the dom0 agent at {path} is not running") from None
        except PermissionError:
            raise ControlError(f"not allowed to talk to the dom0 agent at {path}") from None
        except OSError as exc:
            raise ControlError(f"cannot talk to the dom0 agent at {path}: {exc}") from None
    try:
        reply = json.loads(bytes(data).split(b"\n", 1)[0])
    except ValueError:
        raise ControlError("the dom0 agent sent a malformed answer") from None
    if not isinstance(reply, dict):
        raise ControlError("the dom0 agent sent a malformed answer")
    return reply
