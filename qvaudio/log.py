"""Logging set-up shared by the agents and the CLI.

Logs go to stderr without timestamps: under systemd, journald adds them, and
on a terminal they are noise.
"""

from __future__ import annotations

import logging
import sys


def setup_logging(verbosity: int = 0) -> None:
    """Configure the root logger once; `verbosity` counts -v flags."""
    level = logging.INFO if verbosity <= 0 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
