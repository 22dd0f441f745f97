"""Evaluation: every rule kind, precedence, defaults and format choice (pure, no files)."""

from __future__ import annotations

import dataclasses

import pytest

from qvaudio.core.formats import AudioFormat, SampleFormat
from qvaudio.core.policy import (
    POLICY_SETTINGS,
    SETTINGS,
    Access,
    Direction,
    Origin,
    Policy,
    Rule,
    VmIdentity,
    VmMatcher,
    VmPatternError,
    VmSettings,
    choose_format,
    evaluate,
    resolve,
    shadowed_rules,
)
from qvaudio.core.policy_parser import parse_policy_text


def policy_from(*files: tuple[str, str]) -> Policy:
    """A Policy from (name, yaml text) pairs, in the given order, via the real parser."""
    rules: list[Rule] = []
    for name, text in files:
        rules.extend(parse_policy_text(text.encode(), name))
    return Policy(tuple(rules), tuple(name for name, _ in files))


DEFAULT = (
    "90-default.yaml",
    """\
rules:
  - vm: '*'
    playback: allow
    capture: deny
""",
)


@pytest.mark.parametrize(
    ("pattern", "vm", "tags", "matches"),
    [
        ("work", "work", (), True),
        ("work", "work2", (), False),
        ("work", "Work", (), False),  # names are case-sensitive
        ("*", "anything", (), True),
        ("disp*", "disp1234", (), True),
        ("disp*", "disp", (), True),
        ("disp*", "mydisp1", (), False),
        ("sys-?", "sys-a", (), True),
        ("sys-?", "sys-net", (), False),
        ("@tag:media", "work", ("media",), True),
        ("@tag:media", "work", ("other",), False),
        ("@tag:media", "media", (), False),  # a tag never matches by name
    ],
)
def test_vm_matcher(pattern: str, vm: str, tags: tuple[str, ...], matches: bool) -> None:
    assert VmMatcher.parse(pattern).matches(VmIdentity(vm, frozenset(tags))) is matches


@pytest.mark.parametrize("pattern", ["", "a/b", "[ab]", "@tag:", "@tag:a b", "work space"])
def test_vm_matcher_rejects(pattern: str) -> None:
    with pytest.raises(VmPatternError):
        VmMatcher.parse(pattern)


LAYERED = (
    (
        "30-work.yaml",
        """\
rules:
  - vm: work
    capture: attach-on-request
""",
    ),
    (
        "40-disp.yaml",
        """\
rules:
  - vm: 'disp*'
    volume: {max: 50}
  - vm: '@tag:silent'
    playback: deny
""",
    ),
    DEFAULT,
)


@pytest.mark.parametrize(
    ("vm", "tags", "direction", "access", "origin"),
    [
        # nothing specific: the * default decides
        ("personal", (), Direction.PLAYBACK, Access.ALLOW, "90-default.yaml:2"),
        ("personal", (), Direction.CAPTURE, Access.DENY, "90-default.yaml:2"),
        # a per-VM file sorting before the default overrides only what it sets
        ("work", (), Direction.CAPTURE, Access.ATTACH_ON_REQUEST, "30-work.yaml:2"),
        ("work", (), Direction.PLAYBACK, Access.ALLOW, "90-default.yaml:2"),
        # glob rule sets volume only; access still from the default
        ("disp42", (), Direction.PLAYBACK, Access.ALLOW, "90-default.yaml:2"),
        # tag rule
        ("personal", ("silent",), Direction.PLAYBACK, Access.DENY, "40-disp.yaml:4"),
        # the work rule comes first, so a tag later can't take capture back, only playback
        ("work", ("silent",), Direction.CAPTURE, Access.ATTACH_ON_REQUEST, "30-work.yaml:2"),
        ("work", ("silent",), Direction.PLAYBACK, Access.DENY, "40-disp.yaml:4"),
    ],
)
def test_precedence_first_matching_rule_that_sets_the_setting(
    vm: str, tags: tuple[str, ...], direction: Direction, access: Access, origin: str
) -> None:
    decision = evaluate(policy_from(*LAYERED), VmIdentity(vm, frozenset(tags)), direction)
    assert decision.access is access
    assert str(decision.origin) == origin
    assert decision.allowed is (access is Access.ALLOW)
    assert origin in decision.reason


