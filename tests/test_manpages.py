"""scripts/make-manpages.py: every option and command of every parser is in its page."""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qvaudio import __version__
from qvaudio.agent_dom0 import build_parser as dom0_parser
from qvaudio.agent_guest import build_parser as guest_parser
from qvaudio.cli import build_parser as cli_parser

REPO = Path(__file__).resolve().parent.parent
PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "qvaudio": cli_parser,
    "qvaudio-dom0": dom0_parser,
    "qvaudio-guest": guest_parser,
}


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("man")
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make-manpages.py"), "--outdir", str(out)],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin", "SOURCE_DATE_EPOCH": "1790000000"},
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.1" for n in PARSERS)
    return {name: out / f"{name}.1" for name in PARSERS}


def plain(roff: str) -> str:
    """The page's words with roff's escapes undone, enough to search for option names."""
    return roff.replace("\\-", "-").replace("\\e", "\\").replace("\\&", "")


def walk(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.Action]]:
    """(command path, action) for every action of the parser and its subcommands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, action
                for path, inner in walk(sub):
                    yield f"{name} {path}", inner
        else:
            yield "", action


@pytest.mark.parametrize("name", list(PARSERS))
def test_every_option_and_command_is_documented(pages: dict[str, Path], name: str) -> None:
    text = plain(pages[name].read_text())
    seen = 0
    for path, action in walk(PARSERS[name]()):
        if isinstance(action, argparse._SubParsersAction):
            command = f"{name} {path}"
            assert f".SS {command}\n" in text, f"{name}(1) lacks command {command!r}"
            continue
        for option in action.option_strings:
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), (
                f"{name}(1) lacks {path} {option}".replace("  ", " ")
            )
            seen += 1
        if action.help and action.help != argparse.SUPPRESS and "%(" not in action.help:
            assert " ".join(action.help.split()) in " ".join(text.split()), action.help
    assert seen >= 5


def test_pages_have_the_standard_sections(pages: dict[str, Path]) -> None:
    for name, page in pages.items():
        text = page.read_text()
        assert text.startswith(f'.TH "{name.upper()}" "1" "2026-09-21" "qvaudio {__version__}"')
        for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "FILES", "SEE ALSO"):
            assert f"\n.SH {section}\n" in text, f"{name}(1) lacks {section}"
        assert "/etc/qvaudio/qvaudio.yaml" in plain(text)


def test_pages_and_help_name_no_path_of_the_machine_they_were_made_on(
    pages: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without /etc/qvaudio (as here), this checkout is what a computed
    # default would name; an installed page must not.
    for name, page in pages.items():
        assert str(REPO) not in plain(page.read_text()), f"{name}(1) names {REPO}"
    monkeypatch.setenv("QVAUDIO_CONFIG", str(tmp_path / "mine.yaml"))
    monkeypatch.setenv("QVAUDIO_POLICY_DIR", str(tmp_path / "policy.d"))
    for name, build in PARSERS.items():
        for _, action in walk(build()):
            text = action.help or ""
            assert str(REPO) not in text and str(tmp_path) not in text, (name, text)


def test_pages_name_every_transport_a_command_accepts(pages: dict[str, Path]) -> None:
    guest = " ".join(plain(pages["qvaudio-guest"].read_text()).split())
    for form in ("xen:DOMID[:PORT]", "vsock:CID:PORT", "unix:PATH", "qrexec:[TARGET[:SERVICE]]"):
        assert form in guest, form
    dom0 = plain(pages["qvaudio-dom0"].read_text())
    for form in ("'xen'", "'unix:DIR'", "'vsock:NAME=CID,...'", "'qrexec'"):
        assert form in dom0, form


def test_pages_render_without_warnings(pages: dict[str, Path]) -> None:
    groff = shutil.which("groff")
    if groff is None:
        pytest.fail("groff is not installed (man-db depends on it)")
    for name, page in pages.items():
        proc = subprocess.run(
            [groff, "-man", "-Tutf8", "-ww", "-z", str(page)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0 and proc.stderr == "", f"{name}: {proc.stderr}"
        rendered = subprocess.run(
            [groff, "-man", "-Tutf8", str(page)], capture_output=True, text=True, check=True
        ).stdout
        # Undo the terminal's overstrike bold and typographic hyphens.
        rendered = re.sub(".\b", "", rendered).replace("\u2010", "-")
        assert "--help" in rendered


def test_roff_escaping() -> None:
    spec = importlib.util.spec_from_file_location(
        "make_manpages", REPO / "scripts" / "make-manpages.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    assert module.roff(".hidden") == "\\&.hidden"
    assert module.roff("'quoted") == "\\&'quoted"
    assert module.roff("a\\b-c") == "a\\eb\\-c"
