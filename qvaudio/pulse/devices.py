"""The guest's virtual audio devices, through pulsectl (control only, no PCM).

The guest agent owns two devices in the VM's audio server: a null sink that
applications play into (its monitor is what the agent records and sends to
dom0) and a virtual microphone (a remapped monitor of a second, hidden null
sink that the agent plays dom0's capture into). Everything here is plain
module loading with arguments both PulseAudio 16 and pipewire-pulse accept,
so the same code runs on either server.

Devices are found by name, not by a remembered index: an agent that crashed
leaves its modules loaded, and the next run adopts them instead of stacking
duplicates.
"""

from __future__ import annotations

import enum
import logging
import re
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

import pulsectl

from qvaudio.core.formats import AudioFormat

log = logging.getLogger(__name__)

NULL_SINK_MODULE: Final = "module-null-sink"
REMAP_SOURCE_MODULE: Final = "module-remap-source"
#: How long a module load/unload may take to show in the device lists.
APPEAR_TIMEOUT_S: Final = 2.0
#: Suffix of the hidden null sink behind a virtual source.
BACKING_SINK_SUFFIX: Final = "_in"

# pulsectl has no type hints; `Pulse` stands for a connected pulsectl.Pulse.
Pulse = Any

_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.\-]+")
_ARG_NAME_RE: Final = re.compile(r"\b(?:sink_name|source_name)=(\"[^\"]*\"|'[^']*'|\S+)")


class DeviceState(enum.Enum):
    """What a sink or source is doing, as the server reports it."""

    RUNNING = "running"  # a stream is connected and not corked
    IDLE = "idle"  # opened but nothing flowing
    SUSPENDED = "suspended"  # closed, nobody uses it


def backing_sink_name(source_name: str) -> str:
    """The null sink whose monitor feeds the virtual source `source_name`."""
    return source_name + BACKING_SINK_SUFFIX


def _check_name(name: str) -> None:
    # Names end up unquoted inside module arguments: keep them to a safe alphabet.
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"device name {name!r} must match {_NAME_RE.pattern}")


def _quote_description(description: str) -> str:
    """A device.description property value that survives both servers' argument parsers."""
    # Both parsers accept a double-quoted value inside a single-quoted one;
    # quotes inside the text itself would end it early: use typographic ones.
    cleaned = description.replace('"', "\u201d").replace("'", "\u2019").replace("\\", "/")
    return f"'device.description=\"{cleaned}\"'"


def find_sink(pulse: Pulse, name: str) -> Any | None:
    """The sink called `name`, or None."""
    for sink in pulse.sink_list():
        if sink.name == name:
            return sink
    return None


def find_source(pulse: Pulse, name: str) -> Any | None:
    """The source called `name`, or None."""
    for source in pulse.source_list():
        if source.name == name:
            return source
    return None


def _appeared(lookup: Callable[[], Any | None], expect: bool = True) -> Any | None:
    """Poll `lookup` until it finds something (or, with expect=False, nothing).

    PulseAudio creates a device before answering the module load but removes
    it only after answering the unload; pipewire-pulse answers both first.
    """
    deadline = time.monotonic() + APPEAR_TIMEOUT_S
    while ((found := lookup()) is None) == expect and time.monotonic() < deadline:
        time.sleep(0.02)
    return found


def ensure_null_sink(pulse: Pulse, name: str, description: str, fmt: AudioFormat) -> int:
    """Return the index of null sink `name`, loading it only if no sink has that name."""
    _check_name(name)
    args = (
        f"sink_name={name} format={fmt.sample_format.pulse_name} rate={fmt.rate} "
        f"channels={fmt.channels} channel_map={fmt.channel_map} "
        f"sink_properties={_quote_description(description)}"
    )
    return _ensure(pulse, ("sink", "null sink"), name, NULL_SINK_MODULE, args, find_sink)


def ensure_virtual_source(pulse: Pulse, name: str, description: str, fmt: AudioFormat) -> int:
    """Return the index of virtual source `name`, creating it (and its backing sink) if missing.

    Audio played into the sink `backing_sink_name(name)` is what applications
    recording from source `name` get. A remapped monitor, rather than the
    monitor itself, so applications see an ordinary input device and not a
    "Monitor of ..." entry.
    """
    _check_name(name)
    backing = backing_sink_name(name)
    ensure_null_sink(pulse, backing, f"{description} (feed)", fmt)
    args = (
        f"master={backing}.monitor source_name={name} "
        f"source_properties={_quote_description(description)}"
    )
    kind = ("source", "virtual source")
    return _ensure(pulse, kind, name, REMAP_SOURCE_MODULE, args, find_source)


