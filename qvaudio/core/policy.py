"""Per-VM audio policy: the data model and its evaluation.

Everything here is a pure function of immutable values: the loader
(`policy_loader`) turns files into a `Policy`, and the dom0 agent asks
`evaluate` what one VM may do. No I/O happens here, so the same answer comes out
of the agent, `qvaudio policy show` and the tests.

Precedence (see docs/policy.md): rules are read in file order (files sorted by
name). Each setting comes from the first rule that matches the VM *and* sets
that setting; a setting no matching rule sets takes its built-in default, which
for playback and capture is deny.
"""

from __future__ import annotations

import enum
import fnmatch
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from qvaudio.core.errors import QvaudioError
from qvaudio.core.formats import MAX_CHANNELS, SUPPORTED_RATES, AudioFormat, SampleFormat

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

#: Qubes VM names: a letter, then letters, digits, '_', '.', '-' (31 chars max).
VM_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,30}")
#: Globs may use '*' and '?' on top of the name characters, nothing fancier.
VM_GLOB_RE = re.compile(r"[A-Za-z0-9_.*?-]{1,64}")
TAG_PREFIX = "@tag:"
TAG_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


class Direction(enum.StrEnum):
    """Which way audio flows: playback is VM to host, capture is host to VM."""

    PLAYBACK = "playback"
    CAPTURE = "capture"


class Access(enum.StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    #: Capture only: the VM may ask, and the user attaches the microphone.
    ATTACH_ON_REQUEST = "attach-on-request"


PLAYBACK_VALUES: tuple[Access, ...] = (Access.ALLOW, Access.DENY)
CAPTURE_VALUES: tuple[Access, ...] = (Access.DENY, Access.ALLOW, Access.ATTACH_ON_REQUEST)


class SettingKind(enum.Enum):
    """What values a setting takes (how files, `policy set` and `policy show` read and write it)."""

    ACCESS = "access"
    PERCENT = "percent"
    RATES = "rates"
    SAMPLE_FORMATS = "sample_formats"
    CHANNELS = "channels"


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting a rule can carry.

    `name` is how files (`volume: {max: 50}` is `volume.max`), `policy show`
    and `policy set` call it; `field` is the attribute of `Rule` and
    `VmSettings` that holds it.
    """

    name: str
    field: str
    kind: SettingKind
    #: The values an access setting takes; empty for the others.
    choices: tuple[Access, ...] = ()

    @property
    def path(self) -> tuple[str, ...]:
        """Where a rule writes it: ("playback",) or ("volume", "max")."""
        return tuple(self.name.split("."))

    def show(self, value: object) -> str:
        """`value` as `policy show` prints it."""
        if self.kind is SettingKind.PERCENT:
            return f"{value}%"
        if isinstance(value, tuple):
            return ", ".join(
                v.name.lower() if isinstance(v, SampleFormat) else str(v) for v in value
            )
        return str(value)


#: The one table of policy settings, in the order `policy show` prints them:
#: the model, the file parser and `policy set` all read it.
POLICY_SETTINGS: tuple[Setting, ...] = (
    Setting("playback", "playback", SettingKind.ACCESS, PLAYBACK_VALUES),
    Setting("capture", "capture", SettingKind.ACCESS, CAPTURE_VALUES),
    Setting("volume.default", "volume_default", SettingKind.PERCENT),
    Setting("volume.max", "volume_max", SettingKind.PERCENT),
    Setting("formats.rates", "rates", SettingKind.RATES),
    Setting("formats.sample_formats", "sample_formats", SettingKind.SAMPLE_FORMATS),
    Setting("formats.max_channels", "max_channels", SettingKind.CHANNELS),
)
#: Every setting's name, in the same order.
SETTINGS: tuple[str, ...] = tuple(s.name for s in POLICY_SETTINGS)
_BY_NAME: dict[str, Setting] = {s.name: s for s in POLICY_SETTINGS}


def setting_named(name: str) -> Setting:
    """The setting called `name` (e.g. "volume.max"); KeyError if there is none."""
    return _BY_NAME[name]


class VmPatternError(QvaudioError, ValueError):
    """A `vm:` value that is neither a name, a glob nor a tag."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a rule was written; printed as `file:line` (1-based)."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True, slots=True)
