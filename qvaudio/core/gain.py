"""Sample-level gain and sanitising for PCM on its way to the host mixer. No I/O.

dom0 applies a VM's volume cap to the samples themselves, so neither the
guest nor a mixer slider can make that VM louder than its policy allows.
Float PCM from a guest is also sanitised here: NaN, infinities and values
beyond full scale are what a hostile guest would send to hurt the mixer or
the user's ears.

numpy is used (a dom0-only dependency, the "dom0" extra) because this runs
on every capped stream's audio: pure Python costs about 9 ms of CPU per
second of 48 kHz stereo, numpy about 0.1 ms, which is what lets one dom0
agent serve dozens of VMs. It is imported where it is used, not at the top:
importing this module (as everything of dom0's does) must work without it,
so that `qvaudio-dom0 --help` does, and the agent says what to install
(`qvaudio.common.extras`) instead of failing with a traceback. Once imported, the
import statements cost a dictionary look-up per call.
"""

from __future__ import annotations

import functools
from typing import Any

from qvaudio.core.formats import AudioFormat, SampleFormat

_DTYPE_CODES = {
    SampleFormat.S16LE: "<i2",
    SampleFormat.S32LE: "<i4",
    SampleFormat.F32LE: "<f4",
}


@functools.cache
def _dtype(sample_format: SampleFormat) -> Any:
    import numpy as np

    return np.dtype(_DTYPE_CODES[sample_format])


def percent_to_gain(percent: int) -> float:
    """A policy volume (0-100 %) as the factor on the samples: the mixer's percent.

    PulseAudio's volume scale, the one pavucontrol and the desktop's sound
    settings show, is cubic: a stream at 50 % plays at 0.5 ** 3 = 1/8 of its
    amplitude (-18 dB), not half of it. A cap of 50 % therefore scales the
    samples by 1/8, so that a VM capped at 50 % is never louder than any
    other application at the mixer's 50 %.
    """
    if not 0 <= percent <= 100:
        raise ValueError(f"volume {percent}% is outside 0-100%")
    return (percent / 100.0) ** 3


def apply_gain(pcm: bytes, fmt: AudioFormat, gain: float) -> bytes:
    """Scale `pcm` by `gain` (0.0-1.0); float input is always sanitised."""
    import numpy as np

    if not 0.0 <= gain <= 1.0:
        raise ValueError(f"gain {gain} is outside 0.0-1.0")
    dtype = _dtype(fmt.sample_format)
    samples = np.frombuffer(pcm, dtype=dtype)
    if fmt.sample_format is SampleFormat.F32LE:
        clean = np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0)
        np.clip(clean, -1.0, 1.0, out=clean)
        if gain != 1.0:
            clean *= np.float32(gain)
        return clean.astype(dtype, copy=False).tobytes()
    if gain == 1.0:
        return pcm
    if gain == 0.0:
        return bytes(len(pcm))
    # Integers: scale in float64 (exact for 32-bit samples) and round; a
    # factor <= 1 cannot overflow, so no clipping is needed.
    scaled = np.rint(samples.astype(np.float64) * gain)
    return scaled.astype(dtype).tobytes()


def peak(pcm: bytes, fmt: AudioFormat) -> float:
    """Largest absolute sample as a fraction of full scale (for tests and status)."""
    import numpy as np

    samples = np.frombuffer(pcm, dtype=_dtype(fmt.sample_format))
    if samples.size == 0:
        return 0.0
    full = 1.0 if fmt.sample_format is SampleFormat.F32LE else float(np.iinfo(samples.dtype).max)
    return float(np.max(np.abs(samples.astype(np.float64)))) / full
