"""qvaudio-dom0: serve every VM's audio from dom0 (or an audio VM).

The I/O shell around `dom0_session.VmSession`: it finds VMs (XenStore, a
socket directory, a vsock map), connects to each guest agent, feeds bytes and
time to that VM's session and carries out what the session decides: bytes
to the guest, PCM to the VM's stream on the host audio server, microphone
streams, log lines and desktop notifications. The policy is reloaded live;
`qvaudio status` and `qvaudio mic` reach the agent over its control socket.

One selector loop in the main thread does all protocol work, so no VM's
misbehaviour can hold a lock another VM needs; the host server's blocking
PCM calls run in one thread per stream (`dom0_host`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import queue
import selectors
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

from qvaudio import __version__
from qvaudio.common.config import (
    CONFIG_DEFAULT_HELP,
    ConfigError,
    Dom0Settings,
    flag_range,
    flag_type,
    load_config,
)
from qvaudio.common.extras import require
from qvaudio.common.log import raise_priority, setup_logging
from qvaudio.common.notify import Notifier
from qvaudio.common.sdnotify import sd_notify, watchdog_interval
from qvaudio.core.actions import Log, Notify, Send
from qvaudio.core.cost import LogLimiter
from qvaudio.core.dom0_actions import (
    Action,
    Disconnect,
    Play,
    StartCapture,
    StartPlayback,
    StopCapture,
    StopPlayback,
)
from qvaudio.core.dom0_backoff import Backoff
from qvaudio.core.dom0_grants import MicGrants
from qvaudio.core.dom0_limits import Limits
from qvaudio.core.dom0_session import VmSession
from qvaudio.core.events import GoodbyeCode
from qvaudio.core.policy import Policy, VmIdentity
from qvaudio.dom0.control import ControlServer, default_socket_path
from qvaudio.dom0.discovery import (
    Discovery,
    Target,
    UnixDirDiscovery,
    VsockDiscovery,
    XenDiscovery,
)
from qvaudio.dom0.host import HostCapture, HostPlayback
from qvaudio.dom0.policy_loader import POLICY_DIR_DEFAULT_HELP, default_policy_dir
from qvaudio.dom0.policy_watch import PolicyWatcher
from qvaudio.transport import UnixAddress, connect
from qvaudio.transport.addresses import (
    QrexecSource,
    UnixDirSource,
    VsockSource,
    XenSource,
    parse_source,
)
from qvaudio.transport.base import PeerUnavailable, Stream, StreamClosed, TransportError
from qvaudio.transport.qrexec import HandoffListener, default_handoff_path

log = logging.getLogger("qvaudio.dom0")

#: More than this waiting for a guest that does not read means it is stalled.
MAX_OUTBOX = 256 * 1024
#: What one VM's turn in the loop reads at most: this much of its audio (or
#: READ_MIN bytes before a format is agreed). A PCM frame carries at least
#: 1 ms, so a turn decodes at most about 20 frames of one VM before every
#: other VM, and the control socket, get theirs.
READ_TURN_MS = 20
READ_MIN = 4096
#: The loop turns at most this often (every VM is serviced once a turn).
MIN_TURN_S = 0.002
#: New guest connections made in one turn at most.
CONNECTS_PER_TURN = 4
#: A turn that takes longer than this is logged (at debug level): it delayed every VM.
SLOW_TURN_S = 0.010
DISCOVERY_INTERVAL = 0.5


@dataclass
class VmLink:
    """One connected VM: its transport, its session and its host streams."""

    target: Target
    stream: Stream
    session: VmSession
    connected_at: float
    outbox: bytearray = field(default_factory=bytearray)
    playback: HostPlayback | None = None
    capture: HostCapture | None = None
    mask: int = 0
    disconnect_code: GoodbyeCode | None = None
    #: False for qrexec calls: the guest dialled in, no discovery source owns it.
    discovered: bool = True
    #: Its turn ended with data still waiting (not for lack of budget): come back soon.
    more_to_read: bool = False

    @property
    def name(self) -> str:
        return self.target.identity.name


class Dom0Agent:
    def __init__(self, settings: Dom0Settings, *, policy_dir: Path, control_path: Path) -> None:
        self.settings = settings
        self.server = settings.pulse_server or None
        self.limits = Limits(
            host_buffer_ms=settings.playback_latency_ms,
            jitter_start_ms=settings.playback_reserve_ms,
        )
        self.selector = selectors.DefaultSelector()
        self.inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self.links: dict[str, VmLink] = {}
        self.backoff: dict[str, Backoff] = {}
        self.log_limiters: dict[str, LogLimiter] = {}
        self.grants = MicGrants()
        self._connect_warned: set[str] = set()
        self.stopping = False
        self.policy_watcher = PolicyWatcher(
            policy_dir, interval=0.05, on_change=lambda p: self._post("policy", p)
        )
        self.notifier = Notifier(settings.notifications)
        self.control = ControlServer(control_path, self.handle_control)
        self.selector.register(self.control, selectors.EVENT_READ, ("control", None))
        self.discoveries = self._make_discoveries(settings)
        self.handoff: HandoffListener | None = None
        if QrexecSource() in map(parse_source, settings.transports):
            self.handoff = HandoffListener(default_handoff_path())
            self.selector.register(self.handoff, selectors.EVENT_READ, ("qrexec", None))
        self._discovery_fds: dict[int, Discovery] = {}
        self._next_discovery = 0.0
        self._closing_host: list[HostPlayback | HostCapture] = []
        #: Connections left for the next turn (CONNECTS_PER_TURN).
        self._connects_pending = False

    @staticmethod
    def _make_discoveries(settings: Dom0Settings) -> list[Discovery]:
        sources: list[Discovery] = []
        for spec in settings.transports:
            match parse_source(spec):
                case XenSource():
                    sources.append(XenDiscovery(settings.xen_port))
                case UnixDirSource(directory=directory):
                    sources.append(UnixDirDiscovery(Path(directory)))
                case VsockSource(cids=cids):
                    sources.append(VsockDiscovery(dict(cids), settings.vsock_port))
                case QrexecSource():
                    pass  # VMs call in: the handoff listener
        return sources

    @property
    def policy(self) -> Policy:
        return self.policy_watcher.policy

    # -- plumbing ------------------------------------------------------------------------

    def _post(self, kind: str, payload: Any) -> None:
        """From any thread: hand something to the main loop and wake it."""
        self.inbox.put((kind, payload))
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")

    def request_stop(self, signum: int, frame: FrameType | None = None) -> None:
        self.stopping = True
        self._post("stop", signum)

    def request_reload(self, signum: int, frame: FrameType | None = None) -> None:
        # Only posted: the handler runs on the main thread between any two
        # bytecodes, possibly inside a control `reload` that holds the
        # watcher's lock, and taking that lock again here would deadlock.
        self._post("reload", signum)

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the agent; SIGHUP re-reads the policy now.

        Every handler only posts to the loop (SimpleQueue.put may be called
        from a signal handler), so none of them can wait for anything.
        """
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, self.request_reload)

    # -- the loop --------------------------------------------------------------------------

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

    # -- discovery and connections ------------------------------------------------------------

    def _discover(self, now: float) -> None:
        for source in self.discoveries:
            fd = source.fileno()
            if fd is None:
                source.refresh()
            elif fd not in self._discovery_fds:
                source.refresh()
                self._discovery_fds[fd] = source
                self.selector.register(fd, selectors.EVENT_READ, ("discovery", source))
            # A source whose fd went away (XenStore lost) reconnects in refresh().
            for stale_fd, stale in list(self._discovery_fds.items()):
                if stale is source and stale_fd != fd:
                    with contextlib.suppress(KeyError, ValueError):
                        self.selector.unregister(stale_fd)
                    del self._discovery_fds[stale_fd]
        self._reconcile_targets(now)

    def _all_targets(self) -> dict[str, Target]:
        merged: dict[str, Target] = {}
        for source in self.discoveries:
            for name, target in source.targets().items():
                if name in merged and merged[name].address != target.address:
                    log.warning("two VMs named %r (%s, %s): serving the first only", name,
                                merged[name].origin, target.origin)  # fmt: skip
                    continue
                merged[name] = target
        return merged

    def _reconcile_targets(self, now: float) -> None:
        targets = self._all_targets()
        for name, link in list(self.links.items()):
            if not link.discovered:
                continue
            target = targets.get(name)
            if target is None or target.address != link.target.address:
                self._execute(link, link.session.shutdown("the VM went away"))
                self.grants.forget(name)
            elif target.identity != link.target.identity:
                link.target = target
                self._execute(link, link.session.reidentify(target.identity, self.policy, now))
        self.grants.keep_only(targets.keys() | self.links.keys())
        # A few new connections a turn: many VMs appearing at once (a boot, or
        # sockets made in a burst) must not make one long turn that every
        # playing VM waits for; the rest are connected in the next turns.
        budget = CONNECTS_PER_TURN
        self._connects_pending = False
        for name, target in targets.items():
            if name in self.links:
                continue
            backoff = self.backoff.setdefault(name, Backoff())
            backoff.published(target.epoch)
            if now >= backoff.next_attempt:
                if budget == 0:
                    self._connects_pending = True
                    break
                budget -= 1
                self._connect(target, backoff, now)

    def _accept_qrexec(self, now: float) -> None:
        """A VM called qvaudio.Audio: its name is the one qrexec gave, never its word."""
        assert self.handoff is not None
        stream = self.handoff.accept()
        if stream is None:
            return
        name = stream.remote_domain
        backoff = self.backoff.setdefault(name, Backoff())
        if backoff.misbehaved and now < backoff.next_attempt:
            log.warning("%s: call refused, it was cut off %.0f s ago and must wait",
                        name, now - (backoff.next_attempt - backoff.penalty))  # fmt: skip
            stream.close()
            return
        old = self.links.get(name)
        if old is not None:
            self._execute(old, old.session.shutdown("the VM called again"))
        target = Target(VmIdentity(name), UnixAddress(f"qrexec:{name}"), origin="qrexec call")
        session = VmSession(
            target.identity,
            self.policy,
            now,
            grants=self.grants,
            limits=self.limits,
        )
        link = VmLink(target, stream, session, now, discovered=False)
        self.links[name] = link
        log.info("%s: connected over qrexec (identity from QREXEC_REMOTE_DOMAIN)", name)
        self._execute(link, session.start(now))

    def _connect(self, target: Target, backoff: Backoff, now: float) -> None:
        name = target.identity.name
        try:
            stream = connect(target.address)
        except PeerUnavailable as exc:
            log.debug("%s: not reachable yet: %s", name, exc)
            backoff.failed(now)
            return
        except TransportError as exc:
            # Once per VM until it works: a retry every few seconds must not
            # fill the journal with the same line.
            level = logging.DEBUG if name in self._connect_warned else logging.WARNING
            self._connect_warned.add(name)
            log.log(level, "%s: cannot connect to %s: %s (will retry)", name, target.address, exc)
            backoff.failed(now)
            return
        backoff.connected()
        self._connect_warned.discard(name)
        session = VmSession(
            target.identity,
            self.policy,
            now,
            grants=self.grants,
            limits=self.limits,
        )
        link = VmLink(target, stream, session, now)
        self.links[name] = link
        log.info("%s: connected over %s (%s)", name, target.address, target.origin)
        self._execute(link, session.start(now))

    # -- per-VM work ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _contained(self, link: VmLink) -> Iterator[None]:
        """Whatever goes wrong while serving one VM costs that VM its connection only."""
        try:
            yield
        except Exception:
            log.exception("%s: internal error while serving this VM; disconnecting it", link.name)
            with contextlib.suppress(Exception):
                link.session.abandon("internal error in dom0")
            self._drop(link, GoodbyeCode.INTERNAL_ERROR)

    def _throttled(self, link: VmLink) -> bool:
        queued = link.playback.queued_bytes if link.playback else 0
        return link.session.read_budget(time.monotonic(), queued) == 0

    def _service(self, link: VmLink, now: float) -> None:
        if link.name not in self.links:
            return
        budget_exhausted = self._read(link, now)
        if link.name not in self.links:
            return
        self._flush(link)
        if link.name not in self.links:
            return
        session = link.session
        playback, capture = link.playback, link.capture
        fmt = session.playback_format
        actions: list[Action] = []
        if playback is not None and fmt is not None:
            latency = playback.latency_us + fmt.duration_us(playback.queued_bytes)
            session.host_status(
                playback.played_frames, latency, capture.latency_us if capture else 0
            )
            session.host_underruns(playback.underruns, now)
            if playback.take_opened():
                session.host_playback_opened()
            refusal = playback.take_refusal()
            if refusal is not None:
                actions += session.host_playback_failed(refusal, now)
        if capture is not None:
            refusal = capture.take_refusal()
            if refusal is not None:
                actions += session.host_capture_failed(refusal, now)
        actions += session.tick(now)
        try:
            pending = link.stream.data_ready() > 0
        except StreamClosed:
            pending = False
        link.more_to_read = pending and not budget_exhausted
        actions += session.note_backlog(now, pending)
        self._execute(link, actions)
        for level, message in self._log_limits(link.name).flush(now):
            log.log(level, "%s: %s", link.name, message)
        if link.name in self.links:
            self._update_interest(link)

    def _read(self, link: VmLink, now: float) -> bool:
        """One turn's read, as much as the session allows; True if it allowed nothing.

        One read per turn, of at most READ_TURN_MS of the VM's audio: a VM
        with more waiting gets its next turn after every other VM has had
        one (the loop comes straight back to it), so no VM's input delays
        another's by more than a turn."""
        queued = link.playback.queued_bytes if link.playback else 0
        fmt = link.session.playback_format
        turn = max(READ_MIN, fmt.bytes_for_ms(READ_TURN_MS) if fmt is not None else 0)
        budget = min(link.session.read_budget(now, queued), turn)
        if budget <= 0:
            return True
        try:
            data = link.stream.read(budget)
        except StreamClosed:
            self._execute(link, link.session.transport_lost("the guest closed the connection"))
            self._drop(link, None)
            return False
        except TransportError as exc:
            self._execute(link, link.session.transport_lost(f"transport error: {exc}"))
            self._drop(link, None)
            return False
        if data:
            self._execute(link, link.session.receive(data, now))
        return False

    def _flush(self, link: VmLink) -> None:
        if not link.outbox:
            return
        try:
            sent = link.stream.write(link.outbox)
        except TransportError as exc:
            self._execute(link, link.session.transport_lost(f"write failed: {exc}"))
            self._drop(link, None)
            return
        del link.outbox[:sent]
        if len(link.outbox) > MAX_OUTBOX:
            log.warning("%s: cut off: not reading what dom0 sends", link.name)
            self._execute(link, link.session.transport_lost("guest not reading"))
            self._drop(link, GoodbyeCode.TIMEOUT)

    def _update_interest(self, link: VmLink) -> None:
        want_read = not self._throttled(link)
        want_write = bool(link.outbox)
        mask = link.stream.poll_events(want_write) if (want_read or want_write) else 0
        if not want_read and mask & ~selectors.EVENT_READ:
            # A socket can wait for writability alone; a vchan's one event fd
            # signals both, and its events are consumed, so it cannot spin.
            mask &= ~selectors.EVENT_READ
        if mask == link.mask:
            return
        fd = link.stream.fileno()
        with contextlib.suppress(KeyError, ValueError):
            if link.mask and not mask:
                self.selector.unregister(fd)
            elif not link.mask and mask:
                self.selector.register(fd, mask, ("vm", link.name))
            else:
                self.selector.modify(fd, mask, ("vm", link.name))
        link.mask = mask

    def _execute(self, link: VmLink, actions: Sequence[Action]) -> None:
        name = link.name
        for action in actions:
            match action:
                case Send(data=data):
                    link.outbox += data
                case Play(pcm=pcm, after_idle=after_idle):
                    if link.playback is not None:
                        session = link.session
                        link.playback.put(
                            pcm,
                            session.playback_queue_limit(),
                            session.playback_hold(),
                            session.playback_trim(),
                            after_idle=after_idle,
                        )
                case StartPlayback(format=fmt, initial_volume=volume):
                    self._close_host(link.playback)
                    link.playback = HostPlayback(
                        name,
                        fmt,
                        server=self.server,
                        latency_ms=self.settings.playback_latency_ms,
                        initial_volume=volume,
                        label=link.target.label,
                        pulse_connect=self._pulse_connect,
                    )
                case StopPlayback():
                    self._close_host(link.playback)
                    link.playback = None
                case StartCapture(format=fmt):
                    self._close_host(link.capture)
                    link.capture = HostCapture(
                        name,
                        fmt,
                        server=self.server,
                        period_ms=self.settings.capture_period_ms,
                        deliver=self._deliver_mic,
                        label=link.target.label,
                    )
                case StopCapture():
                    self._close_host(link.capture)
                    link.capture = None
                case Log(level=level, message=message):
                    allowed, summaries = self._log_limits(name).allow(
                        level, message, time.monotonic()
                    )
                    for held_level, held in summaries:
                        log.log(held_level, "%s: %s", name, held)
                    if allowed:
                        log.log(level, "%s: %s", name, message)
                case Notify(summary=summary, body=body):
                    self.notifier.notify(summary, body)
                case Disconnect(code=code):
                    self._flush_once(link)
                    self._drop(link, code)

    def _log_limits(self, name: str) -> LogLimiter:
        """Per VM and kept across its sessions: reconnecting does not reset it."""
        limiter = self.log_limiters.get(name)
        if limiter is None:
            limiter = self.log_limiters[name] = LogLimiter()
        return limiter

    def _deliver_mic(self, name: str, chunk: bytes) -> None:
        link = self.links.get(name)
        if link is not None:
            self._post("mic", (name, link.capture, chunk))

    def _pulse_connect(self) -> Any:
        from qvaudio.pulse.devices import connect as pulse_connect

        return pulse_connect("qvaudio-dom0", self.server)

    def _flush_once(self, link: VmLink) -> None:
        with contextlib.suppress(TransportError):
            if link.outbox:
                link.stream.write(link.outbox)

    def _close_host(self, host: HostPlayback | HostCapture | None) -> None:
        if host is not None:
            host.stop()
            self._closing_host.append(host)
        self._closing_host = [h for h in self._closing_host if h.alive]

    def _drop(self, link: VmLink, code: GoodbyeCode | None) -> None:
        if self.links.get(link.name) is not link:
            return
        del self.links[link.name]
        if link.mask:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(link.stream.fileno())
        self._close_host(link.playback)
        self._close_host(link.capture)
        link.playback = link.capture = None
        link.stream.close()
        now = time.monotonic()
        backoff = self.backoff.setdefault(link.name, Backoff())
        was_looping = backoff.looping
        backoff.ended(now, now - link.connected_at, code)
        if backoff.looping and not was_looping:
            log.warning(
                "%s: reconnecting in a loop (%d short sessions): next attempt in %.0f s",
                link.name,
                len(backoff.short_sessions),
                backoff.next_attempt - now,
            )

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

    # -- control requests ------------------------------------------------------------------------

    def handle_control(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request.get("cmd")
        if cmd == "status":
            return {"ok": True, **self.status()}
        if cmd == "mic":
            return self._mic(str(request.get("action")), str(request.get("vm", "")))
        if cmd == "reload":
            self.policy_watcher.check_now()
            return {"ok": True, "problems": [str(p) for p in self.policy_watcher.problems]}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    def _mic(self, action: str, name: str) -> dict[str, Any]:
        if action not in ("attach", "detach"):
            return {"ok": False, "error": "action must be attach or detach"}
        targets = self._all_targets()
        link = self.links.get(name)
        identity = (
            link.target.identity if link else targets[name].identity if name in targets else None
        )
        if identity is None:
            return {"ok": False, "error": f"no running VM named {name!r}"}
        refused = self.grants.request(action == "attach", identity, self.policy)
        if refused is not None:
            return {"ok": False, "error": refused}
        now = time.monotonic()
        log.info("%s: microphone %sed by the user", name, action)
        if link is not None:
            self._execute(link, link.session.set_mic_attached(action == "attach", now))
        return {"ok": True, "vm": name, "attached": name in self.grants}

    @staticmethod
    def _host_stream_state(playback: HostPlayback) -> str:
        # open_failures counts failed opens since the last good one; a refusal
        # (the server there, saying no) is the session's host_refused instead.
        return "unreachable" if playback.open_failures else "ok"

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        vms: dict[str, Any] = {}
        known = self._all_targets()
        known.update({n: link.target for n, link in self.links.items() if not link.discovered})
        for name, target in sorted(known.items()):
            link = self.links.get(name)
            entry: dict[str, Any] = {"transport": str(target.address), "origin": target.origin}
            if link is None:
                backoff = self.backoff.get(name)
                entry["state"] = "waiting"
                if backoff is not None and backoff.next_attempt > now:
                    entry["retry_in_s"] = round(backoff.next_attempt - now, 1)
            else:
                entry.update(link.session.status())
                entry["connected_s"] = round(now - link.connected_at, 1)
                if link.playback is not None:
                    entry["playback"]["late_drops"] = link.playback.late_drops
                    entry["playback"]["queued_ms"] = round(
                        link.playback.queued_bytes * 1000 / link.playback.format.bytes_per_second, 1
                    )
                    entry["playback"]["host_stream"] = self._host_stream_state(link.playback)
            vms[name] = entry
        watcher = self.policy_watcher
        streams = [vm["playback"].get("host_stream") for vm in vms.values() if "playback" in vm]
        return {
            "version": __version__,
            "host": {
                "server": self.server or "the session's default",
                # Known only from the VMs' streams: the loop never asks the
                # server itself, it must not wait for it.
                "reachable": None if not streams else "unreachable" not in streams,
            },
            "vms": vms,
            "policy": {
                "dir": str(watcher.directory),
                "loaded": watcher.ever_loaded,
                "files": list(watcher.policy.files),
                "problems": [str(p) for p in watcher.problems],
            },
        }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qvaudio-dom0",
        description="Serve the audio of every VM from dom0 (or an audio VM): find the VMs, "
        "apply each one's policy, and play each as its own stream on the host audio server.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help=f"main config file (default: {CONFIG_DEFAULT_HELP})",
    )
    parser.add_argument(
        "--transport",
        action="append",
        type=flag_type("dom0", "transports"),
        metavar="SPEC",
        help="how VMs reach this agent, instead of the config's dom0.transports; repeatable: "
        "'xen' (XenStore), 'unix:DIR' (a socket per VM, named after it), "
        "'vsock:NAME=CID,...', 'qrexec' (Qubes: VMs call the qvaudio.Audio service)",
    )
    parser.add_argument(
        "--policy-dir",
        type=Path,
        metavar="DIR",
        help=f"policy directory (default: the config's dom0.policy_dir, else "
        f"{POLICY_DIR_DEFAULT_HELP})",
    )
    parser.add_argument(
        "--control-socket",
        type=Path,
        metavar="PATH",
        help="control socket path (default: the config's dom0.control_socket, else "
        "$XDG_RUNTIME_DIR/qvaudio/control.sock)",
    )
    parser.add_argument(
        "--pulse-server",
        metavar="SERVER",
        help="host audio server (default: the config's dom0.pulse_server, else the session's)",
    )
    parser.add_argument(
        "--latency-ms",
        type=flag_type("dom0", "playback_latency_ms"),
        metavar="MS",
        help="target latency of each VM's stream on the host server "
        f"({flag_range('dom0', 'playback_latency_ms')}; dom0.playback_latency_ms)",
    )
    parser.add_argument(
        "--reserve-ms",
        type=flag_type("dom0", "playback_reserve_ms"),
        metavar="MS",
        help="audio held for each VM before its host stream starts, the least jitter reserve "
        f"({flag_range('dom0', 'playback_reserve_ms')}; dom0.playback_reserve_ms)",
    )
    parser.add_argument("--no-notifications", action="store_true",
                        help="do not show desktop notifications")  # fmt: skip
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log detail")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


