"""The layout and import rules in docs/architecture.md, checked on the source.

Every module lives in a folder that says what it is (or is one of the few
top-level entry points), and the folders' rules hold for every import,
relative ones and those inside functions included: nothing in `core/`
imports outside `core/` or does I/O; the shells both agents share import
neither side; the guest side never imports dom0's modules or the policy. A
rule broken here is a design change: update docs/architecture.md with it,
or move the code.
"""

from __future__ import annotations

import ast
import importlib
import re
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qvaudio"
DOC = PACKAGE.parent / "docs" / "architecture.md"

#: Each folder of the package and what lives there (docs/architecture.md says it in one line).
FOLDERS = {
    "core": "pure: every decision, on bytes, snapshots and time passed in",
    "transport": "the byte streams between the agents: vchan, vsock, Unix sockets, qrexec",
    "pulse": "the audio servers: PCM streams, devices, private daemons",
    "common": "shells both agents use: config, logging, notifications, systemd",
    "guest": "the guest agent's shell around GuestSession",
    "dom0": "the dom0 agent's shell around every VmSession",
    "demo": "`qvaudio demo`: both agents and two private audio servers",
}
#: What stays at the top: the commands people run (each has a `main`), and
#: vchan.py, whose path the design fixes.
ENTRY_POINTS = {"agent_guest", "agent_dom0", "cli", "cli_policy", "qrexec_admin"}
TOP_LEVEL = {"__init__", "vchan", *ENTRY_POINTS}

#: Standard modules that do I/O, read clocks, or start threads.
IO_MODULES = {
    "os", "socket", "subprocess", "threading", "selectors", "select", "pathlib", "shutil",
    "time", "signal", "io", "tempfile", "asyncio", "queue", "ctypes", "fcntl", "mmap",
}  # fmt: skip
#: Third-party modules that talk to the outside world.
IO_PACKAGES = {"cffi", "pulsectl", "pyxs"}
#: The core's modules that are dom0's alone (what a VM may do, who a VM is):
#: these, and every core module named dom0_*.
DOM0_CORE = {"qvaudio.core.policy", "qvaudio.core.policy_parser", "qvaudio.core.domains"}


def dom0_core(name: str) -> bool:
    return name in DOM0_CORE or name.startswith("qvaudio.core.dom0_")


#: The shells both agents share, which may import neither side.
SHARED = ("qvaudio.transport", "qvaudio.pulse", "qvaudio.common", "qvaudio.vchan")


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    return {_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def resolve_imports(source: str, module: str, *, package: bool = False) -> frozenset[str]:
    """Absolute names of what `source` (module `module`) imports, relative imports resolved.

    `from qvaudio.core import tone` imports the module `qvaudio.core.tone`;
    `from x import y` otherwise imports from the module `x`.
    """
    home = module if package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = home.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in modules() else base)
    return frozenset(found)


@cache
def imports_of(module: str) -> frozenset[str]:
    path = modules()[module]
    return resolve_imports(path.read_text(), module, package=path.name == "__init__.py")


def own_imports(module: str) -> set[str]:
    return {name for name in imports_of(module) if _within(name, "qvaudio")}


def side(module: str) -> str:
    """The folder a module belongs to, or what a top-level module is."""
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    if parts[1] in FOLDERS:
        return parts[1]
    return parts[1] if parts[1] in TOP_LEVEL else "unclassified"


# -- every module has its place ----------------------------------------------------------


def test_every_module_lives_in_a_folder_or_is_an_entry_point() -> None:
    loose = sorted(m for m in modules() if side(m) == "unclassified")
    assert loose == [], (
        f"modules outside the folders of docs/architecture.md: {loose}; "
        f"a module belongs in one of {sorted(FOLDERS)} (or is a new entry point)"
    )
    for folder in FOLDERS:
        assert (PACKAGE / folder / "__init__.py").is_file(), f"{folder}/ is not a package"
    for name in ENTRY_POINTS:
        source = (PACKAGE / f"{name}.py").read_text()
        assert "def main(" in source and '__name__ == "__main__"' in source, name


