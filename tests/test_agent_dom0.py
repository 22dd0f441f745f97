"""qvaudio-dom0 as a process, against a real (private) host PulseAudio and the
real xenstored; guests are scripted protocol peers on Unix sockets
(tests/fake_guest.py), named after the VMs they play.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pulsectl
import pytest

from qvaudio.core.events import (
    CaptureData,
    CaptureRequest,
    CaptureState,
    Cork,
    FormatAccept,
    FormatRefuse,
    Goodbye,
    PlaybackState,
    StreamStatus,
)
from qvaudio.core.tone import decode_mono, generate_sine
from qvaudio.dom0.control import request
from qvaudio.pulse.pcm import PcmStream
from tests.audio_daemons import NULL_SINK, PulseAudioServer
from tests.dom0_harness import (
    MONO,
    POLICY,
    S16,
    Dom0,
    analyse,
    pitch,
    play_into_host,
    record_host,
    record_streams,
    sink_inputs,
    start_null_sink_clock_once_dom0_plays,
    write_policy,
)
from tests.waiting import wait_until


def test_allowed_vm_plays_as_its_own_named_stream(dom0: Dom0) -> None:
    work = dom0.guest("work")
    work.offer(S16)
    assert work.wait_for_event(FormatAccept) == FormatAccept(
        work.received(FormatAccept)[0][1].stream, S16
    )
    recorder, recorded = record_host(dom0.host, 3.0)
    time.sleep(0.3)
    work.stream_pcm(generate_sine(440, S16, 2.0, amplitude=0.5), S16).join()
    names = {si.proplist.get("application.name") for si in sink_inputs(dom0.host)}
    assert "work" in names
    (work_input,) = [si for si in sink_inputs(dom0.host) if si.proplist.get("qvaudio.vm") == "work"]
    assert work_input.proplist.get("media.name") == "work playback"
    assert work_input.proplist.get("application.icon_name") == "qvaudio-vm"
    recorder.join()
    freq, coverage, _ = analyse(b"".join(recorded))
    assert abs(freq - 440) / 440 < 0.005, f"frequency {freq}"
    assert coverage >= 0.99, f"non-silent {coverage}"


def record_tone_at_mixer_volume(host: PulseAudioServer, tone: bytes, volume: float) -> float:
    """The recorded peak of `tone` played by an ordinary application at `volume`
    (pulsectl's float, the mixer's percent / 100): PulseAudio's own scale."""
    recorder, recorded = record_host(host, 2.5)
    time.sleep(0.3)
    with PcmStream.playback(
        host.server, NULL_SINK, S16, "reference", "reference", S16.bytes_for_ms(50)
    ) as stream:
        with pulsectl.Pulse("test", server=host.server) as pulse:
            (mine,) = [
                si
                for si in pulse.sink_input_list()
                if si.proplist.get("application.name") == "reference"
            ]
            pulse.volume_set_all_chans(mine, volume)
        for i in range(0, len(tone), S16.bytes_for_ms(10)):
            stream.write(tone[i : i + S16.bytes_for_ms(10)])
    recorder.join()
    return analyse(b"".join(recorded))[2]


def test_volume_cap_is_measured_on_the_host(dom0: Dom0) -> None:
    """`max` and `default` are the mixer's percent: measured against PulseAudio itself.

    quiet's policy is volume {default: 40, max: 50}: it starts as loud as any
    application at the mixer's 40 %, and at its own slider's 100 % it is as
    loud as one at 50 %, never louder."""
    quiet = dom0.guest("quiet")
    quiet.offer(S16)
    quiet.wait_for_event(FormatAccept)

    def stream_at(flat: float) -> Any:
        mine = [si for si in sink_inputs(dom0.host) if si.proplist.get("qvaudio.vm") == "quiet"]
        return mine[0] if mine and abs(mine[0].volume.value_flat - flat) < 0.005 else None

    # The cap is in the samples, so the stream's slider starts at 40/50 of its range.
    stream = wait_until(lambda: stream_at(0.80), "quiet's stream at its default", 10)
    tone = generate_sine(440, S16, 1.5, amplitude=0.8)

    def heard() -> float:
        recorder, recorded = record_host(dom0.host, 2.5)
        time.sleep(0.3)
        quiet.stream_pcm(tone, S16).join()
        recorder.join()
        freq, _, level = analyse(b"".join(recorded))
        assert abs(freq - 440) / 440 < 0.005
        return level

    at_default = heard()
    # The mixer's 40 % is 0.4 ** 3 of the amplitude (-24 dB), not 0.4 of it ...
    assert at_default == pytest.approx(0.8 * 0.4**3, rel=0.05), f"peak {at_default}"
    # ... exactly what any application at the mixer's 40 % gives.
    reference = record_tone_at_mixer_volume(dom0.host, tone, 0.40)
    assert at_default == pytest.approx(reference, rel=0.03), (at_default, reference)
    # The user drags it to 100 %: the cap, as loud as an application at 50 %.
    with pulsectl.Pulse("test", server=dom0.host.server) as pulse:
        pulse.volume_set_all_chans(stream, 1.0)
    capped = heard()
    assert capped == pytest.approx(0.8 * 0.5**3, rel=0.05), f"peak {capped}"
    reference = record_tone_at_mixer_volume(dom0.host, tone, 0.50)
    assert capped == pytest.approx(reference, rel=0.03), (capped, reference)


