"""Optional dependencies: which extra brings each one, and one line when one is missing.

`pip install qvaudio` gives everything the guest needs. numpy is dom0's
alone (its volume caps, `qvaudio.core.gain`): every VM runs a guest agent, and
none of them should carry numpy for nothing. Modules import optional
packages where they use them, never at the top, so that every command's
`--help` and `--version` work without them; a command that does need one
calls `require` first and, if it is missing, ends with a single line that
says what to install instead of a traceback.
"""

from __future__ import annotations

import importlib
from typing import Final, NamedTuple


class Extra(NamedTuple):
    #: The pyproject extra that brings it: pip install 'qvaudio[EXTRA]'.
    extra: str
    #: The distributions' package for it.
    package: str
    #: What it is needed for.
    purpose: str


OPTIONAL: Final = {
    "numpy": Extra("dom0", "python3-numpy", "volume caps on every VM's audio"),
}


def missing_message(prog: str, module: str) -> str:
    """The one line that says `module` is missing, and how to install it."""
    about = OPTIONAL[module]
    return (
        f"{prog}: needs {module} ({about.purpose}), which is not installed: "
        f"pip install 'qvaudio[{about.extra}]', or install {about.package}"
    )


def require(prog: str, *modules: str) -> None:
    """Exit with `missing_message` (status 1) unless every one of `modules` imports."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise  # the package is there but broken: its own traceback says more
            raise SystemExit(missing_message(prog, module)) from None
