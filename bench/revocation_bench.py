"""Microphone revocation time: from `qvaudio mic detach` (or a policy edit that
denies capture) to the guest seeing CaptureState DENIED, and no microphone
audio after it.

    .venv/bin/python -m bench.revocation_bench [--repetitions 50]

One `qvaudio-dom0` on a private host PulseAudio whose default source is its
null sink's monitor, with a 1 kHz tone playing into that sink (the host
"microphone"). The VM is a scripted guest (tests/fake_guest.py) whose policy
is `capture: attach-on-request`; it asks for the microphone once.

* detach: `mic attach` (wait until CaptureData flows), then the control
  socket's `mic detach`; measured from just before the request is sent to
  the moment the guest's socket delivered CaptureState DENIED.
* policy edit: attach as above, then the policy file is rewritten atomically
  (temporary file + rename) with `capture: deny`; measured from the rename.
  The policy is restored (and the mic attached again) between repetitions.

After each revocation the guest keeps listening for 200 ms: any CaptureData
frame after DENIED is counted as a leak. Times are the guest's receive times,
so they include the transport. The alternative a Qubes user has,
`qvm-device mic detach`, needs Qubes's dom0 and is not available here: see
docs/benchmarks.md for the prior-art figure given as context only.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.pipeline import (
    FMT,
    REPO,
    load_average,
    machine,
    pactl,
    percentile,
    stop_process,
    wait_for,
    write_policy,
)
from qvaudio.core.events import (
    CaptureData,
    CaptureRequest,
    CaptureState,
    Event,
    FormatAccept,
    StreamKind,
    StreamStatus,
)
from qvaudio.core.formats import AudioFormat, SampleFormat
from qvaudio.core.tone import generate_sine
from qvaudio.dom0.control import request
from qvaudio.pulse.pcm import PcmStream, PulseError
from qvaudio.pulse.private import SINK, PrivatePulse
from tests.fake_guest import FakeGuest

VM = "work"
MONO = AudioFormat(48000, SampleFormat.S16LE, 1)
POLICY_ATTACH = f"rules:\n  - vm: {VM}\n    playback: allow\n    capture: attach-on-request\n"
POLICY_DENY = f"rules:\n  - vm: {VM}\n    playback: allow\n    capture: deny\n"
LISTEN_AFTER_S = 0.2


def _state(status: StreamStatus) -> Any:
    def match(event: Event) -> bool:
        return isinstance(event, CaptureState) and event.status is status

    return match


class Bench:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.host = PrivatePulse(base, "host")
        self.policy_dir = base / "policy"
        self.vm_dir = base / "vms"
        self.control = base / "control.sock"
        self.log = base / "dom0.log"
        self.dom0: subprocess.Popen[bytes] | None = None
        self.guest: FakeGuest | None = None
        self._stop = threading.Event()
        self._mic: threading.Thread | None = None

    def start(self) -> FakeGuest:
        for d in (self.policy_dir, self.vm_dir):
            d.mkdir(mode=0o700)
        write_policy(self.policy_dir, POLICY_ATTACH)
        self.host.start()
        pactl(self.host, "set-default-source", f"{SINK}.monitor")
        self._mic = threading.Thread(target=self._tone, daemon=True)
        self._mic.start()
        with self.log.open("wb") as out:
            self.dom0 = subprocess.Popen(
                [sys.executable, "-m", "qvaudio.agent_dom0",
                 "--config", str(REPO / "qvaudio.yaml"), "--transport", f"unix:{self.vm_dir}",
                 "--policy-dir", str(self.policy_dir), "--control-socket", str(self.control),
                 "--no-notifications"],
                env=self.host.full_env(), stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
            )  # fmt: skip
        wait_for("dom0's control socket", self.control.exists, 15, [self.log])
        guest = self.guest = FakeGuest(self.vm_dir / VM)
        if not guest.connected.wait(10):
            raise RuntimeError(f"dom0 did not connect:\n{self.log.read_text()[-2000:]}")
        guest.offer(FMT, capture=MONO)
        guest.wait_for(
            lambda e: isinstance(e, FormatAccept) and e.stream is StreamKind.CAPTURE, timeout=10
        )
        guest.send(CaptureRequest(True))
        guest.wait_for(_state(StreamStatus.DENIED), timeout=5)
        return guest

    def _tone(self) -> None:
        """The host "microphone": a tone into the sink whose monitor is the default source."""
        second = generate_sine(1000.0, FMT, 1.0, amplitude=0.5)
        step = FMT.bytes_for_ms(10)
        # The server goes away at the end of the run; that is not an error here.
        with (
            contextlib.suppress(PulseError),
            PcmStream.playback(
                self.host.server, SINK, FMT, "bench-mic", "tone", FMT.bytes_for_ms(50)
            ) as stream,
        ):
            while not self._stop.is_set():
                for pos in range(0, len(second), step):
                    stream.write(second[pos : pos + step])

    def attach(self) -> None:
        """Grant the microphone and wait until its audio reaches the guest."""
        guest = self.guest
        assert guest is not None
        mark = guest.mark()
        reply = request(self.control, {"cmd": "mic", "action": "attach", "vm": VM})
        if not reply.get("ok"):
            raise RuntimeError(f"mic attach refused: {reply}")
        guest.wait_for(_state(StreamStatus.RUNNING), timeout=5, after=mark)
        guest.wait_for(lambda e: isinstance(e, CaptureData), timeout=5, after=mark)

    def revoked(self, mark: int, since: float) -> tuple[float, int]:
        """Seconds from `since` to DENIED after `mark`, and CaptureData frames after it."""
        guest = self.guest
        assert guest is not None
        guest.wait_for(_state(StreamStatus.DENIED), timeout=5, after=mark)
        time.sleep(LISTEN_AFTER_S)
        events = guest.events[mark:]
        at = next(i for i, (_, e) in enumerate(events) if _state(StreamStatus.DENIED)(e))
        leaks = sum(isinstance(e, CaptureData) for _, e in events[at + 1 :])
        return events[at][0] - since, leaks

    def stop(self) -> None:
        if self.guest is not None:
            self.guest.close()
        if self.dom0 is not None:
            stop_process(self.dom0)
        self._stop.set()
        if self._mic is not None:
            self._mic.join(2)
        self.host.stop()


def by_detach(bench: Bench, repetitions: int) -> dict[str, Any]:
    times, leaks, replies = [], 0, []
    for _ in range(repetitions):
        bench.attach()
        assert bench.guest is not None
        mark = bench.guest.mark()
        before = time.monotonic()
        reply = request(bench.control, {"cmd": "mic", "action": "detach", "vm": VM})
        replies.append(time.monotonic() - before)
        if not reply.get("ok"):
            raise RuntimeError(f"mic detach refused: {reply}")
        took, leaked = bench.revoked(mark, before)
        times.append(took)
        leaks += leaked
    return {**summary(times), "control_reply_ms_median": ms(statistics.median(replies)),
            "capture_frames_after_denied": leaks}  # fmt: skip


def by_policy_edit(bench: Bench, repetitions: int) -> dict[str, Any]:
    guest = bench.guest
    assert guest is not None
    times, leaks, resumed_without_attach = [], 0, 0
    bench.attach()
    for _ in range(repetitions):
        mark = guest.mark()
        renamed = write_policy(bench.policy_dir, POLICY_DENY)
        took, leaked = bench.revoked(mark, renamed)
        times.append(took)
        leaks += leaked
        mark = guest.mark()
        write_policy(bench.policy_dir, POLICY_ATTACH)
        # The attachment outlives the deny: restoring the policy resumes the
        # microphone by itself (counted, since a user may not expect it).
        try:
            guest.wait_for(_state(StreamStatus.RUNNING), timeout=2, after=mark)
            guest.wait_for(lambda e: isinstance(e, CaptureData), timeout=5, after=mark)
            resumed_without_attach += 1
        except AssertionError:
            wait_for("the restored policy", lambda: _attachable(bench), 5)
            bench.attach()
    return {
        **summary(times),
        "capture_frames_after_denied": leaks,
        "mic_resumed_on_policy_restore_without_attach": resumed_without_attach,
    }


def _attachable(bench: Bench) -> bool:
    with contextlib.suppress(Exception):
        vm = request(bench.control, {"cmd": "status"}).get("vms", {}).get(VM, {})
        return "attach" in str((vm.get("capture") or {}).get("decision", "")).lower()
    return False


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def summary(times: list[float]) -> dict[str, Any]:
    return {
        "repetitions": len(times),
        "median_ms": ms(statistics.median(times)),
        "p99_ms": ms(percentile(times, 99)),
        "max_ms": ms(max(times)),
        "min_ms": ms(min(times)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repetitions", type=int, default=50)
    args = parser.parse_args()
    out: dict[str, Any] = {
        "benchmark": "microphone revocation: request or policy rename -> guest sees DENIED",
        "machine": machine(),
        "listen_after_denied_ms": LISTEN_AFTER_S * 1000,
    }
    with tempfile.TemporaryDirectory(prefix="qvaudio-revoke-") as tmp:
        bench = Bench(Path(tmp))
        try:
            bench.start()
            out["mic_detach"] = by_detach(bench, args.repetitions)
            out["policy_edit_capture_deny"] = by_policy_edit(bench, args.repetitions)
        finally:
            bench.stop()
    out["alternative"] = (
        "qvm-device mic detach (Qubes dom0) is not available on this machine; no figure"
    )
    out["load_avg_end"] = load_average()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
