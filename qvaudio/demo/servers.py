"""What the demo asks its audio servers and its qvaudio-dom0 while it runs."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from qvaudio.core.policy import Access
from qvaudio.demo import VM_NAME, DemoError
from qvaudio.dom0.control import ControlError, request
from qvaudio.pulse.private import PrivatePulse


def _pulsectl() -> Any:
    try:
        import pulsectl
    except (ImportError, OSError) as exc:
        raise DemoError(f"the PulseAudio client library is missing: {exc}") from None
    return pulsectl


def check_your_server(server: str | None) -> None:
    """Fail at once, in one line, when --speakers has no audio server to play to."""
    pulsectl = _pulsectl()
    from qvaudio.pulse.devices import connect

    try:
        with connect("qvaudio-demo", server):
            return
    except pulsectl.PulseError:
        pass
    where = server or os.environ.get("PULSE_SERVER") or "your session's default"
    raise DemoError(
        f"--speakers plays to your audio server, and none answers at {where}: start "
        "PulseAudio (or PipeWire's pulse server) in your session, or leave out --speakers"
    )


def default_sink_is(vm: PrivatePulse, sink: str) -> bool:
    pulsectl = _pulsectl()
    from qvaudio.pulse.devices import connect

    try:
        with connect("qvaudio-demo", vm.server) as pulse:
            return bool(pulse.server_info().default_sink_name == sink)
    except pulsectl.PulseError:
        return False


def stream_monitor(server: str | None, dom0_pid: int) -> str | None:
    """The monitor of the sink that the demo's dom0 plays the VM to, once it does."""
    pulsectl = _pulsectl()
    from qvaudio.dom0.host import VM_PROPERTY
    from qvaudio.pulse.devices import connect

    try:
        with connect("qvaudio-demo", server) as pulse:
            for stream in pulse.sink_input_list():
                if stream.proplist.get(VM_PROPERTY) != VM_NAME:
                    continue
                # Only ours: a real qvaudio-dom0 may be playing a VM of that name.
                pid = stream.proplist.get("application.process.id")
                if pid is None:
                    pid = pulse.client_info(stream.client).proplist.get("application.process.id")
                if pid == str(dom0_pid):
                    return str(pulse.sink_info(stream.sink).monitor_source_name)
    except pulsectl.PulseError:
        return None
    return None


def default_monitor(server: str | None) -> str:
    pulsectl = _pulsectl()
    from qvaudio.pulse.devices import connect

    try:
        with connect("qvaudio-demo", server) as pulse:
            sink = pulse.get_sink_by_name(pulse.server_info().default_sink_name)
            return str(sink.monitor_source_name)
    except pulsectl.PulseError as exc:
        raise DemoError(f"cannot find your audio server's default output: {exc}") from None


def dom0_status(control: Path) -> dict[str, Any] | None:
    with contextlib.suppress(ControlError, OSError):
        return request(control, {"cmd": "status"}, timeout=2)
    return None


def playing(control: Path) -> dict[str, Any] | None:
    vm = vm_status(control)
    if vm is not None and vm["playback"].get("active"):
        return vm
    return None


def decided(control: Path) -> dict[str, Any] | None:
    """The VM's status once dom0 plays it or its policy has refused it.

    A person whose policy denies playback learns that at once, and the demo
    still plays the tone to show that nothing gets through.
    """
    vm = vm_status(control)
    if vm is None:
        return None
    if vm.get("state") == "closed":
        raise DemoError(f"qvaudio-dom0 closed the VM's connection: {vm.get('close_reason')}")
    if vm["playback"].get("active") or denied(vm):
        return vm
    return None


def denied(vm: dict[str, Any]) -> bool:
    return bool(vm["playback"].get("decision") == Access.DENY)


def vm_status(control: Path) -> dict[str, Any] | None:
    status = dom0_status(control)
    vm = (status or {}).get("vms", {}).get(VM_NAME)
    if vm and isinstance(vm.get("playback"), dict):
        return vm  # type: ignore[no-any-return]
    return None
