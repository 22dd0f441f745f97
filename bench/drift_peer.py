"""A VM whose clock runs off the host's, for bench/drift_bench.py: a process of
its own (its pacing shares no interpreter lock with the bench) sending a tone
at `1 + ppm * 1e-6` times real time.

    python -m bench.drift_peer qvaudio SOCKET FREQ PPM SECONDS
    python -m bench.drift_peer stdout FREQ PPM SECONDS

`qvaudio`: the guest end of the protocol on SOCKET (tests/fake_guest.py),
offering s16le 48 kHz stereo to dom0. `stdout`: the same PCM, raw, on
stdout (piped into `pacat`: a VM's bridge whose clock is skewed). Either way
the tone goes in 10 ms chunks (480 frames), chunk i due at
`start + i * 0.01 / (1 + ppm * 1e-6)` on time.monotonic(): no error
accumulates. The bench talks to it in lines: on stderr "ready" (dom0 took the
format, or at once for stdout), then, after any line on stdin, "started T"
(T: time.monotonic() of chunk 0), every second "lag NOW_MS MAX_MS" (how late
the newest chunk was sent, and the most in that second: audio the peer holds
because its reader did not take it), and "done" at the end.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from qvaudio.core.events import FormatAccept, PlaybackData, ProtocolError
from qvaudio.core.formats import DEFAULT_FORMAT
from qvaudio.core.tone import generate_sine

FMT = DEFAULT_FORMAT
CHUNK_FRAMES = FMT.rate // 100
#: A VM has virtual CPUs of its own (as tests/guest_process.py): load on the
#: CPUs this stand-in shares with dom0 must not delay its pacing.
PEER_NICE = -11


def say(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def pace(send: Callable[[bytes], None], freq: float, ppm: float, seconds: float) -> None:
    """Send the tone paced at the skewed clock for `seconds` of real time."""
    # One second holds a whole number of cycles of an integer frequency: it loops seamlessly.
    second = generate_sine(freq, FMT, 1.0, amplitude=0.5)
    step = CHUNK_FRAMES * FMT.frame_size
    period = CHUNK_FRAMES / (FMT.rate * (1 + ppm * 1e-6))
    count = int(seconds / period)
    start = time.monotonic()
    say(f"started {start:.6f}")
    next_report, worst = start + 1.0, 0.0
    for i in range(count):
        due = start + i * period
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
            now = time.monotonic()
        late = max(0.0, now - due)
        worst = max(worst, late)
        pos = (i % (len(second) // step)) * step
        send(second[pos : pos + step])
        if now >= next_report:
            say(f"lag {late * 1000:.2f} {worst * 1000:.2f}")
            next_report, worst = now + 1.0, 0.0


def main(argv: list[str]) -> int:
    os.setpriority(os.PRIO_PROCESS, 0, PEER_NICE)
    mode = argv[0]
    if mode == "qvaudio":
        from tests.fake_guest import FakeGuest

        guest = FakeGuest(Path(argv[1]))
        freq, ppm, seconds = map(float, argv[2:5])
        if not guest.connected.wait(15):
            say("error dom0 never connected")
            return 1
        guest.offer(FMT)
        guest.wait_for_event(FormatAccept, timeout=15)

        def send(chunk: bytes) -> None:
            guest.send(PlaybackData(chunk))

    elif mode == "stdout":
        freq, ppm, seconds = map(float, argv[1:4])

        def send(chunk: bytes) -> None:
            write_all(1, chunk)

    else:
        say(f"error unknown mode {mode!r}")
        return 2
    say("ready")
    if not sys.stdin.readline():
        return 1  # the bench went away before the start
    try:
        pace(send, freq, ppm, seconds)
    except (OSError, AssertionError, ProtocolError) as exc:
        say(f"error {exc!r}")
        return 1
    say("done")
    if mode == "qvaudio":
        guest.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
