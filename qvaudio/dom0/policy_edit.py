"""`qvaudio policy set`: change one setting in a VM's own policy file, atomically.

The file is edited as text, at the spans the YAML parser reports, so comments,
blank lines, quoting and key order the user wrote all survive. The result is
validated with the same loader the agent uses before it replaces the old file
(temp file in the same directory, fsync, rename, fsync the directory), so a
reader sees either the old file or the new one, and never an invalid one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from qvaudio.core.errors import QvaudioError
from qvaudio.core.formats import SampleFormat
from qvaudio.core.policy import SETTINGS, VM_NAME_RE, Rule, SettingKind, setting_named
from qvaudio.core.policy_parser import compose_policy_yaml, parse_policy_text
from qvaudio.core.safe_yaml import MAX_FILE_BYTES
from qvaudio.dom0.policy_loader import directory_problem

#: Per-VM files sort before the shipped 90-default.yaml, so they override it.
VM_FILE_PREFIX = "30-"


class PolicyEditError(QvaudioError):
    """The edit was refused; nothing was written."""


def vm_policy_path(directory: Path, vm: str) -> Path:
    """The file `policy set` edits for `vm`: <dir>/30-<vm>.yaml."""
    if not VM_NAME_RE.fullmatch(vm):
        raise PolicyEditError(
            f"{vm!r} is not a VM name (a letter, then letters, digits, '_', '.', '-'; "
            "for patterns and tags, edit a policy file by hand)"
        )
    return directory / f"{VM_FILE_PREFIX}{vm}.yaml"


def format_value(key: str, value: str) -> str:
    """The YAML text for `value` of setting `key`, or PolicyEditError.

    Strict on purpose: the text is spliced into the file, so it must be one
    plain scalar or flow list, never something that could add keys or rules.
    """
    try:
        setting = setting_named(key)
    except KeyError:
        settable = ", ".join(SETTINGS)
        raise PolicyEditError(f"unknown setting {key!r} (settable: {settable})") from None
    text = value.strip()
    match setting.kind:
        case SettingKind.ACCESS:
            allowed = setting.choices
            if text not in [a.value for a in allowed]:
                choices = ", ".join(a.value for a in allowed)
                raise PolicyEditError(f"{key} must be one of {choices}, got {value!r}")
            return text
        case SettingKind.PERCENT:
            number = text.removesuffix("%").strip()
            if not number.isdigit() or not 0 <= int(number) <= 100:
                raise PolicyEditError(f"{key} must be a percentage from 0 to 100, got {value!r}")
            return str(int(number))
        case SettingKind.CHANNELS:
            if not text.isdigit():
                raise PolicyEditError(f"{key} must be a whole number, got {value!r}")
            return str(int(text))
        case SettingKind.RATES:
            parts = [p.strip() for p in text.split(",")]
            if not all(p.isdigit() for p in parts):
                raise PolicyEditError(
                    f"{key} must be a comma-separated list of rates, got {value!r}"
                )
            return "[" + ", ".join(str(int(p)) for p in parts) + "]"
        case SettingKind.SAMPLE_FORMATS:
            try:
                formats = [SampleFormat.parse(p) for p in text.split(",")]
            except ValueError as exc:
                raise PolicyEditError(f"{key}: {exc}") from None
            return "[" + ", ".join(f.name.lower() for f in formats) + "]"


# --- text surgery ------------------------------------------------------------------


@dataclass
class _Text:
    """The file's text with helpers for line positions; edits rebuild it."""

    text: str
    newline: str

    def line_start(self, line: int) -> int:
        """Index where 0-based `line` starts (len(text) past the end)."""
        index = 0
        for _ in range(line):
            found = self.text.find("\n", index)
            if found < 0:
                return len(self.text)
            index = found + 1
        return index

    def insert_after_line(self, line: int, lines: list[str]) -> str:
        at = self.line_start(line + 1)
        head = self.text[:at]
        if head and not head.endswith("\n"):
            head += self.newline
        return head + "".join(s + self.newline for s in lines) + self.text[at:]

    def replace(self, node: yaml.Node, new: str) -> str:
        return self.text[: node.start_mark.index] + new + self.text[node.end_mark.index :]


