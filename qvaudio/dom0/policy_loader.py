"""Reading policy files into an immutable `Policy`, or saying exactly what's wrong.

One loader serves the dom0 agent, the live reload, `qvaudio policy check` and
the validation step of `qvaudio policy set`, so a file the checker accepts is a
file the agent accepts.

Safety: YAML is composed into nodes with PyYAML's SafeLoader and interpreted by
hand, never constructed into arbitrary objects. Anchors and aliases are refused
outright (no alias bombs), files are capped in size and nesting depth, and in
strict mode (the default, like sshd's StrictModes) files and the directory
must be owned by root or by us and not writable by group or others.

Any problem in any file rejects the whole policy: a half-read policy could
allow what the broken part meant to deny.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from qvaudio.core.errors import QvaudioError
from qvaudio.core.formats import MAX_CHANNELS, MIN_CHANNELS, SUPPORTED_RATES, SampleFormat
from qvaudio.core.policy import (
    CAPTURE_VALUES,
    PLAYBACK_VALUES,
    Access,
    Origin,
    Policy,
    Rule,
    VmMatcher,
    VmPatternError,
)
from qvaudio.core.safe_yaml import MAX_FILE_BYTES
from qvaudio.core.safe_yaml import Refused as _Refused
from qvaudio.core.safe_yaml import compose as _compose

DEFAULT_POLICY_DIR = Path("/etc/qvaudio/policy.d")
#: The policy shipped in a source checkout, used when nothing is installed.
SOURCE_POLICY_DIR = Path(__file__).resolve().parents[2] / "policy"
POLICY_DIR_ENV = "QVAUDIO_POLICY_DIR"
POLICY_SUFFIX = ".yaml"
#: How the default is found, for help texts and man pages: the same words on
#: every machine, never the path of the checkout a page was built in.
POLICY_DIR_DEFAULT_HELP = (
    f"${POLICY_DIR_ENV}, else {DEFAULT_POLICY_DIR}, else policy/ of the source checkout "
    f"it runs from when {DEFAULT_POLICY_DIR} does not exist"
)

ROOT_KEYS = ("rules",)
RULE_KEYS = ("vm", "playback", "capture", "volume", "formats")
VOLUME_KEYS = ("default", "max")
FORMATS_KEYS = ("rates", "sample_formats", "max_channels")

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_NULL = "tag:yaml.org,2002:null"
_PERCENT_RE = re.compile(r"(\d{1,3})\s*%")


@dataclass(frozen=True, slots=True)
class PolicyProblem:
    """One error, printed `file:line: message` (or `file: message` for a whole file)."""

    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.file}: {self.message}"
        return f"{self.file}:{self.line}: {self.message}"


class PolicyLoadError(QvaudioError):
    """The policy was refused; `problems` lists every reason found."""

    def __init__(self, problems: Sequence[PolicyProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def default_policy_dir() -> Path:
    """$QVAUDIO_POLICY_DIR, else the installed dir, else a source checkout's `policy/`."""
    configured = os.environ.get(POLICY_DIR_ENV)
    if configured:
        return Path(configured)
    if not DEFAULT_POLICY_DIR.exists() and SOURCE_POLICY_DIR.is_dir():
        return SOURCE_POLICY_DIR
    return DEFAULT_POLICY_DIR


def default_trusted_uids() -> frozenset[int]:
    return frozenset({0, os.geteuid()})


# --- YAML to nodes ---------------------------------------------------------------------


def compose_policy_yaml(data: bytes, file: str) -> yaml.Node | None:
    """Decode and compose one file into a YAML node tree (None for an empty file).

    Raises PolicyLoadError naming the file and line. `policy_edit` uses the nodes'
    marks to edit the text in place.
    """
    try:
        return _compose(data)
    except _Refused as exc:
        raise PolicyLoadError([PolicyProblem(file, exc.line, exc.message)]) from None


# --- nodes to rules ----------------------------------------------------------------