def test_denied_vm_is_refused_and_silent_while_others_play(dom0: Dom0) -> None:
    blocked = dom0.guest("blocked")
    blocked.offer(S16)
    refusal = blocked.wait_for_event(FormatRefuse)
    assert "playback deny by" in refusal.reason
    assert "50-test.yaml:" in refusal.reason
    assert not [si for si in sink_inputs(dom0.host) if si.proplist.get("qvaudio.vm") == "blocked"]
    status = dom0.status()["vms"]["blocked"]
    assert status["playback"]["decision"] == "deny"


def test_live_policy_edit_stops_playback_and_invalid_edit_keeps_last_good(dom0: Dom0) -> None:
    work = dom0.guest("work")
    work.offer(S16)
    work.wait_for_event(FormatAccept)
    write_policy(dom0.policy_dir, "rules:\n  - vm: work\n    playback: [not, valid]\n")
    time.sleep(0.5)
    status = dom0.status()
    assert status["policy"]["problems"], "the broken edit is reported"
    assert "50-test.yaml:3" in status["policy"]["problems"][0]
    assert status["vms"]["work"]["playback"]["decision"] == "allow", "last good policy kept"
    write_policy(
        dom0.policy_dir,
        POLICY.replace(
            "    playback: allow\n    capture: attach", "    playback: deny\n    capture: attach", 1
        ),
    )
    stopped = work.wait_for_event(PlaybackState)
    assert stopped.status is StreamStatus.DENIED

    def work_stream_gone() -> bool:
        return not [si for si in sink_inputs(dom0.host) if si.proplist.get("qvaudio.vm") == "work"]

    wait_until(work_stream_gone, "work's host stream to be removed", 3, interval=0.05)


def test_microphone_needs_policy_and_request_and_detach_revokes(dom0: Dom0) -> None:
    with pulsectl.Pulse("test", server=dom0.host.server) as pulse:
        pulse.source_default_set(f"{NULL_SINK}.monitor")
    work = dom0.guest("work")
    work.offer(S16, capture=MONO)
    work.wait_for_event(FormatAccept, lambda e: e.stream.name == "CAPTURE")
    work.send(CaptureRequest(True))
    refused = work.wait_for_event(CaptureState)
    assert refused.status is StreamStatus.DENIED
    assert "qvaudio mic attach work" in refused.reason
    assert not record_streams(dom0.host, "work"), "no host record stream before permission"

    player = play_into_host(dom0.host, 3.0)
    reply = request(dom0.control, {"cmd": "mic", "action": "attach", "vm": "work"})
    assert reply["ok"], reply
    work.wait_for_event(CaptureState, lambda e: e.status is StreamStatus.RUNNING)
    work.wait_for_event(CaptureData, timeout=5)
    time.sleep(1.0)
    assert record_streams(dom0.host, "work")
    mark = work.mark()
    before = time.monotonic()
    reply = request(dom0.control, {"cmd": "mic", "action": "detach", "vm": "work"})
    assert reply["ok"] and not reply["attached"]
    revoked = work.wait_for_event(
        CaptureState, lambda e: e.status is StreamStatus.DENIED, after=mark
    )
    revoked_at = next(t for t, e in work.events if e is revoked)
    assert revoked_at - before < 0.1, f"revocation took {revoked_at - before:.3f} s"
    time.sleep(0.5)
    later = [t for t, _ in work.received(CaptureData) if t > revoked_at]
    assert later == [], "no microphone sample after revocation"
    player.join()
    samples = decode_mono(work.capture_pcm(), MONO)
    assert abs(pitch(samples) - 1000) / 1000 < 0.005
    wait_until(
        lambda: not record_streams(dom0.host, "work"),
        "the host record stream to end after revocation",
        2,
        interval=0.05,
    )


