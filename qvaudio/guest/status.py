"""The guest agent's status file: what it is doing, for people and tools to read.

`$XDG_RUNTIME_DIR/qvaudio/guest-status.json`, replaced atomically (a reader
never sees half a file) and only when something in it changed, so an idle
agent does not write every few seconds. `pid` lets a reader tell a live
agent's file from one left behind by a crash.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from qvaudio.common.runtime import runtime_path

log = logging.getLogger(__name__)


def default_status_path() -> Path:
    return runtime_path("guest-status.json")


class StatusFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._last: dict[str, Any] | None = None
        self._warned = False

    def update(self, status: dict[str, Any]) -> bool:
        """Write `status` if it differs from what was written last; True if written."""
        if status == self._last:
            return False
        try:
            write_atomically(self.path, json.dumps(status, indent=1, sort_keys=True) + "\n")
        except OSError as exc:
            if not self._warned:
                log.warning("cannot write the status file %s: %s", self.path, exc)
                self._warned = True
            return False
        self._last = status
        return True

    def remove(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            log.debug("cannot remove %s: %s", self.path, exc)


def write_atomically(path: Path, text: str) -> None:
    """Write a temporary file, fsync it, rename it over `path`."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