class _FileParser:
    """Interprets one file's nodes, collecting every problem rather than the first."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[PolicyProblem] = []

    def problem(self, node: yaml.Node, message: str) -> None:
        self.problems.append(PolicyProblem(self.file, node.start_mark.line + 1, message))

    def parse(self, root: yaml.Node | None) -> tuple[Rule, ...]:
        if root is None:
            return ()  # empty or comments only: a valid file with no rules
        top = self.mapping(root, "the file", ROOT_KEYS, "a mapping with a 'rules:' list")
        if top is None:
            return ()
        rules_node = top.get("rules")
        if rules_node is None:
            return ()
        if _is_null(rules_node):
            return ()
        if not isinstance(rules_node, yaml.SequenceNode):
            self.problem(rules_node, "'rules' must be a list of rules")
            return ()
        rules = (self.rule(item) for item in rules_node.value)
        return tuple(rule for rule in rules if rule is not None)

    def mapping(
        self, node: yaml.Node, what: str, allowed: Sequence[str], expected: str
    ) -> dict[str, yaml.Node] | None:
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, f"{what} must be {expected}")
            return None
        result: dict[str, yaml.Node] = {}
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not (isinstance(key_node, yaml.ScalarNode) and key_node.tag == _STR):
                self.problem(key_node, f"keys in {what} must be plain words")
                continue
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in first_line:
                self.problem(key_node, f"duplicate key '{key}' (first at line {first_line[key]})")
                continue
            first_line[key] = line
            if key not in allowed:
                self.problem(key_node, _unknown_key(key, what, allowed))
                continue
            result[key] = value_node
        return result

    def rule(self, node: yaml.Node) -> Rule | None:
        before = len(self.problems)
        fields = self.mapping(node, "a rule", RULE_KEYS, "a mapping such as {vm: work, ...}")
        if fields is None:
            return None
        vm_node = fields.get("vm")
        matcher: VmMatcher | None = None
        if vm_node is None:
            self.problem(node, "rule has no 'vm' key (use vm: '*' for every VM)")
        else:
            text = self.string(vm_node, "vm")
            if text is not None:
                try:
                    matcher = VmMatcher.parse(text)
                except VmPatternError as exc:
                    self.problem(vm_node, str(exc))
        playback = self.access(fields.get("playback"), "playback", PLAYBACK_VALUES)
        capture = self.access(fields.get("capture"), "capture", CAPTURE_VALUES)
        volume_default = volume_max = None
        volume_node = fields.get("volume")
        if volume_node is not None:
            volume = self.mapping(volume_node, "volume", VOLUME_KEYS, "a mapping {default, max}")
            if volume is not None:
                volume_default = self.percent(volume.get("default"), "volume.default")
                volume_max = self.percent(volume.get("max"), "volume.max")
                if (
                    volume_default is not None
                    and volume_max is not None
                    and volume_default > volume_max
                ):
                    self.problem(
                        volume_node,
                        f"volume.default {volume_default}% is above volume.max {volume_max}%",
                    )
        rates = sample_formats = max_channels = None
        formats_node = fields.get("formats")
        if formats_node is not None:
            formats = self.mapping(
                formats_node,
                "formats",
                FORMATS_KEYS,
                "a mapping {rates, sample_formats, max_channels}",
            )
            if formats is not None:
                rates = self.rates(formats.get("rates"))
                sample_formats = self.sample_formats(formats.get("sample_formats"))
                max_channels = self.channels(formats.get("max_channels"))
        if matcher is None or len(self.problems) != before:
            return None
        return Rule(
            origin=Origin(self.file, node.start_mark.line + 1),
            vm=matcher,
            playback=playback,
            capture=capture,
            volume_default=volume_default,
            volume_max=volume_max,
            rates=rates,
            sample_formats=sample_formats,
            max_channels=max_channels,
        )

    def scalar(self, node: yaml.Node, name: str) -> yaml.ScalarNode | None:
        if _is_null(node):
            self.problem(node, f"{name} has no value")
            return None
        if not isinstance(node, yaml.ScalarNode):
            self.problem(node, f"{name} must be a single value, not a list or mapping")
            return None
        return node

    def string(self, node: yaml.Node, name: str) -> str | None:
        scalar = self.scalar(node, name)
        if scalar is None:
            return None
        if scalar.tag != _STR:
            self.problem(node, f"{name} must be text, got {scalar.value!r} (quote it)")
            return None
        return str(scalar.value)

    def access(self, node: yaml.Node | None, name: str, allowed: Sequence[Access]) -> Access | None:
        if node is None:
            return None
        scalar = self.scalar(node, name)
        if scalar is None:
            return None
        choices = ", ".join(a.value for a in allowed)
        # The value, not the tag: `capture: no` is a YAML bool, and deserves this message.
        if scalar.value not in [a.value for a in allowed]:
            self.problem(node, f"{name} must be one of {choices}, got {scalar.value!r}")
            return None
        return Access(scalar.value)

    def whole_number(self, node: yaml.Node, name: str) -> int | None:
        scalar = self.scalar(node, name)
        if scalar is None:
            return None
        # Only plain decimals: YAML 1.1 would also read 0x30, 0o17 and 1:30 as ints.
        if scalar.tag != _INT or not scalar.value.isdigit():
            self.problem(node, f"{name} must be a whole number, got {scalar.value!r}")
            return None
        return int(scalar.value)

    def percent(self, node: yaml.Node | None, name: str) -> int | None:
        if node is None:
            return None
        scalar = self.scalar(node, name)
        if scalar is None:
            return None
        match = _PERCENT_RE.fullmatch(scalar.value) if scalar.tag == _STR else None
        if match is not None:
            value = int(match.group(1))
        elif scalar.tag == _INT and scalar.value.isdigit():
            value = int(scalar.value)
        else:
            self.problem(node, f"{name} must be a percentage such as 50 or 50%")
            return None
        if not 0 <= value <= 100:
            self.problem(node, f"{name} must be between 0 and 100%, got {value}")
            return None
        return value

    def items(self, node: yaml.Node | None, name: str) -> list[yaml.Node] | None:
        if node is None:
            return None
        if not isinstance(node, yaml.SequenceNode):
            self.problem(node, f"{name} must be a list, e.g. [48000]")
            return None
        if not node.value:
            self.problem(node, f"{name} must not be empty (leave it out to allow all)")
            return None
        return list(node.value)

    def rates(self, node: yaml.Node | None) -> tuple[int, ...] | None:
        items = self.items(node, "formats.rates")
        if items is None:
            return None
        rates: list[int] = []
        for item in items:
            rate = self.whole_number(item, "formats.rates")
            if rate is None:
                continue
            if rate not in SUPPORTED_RATES:
                supported = ", ".join(str(r) for r in SUPPORTED_RATES)
                self.problem(item, f"rate {rate} is not supported (supported: {supported})")
            elif rate in rates:
                self.problem(item, f"rate {rate} is listed twice")
            else:
                rates.append(rate)
        return tuple(rates)

    def sample_formats(self, node: yaml.Node | None) -> tuple[SampleFormat, ...] | None:
        items = self.items(node, "formats.sample_formats")
        if items is None:
            return None
        found: list[SampleFormat] = []
        for item in items:
            text = self.string(item, "formats.sample_formats")
            if text is None:
                continue
            try:
                fmt = SampleFormat.parse(text)
            except ValueError as exc:
                self.problem(item, str(exc))
                continue
            if fmt in found:
                self.problem(item, f"sample format {text} is listed twice")
            else:
                found.append(fmt)
        return tuple(found)

    def channels(self, node: yaml.Node | None) -> int | None:
        if node is None:
            return None
        value = self.whole_number(node, "formats.max_channels")
        if value is not None and not MIN_CHANNELS <= value <= MAX_CHANNELS:
            self.problem(
                node,
                f"formats.max_channels must be between {MIN_CHANNELS} and {MAX_CHANNELS}, "
                f"got {value}",
            )
            return None
        return value


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == _NULL


def _unknown_key(key: str, what: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"did you mean '{close[0]}'?" if close else "expected " + ", ".join(allowed)
    return f"unknown key '{key}' in {what} ({hint})"


def parse_policy_text(data: bytes, file: str) -> tuple[Rule, ...]:
    """The rules in one file's contents; raises PolicyLoadError naming file:line."""
    try:
        root = _compose(data)
    except _Refused as exc:
        raise PolicyLoadError([PolicyProblem(file, exc.line, exc.message)]) from None
    parser = _FileParser(file)
    rules = parser.parse(root)
    if parser.problems:
        raise PolicyLoadError(parser.problems)
    return rules


