"""The qrexec transport end to end in dom0: the service handler run as qrexec
would run it (QREXEC_REMOTE_DOMAIN set, the VM's stream on stdin/stdout),
handing the stream to a running qvaudio-dom0. qrexec itself only exists on
Qubes; here the handler's environment and stdio are wired by the test.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TypeVar

from qvaudio.core.connection import Connection
from qvaudio.core.events import (
    Event,
    FormatAccept,
    FormatOffer,
    FormatRefuse,
    Goodbye,
    GoodbyeCode,
    Hello,
    Role,
    StreamKind,
)
from tests.dom0_harness import S16, Dom0
from tests.waiting import wait_until

E = TypeVar("E", bound=Event)


class QrexecCall:
    """One call of qvaudio.Audio: the handler process and the VM's end of its stdio."""

    def __init__(self, dom0: Dom0, caller: str) -> None:
        self.vm_end, handler_end = socket.socketpair()
        env = dict(os.environ)
        env["QREXEC_REMOTE_DOMAIN"] = caller
        env["QVAUDIO_QREXEC_SOCKET"] = str(dom0.base / "qrexec.sock")
        self.handler = subprocess.Popen(
            [sys.executable, "-m", "qvaudio.transport.qrexec"],
            stdin=handler_end.fileno(), stdout=handler_end.fileno(),
            stderr=subprocess.PIPE, env=env,
        )  # fmt: skip
        handler_end.close()
        self.conn = Connection(Role.GUEST)
        self.vm_end.settimeout(5)

    def send(self, *events: Event) -> None:
        self.vm_end.sendall(b"".join(self.conn.send(e) for e in events))

    def wait_for_event(self, kind: type[E]) -> E:
        """Read what dom0 sends until a `kind` event comes (events before it are dropped)."""

        def next_of_kind() -> E | None:
            received = self.conn.receive_data(self.vm_end.recv(65536))
            return next((e for e in received if isinstance(e, kind)), None)

        return wait_until(next_of_kind, f"a {kind.__name__} from dom0", 5)

    def close(self) -> None:
        self.vm_end.close()
        self.handler.wait(5)


def test_qrexec_identity_decides_the_policy(dom0: Dom0, tmp_path: Path) -> None:
    assert dom0.proc is not None
    dom0.stop()
    dom0.start("qrexec")
    wait_until(
        (dom0.base / "qrexec.sock").exists,
        "dom0's qrexec socket",
        5,
        interval=0.05,
        context=dom0.log_text,
    )
    # The test policy: 'quiet' is capped at 50 %, 'blocked' may not play.
    blocked = QrexecCall(dom0, "blocked")
    # Whatever the VM says of itself (free text is all it has) changes nothing.
    blocked.send(Hello(), FormatOffer(StreamKind.PLAYBACK, (S16,)))
    refusal = blocked.wait_for_event(FormatRefuse)
    assert "playback deny by" in refusal.reason
    quiet = QrexecCall(dom0, "quiet")
    quiet.send(Hello(), FormatOffer(StreamKind.PLAYBACK, (S16,)))
    quiet.wait_for_event(FormatAccept)
    vms = dom0.status()["vms"]
    assert vms["blocked"]["origin"] == "qrexec call"
    assert vms["blocked"]["playback"]["decision"] == "deny"
    assert vms["quiet"]["playback"]["volume_max"] == 50
    blocked.send(Goodbye(GoodbyeCode.NORMAL, "I am quiet, honestly"))
    blocked.close()
    assert blocked.handler.returncode == 0
    time.sleep(0.3)
    assert "blocked" not in dom0.status()["vms"], "a finished call leaves no VM behind"
    quiet.close()
    assert "quiet: connected over qrexec" in dom0.log_text(tail=None)
