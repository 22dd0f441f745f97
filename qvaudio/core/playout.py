"""How fast dom0's host playback stream should consume a VM's audio. No I/O, no clock.

A VM makes its PCM on its own clock; the host's sound card plays it on
another. Real clocks differ by up to a few hundred ppm, so at a fixed rate
the queue in front of the speaker (dom0's own queue plus the audio server's
buffer) slowly fills up (latency grows) or runs dry (clicks). The cure is
PulseAudio's module-loopback's: open the host stream with
PA_STREAM_VARIABLE_RATE and tell the server, with
pa_stream_update_sample_rate, a nominal rate a little off the real one, so
that it consumes the VM's frames exactly as fast as they come. Saying
48014 Hz makes the server take 48014 of our frames per second of the
host's clock: the queue drains. `RateMatcher` decides that integer from the
queue the shell measures after every write, with the time passed in.

Large errors are not its job: a stall that drains the queue, a burst, a
backlog are the shell's to trim or to pad, after which it calls
`RateMatcher.reset`. The matcher corrects the slow, small error that no
trim can fix, and learns the clocks' ratio, which survives every glitch.
"""

from __future__ import annotations

import math

#: Parts per million, the unit clock drifts are quoted in.
PPM = 1e-6


class RateMatcher:
    """Holds the queue in front of the host at its target by nudging the host stream's nominal rate.

    The measured queue is noisy (a write chunk's sawtooth, ~10 ms, and
    scheduling jitter of a few ms), while the drift it must correct is tiny
    (300 ppm is 0.3 ms per second), so the measurements are first averaged
    over a window of about a second, then smoothed over a few seconds.

    The queue is an integrator of the rate error, so a PI controller on it
    (critically damped, time constant `time_constant_s`) settles with no
    lasting error, and its integral converges to the clocks' ratio: that
    is `drift_ppm`, the part of the rate that is kept across `reset`. A
    young estimate knows nothing yet, so the loop starts fast
    (`acquire_time_constant_s`) and slows down to its tracking speed over
    `acquire_s` of measurements that kept it locked, when its estimate is
    good and the measurement noise would only make a fast loop wobble. A
    drift learned by an earlier stream to the same sound card may be
    passed in (`drift_ppm`): it is asked for from the start.

    The controller never chases the target itself but a reference that
    glides towards it (a new target, too) at `glide_ppm`, with that speed
    fed forward into the rate, so the error fed to the PI controller stays
    small and is never mistaken for drift. Two seconds' means in a row
    more than `jump_s` off, the same way, are not noise (a real server's
    figure puts a second's mean 2-3 ms off now and then) nor drift (300
    ppm moves the queue 0.3 ms a second) but a jump: a burst, a stall, a
    server that changed its buffer. The reference then starts again from
    the queue and glides back; neither the learned drift nor the rate
    moves. One such window alone is left out. A smaller gap drags the
    reference along once the smoothed error passes `max_error_s`, so the
    correction on top of the drift stays within about `2 * max_error_s /
    time_constant_s + glide_ppm` (73 ppm with the defaults, plus a hertz of
    rounding): a pitch change no one hears. Drags that keep coming mean drift the slow
    loop does not follow (the host stream moved to another sound card):
    the loop falls back towards its fast acquisition speed.

    The server only takes whole hertz (1 Hz is 21 ppm at 48 kHz), so the
    rounding error is carried into the next rate (first-order noise
    shaping): the rate alternates between two neighbours, e.g. 48014 and
    48015, and averages what the controller asked for. A new rate is a
    round trip to the server, so one is asked for at most once a window,
    only when the integer changes, by at most `max_step_ppm` at a time
    (no audible pitch jump) and never beyond `max_ppm` off nominal.
    """

    def __init__(
        self,
        nominal_rate: int,
        *,
        max_ppm: float = 1000.0,
        max_step_ppm: float = 50.0,
        window_s: float = 1.0,
        smoothing_s: float = 6.0,
        time_constant_s: float = 30.0,
        acquire_time_constant_s: float = 5.0,
        acquire_s: float = 60.0,
        max_error_s: float = 0.0005,
        acquire_max_error_s: float = 0.002,
        glide_ppm: float = 40.0,
        jump_s: float = 0.004,
        drift_ppm: float | None = None,
    ) -> None:
        if nominal_rate <= 0:
            raise ValueError(f"nominal rate must be positive, not {nominal_rate}")
        for name, value in (
            ("max_ppm", max_ppm),
            ("max_step_ppm", max_step_ppm),
            ("window_s", window_s),
            ("time_constant_s", time_constant_s),
            ("acquire_time_constant_s", acquire_time_constant_s),
            ("max_error_s", max_error_s),
            ("acquire_max_error_s", acquire_max_error_s),
            ("glide_ppm", glide_ppm),
            ("jump_s", jump_s),
        ):
            if not value > 0:  # also refuses NaN
                raise ValueError(f"{name} must be positive, not {value}")
        for name, value in (("smoothing_s", smoothing_s), ("acquire_s", acquire_s)):
            if not value >= 0:
                raise ValueError(f"{name} must not be negative, not {value}")
        if max_ppm >= 1e6:
            raise ValueError(f"max_ppm must be below 1e6, not {max_ppm}")
        if drift_ppm is not None and not abs(drift_ppm) <= max_ppm:
            raise ValueError(f"drift_ppm must be within max_ppm, not {drift_ppm}")
        self.nominal_rate = nominal_rate
        self.max_ppm = max_ppm
        self._max_offset = max_ppm * PPM
        # Whole hertz, symmetric; the epsilon keeps 1000 ppm of 48 kHz at 48 Hz
        # whatever the float rounding.
        span = math.floor(nominal_rate * self._max_offset + 1e-9)
        self._lowest, self._highest = nominal_rate - span, nominal_rate + span
        # At least 1 Hz, or a low rate could never move at all.
        self._max_step = max(1, math.floor(nominal_rate * max_step_ppm * PPM))
        self._window_s = window_s
        self._smoothing_s = smoothing_s
        self._tau = time_constant_s
        self._tau_acquire = min(acquire_time_constant_s, time_constant_s)
        self._acquire_s = acquire_s
        self._max_error = max_error_s
        self._max_error_acquire = max(acquire_max_error_s, max_error_s)
        self._glide = glide_ppm * PPM
        self._jump = jump_s
        # A long gap between two windows (the VM went quiet, the shell did
        # not call reset) is not evidence of drift: it counts as two at most.
        self._max_dt = 2 * window_s

        #: The learned clocks' ratio minus one: the PI controller's integral.
        self._drift = 0.0
        #: Seconds of measurements the loop stayed locked (how far acquisition is).
        self._locked_s = 0.0
        if drift_ppm is not None:
            # What an earlier stream to the same host learned: trusted, so no
            # acquisition, and asked for from the first write.
            self._drift = drift_ppm * PPM
            self._locked_s = acquire_s
        self._rate = min(self._highest, max(self._lowest, round(nominal_rate * (1 + self._drift))))
        #: Hz the last rounding left out, owed to the next rate.
        self._carry = 0.0

        # What `reset` forgets.
        #: When the current window began; None until the first measurement.
        self._window_start: float | None = None
        self._sum = 0.0
        self._count = 0
        #: The smoothed error against the reference (s); None until a window anchors it.
        self._error: float | None = None
        #: Where the queue should be now (s), gliding towards the target.
        self._reference = 0.0
        #: Its speed over the current window (s per s), fed forward into the rate.
        self._velocity = 0.0
        #: Where the current glide ends: the target when it began.
        self._goal = 0.0
        #: How far off the last window was, if it was a jump's size: a jump
        #: is believed only when the next window agrees.
        self._suspect: float | None = None
        #: The first window's mean since construction or reset: where the queue settled.
        self._anchor: float | None = None

    # -- what the shell calls ------------------------------------------------------------

    @property
    def rate(self) -> int:
        """The rate (Hz) currently asked of the server; open the host stream at it."""
        return self._rate

    @property
    def drift_ppm(self) -> float:
        """The learned clocks' ratio, in ppm: positive when the VM's clock runs faster.

        Within ±`max_ppm` exactly: at the limit, `x * 1e-6 / 1e-6` can come
        out a hair past it, and a new matcher seeded with it would refuse it."""
        return min(self.max_ppm, max(-self.max_ppm, self._drift / PPM))

    def update(self, now: float, queue_s: float, target_s: float | None = None) -> int | None:
        """Take one measurement; the new rate to ask for, or None to keep `rate`.

        `queue_s` is the audio between the VM's newest sample and the speaker
        (dom0's queue plus the server's buffer) just after a write, `target_s`
        where it should be; None holds it where the first window after the
        construction or a `reset` found it (where the stream settled when
        it started). At most one new rate per window.
        """
        start = self._window_start
        if start is None or now < start:
            # The first measurement since construction or reset (or a clock
            # that stepped back, which must not make a window of negative length).
            self._window_start = start = now
            self._sum = 0.0
            self._count = 0
        self._sum += queue_s
        self._count += 1
        elapsed = now - start
        if elapsed < self._window_s:
            return None
        mean = self._sum / self._count
        self._window_start = now
        self._sum = 0.0
        self._count = 0
        if not (math.isfinite(mean) and (target_s is None or math.isfinite(target_s))):
            return None  # a broken measurement must not poison what was learned
        return self._control(mean, target_s, min(elapsed, self._max_dt))

    @property
    def anchor_s(self) -> float | None:
        """Where the first whole window since construction or `reset` found the
        queue (its mean, not one measurement), or None before that window ends."""
        return self._anchor

    def reset(self) -> None:
        """Forget the queue after a discontinuity (restart, underrun, trim): keep the drift.

        The clocks' ratio does not change with a glitch, so the rate stays
        where it is and the next window anchors the queue's reference afresh.
        """
        # The next window starts with the next measurement, which may come
        # long after (a stream settling): a window counted from now would end
        # at that one measurement, and the queue be anchored on it.
        self._window_start = None
        self._sum = 0.0
        self._count = 0
        self._error = None
        self._velocity = 0.0
        self._suspect = None
        self._anchor = None

    # -- the controller ------------------------------------------------------------------

    def _control(self, mean: float, target: float | None, dt: float) -> int | None:
        share = self._locked_s / self._acquire_s if self._acquire_s else 1.0
        tau = self._tau_acquire + (self._tau - self._tau_acquire) * share
        if self._error is None:
            # Anchor at the queue as it is: whatever gap a restart left is
            # closed by the glide, not mistaken for drift by the integral.
            self._reference = self._goal = self._anchor = mean
            self._error = 0.0
        else:
            before = self._reference
            after = before + self._velocity * dt
            # A window a little longer than planned must not glide past its goal.
            after = min(after, self._goal) if self._velocity > 0 else max(after, self._goal)
            self._reference = after
            # The window's mean was taken while the reference moved: compare
            # it with the reference mid-window, or every glide looks like an error.
            raw = mean - (before + after) / 2
            off = raw - self._error
            if abs(off) <= self._jump:
                self._suspect = None
            elif self._suspect is not None and (off > 0) == (self._suspect > 0):
                # Two seconds' means in a row this far off, the same way: no
                # noise and no drift (300 ppm moves the queue 0.3 ms a second)
                # but a jump: a burst, a stall, a server that changed its
                # buffer. Start the glide from there (the second window holds
                # all of a jump that came in the middle of the first).
                self._reference += off
                raw = self._error
                self._suspect = None
            else:
                # One window this far off is left out: a real server's latency
                # figure wanders by more than the jump now and then (seen: a
                # fifth of dom0's windows 2 ms off the one before), and
                # believed at once each such window moved the reference, so
                # that the held delay wandered by 5-10 ms over minutes.
                self._suspect = off
                raw = self._error
            # Smoothing lags: well inside the loop's time constant, or it rings.
            smoothing = min(self._smoothing_s, tau / 5)
            if smoothing > 0:
                self._error += (raw - self._error) * (1 - math.exp(-dt / smoothing))
            else:
                self._error = raw
        max_error = self._max_error_acquire + (self._max_error - self._max_error_acquire) * share
        error = self._error
        if abs(error) > max_error:
            # Too far to correct quietly: drag the reference along, let it glide back.
            slack = error - math.copysign(max_error, error)
            self._reference += slack
            self._error = error = error - slack
            # Drift the slow loop cannot follow drags it again and again:
            # fall back towards the fast loop, which learns it.
            self._locked_s = max(0.0, self._locked_s - 2 * dt)
        else:
            self._locked_s = min(self._acquire_s, self._locked_s + dt)

        if target is not None:
            self._goal = target
        gap = self._goal - self._reference
        limit = self._glide * self._window_s
        self._velocity = max(-limit, min(limit, gap)) / self._window_s

        # Gains 2/tau and 1/tau^2: the queue's error then decays as
        # e'' + 2e'/tau + e/tau^2 = 0, critically damped, without overshoot.
        self._drift += error * dt / (tau * tau)
        self._drift = max(-self._max_offset, min(self._max_offset, self._drift))
        # A queue above the reference drains by consuming faster; a reference
        # that rises must be filled by consuming slower.
        offset = self._drift + 2 * error / tau - self._velocity
        offset = max(-self._max_offset, min(self._max_offset, offset))
        return self._quantise(self.nominal_rate * (1 + offset))

    def _quantise(self, wanted: float) -> int | None:
        owed = wanted + self._carry
        rate = round(owed)
        rate = max(self._rate - self._max_step, min(self._rate + self._max_step, rate))
        rate = max(self._lowest, min(self._highest, rate))
        # Only a rounding error is owed: what the step limit held back is
        # asked again by the controller next window, not paid twice.
        self._carry = max(-0.5, min(0.5, owed - rate))
        if rate == self._rate:
            return None
        self._rate = rate
        return rate