def _last_line(node: yaml.Node) -> int:
    """0-based line of the last character belonging to `node`."""
    if isinstance(node, yaml.MappingNode) and not node.flow_style and node.value:
        return _last_line(node.value[-1][1])
    if isinstance(node, yaml.SequenceNode) and not node.flow_style and node.value:
        return _last_line(node.value[-1])
    end = node.end_mark
    # A mark at column 0 is the start of the following line, not part of the node.
    return end.line - 1 if end.column == 0 and end.line > node.start_mark.line else end.line


def _find(mapping: yaml.MappingNode, key: str) -> tuple[yaml.Node, yaml.Node] | None:
    for key_node, value_node in mapping.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
            return key_node, value_node
    return None


def _refuse_multiline_flow(node: yaml.Node, what: str) -> None:
    if node.start_mark.line != node.end_mark.line:
        raise PolicyEditError(
            f"line {node.start_mark.line + 1}: {what} is a flow mapping over several lines; "
            "edit it by hand"
        )


def _flow_mapping(source: str, node: yaml.MappingNode, key: str, value: str) -> str:
    """Re-emit a one-line {k: v, ...} with `key` set, keeping the other texts as written."""
    pairs: list[str] = []
    done = False
    for key_node, value_node in node.value:
        span = source[value_node.start_mark.index : value_node.end_mark.index]
        if key_node.value == key:
            span, done = value, True
        pairs.append(f"{key_node.value}: {span}")
    if not done:
        pairs.append(f"{key}: {value}")
    return "{" + ", ".join(pairs) + "}"


def _set_in_mapping(doc: _Text, mapping: yaml.MappingNode, path: list[str], value: str) -> str:
    key = path[0]
    if mapping.flow_style:
        _refuse_multiline_flow(mapping, "the mapping")
        if len(path) == 1:
            return doc.replace(mapping, _flow_mapping(doc.text, mapping, key, value))
        raise PolicyEditError(
            f"line {mapping.start_mark.line + 1}: the rule is a flow mapping; edit it by hand"
        )
    found = _find(mapping, key)
    if found is None:
        indent = " " * mapping.value[0][0].start_mark.column
        if len(path) == 1:
            lines = [f"{indent}{key}: {value}"]
        else:
            lines = [f"{indent}{key}:", f"{indent}  {path[1]}: {value}"]
        return doc.insert_after_line(_last_line(mapping), lines)
    _key_node, value_node = found
    if len(path) > 1:
        if not isinstance(value_node, yaml.MappingNode):
            raise PolicyEditError(f"line {value_node.start_mark.line + 1}: {key} is not a mapping")
        return _set_in_mapping(doc, value_node, path[1:], value)
    if isinstance(value_node, yaml.CollectionNode) and not value_node.flow_style:
        raise PolicyEditError(
            f"line {value_node.start_mark.line + 1}: {key} is a block list; "
            f"write it as [a, b] or edit it by hand"
        )
    return doc.replace(value_node, value)


def _quote_vm(vm: str) -> str:
    """`vm` as a YAML scalar that reads back as that string (e.g. a VM named `null`)."""
    node = yaml.compose(vm, Loader=yaml.SafeLoader)
    tag = node.tag if node is not None else ""
    return vm if tag == "tag:yaml.org,2002:str" else f"'{vm}'"


def _new_rule_lines(vm: str, path: list[str], value: str, dash: str, gap: int) -> list[str]:
    pad = dash + " " * gap
    lines = [f"{dash}-{' ' * (gap - 1)}vm: {_quote_vm(vm)}"]
    if len(path) == 1:
        lines.append(f"{pad}{path[0]}: {value}")
    else:
        lines += [f"{pad}{path[0]}:", f"{pad}  {path[1]}: {value}"]
    return lines


