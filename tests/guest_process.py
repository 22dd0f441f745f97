"""A well-behaved guest in a process of its own, playing a paced tone to dom0.

Hostile-guest tests run their attackers as threads of the test process. A
good VM paced by a thread of that same process would share its interpreter
lock with them, and be late for reasons no real VM has (seen in CI: gaps in
the good VM's sound that came from the test's own flood thread). In its own
process it is paced like a VM: only the machine can delay it.

    good = GoodGuest(dom0.vm_dir / "work")
    good.wait_accepted()
    good.play()          # the tone starts now
    ...
    good.join()

Run as `python -m tests.guest_process SOCKET SECONDS FREQ`: it serves SOCKET
as the guest, offers s16le 48 kHz stereo, prints "accepted" once dom0 took
it, waits for a line on stdin, plays, prints "done".
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from qvaudio.core.events import FormatAccept
from qvaudio.core.formats import AudioFormat, SampleFormat
from qvaudio.core.tone import generate_sine

S16 = AudioFormat(48000, SampleFormat.S16LE, 2)
ROOT = Path(__file__).resolve().parent.parent


class GoodGuest:
    def __init__(self, path: Path, seconds: float = 12.0, freq: float = 440.0) -> None:
        self.path = path
        self.seconds = seconds
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.guest_process", str(path), str(seconds), str(freq)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def wait_accepted(self) -> None:
        line = self._line()
        assert line == "accepted", f"the good guest did not get its format: {line!r}"

    def play(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("play\n")
        self.proc.stdin.flush()

    def join(self) -> None:
        line = self._line()
        assert line == "done", f"the good guest did not finish playing: {line!r}"
        assert self.proc.wait(10) == 0

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def main(path: str, seconds: str, freq: str) -> int:
    from tests.fake_guest import FakeGuest

    # A VM runs on virtual CPUs of its own: load on dom0's CPUs, where this
    # stand-in runs, must not delay its pacing as if it were dom0's work.
    os.setpriority(os.PRIO_PROCESS, 0, -11)

    guest = FakeGuest(Path(path))
    if not guest.connected.wait(15):
        print("dom0 never connected", flush=True)
        return 1
    guest.offer(S16)
    guest.wait_for(lambda e: isinstance(e, FormatAccept), timeout=15)
    print("accepted", flush=True)
    sys.stdin.readline()
    player = guest.stream_pcm(generate_sine(float(freq), S16, float(seconds), amplitude=0.5), S16)
    player.join()
    print("done", flush=True)
    guest.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
