"""Logging set-up shared by the agents and the CLI.

Logs go to stderr without timestamps: under systemd, journald adds them, and
on a terminal they are noise. `QVAUDIO_LOG_TIMES=1` adds wall-clock times to
the millisecond, for logs written to a file (the test harnesses set it, so a
failure's log shows how long each step took).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys


def setup_logging(verbosity: int = 0) -> None:
    """Configure the root logger once; `verbosity` counts -v flags."""
    level = logging.INFO if verbosity <= 0 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    layout = "%(levelname)s %(name)s: %(message)s"
    if os.environ.get("QVAUDIO_LOG_TIMES") == "1":
        layout = "%(asctime)s.%(msecs)03d " + layout
    handler.setFormatter(logging.Formatter(layout, datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # A crash in native code (libpulse, libxenvchan) would otherwise leave
    # nothing in the journal but the exit status; this adds every thread's
    # Python stack.
    faulthandler.enable(sys.stderr)
