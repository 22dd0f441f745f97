"""The main configuration, `qvaudio.yaml`: one file, a `guest:` and a `dom0:` section.

Read with the same hardened YAML composer as the policy (no anchors, aliases
or tags; size and depth capped), interpreted by hand so that every error
names `file:line`, and every problem in a file is reported, not only the
first. Every key has a default, so an empty file is valid; an unknown key is
an error (a typo must not silently fall back to a default).

Command-line flags override the file and are checked by the same code
(`flag_type`), and so are the settings objects themselves: a value the file
would refuse cannot reach an agent by any route.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import yaml

from qvaudio.core.errors import QvaudioError
from qvaudio.core.formats import DEFAULT_FORMAT, AudioFormat, FormatError, SampleFormat
from qvaudio.core.safe_yaml import Refused, compose
from qvaudio.transport.addresses import DEFAULT_PORT, parse_address, parse_source

DEFAULT_CONFIG_PATH = Path("/etc/qvaudio/qvaudio.yaml")
#: The default config shipped in a source checkout, used when nothing is installed.
SOURCE_CONFIG_PATH = Path(__file__).resolve().parents[2] / "qvaudio.yaml"
CONFIG_ENV = "QVAUDIO_CONFIG"
#: How the default is found, for help texts and man pages: the same words on
#: every machine (a path computed here would put the build machine's checkout
#: into the installed man pages).
CONFIG_DEFAULT_HELP: Final = (
    f"${CONFIG_ENV}, else {DEFAULT_CONFIG_PATH}, else qvaudio.yaml of the source checkout "
    f"it runs from when {DEFAULT_CONFIG_PATH} does not exist; no file at all means the "
    "built-in defaults"
)
#: Device names go unquoted into module arguments (the alphabet pulse_devices accepts).
DEVICE_NAME: Final = re.compile(r"[A-Za-z0-9_.\-]+")

T = TypeVar("T")


class ConfigError(QvaudioError):
    """The config was refused; each of `problems` reads `file:line: what is wrong`."""

    def __init__(self, *problems: str) -> None:
        super().__init__(*problems)
        self.problems = problems

    def __str__(self) -> str:
        return "\n".join(self.problems)


@dataclass(frozen=True, slots=True)
class Bounds:
    """A numeric setting's range. The one check for the file, the flags and the settings."""

    low: float
    high: float
    whole: bool = True

    def __str__(self) -> str:
        return f"{self._show(self.low)} to {self._show(self.high)}"

    def _show(self, value: float) -> str:
        # Whole ranges print as integers: f"{2**32:g}" would be 4.29497e+09.
        return str(int(value)) if self.whole and float(value).is_integer() else f"{value:g}"

    def parse(self, text: str) -> Any:
        """`text` as a number in range, or ValueError saying why not."""
        try:
            value: float = int(text) if self.whole else float(text)
        except ValueError:
            kind = "a whole number" if self.whole else "a number"
            raise ValueError(f"expected {kind}, not {text!r}") from None
        return self.check(value)

    def check(self, value: float) -> float:
        # Written so that NaN, which compares false with everything, fails too.
        if not self.low <= value <= self.high:
            raise ValueError(f"{self._show(value)} is outside {self}")
        if self.whole and not float(value).is_integer():
            raise ValueError(f"{value:g} is not a whole number")
        return value

    def __call__(self, node: yaml.Node) -> Any:
        return self.parse(_scalar(node))


#: The numeric settings and their ranges (flags, file and settings objects share them).
GUEST_BOUNDS: Final[Mapping[str, Bounds]] = {
    "period_ms": Bounds(2, 100),
    "idle_timeout_s": Bounds(0.1, 3600, whole=False),
    "latency_round_ms": Bounds(0, 100),
}
DOM0_BOUNDS: Final[Mapping[str, Bounds]] = {
    "xen_port": Bounds(1, 65535),
    "vsock_port": Bounds(1, 2**32 - 2),
    "playback_latency_ms": Bounds(5, 1000),
    "playback_reserve_ms": Bounds(0, 100),
    "capture_period_ms": Bounds(2, 100),
}


def check_device_name(name: str) -> str:
    if not DEVICE_NAME.fullmatch(name):
        raise ValueError(f"device name {name!r} must match {DEVICE_NAME.pattern}")
    return name


def _check_bounds(settings: object, bounds: Mapping[str, Bounds]) -> None:
    for name, allowed in bounds.items():
        try:
            allowed.check(getattr(settings, name))
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None


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
    #: On PipeWire, make the virtual output a node of the agent's own that
    #: tells applications the latency of the whole path to dom0's speakers.
    report_latency: bool = True
    #: Round that latency to this many milliseconds (0: to the millisecond).
    latency_round_ms: int = 0
    #: PipeWire socket for that node (a name or a path); empty for the session's default.
    pipewire_remote: str = ""

    def __post_init__(self) -> None:
        _check_bounds(self, GUEST_BOUNDS)
        for name in (self.sink_name, self.source_name):
            check_device_name(name)


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
    #: least jitter reserve. It grows by 10 ms after each gap from late audio
    #: but the first after 2 quiet minutes, up to 100 ms, and shrinks after 2
    #: minutes without one.
    playback_reserve_ms: int = 10
    capture_period_ms: int = 5
    pulse_server: str = ""
    notifications: bool = True

    def __post_init__(self) -> None:
        _check_bounds(self, DOM0_BOUNDS)


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
    """Read `path`, or the default file (see `default_config_path`).

    Only the default location may be absent (the built-in defaults apply
    then): a file someone named, with `path` or $QVAUDIO_CONFIG, that is
    missing is an error, or a typo in a path would silently run the defaults.
    """
    named = path is not None or bool(os.environ.get(CONFIG_ENV))
    path = path or default_config_path()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if named:
            raise ConfigError(f"{path}: no such file") from None
        return Config()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_config(data, str(path))