# --- files and directories -------------------------------------------------------------


def _strict_problem(st: os.stat_result, what: str, trusted_uids: frozenset[int]) -> str | None:
    if st.st_uid not in trusted_uids:
        owners = " or ".join(f"uid {uid}" for uid in sorted(trusted_uids))
        return f"refusing {what} owned by uid {st.st_uid} (must be owned by {owners})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        mode = stat.S_IMODE(st.st_mode)
        return f"refusing {what} writable by group or others (mode {mode:04o}; chmod go-w)"
    return None


def directory_problem(directory: Path, trusted_uids: frozenset[int] | None = None) -> str | None:
    """Why strict mode refuses `directory` as a whole (owner, mode), or None.

    The loader's own judgement, for `policy set`: a file written into a
    directory the agent refuses would never be read.
    """
    trusted = default_trusted_uids() if trusted_uids is None else trusted_uids
    return _strict_problem(os.stat(directory), "directory", trusted)


def policy_files(directory: Path) -> list[Path]:
    """The `*.yaml` files a directory contributes, in reading (byte-wise name) order.

    Hidden files are skipped: editors and `policy set` write their temporary
    files as dotfiles.
    """
    names = [
        entry.name
        for entry in os.scandir(directory)
        if entry.name.endswith(POLICY_SUFFIX) and not entry.name.startswith(".")
    ]
    return [directory / name for name in sorted(names, key=os.fsencode)]


