"""The main config: shipped file valid, every error names file:line."""

from __future__ import annotations

from pathlib import Path

import pytest

from qvaudio.common import config as config_module
from qvaudio.common.config import (
    DOM0_BOUNDS,
    GUEST_BOUNDS,
    SOURCE_CONFIG_PATH,
    Config,
    ConfigError,
    Dom0Settings,
    GuestSettings,
    load_config,
    parse_config,
)
from qvaudio.core.formats import AudioFormat, SampleFormat
from qvaudio.transport.addresses import parse_vsock_map


def test_shipped_config_is_valid_and_matches_the_defaults() -> None:
    shipped = load_config(SOURCE_CONFIG_PATH)
    defaults = Config()
    assert shipped.guest == defaults.guest
    assert shipped.dom0 == defaults.dom0


def test_missing_default_file_means_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("QVAUDIO_CONFIG", raising=False)
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", tmp_path / "etc.yaml")
    monkeypatch.setattr(config_module, "SOURCE_CONFIG_PATH", tmp_path / "checkout.yaml")
    assert load_config() == Config()


def test_a_named_file_that_is_missing_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    absent = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match=f"^{absent}: no such file$"):
        load_config(absent)
    # Named by the environment is named too: a typo there must not mean defaults.
    monkeypatch.setenv("QVAUDIO_CONFIG", str(absent))
    with pytest.raises(ConfigError, match=f"^{absent}: no such file$"):
        load_config()


def test_every_problem_is_reported_with_its_line() -> None:
    text = (
        b"guest:\n  period_ms: 0\n  sink_name: 'my sink'\n  colour: blue\n"
        b"dom0:\n  playback_latency_ms: 99999\n  playback_reserve_ms: -1\n"
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, "q.yaml")
    assert [p.split(": ")[0] for p in info.value.problems] == [
        "q.yaml:2",
        "q.yaml:3",
        "q.yaml:4",
        "q.yaml:6",
        "q.yaml:7",
    ]
    assert "device name 'my sink' must match" in info.value.problems[1]
    assert str(info.value) == "\n".join(info.value.problems)


@pytest.mark.parametrize(
    ("settings", "name", "bounds"),
    [(GuestSettings, n, b) for n, b in GUEST_BOUNDS.items()]
    + [(Dom0Settings, n, b) for n, b in DOM0_BOUNDS.items()],
)
def test_settings_refuse_what_the_file_refuses(settings: type, name: str, bounds: object) -> None:
    """No route (file, flag or code) gets a value past its range to an agent."""
    from qvaudio.common.config import Bounds

    assert isinstance(bounds, Bounds)
    step = 1 if bounds.whole else 0.05
    for bad in (bounds.low - step, bounds.high + step, float("nan")):
        with pytest.raises(ValueError, match=f"{name}: .* is outside {bounds}"):
            settings(**{name: bad})
    for good in (bounds.low, bounds.high):
        assert getattr(settings(**{name: good}), name) == good


def test_device_names_are_checked_in_the_settings() -> None:
    with pytest.raises(ValueError, match="device name 'a b' must match"):
        GuestSettings(source_name="a b")


def test_values_are_read() -> None:
    config = parse_config(
        b"guest:\n  transport: unix:/run/x.sock\n  formats: [f32le:44100:6]\n"
        b"  idle_timeout_s: 0.5\ndom0:\n  transports: [xen, 'unix:/run/vms']\n"
        b"  notifications: no\n",
        "q.yaml",
    )
    assert config.guest.transport == "unix:/run/x.sock"
    assert config.guest.formats == (AudioFormat(44100, SampleFormat.F32LE, 6),)
    assert config.guest.idle_timeout_s == 0.5
    assert config.dom0.transports == ("xen", "unix:/run/vms")
    assert config.dom0.notifications is False


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            b"guest:\n  transprot: xen:0\n",
            "q.yaml:2: unknown key 'transprot' in guest: (did you mean 'transport'?)",
        ),
        (b"guest:\n  transport: tcp:1\n", "q.yaml:2: guest.transport: bad address 'tcp:1'"),
        (
            b"guest:\n  formats:\n  - s16le:48000:2\n  - s16le:22050:2\n",
            "q.yaml:4: guest.formats: unsupported rate 22050 Hz",
        ),
        (b"guest:\n  period_ms: 0\n", "q.yaml:2: guest.period_ms: 0 is outside 2 to 100"),
        (
            b"dom0:\n  playback_latency_ms: 99999\n",
            "q.yaml:2: dom0.playback_latency_ms: 99999 is outside 5 to 1000",
        ),
        (
            b"guest:\n  sink_name: qvaudio out\n",
            "q.yaml:2: guest.sink_name: device name 'qvaudio out' must match",
        ),
        (b"dom0:\n  xen_port: 1\n  xen_port: 2\n", "q.yaml:3: duplicate key 'xen_port'"),
        (b"dom0:\n  transports: [tcp]\n", "q.yaml:2: dom0.transports: 'tcp' is not xen"),
        (
            b"dom0:\n  notifications: maybe\n",
            "q.yaml:2: dom0.notifications: expected true or false",
        ),
        (b"a: &x [1]\nb: *x\n", "q.yaml:1: anchors"),
        (b"- 1\n", "q.yaml:1: the config file must be a mapping"),
        (b"guest: [1\n", "q.yaml:2: YAML syntax error"),
    ],
)
def test_errors_name_file_and_line(text: bytes, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "q.yaml")
    assert str(info.value).startswith(message)


def test_vsock_map() -> None:
    assert parse_vsock_map("vsock:work=5,media=6") == {"work": 5, "media": 6}
    with pytest.raises(ValueError, match="CID >= 3"):
        parse_vsock_map("vsock:work=2")


def comment_above(key: str, section: str) -> str:
    """The comment lines right above `key:` in the shipped file's `section:`."""
    lines = SOURCE_CONFIG_PATH.read_text().splitlines()
    at = lines.index(f"{section}:")
    while lines[at].strip().split(":")[0] != key:
        at += 1
    above: list[str] = []
    while lines[at - 1].strip().startswith("#"):
        at -= 1
        above.insert(0, lines[at].strip().lstrip("# "))
    return " ".join(above)


def test_shipped_file_names_every_transport_each_side_accepts() -> None:
    from qvaudio.transport import parse_address

    guest = comment_above("transport", "guest")
    for example in ("xen:0", "vsock:2:4790", "unix:/path", "qrexec:"):
        parse_address(example)  # an accepted form...
        assert example in guest, example  # ...that the comment names
    dom0 = comment_above("transports", "dom0")
    for example, accepted in (
        ("xen", "xen"),
        ("qrexec", "qrexec"),
        ("unix:DIR", "unix:/run/vms"),
        ("vsock:NAME=CID", "vsock:work=5"),
    ):
        parse_config(f"dom0:\n  transports: ['{accepted}']\n".encode(), "q.yaml")
        assert example in dom0, example
