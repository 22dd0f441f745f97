"""Notifications reach a real notification receiver on a private session bus:
from the Notifier itself, and from qvaudio-dom0 when a VM asks for the
microphone (refused, then recording once attached, then stopped)."""

from __future__ import annotations

import time

import pytest

from qvaudio.common.notify import Notifier
from qvaudio.core.events import CaptureRequest, CaptureState, FormatAccept, StreamStatus
from qvaudio.dom0.control import request
from tests.dom0_harness import MONO, S16, Dom0
from tests.notification_daemon import NotificationDaemon


def test_notifier_reaches_the_notification_service(
    notification_daemon: NotificationDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", notification_daemon.address)
    notifier = Notifier()
    assert notifier.available
    assert notifier.notify("work is recording from the microphone", "policy allows it")
    note = notification_daemon.wait_for("work is recording")
    assert note == ("qvaudio", "work is recording from the microphone", "policy allows it")
    notifier.close()
    assert notifier.sent == 1


def test_dom0_notifies_refusal_start_and_stop(
    dom0: Dom0, notification_daemon: NotificationDaemon
) -> None:
    dom0.stop()
    dom0.notifications = True
    dom0.host.env["DBUS_SESSION_BUS_ADDRESS"] = notification_daemon.address
    try:
        dom0.start()
    finally:
        dom0.host.env.pop("DBUS_SESSION_BUS_ADDRESS")
    assert dom0.proc is not None
    work = dom0.guest("work")
    work.offer(S16, capture=MONO)
    work.wait_for_event(FormatAccept, lambda e: e.stream.name == "CAPTURE")
    work.send(CaptureRequest(True))
    work.wait_for_event(CaptureState)
    summary, body = notification_daemon.wait_for("was refused the microphone")[1:]
    assert summary == "work was refused the microphone"
    assert "qvaudio mic attach work" in body
    assert request(dom0.control, {"cmd": "mic", "action": "attach", "vm": "work"})["ok"]
    work.wait_for_event(CaptureState, lambda e: e.status is StreamStatus.RUNNING)
    notification_daemon.wait_for("work is recording from the microphone")
    mark = work.mark()
    work.send(CaptureRequest(False))
    work.wait_for_event(CaptureState, lambda e: e.status is StreamStatus.STOPPED, after=mark)
    notification_daemon.wait_for("work stopped recording")
    time.sleep(0.2)
    assert len(notification_daemon.received) == 3
