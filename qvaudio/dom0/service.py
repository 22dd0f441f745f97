"""One VM's turn in the dom0 agent's loop, and carrying out what its session decides.

Each turn reads at most `READ_TURN_MS` of a VM's audio (what its session's
budget allows), feeds it and the time to the `VmSession`, tells the session
what the host streams reported, writes what the session sends, and carries
out its actions: host streams opened, fed and closed on their own threads,
log lines through the VM's limiter, notifications, disconnects. Whatever
goes wrong while serving one VM costs that VM its connection only.
"""

from __future__ import annotations

import contextlib
import selectors
import time
from collections.abc import Iterator, Sequence

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
from qvaudio.core.events import GoodbyeCode
from qvaudio.dom0.agent_base import MAX_OUTBOX, READ_MIN, READ_TURN_MS, AgentBase, VmLink, log
from qvaudio.dom0.host import HostCapture, HostPlayback
from qvaudio.transport.base import StreamClosed, TransportError


class VmService(AgentBase):
    """The agent's part that serves each connected VM."""

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
            latency = playback.latency_now_us(now) + fmt.duration_us(playback.waiting_bytes)
            session.host_status(
                playback.played_frames, latency, capture.latency_us if capture else 0
            )
            session.host_underruns(*playback.gaps(), now)
            if playback.take_opened():
                session.host_playback_opened()
            refusal = playback.take_refusal()
            if refusal is not None:
                actions += session.host_playback_failed(refusal, now)
        elif capture is not None:
            # A VM may record without playing: its recorder's latency counts too.
            session.host_capture_status(capture.latency_us)
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
                case Log(level=level, message=message, once_per_session=once):
                    self._log_for(name, level, message, once_per_session=once)
                case Notify(summary=summary, body=body):
                    self.notifier.notify(summary, body)
                case Disconnect(code=code):
                    self._flush_once(link)
                    self._drop(link, code)

    def _log_for(
        self, name: str, level: int, message: str, *, once_per_session: bool = False
    ) -> None:
        """A VM's line, within its share of the journal. A line this logger
        would drop (debug, by default) spends nothing: otherwise debug lines
        nobody sees could hold back the warning after them."""
        if not log.isEnabledFor(level):
            return
        allowed, summaries = self._log_limits(name).allow(
            level, message, time.monotonic(), exempt=once_per_session
        )
        for held_level, held in summaries:
            log.log(held_level, "%s: %s", name, held)
        if allowed:
            log.log(level, "%s: %s", name, message)

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

    def _flush_once(self, link: VmLink) -> None:
        with contextlib.suppress(TransportError):
            if link.outbox:
                link.stream.write(link.outbox)
