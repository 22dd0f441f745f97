"""The guest agent's event loop: a thin I/O shell around `GuestSession`.

`GuestSession` makes every protocol decision. The main thread runs one
`selectors` loop over the transport listener, the connection to dom0, and a
mailbox that the worker threads post to:

* `AudioServerWatcher` (qvaudio.guest.devices): creates the virtual output
  and microphone, reports how many applications use them, reconnects to the
  audio server when it restarts;
* `MonitorReader` (qvaudio.guest.pcm_threads): records the virtual output's
  monitor while dom0 takes playback;
* `MicWriter`: plays dom0's microphone audio into the virtual microphone
  (open while dom0 is connected, for the same reason as the monitor; which
  of the two run, and why the monitor runs even while nothing plays, is
  `qvaudio.guest.workers`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Any, Final

import pulsectl

from qvaudio.common.config import GuestSettings
from qvaudio.common.notify import Notifier
from qvaudio.common.sdnotify import sd_notify, watchdog_interval
from qvaudio.core.actions import Log, Notify, Send
from qvaudio.core.formats import AudioFormat
from qvaudio.core.guest_idle import IdleMethod
from qvaudio.core.guest_session import (
    Action,
    Disconnect,
    GuestConfig,
    GuestSession,
    GuestState,
    LatencyReport,
    MicAudio,
    MicFormat,
    StartMonitor,
    StopMonitor,
)
from qvaudio.core.reported_latency import ReportedLatency
from qvaudio.guest.devices import (
    AudioServerWatcher,
    DeviceSpec,
    DevicesReady,
    GuestDevices,
    ServerLost,
    Usage,
    UsageChanged,
)
from qvaudio.guest.outbox import Outbox
from qvaudio.guest.pcm_threads import Mailbox, MonitorAudio, MonitorFailed
from qvaudio.guest.status import StatusFile, default_status_path
from qvaudio.guest.workers import PcmWorkers
from qvaudio.pulse import devices as pulse_devices
from qvaudio.transport import Listener, Stream, StreamClosed, TransportError, listen, parse_address

log = logging.getLogger(__name__)

#: How often the connection's liveness is checked.
TICK_S: Final = 0.5
#: The status file is rewritten at most this often (and only when it changed).
STATUS_EVERY_S: Final = 2.0
#: Audio allowed to wait for a slow transport before the oldest is dropped.
OUTBOX_AUDIO_MS: Final = 250
READS_PER_WAKEUP: Final = 16
READ_CHUNK: Final = 65536
THREAD_JOIN_S: Final = 1.0


class GuestAgent:
    def __init__(self, settings: GuestSettings, status_path: Path | None = None) -> None:
        self.settings = settings
        self.server = settings.pulse_server or None
        self.mailbox = Mailbox()
        self.devices = GuestDevices(
            DeviceSpec(
                sink_name=settings.sink_name,
                sink_description=settings.sink_description,
                source_name=settings.source_name,
                source_description=settings.source_description,
                sink_format=settings.formats[0],
                source_format=settings.capture_formats[0],
                report_latency=settings.report_latency,
                pipewire_remote=settings.pipewire_remote or None,
            )
        )
        self.watcher = AudioServerWatcher(self.devices, self.server, self.mailbox.post)
        self.notifier = Notifier(enabled=True)
        self.status = StatusFile(status_path or default_status_path())
        self.selector = selectors.DefaultSelector()
        self.listener: Listener | None = None
        self.listener_fd = -1
        self.stream: Stream | None = None
        self.stream_events = 0
        self.session: GuestSession | None = None
        self.outbox = Outbox(settings.formats[0].bytes_for_ms(OUTBOX_AUDIO_MS))
        self.workers = PcmWorkers(self.mailbox, self.server, settings)
        self.playback_format: AudioFormat | None = None
        self.mic_format: AudioFormat | None = None
        self.devices_ready = False
        self.usage = Usage(0, 0)
        self.idle_method = IdleMethod.SUSPEND_SINK
        self.stopping = False
        self.told_ready = False
        self.latency_report = LatencyReport()
        self.reported_latency = ReportedLatency(settings.latency_round_ms)
        self.reported_capture_latency = ReportedLatency(settings.latency_round_ms)
        self.bytes_sent_before = 0  # by earlier connections
        self.next_tick = 0.0
        self.next_status = 0.0
        self.status_dirty = True
        self.watchdog = watchdog_interval()
        self.next_watchdog = 0.0

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> int:
        try:
            self.listener = listen(parse_address(self.settings.transport))
        except TransportError as exc:
            log.error("cannot listen for dom0: %s", exc)
            return 1
        log.info("listening for dom0 on %s", self.listener.address)
        self._register_listener()
        self.selector.register(self.mailbox.fileno(), selectors.EVENT_READ, "mailbox")
        self._install_signal_handlers()
        self.watcher.start()
        try:
            while not self.stopping:
                for key, mask in self.selector.select(self._timeout()):
                    self._dispatch(key.data, mask)
                self._periodic(time.monotonic())
        finally:
            self._shutdown()
        return 0

    def _timeout(self) -> float | None:
        deadlines = []
        if self.session is not None:
            deadlines.append(self.next_tick)
        if self.status_dirty:
            deadlines.append(self.next_status)
        if self.workers.retry_at:
            deadlines.append(self.workers.retry_at)
        if self.watchdog:
            deadlines.append(self.next_watchdog)
        if not deadlines:
            return None  # idle: sleep until something happens
        return max(0.0, min(deadlines) - time.monotonic())

    def _dispatch(self, what: str, mask: int) -> None:
        if what == "mailbox":
            for message in self.mailbox.drain():
                self._on_message(message)
        elif what == "listener":
            self._accept()
        elif what == "stream":
            self._on_stream_ready(mask)
        self.status_dirty = True

    def _periodic(self, now: float) -> None:
        if self.session is not None and now >= self.next_tick:
            self.next_tick = now + TICK_S
            self._execute(self.session.tick(now))
            self._publish_latency()
        if self.workers.retry_due(now):
            self._update_monitor()
        if self.status_dirty and now >= self.next_status:
            self.next_status = now + STATUS_EVERY_S
            self.status_dirty = False
            self._report_latency(now)
            self.status.update(self._status())
        if self.watchdog and now >= self.next_watchdog:
            self.next_watchdog = now + self.watchdog
            sd_notify("WATCHDOG=1")

    def _install_signal_handlers(self) -> None:
        def stop(signum: int, _frame: FrameType | None) -> None:
            log.info("%s: stopping", signal.Signals(signum).name)
            self.stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        # The handler runs between bytecodes, but select() would go back to
        # sleep: the signal's byte on the mailbox pipe wakes the loop.
        signal.set_wakeup_fd(self.mailbox.wakeup_fd, warn_on_full_buffer=False)

    # -- transport -------------------------------------------------------------------------

    def _register_listener(self) -> None:
        assert self.listener is not None
        fd = self.listener.fileno()
        if fd == self.listener_fd:
            return
        if self.listener_fd >= 0:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(self.listener_fd)
        self.selector.register(fd, selectors.EVENT_READ, "listener")
        self.listener_fd = fd

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            stream = self.listener.accept()
        except TransportError as exc:
            log.warning("accepting dom0 failed: %s", exc)
            stream = None
        # A vchan listener publishes a fresh server (a new fd) for the next peer.
        self._register_listener()
        if stream is None:
            return
        if self.session is not None:
            self._drop_connection("dom0 connected again: the old connection is replaced")
        log.info("dom0 connected over %s", stream.address)
        now = time.monotonic()
        settings = self.settings
        self.stream = stream
        self.session = GuestSession(
            GuestConfig(
                playback_formats=settings.formats,
                capture_formats=settings.capture_formats,
                idle_timeout=settings.idle_timeout_s,
            ),
            now,
        )
        self.next_tick = now + TICK_S
        self.latency_report.reset()
        self.stream_events = 0
        self.session.set_mic_users(self.usage.recorders, now)
        self._execute(self.session.start(now))

    def _on_stream_ready(self, mask: int) -> None:
        stream, session = self.stream, self.session
        if stream is None or session is None:
            return
        stream.handle_wakeup()
        try:
            for _ in range(READS_PER_WAKEUP):
                data = stream.read(READ_CHUNK)
                if not data:
                    break
                self._execute(session.receive(data, time.monotonic()))
                if self.session is not session:
                    return  # the data ended the connection
        except StreamClosed as exc:
            self._drop_connection(f"dom0 went away ({exc})")
            return
        # Whatever woke us may also have freed space (a vchan says so on read).
        self._flush()

    def _flush(self) -> None:
        stream = self.stream
        if stream is None:
            return
        try:
            self.outbox.flush(stream)
        except StreamClosed as exc:
            self._drop_connection(f"dom0 went away ({exc})")
            return
        events = stream.poll_events(want_write=bool(self.outbox))
        if events != self.stream_events:
            if self.stream_events:
                self.selector.modify(stream.fileno(), events, "stream")
            else:
                self.selector.register(stream.fileno(), events, "stream")
            self.stream_events = events

    def _drop_connection(self, reason: str) -> None:
        stream, session = self.stream, self.session
        if stream is not None:
            if self.stream_events:
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(stream.fileno())
            stream.close()
        if session is not None:
            self.bytes_sent_before += session.bytes_sent
        self.stream = None
        self.session = None
        self.stream_events = 0
        self.outbox.clear()
        self.playback_format = None
        self.mic_format = None
        self._update_monitor()
        self._update_mic()
        if not self.stopping:
            log.warning("connection to dom0 closed: %s; waiting for dom0 to connect again", reason)

    # -- actions from the session ----------------------------------------------------------

    def _execute(self, actions: list[Action]) -> None:
        disconnect: str | None = None
        for action in actions:
            match action:
                case Send(data=data):
                    dropped = self.outbox.put(data)
                    if dropped and self.session is not None:
                        self.session.forget_unsent(dropped)
                case StartMonitor(format=fmt):
                    self.playback_format = fmt
                    self.outbox.max_audio_bytes = fmt.bytes_for_ms(OUTBOX_AUDIO_MS)
                    self._update_monitor()
                case StopMonitor():
                    self.playback_format = None
                    self._update_monitor()
                case MicAudio(pcm=pcm):
                    if self.workers.mic is not None:
                        self.workers.mic.put(pcm)
                case MicFormat(format=fmt):
                    self.mic_format = fmt
                    self._update_mic()
                case Log(level=level, message=message):
                    log.log(level, "%s", message)
                case Notify(summary=summary, body=body):
                    self.notifier.notify(summary, body)
                case Disconnect(reason=reason):
                    disconnect = reason
        self._flush()
        if disconnect is not None:
            self._drop_connection(disconnect)
        if self.session is not None:
            self.workers.drop_silence(self.session.conn.corked)

    # -- the worker threads ----------------------------------------------------------------

    def _on_message(self, message: object) -> None:
        now = time.monotonic()
        match message:
            case MonitorAudio(reader=reader, pcm=pcm):
                if self.session is not None and self.workers.delivered(reader):
                    self._execute(self.session.audio(pcm, now))
            case MonitorFailed(reader=reader, reason=reason):
                self.workers.monitor_failed(reader, reason, now, retry=self.devices_ready)
            case DevicesReady(usage=usage, idle_method=method):
                self.devices_ready = True
                self.idle_method = method
                self.workers.server_ready()
                if not self.told_ready:
                    self.told_ready = True
                    sd_notify("READY=1")
                    log.info(
                        "ready: applications play into %s and record from %s",
                        self.settings.sink_name,
                        self.settings.source_name,
                    )
                self._set_usage(usage, now)
            case UsageChanged(usage=usage):
                self._set_usage(usage, now)
            case ServerLost(reason=reason):
                if self.devices_ready:
                    log.warning("lost the audio server (%s); reconnecting", reason)
                self.devices_ready = False
                self._set_usage(Usage(0, 0), now)

    def _set_usage(self, usage: Usage, now: float) -> None:
        before, self.usage = self.usage, usage
        if usage.players != before.players:
            log.debug("%d application stream(s) play into the virtual output", usage.players)
        session = self.session
        if session is not None:
            if usage.recorders != before.recorders:
                self._execute(session.set_mic_users(usage.recorders, now))
            if usage.players == 0 and self.session is session:
                self._execute(session.nothing_playing(now))
        self._update_monitor()
        self._update_mic()

    def _pcm_wanted(self) -> bool:
        """PCM threads run while connected to dom0 with an audio server, until the end."""
        return not self.stopping and self.session is not None and self.devices_ready

    def _update_monitor(self) -> None:
        fmt = self.playback_format if self._pcm_wanted() else None
        self.workers.want_monitor(fmt, passive=self.idle_method is IdleMethod.PASSIVE_MONITOR)

    def _update_mic(self) -> None:
        self.workers.want_mic(
            self.mic_format if self._pcm_wanted() else None, self.devices.mic_node
        )

    # -- reporting -------------------------------------------------------------------------

    def _latency_us(self, session: GuestSession) -> int | None:
        return session.end_to_end_us(self.settings.period_ms, self.outbox.audio_bytes)

    def _publish_latency(self) -> None:
        """Keep what the virtual devices tell applications equal to the paths measured."""
        session = self.session
        if session is None:
            return
        mic = self.workers.mic
        if mic is not None:
            capture_us = self.reported_capture_latency.update(
                session.capture_latency_us(mic.latency_us())
            )
            if capture_us is not None:
                log.debug("virtual microphone reports %.1f ms before it", capture_us / 1000)
                self.devices.publish_capture_latency(capture_us * 1000)
        if not session.streaming:
            return
        # Without the monitor's period: PipeWire already counts, in every
        # stream's delay, the graph cycle in which the node takes the audio,
        # and that same cycle hands it to the monitor (bench/avsync_bench.py
        # on PipeWire: with the period counted, a player's clicks came 6 ms
        # further ahead of its prediction than without).
        path_us = session.end_to_end_us(0, self.outbox.audio_bytes)
        published_us = self.reported_latency.update(path_us)
        if published_us is not None:
            log.debug("virtual output reports %.1f ms behind it", published_us / 1000)
            self.devices.publish_latency(published_us * 1000)

    def _report_latency(self, now: float) -> None:
        session = self.session
        if session is None or not session.streaming:
            return
        latency = self._latency_us(session)
        if self.latency_report.due(latency, now):
            assert latency is not None
            log.info("end-to-end playback latency %.1f ms", latency / 1000)

    def _status(self) -> dict[str, Any]:
        session = self.session
        latency = None
        if session is not None and session.streaming:
            latency = self._latency_us(session)
        return {
            "pid": os.getpid(),
            "state": GuestState.of(session, self.devices_ready).value,
            "transport": self.settings.transport,
            "peer": self.stream.address if self.stream is not None else None,
            "format": self.playback_format.spec() if self.playback_format else None,
            "corked": bool(session is not None and session.conn.corked),
            "latency_us": latency,
            # What applications are told is behind the virtual output (None: not told).
            "reported_latency_us": (
                self.reported_latency.published_us if self.devices.reports_latency else None
            ),
            "reported_capture_latency_us": (
                self.reported_capture_latency.published_us
                if self.devices.reports_capture_latency
                else None
            ),
            "bytes_sent": self.bytes_sent_before + (session.bytes_sent if session else 0),
            "dropped_bytes": self.outbox.dropped_audio_bytes,
            "players": self.usage.players,
            "mic": {
                "users": self.usage.recorders,
                "state": session.conn.capture_status.name.lower() if session else None,
                "format": self.mic_format.spec() if self.mic_format else None,
                **(self.workers.mic.status() if self.workers.mic is not None else {}),
            },
        }

    # -- the end ---------------------------------------------------------------------------

    def _shutdown(self) -> None:
        self.stopping = True
        if self.session is not None:
            # Best effort: dom0 learns it was a shutdown, not a crash.
            self._execute(self.session.shutdown("the guest agent is stopping"))
            self._drop_connection("shutting down")
        if self.listener is not None:
            self.listener.close()
        workers = self.workers.stop()
        self.watcher.stop()
        for worker in workers:
            worker.join(THREAD_JOIN_S)
        try:
            with pulse_devices.connect("qvaudio-guest-exit", self.server) as pulse:
                self.devices.teardown(pulse)
        except (pulsectl.PulseError, RuntimeError, LookupError) as exc:
            log.warning("could not remove the virtual devices: %s", exc)
        self.devices.close_node()
        self.status.remove()
        self.notifier.close()
        self.selector.close()
        signal.set_wakeup_fd(-1)
        self.mailbox.close()
        log.info("stopped")
