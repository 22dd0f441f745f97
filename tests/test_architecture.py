"""The import rules in docs/architecture.md, checked on the source.

The sans-IO core imports no I/O module and no shell; the guest side never
imports the policy engine or dom0's modules. A rule broken here is a design
change: update docs/architecture.md with it, or move the code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qvaudio"

#: Pure code: bytes, events, snapshots and time go in as arguments.
CORE = {
    "formats", "protocol", "connection", "policy", "dom0_session", "guest_session", "actions",
    "gain", "tone", "safe_yaml", "cost",
}  # fmt: skip
#: Standard modules that do I/O, read clocks, or start threads.
IO_MODULES = {
    "os", "socket", "subprocess", "threading", "selectors", "select", "pathlib", "shutil",
    "time", "signal", "io", "tempfile", "asyncio", "queue",
}  # fmt: skip
#: Third-party modules that talk to the outside world.
IO_PACKAGES = {"cffi", "pulsectl", "pyxs"}
GUEST_SIDE = {"agent_guest", "guest_loop", "guest_session", "guest_devices", "guest_outbox",
              "guest_pcm_threads", "guest_status"}  # fmt: skip
GUEST_FORBIDDEN = {
    "policy", "policy_loader", "policy_watch", "policy_edit", "cli_policy",
    "dom0_session", "dom0_host", "dom0_discovery", "agent_dom0", "xenstore",
}  # fmt: skip


def imports_of(module: str) -> set[str]:
    """Top-level names imported by qvaudio/<module>.py ("qvaudio.x" -> "x")."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "qvaudio":
                names = [f"qvaudio.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            found.add(parts[1] if parts[0] == "qvaudio" and len(parts) > 1 else parts[0])
    return found


def test_every_module_is_classified_in_the_doc() -> None:
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    missing = sorted(m for m in modules if f"`{m}`" not in doc)
    assert missing == [], f"modules not described in docs/architecture.md: {missing}"


@pytest.mark.parametrize("module", sorted(CORE))
def test_core_imports_no_io_and_no_shell(module: str) -> None:
    imported = imports_of(module)
    assert imported & IO_MODULES == set(), "the sans-IO core does no I/O"
    assert imported & IO_PACKAGES == set()
    own = {
        name for name in imported if (PACKAGE / f"{name}.py").exists() or (PACKAGE / name).is_dir()
    }
    assert own <= CORE, f"core module {module} imports shell modules {sorted(own - CORE)}"


@pytest.mark.parametrize("module", sorted(GUEST_SIDE))
def test_guest_side_never_imports_policy_or_dom0(module: str) -> None:
    if not (PACKAGE / f"{module}.py").exists():
        pytest.fail(f"{module}.py is listed as guest side but does not exist")
    assert imports_of(module) & GUEST_FORBIDDEN == set()
