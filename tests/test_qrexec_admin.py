"""qvaudio.Admin invoked as qrexec would invoke it (QREXEC_REMOTE_DOMAIN set,
the request on stdin) against a running qvaudio-dom0: status, and mic
attach/detach still bound by the YAML policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from qvaudio.core.events import FormatAccept
from tests.dom0_harness import S16, Dom0


def call(dom0: Dom0, request: bytes, caller: str | None = "sys-gui") -> tuple[int, Any, str]:
    env = dict(os.environ, QVAUDIO_CONTROL_SOCKET=str(dom0.control))
    env.pop("QREXEC_REMOTE_DOMAIN", None)
    if caller is not None:
        env["QREXEC_REMOTE_DOMAIN"] = caller
    done = subprocess.run(
        [sys.executable, "-m", "qvaudio.qrexec_admin"],
        input=request, capture_output=True, env=env, timeout=20, check=False,
    )  # fmt: skip
    reply = json.loads(done.stdout) if done.stdout.strip() else None
    return done.returncode, reply, done.stderr.decode()


def test_admin_service_status_and_microphone(dom0: Dom0) -> None:
    work = dom0.guest("work")  # the test policy: attach-on-request
    work.offer(S16)
    work.wait_for_event(FormatAccept)
    dom0.guest("blocked")  # the test policy: capture deny (catch-all)

    code, reply, log = call(dom0, b"status\n")
    assert code == 0 and reply["ok"] and set(reply["vms"]) >= {"work", "blocked"}
    assert "sys-gui asks: status" in log

    code, reply, _ = call(dom0, b"mic attach work\n")
    assert code == 0 and reply == {"ok": True, "vm": "work", "attached": True}
    code, reply, _ = call(dom0, b"mic detach work\n")
    assert code == 0 and reply["attached"] is False

    # The YAML policy still decides: qrexec only decided who may ask.
    code, reply, _ = call(dom0, b"mic attach blocked\n")
    assert code == 1 and "denied" in reply["error"]


def test_admin_service_refuses_bad_requests(dom0: Dom0) -> None:
    for bad in (b"mic attach ../x\n", b"reboot\n", b"\xff\xfe\n", b"status" * 100):
        code, reply, _ = call(dom0, bad)
        assert code == 1 and reply["ok"] is False, bad
    code, reply, log = call(dom0, b"status\n", caller=None)
    assert code == 2 and reply is None and "run by qrexec only" in log
