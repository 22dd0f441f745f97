"""The main config: shipped file valid, every error names file:line."""

from __future__ import annotations

from pathlib import Path

import pytest

from qvaudio.config import (
    SOURCE_CONFIG_PATH,
    Config,
    ConfigError,
    load_config,
    parse_config,
    parse_vsock_map,
)
from qvaudio.formats import AudioFormat, SampleFormat


def test_shipped_config_is_valid_and_matches_the_defaults() -> None:
    shipped = load_config(SOURCE_CONFIG_PATH)
    defaults = Config()
    assert shipped.guest == defaults.guest
    assert shipped.dom0 == defaults.dom0


def test_missing_file_means_defaults(tmp_path: Path) -> None:
    assert load_config(tmp_path / "absent.yaml") == Config()


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
