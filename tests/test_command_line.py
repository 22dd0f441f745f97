"""What a new user touches first: the three commands' help, version, flags and config checks.

The installed entry points (this virtualenv's console scripts) run in
subprocesses where the process is what is judged (a missing dependency, exit
codes); the parsers are called in-process where they say the same.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from qvaudio import __version__, agent_dom0, agent_guest, cli
from qvaudio.common.config import DOM0_BOUNDS, GUEST_BOUNDS, Bounds, Dom0Settings
from qvaudio.common.extras import missing_message

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
COMMANDS = ("qvaudio", "qvaudio-dom0", "qvaudio-guest")

#: As if `pip install qvaudio` had been run without the "dom0" extra.
NO_NUMPY = """\
import sys


class _NoNumpy:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "numpy" or name.startswith("numpy."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NoNumpy())
"""


def run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=60, env=env, cwd=REPO, check=False
    )


@pytest.fixture(scope="module")
def without_numpy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    shim = tmp_path_factory.mktemp("no-numpy")
    (shim / "sitecustomize.py").write_text(NO_NUMPY)
    env = dict(os.environ, PYTHONPATH=str(shim))
    proof = run([sys.executable, "-c", "import numpy"], env)
    assert "No module named 'numpy'" in proof.stderr, "the shim must hide numpy"
    return env


# -- 1. a missing optional dependency --------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_help_and_version_work_without_numpy(command: str, without_numpy: dict[str, str]) -> None:
    shown = run([str(BIN / command), "--help"], without_numpy)
    assert shown.returncode == 0 and shown.stdout.startswith("usage: "), shown.stderr
    version = run([str(BIN / command), "--version"], without_numpy)
    assert (version.returncode, version.stdout, version.stderr) == (
        0,
        f"{command} {__version__}\n",
        "",
    )


def test_dom0_without_numpy_says_in_one_line_what_to_install(
    tmp_path: Path, without_numpy: dict[str, str]
) -> None:
    started = run(
        [str(BIN / "qvaudio-dom0"), "--transport", f"unix:{tmp_path}",
         "--control-socket", str(tmp_path / "control.sock")],
        without_numpy,
    )  # fmt: skip
    assert started.returncode == 1
    assert started.stderr == missing_message("qvaudio-dom0", "numpy") + "\n"
    assert "pip install 'qvaudio[dom0]'" in started.stderr
    assert not (tmp_path / "control.sock").exists(), "it stopped before doing anything"


def test_every_module_imports_without_numpy(without_numpy: dict[str, str]) -> None:
    """Optional packages are imported where they are used, never at a module's top."""
    walk = (
        "import importlib, pkgutil, qvaudio\n"
        "for m in pkgutil.walk_packages(qvaudio.__path__, 'qvaudio.'):\n"
        "    importlib.import_module(m.name)\n"
    )
    imported = run([sys.executable, "-c", walk], without_numpy)
    assert imported.returncode == 0, imported.stderr


# -- 2. numeric flags: the config's ranges ---------------------------------------------------

Parser = Callable[[], argparse.ArgumentParser]
PARSERS: dict[str, Parser] = {
    "qvaudio-dom0": agent_dom0.build_parser,
    "qvaudio-guest": agent_guest.build_parser,
}
#: (command, flag, the config key it overrides, its range).
NUMERIC_FLAGS = [
    ("qvaudio-dom0", "--latency-ms", "playback_latency_ms", DOM0_BOUNDS["playback_latency_ms"]),
    ("qvaudio-dom0", "--reserve-ms", "playback_reserve_ms", DOM0_BOUNDS["playback_reserve_ms"]),
    ("qvaudio-guest", "--period-ms", "period_ms", GUEST_BOUNDS["period_ms"]),
    ("qvaudio-guest", "--idle-timeout", "idle_timeout_s", GUEST_BOUNDS["idle_timeout_s"]),
]


def parse(command: str, argv: list[str]) -> argparse.Namespace:
    return PARSERS[command]().parse_args(argv)


@pytest.mark.parametrize(("command", "flag", "key", "bounds"), NUMERIC_FLAGS)
def test_numeric_flags_take_their_config_keys_range(
    command: str, flag: str, key: str, bounds: Bounds, capsys: pytest.CaptureFixture[str]
) -> None:
    step = 1 if bounds.whole else bounds.low / 2
    for bad in (bounds.low - step, bounds.high + step, -5, "x"):
        with pytest.raises(SystemExit) as exited:
            parse(command, [flag, str(bad)])
        assert exited.value.code == 2
        error = capsys.readouterr().err.splitlines()[-1]
        assert error.startswith(f"{command}: error: argument {flag}: "), error
        assert f"is outside {bounds}" in error or "expected" in error, error
    for good in (bounds.low, bounds.high):
        dest = flag.removeprefix("--").replace("-", "_")
        assert getattr(parse(command, [flag, str(good)]), dest) == good