class VmIdentity:
    """What the platform tells us about a VM at the moment we decide.

    Tags are part of the snapshot so that evaluation never has to ask anyone.
    """

    name: str
    tags: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class VmMatcher:
    """The `vm:` of a rule: an exact name, a glob such as `disp*`, or `@tag:NAME`."""

    pattern: str

    @classmethod
    def parse(cls, text: str) -> VmMatcher:
        if text.startswith(TAG_PREFIX):
            tag = text[len(TAG_PREFIX) :]
            if not TAG_RE.fullmatch(tag):
                raise VmPatternError(f"invalid tag name {tag!r} in {text!r}")
        elif not VM_GLOB_RE.fullmatch(text):
            raise VmPatternError(
                f"invalid vm pattern {text!r} (expected a VM name, a glob using * and ?, "
                f"or {TAG_PREFIX}NAME)"
            )
        return cls(text)

    @property
    def is_catch_all(self) -> bool:
        return self.pattern == "*"

    def matches(self, vm: VmIdentity) -> bool:
        if self.pattern.startswith(TAG_PREFIX):
            return self.pattern[len(TAG_PREFIX) :] in vm.tags
        # fnmatchcase, not fnmatch: VM names are case-sensitive on every platform.
        return fnmatch.fnmatchcase(vm.name, self.pattern)


@dataclass(frozen=True, slots=True)
class Rule:
    """One entry of a file's `rules:` list. `None` means "this rule doesn't say"."""

    origin: Origin
    vm: VmMatcher
    playback: Access | None = None
    capture: Access | None = None
    volume_default: int | None = None
    volume_max: int | None = None
    rates: tuple[int, ...] | None = None
    sample_formats: tuple[SampleFormat, ...] | None = None
    max_channels: int | None = None

    def sets(self) -> frozenset[str]:
        """The names (as in SETTINGS) of the settings this rule gives a value."""
        return frozenset(s.name for s in POLICY_SETTINGS if getattr(self, s.field) is not None)


@dataclass(frozen=True, slots=True)
class Policy:
    """An immutable, already validated policy: rules in evaluation order."""

    rules: tuple[Rule, ...] = ()
    #: The files it was read from, in reading order (for messages only).
    files: tuple[str, ...] = ()

    @classmethod
    def deny_all(cls) -> Policy:
        """What the agent enforces until a valid policy has been loaded."""
        return cls()


@dataclass(frozen=True, slots=True)
class Resolved(Generic[T_co]):
    """A setting's effective value and the rule it came from (None: built-in)."""

    value: T_co
    origin: Origin | None

    @property
    def source(self) -> str:
        return str(self.origin) if self.origin is not None else "built-in default"


