"""`qvaudio policy check|show|set`: exit codes and output, via handlers and a subprocess."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qvaudio.cli_policy import add_policy_parser, main

REPO = Path(__file__).parent.parent
BAD = REPO / "tests" / "policy_corpus" / "bad"


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "policy.d"
    directory.mkdir(mode=0o755)
    default = directory / "90-default.yaml"
    default.write_text("rules:\n  - vm: '*'\n    playback: allow\n    capture: deny\n")
    default.chmod(0o644)
    return directory


def run(argv: list[str]) -> int:
    """Parse like the main CLI will (`qvaudio policy ...`) and call the handler."""
    parser = argparse.ArgumentParser(prog="qvaudio")
    add_policy_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["policy", *argv])
    code: int = args.func(args)
    return code


def test_check_valid(policy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["check", str(policy_dir)]) == 0
    out, err = capsys.readouterr()
    assert out == "OK: 1 files, 1 rules\n"
    assert err == ""


def test_check_invalid_prints_file_line_and_exits_1(
    policy_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = policy_dir / "30-work.yaml"
    bad.write_text("rules:\n  - vm: work\n    captrue: allow\n")
    assert run(["check", str(policy_dir)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"{bad}:3: unknown key 'captrue' in a rule (did you mean 'capture'?)\n"


def test_check_several_paths(capsys: pytest.CaptureFixture[str]) -> None:
    paths = [BAD / "duplicate-key.yaml", BAD / "volume-range.yaml"]
    assert run(["check", "--no-strict", *map(str, paths)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"{paths[0]}:5: duplicate key 'capture' (first at line 3)",
        f"{paths[1]}:5: volume.max must be between 0 and 100%, got 150",
    ]


def test_check_warns_about_per_vm_file_sorting_after_default(
    policy_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (policy_dir / "work.yaml").write_text("rules:\n  - vm: work\n    capture: allow\n")
    assert run(["check", str(policy_dir)]) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"{policy_dir}/work.yaml:2: warning: rule for 'work' never decides")
    assert "90-default.yaml:2" in err


def test_check_strict_mode(policy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (policy_dir / "90-default.yaml").chmod(0o666)
    assert run(["check", str(policy_dir)]) == 1
    assert "writable by group or others" in capsys.readouterr().err
    assert run(["check", "--no-strict", str(policy_dir)]) == 0


def test_check_defaults_to_the_configured_dir(
    policy_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("QVAUDIO_POLICY_DIR", str(policy_dir))
    assert run(["check"]) == 0
    assert capsys.readouterr().out == "OK: 1 files, 1 rules\n"


def test_show_names_the_deciding_rule(policy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (policy_dir / "50-media.yaml").write_text("rules:\n  - vm: '@tag:media'\n    capture: allow\n")
    assert run(["show", "work", "--tags", "media,x", "--policy-dir", str(policy_dir)]) == 0
    out = capsys.readouterr().out
    assert "vm: work (tags: media, x)" in out
    assert f"capture                 allow                 {policy_dir}/50-media.yaml:2" in out
    assert f"playback                allow                 {policy_dir}/90-default.yaml:2" in out
    assert "formats.rates           44100, 48000          built-in default" in out


def test_show_without_a_match(policy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (policy_dir / "90-default.yaml").write_text("rules:\n  - vm: work\n    playback: allow\n")
    assert run(["show", "other", "--policy-dir", str(policy_dir)]) == 0
    out = capsys.readouterr().out
    assert "playback                deny                  built-in default" in out
    assert "no rule matches this VM" in out


def test_show_invalid_policy_exits_1(policy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (policy_dir / "90-default.yaml").write_text("rules: {}\n")
    assert run(["show", "work", "--policy-dir", str(policy_dir)]) == 1
    err = capsys.readouterr().err
    assert f"{policy_dir}/90-default.yaml:1: 'rules' must be a list of rules" in err
    assert "denies all audio" in err


def test_set_then_show(policy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["set", "work", "volume.max", "50%", "--policy-dir", str(policy_dir)]) == 0
    assert run(["show", "work", "--policy-dir", str(policy_dir)]) == 0
    out = capsys.readouterr().out
    assert f"volume.max              50%                   {policy_dir}/30-work.yaml:5" in out


def test_set_bad_value_exits_1_and_writes_nothing(
    policy_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["set", "work", "capture", "sometimes", "--policy-dir", str(policy_dir)]) == 1
    assert "capture must be one of" in capsys.readouterr().err
    assert sorted(os.listdir(policy_dir)) == ["90-default.yaml"]


def test_set_warns_when_an_earlier_rule_still_decides(
    policy_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (policy_dir / "10-lockdown.yaml").write_text("rules:\n  - vm: '*'\n    capture: deny\n")
    assert run(["set", "work", "capture", "allow", "--policy-dir", str(policy_dir)]) == 0
    err = capsys.readouterr().err
    assert f"still decided by {policy_dir}/10-lockdown.yaml:2" in err


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_set_refuses_a_directory_the_agent_would_refuse(
    policy_dir: Path, mode: int, capsys: pytest.CaptureFixture[str]
) -> None:
    policy_dir.chmod(mode)
    assert run(["set", "work", "capture", "allow", "--policy-dir", str(policy_dir)]) == 1
    err = capsys.readouterr().err
    # The loader's own words about the directory, not a hint about "other files".
    assert err == (
        f"policy set: {policy_dir}: refusing directory writable by group or others "
        f"(mode {mode:04o}; chmod go-w); the agent reads no file in it, so nothing was written\n"
    )
    assert sorted(os.listdir(policy_dir)) == ["90-default.yaml"]
    assert run(["check", str(policy_dir)]) == 1, "policy check judges it the same way"
    capsys.readouterr()
    # --no-strict is for drafts, and writes.
    assert (
        run(["set", "work", "capture", "allow", "--no-strict", "--policy-dir", str(policy_dir)])
        == 0
    )


def test_set_fails_when_another_file_keeps_it_from_taking_effect(
    policy_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = policy_dir / "50-broken.yaml"
    broken.write_text("rules:\n  - vm: x\n    playback: maybe\n")
    assert run(["set", "work", "capture", "allow", "--policy-dir", str(policy_dir)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"{broken}:3: playback must be one of allow, deny, got 'maybe'"
    assert err[1].startswith(f"policy set: {policy_dir}/30-work.yaml was written, but the agent")


def test_unknown_key_is_a_usage_error(policy_dir: Path) -> None:
    with pytest.raises(SystemExit) as caught:
        run(["set", "work", "loudness", "3", "--policy-dir", str(policy_dir)])
    assert caught.value.code == 2


def test_main_entry_point(policy_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(policy_dir)]) == 0
    assert capsys.readouterr().out == "OK: 1 files, 1 rules\n"


def test_module_runs_as_a_program(policy_dir: Path) -> None:
    bad = policy_dir / "30-work.yaml"
    bad.write_text("rules:\n  - vm: work\n    volume: {max: 101}\n")
    ok = subprocess.run(
        [sys.executable, "-m", "qvaudio.cli_policy", "check", "--no-strict", str(REPO / "policy")],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert (ok.returncode, ok.stdout) == (0, "OK: 1 files, 1 rules\n")
    failed = subprocess.run(
        [sys.executable, "-m", "qvaudio.cli_policy", "check", str(policy_dir)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert failed.returncode == 1
    assert failed.stderr == f"{bad}:3: volume.max must be between 0 and 100%, got 101\n"
