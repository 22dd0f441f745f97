"""What hostile VMs cost dom0, and the good VM beside them: one run per attack
and number of attackers.

    .venv/bin/python -m bench.hostile_bench [--seconds 8] [--counts 1,4,16] [--attacks ...]

Each step starts a private host PulseAudio and `qvaudio-dom0` with its default
settings, a good VM ("work", a process of its own, tests/guest_process.py)
playing a 440 Hz tone recorded on the host, a whole-machine stall detector
(tests/stalls.py) and a watcher of host stream events; then N attackers of
one kind for `--seconds`. Attackers are raw protocol peers in this process
(tests/fake_guest.py), their threads at nice 10 (they stand for other VMs,
which have CPUs of their own). Reported per step: dom0's CPU over the attack
as a share of one core, and that share less the good VM's own cost divided by
N (per hostile VM); frames dom0 took from the attackers; log lines about
them; how each attacker ended; the good VM's gaps during the attack, split
into those a whole-machine stall explains, those one CPU's stall could
explain (weaker: dom0's thread may not have been on that CPU), those a host
stream opening or closing explains, and the rest. The `honest`
attack is N ordinary VMs playing (10 ms frames): the baseline for the rest.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.pipeline import load_average, machine
from qvaudio.core.codec import encode
from qvaudio.core.events import (
    CaptureRequest,
    FormatAccept,
    FormatOffer,
    Goodbye,
    PlaybackData,
    StreamKind,
)
from qvaudio.core.formats import AudioFormat, SampleFormat
from tests.audio_daemons import PulseAudioServer
from tests.dom0_harness import S16, Dom0
from tests.fake_guest import FakeGuest, lower_priority
from tests.hostile_harness import ATTACKER_NICE, GoodVm, cpu_seconds, log_lines_about, paced
from tests.stalls import StallMonitor

F32_MONO = AudioFormat(48000, SampleFormat.F32LE, 1)
F32_8CH = AudioFormat(48000, SampleFormat.F32LE, 8)
SETTLE_S = 1.5

Attack = Callable[[FakeGuest, float], threading.Thread]


def _offer(guest: FakeGuest, fmt: AudioFormat) -> None:
    guest.offer(fmt)
    guest.wait_for_event(FormatAccept, timeout=10)


def honest(guest: FakeGuest, seconds: float) -> threading.Thread:
    _offer(guest, S16)
    return paced(guest, encode(PlaybackData(bytes(S16.bytes_for_ms(10)))), 100, seconds)


def one_ms(guest: FakeGuest, seconds: float) -> threading.Thread:
    _offer(guest, F32_MONO)
    return paced(guest, encode(PlaybackData(bytes(F32_MONO.min_pcm_bytes))), 1000, seconds)


def tiny(guest: FakeGuest, seconds: float) -> threading.Thread:
    _offer(guest, F32_MONO)
    return paced(guest, encode(PlaybackData(bytes(F32_MONO.frame_size))), 0, seconds)


def flood8(guest: FakeGuest, seconds: float) -> threading.Thread:
    _offer(guest, F32_8CH)
    return paced(guest, encode(PlaybackData(bytes(F32_8CH.bytes_for_ms(10)))), 300, seconds)


def format_storm(guest: FakeGuest, seconds: float) -> threading.Thread:
    _offer(guest, S16)

    def run() -> None:
        lower_priority(ATTACKER_NICE)
        end, i = time.monotonic() + seconds, 0
        while time.monotonic() < end and not guest.closed_by_peer.is_set():
            mark = guest.mark()
            try:
                guest.send(FormatOffer(StreamKind.PLAYBACK, ((F32_MONO, S16)[i % 2],)))
                guest.wait_for_event(FormatAccept, timeout=2, after=mark)
            except (OSError, AssertionError):
                return
            i += 1

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def mic_storm(guest: FakeGuest, seconds: float) -> threading.Thread:
    guest.offer(S16, capture=S16)
    guest.wait_for_event(FormatAccept, timeout=10)
    toggle = encode(CaptureRequest(True)) + encode(CaptureRequest(False))
    return paced(guest, toggle, 20, seconds)  # 40 requests a second: under the control limit


ATTACKS: dict[str, Attack] = {
    "honest": honest,
    "one_ms": one_ms,
    "tiny": tiny,
    "flood8": flood8,
    "format_storm": format_storm,
    "mic_storm": mic_storm,
}


def classify_gaps(good: GoodVm, since: float) -> dict[str, Any]:
    """The good VM's gaps since `since`, each under the first cause measured."""
    heard = good.heard_gaps(since)
    if heard is None:
        return {"tone_arrived": False}
    found: dict[str, list[float]] = {
        "machine_stall": [],
        "one_cpu_stall": [],
        "host_stream_event": [],
        "other": [],
    }
    for gap in heard[0]:
        if gap.machine_stall:
            kind = "machine_stall"
        elif gap.one_cpu_stall:
            kind = "one_cpu_stall"
        elif gap.host_stream_event:
            kind = "host_stream_event"
        else:
            kind = "other"
        found[kind].append(round(gap.duration_s * 1000, 1))
    return {"tone_arrived": True, "gaps_ms": found}


