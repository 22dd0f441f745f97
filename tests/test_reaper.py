"""A killed test run leaves no daemon behind (tests/reaper.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reaper import MARKER_PREFIX, marked_pids
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent

INNER_TEST = """
import os, time
from pathlib import Path

def test_hold_daemons(pulse_server, pipewire_server):
    marks = [k for k in os.environ if k.startswith({prefix!r})]
    Path({out!r}).write_text(" ".join(marks))
    time.sleep(600)
"""


@pytest.mark.needs_audio
def test_a_killed_run_leaves_no_daemon_behind(tmp_path: Path) -> None:
    out = tmp_path / "marks"
    inner = tmp_path / "test_inner.py"
    inner.write_text(INNER_TEST.format(prefix=MARKER_PREFIX, out=str(out)))
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-p", "tests.reaper", "-p", "tests.audio_daemons",
         "--rootdir", str(tmp_path), "--basetemp", str(tmp_path / "basetemp"), str(inner)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_until(lambda: out.exists() or run.poll() is not None, "the inner run's daemons", 60)
        assert run.poll() is None, run.communicate()[0].decode(errors="replace")[-3000:]
        ours = {k for k in os.environ if k.startswith(MARKER_PREFIX)}
        (inner_mark,) = set(out.read_text().split()) - ours
        # pulseaudio, and dbus-run-session's bus, pipewire, wireplumber, pipewire-pulse
        daemons = marked_pids(inner_mark)
        assert len(daemons) >= 5, f"only {daemons} carry the inner run's mark"
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
    assert run.stdout is not None
    run.stdout.close()
    wait_until(lambda: not marked_pids(inner_mark), "every daemon of the killed run to end", 20)
