"""What the dom0 agent answers on its control socket: status, mic attach|detach, reload.

`qvaudio status`, `qvaudio mic` and the qvaudio.Admin qrexec service reach
the running agent here. What a grant may be is `MicGrants`' rule, what each
VM's status says is its session's; this part finds the VM and puts the
answer together.
"""

from __future__ import annotations

import time
from typing import Any

from qvaudio import __version__
from qvaudio.dom0.agent_base import AgentBase, log
from qvaudio.dom0.host import HostPlayback


class ControlCommands(AgentBase):
    """The agent's part that answers control requests."""

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
                    # The host stream's rate, following the VM's clock.
                    matcher = link.playback.rate_matcher
                    entry["playback"]["rate_hz"] = matcher.rate
                    entry["playback"]["drift_ppm"] = round(matcher.drift_ppm, 1)
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
