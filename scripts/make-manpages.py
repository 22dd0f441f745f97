#!/usr/bin/env python3
"""Write man pages for qvaudio, qvaudio-dom0 and qvaudio-guest from their argparse parsers.

usage: make-manpages.py --outdir DIR

The options and commands come from the parsers themselves, so a page cannot
drift from `--help`; only the FILES/ENVIRONMENT/SEE ALSO notes are written
here. The RPM build runs this against the package it just installed (with
PYTHONPATH pointing at it). Standard library only: argparse-manpage would add
a build dependency for what is a walk over `parser._actions`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from qvaudio import __version__
from qvaudio.agent_dom0 import build_parser as build_dom0_parser
from qvaudio.agent_guest import build_parser as build_guest_parser
from qvaudio.cli import build_parser as build_cli_parser

CONFIG = "/etc/qvaudio/qvaudio.yaml"
POLICY_DIR = "/etc/qvaudio/policy.d"


@dataclass(frozen=True)
class Page:
    name: str
    build: Callable[[], argparse.ArgumentParser]
    summary: str
    files: list[tuple[str, str]] = field(default_factory=list)
    environment: list[tuple[str, str]] = field(default_factory=list)
    see_also: list[str] = field(default_factory=list)


PAGES = [
    Page(
        "qvaudio",
        build_cli_parser,
        "per-VM audio status, microphone and policy",
        files=[
            (CONFIG, "main configuration, checked by qvaudio config check"),
            (POLICY_DIR, "per-VM policy files, read in name order"),
        ],
        environment=[
            ("XDG_RUNTIME_DIR", "holds the dom0 agent's control socket, qvaudio/control.sock"),
            ("QVAUDIO_CONFIG", "main configuration file instead of " + CONFIG),
            ("QVAUDIO_POLICY_DIR", "policy directory instead of " + POLICY_DIR),
        ],
        see_also=["qvaudio-dom0(1)", "qvaudio-guest(1)"],
    ),
    Page(
        "qvaudio-dom0",
        build_dom0_parser,
        "serve every VM's audio from dom0 under per-VM policy",
        files=[
            (CONFIG, "main configuration (the dom0 section)"),
            (POLICY_DIR, "per-VM policy; edits take effect when saved"),
            ("/usr/lib/systemd/user/qvaudio-dom0.service", "the systemd user unit"),
        ],
        environment=[
            ("QVAUDIO_CONFIG", "main configuration file instead of " + CONFIG),
            ("QVAUDIO_POLICY_DIR", "policy directory instead of " + POLICY_DIR),
            ("XDG_RUNTIME_DIR", "holds the control socket, qvaudio/control.sock"),
        ],
        see_also=["qvaudio(1)", "qvaudio-guest(1)"],
    ),
    Page(
        "qvaudio-guest",
        build_guest_parser,
        "carry a VM's audio to dom0 and dom0's microphone back",
        files=[
            (CONFIG, "main configuration (the guest section)"),
            ("/usr/lib/systemd/user/qvaudio-guest.service", "the systemd user unit"),
        ],
        environment=[("QVAUDIO_CONFIG", "main configuration file instead of " + CONFIG)],
        see_also=["qvaudio(1)", "qvaudio-dom0(1)"],
    ),
]


def roff(text: str) -> str:
    """Text safe in a roff line: backslashes, hyphens, and a leading control character."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if not action.help or action.help == argparse.SUPPRESS:
        return ""
    # The parser's own formatter expands %(default)s and friends like --help does.
    return parser._get_formatter()._expand_help(action)


def _invocation(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    return parser._get_formatter()._format_action_invocation(action)


def _subcommands(
    parser: argparse.ArgumentParser,
) -> Iterator[tuple[str, str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, helps.get(name, ""), sub


def _options(parser: argparse.ArgumentParser) -> list[str]:
    lines: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
            continue
        lines += [".TP", "\\fB" + roff(_invocation(parser, action)) + "\\fR"]
        lines.append(roff(_help(parser, action)) or "\\&")
    return lines


def _usage(parser: argparse.ArgumentParser) -> str:
    return " ".join(parser.format_usage().removeprefix("usage:").split())


def _commands(parser: argparse.ArgumentParser, prefix: str) -> list[str]:
    lines: list[str] = []
    for name, help_text, sub in _subcommands(parser):
        full = f"{prefix} {name}"
        lines += [".SS " + roff(full), roff(help_text) if help_text else "\\&"]
        if sub.description and sub.description != help_text:
            lines += [".PP", roff(sub.description)]
        lines += [".PP", "\\fB" + roff(_usage(sub)) + "\\fR", ".RS"]
        lines += _options(sub)
        lines.append(".RE")
        lines += _commands(sub, full)
    return lines


def render(page: Page, date: str) -> str:
    parser = page.build()
    lines = [
        f'.TH "{page.name.upper()}" "1" "{date}" "qvaudio {__version__}" "qvaudio manual"',
        ".SH NAME",
        f"{roff(page.name)} \\- {roff(page.summary)}",
        ".SH SYNOPSIS",
        roff(_usage(parser)),
    ]
    if parser.description:
        lines += [".SH DESCRIPTION", roff(parser.description)]
    lines += [".SH OPTIONS", *_options(parser)]
    commands = _commands(parser, page.name)
    if commands:
        lines += [".SH COMMANDS", *commands]
    for title, rows in (("FILES", page.files), ("ENVIRONMENT", page.environment)):
        if rows:
            lines.append(".SH " + title)
            for name, text in rows:
                lines += [".TP", "\\fI" + roff(name) + "\\fR", roff(text)]
    if page.see_also:
        refs = [ref.partition("(") for ref in page.see_also]
        lines += [".SH SEE ALSO", ",\n".join(f"\\fB{roff(n)}\\fR({s}" for n, _, s in refs)]
    return "\n".join(lines) + "\n"


def build_date() -> str:
    # SOURCE_DATE_EPOCH (set by rpmbuild) keeps rebuilt packages identical.
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = (
        datetime.datetime.fromtimestamp(int(epoch), datetime.UTC)
        if epoch and epoch.isdigit()
        else datetime.datetime.now(datetime.UTC)
    )
    return when.strftime("%Y-%m-%d")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write qvaudio's man pages (section 1).")
    parser.add_argument("--outdir", type=Path, required=True, help="directory for NAME.1 files")
    args = parser.parse_args(argv)
    # The parsers' help states how defaults are found, never a path worked
    # out on this machine (tests/test_manpages.py checks); clearing the
    # variables also keeps anything computed from them out of the pages.
    for name in ("QVAUDIO_CONFIG", "QVAUDIO_POLICY_DIR"):
        os.environ.pop(name, None)
    args.outdir.mkdir(parents=True, exist_ok=True)
    date = build_date()
    for page in PAGES:
        path = args.outdir / f"{page.name}.1"
        path.write_text(render(page, date), encoding="utf-8")
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
