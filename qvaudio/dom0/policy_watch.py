"""Live reload of the policy directory, keeping the last good policy.

Polling rather than inotify: it needs no new dependency, works on any
filesystem, and a stat() of a dozen files every 250 ms costs nothing. A change
is anything in a file's or the directory's (mtime_ns, ctime_ns, size, inode,
mode, owner), so chmod/chown, which can make a file unacceptable in strict
mode, count as changes too.

Fail closed: until a valid policy has been loaded, the current policy is
`Policy.deny_all()`. After that, an invalid edit is logged (`file:line:
message`) and the last good policy stays in force.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from qvaudio.core.policy import Policy
from qvaudio.core.policy_parser import PolicyLoadError, PolicyProblem
from qvaudio.dom0.policy_loader import POLICY_SUFFIX, load_policy_dir

log = logging.getLogger(__name__)

Fingerprint = tuple[tuple[str, int, int, int, int, int, int], ...]
Loader = Callable[[Path], Policy]


def fingerprint(directory: Path) -> Fingerprint:
    """What changes whenever anything the loader reads could have changed."""
    entries: list[tuple[str, int, int, int, int, int, int]] = []

    def add(name: str, st: os.stat_result) -> None:
        entries.append(
            (name, st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino, st.st_mode, st.st_uid)
        )

    try:
        add(".", os.stat(directory))
        with os.scandir(directory) as it:
            for entry in it:
                if entry.name.endswith(POLICY_SUFFIX) and not entry.name.startswith("."):
                    try:
                        add(entry.name, entry.stat())
                    except OSError:
                        entries.append((entry.name, -1, -1, -1, -1, -1, -1))
    except OSError:
        # A missing directory is a state too; its (changing) presence is what matters.
        return (("", -1, -1, -1, -1, -1, -1),)
    return tuple(sorted(entries))


class PolicyWatcher:
    """Holds the policy in force for a directory and reloads it when files change.

    Use `check_now()` from your own loop, or `start()` for a daemon thread that
    polls every `interval` seconds. `policy` is safe to read from any thread.
    `on_change` is called (from the polling thread) with each newly installed
    policy.
    """

    def __init__(
        self,
        directory: Path,
        *,
        interval: float = 0.25,
        loader: Loader | None = None,
        on_change: Callable[[Policy], None] | None = None,
    ) -> None:
        self.directory = directory
        self.interval = interval
        self._loader: Loader = loader if loader is not None else load_policy_dir
        self._on_change = on_change
        self._policy = Policy.deny_all()
        self._ever_loaded = False
        self._problems: tuple[PolicyProblem, ...] = ()
        self._seen: Fingerprint | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def policy(self) -> Policy:
        """The policy in force: the last valid one, or deny-all if none ever was."""
        return self._policy

    @property
    def ever_loaded(self) -> bool:
        return self._ever_loaded

    @property
    def problems(self) -> tuple[PolicyProblem, ...]:
        """Why the files on disk are not in force (empty when they are)."""
        return self._problems

    def check_now(self, *, wait: bool = True) -> bool:
        """Reload if anything changed since the last look; True if a policy was installed.

        `wait=False` returns at once (False) while another thread is checking:
        that check, or the poll after it, sees any change, and a caller such
        as an event loop must not stall behind someone else's reload.
        """
        if not self._lock.acquire(blocking=wait):
            return False
        try:
            # Taken before loading: an edit during the load changes it again,
            # so the next poll reloads instead of missing the edit.
            current = fingerprint(self.directory)
            if current == self._seen:
                return False
            self._seen = current
            return self._reload()
        finally:
            self._lock.release()

    def _reload(self) -> bool:
        try:
            policy = self._loader(self.directory)
        except PolicyLoadError as exc:
            self._problems = exc.problems
            keeping = "keeping the last good policy" if self._ever_loaded else "denying all audio"
            log.error("policy in %s refused, %s:", self.directory, keeping)
            for problem in exc.problems:
                log.error("%s", problem)
            return False
        self._policy = policy
        self._problems = ()
        self._ever_loaded = True
        log.info(
            "policy loaded from %s: %d rules in %d files",
            self.directory,
            len(policy.rules),
            len(policy.files),
        )
        if self._on_change is not None:
            self._on_change(policy)
        return True

    def start(self) -> None:
        """Load now, then keep polling in a daemon thread until `stop()`."""
        if self._thread is not None:
            return
        self.check_now()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="policy-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check_now()
            except Exception:
                # A bug in a callback must not silently end reloading.
                log.exception("policy reload failed")

    def __enter__(self) -> PolicyWatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