def test_mic_attach_refused_when_policy_does_not_say_attach_on_request(dom0: Dom0) -> None:
    dom0.guest("other")
    reply = request(dom0.control, {"cmd": "mic", "action": "attach", "vm": "other"})
    assert not reply["ok"] and "denied" in reply["error"]
    out = subprocess.run(
        [sys.executable, "-m", "qvaudio.cli", "--control-socket", str(dom0.control),
         "mic", "attach", "nosuchvm"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert out.returncode == 1 and "no running VM named 'nosuchvm'" in out.stderr


def test_hostile_guest_is_cut_off_alone(dom0: Dom0) -> None:
    work = dom0.guest("work")
    work.offer(S16)
    work.wait_for_event(FormatAccept)
    recorder, recorded = record_host(dom0.host, 3.0)
    time.sleep(0.3)
    player = work.stream_pcm(generate_sine(440, S16, 2.0, amplitude=0.5), S16)
    evil = dom0.guest("evil")
    evil.send_raw(b"\x20\x00\xff\xff" + b"\0" * 100)  # oversized PCM before any format
    goodbye = evil.wait_for_event(Goodbye)
    assert goodbye.code.name == "PROTOCOL_ERROR"
    assert "exceeds 65532" in goodbye.reason
    assert evil.closed_by_peer.wait(2)
    player.join()
    recorder.join()
    freq, coverage, _ = analyse(b"".join(recorded))
    assert abs(freq - 440) / 440 < 0.005 and coverage >= 0.99, (freq, coverage)
    assert "evil: cut off: protocol error" in dom0.log_text()
    assert dom0.proc is not None and dom0.proc.poll() is None


def test_status_command_lists_vms(dom0: Dom0) -> None:
    work = dom0.guest("work")
    work.offer(S16, capture=MONO)
    work.wait_for_event(FormatAccept, lambda e: e.stream.name == "CAPTURE")
    work.send(CaptureRequest(True))  # work's policy: attach-on-request
    work.wait_for_event(CaptureState)
    out = subprocess.run(
        [sys.executable, "-m", "qvaudio.cli", "--control-socket", str(dom0.control),
         "status", "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    status = json.loads(out.stdout)
    vm = status["vms"]["work"]
    assert vm["state"] == "open" and vm["transport"] == f"unix:{dom0.vm_dir / 'work'}"
    assert vm["playback"]["format"] == "s16le 48000 Hz 2 ch"
    text = subprocess.run(
        [sys.executable, "-m", "qvaudio.cli", "--control-socket", str(dom0.control), "status"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "work: open via unix:" in text and "playback: allow" in text
    assert "(reserve 10 ms)" in text, "the adaptive jitter buffer, as it starts"
    assert "underruns 0 late from the VM, 0 on the host (0 of them stalls" in text
    assert "volume 100% (cap 100%)" in text, "the default next to the cap"
    assert "microphone: work is asking for it; to grant it: qvaudio mic attach work" in text
    assert "UNREACHABLE" not in text and status["host"]["reachable"] is True
    assert (dom0.control.stat().st_mode & 0o777) == 0o600


def test_status_says_when_the_host_audio_server_is_unreachable(
    tmp_path: Path, host: PulseAudioServer
) -> None:
    agent = Dom0(tmp_path, host)
    agent.config = f"dom0:\n  pulse_server: unix:{tmp_path / 'no-server-here'}\n"
    agent.start()
    try:
        work = agent.guest("work")
        work.offer(S16)
        work.wait_for_event(FormatAccept)

        def unreachable() -> bool:
            return agent.status()["host"]["reachable"] is False

        wait_until(unreachable, "the status to say the host is unreachable", 10)
        text = subprocess.run(
            [sys.executable, "-m", "qvaudio.cli", "--control-socket", str(agent.control),
             "status"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert "host audio server: UNREACHABLE" in text, text
        assert "NOT HEARD: the host audio server is unreachable" in text, text
    finally:
        assert agent.stop() == 0, agent.log_text()


#: Loads in about a second: signals and requests land inside reloads.
SLOW_POLICY = "rules:\n" + "".join(
    f"  - vm: vm{i}\n    playback: allow\n    volume: {{max: 50}}\n" for i in range(4000)
)

#: Run in a process of its own: before the fix it deadlocked, and must fail instead.
SIGHUP_INSIDE_A_RELOAD = """
import os, signal, sys, time
from pathlib import Path
from typing import Any
import qvaudio.dom0.policy_watch as policy_watch
from qvaudio.dom0.agent import Dom0Agent
from qvaudio.common.config import Dom0Settings

base = Path(sys.argv[1])
real_loader = policy_watch.load_policy_dir

def loader(directory):
    # The handler runs right after this, inside the control reload's lock.
    os.kill(os.getpid(), signal.SIGHUP)
    return real_loader(directory)

policy_watch.load_policy_dir = loader
settings = Dom0Settings(transports=(f"unix:{base / 'vms'}",), notifications=False)
agent = Dom0Agent(settings, policy_dir=base / "policy", control_path=base / "run" / "c.sock")
agent.install_signal_handlers()
reply = agent.handle_control({"cmd": "reload"})
assert reply == {"ok": True, "problems": []}, reply
assert agent.inbox.get_nowait()[0] == "reload"
agent._drain_inbox(time.monotonic())
print("answered")
"""


def test_sighup_inside_a_control_reload_goes_through_the_loop(tmp_path: Path) -> None:
    for sub in ("vms", "policy"):
        (tmp_path / sub).mkdir(mode=0o700)
    write_policy(tmp_path / "policy", POLICY)
    done = subprocess.run(
        [sys.executable, "-c", SIGHUP_INSIDE_A_RELOAD, str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (0, "answered\n"), done.stderr


def test_sighups_during_reloads_leave_the_agent_responsive(dom0: Dom0) -> None:
    proc = dom0.proc
    assert proc is not None
    hanging_up = threading.Event()

    def hang_up() -> None:
        while not hanging_up.is_set():
            proc.send_signal(signal.SIGHUP)
            hanging_up.wait(0.01)

    def reload() -> None:
        request(dom0.control, {"cmd": "reload"}, timeout=60)

    sender = threading.Thread(target=hang_up)
    sender.start()
    try:
        for edit in range(3):
            # The watcher thread starts loading the first write; the second,
            # made while the control reload waits for it, is then loaded by
            # the reload itself, on the loop's thread, under the SIGHUPs.
            write_policy(dom0.policy_dir, SLOW_POLICY + f"# edit {edit}\n", "40-slow.yaml")
            reloading = threading.Thread(target=reload)
            reloading.start()
            time.sleep(0.2)
            write_policy(dom0.policy_dir, SLOW_POLICY + f"# edit {edit}b\n", "40-slow.yaml")
            reloading.join()
    finally:
        hanging_up.set()
        sender.join()
    answered = request(dom0.control, {"cmd": "status"}, timeout=20)
    assert answered["ok"] and answered["policy"]["loaded"]
    assert any(f.endswith("40-slow.yaml") for f in answered["policy"]["files"])
    assert proc.poll() is None


def test_guest_restart_reconnects(dom0: Dom0) -> None:
    work = dom0.guest("work")
    work.close()
    again = dom0.guest("work")
    again.offer(S16)
    again.wait_for_event(FormatAccept)
    assert dom0.status()["vms"]["work"]["state"] == "open"


def test_underruns_are_counted_only_while_playing(dom0: Dom0) -> None:
    def seen() -> tuple[int, int, int]:
        vm = dom0.status()["vms"]["work"]
        counters = vm["counters"]
        return counters["underruns"], counters["host_underruns"], vm["playback"]["jitter_buffer_ms"]

    def burst(seconds: float) -> None:
        # Each burst starts 40 ms ahead, so this test's own pacing on a busy
        # machine cannot run the host dry; only the pauses below can.
        tone_ = generate_sine(440, S16, seconds, amplitude=0.5)
        work.stream_pcm(tone_, S16, lead_ms=40).join()

    work = dom0.guest("work")
    work.offer(S16)
    work.wait_for_event(FormatAccept)
    sending = threading.Thread(target=burst, args=(1.0,))
    sending.start()
    start_null_sink_clock_once_dom0_plays(dom0.host)  # so the host plays at once
    sending.join()
    late, dry, jitter = seen()
    # Gaps since the stream started (a busy machine's) make the first stall
    # below the second in a row, which grows the reserve; else it is forgiven.
    quiet_before = (late, dry) == (0, 0)
    time.sleep(0.3)  # the guest stalls without corking: the host runs dry
    burst(0.5)
    work.send(Cork(True))
    time.sleep(0.3)  # a corked guest is idle, not late, and the host's silence is no gap
    work.send(Cork(False))
    burst(0.5)
    time.sleep(0.3)  # and stalls again
    burst(0.5)
    time.sleep(0.2)
    # Each stall is seen twice, as audio arriving late and as the real host
    # stream running dry: one gap each. The first after a quiet while grows
    # nothing, the second a step. The pause of the same length is not
    # counted at all.
    grown = 10 if quiet_before else 20
    assert seen() == (late + 2, dry + 2, jitter + grown), dom0.log_text()
