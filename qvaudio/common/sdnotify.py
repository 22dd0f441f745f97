"""systemd's readiness and watchdog protocol (sd_notify), without libsystemd.

A datagram to $NOTIFY_SOCKET; when it is unset (not under systemd, or not
Type=notify) every call does nothing.
"""

from __future__ import annotations

import os
import socket


def sd_notify(*fields: str) -> bool:
    """Send e.g. "READY=1", "STATUS=...", "WATCHDOG=1"; True if systemd got it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract socket namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
        except OSError:
            return False
    return True


def watchdog_interval() -> float | None:
    """Half the watchdog timeout systemd asked for, in seconds, or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000
