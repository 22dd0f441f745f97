"""The one way tests wait for something: poll a condition under a wide ceiling.

A timeout here is a correctness bound ("this happens within 10 s"), never a
performance figure: on a loaded 2-core machine things take longer, so bounds
are generous and the poll returns as soon as the condition holds. Figures
belong to bench/.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: The default ceiling: long enough for a loaded machine, short enough to fail.
DEFAULT_TIMEOUT_S = 10.0


class WaitTimeout(AssertionError):
    """The condition did not hold in time (an AssertionError, so pytest shows it as a failure)."""


def wait_until(
    check: Callable[[], T | None],
    what: str,
    timeout: float = DEFAULT_TIMEOUT_S,
    *,
    interval: float = 0.02,
    context: Callable[[], str] | None = None,
) -> T:
    """Call `check` until it returns something truthy, and return that.

    Fails with "timed out after N s waiting for <what>" (plus `context()`,
    such as a daemon's log, when given). `check` may raise AssertionError to
    fail at once, for a state from which the condition can never come.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            detail = f"\n{context()}" if context is not None else ""
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what}{detail}")
        time.sleep(interval)
