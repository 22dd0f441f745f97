"""How the dom0 agent finds VMs and connects to them, and lets them go.

Discovery sources (XenStore, a socket directory, a vsock map) say which VMs
exist and who they are; a VM dom0 may connect to (its `Backoff` says when)
gets a transport and a `VmSession`, a few new ones a turn. A VM that calls in
over qrexec is taken as qrexec names it. A VM that went away is said goodbye
to, and its microphone grant ends.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import time

from qvaudio.core.dom0_backoff import Backoff
from qvaudio.core.dom0_session import VmSession
from qvaudio.core.events import GoodbyeCode
from qvaudio.core.policy import VmIdentity
from qvaudio.dom0.agent_base import CONNECTS_PER_TURN, AgentBase, VmLink, log
from qvaudio.dom0.discovery import Target
from qvaudio.transport import UnixAddress, connect
from qvaudio.transport.base import PeerUnavailable, Stream, TransportError


class Connections(AgentBase):
    """The agent's part that keeps `links` in step with the VMs there are."""

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
        log.info("%s: connected over qrexec (identity from QREXEC_REMOTE_DOMAIN)", name)
        self._open_link(target, stream, now, discovered=False)

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
        log.info("%s: connected over %s (%s)", name, target.address, target.origin)
        self._open_link(target, stream, now)

    def _open_link(
        self, target: Target, stream: Stream, now: float, *, discovered: bool = True
    ) -> None:
        """A VM's transport is up: its session starts, under the policy in force now."""
        session = VmSession(
            target.identity, self.policy, now, grants=self.grants, limits=self.limits
        )
        link = VmLink(target, stream, session, now, discovered=discovered)
        self.links[target.identity.name] = link
        self._execute(link, session.start(now))

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
        limiter = self.log_limiters.get(link.name)
        if limiter is not None:
            # Held lines wait for the VM's next line, which may never come now.
            for level, message in limiter.release(now):
                log.log(level, "%s: %s", link.name, message)
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
