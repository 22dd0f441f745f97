"""`policy set`: keeps what the user wrote, validates first, replaces atomically."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qvaudio.core.policy import Access, Direction, VmIdentity, evaluate
from qvaudio.core.policy_parser import PolicyLoadError, parse_policy_text
from qvaudio.dom0 import policy_edit
from qvaudio.dom0.policy_edit import (
    PolicyEditError,
    edit_policy_text,
    format_value,
    set_vm_setting,
    vm_policy_path,
)
from qvaudio.dom0.policy_loader import load_policy_dir

COMMENTED = """\
# My work VM. I want to be asked before it records.
rules:
  - vm: work   # the work one
    capture: deny  # no mic yet
    volume: {default: 40}

  # personal is loud
  - vm: personal
    volume:
      max: 70
# trailing comment
"""


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "policy.d"
    directory.mkdir(mode=0o755)
    default = directory / "90-default.yaml"
    default.write_text("rules:\n  - vm: '*'\n    playback: allow\n    capture: deny\n")
    default.chmod(0o644)
    return directory


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


@pytest.mark.parametrize(
    ("vm", "key", "value", "expected"),
    [
        # replace a value, keeping the comment after it
        ("work", "capture", "attach-on-request", "    capture: attach-on-request  # no mic yet\n"),
        # add a key to a one-line flow mapping
        ("work", "volume.max", "60%", "    volume: {default: 40, max: 60}\n"),
        # change a key in a flow mapping
        ("work", "volume.default", "10", "    volume: {default: 10}\n"),
        # add a key to a rule
        ("work", "playback", "deny", "    volume: {default: 40}\n    playback: deny\n\n"),
        # add to a block mapping
        ("personal", "volume.default", "20", "      max: 70\n      default: 20\n"),
        # add a nested mapping
        ("personal", "formats.rates", "48000", "    formats:\n      rates: [48000]\n"),
        # a new rule goes after the last one, before trailing comments
        ("disp7", "capture", "deny", "      max: 70\n  - vm: disp7\n    capture: deny\n# trail"),
    ],
)
def test_edit_changes_one_thing_and_keeps_the_rest(
    vm: str, key: str, value: str, expected: str
) -> None:
    new = edit_policy_text(COMMENTED, "f.yaml", vm, key, format_value(key, value))
    assert expected in new
    # Every comment line the user wrote survives.
    for line in COMMENTED.splitlines():
        if "#" in line:
            assert line.split("#", 1)[1] in new
    assert parse_policy_text(new.encode(), "f.yaml")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "rules:\n  - vm: work\n    capture: allow\n"),
        ("# just a comment", "# just a comment\nrules:\n  - vm: work\n    capture: allow\n"),
        ("rules:\n", "rules:\n  - vm: work\n    capture: allow\n"),
        (
            "rules:\n- vm: a\n  capture: deny\n",
            "rules:\n- vm: a\n  capture: deny\n- vm: work\n  capture: allow\n",
        ),
        (
            "rules:\r\n  - vm: work\r\n    playback: deny\r\n",
            "rules:\r\n  - vm: work\r\n    playback: deny\r\n    capture: allow\r\n",
        ),
    ],
)
def test_edit_shapes(text: str, expected: str) -> None:
    assert edit_policy_text(text, "f.yaml", "work", "capture", "allow") == expected


def test_vm_names_that_yaml_would_misread_are_quoted() -> None:
    new = edit_policy_text("", "f.yaml", "null", "capture", "allow")
    assert "vm: 'null'" in new
    (rule,) = parse_policy_text(new.encode(), "f.yaml")
    assert rule.vm.pattern == "null"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("capture", "maybe"),
        ("playback", "attach-on-request"),
        ("capture", "allow\n  - vm: '*'\n    capture: allow"),  # no YAML injection
        ("volume.max", "150"),
        ("volume.max", "loud"),
        ("formats.rates", "48000]"),
        ("formats.sample_formats", "u8"),
        ("formats.max_channels", "two"),
        ("vm", "x"),
    ],
)
def test_bad_values_are_refused(key: str, value: str) -> None:
    with pytest.raises(PolicyEditError):
        format_value(key, value)


@pytest.mark.parametrize("vm", ["../etc", "a/b", "disp*", "@tag:x", "", "9lives"])
def test_only_vm_names_get_files(tmp_path: Path, vm: str) -> None:
    with pytest.raises(PolicyEditError):
        vm_policy_path(tmp_path, vm)


def test_set_creates_the_vm_file_and_takes_effect(policy_dir: Path) -> None:
    path = set_vm_setting(policy_dir, "work", "capture", "attach-on-request")
    assert path == policy_dir / "30-work.yaml"
    assert path.stat().st_mode & 0o777 == 0o644
    policy = load_policy_dir(policy_dir)
    decision = evaluate(policy, VmIdentity("work"), Direction.CAPTURE)
    assert decision.access is Access.ATTACH_ON_REQUEST
    assert decision.origin is not None and decision.origin.file == str(path)
    assert listing(policy_dir) == ["30-work.yaml", "90-default.yaml"]


def test_set_keeps_comments_of_an_existing_file(policy_dir: Path) -> None:
    path = policy_dir / "30-work.yaml"
    path.write_text(COMMENTED)
    path.chmod(0o640)
    set_vm_setting(policy_dir, "work", "capture", "attach-on-request")
    assert path.read_text() == COMMENTED.replace(
        "capture: deny  # no mic yet", "capture: attach-on-request  # no mic yet"
    )
    assert path.stat().st_mode & 0o777 == 0o640
    assert listing(policy_dir) == ["30-work.yaml", "90-default.yaml"]


def test_set_refuses_to_build_on_an_invalid_file(policy_dir: Path) -> None:
    path = policy_dir / "30-work.yaml"
    original = b"# broken\nrules:\n  - vm: work\n    capture: nope\n"
    path.write_bytes(original)
    with pytest.raises(PolicyLoadError) as caught:
        set_vm_setting(policy_dir, "work", "playback", "allow")
    assert (
        str(caught.value)
        == f"{path}:4: capture must be one of deny, allow, attach-on-request, got 'nope'"
    )
    assert path.read_bytes() == original
    assert listing(policy_dir) == ["30-work.yaml", "90-default.yaml"]


def test_failed_validation_leaves_the_original_byte_identical(
    policy_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = policy_dir / "30-work.yaml"
    path.write_text(COMMENTED)
    original = path.read_bytes()
    # Simulate an edit that produces an invalid file: the loader must stop it.
    monkeypatch.setattr(policy_edit, "edit_policy_text", lambda text, *args: text + "  - vm: 12\n")
    with pytest.raises(PolicyLoadError):
        set_vm_setting(policy_dir, "work", "capture", "allow")
    assert path.read_bytes() == original
    assert listing(policy_dir) == ["30-work.yaml", "90-default.yaml"]


def test_a_failing_write_leaves_no_temp_file_and_the_original(
    policy_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = policy_dir / "30-work.yaml"
    path.write_text(COMMENTED)
    original = path.read_bytes()

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        set_vm_setting(policy_dir, "work", "capture", "allow")
    assert path.read_bytes() == original
    assert listing(policy_dir) == ["30-work.yaml", "90-default.yaml"]


def test_rename_is_the_commit_point(policy_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The new content reaches the real name only through one rename of a complete file."""
    path = policy_dir / "30-work.yaml"
    path.write_text(COMMENTED)
    seen: list[tuple[str, bytes]] = []
    real_replace = os.replace

    def spy(src: str, dst: Path) -> None:
        seen.append((os.path.basename(src), Path(src).read_bytes()))
        assert path.read_text() == COMMENTED  # untouched until now
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    set_vm_setting(policy_dir, "work", "volume.max", "50")
    ((tmp_name, content),) = seen
    assert tmp_name.startswith(".30-work.yaml.")
    assert content == path.read_bytes()
    assert parse_policy_text(content, "x")


def test_repeated_sets_converge(policy_dir: Path) -> None:
    for value in ["10", "20", "30"]:
        set_vm_setting(policy_dir, "work", "volume.max", value)
    text = (policy_dir / "30-work.yaml").read_text()
    assert text.count("max:") == 1
    assert "max: 30" in text