def _read_policy_file(
    path: Path, *, strict: bool = True, trusted_uids: frozenset[int] | None = None
) -> bytes:
    """A policy file's bytes, after the strict-mode and size checks (raises _Refused)."""
    trusted = default_trusted_uids() if trusted_uids is None else trusted_uids
    try:
        # O_NONBLOCK: opening a FIFO named *.yaml must not hang the agent.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise _Refused(None, f"cannot open: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        # Checked on the open file, so a swap after the check can't slip through.
        st = os.fstat(handle.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise _Refused(None, "not a regular file")
        if strict:
            why = _strict_problem(st, "file", trusted)
            if why is not None:
                raise _Refused(None, why)
        data = handle.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise _Refused(None, f"file is larger than {MAX_FILE_BYTES} bytes")
    return data


def _expand(
    paths: Iterable[Path], strict: bool, trusted: frozenset[int], problems: list[PolicyProblem]
) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as exc:
            problems.append(PolicyProblem(str(path), None, f"cannot read: {exc.strerror}"))
            continue
        if not stat.S_ISDIR(st.st_mode):
            files.append(path)
            continue
        why = directory_problem(path, trusted) if strict else None
        if why is not None:
            problems.append(PolicyProblem(str(path), None, why))
            continue
        try:
            files.extend(policy_files(path))
        except OSError as exc:
            problems.append(PolicyProblem(str(path), None, f"cannot list: {exc.strerror}"))
    return files


def load_policy_paths(
    paths: Sequence[Path],
    *,
    strict: bool = True,
    trusted_uids: frozenset[int] | None = None,
) -> Policy:
    """Load files and directories (each directory's files in name order), in order.

    Raises PolicyLoadError listing every problem in every file.
    """
    trusted = default_trusted_uids() if trusted_uids is None else trusted_uids
    problems: list[PolicyProblem] = []
    rules: list[Rule] = []
    files = _expand(paths, strict, trusted, problems)
    for path in files:
        name = str(path)
        try:
            data = _read_policy_file(path, strict=strict, trusted_uids=trusted)
            rules.extend(parse_policy_text(data, name))
        except _Refused as exc:
            problems.append(PolicyProblem(name, exc.line, exc.message))
        except PolicyLoadError as exc:
            problems.extend(exc.problems)
    if problems:
        raise PolicyLoadError(problems)
    return Policy(rules=tuple(rules), files=tuple(str(p) for p in files))


def load_policy_dir(
    directory: Path,
    *,
    strict: bool = True,
    trusted_uids: frozenset[int] | None = None,
) -> Policy:
    """Load a policy directory such as /etc/qvaudio/policy.d."""
    return load_policy_paths([directory], strict=strict, trusted_uids=trusted_uids)
