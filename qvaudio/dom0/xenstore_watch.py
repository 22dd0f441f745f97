"""XenStore's watches as events for dom0's selector loop: domains coming, going, publishing.

`DomainWatcher` runs a thread that waits for xenstored's watches, re-reads a
snapshot (`qvaudio.dom0.xenstore.XenStore`), and queues what changed
(`qvaudio.core.domains.diff_snapshots`) behind an eventfd the loop selects on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Iterable
from typing import Final

from qvaudio.core.domains import DomainEvent, Snapshot, diff_snapshots
from qvaudio.core.xen import vchan_path
from qvaudio.dom0.xenstore import Interrupted, Watch, XenStore, XenStoreError

log = logging.getLogger(__name__)

# Fire on domain creation and destruction (XS_INTRODUCE / XS_RELEASE or death).
SPECIAL_WATCHES: Final = ("@introduceDomain", "@releaseDomain")


class DomainWatcher:
    """Turns XenStore watch firings into DomainEvents for a selector loop.

    A background thread waits for watches, re-reads a snapshot (coalescing
    bursts) and queues the differences; `fileno()` becomes readable when
    `drain()` has something. Per present domain it also watches the name,
    metadata and vchan nodes, so late names and (re)published rings are seen.
    The store is shared, not owned: close it after `stop()`.
    """

    def __init__(
        self,
        store: XenStore,
        ports: Iterable[int] = (),
        *,
        min_interval: float = 0.05,
        health_interval: float = 1.0,
    ) -> None:
        self._store = store
        self._ports = tuple(sorted(set(ports)))
        self._min_interval = min_interval
        self._health_interval = health_interval
        self._events: queue.SimpleQueue[DomainEvent] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._failure: XenStoreError | None = None
        self._snapshot = Snapshot()
        self._watch: Watch | None = None
        self._thread: threading.Thread | None = None
        self._wake_fd = -1

    def __enter__(self) -> DomainWatcher:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def snapshot(self) -> Snapshot:
        """The last snapshot the events so far correspond to."""
        return self._snapshot

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("DomainWatcher already started")
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._watch = self._store.open_watch()
        self._thread = threading.Thread(target=self._run, name="xenstore-watch", daemon=True)
        self._thread.start()

    def fileno(self) -> int:
        if self._wake_fd < 0:
            raise RuntimeError("DomainWatcher not started")
        return self._wake_fd

    def drain(self) -> list[DomainEvent]:
        """Events queued so far; raises XenStoreError once the watch has failed."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.fileno())
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                break
        if not events and self._failure is not None:
            raise self._failure
        return events

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread, drop the watches and close the wake-up fd."""
        if self._thread is None:
            return
        self._stopping.set()
        if self._watch is not None:
            self._watch.interrupt()
        self._thread.join(timeout)
        if self._thread.is_alive():
            # Stuck in a pyxs call: keep its fd open rather than let a reused
            # fd number receive its write.
            log.error("xenstore watch thread did not stop within %.1fs", timeout)
            return
        self._thread = None
        os.close(self._wake_fd)
        self._wake_fd = -1

    # -- background thread

    def _run(self) -> None:
        assert self._watch is not None
        watch = self._watch
        followed: dict[int, list[str]] = {}
        try:
            for path in SPECIAL_WATCHES:
                watch.add(path)  # fires at once: that firing takes the initial snapshot
            last_scan, retry = 0.0, False
            while not self._stopping.is_set():
                fired = watch.get(self._health_interval)
                if isinstance(fired, Interrupted):
                    break
                if fired is None:
                    if not self._store.alive:
                        raise XenStoreError(
                            f"lost connection to xenstored at {self._store.socket_path}",
                            "xenstored stopped or restarted",
                        )
                    if not retry:
                        continue
                # Coalesce a burst (a guest can write its own nodes at will) into one scan.
                delay = last_scan + self._min_interval - time.monotonic()
                if delay > 0 and self._stopping.wait(delay):
                    break
                while watch.pending():
                    if isinstance(watch.get(0), Interrupted):
                        return
                last_scan = time.monotonic()
                try:
                    snapshot = self._store.snapshot(self._ports)
                    self._follow(watch, followed, snapshot.present)
                except XenStoreError as e:
                    if not self._store.alive:
                        raise
                    # Not fatal while xenstored still answers: retry after a pause.
                    log.warning("xenstore scan failed, retrying: %s", e)
                    retry = True
                    continue
                retry = False
                self._publish(diff_snapshots(self._snapshot, snapshot), snapshot)
        except XenStoreError as e:
            self._fail(e)
        except Exception as e:
            log.exception("xenstore watch thread crashed")
            self._fail(XenStoreError(f"xenstore watch failed: {e!r}"))
        finally:
            watch.close()

    def _follow(
        self, watch: Watch, followed: dict[int, list[str]], present: frozenset[int]
    ) -> None:
        for domid in set(followed) - present:
            for path in followed.pop(domid):
                watch.remove(path)
        for domid in present - set(followed):
            paths = [f"/local/domain/{domid}/name"]
            layout = self._store.layout
            paths += [t.format(domid=domid) for t in (layout.tags, layout.label) if t]
            paths += [vchan_path(domid, self._store.own_domid, p) for p in self._ports]
            followed[domid] = paths
            for path in paths:
                watch.add(path)

    def _publish(self, events: list[DomainEvent], snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        if not events:
            return
        for event in events:
            log.debug("%s", event)
            self._events.put(event)
        os.eventfd_write(self._wake_fd, 1)

    def _fail(self, error: XenStoreError) -> None:
        log.error("%s", error)
        self._failure = error
        os.eventfd_write(self._wake_fd, 1)
