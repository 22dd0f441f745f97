"""What the guest tells the VM's applications about the path behind its virtual output.

The guest measures the path from its virtual output to the host's speakers
(`GuestSession.end_to_end_us`: a monitor period, what waits for the
transport, what is in flight, and dom0's queue and host stream) and
publishes it on the virtual output (on PipeWire, the node's `Latency`
parameter), where applications' own latency queries add it.

`ReportedLatency` decides what to publish and when: the figure rounded to
`round_ms` (1 ms if 0, for users who worry that an exact figure
fingerprints their machine), changed only when the measurement has moved
most of a step away from what was published, so the measurement's jitter
(in-flight audio between dom0's reports) does not make the server recompute
its graph's latency twice a second. Pure: no clock, no I/O.
"""

from __future__ import annotations

from typing import Final

#: Steps of the published figure when no rounding is asked for.
MIN_STEP_US: Final = 1_000
#: The measurement must move this share of a step away from what was
#: published before the published figure follows.
HYSTERESIS: Final = 0.75


class ReportedLatency:
    def __init__(self, round_ms: int = 0) -> None:
        if round_ms < 0:
            raise ValueError(f"round_ms must not be negative, not {round_ms}")
        self.step_us = max(MIN_STEP_US, round_ms * 1000)
        #: What is published now, in microseconds; None before the first measurement.
        self.published_us: int | None = None

    def update(self, measured_us: int | None) -> int | None:
        """The figure to publish now for `measured_us`, or None to leave the published one.

        No measurement (nothing plays, dom0 not heard from) leaves the last
        figure in place: the path is the same the next time sound starts,
        and an application opening a stream before that is told the best
        figure there is rather than nothing."""
        if measured_us is None:
            return None
        measured_us = max(0, measured_us)
        last = self.published_us
        if last is not None and abs(measured_us - last) < HYSTERESIS * self.step_us:
            return None
        rounded = (measured_us + self.step_us // 2) // self.step_us * self.step_us
        if rounded == last:
            return None
        self.published_us = rounded
        return rounded