def test_the_doc_opens_with_the_tree_and_each_folder_job() -> None:
    doc = DOC.read_text()
    tree = doc[: doc.index("\n## ")]
    for folder in FOLDERS:
        assert re.search(rf"^[│├└─ ]*{folder}/ +\S", tree, re.M), f"{folder}/ not in the tree"
    for name in TOP_LEVEL - {"__init__"}:
        assert re.search(rf"^[│├└─ ]*{name}\.py +\S", tree, re.M), f"{name}.py not in the tree"


@pytest.mark.parametrize("folder", sorted(FOLDERS))
def test_every_module_is_described_in_its_folder_section(folder: str) -> None:
    doc = DOC.read_text()
    heading = f"### `{folder}/`"
    assert heading in doc, f"docs/architecture.md has no section {heading}"
    section = doc.split(heading, 1)[1].split("\n### ", 1)[0]
    here = [m for m in modules() if _within(m, f"qvaudio.{folder}") and m != f"qvaudio.{folder}"]
    missing = sorted(m for m in here if f"`{m.rsplit('.', 1)[1]}`" not in section)
    assert missing == [], f"modules not described under {heading}: {missing}"


# -- the import rules ------------------------------------------------------------------------

CORE = sorted(m for m in modules() if _within(m, "qvaudio.core"))
GUEST_SIDE = sorted(m for m in modules() if side(m) == "guest" or m == "qvaudio.agent_guest")
SHARED_SHELLS = sorted(m for m in modules() if any(_within(m, s) for s in SHARED))
DOM0_SIDE = sorted(
    m
    for m in modules()
    if side(m) == "dom0" or m in {f"qvaudio.{e}" for e in ENTRY_POINTS - {"agent_guest"}}
)


@pytest.mark.parametrize("module", CORE)
def test_core_imports_only_core_and_no_io(module: str) -> None:
    imported = imports_of(module)
    tops = {name.split(".")[0] for name in imported}
    assert tops & IO_MODULES == set(), "the sans-IO core does no I/O"
    assert tops & IO_PACKAGES == set()
    outside = sorted(n for n in own_imports(module) if not _within(n, "qvaudio.core"))
    assert outside == [], f"core module {module} imports outside core/: {outside}"


@pytest.mark.parametrize("module", GUEST_SIDE)
def test_guest_side_never_imports_dom0_or_the_policy(module: str) -> None:
    forbidden = sorted(
        n
        for n in own_imports(module)
        if side(n) == "dom0" or dom0_core(n) or n in {"qvaudio.agent_dom0", "qvaudio.cli_policy"}
    )
    assert forbidden == [], f"a VM holds no policy: {module} imports {forbidden}"


@pytest.mark.parametrize("module", DOM0_SIDE)
def test_dom0_side_never_imports_the_guest_side(module: str) -> None:
    forbidden = sorted(n for n in own_imports(module) if side(n) == "guest")
    assert forbidden == [], f"{module} imports the guest's shell: {forbidden}"


@pytest.mark.parametrize("module", SHARED_SHELLS)
def test_shared_shells_import_neither_side(module: str) -> None:
    sides = {"guest", "dom0", "demo", *ENTRY_POINTS}
    forbidden = sorted(n for n in own_imports(module) if side(n) in sides)
    assert forbidden == [], f"{module} is shared by both agents but imports {forbidden}"


def test_the_dom0_only_core_modules_exist() -> None:
    # A renamed module must not slip out of the guest side's rule.
    assert sorted(DOM0_CORE - set(modules())) == []


def test_relative_imports_are_resolved() -> None:
    source = "from . import tone\nfrom ..dom0 import host\nfrom .formats import AudioFormat\n"
    assert resolve_imports(source, "qvaudio.core.anything") == {
        "qvaudio.core.tone",
        "qvaudio.dom0.host",
        "qvaudio.core.formats",
    }
    assert resolve_imports("from . import devices\n", "qvaudio.pulse", package=True) == {
        "qvaudio.pulse.devices"
    }


def test_every_public_error_derives_from_qvaudio_error() -> None:
    from qvaudio import QvaudioError

    loose = []
    for name in modules():
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if (
                isinstance(value, type)
                and issubclass(value, Exception)
                and value.__module__ == name
                and not attr.startswith("_")
                and not issubclass(value, QvaudioError)
            ):
                loose.append(f"{name}.{attr}")
    assert loose == [], f"errors that do not derive from QvaudioError: {loose}"
