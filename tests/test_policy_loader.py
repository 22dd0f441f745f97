"""The loader: the broken-file corpus, strict modes, limits, and the shipped files."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from qvaudio.core.policy import Access, Direction, VmIdentity, evaluate
from qvaudio.core.policy_parser import PolicyLoadError, parse_policy_text
from qvaudio.core.safe_yaml import MAX_FILE_BYTES
from qvaudio.dom0.policy_loader import load_policy_dir, load_policy_paths, policy_files

CORPUS = Path(__file__).parent / "policy_corpus"
BAD = sorted((CORPUS / "bad").glob("*.yaml"))
GOOD = sorted((CORPUS / "good").glob("*.yaml"))
REPO = Path(__file__).parent.parent


def problems_of(paths: list[Path], **kwargs: object) -> list[str]:
    with pytest.raises(PolicyLoadError) as caught:
        load_policy_paths(paths, **kwargs)  # type: ignore[arg-type]
    return [str(p) for p in caught.value.problems]


def test_corpus_is_not_empty() -> None:
    assert len(BAD) >= 30
    assert len(GOOD) >= 5


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_bad_file_reports_expected_file_line_message(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = path.with_suffix(".expect").read_text().splitlines()
    # Relative names, so the .expect files say "name.yaml:LINE: message".
    monkeypatch.chdir(path.parent)
    # Strictness is about ownership and modes, tested below; git checkouts vary.
    assert problems_of([Path(path.name)], strict=False) == expected
    assert all(re.match(rf"{re.escape(path.name)}:\d+: ", line) for line in expected)


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.name)
def test_good_file_loads(path: Path) -> None:
    policy = load_policy_paths([path], strict=False)
    assert policy.files == (str(path),)


def test_good_corpus_as_a_directory() -> None:
    policy = load_policy_dir(CORPUS / "good", strict=False)
    assert [Path(f).name for f in policy.files] == [p.name for p in GOOD]
    assert [str(r.origin).split("/")[-1] for r in policy.rules] == [
        "10-everything.yaml:3",
        "10-everything.yaml:14",
        "10-everything.yaml:17",
        "10-everything.yaml:21",
        "30-indentless.yaml:2",
        "30-indentless.yaml:4",
        "50-crlf.yaml:2",
        "60-bom.yaml:2",
        "90-default.yaml:2",
    ]
    work = evaluate(policy, VmIdentity("work"), Direction.CAPTURE)
    assert work.access is Access.ATTACH_ON_REQUEST
    assert work.settings.volume_default.value == 40
    assert work.settings.volume_max.value == 80
    vault = evaluate(policy, VmIdentity("vault"), Direction.PLAYBACK)
    assert vault.access is Access.DENY
    assert evaluate(policy, VmIdentity("untrusted"), Direction.PLAYBACK).access is Access.DENY
    media = evaluate(policy, VmIdentity("media"), Direction.PLAYBACK)
    assert media.settings.max_channels.value == 8
    assert media.access is Access.ALLOW


def test_every_problem_in_every_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("rules:\n  - vm: a\n    playback: nope\n")
    (tmp_path / "b.yaml").write_text("rules:\n  - vm: b\n    capture: nope\n")
    (tmp_path / "c.yaml").write_text("rules:\n  - vm: c\n    playback: allow\n")
    assert problems_of([tmp_path]) == [
        f"{tmp_path}/a.yaml:3: playback must be one of allow, deny, got 'nope'",
        f"{tmp_path}/b.yaml:3: capture must be one of deny, allow, attach-on-request, got 'nope'",
    ]


def test_oversized_file_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("rules:\n" + "# padding\n" * (MAX_FILE_BYTES // 10 + 1))
    assert problems_of([big]) == [f"{big}: file is larger than {MAX_FILE_BYTES} bytes"]


def test_alias_bomb_is_refused_before_expansion() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(8)
    )
    with pytest.raises(PolicyLoadError) as caught:
        parse_policy_text(bomb.encode(), "bomb.yaml")
    assert [str(p) for p in caught.value.problems] == ["bomb.yaml:1: anchors (&a) are not allowed"]


def test_directory_reads_yaml_files_in_name_order_and_skips_others(tmp_path: Path) -> None:
    for name in ["90-default.yaml", "30-work.yaml", "Zed.yaml", "10-site.yaml"]:
        (tmp_path / name).write_text("rules: []\n")
    for name in [".30-work.yaml.abc.tmp", ".hidden.yaml", "notes.txt", "x.yaml~", "x.yml"]:
        (tmp_path / name).write_text("not: [valid\n")
    (tmp_path / "sub.d").mkdir()
    assert [p.name for p in policy_files(tmp_path)] == [
        "10-site.yaml",
        "30-work.yaml",
        "90-default.yaml",
        "Zed.yaml",
    ]
    assert len(load_policy_dir(tmp_path).files) == 4


def test_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert problems_of([missing]) == [f"{missing}: cannot read: No such file or directory"]


def test_non_regular_file_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    assert problems_of([tmp_path]) == [f"{fifo}: not a regular file"]


def test_empty_directory_is_valid_and_denies_everything(tmp_path: Path) -> None:
    policy = load_policy_dir(tmp_path)
    assert policy.rules == ()
    assert evaluate(policy, VmIdentity("work"), Direction.PLAYBACK).access is Access.DENY


# --- strict modes ----------------------------------------------------------------------


def valid_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "policy.d"
    directory.mkdir(mode=0o755)
    (directory / "90-default.yaml").write_text("rules:\n  - vm: '*'\n    playback: allow\n")
    (directory / "90-default.yaml").chmod(0o644)
    return directory


def test_strict_accepts_a_properly_owned_directory(tmp_path: Path) -> None:
    assert len(load_policy_dir(valid_dir(tmp_path)).rules) == 1


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_strict_refuses_group_or_other_writable_file(tmp_path: Path, mode: int) -> None:
    directory = valid_dir(tmp_path)
    path = directory / "90-default.yaml"
    path.chmod(mode)
    assert problems_of([directory]) == [
        f"{path}: refusing file writable by group or others (mode {mode:04o}; chmod go-w)"
    ]
    # Without strict mode (policy check --no-strict) the same file loads.
    assert len(load_policy_dir(directory, strict=False).rules) == 1


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o1777])
def test_strict_refuses_group_or_other_writable_directory(tmp_path: Path, mode: int) -> None:
    directory = valid_dir(tmp_path)
    directory.chmod(mode)
    problems = problems_of([directory])
    assert problems == [
        f"{directory}: refusing directory writable by group or others "
        f"(mode {mode & 0o7777:04o}; chmod go-w)"
    ]


def test_strict_refuses_files_owned_by_someone_else(tmp_path: Path) -> None:
    directory = valid_dir(tmp_path)
    me = os.geteuid()
    # Trust only a uid that owns nothing here: the directory itself is refused first.
    assert problems_of([directory], trusted_uids=frozenset({me + 4242})) == [
        f"{directory}: refusing directory owned by uid {me} (must be owned by uid {me + 4242})"
    ]
    # A file named directly is checked on its own.
    path = directory / "90-default.yaml"
    assert problems_of([path], trusted_uids=frozenset({me + 4242})) == [
        f"{path}: refusing file owned by uid {me} (must be owned by uid {me + 4242})"
    ]


def test_strict_refuses_file_chowned_to_another_user(tmp_path: Path) -> None:
    directory = valid_dir(tmp_path)
    path = directory / "90-default.yaml"
    other = 4242 if os.geteuid() != 4242 else 4243
    try:
        os.chown(path, other, -1)
    except PermissionError:
        # Not root: we can't give files away; the same check is covered by trusting
        # a different uid in the test above, so assert the precondition and stop.
        assert os.geteuid() != 0
        return
    assert problems_of([directory]) == [
        f"{path}: refusing file owned by uid {other} (must be owned by uid 0"
        + ("" if os.geteuid() == 0 else f" or uid {os.geteuid()}")
        + ")"
    ]


# --- the shipped files and the documentation -------------------------------------------


def test_shipped_policy_is_valid_and_fails_closed_for_capture() -> None:
    policy = load_policy_dir(REPO / "policy", strict=False)
    assert [Path(f).name for f in policy.files] == ["90-default.yaml"]
    vm = VmIdentity("anything")
    assert evaluate(policy, vm, Direction.PLAYBACK).access is Access.ALLOW
    assert evaluate(policy, vm, Direction.CAPTURE).access is Access.DENY


def uncommented_examples(text: str) -> str:
    """The commented-out example block at the end of the shipped default."""
    block = text[text.index("# rules:") :]
    return "".join(line[2:] + "\n" for line in block.splitlines())


def test_shipped_examples_are_valid_when_uncommented() -> None:
    text = (REPO / "policy" / "90-default.yaml").read_text()
    rules = parse_policy_text(uncommented_examples(text).encode(), "examples")
    assert [r.vm.pattern for r in rules] == ["work", "disp*", "@tag:no-audio", "media"]


def doc_yaml_blocks() -> list[str]:
    text = (REPO / "docs" / "policy.md").read_text()
    return re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL)


def test_docs_have_yaml_examples() -> None:
    assert len(doc_yaml_blocks()) >= 4


@pytest.mark.parametrize("index", range(len(doc_yaml_blocks())))
def test_every_yaml_example_in_the_docs_is_valid(index: int) -> None:
    block = doc_yaml_blocks()[index]
    assert parse_policy_text(block.encode(), f"docs/policy.md block {index}")