def _ensure(
    pulse: Pulse,
    kind: tuple[str, str],
    name: str,
    module_name: str,
    args: str,
    find: Callable[[Pulse, str], Any | None],
) -> int:
    """The index of device `name`: adopted if one exists, else made by loading a module.

    `kind` is what it is called when found (a "sink") and when made (a "null sink").
    """
    found_as, made_as = kind
    existing = find(pulse, name)
    if existing is not None:
        log.info("adopting existing %s %s (index %d)", found_as, name, existing.index)
        return int(existing.index)
    module = pulse.module_load(module_name, args)
    device = _appeared(lambda: find(pulse, name))
    if device is None:
        # The server accepted the module but made no such device: do not leak it.
        pulse.module_unload(module)
        raise RuntimeError(f"{module_name} {args!r} loaded but {found_as} {name} did not appear")
    log.info("created %s %s (index %d, module %d)", made_as, name, device.index, module)
    return int(device.index)


def _device_name_in(argument: str) -> str | None:
    match = _ARG_NAME_RE.search(argument or "")
    return match.group(1).strip("'\"") if match else None


def remove_owned_modules(pulse: Pulse, names: Iterable[str]) -> int:
    """Unload the null-sink/remap-source modules that created devices called `names`.

    A virtual source's backing sink is included automatically. Modules go
    newest first, so a remap goes before the sink it reads from. Returns how
    many were unloaded. Only our two module kinds are touched, whatever their
    arguments, so a user's own devices with other modules are safe.
    """
    wanted: set[str] = set()
    for name in names:
        wanted.update((name, backing_sink_name(name)))
    owned = [
        module
        for module in pulse.module_list()
        if module.name in (NULL_SINK_MODULE, REMAP_SOURCE_MODULE)
        and _device_name_in(module.argument) in wanted
    ]
    for module in sorted(owned, key=lambda m: m.index, reverse=True):
        log.info("unloading %s %s (module %d)", module.name, module.argument, module.index)
        pulse.module_unload(module.index)
    # Both servers answer the unload before the devices are gone; callers
    # (and a following ensure_*) must not see them any more.
    remaining = _appeared(lambda: _still_there(pulse, wanted) or None, expect=False)
    if remaining:
        log.warning("devices still present after unloading their modules: %s", remaining)
    return len(owned)


def _still_there(pulse: Pulse, names: set[str]) -> list[str]:
    devices = [s.name for s in pulse.sink_list()] + [s.name for s in pulse.source_list()]
    return [name for name in devices if name in names]


def get_default_sink(pulse: Pulse) -> str:
    """The default sink's name; "" when the server has none."""
    return str(pulse.server_info().default_sink_name or "")


def get_default_source(pulse: Pulse) -> str:
    """The default source's name; "" when the server has none."""
    return str(pulse.server_info().default_source_name or "")


def set_default_sink(pulse: Pulse, name: str) -> None:
    """Make `name` the default sink (PipeWire needs a session manager for this)."""
    pulse.sink_default_set(name)


def set_default_source(pulse: Pulse, name: str) -> None:
    pulse.source_default_set(name)


def source_output_count(pulse: Pulse, source_name: str) -> int:
    """How many record streams are attached to `source_name`: > 0 means someone is recording."""
    source = find_source(pulse, source_name)
    if source is None:
        raise LookupError(f"no source named {source_name}")
    return sum(1 for out in pulse.source_output_list() if out.source == source.index)


def sink_state(pulse: Pulse, name: str) -> DeviceState:
    sink = find_sink(pulse, name)
    if sink is None:
        raise LookupError(f"no sink named {name}")
    return DeviceState(sink.state._value)


def source_state(pulse: Pulse, name: str) -> DeviceState:
    source = find_source(pulse, name)
    if source is None:
        raise LookupError(f"no source named {name}")
    return DeviceState(source.state._value)


def connect(client_name: str, server: str | None = None) -> Pulse:
    """A connected pulsectl.Pulse (a context manager; close it when done)."""
    return pulsectl.Pulse(client_name, server=server)
