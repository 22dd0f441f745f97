"""qvaudio on real Xen: both agents over the real libxenvchan between two Xen domains.

Runs tests/xen/run-xen-test.sh, which boots Xen 4.17 under QEMU (software
emulation) with a PV dom0 running qvaudio-dom0 and a PV domU running
qvaudio-guest, and asserts on every check in the JSON it writes. See
docs/xen.md. Skips only when qemu-system-x86_64 cannot run at all; anything
else (no root for the image chroot, no network for a cold cache) fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "xen" / "run-xen-test.sh"
SKIPPED = 77
#: The script bounds the boot itself (QV_XEN_TIMEOUT); this only catches a hung build.
TIMEOUT_S = 900


def _serial_tail(result: dict[str, Any], lines: int = 80) -> str:
    path = Path(result.get("serial_log", ""))
    if not path.is_file():
        return "(no serial log)"
    # Xen's own lines are rarely the story; the agents', the driver's and the domU's are.
    text = [ln for ln in path.read_text(errors="replace").splitlines() if "(XEN)" not in ln]
    return "\n".join(text[-lines:])


@pytest.mark.needs_qemu
def test_both_agents_on_real_xen() -> None:
    out = REPO / "results" / "xen" / time.strftime("%Y%m%dT%H%M%SZ-pytest", time.gmtime())
    env = {**os.environ, "QV_XEN_RESULTS": str(out)}
    proc = subprocess.run(
        [str(SCRIPT)], env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    result_file = out / "result.json"
    assert result_file.is_file(), (
        f"run-xen-test.sh wrote no result (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    )
    result = json.loads(result_file.read_text())
    if proc.returncode == SKIPPED or result.get("status") == "skipped":
        pytest.skip(f"Xen test bed cannot run here: {result.get('reason')}")
    checks: dict[str, dict[str, Any]] = result.get("checks", {})
    assert checks, f"no checks in {result_file}: {result.get('reason')}"
    failed = {name: c.get("detail") for name, c in sorted(checks.items()) if not c.get("pass")}
    report = "\n".join(f"  {name}: {json.dumps(detail)[:400]}" for name, detail in failed.items())
    assert not failed and result.get("status") == "pass", (
        f"{len(failed)} Xen checks failed ({result.get('reason')}); results in {out}\n"
        f"{report}\n--- serial log tail ---\n{_serial_tail(result)}"
    )
    assert proc.returncode == 0
