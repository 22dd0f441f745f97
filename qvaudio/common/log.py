"""Logging set-up shared by the agents and the CLI.

Logs go to stderr without timestamps: under systemd, journald adds them, and
on a terminal they are noise. `QVAUDIO_LOG_TIMES=1` adds wall-clock times to
the millisecond, for logs written to a file (the test harnesses set it, so a
failure's log shows how long each step took).

Every message is one line: what cannot be printed (a newline, a carriage
return, a terminal escape) is written as its escape sequence. Strings from
outside dom0 (socket file names, VM names, reasons) reach log lines in many
places, and this is the one place that makes sure none of them can forge a
line or hide one. Tracebacks, which are ours, stay as they are.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys

#: The niceness PulseAudio gives itself ("high-priority"): an audio daemon's
#: threads must not wait behind ordinary work on a busy machine.
AUDIO_NICE = -11


def raise_priority(who: str) -> None:
    """Run this process (and the threads it starts) at AUDIO_NICE, where it may:
    root, or CAP_SYS_NICE, or an RLIMIT_NICE from its service unit. Where it
    may not, it runs as it was, and says so at debug level."""
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) > AUDIO_NICE:
            os.setpriority(os.PRIO_PROCESS, 0, AUDIO_NICE)
    except OSError as exc:
        logging.getLogger(who).debug("keeping the default priority: %s", exc.strerror)


def escape(text: str) -> str:
    """`text` with every non-printable character written as its escape (one line)."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


class OneLineFormatter(logging.Formatter):
    """A formatter whose messages can never span lines or carry control characters."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)


def setup_logging(verbosity: int = 0) -> None:
    """Configure the root logger once; `verbosity` counts -v flags."""
    level = logging.INFO if verbosity <= 0 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    layout = "%(levelname)s %(name)s: %(message)s"
    if os.environ.get("QVAUDIO_LOG_TIMES") == "1":
        layout = "%(asctime)s.%(msecs)03d " + layout
    handler.setFormatter(OneLineFormatter(layout, datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # A crash in native code (libpulse, libxenvchan) would otherwise leave
    # nothing in the journal but the exit status; this adds every thread's
    # Python stack.
    faulthandler.enable(sys.stderr)
