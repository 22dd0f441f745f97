"""The common ground of dom0's session of one VM. No I/O, no clock: time is an argument.

`VmSession` is put together from two sides that decide apart, playback
(`dom0_playback`) and the microphone (`dom0_capture`), on what this module
holds for both: who the VM is and what the policy decides for it, the
limits, what the guest has cost so far (`GuestMeter`), the counters, and how
a guest is cut off.
"""

from __future__ import annotations

import logging

from qvaudio.core.actions import Log, Send
from qvaudio.core.dom0_actions import Action, Disconnect
from qvaudio.core.dom0_grants import MicGrants
from qvaudio.core.dom0_limits import Counters, Limits
from qvaudio.core.dom0_meter import GuestMeter
from qvaudio.core.events import Goodbye, GoodbyeCode, ProtocolError, StreamKind, clip_reason
from qvaudio.core.formats import AudioFormat
from qvaudio.core.policy import Decision, Direction, Policy, VmIdentity, evaluate
from qvaudio.core.session import Session


class VmSessionBase(Session):
    """What both sides of dom0's session of one VM share."""

    def _init_vm(
        self,
        vm: VmIdentity,
        policy: Policy,
        now: float,
        grants: MicGrants | None,
        limits: Limits | None,
    ) -> None:
        """The common ground's state (`VmSession.__init__` calls it first)."""
        self.vm = vm
        self.limits = limits or Limits()
        self.counters = Counters()
        #: The user's microphone grants: dom0's own set, shared by every session.
        self.grants = grants if grants is not None else MicGrants()
        self._meter = GuestMeter(self.limits, now)
        self._policy = policy
        self._playback = evaluate(policy, vm, Direction.PLAYBACK)
        self._capture = evaluate(policy, vm, Direction.CAPTURE)

    @property
    def playback_decision(self) -> Decision:
        return self._playback

    @property
    def capture_decision(self) -> Decision:
        return self._capture

    @property
    def playback_format(self) -> AudioFormat | None:
        return self.conn.format(StreamKind.PLAYBACK)

    @property
    def capture_format(self) -> AudioFormat | None:
        return self.conn.format(StreamKind.CAPTURE)

    def _decide(self, policy: Policy) -> None:
        """Evaluate `policy` for this VM, both directions: the session's one evaluation."""
        self._policy = policy
        self._playback = evaluate(policy, self.vm, Direction.PLAYBACK)
        self._capture = evaluate(policy, self.vm, Direction.CAPTURE)

    def _stop_streams(self, reason: str) -> list[Action]:
        """Stop every host stream of this VM (`VmSession` knows both sides)."""
        raise NotImplementedError

    def _cut_off(
        self, code: GoodbyeCode, reason: str, exc: ProtocolError | None = None
    ) -> list[Action]:
        actions: list[Action] = [
            Log(logging.WARNING, f"cut off: {reason}", once_per_session=True),
            *self._stop_streams(reason),
        ]
        goodbye = (
            self.conn.goodbye_for(exc)
            if exc is not None
            else self.conn.send(Goodbye(code, clip_reason(reason)))
        )
        actions += [Send(goodbye), Disconnect(code, reason)]
        self._end(reason)
        return actions

    def _too_many_host_opens(self) -> list[Action]:
        per_minute = self.limits.host_opens_per_minute
        return self._cut_off(
            GoodbyeCode.RATE_EXCEEDED,
            f"made dom0 open host streams more than {per_minute:g} times a minute "
            "(format or microphone changes)",
        )
