"""What the dom0 agent's parts share: its state, its plumbing, and the VM links.

`qvaudio-dom0` is one selector loop (`qvaudio.dom0.agent.Dom0Agent`) made of
parts that each do one job on this common state: finding and connecting VMs
(`connections`), serving each VM's turn (`service`) and answering the
control socket (`commands`). What each part asks of another is declared
here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import selectors
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from qvaudio.common.config import Dom0Settings
from qvaudio.common.notify import Notifier
from qvaudio.core.cost import LogLimiter
from qvaudio.core.dom0_actions import Action
from qvaudio.core.dom0_backoff import Backoff
from qvaudio.core.dom0_grants import MicGrants
from qvaudio.core.dom0_limits import Limits
from qvaudio.core.dom0_session import VmSession
from qvaudio.core.events import GoodbyeCode
from qvaudio.core.policy import Policy
from qvaudio.dom0.control import ControlServer
from qvaudio.dom0.discovery import (
    Discovery,
    Target,
    UnixDirDiscovery,
    VsockDiscovery,
    XenDiscovery,
)
from qvaudio.dom0.host import HostCapture, HostPlayback
from qvaudio.dom0.policy_watch import PolicyWatcher
from qvaudio.transport.addresses import (
    QrexecSource,
    UnixDirSource,
    VsockSource,
    XenSource,
    parse_source,
)
from qvaudio.transport.base import Stream
from qvaudio.transport.qrexec import HandoffListener, default_handoff_path

#: The agent's own logger: every part logs as qvaudio-dom0.
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


class AgentBase:
    """The dom0 agent's state and plumbing; the parts build on it."""

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

    def _close_host(self, host: HostPlayback | HostCapture | None) -> None:
        if host is not None:
            host.stop()
            self._closing_host.append(host)
        self._closing_host = [h for h in self._closing_host if h.alive]

    # -- what one part asks of another ------------------------------------------------------

    def handle_control(self, request: dict[str, Any]) -> dict[str, Any]:
        """A control socket request (`commands`)."""
        raise NotImplementedError

    def _all_targets(self) -> dict[str, Target]:
        """Every VM the discovery sources know (`connections`)."""
        raise NotImplementedError

    def _drop(self, link: VmLink, code: GoodbyeCode | None) -> None:
        """Forget a link and close its transport (`connections`)."""
        raise NotImplementedError

    def _execute(self, link: VmLink, actions: Sequence[Action]) -> None:
        """Carry out what a VM's session decided (`service`)."""
        raise NotImplementedError
