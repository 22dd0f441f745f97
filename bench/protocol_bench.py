"""Protocol cost: encode + decode time per 10 ms of 48 kHz stereo s16le PCM.

Runs both ends' state machines (`Connection`), as the agents do, so the
figure includes validation, not just struct packing. Prints JSON.

    .venv/bin/python -m bench.protocol_bench
"""

from __future__ import annotations

import json
import statistics
import time

from qvaudio.core.connection import Connection
from qvaudio.core.events import FormatAccept, FormatOffer, Hello, PlaybackData, Role, StreamKind
from qvaudio.core.formats import AudioFormat, SampleFormat

FORMATS = {
    "s16le_48k_stereo": AudioFormat(48000, SampleFormat.S16LE, 2),
    "f32le_48k_8ch": AudioFormat(48000, SampleFormat.F32LE, 8),
}


def measure(fmt: AudioFormat, periods: int = 20000, rounds: int = 5) -> dict[str, float]:
    guest, dom0 = Connection(Role.GUEST), Connection(Role.DOM0)
    dom0.receive_data(guest.send(Hello()))
    guest.receive_data(dom0.send(Hello()))
    dom0.receive_data(guest.send(FormatOffer(StreamKind.PLAYBACK, (fmt,))))
    guest.receive_data(dom0.send(FormatAccept(StreamKind.PLAYBACK, fmt)))
    pcm = bytes(range(256)) * (fmt.bytes_for_ms(10) // 256) + bytes(fmt.bytes_for_ms(10) % 256)
    event = PlaybackData(pcm)
    per_period: list[float] = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(periods):
            dom0.receive_data(guest.send(event))
        per_period.append((time.perf_counter() - start) / periods)
    best = min(per_period)
    return {
        "bytes_per_10ms": len(pcm),
        "encode_decode_us_per_10ms": round(best * 1e6, 2),
        "median_us_per_10ms": round(statistics.median(per_period) * 1e6, 2),
        "cpu_percent_of_one_core_per_stream": round(best / 0.010 * 100, 3),
    }


def main() -> None:
    print(json.dumps({name: measure(fmt) for name, fmt in FORMATS.items()}, indent=2))


if __name__ == "__main__":
    main()
