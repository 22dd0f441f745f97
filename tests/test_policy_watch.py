"""Live reload: changes are picked up, bad edits keep the last good policy, start fails closed."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from qvaudio.core.policy import Access, Direction, Policy, VmIdentity, evaluate
from qvaudio.dom0.policy_loader import load_policy_dir
from qvaudio.dom0.policy_watch import PolicyWatcher
from tests.waiting import wait_until

WORK = VmIdentity("work")
ALLOW = "rules:\n  - vm: '*'\n    playback: allow\n"
DENY = "rules:\n  - vm: '*'\n    playback: deny\n"
#: Bounds only a failing test: the watcher polls every 50 ms.
TIMEOUT_S = 5.0


def playback(policy: Policy) -> Access:
    return evaluate(policy, WORK, Direction.PLAYBACK).access


def write(path: Path, text: str) -> None:
    """Replace like an editor that saves via rename."""
    tmp = path.with_name(f".{path.name}.new")
    tmp.write_text(text)
    tmp.chmod(0o644)
    os.replace(tmp, path)


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "policy.d"
    directory.mkdir(mode=0o755)
    return directory


@pytest.fixture
def watcher(policy_dir: Path) -> Iterator[PolicyWatcher]:
    w = PolicyWatcher(policy_dir, interval=0.05)
    yield w
    w.stop()


def test_loads_on_start(policy_dir: Path, watcher: PolicyWatcher) -> None:
    write(policy_dir / "90-default.yaml", ALLOW)
    watcher.start()
    assert watcher.ever_loaded
    assert playback(watcher.policy) is Access.ALLOW


def test_edit_is_picked_up_without_restart(policy_dir: Path, watcher: PolicyWatcher) -> None:
    path = policy_dir / "90-default.yaml"
    write(path, ALLOW)
    watcher.start()
    write(path, DENY)
    wait_until(lambda: playback(watcher.policy) is Access.DENY, "playback denied", TIMEOUT_S)


def test_in_place_edit_and_new_file_are_picked_up(policy_dir: Path, watcher: PolicyWatcher) -> None:
    path = policy_dir / "90-default.yaml"
    write(path, ALLOW)
    watcher.start()
    with open(path, "w") as handle:  # same inode, same size: only mtime differs
        handle.write(ALLOW.replace("allow", "deny "))
    wait_until(lambda: playback(watcher.policy) is Access.DENY, "playback denied", TIMEOUT_S)
    write(policy_dir / "30-work.yaml", "rules:\n  - vm: work\n    playback: allow\n")
    wait_until(lambda: playback(watcher.policy) is Access.ALLOW, "playback allowed", TIMEOUT_S)
    (policy_dir / "30-work.yaml").unlink()
    wait_until(lambda: playback(watcher.policy) is Access.DENY, "playback denied", TIMEOUT_S)


def test_invalid_edit_keeps_last_good_and_logs_file_line(
    policy_dir: Path, watcher: PolicyWatcher, caplog: pytest.LogCaptureFixture
) -> None:
    path = policy_dir / "90-default.yaml"
    write(path, ALLOW)
    watcher.start()
    good = watcher.policy
    caplog.set_level(logging.ERROR, logger="qvaudio.dom0.policy_watch")
    write(path, "rules:\n  - vm: '*'\n    playback: maybe\n")
    expected = f"{path}:3: playback must be one of allow, deny, got 'maybe'"
    wait_until(lambda: expected in caplog.messages, f"{expected!r} in the log", TIMEOUT_S)
    assert watcher.policy is good
    assert [str(p) for p in watcher.problems] == [expected]
    assert any("keeping the last good policy" in m for m in caplog.messages)
    # Fixing the file installs the fix.
    write(path, DENY)
    wait_until(lambda: playback(watcher.policy) is Access.DENY, "playback denied", TIMEOUT_S)
    assert watcher.problems == ()


def test_unsafe_permissions_keep_last_good(policy_dir: Path, watcher: PolicyWatcher) -> None:
    path = policy_dir / "90-default.yaml"
    write(path, ALLOW)
    watcher.start()
    good = watcher.policy
    path.chmod(0o666)
    wait_until(lambda: watcher.problems, "a problem reported", TIMEOUT_S)
    assert "writable by group or others" in str(watcher.problems[0])
    assert watcher.policy is good


def test_never_valid_denies_everything(
    policy_dir: Path, watcher: PolicyWatcher, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="qvaudio.dom0.policy_watch")
    write(policy_dir / "90-default.yaml", "rules:\n  - vm: '*'\n    playback: [allow]\n")
    watcher.start()
    assert not watcher.ever_loaded
    assert watcher.policy == Policy.deny_all()
    assert playback(watcher.policy) is Access.DENY
    assert any("denying all audio" in m for m in caplog.messages)
    # ... until a valid file appears.
    write(policy_dir / "90-default.yaml", ALLOW)
    wait_until(lambda: playback(watcher.policy) is Access.ALLOW, "playback allowed", TIMEOUT_S)


def test_missing_directory_denies_then_loads_when_created(tmp_path: Path) -> None:
    directory = tmp_path / "later"
    watcher = PolicyWatcher(directory, interval=0.05)
    try:
        watcher.start()
        assert playback(watcher.policy) is Access.DENY
        assert "cannot read" in str(watcher.problems[0])
        directory.mkdir(mode=0o755)
        write(directory / "90-default.yaml", ALLOW)
        wait_until(lambda: playback(watcher.policy) is Access.ALLOW, "playback allowed", TIMEOUT_S)
    finally:
        watcher.stop()


def test_check_now_reloads_only_on_change(policy_dir: Path) -> None:
    loads: list[Policy] = []
    write(policy_dir / "90-default.yaml", ALLOW)
    watcher = PolicyWatcher(policy_dir, on_change=loads.append)
    assert watcher.check_now() is True
    assert watcher.check_now() is False
    assert len(loads) == 1
    write(policy_dir / "90-default.yaml", DENY)
    assert watcher.check_now() is True
    assert [playback(p) for p in loads] == [Access.ALLOW, Access.DENY]


def test_check_now_without_waiting_leaves_a_busy_check_to_its_thread(policy_dir: Path) -> None:
    write(policy_dir / "90-default.yaml", ALLOW)
    inside = threading.Event()
    release = threading.Event()

    def slow_loader(directory: Path) -> Policy:
        inside.set()
        assert release.wait(TIMEOUT_S)
        return load_policy_dir(directory)

    watcher = PolicyWatcher(policy_dir, loader=slow_loader)
    busy = threading.Thread(target=watcher.check_now)
    busy.start()
    try:
        assert inside.wait(TIMEOUT_S)
        # Another thread holds the check: an event loop is not held up by it.
        assert watcher.check_now(wait=False) is False
    finally:
        release.set()
        busy.join()
    assert playback(watcher.policy) is Access.ALLOW
    write(policy_dir / "90-default.yaml", DENY)
    assert watcher.check_now(wait=False) is True, "free, it checks like check_now()"


def test_context_manager_stops_the_thread(policy_dir: Path) -> None:
    write(policy_dir / "90-default.yaml", ALLOW)
    with PolicyWatcher(policy_dir, interval=0.05) as watcher:
        assert playback(watcher.policy) is Access.ALLOW
        thread = watcher._thread
        assert thread is not None and thread.is_alive()
    assert not thread.is_alive()
