"""What holds a resource closes it at the end of a `with` block, however the block ends.

One mixin for the streams, listeners, vchans and connections the shells
open: `with Vchan.client(...) as vchan:` closes the vchan on the way out.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Closing:
    """A context manager whose exit is `close()`; `close` must be safe to call twice."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
