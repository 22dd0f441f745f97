"""Reading policy files into an immutable `Policy`, or saying exactly what's wrong.

The file half of the loader: which directory, which files in it, and
whether they may be trusted. In strict mode (the default, like sshd's
StrictModes) files and the directory must be owned by root or by us and not
writable by group or others; files are capped in size. What the text says is
`qvaudio.core.policy_parser` (pure): the agent, the live reload, `qvaudio
policy check` and `policy set` all load through here.

Any problem in any file rejects the whole policy: a half-read policy could
allow what the broken part meant to deny.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path

from qvaudio.core.policy import Policy, Rule
from qvaudio.core.policy_parser import PolicyLoadError, PolicyProblem, parse_policy_text
from qvaudio.core.safe_yaml import MAX_FILE_BYTES
from qvaudio.core.safe_yaml import Refused as _Refused

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
