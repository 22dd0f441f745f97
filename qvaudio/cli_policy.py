"""`qvaudio policy check|show|set`: the policy engine's command line.

`qvaudio.cli` calls `add_policy_parser(subparsers)`; every handler takes the
parsed Namespace and returns the exit code. `python -m qvaudio.cli_policy
check|show|set ...` runs the same handlers without the main CLI.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from qvaudio.core.policy import SETTINGS, Policy, VmIdentity, resolve, shadowed_rules
from qvaudio.core.policy_parser import PolicyLoadError
from qvaudio.dom0.policy_edit import PolicyEditError, set_vm_setting
from qvaudio.dom0.policy_loader import (
    POLICY_DIR_DEFAULT_HELP,
    default_policy_dir,
    load_policy_dir,
    load_policy_paths,
)

if TYPE_CHECKING:
    # argparse's subparsers type is private and only generic in the stubs.
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]


def _refused(exc: PolicyLoadError, why: str = "") -> int:
    """Every problem as file:line: message on stderr, then `why`; the exit status, 1."""
    for problem in exc.problems:
        print(problem, file=sys.stderr)
    if why:
        print(why, file=sys.stderr)
    return 1


def _warn_shadowed(policy: Policy) -> None:
    for rule, earlier in shadowed_rules(policy):
        by = ", ".join(str(e.origin) for e in earlier)
        print(
            f"{rule.origin}: warning: rule for {rule.vm.pattern!r} never decides anything: "
            f"{', '.join(sorted(rule.sets()))} already set for it by {by} "
            "(files are read in name order: name per-VM files 30-<vm>.yaml so they sort "
            "before 90-default.yaml)",
            file=sys.stderr,
        )


def cmd_check(args: argparse.Namespace) -> int:
    """Exit 0 if the files load, else 1 with `file:line: message` lines on stderr."""
    paths: list[Path] = list(args.paths) or [default_policy_dir()]
    try:
        policy = load_policy_paths(paths, strict=not args.no_strict)
    except PolicyLoadError as exc:
        return _refused(exc)
    _warn_shadowed(policy)
    print(f"OK: {len(policy.files)} files, {len(policy.rules)} rules")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """Print every setting for a VM and the file:line that decided it."""
    directory: Path = args.policy_dir or default_policy_dir()
    tags = frozenset(t.strip() for t in (args.tags or "").split(",") if t.strip())
    try:
        policy = load_policy_dir(directory, strict=not args.no_strict)
    except PolicyLoadError as exc:
        return _refused(
            exc,
            f"the policy in {directory} is invalid: a starting agent denies all audio, "
            "a running one keeps its last good policy",
        )
    vm = VmIdentity(args.vm, tags)
    settings = resolve(policy, vm)
    print(f"vm: {vm.name}" + (f" (tags: {', '.join(sorted(tags))})" if tags else ""))
    print(f"policy: {directory} ({len(policy.files)} files, {len(policy.rules)} rules)")
    for name, value, source in settings.rows():
        print(f"  {name:<24}{value:<22}{source}")
    if settings.matched:
        print("matching rules: " + ", ".join(str(o) for o in settings.matched))
    else:
        print("no rule matches this VM: playback and capture are denied")
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    """Set one setting in the VM's own file; exit 1 (writing nothing) if refused."""
    directory: Path = args.policy_dir or default_policy_dir()
    try:
        path = set_vm_setting(directory, args.vm, args.key, args.value, strict=not args.no_strict)
    except PolicyEditError as exc:
        print(f"policy set: {exc}", file=sys.stderr)
        return 1
    except PolicyLoadError as exc:
        return _refused(exc, "policy set: nothing was written")
    except OSError as exc:
        print(f"policy set: {exc}", file=sys.stderr)
        return 1
    print(f"{path}: {args.key} set for {args.vm}")
    # The write succeeded; now say whether it will actually be what the agent uses.
    try:
        policy = load_policy_dir(directory, strict=not args.no_strict)
    except PolicyLoadError as exc:
        # Written, and valid on its own, but not in force: the command did
        # not do what it was asked, so it fails, naming what stands in the way.
        return _refused(
            exc,
            f"policy set: {path} was written, but the agent refuses the policy in {directory} "
            "as a whole (above) and keeps its last good policy until that is fixed",
        )
    decided = resolve(policy, VmIdentity(args.vm)).setting(args.key)
    if decided.origin is None or decided.origin.file != str(path):
        print(
            f"warning: {args.key} for {args.vm} is still decided by {decided.source}, "
            "which comes first; see docs/policy.md on file order",
            file=sys.stderr,
        )
    return 0


def _add_commands(sub: SubParsers) -> None:
    check = sub.add_parser(
        "check",
        help="validate policy files",
        description="Load policy files exactly as the dom0 agent would. Exit 0 if they are "
        "valid, 1 with file:line: message lines on stderr otherwise.",
    )
    check.add_argument("paths", nargs="*", type=Path, metavar="PATH", help="files or directories")
    check.set_defaults(func=cmd_check)

    show = sub.add_parser(
        "show",
        help="show what the policy decides for a VM",
        description="Print each setting for VM and the file:line of the rule that set it.",
    )
    show.add_argument("vm", metavar="VM")
    show.add_argument("--tags", default="", help="comma-separated tags the VM has")
    show.set_defaults(func=cmd_show)

    set_ = sub.add_parser(
        "set",
        help="change one setting in a VM's own policy file",
        description="Edit <policy-dir>/30-VM.yaml (created if absent), keeping its comments, "
        "validating the result and replacing the file atomically.",
    )
    set_.add_argument("vm", metavar="VM")
    set_.add_argument("key", metavar="KEY", choices=SETTINGS, help=", ".join(SETTINGS))
    set_.add_argument("value", metavar="VALUE")
    set_.set_defaults(func=cmd_set)

    for command in (check, show, set_):
        command.add_argument(
            "--no-strict",
            action="store_true",
            help="skip the ownership and permission checks (for drafts; the agent never skips)",
        )
    for command in (show, set_):
        command.add_argument(
            "--policy-dir",
            type=Path,
            default=None,
            help=f"policy directory (default: {POLICY_DIR_DEFAULT_HELP})",
        )


def add_policy_parser(subparsers: SubParsers) -> argparse.ArgumentParser:
    """Register `policy check|show|set` under the main CLI's subcommands."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "policy",
        help="check, inspect and edit the per-VM audio policy",
        description="Per-VM audio policy (see docs/policy.md).",
    )
    _add_commands(parser.add_subparsers(dest="policy_command", required=True, metavar="COMMAND"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qvaudio.cli_policy")
    _add_commands(parser.add_subparsers(dest="policy_command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
