"""The microphone grants a user gives with `qvaudio mic attach VM`, and their rules. No I/O.

One set for the whole dom0 agent, by VM name, kept across a VM's
reconnections; every `VmSession` reads its own VM's grant from it. Two rules
live here and nowhere else:

- attaching is for VMs whose policy says `attach-on-request` (one that may
  always record needs no grant, one that may never cannot get one);
- a policy that denies a VM capture ends its grant: a deny is the user's
  stronger word, so relaxing the policy later does not silently reopen the
  microphone.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping

from qvaudio.core.policy import Access, Decision, Direction, Policy, VmIdentity, evaluate


class MicGrants:
    """Which VMs the user attached the microphone to."""

    def __init__(self, names: Collection[str] = ()) -> None:
        self._names = set(names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._names))

    def set(self, name: str, attached: bool) -> None:
        """Grant (or revoke) as the user said, with no questions: see `request`."""
        if attached:
            self._names.add(name)
        else:
            self._names.discard(name)

    def request(self, attach: bool, vm: VmIdentity, policy: Policy) -> str | None:
        """`qvaudio mic attach|detach`: change the grant; why not, if it is refused."""
        if attach:
            decision = evaluate(policy, vm, Direction.CAPTURE)
            if decision.access is not Access.ATTACH_ON_REQUEST:
                why = "already allowed" if decision.access is Access.ALLOW else "denied"
                return (
                    f"the policy says capture is {why} for {vm.name} ({decision.reason}); "
                    "mic attach is for VMs whose policy says attach-on-request"
                )
        self.set(vm.name, attach)
        return None

    def revoke_if_denied(self, capture: Decision) -> bool:
        """End the VM's grant if `capture` (its policy's decision) denies it; True if it did."""
        if capture.access is not Access.DENY or capture.vm.name not in self._names:
            return False
        self._names.discard(capture.vm.name)
        return True

    def policy_changed(self, policy: Policy, known: Mapping[str, VmIdentity]) -> None:
        """A new policy took effect: every grant it denies ends.

        `known` gives the identity (with its tags) of the VMs dom0 is connected
        to; any other granted VM is judged by its name alone.
        """
        for name in list(self._names):
            vm = known.get(name, VmIdentity(name))
            self.revoke_if_denied(evaluate(policy, vm, Direction.CAPTURE))

    def forget(self, name: str) -> None:
        """The VM went away (or is another VM now): its grant ends."""
        self._names.discard(name)

    def keep_only(self, names: Collection[str]) -> None:
        """A VM that went away takes its grant with it: a new VM of that name must ask again."""
        self._names &= set(names)
