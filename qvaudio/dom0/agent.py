"""qvaudio-dom0's loop: serve every VM's audio from dom0 (or an audio VM).

The I/O shell around `VmSession`: it finds VMs (XenStore, a socket
directory, a vsock map), connects to each guest agent, feeds bytes and time
to that VM's session and carries out what the session decides: bytes to the
guest, PCM to the VM's stream on the host audio server, microphone streams,
log lines and desktop notifications. The policy is reloaded live; `qvaudio
status` and `qvaudio mic` reach the agent over its control socket.

One selector loop in the main thread does all protocol work, so no VM's
misbehaviour can hold a lock another VM needs; the host server's blocking
PCM calls run in one thread per stream (`dom0.host`). The loop's parts:
`connections` (which VMs, connected when), `service` (one VM's turn) and
`commands` (the control socket), on `agent_base`.
"""

from __future__ import annotations

import contextlib
import os
import queue
import selectors
import time

from qvaudio import __version__
from qvaudio.common.sdnotify import sd_notify, watchdog_interval
from qvaudio.dom0.agent_base import DISCOVERY_INTERVAL, MIN_TURN_S, SLOW_TURN_S, log
from qvaudio.dom0.commands import ControlCommands
from qvaudio.dom0.connections import Connections
from qvaudio.dom0.service import VmService


class Dom0Agent(Connections, VmService, ControlCommands):
    """qvaudio-dom0: one loop that serves every VM."""

    def run(self) -> int:
        self.policy_watcher.start()
        if not self.policy_watcher.ever_loaded:
            log.error("no valid policy: all playback and capture are denied until one loads")
        log.info(
            "qvaudio-dom0 %s serving %s; control socket %s",
            __version__,
            ", ".join(self.settings.transports),
            self.control.path,
        )
        sd_notify("READY=1", "STATUS=serving VMs")
        watchdog = watchdog_interval()
        next_watchdog = 0.0
        try:
            turn_began = 0.0
            while not self.stopping:
                # Turns at most every MIN_TURN_S: a guest that trickles tiny
                # writes would otherwise buy a whole turn (every VM serviced)
                # with each one.
                rest = turn_began + MIN_TURN_S - time.monotonic()
                if rest > 0:
                    time.sleep(rest)
                turn_began = time.monotonic()
                links = self.links.values()
                if self._connects_pending or any(link.more_to_read for link in links):
                    timeout = 0.0  # work left over from the last turn: another turn now
                elif any(link.outbox or self._throttled(link) for link in links):
                    timeout = 0.02
                else:
                    timeout = 0.1
                ready = self.selector.select(timeout)
                work_began = time.monotonic()
                for key, mask in ready:
                    self._dispatch(key, mask, work_began)
                now = time.monotonic()
                self._drain_inbox(now)
                if now >= self._next_discovery:
                    self._next_discovery = now + DISCOVERY_INTERVAL
                    self._discover(now)
                elif self._connects_pending:
                    self._reconcile_targets(now)
                for link in list(self.links.values()):
                    with self._contained(link):
                        self._service(link, now)
                for fd in self.control.expire(now):
                    with contextlib.suppress(KeyError, ValueError):
                        self.selector.unregister(fd)
                if watchdog is not None and now >= next_watchdog:
                    sd_notify("WATCHDOG=1")
                    next_watchdog = now + watchdog
                took = time.monotonic() - work_began
                if took > SLOW_TURN_S:
                    log.debug("a loop turn took %.1f ms (%d VMs)", took * 1000, len(self.links))
        finally:
            self._shutdown()
        return 0

    def _dispatch(self, key: selectors.SelectorKey, mask: int, now: float) -> None:
        kind, payload = key.data
        if kind == "wake":
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 4096)
        elif kind == "control":
            conn = self.control.accept(now)
            if conn is not None:
                self.selector.register(conn, selectors.EVENT_READ, ("client", conn.fileno()))
        elif kind == "client":
            self._service_client(payload, now)
        elif kind == "qrexec":
            self._accept_qrexec(now)
        elif kind == "discovery":
            payload.refresh()
            self._reconcile_targets(now)
        elif kind == "vm":
            # Serviced with every other VM after the dispatch, once a turn.
            link = self.links.get(payload)
            if link is not None and mask & selectors.EVENT_READ:
                with self._contained(link):
                    link.stream.handle_wakeup()

    def _service_client(self, fd: int, now: float) -> None:
        alive = self.control.service(fd, now)
        with contextlib.suppress(KeyError, ValueError):
            if not alive:
                self.selector.unregister(fd)
            elif self.control.wants_write(fd):
                self.selector.modify(fd, selectors.EVENT_WRITE, ("client", fd))

    def _drain_inbox(self, now: float) -> None:
        while True:
            try:
                kind, payload = self.inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "reload":
                # Not behind the watcher thread's own reload: it sees the change.
                self.policy_watcher.check_now(wait=False)
            elif kind == "policy":
                for link in list(self.links.values()):
                    with self._contained(link):
                        self._execute(link, link.session.update_policy(payload, now))
                known = {name: link.target.identity for name, link in self.links.items()}
                self.grants.policy_changed(payload, known)
            elif kind == "mic":
                name, capture, chunk = payload
                mic_link = self.links.get(name)
                if mic_link is not None and mic_link.capture is capture:
                    with self._contained(mic_link):
                        room = mic_link.stream.buffer_space() - len(mic_link.outbox)
                        self._execute(mic_link, mic_link.session.capture_pcm(chunk, room, now))

    def _shutdown(self) -> None:
        log.info("stopping: saying goodbye to %d VMs", len(self.links))
        for link in list(self.links.values()):
            self._execute(link, link.session.shutdown("the dom0 agent is stopping"))
        for host in self._closing_host:
            host.join()
        self.policy_watcher.stop()
        if self.handoff is not None:
            self.handoff.close()
        for source in self.discoveries:
            source.close()
        self.control.close()
        self.notifier.close()
        self.selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