def step(base: Path, attack: str, count: int, seconds: float) -> dict[str, Any]:
    host = PulseAudioServer("host", base / "host")
    host.start()
    (base / "dom0").mkdir()
    dom0 = Dom0(base / "dom0", host)
    try:
        dom0.start()
        assert dom0.proc is not None
        with StallMonitor() as stalls:
            good = GoodVm(dom0, stalls, seconds=seconds + 2 * SETTLE_S)
            try:
                time.sleep(SETTLE_S)
                guests = [
                    dom0.guest(f"{attack.replace('_', '-')}-{i}", nice=ATTACKER_NICE)
                    for i in range(count)
                ]
                t0, c0 = time.monotonic(), cpu_seconds(dom0.proc.pid)
                threads = [ATTACKS[attack](g, seconds) for g in guests]
                for thread in threads:
                    thread.join(seconds + 5)
                elapsed = time.monotonic() - t0
                share = (cpu_seconds(dom0.proc.pid) - c0) / elapsed
                status = dom0.status()["vms"]
                good.finish()
                gap_report = classify_gaps(good, t0)
            finally:
                good.guest.close()
        names = [g.path.name for g in guests]
        ended = {}
        for g in guests:
            byes = g.received(Goodbye)
            ended[g.path.name] = byes[0][1].reason if byes else "still served"
        frames_taken = sum(
            status.get(n, {}).get("counters", {}).get("bytes_received", 0) for n in names
        )
        return {
            "attack": attack,
            "hostile_vms": count,
            "seconds": round(elapsed, 2),
            "dom0_core_share": round(share, 3),
            "hostile_bytes_taken": frames_taken,
            "log_lines_per_hostile_vm": max(len(log_lines_about(dom0, n)) for n in names),
            "ended": sorted(set(ended.values())),
            "good_vm": gap_report,
            "whole_machine_stalls_ms": [
                round(s.duration_s * 1000, 1) for s in stalls.whole_machine()
            ],
            "one_cpu_stalls_over_5_ms": sum(
                1 for cpu in stalls.cpus for s in stalls.late[cpu] if s.duration_s >= 0.005
            ),
        }
    finally:
        for guest in dom0.guests:
            guest.close()
        dom0.stop()
        host.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--counts", default="1,4,16")
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    results = []
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    load_before = load_average()
    for attack in args.attacks.split(","):
        for count in counts:
            with tempfile.TemporaryDirectory(prefix="qv-hostile-") as tmp:
                results.append(step(Path(tmp), attack, count, args.seconds))
                os.sync()
            print(json.dumps(results[-1]), flush=True, file=sys.stderr)
    baseline = {r["hostile_vms"]: r["dom0_core_share"] for r in results if r["attack"] == "honest"}
    for r in results:
        if r["hostile_vms"] in baseline and r["attack"] != "honest":
            extra = r["dom0_core_share"] - baseline[r["hostile_vms"]]
            r["extra_share_per_hostile_vm_vs_honest"] = round(extra / r["hostile_vms"], 4)
    print(
        json.dumps(
            {
                "bench": "hostile",
                "started": started,
                "machine": machine(),
                "load_average": {"before": load_before, "after": load_average()},
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
