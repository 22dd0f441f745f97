"""pytest plugin: nothing a test run starts outlives it, however the run ends.

Every process a test starts (audio daemons and what they fork, both agents,
xenstored, QEMU, helpers) inherits an environment variable naming this run,
`QVTESTRUN_<token>` (a prefix no test's environment filters out). A small
reaper process, started first and in a session of its own (so Ctrl-C in
the terminal does not reach it), holds the read end of a pipe whose write
end only pytest holds. When pytest ends in any way (normally, Ctrl-C, a
time limit's SIGTERM, SIGKILL), the pipe closes and the reaper ends every
process that still carries the variable.

The environment is what marks a process, not its process group or parent:
daemons fork, `dbus-run-session` starts a bus, and some children start
sessions of their own; all of them inherit the environment they were given.
Nested runs (a test that runs pytest) add their own variable beside ours,
so each reaper sweeps its own run and everything below it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

MARKER_PREFIX = "QVTESTRUN_"
#: How long the stragglers get after SIGTERM before SIGKILL.
TERM_GRACE_S = 3.0


def marked_pids(variable: str) -> list[int]:
    """Processes (other than this one) whose initial environment holds `variable`."""
    needle = variable.encode() + b"="
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or a kernel thread
            continue
        if any(item.startswith(needle) for item in environ.split(b"\0")):
            found.append(int(entry.name))
    return found


def sweep(variable: str) -> int:
    """End every process marked with `variable`: SIGTERM, then SIGKILL. Returns how many."""
    victims = marked_pids(variable)
    for pid in victims:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + TERM_GRACE_S
    while time.monotonic() < deadline and marked_pids(variable):
        time.sleep(0.05)
    # Again until none is left: a dying daemon's parent may start another.
    for _ in range(5):
        left = marked_pids(variable)
        if not left:
            break
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    return len(victims)


def _reaper_main(variable: str) -> None:
    """Runs in the reaper process: wait for pytest's end (EOF on stdin), then sweep."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    while sys.stdin.buffer.read(4096):
        pass
    count = sweep(variable)
    if count:
        print(f"test reaper: ended {count} processes the test run left behind", file=sys.stderr)


_reaper: subprocess.Popen[bytes] | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _reaper
    variable = MARKER_PREFIX + secrets.token_hex(6)
    os.environ[variable] = "1"
    env = {k: v for k, v in os.environ.items() if not k.startswith(MARKER_PREFIX)}
    # The reaper must not carry the mark it sweeps, nor end with the terminal's
    # process group; its stdin is the one pipe that tells it pytest is gone.
    _reaper = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from tests.reaper import _reaper_main; _reaper_main({variable!r})",
        ],
        stdin=subprocess.PIPE,
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
        start_new_session=True,
    )
    config.stash[_VARIABLE] = variable


def pytest_unconfigure(config: pytest.Config) -> None:
    global _reaper
    if _reaper is None:
        return
    assert _reaper.stdin is not None
    _reaper.stdin.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        _reaper.wait(TERM_GRACE_S + 5)
    _reaper = None


_VARIABLE = pytest.StashKey[str]()


def run_variable(config: pytest.Config) -> str:
    """The environment variable that marks this run's processes."""
    return config.stash[_VARIABLE]
