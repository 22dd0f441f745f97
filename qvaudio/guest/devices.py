"""The guest agent's devices in the VM's audio server, and a thread that watches them.

`GuestDevices` knows what the agent owns (the virtual output and the virtual
microphone), makes them the defaults, and on exit puts the user's previous
defaults back. It works on any pulsectl connection it is handed.

`AudioServerWatcher` is the only long-lived pulsectl connection: it creates
the devices, then listens to the server's events and reports how many
applications play into the virtual output and record from the virtual
microphone. When the server goes away (restart, crash) it reconnects with
back-off and recreates the devices. It reports to the agent's main loop only
through `post`, never by touching the loop's state. On PulseAudio it also
keeps the virtual output suspended while no application plays into it (see
`qvaudio.core.guest_session.IdleMethod`): it is the first to hear that a stream
appeared, so resuming there adds no hop through the main loop.

On PipeWire both devices are nodes the agent owns
(`qvaudio.pulse.pipewire_node`: the output a `SinkNode` rather than a null
sink, the microphone a `SourceNode` the agent feeds rather than a remapped
null sink's monitor), so that applications' latency queries include the
path behind them (`GuestDevices.publish_latency`,
`publish_capture_latency`); if PipeWire cannot be reached that way, the
modules' devices as on PulseAudio, and a warning.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pulsectl
import pulsectl._pulsectl

from qvaudio.common.runtime import runtime_path
from qvaudio.core.formats import AudioFormat
from qvaudio.core.guest_idle import IdleMethod, idle_method, sink_suspension
from qvaudio.pulse import devices as pulse_devices
from qvaudio.pulse.devices import Pulse
from qvaudio.pulse.pipewire_node import PipeWireError, SinkNode, SourceNode

log = logging.getLogger(__name__)

CLIENT_NAME: Final = "qvaudio-guest"
# Retrying a local socket costs next to nothing, while every second spent
# waiting after the audio server came back is a second of silence.
FIRST_RETRY_S: Final = 0.1
MAX_RETRY_S: Final = 0.5
#: How long `stop` keeps nudging the watcher out of its event wait.
STOP_TIMEOUT_S: Final = 3.0
#: For this long after creating the devices, a default moved away from them
#: is taken back: a session manager starting with the audio server restores
#: its remembered default a moment later. After it, a change is the user's.
DEFAULTS_GRACE_S: Final = 5.0
#: How often, inside that window, the defaults are checked without an event.
DEFAULTS_CHECK_S: Final = 0.5
#: How long the node, once PipeWire has it, may take to show in pipewire-pulse.
NODE_VISIBLE_S: Final = 5.0
_EVENT_FACILITIES: Final = ("sink_input", "source_output", "sink", "source", "server")


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    sink_name: str
    sink_description: str
    source_name: str
    source_description: str
    sink_format: AudioFormat
    source_format: AudioFormat
    #: On PipeWire, a node of our own that reports the latency behind it.
    report_latency: bool = False
    #: Its PipeWire socket; None for libpipewire's default.
    pipewire_remote: str | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    """Applications playing into the virtual output / recording the virtual microphone."""

    players: int
    recorders: int


@dataclass(frozen=True, slots=True)
class DevicesReady:
    usage: Usage
    idle_method: IdleMethod


@dataclass(frozen=True, slots=True)
class UsageChanged:
    usage: Usage


@dataclass(frozen=True, slots=True)
class ServerLost:
    reason: str


WatcherEvent = DevicesReady | UsageChanged | ServerLost


class GuestDevices:
    """Create, find and remove what the agent owns; remember the user's defaults."""

    def __init__(self, spec: DeviceSpec, state_file: Path | None = None) -> None:
        self.spec = spec
        # The user's defaults must survive our crash: the next run adopts
        # devices that are already the defaults and reads them from here.
        self.state_file = state_file or runtime_path("guest-defaults.json")
        self.previous_sink: str | None = None
        self.previous_source: str | None = None
        # The watcher's thread makes and replaces the nodes; the main loop
        # publishes latencies on them and feeds the microphone's.
        self._output = _NodeSlot("virtual output")
        self._mic = _NodeSlot("virtual microphone")

    @property
    def names(self) -> tuple[str, str]:
        return self.spec.sink_name, self.spec.source_name

    def setup(self, pulse: Pulse) -> None:
        """Create (or adopt) both devices and make them the defaults."""
        spec = self.spec
        if not self._ensure_node(pulse, self._output, SinkNode, spec.sink_name,
                                 spec.sink_description, spec.sink_format):  # fmt: skip
            # PulseAudio: a latency offset would be set on the sink's active
            # port, and a null sink has none; the path stays unreported there.
            pulse_devices.ensure_null_sink(
                pulse, spec.sink_name, spec.sink_description, spec.sink_format
            )
        if not self._ensure_node(pulse, self._mic, SourceNode, spec.source_name,
                                 spec.source_description, spec.source_format):  # fmt: skip
            pulse_devices.ensure_virtual_source(
                pulse, spec.source_name, spec.source_description, spec.source_format
            )
        self._remember_defaults(pulse)
        pulse_devices.set_default_sink(pulse, spec.sink_name)
        pulse_devices.set_default_source(pulse, spec.source_name)

    @property
    def reports_latency(self) -> bool:
        """The virtual output tells applications the path behind it (a live node)."""
        return self._output.live

    @property
    def reports_capture_latency(self) -> bool:
        """The virtual microphone tells recording applications the path before it."""
        return self._mic.live

    def _ensure_node(
        self,
        pulse: Pulse,
        slot: _NodeSlot,
        kind: type[SinkNode] | type[SourceNode],
        name: str,
        description: str,
        fmt: AudioFormat,
    ) -> bool:
        """On PipeWire, make a virtual device our node (again, if the last one died).

        False: a module's device it is (PulseAudio, not wanted, or PipeWire
        would not take the node)."""
        if not self.spec.report_latency:
            return False
        if idle_method(str(pulse.server_info().server_name)) is not IdleMethod.PASSIVE_MONITOR:
            return False
        find = pulse_devices.find_sink if kind is SinkNode else pulse_devices.find_source
        node = slot.node
        if node is not None and node.alive and find(pulse, name) is not None:
            return True
        if node is not None and node.format is not None:
            fmt = node.format  # a microphone node remade in the format agreed since
        # A null sink (or remapped monitor) of ours from a run without the node.
        pulse_devices.remove_owned_modules(pulse, [name])
        try:
            node = kind.open(name, description, fmt, remote=self.spec.pipewire_remote)
        except PipeWireError as exc:
            slot.failed(f"PipeWire would not take it: {exc}")
            return False
        if not _wait_for(lambda: find(pulse, name) is not None, NODE_VISIBLE_S):
            # Another PipeWire than the one behind this pulse server (a
            # session default that is not ours): not our virtual device.
            node.close()
            slot.failed(f"the node did not appear in the audio server within "
                        f"{NODE_VISIBLE_S:.0f} s (another PipeWire?)")  # fmt: skip
            return False
        slot.install(node)
        log.info("%s %s is a PipeWire node reporting the latency behind it", slot.what, name)
        return True

    def publish_latency(self, latency_ns: int) -> None:
        """Tell applications that what they play is heard `latency_ns` after it leaves the
        virtual output (kept for a node made later). Any thread."""
        self._output.publish(latency_ns)

    def publish_capture_latency(self, latency_ns: int) -> None:
        """Tell recording applications that what they read was heard `latency_ns` before
        it left the virtual microphone. Any thread."""
        self._mic.publish(latency_ns)

    def mic_node(self, fmt: AudioFormat) -> SourceNode | None:
        """The virtual microphone's node, to be fed `fmt`; None when it is a module's device.

        A node made in another format is made again in `fmt` (the agreed
        capture format was not the first offered): the node only carries
        audio, PipeWire converts it for each recorder."""
        node = self._mic.node
        if not isinstance(node, SourceNode) or not node.alive:
            return None
        if node.format == fmt:
            return node
        log.info("virtual microphone node made again in %s", fmt.spec())
        self._mic.close()  # first: two nodes of one name would be two sources
        try:
            again = SourceNode.open(
                self.spec.source_name, self.spec.source_description, fmt,
                remote=self.spec.pipewire_remote,
            )  # fmt: skip
        except PipeWireError as exc:
            log.warning("cannot make the virtual microphone in %s: %s", fmt.spec(), exc)
            return None
        self._mic.install(again)
        return again

    def close_node(self) -> None:
        """Take the virtual devices' nodes out of PipeWire (idempotent)."""
        self._output.close()
        self._mic.close()

    def _remember_defaults(self, pulse: Pulse) -> None:
        sink = pulse_devices.get_default_sink(pulse)
        source = pulse_devices.get_default_source(pulse)
        saved = self._load_saved()
        self.previous_sink = sink if sink != self.spec.sink_name else saved.get("sink")
        own_source = (self.spec.source_name, pulse_devices.backing_sink_name(self.spec.source_name))
        if source in own_source or source.startswith(self.spec.sink_name + "."):
            self.previous_source = saved.get("source")
        else:
            self.previous_source = source
        self._save({"sink": self.previous_sink, "source": self.previous_source})

    def reclaim_defaults(self, pulse: Pulse) -> bool:
        """Make our devices the defaults again if something moved them; True if it did."""
        moved = False
        if pulse_devices.get_default_sink(pulse) != self.spec.sink_name:
            pulse_devices.set_default_sink(pulse, self.spec.sink_name)
            moved = True
        if pulse_devices.get_default_source(pulse) != self.spec.source_name:
            pulse_devices.set_default_source(pulse, self.spec.source_name)
            moved = True
        return moved

    def teardown(self, pulse: Pulse) -> None:
        """Give the user back their defaults, then unload our modules."""
        sinks = {s.name for s in pulse.sink_list()}
        sources = {s.name for s in pulse.source_list()}
        restore = (
            ("sink", pulse_devices.get_default_sink, pulse_devices.set_default_sink,
             self.spec.sink_name, self.previous_sink, sinks),
            ("source", pulse_devices.get_default_source, pulse_devices.set_default_source,
             self.spec.source_name, self.previous_source, sources),
        )  # fmt: skip
        for kind, get_default, set_default, ours, previous, present in restore:
            # Only where the default is still ours: a default the user chose
            # while we ran is theirs to keep.
            if get_default(pulse) == ours and previous is not None and previous in present:
                set_default(pulse, previous)
                log.info("default %s restored to %s", kind, previous)
        # Nodes first: `remove_owned_modules` waits for every device of these
        # names to go, and a node goes only when closed.
        self.close_node()
        removed = pulse_devices.remove_owned_modules(pulse, self.names)
        log.info("removed %d module(s) of the virtual devices", removed)
        self.state_file.unlink(missing_ok=True)

    def present(self, pulse: Pulse) -> bool:
        sinks = {s.name for s in pulse.sink_list()}
        sources = {s.name for s in pulse.source_list()}
        return self.spec.sink_name in sinks and self.spec.source_name in sources

    def keep_idle_sink_quiet(self, pulse: Pulse, method: IdleMethod, players: int) -> None:
        """Suspend or resume the virtual output as `sink_suspension` decides."""
        sink = pulse.get_sink_by_name(self.spec.sink_name)
        change = sink_suspension(method, players, sink.state == "suspended")
        if change is not None:
            pulse.sink_suspend(sink.index, int(change))
            log.debug("%s %s", "suspended" if change else "resumed", self.spec.sink_name)

    def usage(self, pulse: Pulse) -> Usage:
        sink = pulse.get_sink_by_name(self.spec.sink_name)
        players = sum(1 for si in pulse.sink_input_list() if si.sink == sink.index)
        recorders = pulse_devices.source_output_count(pulse, self.spec.source_name)
        return Usage(players, recorders)

    def _load_saved(self) -> dict[str, str]:
        try:
            data = json.loads(self.state_file.read_text("utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if isinstance(v, str)}

    def _save(self, data: dict[str, str | None]) -> None:
        try:
            self.state_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(data), "utf-8")
            tmp.replace(self.state_file)
        except OSError as exc:
            log.warning("cannot remember the previous defaults in %s: %s", self.state_file, exc)


class AudioServerWatcher:
    """A thread owning a pulsectl connection: devices, usage counts, reconnects."""

    def __init__(
        self, devices: GuestDevices, server: str | None, post: Callable[[WatcherEvent], None]
    ) -> None:
        self.devices = devices
        self.server = server
        self._post = post
        self._stopping = threading.Event()
        self._pulse: Any = None
        self._thread = threading.Thread(target=self._run, name="pulse-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the thread. pulsectl's stop request is lost if it comes between
        two waits, so it is repeated until the thread has gone."""
        self._stopping.set()
        deadline = STOP_TIMEOUT_S
        while self._thread.is_alive() and deadline > 0:
            pulse = self._pulse
            if pulse is not None:
                pulse.event_listen_stop()
            self._thread.join(0.05)
            deadline -= 0.05
        if self._thread.is_alive():
            log.warning("the audio server watcher did not stop in time")

    def _run(self) -> None:
        delay = FIRST_RETRY_S
        lost_before = False
        while not self._stopping.is_set():
            try:
                with pulse_devices.connect(CLIENT_NAME + "-watch", self.server) as pulse:
                    method = idle_method(str(pulse.server_info().server_name))
                    self.devices.setup(pulse)
                    usage = self.devices.usage(pulse)
                    self.devices.keep_idle_sink_quiet(pulse, method, usage.players)
                    if lost_before:
                        log.info("audio server is back: virtual devices recreated")
                    self._post(DevicesReady(usage, method))
                    delay = FIRST_RETRY_S
                    self._pulse = pulse
                    self._watch(pulse, usage, method)
            except (
                pulsectl.PulseError,
                pulsectl.PulseDisconnected,
                RuntimeError,
                LookupError,
                OSError,
            ) as exc:
                if self._stopping.is_set():
                    break
                reason = str(exc) or "connection lost"
                if not lost_before or delay == FIRST_RETRY_S:
                    log.warning("audio server unavailable (%s); retrying", reason)
                lost_before = True
                self._post(ServerLost(reason))
            finally:
                self._pulse = None
            if self._stopping.wait(delay):
                break
            delay = min(delay * 2, MAX_RETRY_S)

    def _watch(self, pulse: Pulse, usage: Usage, method: IdleMethod) -> None:
        changed = False
        grace_until = time.monotonic() + DEFAULTS_GRACE_S

        def on_event(_event: Any) -> None:
            nonlocal changed
            changed = True
            # Stop the listen so the counts can be queried (pulsectl forbids
            # calls from inside its callbacks); the events themselves only
            # say that something changed.
            raise pulsectl.PulseLoopStop

        pulse.event_mask_set(*_EVENT_FACILITIES)
        pulse.event_callback_set(on_event)
        while not self._stopping.is_set():
            grace_left = grace_until - time.monotonic()
            # pulsectl also runs the callback during our own queries below, and
            # the stop it raises there is forgotten when the next listen begins:
            # a change seen then would wait for the one after it (or for the
            # end of the grace window, too late to take the defaults back).
            if not changed:
                # Raises PulseDisconnected when the server goes.
                timeout = min(grace_left, DEFAULTS_CHECK_S) if grace_left > 0 else None
                pulse.event_listen(timeout=timeout)
            if self._stopping.is_set():
                continue
            # Judged when the change is seen, not when the wait began: a wait
            # begun inside the window may end with the user's own choice.
            if time.monotonic() < grace_until:
                self._take_back_defaults()
            if not changed:
                continue
            changed = False
            if not self.devices.present(pulse):
                log.warning("the virtual devices were removed by someone else: recreating them")
                self.devices.setup(pulse)
            now = self.devices.usage(pulse)
            self.devices.keep_idle_sink_quiet(pulse, method, now.players)
            if now != usage:
                usage = now
                self._post(UsageChanged(usage))

    def _take_back_defaults(self) -> None:
        """Inside the start-up window, make our devices the defaults again if they were moved.

        Asked on a connection of its own, and without waiting for an event:
        PipeWire's pulse server (0.3.65) can go on showing a long-lived
        client the default from before a move, with no event for it, while a
        new connection sees the move (seen for 8 s and more; the watcher's
        own connection missed moves this way)."""
        with pulse_devices.connect(CLIENT_NAME + "-defaults", self.server) as fresh:
            if self.devices.reclaim_defaults(fresh):
                # Also when the server had not yet applied our own setting (PipeWire).
                log.info("the default devices were not ours during start-up: made ours again")


def _wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


class _NodeSlot:
    """Where one virtual device's node lives: replaced by the watcher's thread, used by
    the main loop; the last latency published is kept for a node made later."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._lock = threading.Lock()
        self.node: SinkNode | SourceNode | None = None
        self._latency_ns = 0
        self._failure_logged = False

    @property
    def live(self) -> bool:
        node = self.node
        return node is not None and node.alive

    def install(self, node: SinkNode | SourceNode) -> None:
        with self._lock:
            old, self.node = self.node, node
            latency_ns = self._latency_ns
        if old is not None:
            old.close()
        if latency_ns:
            self._set(node, latency_ns)
        self._failure_logged = False

    def failed(self, reason: str) -> None:
        if not self._failure_logged:
            log.warning("%s as a module's device, applications will not be told the "
                        "latency behind it: %s", self.what, reason)  # fmt: skip
            self._failure_logged = True

    def publish(self, latency_ns: int) -> None:
        with self._lock:
            self._latency_ns = latency_ns
            node = self.node
        if node is not None and node.alive:
            self._set(node, latency_ns)

    def _set(self, node: SinkNode | SourceNode, latency_ns: int) -> None:
        try:
            node.set_latency_ns(latency_ns)
        except PipeWireError as exc:
            log.debug("could not publish the latency of the %s: %s", self.what, exc)

    def close(self) -> None:
        with self._lock:
            node, self.node = self.node, None
        if node is not None:
            node.close()


def restart_sink_clock(server: str | None, sink_name: str) -> None:
    """Make a null sink take up the latency its streams ask for now, not in 2 s.

    An idle PulseAudio null sink renders in blocks of up to 2 s and only
    reschedules after the current block, so a stream opened on it stalls (a
    playback stream's writes block, a monitor stream gets its first audio
    late, in one lump) for up to that long. Suspending and resuming the sink
    restarts its clock at once with the new, short period. PipeWire's graph
    has no such stall, and there the suspension would only cut a few
    milliseconds out of whatever plays, so it is skipped. A suspended sink
    is left alone: it restarts its clock when resumed, and the watcher keeps
    the idle virtual output suspended on purpose. Best effort: a failure
    only means the stall.
    """
    try:
        with pulse_devices.connect(CLIENT_NAME + "-clock", server) as pulse:
            if idle_method(str(pulse.server_info().server_name)) is not IdleMethod.SUSPEND_SINK:
                return
            sink = pulse.get_sink_by_name(sink_name)
            if sink.state == "suspended":
                return
            pulse.sink_suspend(sink.index, 1)
            pulse.sink_suspend(sink.index, 0)
    except pulsectl.PulseError as exc:
        log.debug("could not restart the clock of %s: %s", sink_name, exc)
