"""Where the agents keep their sockets and state: qvaudio's folder of the user's runtime dir."""

from __future__ import annotations

import os
from pathlib import Path


def runtime_path(name: str, env: str | None = None) -> Path:
    """`$env` when it is set; else `name` in $XDG_RUNTIME_DIR/qvaudio (or /run/user/UID/qvaudio)."""
    configured = os.environ.get(env) if env else None
    if configured:
        return Path(configured)
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    return Path(runtime) / "qvaudio" / name
