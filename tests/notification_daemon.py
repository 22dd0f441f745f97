"""A real freedesktop notification receiver on a private session bus, for tests.

A private `dbus-daemon --session` plus a small server (jeepney, a pure-Python
D-Bus library, test-only) that owns org.freedesktop.Notifications and records
every Notify call, as a desktop's notification daemon would receive it.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from jeepney import HeaderFields, MessageType, new_method_return
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection

from tests.waiting import wait_until

NAME = "org.freedesktop.Notifications"


@dataclass
class NotificationDaemon:
    address: str
    received: list[tuple[str, str, str]] = field(default_factory=list)
    next_id: int = 1

    def wait_for(self, fragment: str, timeout: float = 5.0) -> tuple[str, str, str]:
        """The first notification whose summary contains `fragment`."""

        def note() -> tuple[str, str, str] | None:
            return next((n for n in list(self.received) if fragment in n[1]), None)

        return wait_until(
            note,
            f"a notification with {fragment!r}",
            timeout,
            context=lambda: f"got {self.received}",
        )


def _serve(daemon: NotificationDaemon, ready: threading.Event, stop: threading.Event) -> None:
    with open_dbus_connection(bus=daemon.address) as conn:
        conn.send_and_get_reply(message_bus.RequestName(NAME))
        ready.set()
        while not stop.is_set():
            try:
                msg = conn.receive(timeout=0.2)
            except TimeoutError:
                continue
            header = msg.header
            if header.message_type is not MessageType.method_call:
                continue
            if header.fields.get(HeaderFields.member) == "Notify":
                app, _replaces, _icon, summary, body, *_ = msg.body
                daemon.received.append((app, summary, body))
                conn.send(new_method_return(msg, "u", (daemon.next_id,)))
                daemon.next_id += 1
            elif header.fields.get(HeaderFields.member) == "GetServerInformation":
                conn.send(new_method_return(msg, "ssss", ("test", "qvaudio", "1", "1.2")))


@pytest.fixture
def notification_daemon() -> Iterator[NotificationDaemon]:
    bus = subprocess.Popen(
        ["dbus-daemon", "--session", "--nofork", "--print-address"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert bus.stdout is not None
    address = bus.stdout.readline().strip()
    assert address.startswith("unix:"), f"dbus-daemon did not start: {address!r}"
    daemon = NotificationDaemon(address)
    ready, stop = threading.Event(), threading.Event()
    thread = threading.Thread(target=_serve, args=(daemon, ready, stop), daemon=True)
    thread.start()
    assert ready.wait(5), "the notification receiver did not get its bus name"
    yield daemon
    stop.set()
    thread.join(2)
    bus.terminate()
    bus.wait(5)