@dataclass(frozen=True, slots=True)
class VmSettings:
    """Everything the policy says about one VM, each with its origin."""

    vm: VmIdentity
    playback: Resolved[Access]
    capture: Resolved[Access]
    volume_default: Resolved[int]
    volume_max: Resolved[int]
    rates: Resolved[tuple[int, ...]]
    sample_formats: Resolved[tuple[SampleFormat, ...]]
    max_channels: Resolved[int]
    #: Every rule that matched the VM, in order, whether or not it decided anything.
    matched: tuple[Origin, ...] = field(default=())

    def setting(self, name: str) -> Resolved[object]:
        """One setting by its name in SETTINGS, e.g. "volume.max"."""
        resolved: Resolved[object] = getattr(self, setting_named(name).field)
        return resolved

    def rows(self) -> tuple[tuple[str, str, str], ...]:
        """(setting, value, source) for display."""
        rows = []
        for setting in POLICY_SETTINGS:
            resolved: Resolved[object] = getattr(self, setting.field)
            rows.append((setting.name, setting.show(resolved.value), resolved.source))
        return tuple(rows)


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer for one VM and one direction, naming the rule that decided."""

    vm: VmIdentity
    direction: Direction
    access: Access
    #: The rule that set the access; None when no matching rule did (deny).
    origin: Origin | None
    settings: VmSettings

    @property
    def allowed(self) -> bool:
        """Audio may flow now. attach-on-request is not allowed until attached."""
        return self.access is Access.ALLOW

    @property
    def reason(self) -> str:
        if self.origin is None:
            return f"{self.direction} {self.access}: no rule for {self.vm.name!r} sets it"
        return f"{self.direction} {self.access} by {self.origin}"


def _first(rules: Sequence[Rule], get: Callable[[Rule], T | None], default: T) -> Resolved[T]:
    for rule in rules:
        value = get(rule)
        if value is not None:
            return Resolved(value, rule.origin)
    return Resolved(default, None)


def resolve(policy: Policy, vm: VmIdentity) -> VmSettings:
    """Every setting for `vm`: each from the first matching rule that sets it."""
    rules = [rule for rule in policy.rules if rule.vm.matches(vm)]
    volume_max = _first(rules, lambda r: r.volume_max, 100)
    volume_default = _first(rules, lambda r: r.volume_default, 100)
    if volume_default.value > volume_max.value:
        # The two can come from different rules; the cap protects, so it decides.
        volume_default = volume_max
    return VmSettings(
        vm=vm,
        playback=_first(rules, lambda r: r.playback, Access.DENY),
        capture=_first(rules, lambda r: r.capture, Access.DENY),
        volume_default=volume_default,
        volume_max=volume_max,
        rates=_first(rules, lambda r: r.rates, SUPPORTED_RATES),
        sample_formats=_first(rules, lambda r: r.sample_formats, tuple(SampleFormat)),
        max_channels=_first(rules, lambda r: r.max_channels, MAX_CHANNELS),
        matched=tuple(rule.origin for rule in rules),
    )


def evaluate(policy: Policy, vm: VmIdentity, request: Direction) -> Decision:
    """Decide whether `vm` may play back or capture, and under which limits."""
    settings = resolve(policy, vm)
    access = settings.playback if request is Direction.PLAYBACK else settings.capture
    return Decision(vm, request, access.value, access.origin, settings)


def choose_format(
    offered: Sequence[AudioFormat], decision: Decision
) -> tuple[AudioFormat | None, str]:
    """The first offered format (guest's preference order) the policy allows.

    Returns the format and a short reason; the format is None when the direction
    is denied or no offered format fits, and the reason then says why.
    """
    if decision.access is Access.DENY:
        return None, decision.reason
    settings = decision.settings
    rejected: list[str] = []
    for fmt in offered:
        why = _format_refusal(fmt, settings)
        if why is None:
            return fmt, f"{fmt} is the first offered format the policy allows"
        rejected.append(f"{fmt}: {why}")
    if not rejected:
        return None, "the guest offered no formats"
    return None, "no offered format is allowed (" + "; ".join(rejected) + ")"


def _format_refusal(fmt: AudioFormat, settings: VmSettings) -> str | None:
    if fmt.rate not in settings.rates.value:
        return f"rate {fmt.rate} not allowed by {settings.rates.source}"
    if fmt.sample_format not in settings.sample_formats.value:
        return (
            f"sample format {fmt.sample_format.name.lower()} not allowed by "
            f"{settings.sample_formats.source}"
        )
    if fmt.channels > settings.max_channels.value:
        return (
            f"{fmt.channels} channels exceed {settings.max_channels.value} "
            f"({settings.max_channels.source})"
        )
    return None


def shadowed_rules(policy: Policy) -> tuple[tuple[Rule, tuple[Rule, ...]], ...]:
    """(rule, earlier_rules) pairs where the earlier rules make `rule` dead.

    Only the cases that are certain and common are reported: earlier rules for
    `*`, or for the very same pattern, that together set every setting `rule`
    sets. The usual cause is a per-VM file whose name sorts after the default.
    """
    found: list[tuple[Rule, tuple[Rule, ...]]] = []
    for index, rule in enumerate(policy.rules):
        wanted = rule.sets()
        covering = [
            earlier
            for earlier in policy.rules[:index]
            if earlier.vm.is_catch_all or earlier.vm.pattern == rule.vm.pattern
        ]
        covered = frozenset().union(*(earlier.sets() for earlier in covering))
        if wanted and wanted <= covered:
            found.append((rule, tuple(e for e in covering if e.sets() & wanted)))
    return tuple(found)
