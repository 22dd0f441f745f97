"""The main configuration, `qvaudio.yaml`: one file, a `guest:` and a `dom0:` section.

Read with the same hardened YAML composer as the policy (no anchors, aliases
or tags; size and depth capped), interpreted by hand so that every error
names `file:line`. Every key has a default, so an empty file is valid; an
unknown key is an error (a typo must not silently fall back to a default).
Command-line flags override the file; see `qvaudio-guest --help`.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import yaml

from qvaudio.formats import DEFAULT_FORMAT, AudioFormat, FormatError, SampleFormat
from qvaudio.safe_yaml import Refused, compose
from qvaudio.transport import DEFAULT_PORT, parse_address

DEFAULT_CONFIG_PATH = Path("/etc/qvaudio/qvaudio.yaml")
#: The default config shipped in a source checkout, used when nothing is installed.
SOURCE_CONFIG_PATH = Path(__file__).resolve().parent.parent / "qvaudio.yaml"
CONFIG_ENV = "QVAUDIO_CONFIG"

T = TypeVar("T")


class ConfigError(Exception):
    """The config was refused; the message is `file:line: what is wrong`."""


@dataclass(frozen=True, slots=True)
class GuestSettings:
    #: Where dom0 is: `xen:0` (the guest serves a vchan for dom0), `vsock:2:PORT`, `unix:PATH`.
    transport: str = "xen:0"
    #: Formats offered to dom0, best first.
    formats: tuple[AudioFormat, ...] = (
        DEFAULT_FORMAT,
        AudioFormat(44100, SampleFormat.S16LE, 2),
    )
    capture_formats: tuple[AudioFormat, ...] = (
        AudioFormat(48000, SampleFormat.S16LE, 1),
        DEFAULT_FORMAT,
    )
    #: Size of each chunk read from the virtual sink's monitor.
    period_ms: int = 10
    #: Digital silence for this long corks the stream.
    idle_timeout_s: float = 2.0
    sink_name: str = "qvaudio_out"
    sink_description: str = "qvaudio: dom0 speakers"
    source_name: str = "qvaudio_mic"
    source_description: str = "qvaudio: dom0 microphone"
    #: PulseAudio server to use; empty for the session's default.
    pulse_server: str = ""


@dataclass(frozen=True, slots=True)
class Dom0Settings:
    #: Ways VMs reach dom0: `xen` (XenStore discovery), `unix:DIR`, `vsock:NAME=CID,...`.
    transports: tuple[str, ...] = ("xen",)
    xen_port: int = DEFAULT_PORT
    vsock_port: int = DEFAULT_PORT
    policy_dir: str = ""
    #: Empty: $XDG_RUNTIME_DIR/qvaudio/control.sock.
    control_socket: str = ""
    #: Target latency of each VM's stream on the host server.
    playback_latency_ms: int = 30
    #: Audio dom0 holds for each VM before its host stream (re)starts: the
    #: least jitter reserve. It grows by 10 ms after each gap, up to 100 ms.
    playback_reserve_ms: int = 10
    capture_period_ms: int = 10
    pulse_server: str = ""
    notifications: bool = True


@dataclass(frozen=True, slots=True)
class Config:
    guest: GuestSettings = field(default_factory=GuestSettings)
    dom0: Dom0Settings = field(default_factory=Dom0Settings)
    #: Where it was read from, for messages.
    source: str = "built-in defaults"


def default_config_path() -> Path:
    configured = os.environ.get(CONFIG_ENV)
    if configured:
        return Path(configured)
    if not DEFAULT_CONFIG_PATH.exists() and SOURCE_CONFIG_PATH.is_file():
        return SOURCE_CONFIG_PATH
    return DEFAULT_CONFIG_PATH


def load_config(path: Path | None = None) -> Config:
    """Read `path` (default: see `default_config_path`); a missing file means defaults."""
    path = path or default_config_path()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Config()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_config(data, str(path))


def parse_config(data: bytes, file: str) -> Config:
    try:
        root = compose(data, max_bytes=64 * 1024)
    except Refused as exc:
        raise ConfigError(_where(file, exc.line, exc.message)) from None
    reader = _Reader(file)
    if root is None:
        return Config(source=file)
    sections = reader.mapping(root, "the config file", ("guest", "dom0"))
    guest = GuestSettings()
    dom0 = Dom0Settings()
    if "guest" in sections:
        guest = reader.section(sections["guest"], guest, _GUEST_FIELDS, "guest")
    if "dom0" in sections:
        dom0 = reader.section(sections["dom0"], dom0, _DOM0_FIELDS, "dom0")
    return Config(guest=guest, dom0=dom0, source=file)


def _where(file: str, line: int | None, message: str) -> str:
    return f"{file}:{line}: {message}" if line is not None else f"{file}: {message}"


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


# --- field parsers: node -> value, raising ValueError with a message ---------------


def _scalar(node: yaml.Node) -> str:
    if not isinstance(node, yaml.ScalarNode):
        raise ValueError("expected a single value")
    return str(node.value)


def _string(node: yaml.Node) -> str:
    text = _scalar(node)
    if any(not ch.isprintable() for ch in text):
        raise ValueError("contains non-printable characters")
    return text


def _int_in(low: int, high: int) -> Callable[[yaml.Node], int]:
    def parse(node: yaml.Node) -> int:
        text = _scalar(node)
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"expected a whole number, not {text!r}") from None
        if not low <= value <= high:
            raise ValueError(f"{value} is outside {low} to {high}")
        return value

    return parse


def _float_in(low: float, high: float) -> Callable[[yaml.Node], float]:
    def parse(node: yaml.Node) -> float:
        text = _scalar(node)
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"expected a number, not {text!r}") from None
        if not low <= value <= high:
            raise ValueError(f"{value:g} is outside {low:g} to {high:g}")
        return value

    return parse


def _bool(node: yaml.Node) -> bool:
    text = _scalar(node).lower()
    if text in ("true", "yes", "on"):
        return True
    if text in ("false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, not {text!r}")


def _transport(node: yaml.Node) -> str:
    text = _string(node)
    parse_address(text)
    return text


def _dom0_transport(node: yaml.Node) -> str:
    text = _string(node)
    if text in ("xen", "qrexec") or text.startswith("unix:") or text.startswith("vsock:"):
        if text.startswith("vsock:"):
            parse_vsock_map(text)
        return text
    raise ValueError(f"{text!r} is not xen, unix:DIR or vsock:NAME=CID[,NAME=CID...]")


def parse_vsock_map(text: str) -> dict[str, int]:
    """`vsock:work=5,media=6`: which CID each VM has (the host's own mapping)."""
    mapping: dict[str, int] = {}
    for item in text.removeprefix("vsock:").split(","):
        name, sep, cid = item.partition("=")
        if not sep or not name or not cid.isdigit() or int(cid) < 3:
            raise ValueError(f"{item!r} is not NAME=CID with CID >= 3")
        mapping[name] = int(cid)
    return mapping


def _list_of(item: Callable[[yaml.Node], T]) -> Callable[[yaml.Node], tuple[T, ...]]:
    def parse(node: yaml.Node) -> tuple[T, ...]:
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            raise ValueError("expected a non-empty list")
        values = []
        for child in node.value:
            try:
                values.append(item(child))
            except ValueError as exc:
                raise _AtLine(_line(child), str(exc)) from None
        return tuple(values)

    return parse


def _format(node: yaml.Node) -> AudioFormat:
    try:
        return AudioFormat.parse(_scalar(node))
    except FormatError as exc:
        raise ValueError(str(exc)) from None


class _AtLine(ValueError):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line


_GUEST_FIELDS: dict[str, Callable[[yaml.Node], Any]] = {
    "transport": _transport,
    "formats": _list_of(_format),
    "capture_formats": _list_of(_format),
    "period_ms": _int_in(2, 100),
    "idle_timeout_s": _float_in(0.1, 3600),
    "sink_name": _string,
    "sink_description": _string,
    "source_name": _string,
    "source_description": _string,
    "pulse_server": _string,
}
_DOM0_FIELDS: dict[str, Callable[[yaml.Node], Any]] = {
    "transports": _list_of(_dom0_transport),
    "xen_port": _int_in(1, 65535),
    "vsock_port": _int_in(1, 2**32 - 2),
    "policy_dir": _string,
    "control_socket": _string,
    "playback_latency_ms": _int_in(5, 1000),
    "playback_reserve_ms": _int_in(0, 100),
    "capture_period_ms": _int_in(2, 100),
    "pulse_server": _string,
    "notifications": _bool,
}


class _Reader:
    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, line: int | None, message: str) -> ConfigError:
        return ConfigError(_where(self.file, line, message))

    def mapping(self, node: yaml.Node, what: str, allowed: tuple[str, ...]) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(_line(node), f"{what} must be a mapping of keys to values")
        result: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in result:
                raise self.fail(_line(key_node), f"duplicate key {key!r}")
            if key not in allowed:
                near = difflib.get_close_matches(key, allowed, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise self.fail(
                    _line(key_node),
                    f"unknown key {key!r} in {what}{hint}; known: {', '.join(allowed)}",
                )
            result[key] = value_node
        return result

    def section(
        self,
        node: yaml.Node,
        defaults: T,
        fields: dict[str, Callable[[yaml.Node], Any]],
        name: str,
    ) -> T:
        if isinstance(node, yaml.ScalarNode) and node.value in ("", "~", "null"):
            return defaults
        values: dict[str, Any] = {}
        for key, value_node in self.mapping(node, f"{name}:", tuple(fields)).items():
            try:
                values[key] = fields[key](value_node)
            except _AtLine as exc:
                raise self.fail(exc.line, f"{name}.{key}: {exc}") from None
            except ValueError as exc:
                raise self.fail(_line(value_node), f"{name}.{key}: {exc}") from None
        return replace(defaults, **values)  # type: ignore[type-var]