def test_first_match_wins_even_against_a_more_specific_later_rule() -> None:
    policy = policy_from(
        ("10-site.yaml", "rules:\n  - vm: '*'\n    capture: deny\n"),
        ("30-work.yaml", "rules:\n  - vm: work\n    capture: allow\n"),
    )
    decision = evaluate(policy, VmIdentity("work"), Direction.CAPTURE)
    assert decision.access is Access.DENY
    assert decision.origin == Origin("10-site.yaml", 2)


def test_within_a_file_order_is_rule_order() -> None:
    policy = policy_from(
        ("a.yaml", "rules:\n  - vm: work\n    playback: deny\n  - vm: work\n    playback: allow\n")
    )
    decision = evaluate(policy, VmIdentity("work"), Direction.PLAYBACK)
    assert (decision.access, decision.origin) == (Access.DENY, Origin("a.yaml", 2))


@pytest.mark.parametrize("direction", list(Direction))
def test_deny_when_nothing_matches(direction: Direction) -> None:
    policy = policy_from(("30-work.yaml", "rules:\n  - vm: work\n    playback: allow\n"))
    decision = evaluate(policy, VmIdentity("personal"), direction)
    assert decision.access is Access.DENY
    assert decision.origin is None
    assert not decision.allowed
    assert decision.settings.matched == ()
    assert "no rule" in decision.reason


def test_deny_when_matching_rules_do_not_set_access() -> None:
    policy = policy_from(("a.yaml", "rules:\n  - vm: work\n    volume: {max: 20}\n"))
    decision = evaluate(policy, VmIdentity("work"), Direction.PLAYBACK)
    assert (decision.access, decision.origin) == (Access.DENY, None)
    assert decision.settings.matched == (Origin("a.yaml", 2),)


@pytest.mark.parametrize("direction", list(Direction))
def test_deny_all_policy(direction: Direction) -> None:
    decision = evaluate(Policy.deny_all(), VmIdentity("dom0"), direction)
    assert decision.access is Access.DENY


@pytest.mark.parametrize(
    ("rules", "default", "maximum"),
    [
        ("", (100, None), (100, None)),
        ("  - vm: work\n    volume: {max: 50}\n", (50, "a.yaml:2"), (50, "a.yaml:2")),
        ("  - vm: work\n    volume: {default: 30}\n", (30, "a.yaml:2"), (100, None)),
        (
            "  - vm: work\n    volume: {default: 30%, max: 60%}\n",
            (30, "a.yaml:2"),
            (60, "a.yaml:2"),
        ),
        # default from one rule above the max from another: capped at the max
        (
            "  - vm: work\n    volume: {default: 90}\n  - vm: '*'\n    volume: {max: 40}\n",
            (40, "a.yaml:4"),
            (40, "a.yaml:4"),
        ),
    ],
)
def test_volume(
    rules: str, default: tuple[int, str | None], maximum: tuple[int, str | None]
) -> None:
    policy = policy_from(("a.yaml", "rules:\n" + rules if rules else ""))
    settings = resolve(policy, VmIdentity("work"))
    got_default = (settings.volume_default.value, settings.volume_default.origin)
    got_max = (settings.volume_max.value, settings.volume_max.origin)
    assert (got_default[0], got_default[1] and str(got_default[1])) == default
    assert (got_max[0], got_max[1] and str(got_max[1])) == maximum


def test_formats_each_key_is_its_own_setting() -> None:
    policy = policy_from(
        ("a.yaml", "rules:\n  - vm: work\n    formats: {rates: [48000]}\n"),
        ("b.yaml", "rules:\n  - vm: '*'\n    formats: {rates: [44100], max_channels: 2}\n"),
    )
    settings = resolve(policy, VmIdentity("work"))
    assert settings.rates.value == (48000,)
    assert str(settings.rates.origin) == "a.yaml:2"
    assert settings.max_channels.value == 2
    assert str(settings.max_channels.origin) == "b.yaml:2"
    assert settings.sample_formats.value == tuple(SampleFormat)
    assert settings.sample_formats.origin is None


