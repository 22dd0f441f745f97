"""Eight VMs at once through one dom0 agent, with mixed policies.

Guests are scripted protocol peers (tests/fake_guest.py), each playing its
own frequency in real time; dom0 and the host PulseAudio are real. Allowed
VMs appear as separate streams named after them, denied ones never reach the
mixer, and each cap is measured on what the host receives.
"""

from __future__ import annotations

import subprocess
import threading
import time
from typing import Any

import pulsectl

from qvaudio.core.events import FormatAccept, FormatRefuse
from qvaudio.core.tone import (
    decode_mono,
    find_offset,
    find_onset,
    gaps,
    generate_sine,
)
from tests.dom0_harness import S16, Dom0, pitch, write_policy
from tests.fake_guest import FakeGuest
from tests.waiting import wait_until

# name: (frequency, policy lines, expected cap or None when denied). A volume
# is the mixer's percent, which PulseAudio maps cubically: max 50 is a sample
# factor of 0.5 ** 3 (docs/policy.md, tests/test_gain.py).
VMS: dict[str, tuple[int, str, float | None]] = {
    "vm1": (300, "playback: allow", 1.0),
    "vm2": (400, "playback: allow\n    volume: {default: 50, max: 50}", 0.5**3),
    "vm3": (500, "playback: deny", None),
    "vm4": (600, "playback: allow\n    volume: {default: 80, max: 80}", 0.8**3),
    "vm5": (700, "playback: deny", None),
    "vm6": (800, "playback: allow", 1.0),
    "disp1": (900, "playback: allow\n    volume: {default: 60, max: 60}", 0.6**3),
    "disp2": (1000, "playback: deny", None),
}
AMPLITUDE = 0.8


def policy_text() -> str:
    rules = "".join(f"  - vm: {name}\n    {lines}\n" for name, (_, lines, _) in VMS.items())
    return f"rules:\n{rules}"


def record_stream(host_env: dict[str, str], index: int, seconds: float, out: list[bytes]) -> None:
    """Record one sink input alone: parec's per-stream monitor (pa_simple has none)."""
    proc = subprocess.Popen(
        ["parec", f"--monitor-stream={index}", "--raw", "--format=s16le", "--rate=48000",
         "--channels=2", "--latency-msec=10"],
        env=host_env, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    wanted = int(seconds * S16.bytes_per_second)
    got = 0
    while got < wanted:
        chunk = proc.stdout.read(min(65536, wanted - got))
        if not chunk:
            break
        out.append(chunk)
        got += len(chunk)
    proc.terminate()
    proc.wait(5)


def test_eight_vms_mixed_policies(dom0: Dom0) -> None:
    write_policy(dom0.policy_dir, policy_text())
    time.sleep(0.3)
    guests = {name: dom0.guest(name) for name in VMS}
    for guest in guests.values():
        guest.offer(S16)
    for name, (_, _, cap) in VMS.items():
        expected: type[FormatAccept | FormatRefuse] = (
            FormatAccept if cap is not None else FormatRefuse
        )
        guests[name].wait_for_event(expected)

    allowed = {name for name, (_, _, cap) in VMS.items() if cap is not None}
    inputs: dict[str | None, Any] = {}

    def one_stream_per_allowed_vm() -> bool:
        nonlocal inputs
        with pulsectl.Pulse("test", server=dom0.host.server) as pulse:
            inputs = {si.proplist.get("qvaudio.vm"): si for si in pulse.sink_input_list()}
        return set(inputs) - {None} == allowed

    wait_until(  # host streams open in their own threads
        one_stream_per_allowed_vm,
        f"one named stream per allowed VM ({sorted(allowed)}), none for denied",
        10,
        interval=0.1,
        context=lambda: f"named streams: {sorted(str(vm) for vm in set(inputs) - {None})}",
    )
    assert set(inputs) - {None} == allowed, "one named stream per allowed VM, none for denied"
    for name in allowed:
        assert inputs[name].proplist.get("application.name") == name

    players = [
        guests[name].stream_pcm(generate_sine(freq, S16, 3.0, amplitude=AMPLITUDE), S16)
        for name, (freq, _, _) in VMS.items()
    ]
    # Each VM's stream is recorded alone (a monitor stream on its sink input),
    # so a cap can be measured per VM while all eight play.
    recordings: dict[str, list[bytes]] = {name: [] for name in allowed}
    recorders = []
    for name in allowed:
        thread = threading.Thread(
            target=record_stream,
            args=(dom0.host.full_env(), inputs[name].index, 2.5, recordings[name]),
            daemon=True,
        )
        thread.start()
        recorders.append(thread)
    for thread in players + recorders:
        thread.join()

    status = dom0.status()["vms"]
    for name in allowed:
        freq, _, cap = VMS[name]
        samples = decode_mono(b"".join(recordings[name]), S16)
        onset, offset = find_onset(samples, 0.01), find_offset(samples, 0.01)
        assert onset is not None and offset is not None, f"{name}: nothing recorded"
        tone = samples[onset:offset]
        # Frequency identifies the stream (which VM's audio this is); gaps are
        # counted by bench/ over minutes, not judged on a 2.5 s snippet.
        holes = gaps(tone, 48000, 1.0)
        measured = pitch(tone)
        why = f"{name}: {measured:.1f} Hz, gaps {holes}, dom0: {status[name]}"
        assert abs(measured - freq) / freq < 0.005, why
        peak = max(abs(x) for x in tone)
        assert cap is not None
        assert abs(peak - AMPLITUDE * cap) < 0.02, f"{name}: peak {peak}, cap {cap}"

    status = dom0.status()["vms"]
    for name, (_, _, cap) in VMS.items():
        counters = status[name]["counters"]
        if cap is None:
            assert status[name]["playback"]["decision"] == "deny"
            assert counters["bytes_received"] == 0
        else:
            assert counters["bytes_received"] > 0
    for guest in guests.values():
        assert isinstance(guest, FakeGuest)
