"""Notifications are rate-limited; sd_notify reaches a real datagram socket."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from qvaudio.common.notify import Notifier
from qvaudio.common.sdnotify import sd_notify, watchdog_interval


def test_sd_notify_sends_to_the_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sd_notify("READY=1", "STATUS=serving 2 VMs")
        assert server.recv(100) == b"READY=1\nSTATUS=serving 2 VMs"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sd_notify("READY=1")


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 5.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert watchdog_interval() is None


def test_notifications_are_rate_limited(monkeypatch: pytest.MonkeyPatch) -> None:
    notifier = Notifier(repeat_after=10, max_per_minute=3)
    # Pretend a service exists but keep the worker from running gdbus.
    monkeypatch.setattr(Notifier, "available", property(lambda self: True))
    monkeypatch.setattr(notifier, "_run", lambda: None)
    assert notifier.notify("work is recording", "", now=0)
    assert not notifier.notify("work is recording", "", now=5)  # same summary too soon
    assert notifier.notify("work is recording", "", now=11)
    assert notifier.notify("media is recording", "", now=12)
    assert not notifier.notify("dev is recording", "", now=13)  # 3 a minute
    assert notifier.notify("dev is recording", "", now=75)
    assert notifier.suppressed == 2


def test_no_service_means_no_notification(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert not Notifier().notify("x", "y")