def test_every_numeric_flag_is_range_checked_and_its_help_says_the_range() -> None:
    flags = {(command, flag) for command, flag, _, _ in NUMERIC_FLAGS}
    for command, build in PARSERS.items():
        for action in build()._actions:
            # A bare int or float would let -5 through to a thread that dies of it.
            assert action.type not in (int, float), (command, action.option_strings)
            key = getattr(action.type, "__name__", "")
            bounds = (DOM0_BOUNDS if command == "qvaudio-dom0" else GUEST_BOUNDS).get(key)
            if bounds is not None:
                assert (command, action.option_strings[-1]) in flags
                assert str(bounds) in (action.help or ""), action.help


def test_zero_is_a_value_not_an_absent_flag() -> None:
    args = parse("qvaudio-dom0", ["--reserve-ms", "0"])
    base = Dom0Settings(playback_reserve_ms=40)
    assert agent_dom0.settings_from(args, base).playback_reserve_ms == 0
    assert agent_dom0.settings_from(parse("qvaudio-dom0", []), base) == base


def test_dom0_refuses_a_negative_latency_before_starting(tmp_path: Path) -> None:
    refused = run([str(BIN / "qvaudio-dom0"), "--latency-ms", "-5"])
    assert refused.returncode == 2
    assert refused.stderr.splitlines()[-1] == (
        "qvaudio-dom0: error: argument --latency-ms: -5 is outside 5 to 1000"
    )


# -- 3. the config file -----------------------------------------------------------------------

BAD_CONFIG = "guest:\n  sink_name: 'my speakers'\n  period_ms: 0\ndom0:\n  playback_latency_ms: 0\n"


def config_check(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(["config", "check", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_config_check_of_a_missing_file_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    absent = tmp_path / "nonexistent.yaml"
    assert config_check([str(absent)], capsys) == (1, "", f"{absent}: no such file\n")


def test_config_check_reports_every_problem_the_agents_refuse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "qvaudio.yaml"
    bad.write_text(BAD_CONFIG)
    code, out, err = config_check([str(bad)], capsys)
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        f"{bad}:2: guest.sink_name: device name 'my speakers' must match [A-Za-z0-9_.\\-]+",
        f"{bad}:3: guest.period_ms: 0 is outside 2 to 100",
        f"{bad}:5: dom0.playback_latency_ms: 0 is outside 5 to 1000",
    ]
    # The guest agent refuses the same file with the same words, before it starts.
    guest = run([str(BIN / "qvaudio-guest"), "--config", str(bad)])
    assert (guest.returncode, guest.stderr) == (2, err)


def test_config_check_accepts_the_shipped_file(capsys: pytest.CaptureFixture[str]) -> None:
    shipped = REPO / "qvaudio.yaml"
    assert config_check([str(shipped)], capsys) == (0, f"{shipped}: OK\n", "")


def test_guest_with_a_missing_config_file_refuses_to_start(tmp_path: Path) -> None:
    absent = tmp_path / "nonexistent.yaml"
    started = run([str(BIN / "qvaudio-guest"), "--config", str(absent)])
    assert (started.returncode, started.stderr) == (2, f"{absent}: no such file\n")


# -- 6. qvaudio status ------------------------------------------------------------------------


def vm_status(**playback: object) -> dict[str, object]:
    return {
        "state": "open",
        "transport": "unix:/run/vms/work",
        "playback": {
            "decision": "allow",
            "rule": "playback allow by 90-default.yaml:3",
            "active": True,
            "corked": False,
            "format": "s16le 48000 Hz 2 ch",
            "volume_default": 60,
            "volume_max": 80,
            "latency_us": 41000,
            "jitter_buffer_ms": 10,
            "host_stream": "ok",
            **playback,
        },
        "capture": {
            "decision": "attach-on-request",
            "rule": "capture attach-on-request by 30-work.yaml:4",
            "mic_attached": False,
            "requested": True,
            "running": False,
        },
    }


def reply(**vms: dict[str, object]) -> dict[str, object]:
    reachable = all(v["playback"]["host_stream"] == "ok" for v in vms.values())  # type: ignore[index]
    return {
        "ok": True,
        "policy": {"dir": "/etc/qvaudio/policy.d", "loaded": True, "problems": []},
        "host": {"server": "the session's default", "reachable": reachable},
        "vms": vms,
    }


def test_status_tells_a_vm_asks_for_the_microphone_and_how_to_grant_it() -> None:
    text = cli._format_status(reply(work=vm_status()))
    assert "  microphone: work is asking for it; to grant it: qvaudio mic attach work" in text
    assert "volume 60% (cap 80%)" in text
    assert "latency 41.0 ms" in text
    assert "UNREACHABLE" not in text


def test_status_says_the_host_audio_server_is_unreachable() -> None:
    text = cli._format_status(reply(work=vm_status(host_stream="unreachable", corked=True)))
    assert text.splitlines()[1].startswith("host audio server: UNREACHABLE")
    assert "NOT HEARD: the host audio server is unreachable" in text
    assert "idle" not in text