def edit_policy_text(text: str, file: str, vm: str, key: str, value: str) -> str:
    """`text` with `key` set to the YAML `value` in the first rule for exactly `vm`.

    Adds the key to that rule, or a new rule at the end of the rules list, or a
    rules list at the end of the file. Everything else is left as written.
    """
    bom = "\ufeff" if text.startswith("\ufeff") else ""
    doc = _Text(text.removeprefix(bom), "\r\n" if "\r\n" in text else "\n")
    path = key.split(".")
    root = compose_policy_yaml(doc.text.encode(), file)
    if root is None:
        lines = ["rules:", *_new_rule_lines(vm, path, value, "  ", 2)]
        return bom + doc.insert_after_line(doc.text.count("\n") + 1, lines)
    if not isinstance(root, yaml.MappingNode) or root.flow_style:
        raise PolicyEditError(f"{file}: the file is not a block mapping; edit it by hand")
    found = _find(root, "rules")
    if found is None:
        raise PolicyEditError(f"{file}: the file has no rules list; edit it by hand")
    rules_key, rules = found
    if isinstance(rules, yaml.ScalarNode):  # `rules:` with nothing after it
        lines = _new_rule_lines(vm, path, value, "  ", 2)
        return bom + doc.insert_after_line(rules_key.start_mark.line, lines)
    if not isinstance(rules, yaml.SequenceNode) or rules.flow_style:
        raise PolicyEditError(f"{file}: the rules list is in flow style; edit it by hand")
    for item in rules.value:
        vm_entry = _find(item, "vm") if isinstance(item, yaml.MappingNode) else None
        if vm_entry is not None and vm_entry[1].value == vm:
            return bom + _set_in_mapping(doc, item, path, value)
    first = rules.value[0]
    dash_col = rules.start_mark.column
    gap = (
        first.start_mark.column - dash_col if first.start_mark.line == rules.start_mark.line else 2
    )
    lines = _new_rule_lines(vm, path, value, " " * dash_col, max(gap, 2))
    return bom + doc.insert_after_line(_last_line(rules), lines)


# --- the file operation ------------------------------------------------------------


def _setting(rule: Rule, key: str) -> object:
    return getattr(rule, setting_named(key).field)


def _check_result(data: bytes, file: str, vm: str, key: str, value: str) -> None:
    """Validate like the agent would, and confirm the edit says what was asked."""
    rules = parse_policy_text(data, file)
    wanted_rules = parse_policy_text(
        edit_policy_text("", file, vm, key, value).encode(), "(expected)"
    )
    mine = next((r for r in rules if r.vm.pattern == vm), None)
    if mine is None or _setting(mine, key) != _setting(wanted_rules[0], key):
        raise PolicyEditError(f"{file}: internal error: the edit did not set {key} for {vm}")


def _new_file_header(vm: str) -> bytes:
    return (
        f"# Audio policy for the VM {vm!r}, created by `qvaudio policy set`.\n"
        "# Edit freely: `policy set` keeps comments and other rules.\n"
        "# Rules here come before 90-default.yaml, so they override it.\n"
    ).encode()


@contextlib.contextmanager
def _locked_dir(directory: Path) -> Iterator[int]:
    """The directory's fd, flock'ed so concurrent `policy set` runs take turns."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def _atomic_replace(path: Path, data: bytes, mode: int, dir_fd: int) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    # The rename is only durable once the directory entry is on disk.
    os.fsync(dir_fd)


def set_vm_setting(directory: Path, vm: str, key: str, value: str, *, strict: bool = True) -> Path:
    """Set `key` (e.g. `capture`, `volume.max`) to `value` in <dir>/30-<vm>.yaml.

    Creates the file if needed. Raises PolicyEditError, or PolicyLoadError when
    the existing file or the result would not load; nothing is written then.
    With `strict` (as the agent always is), a directory the loader refuses
    (owner, group- or world-writable) is refused here too. Returns the path
    written.
    """
    path = vm_policy_path(directory, vm)
    value_yaml = format_value(key, value)
    file = str(path)
    if strict:
        why = directory_problem(directory)
        if why is not None:
            raise PolicyEditError(
                f"{directory}: {why}; the agent reads no file in it, so nothing was written"
            )
    with _locked_dir(directory) as dir_fd:
        try:
            with open(path, "rb") as handle:
                old = handle.read(MAX_FILE_BYTES + 1)
                mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode) & ~0o022
        except FileNotFoundError:
            old, mode = _new_file_header(vm), 0o644
        parse_policy_text(old, file)  # refuse to build on a file the agent rejects
        # parse_policy_text has just proved it is UTF-8.
        new = edit_policy_text(old.decode("utf-8"), file, vm, key, value_yaml).encode("utf-8")
        _check_result(new, file, vm, key, value_yaml)
        _atomic_replace(path, new, mode, dir_fd)
    return path
