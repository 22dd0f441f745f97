"""YAML for files people edit: composed into nodes (with line numbers), never objects.

Shared by the policy loader and the main config loader. PyYAML's SafeLoader
composes the text; anchors, aliases and tags are refused outright (no alias
bombs, no object construction), and size and nesting depth are capped. The
caller interprets the nodes by hand, so every error can name its line.
"""

from __future__ import annotations

import yaml

from qvaudio.core.errors import QvaudioError

MAX_FILE_BYTES = 256 * 1024
MAX_DEPTH = 8


class Refused(QvaudioError):
    """A YAML file we cannot read past: `line` (1-based, or None) and why."""

    def __init__(self, line: int | None, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


class _NodeLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors, aliases and deep nesting while composing."""

    def __init__(self, stream: str, max_depth: int) -> None:
        super().__init__(stream)
        self._depth = 0
        self._max_depth = max_depth

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        # The stubs leave peek_event untyped; it returns the next parser event.
        event: yaml.Event = self.peek_event()  # type: ignore[no-untyped-call]
        line = event.start_mark.line + 1 if event.start_mark is not None else None
        if isinstance(event, yaml.AliasEvent):
            raise Refused(line, f"aliases (*{event.anchor}) are not allowed{_STAR_HINT}")
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            raise Refused(line, f"anchors (&{anchor}) are not allowed")
        tag = getattr(event, "tag", None)
        if tag is not None:
            # Tags are how YAML asks for arbitrary objects; plain data never needs them.
            raise Refused(line, f"YAML tags ({tag}) are not allowed")
        self._depth += 1
        try:
            if self._depth > self._max_depth:
                raise Refused(line, f"nested deeper than {self._max_depth} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_STAR_HINT = "; quote patterns that start with '*', e.g. vm: '*'"
_AT_HINT = "; quote values that start with '@', e.g. vm: '@tag:work'"


def compose(
    data: bytes, *, max_bytes: int = MAX_FILE_BYTES, max_depth: int = MAX_DEPTH
) -> yaml.Node | None:
    """Decode and compose one document into nodes, refusing what plain data never needs."""
    if len(data) > max_bytes:
        raise Refused(None, f"file is larger than {max_bytes} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise Refused(line, "not valid UTF-8") from None
    text = text.removeprefix("\ufeff")
    try:
        # The reader checks for unprintable characters already in the constructor.
        loader = _NodeLoader(text, max_depth)
        try:
            return loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.reader.ReaderError as exc:
        line = text[: exc.position].count("\n") + 1
        char = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise Refused(line, f"character U+{char:04X} is not allowed in YAML") from None
    except yaml.MarkedYAMLError as exc:
        raise _syntax_error(exc) from None


def _syntax_error(exc: yaml.MarkedYAMLError) -> Refused:
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark is not None else None
    parts = [p for p in (exc.context, exc.problem) if p]
    message = "YAML syntax error: " + ", ".join(parts)
    if exc.context == "while scanning an alias":
        message += _STAR_HINT
    elif exc.problem is not None and "'@'" in exc.problem:
        message += _AT_HINT
    return Refused(line, message)
