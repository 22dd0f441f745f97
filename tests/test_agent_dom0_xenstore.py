"""qvaudio-dom0 discovering VMs through the real xenstored (Debian's, run
without Xen under the shim in tests/xen/). Guest domains are simulated by
writing their XenStore entries as libxl and libxenvchan would.

Without a hypervisor no vchan can be mapped, so this test proves discovery
and identity (the VM's name from the toolstack-owned node, its removal on
@releaseDomain, the clear error when the ring cannot be mapped); audio over
the real libxenvchan is proven by tests/test_xen.py under QEMU.
"""

from __future__ import annotations

from typing import Any

from tests.dom0_harness import Dom0
from tests.waiting import wait_until
from tests.xenstored import XenstoreSim

PORT = 4790


def wait_status(dom0: Dom0, check: Any, what: str, timeout: float = 5.0) -> dict[str, Any]:
    """dom0's status once `check` holds for it."""

    def status_if_done() -> dict[str, Any] | None:
        status = dom0.status()
        return status if check(status) else None

    return wait_until(
        status_if_done,
        what,
        timeout,
        interval=0.05,
        context=lambda: f"{dom0.status()}\n{dom0.log_text()}",
    )


def test_domains_are_named_by_xenstore_and_forgotten_on_release(
    dom0: Dom0, xenstored: XenstoreSim, monkeypatch: Any
) -> None:
    dom0.stop()
    monkeypatch.setenv("XENSTORED_PATH", xenstored.socket_path)
    dom0.host.env["XENSTORED_PATH"] = xenstored.socket_path
    try:
        dom0.start("xen")
    finally:
        dom0.host.env.pop("XENSTORED_PATH")
    xenstored.add_domain(7, "work")
    xenstored.add_domain(8, "media")
    # Only domains whose guest agent published its vchan are served.
    xenstored.publish_vchan(7, PORT)
    status = wait_status(dom0, lambda s: "work" in s["vms"], "work to appear")
    vm = status["vms"]["work"]
    assert vm["transport"] == f"xen:7:{PORT}"
    assert vm["origin"] == "Xen domain 7"
    assert "media" not in status["vms"]
    # A guest may write anything under its own data/: it cannot rename itself.
    xenstored.write("/local/domain/7/data/name", "dom0", owner=7)
    xenstored.publish_vchan(8, PORT)
    status = wait_status(dom0, lambda s: "media" in s["vms"], "media to appear")
    assert set(status["vms"]) == {"work", "media"}
    log = dom0.log_text(tail=None)
    assert "domain 7 is 'work'" in log
    # No hypervisor: mapping the ring fails, clearly, and dom0 keeps trying.
    assert log.count("work: cannot connect to xen:7:4790") == 1, "warned once, not per retry"
    assert "not running in a Xen domain" in log or "/dev/xen" in log
    xenstored.remove_domain(7)
    wait_status(dom0, lambda s: "work" not in s["vms"], "work to be forgotten")
    assert "domain 7 went away" in dom0.log_text(tail=None)
    assert dom0.proc is not None and dom0.proc.poll() is None
