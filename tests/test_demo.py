"""`qvaudio demo`, the README's main command, run the way a person runs it.

The installed `qvaudio` entry point starts its own two private PulseAudio
daemons and both agents with the shipped config and policy; these tests
only look at what it prints and how it exits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qvaudio.private_pulse import PrivatePulse

QVAUDIO = Path(sys.executable).parent / "qvaudio"
SHIPPED_POLICY = Path(__file__).resolve().parent.parent / "policy"
TIMEOUT_S = 120


def person_env(**extra: str) -> dict[str, str]:
    """The test's environment without anything pointing at an audio server or qvaudio."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PULSE_", "QVAUDIO_"))}
    env.update(extra)
    return env


def demo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    assert QVAUDIO.exists(), f"the qvaudio entry point is not installed at {QVAUDIO}"
    return subprocess.run(
        [str(QVAUDIO), "demo", *args],
        capture_output=True,
        text=True,
        env=env if env is not None else person_env(),
        timeout=TIMEOUT_S,
    )


def demo_json(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any], str]:
    done = demo("--json", *args, env=env)
    try:
        result = json.loads(done.stdout)
    except json.JSONDecodeError as exc:
        raise AssertionError(f"not one JSON object ({exc}):\n{done.stdout}\n{done.stderr}") from exc
    assert isinstance(result, dict)
    return done.returncode, result, done.stderr


def assert_tone_intact(result: dict[str, Any]) -> None:
    assert result["tone_arrived"] is True, result
    assert abs(result["measured_hz"] - 440.0) / 440.0 < 0.005, result
    assert result["frequency_error_percent"] < 0.5, result
    assert result["nonsilent_fraction"] >= 0.99, result
    # The sine dominates what arrived: a byte-swapped stream reads -26 dB. Not
    # higher: on a loaded machine the skips that bound latency read 17-24 dB.
    assert result["snr_db"] > 10, result


@pytest.mark.needs_audio  # the demo starts two private PulseAudio daemons
def test_the_tone_arrives_intact_and_json_is_one_object() -> None:
    code, result, stderr = demo_json()
    assert code == 0, stderr
    assert_tone_intact(result)
    assert result["vm"] == "demo-vm"
    assert result["played_to"] == "a private dom0 server"
    assert result["policy_decision"] == "allow"
    # The decision names the shipped file and line that made it.
    assert "default.yaml:" in result["policy_rule"], result
    assert result["policy_dir"] == str(SHIPPED_POLICY)
    assert result["format"] == "s16le 48000 Hz 2 ch", result
    assert isinstance(result["onset_delay_ms"], float), result
    assert isinstance(result["reported_latency_ms"], float), result
    # --json is for scripts: no progress lines mixed into either stream.
    assert "... starting" not in stderr


@pytest.mark.needs_audio  # the demo starts two private PulseAudio daemons
def test_a_person_sees_progress_and_a_verdict() -> None:
    done = demo()
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "qvaudio demo: the tone arrived", done.stdout
    for label in ("policy", "frequency", "non-silent", "signal-to-noise", "onset delay"):
        assert any(line.strip().startswith(label) for line in lines), (label, done.stdout)
    progress = [line for line in done.stderr.splitlines() if line.startswith("... ")]
    assert progress[0] == "... starting the VM's audio server", done.stderr
    assert any("qvaudio-dom0" in line for line in progress), done.stderr
    assert any("playing 440 Hz for 3 s" in line for line in progress), done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.needs_audio  # the demo starts two private PulseAudio daemons
def test_a_policy_that_denies_playback_is_shown_and_nothing_arrives(tmp_path: Path) -> None:
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "50-quiet.yaml").write_text(
        "rules:\n  - vm: '*'\n    playback: deny\n    capture: deny\n"
    )
    env = person_env(QVAUDIO_POLICY_DIR=str(policy))
    code, result, stderr = demo_json("--seconds", "1", env=env)
    assert code == 1, stderr
    assert result["tone_arrived"] is False
    assert result["policy_decision"] == "deny"
    assert "50-quiet.yaml:2" in result["policy_rule"], result
    assert result["policy_dir"] == str(policy)
    # Denied audio is silence on dom0's server, not a quieter tone.
    assert result["nonsilent_fraction"] == 0.0, result
    assert result["measured_hz"] == 0.0, result
    # The text form says why, without a traceback.
    done = demo("--seconds", "1", env=env)
    assert done.returncode == 1
    assert done.stdout.splitlines()[0] == "qvaudio demo: THE TONE DID NOT ARRIVE INTACT"
    assert "dom0's policy denies playback for 'demo-vm'" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_missing_pulseaudio_is_a_clear_message(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    done = demo(env=person_env(PATH=str(empty)))
    assert done.returncode == 1
    last = done.stderr.splitlines()[-1]
    assert last.startswith("qvaudio demo: PulseAudio is not installed"), done.stderr
    assert "apt-get install pulseaudio" in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


@pytest.mark.needs_audio  # the demo starts two private PulseAudio daemons
def test_speakers_plays_to_the_users_own_server(tmp_path: Path) -> None:
    # A private daemon stands in for the person's desktop audio server.
    desktop = PrivatePulse(tmp_path, "desktop")
    desktop.start()
    try:
        code, result, stderr = demo_json("--speakers", env=desktop.full_env())
    finally:
        desktop.stop()
    assert code == 0, stderr
    assert result["played_to"] == "your audio server"
    # The demo records that server's default source, so an intact tone is
    # proof it was played there.
    assert_tone_intact(result)
