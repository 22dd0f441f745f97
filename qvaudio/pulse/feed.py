"""Writing a `PlayoutQueue` into a playback stream: the thread side both agents share.

dom0's host stream for each VM and the guest's virtual microphone both play
audio that arrives from elsewhere; `qvaudio.core.playout_queue` decides what
to write and how fast to play, and `feed` is the I/O around it: it waits
under the caller's condition for what the queue hands out, writes it (a
blocking write paces the thread at the stream's speed), reports the
server's underflow events and latency back, and applies the rates the
queue asks for.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from qvaudio.core.playout_queue import PlayoutQueue

log = logging.getLogger(__name__)

#: With nothing to write, how often the thread looks at `stopping` without a notify.
IDLE_WAKE_S = 0.5


class PlaybackStream(Protocol):
    """What `feed` writes into: a libpulse playback stream (`qvaudio.pulse.pcm.PcmStream`)
    or the writing end of a PipeWire source node (`pipewire_node.NodeFeed`)."""

    @property
    def rate(self) -> int: ...
    @property
    def underflows(self) -> int: ...
    @property
    def last_underflow_at(self) -> float: ...
    #: Times the server dropped what the stream held and started it afresh (a
    #: recorder came to a PipeWire source node): a new stream for the queue.
    @property
    def starts(self) -> int: ...
    def write(self, pcm: bytes) -> None: ...
    def latency_us(self) -> int: ...
    def set_rate(self, rate: int) -> None: ...
    def close(self) -> None: ...


def feed(
    stream: PlaybackStream,
    playout: PlayoutQueue,
    cond: threading.Condition,
    stopping: Callable[[], bool],
    name: str,
    after_write: Callable[[int, bool], None] | None = None,
) -> None:
    """Write what `playout` hands out into `stream` until `stopping()` (checked under `cond`).

    `cond` guards `playout`; whoever `put`s into it notifies `cond`.
    `after_write(latency_us, ran_dry)` is called after every write, with
    the stream's latency and whether the queue was empty after it. Raises
    the stream's error (`PulseError`, `PipeWireError`) when it fails."""
    if playout.matcher.rate != stream.rate:
        stream.set_rate(playout.matcher.rate)  # the drift learned before
    underflows = stream.underflows
    starts = stream.starts
    with cond:
        playout.stream_started()
    while True:
        with cond:
            chunk = None
            while not stopping():
                if stream.starts != starts:
                    starts = stream.starts
                    playout.stream_started()
                if stream.underflows != underflows:
                    underflows = stream.underflows
                    playout.ran_dry(stream.last_underflow_at)
                gaps_before = playout.underruns
                chunk = playout.take(time.monotonic())
                if playout.underruns != gaps_before:
                    log.debug("%s ran dry %.1f ms before audio came",
                              name, playout.last_gap_dry_s * 1000)  # fmt: skip
                if chunk is not None:
                    break
                wait = playout.wait_s(time.monotonic())
                cond.wait(timeout=IDLE_WAKE_S if wait is None else max(wait, 0.001))
            if chunk is None:
                return
            ran_dry = playout.queued == 0
        stream.write(chunk)
        latency = stream.latency_us()
        now = time.monotonic()
        with cond:
            rate = playout.written(now, latency / 1e6)
        if rate is not None:
            stream.set_rate(rate)
        if after_write is not None:
            after_write(latency, ran_dry)
