"""The guest's two PCM threads, started and stopped as its loop wants them.

`MonitorReader` records the virtual output while dom0 takes playback, and
`MicWriter` plays dom0's microphone into the virtual microphone while dom0
sends it (`qvaudio.guest.pcm_threads`). Each runs only while it is wanted:
a connection, an agreed format and an audio server; a format change
replaces it. A monitor stream that failed on its own (not with the server)
is tried again after `MONITOR_RETRY_S`, not in a tight loop, and only its
first failure in a row is a warning.

The monitor is recorded for as long as dom0 takes playback, even while no
application plays. Opening it only when an application starts was tried and
loses the start of the sound: a PulseAudio null sink with no low-latency
reader renders in blocks of up to 2 s, so by the time a new monitor stream
is connected the application's first ~2 s have already been rendered (and
were never recorded). The open stream should still cost nothing while
idle: reading the null sink's silence every period costs ~2 % of a CPU. On
PulseAudio the watcher therefore suspends the idle sink and resumes it when
an application's stream appears (the stream's audio waits for the resume);
the monitor delivers nothing meanwhile and the reader sleeps in C. On
PipeWire the monitor stream is passive, so the server pauses it whenever no
application's stream keeps the graph running (`qvaudio.core.guest_idle`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

from qvaudio.common.config import GuestSettings
from qvaudio.core.formats import AudioFormat
from qvaudio.guest.pcm_threads import Mailbox, MicWriter, MonitorReader
from qvaudio.pulse.devices import backing_sink_name
from qvaudio.pulse.pipewire_node import SourceNode

log = logging.getLogger(__name__)

#: After the monitor stream failed on its own (not with the server), try again after this.
MONITOR_RETRY_S: Final = 1.0


class PcmWorkers:
    """The monitor reader and the mic writer the guest runs now, if any."""

    def __init__(self, mailbox: Mailbox, server: str | None, settings: GuestSettings) -> None:
        self._mailbox = mailbox
        self._server = server
        self._settings = settings
        self.monitor: MonitorReader | None = None
        self.mic: MicWriter | None = None
        #: When a failed monitor may be opened again; 0 when it may now.
        self.retry_at = 0.0
        self._failures = 0

    def want_monitor(self, fmt: AudioFormat | None, *, passive: bool) -> None:
        """Record the virtual output's monitor in `fmt`; None: not at all."""
        current = self.monitor
        if current is not None and current.format != fmt:
            current.stop()
            self.monitor = current = None
        if fmt is not None and current is None and not self.retry_at:
            self.monitor = MonitorReader(
                self._mailbox,
                self._server,
                self._settings.sink_name,
                fmt,
                self._settings.period_ms,
                passive=passive,
            )

    def want_mic(
        self, fmt: AudioFormat | None, node: Callable[[AudioFormat], SourceNode | None]
    ) -> None:
        """Play dom0's microphone into the virtual microphone in `fmt`; None: not at all.

        `node(fmt)` is the microphone's PipeWire node to feed, if it is one."""
        current = self.mic
        if current is not None and current.format != fmt:
            current.stop()
            self.mic = current = None
        if fmt is not None and current is None:
            sink = backing_sink_name(self._settings.source_name)
            self.mic = MicWriter(self._server, sink, fmt, node=node(fmt))

    def delivered(self, reader: MonitorReader) -> bool:
        """`reader` delivered audio: True if it is the current monitor (and so works)."""
        if reader is not self.monitor:
            return False
        self._failures = 0
        return True

    def monitor_failed(
        self, reader: MonitorReader, reason: str, now: float, *, retry: bool
    ) -> None:
        """`reader` stopped with `reason`; open another after a while if `retry`."""
        if reader is not self.monitor:
            return
        self._failures += 1
        level = logging.WARNING if self._failures == 1 else logging.DEBUG
        log.log(level, "recording the virtual output failed: %s", reason)
        self.monitor = None
        if retry:
            self.retry_at = now + MONITOR_RETRY_S

    def server_ready(self) -> None:
        """The audio server (new or back) has the virtual devices: failures start over,
        and a monitor that failed with the old server opens now, not after its wait.

        A killed server often fails the monitor before the watcher notices the
        server is gone, so that failure looked like the stream's own and the
        monitor waited out MONITOR_RETRY_S: sound came back 1 s after the
        server instead of 0.2 s (bench/recovery_bench.py)."""
        self._failures = 0
        self.retry_at = 0.0

    def retry_due(self, now: float) -> bool:
        """True once when a failed monitor's wait is over."""
        if not self.retry_at or now < self.retry_at:
            return False
        self.retry_at = 0.0
        return True

    def drop_silence(self, corked: bool) -> None:
        """While corked, the monitor drops silence instead of handing it to the loop."""
        if self.monitor is not None:
            self.monitor.drop_silence = corked

    def stop(self) -> list[MonitorReader | MicWriter]:
        """Stop both; returns them, to join once everything else has stopped too."""
        workers: list[MonitorReader | MicWriter] = [w for w in (self.monitor, self.mic) if w]
        for worker in workers:
            worker.stop()
        self.monitor = self.mic = None
        return workers