S16_48 = AudioFormat(48000, SampleFormat.S16LE, 2)
S16_44 = AudioFormat(44100, SampleFormat.S16LE, 2)
F32_48_6 = AudioFormat(48000, SampleFormat.F32LE, 6)
S32_48_1 = AudioFormat(48000, SampleFormat.S32LE, 1)

LIMITED = """\
rules:
  - vm: '*'
    playback: allow
    capture: attach-on-request
    formats:
      rates: [48000]
      sample_formats: [s16le, f32le]
      max_channels: 2
"""


@pytest.mark.parametrize(
    ("offered", "chosen", "reason_part"),
    [
        ([S16_48], S16_48, "first offered"),
        ([F32_48_6, S16_44, S16_48], S16_48, "first offered"),
        ([S16_44], None, "rate 44100 not allowed by a.yaml:2"),
        ([S32_48_1], None, "sample format s32le not allowed by a.yaml:2"),
        ([F32_48_6], None, "6 channels exceed 2 (a.yaml:2)"),
        ([], None, "offered no formats"),
    ],
)
def test_choose_format(
    offered: list[AudioFormat], chosen: AudioFormat | None, reason_part: str
) -> None:
    decision = evaluate(policy_from(("a.yaml", LIMITED)), VmIdentity("w"), Direction.PLAYBACK)
    fmt, reason = choose_format(offered, decision)
    assert fmt == chosen
    assert reason_part in reason


def test_choose_format_denied_direction() -> None:
    decision = evaluate(Policy.deny_all(), VmIdentity("w"), Direction.PLAYBACK)
    fmt, reason = choose_format([S16_48], decision)
    assert fmt is None
    assert "deny" in reason


def test_choose_format_attach_on_request_still_negotiates() -> None:
    decision = evaluate(policy_from(("a.yaml", LIMITED)), VmIdentity("w"), Direction.CAPTURE)
    assert decision.access is Access.ATTACH_ON_REQUEST
    assert not decision.allowed
    assert choose_format([S16_48], decision)[0] == S16_48


def test_policy_and_decision_are_immutable() -> None:
    policy = policy_from(DEFAULT)
    decision = evaluate(policy, VmIdentity("w"), Direction.PLAYBACK)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.rules = ()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.access = Access.DENY  # type: ignore[misc]
    assert isinstance(policy.rules, tuple)


def test_evaluation_is_a_pure_function_of_its_inputs() -> None:
    policy = policy_from(*LAYERED)
    vm = VmIdentity("work", frozenset({"silent"}))
    first = evaluate(policy, vm, Direction.CAPTURE)
    assert all(evaluate(policy, vm, Direction.CAPTURE) == first for _ in range(3))


def test_shadowed_rules_reports_per_vm_file_sorting_after_default() -> None:
    policy = policy_from(DEFAULT, ("work.yaml", "rules:\n  - vm: work\n    capture: allow\n"))
    (found,) = shadowed_rules(policy)
    rule, earlier = found
    assert str(rule.origin) == "work.yaml:2"
    assert [str(e.origin) for e in earlier] == ["90-default.yaml:2"]


def test_shadowed_rules_ignores_rules_that_still_decide_something() -> None:
    assert shadowed_rules(policy_from(*LAYERED)) == ()


def test_one_table_names_every_setting_of_a_rule_and_of_a_vm() -> None:
    # The loader, `policy show` and `policy set` read POLICY_SETTINGS: a new
    # setting added to the model but not the table would be silently ignored.
    table = {s.field for s in POLICY_SETTINGS}
    assert table == {f.name for f in dataclasses.fields(Rule)} - {"origin", "vm"}
    assert table == {f.name for f in dataclasses.fields(VmSettings)} - {"vm", "matched"}
    assert tuple(s.name for s in POLICY_SETTINGS) == SETTINGS
