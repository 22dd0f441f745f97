"""The tone the demo plays, and what is measured of what reaches dom0."""

from __future__ import annotations

import threading
import time
from typing import Any

from qvaudio.core.formats import AudioFormat
from qvaudio.demo import DemoError

FREQ = 440.0
#: What "the tone arrived intact" means.
MAX_FREQ_ERROR_PERCENT = 0.5
MIN_NONSILENT_PERCENT = 99.0


class Recorder:
    """Records `device` in a thread until told to stop; its errors come back to the caller."""

    def __init__(self, server: str | None, device: str, fmt: AudioFormat) -> None:
        self._server = server
        self._fmt = fmt
        self._device = device
        self.chunks: list[bytes] = []
        self.arrivals: list[float] = []
        self._started = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="demo-record", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def ready(self) -> bool:
        if self._error is not None:
            raise DemoError(f"cannot record {self._device}: {self._error}")
        return self._started.is_set()

    def finish(self) -> bytes:
        self._stop.set()
        self._thread.join(10)
        if self._error is not None:
            raise DemoError(f"recording {self._device} failed: {self._error}")
        return b"".join(self.chunks)

    def _run(self) -> None:
        period = self._fmt.bytes_for_ms(10)
        try:
            from qvaudio.pulse.pcm import PcmStream

            with PcmStream.record(
                self._server, self._device, self._fmt, "qvaudio-demo", "listen", period
            ) as stream:
                self._started.set()
                while not self._stop.is_set():
                    self.chunks.append(stream.read(period))
                    # When the chunk's last sample was captured: now minus
                    # the record stream's own latency.
                    self.arrivals.append(time.monotonic() - stream.latency_us() / 1e6)
        except Exception as exc:
            self._error = exc


def generate_tone(fmt: AudioFormat, seconds: float) -> bytes:
    from qvaudio.core.tone import generate_sine

    return generate_sine(FREQ, fmt, seconds, amplitude=0.5)


def measure(
    recorded: bytes, fmt: AudioFormat, arrivals: list[float], play_t0: float
) -> dict[str, Any]:
    from qvaudio.core.tone import (
        decode_mono,
        estimate_frequency,
        find_offset,
        find_onset,
        nonsilent_fraction,
        snr_db,
    )

    samples = decode_mono(recorded, fmt)
    onset, offset = find_onset(samples, 0.05), find_offset(samples, 0.05)
    arrived = onset is not None and offset is not None and offset - onset > fmt.rate // 10
    # Measured whether or not the tone arrived: 0.0 then says that nothing
    # (not a quieter tone) reached dom0.
    coverage = nonsilent_fraction(samples, fmt.rate)
    freq = snr = 0.0
    onset_ms = None
    if arrived and onset is not None and offset is not None:
        tone_only = samples[onset:offset]
        freq = estimate_frequency(tone_only, fmt.rate)
        snr = snr_db(tone_only, fmt.rate, freq)
        # Each chunk says when its audio was captured; the median over chunks
        # of "capture time minus position" is when recording began.
        starts = sorted(t - (i + 1) * 0.01 for i, t in enumerate(arrivals))
        started = starts[len(starts) // 2]
        onset_ms = round((started + onset / fmt.rate - play_t0) * 1000, 1)
    error_percent = abs(freq - FREQ) / FREQ * 100
    return {
        "tone_hz": FREQ,
        "measured_hz": round(freq, 2),
        "frequency_error_percent": round(error_percent, 3),
        "nonsilent_fraction": round(coverage, 4),
        "snr_db": round(snr, 1),
        "onset_delay_ms": onset_ms,
        "tone_arrived": arrived
        and error_percent < MAX_FREQ_ERROR_PERCENT
        and coverage * 100 >= MIN_NONSILENT_PERCENT,
    }
