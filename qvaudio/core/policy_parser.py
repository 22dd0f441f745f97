"""Policy files' text to rules, or exactly what is wrong: the pure half of the loader. No I/O.

One parser serves the dom0 agent, the live reload, `qvaudio policy check`
and the validation step of `qvaudio policy set`, so a file the checker
accepts is a file the agent accepts. Reading the files (their owners and
modes, the directory) is `qvaudio.dom0.policy_loader`.

Safety: YAML is composed into nodes (`safe_yaml`) and interpreted by hand,
never constructed into arbitrary objects, so every problem names its line.
Which keys a rule may have, and what each takes, comes from the one table
of settings (`policy.POLICY_SETTINGS`).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from qvaudio.core.errors import QvaudioError
from qvaudio.core.formats import MAX_CHANNELS, MIN_CHANNELS, SUPPORTED_RATES, SampleFormat
from qvaudio.core.policy import (
    POLICY_SETTINGS,
    Access,
    Origin,
    Rule,
    Setting,
    SettingKind,
    VmMatcher,
    VmPatternError,
    setting_named,
)
from qvaudio.core.safe_yaml import Refused as _Refused
from qvaudio.core.safe_yaml import compose as _compose

ROOT_KEYS = ("rules",)
#: A rule's keys: `vm`, then each setting's first word (`volume` holds `volume.max`).
RULE_KEYS = ("vm", *dict.fromkeys(s.path[0] for s in POLICY_SETTINGS))
#: The settings under each key that is a mapping of its own (`volume`, `formats`).
SECTIONS: dict[str, tuple[Setting, ...]] = {
    key: tuple(s for s in POLICY_SETTINGS if len(s.path) == 2 and s.path[0] == key)
    for key in RULE_KEYS
    if any(len(s.path) == 2 and s.path[0] == key for s in POLICY_SETTINGS)
}

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
        values: dict[str, Any] = {}
        for key in RULE_KEYS[1:]:
            section = SECTIONS.get(key)
            if section is None:
                setting = setting_named(key)
                values[setting.field] = self.value(setting, fields.get(key))
                continue
            section_node = fields.get(key)
            if section_node is None:
                continue
            names = tuple(s.path[1] for s in section)
            found = self.mapping(section_node, key, names, f"a mapping {{{', '.join(names)}}}")
            if found is None:
                continue
            for setting in section:
                values[setting.field] = self.value(setting, found.get(setting.path[1]))
            if key == "volume":
                self.check_volumes(section_node, values)
        if matcher is None or len(self.problems) != before:
            return None
        rule = Rule(origin=Origin(self.file, node.start_mark.line + 1), vm=matcher)
        return dataclasses.replace(rule, **values)

    def value(self, setting: Setting, node: yaml.Node | None) -> object:
        """One setting's value from its node (None when the rule does not set it)."""
        match setting.kind:
            case SettingKind.ACCESS:
                return self.access(node, setting.name, setting.choices)
            case SettingKind.PERCENT:
                return self.percent(node, setting.name)
            case SettingKind.RATES:
                return self.rates(node)
            case SettingKind.SAMPLE_FORMATS:
                return self.sample_formats(node)
            case SettingKind.CHANNELS:
                return self.channels(node)

    def check_volumes(self, node: yaml.Node, values: dict[str, Any]) -> None:
        default, most = values.get("volume_default"), values.get("volume_max")
        if isinstance(default, int) and isinstance(most, int) and default > most:
            self.problem(node, f"volume.default {default}% is above volume.max {most}%")

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