def parse_config(data: bytes, file: str) -> Config:
    """The config in `data`; ConfigError lists every problem, each with file:line."""
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
    if reader.problems:
        raise ConfigError(*reader.problems)
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


def _bool(node: yaml.Node) -> bool:
    text = _scalar(node).lower()
    if text in ("true", "yes", "on"):
        return True
    if text in ("false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, not {text!r}")


def _device_name(node: yaml.Node) -> str:
    return check_device_name(_string(node))


def _transport(node: yaml.Node) -> str:
    text = _string(node)
    parse_address(text)
    return text


def _dom0_transport(node: yaml.Node) -> str:
    text = _string(node)
    parse_source(text)
    return text


class _ListOf:
    """A non-empty list of `item`; a flag for such a key gives one item each time."""

    def __init__(self, item: Callable[[yaml.Node], Any]) -> None:
        self.item = item

    def __call__(self, node: yaml.Node) -> tuple[Any, ...]:
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            raise ValueError("expected a non-empty list")
        values = []
        for child in node.value:
            try:
                values.append(self.item(child))
            except ValueError as exc:
                raise _AtLine(_line(child), str(exc)) from None
        return tuple(values)


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
    "formats": _ListOf(_format),
    "capture_formats": _ListOf(_format),
    **GUEST_BOUNDS,
    "sink_name": _device_name,
    "sink_description": _string,
    "source_name": _device_name,
    "source_description": _string,
    "pulse_server": _string,
    "report_latency": _bool,
    "pipewire_remote": _string,
}
_DOM0_FIELDS: dict[str, Callable[[yaml.Node], Any]] = {
    "transports": _ListOf(_dom0_transport),
    **DOM0_BOUNDS,
    "policy_dir": _string,
    "control_socket": _string,
    "pulse_server": _string,
    "notifications": _bool,
}
_SECTIONS: Final = {"guest": _GUEST_FIELDS, "dom0": _DOM0_FIELDS}


def flag_type(section: Literal["guest", "dom0"], key: str) -> Callable[[str], Any]:
    """An argparse `type=` for a flag that overrides `section.key`: the file's own check.

    A value the file refuses is a usage error naming what is allowed (a
    number's range), before anything starts.
    """
    check = _SECTIONS[section][key]
    if isinstance(check, _ListOf):
        check = check.item  # a repeatable flag: one item per use

    def parse(text: str) -> Any:
        try:
            return check(yaml.ScalarNode("tag:yaml.org,2002:str", text))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = key  # argparse names the type in some of its messages
    return parse


def flag_range(section: Literal["guest", "dom0"], key: str) -> str:
    """`section.key`'s range for a flag's help, e.g. "5 to 1000"."""
    return str((GUEST_BOUNDS if section == "guest" else DOM0_BOUNDS)[key])


def add_setting_flag(
    parser: argparse.ArgumentParser,
    flag: str,
    section: Literal["guest", "dom0"],
    key: str,
    *,
    metavar: str,
    help: str,
    **kwargs: Any,
) -> None:
    """A flag that overrides `section.key`, checked like the file's key (`flag_type`);
    `{range}` in `help` says the key's range."""
    if "{range}" in help:
        help = help.format(range=flag_range(section, key))
    kwargs.setdefault("type", flag_type(section, key))
    parser.add_argument(flag, metavar=metavar, help=help, **kwargs)


def flag_overrides(args: argparse.Namespace, flags: Mapping[str, str]) -> dict[str, Any]:
    """The settings the command line gave: {setting: value} for each {flag's dest: setting}.

    `is not None`: 0 is a value, and every flag was checked like the file's key.
    """
    given = {key: getattr(args, dest) for dest, key in flags.items()}
    return {key: value for key, value in given.items() if value is not None}


class _Reader:
    """Interprets one file's nodes, collecting every problem rather than the first."""

    def __init__(self, file: str) -> None:
        self.file = file
        self._problems: list[tuple[int, str]] = []

    @property
    def problems(self) -> list[str]:
        """In the file's order (keys are judged before their values)."""
        return [text for _, text in sorted(self._problems, key=lambda p: p[0])]

    def fail(self, line: int | None, message: str) -> None:
        self._problems.append((line or 0, _where(self.file, line, message)))

    def mapping(self, node: yaml.Node, what: str, allowed: tuple[str, ...]) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode):
            self.fail(_line(node), f"{what} must be a mapping of keys to values")
            return {}
        result: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in result:
                self.fail(_line(key_node), f"duplicate key {key!r}")
            elif key not in allowed:
                near = difflib.get_close_matches(key, allowed, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                self.fail(
                    _line(key_node),
                    f"unknown key {key!r} in {what}{hint}; known: {', '.join(allowed)}",
                )
            else:
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
                self.fail(exc.line, f"{name}.{key}: {exc}")
            except ValueError as exc:
                self.fail(_line(value_node), f"{name}.{key}: {exc}")
        return replace(defaults, **values)  # type: ignore[type-var]
