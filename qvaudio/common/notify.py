"""Desktop notifications through the freedesktop notification service.

Sent with `gdbus` (GLib's command-line D-Bus client, on every desktop that
has a notification service) from a worker thread, so that a slow or absent
service never blocks an agent's loop; no D-Bus binding is needed as a
dependency. Where no session bus or service exists, the log line the caller
writes anyway is all the user gets.

Rate-limited: a guest that asks for the microphone in a loop must not be
able to flood the user's screen. The same summary is shown at most once per
`repeat_after` seconds, and nothing more than `max_per_minute` times a minute.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import subprocess
import threading
import time
from collections import deque

log = logging.getLogger(__name__)

APP_NAME = "qvaudio"


class Notifier:
    def __init__(
        self,
        enabled: bool = True,
        *,
        icon: str = "audio-input-microphone",
        repeat_after: float = 10.0,
        max_per_minute: int = 12,
    ) -> None:
        self.icon = icon
        self.repeat_after = repeat_after
        self.max_per_minute = max_per_minute
        self._gdbus = shutil.which("gdbus") if enabled else None
        # The child gets this copy, taken at start: with no env, exec reads
        # the C environment as another thread may be changing it (an older
        # pulse.pcm set stream properties there, and a fork in the middle of
        # that failed with EFAULT).
        self._env = dict(os.environ)
        self._has_bus = bool(os.environ.get("DBUS_SESSION_BUS_ADDRESS")) or os.path.exists(
            f"/run/user/{os.getuid()}/bus"
        )
        self._last: dict[str, float] = {}
        self._recent: deque[float] = deque()
        self._queue: queue.SimpleQueue[tuple[str, str] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.sent = 0
        self.suppressed = 0

    @property
    def available(self) -> bool:
        return self._gdbus is not None and self._has_bus

    def notify(self, summary: str, body: str, now: float | None = None) -> bool:
        """Queue a notification; False if it was rate-limited or there is no service."""
        if not self.available:
            return False
        now = time.monotonic() if now is None else now
        while self._recent and now - self._recent[0] > 60:
            self._recent.popleft()
        last = self._last.get(summary)
        if (last is not None and now - last < self.repeat_after) or len(
            self._recent
        ) >= self.max_per_minute:
            self.suppressed += 1
            return False
        self._last[summary] = now
        self._recent.append(now)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="notify", daemon=True)
            self._thread.start()
        self._queue.put((summary, body))
        return True

    def _run(self) -> None:
        assert self._gdbus is not None
        while (item := self._queue.get()) is not None:
            summary, body = item
            command = [
                self._gdbus, "call", "--session",
                "--dest", "org.freedesktop.Notifications",
                "--object-path", "/org/freedesktop/Notifications",
                "--method", "org.freedesktop.Notifications.Notify",
                APP_NAME, "0", self.icon, summary, body, "[]", "{}", "8000",
            ]  # fmt: skip
            try:
                result = subprocess.run(
                    command, capture_output=True, timeout=5, check=False, env=self._env
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                log.debug("notification not shown: %s", exc)
                continue
            if result.returncode == 0:
                self.sent += 1
            else:
                log.debug("notification not shown: %s", result.stderr.decode(errors="replace"))

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=6)
            self._thread = None