#: Flags that override one config key each: (flag's dest, dom0 setting).
FLAG_SETTINGS = (
    ("pulse_server", "pulse_server"),
    ("latency_ms", "playback_latency_ms"),
    ("reserve_ms", "playback_reserve_ms"),
)


def settings_from(args: argparse.Namespace, base: Dom0Settings) -> Dom0Settings:
    """The config's dom0 settings with the command line's overrides."""
    # `is not None`: 0 is a value, and every flag was checked like the file's key.
    overrides: dict[str, Any] = {
        key: getattr(args, dest) for dest, key in FLAG_SETTINGS if getattr(args, dest) is not None
    }
    if args.transport:
        overrides["transports"] = tuple(args.transport)
    if args.no_notifications:
        overrides["notifications"] = False
    return replace(base, **overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    require("qvaudio-dom0", "numpy")
    setup_logging(args.verbose)
    raise_priority("qvaudio.dom0")  # before any thread starts: they inherit it
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    settings = settings_from(args, config.dom0)
    policy_dir = args.policy_dir or (
        Path(settings.policy_dir) if settings.policy_dir else default_policy_dir()
    )
    control_path = args.control_socket or (
        Path(settings.control_socket) if settings.control_socket else default_socket_path()
    )
    # Host streams are written from threads of their own, which wait for the
    # interpreter lock while the loop works; the default 5 ms a holder may keep
    # it is a quarter of a VM's whole jitter reserve. 1 ms keeps one VM's work
    # from delaying another's sound.
    sys.setswitchinterval(0.001)
    agent = Dom0Agent(settings, policy_dir=policy_dir, control_path=control_path)
    agent.install_signal_handlers()
    return agent.run()


if __name__ == "__main__":
    sys.exit(main())
