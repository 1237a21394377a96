"""Reading spec files: a YAML loader that refuses what a spec never needs, then validation.

Spec files may come from anywhere, so the loader bounds what it reads before parsing: the file's
size, its encoding, nesting depth, anchors and aliases (an alias bomb expands a few hundred bytes
into billions of nodes), keys that are not names. Everything it refuses is a SpecError naming the
file and the line.
"""
from __future__ import annotations

import codecs
import errno
from pathlib import Path
from typing import Any

import yaml

from .dsa_spec import DSASpec
from .resources import shipped_spec_path
from .spec import FAMILIES, Spec, SpecError, short_path, short_repr, short_text


MAX_SPEC_BYTES = 64 * 1024     # a spec is a few hundred bytes; refuse anything this large unread
MAX_YAML_DEPTH = 16            # a spec nests two levels (root, section); refuse deep documents
MAX_INT_DIGITS = 64            # longer integer literals are refused before int() reads them


class _Refused(yaml.MarkedYAMLError):
    """Well-formed YAML that a spec may not use (an alias, deep nesting, a key that is no name)."""

    def __init__(self, problem: str, mark: yaml.Mark):
        super().__init__(problem=problem, problem_mark=mark)


class _SpecLoader(yaml.SafeLoader):
    """A safe loader for spec files: no anchors or aliases (an alias bomb expands a few hundred
    bytes into billions of nodes), nesting at most MAX_YAML_DEPTH deep, keys that are names and
    given once (YAML would keep the last of a duplicate), no integer literal too long to read."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused("anchors and aliases (&name, *name) are not allowed in a spec",
                           event.start_mark)
        if self._depth >= MAX_YAML_DEPTH:
            raise _Refused(f"the document is nested deeper than {MAX_YAML_DEPTH} levels",
                           event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, (yaml.SequenceNode, yaml.MappingNode)):
                kind = "list" if isinstance(key_node, yaml.SequenceNode) else "mapping"
                raise _Refused(f"a {kind} key is not a name; keys are names such as 'window'",
                               key_node.start_mark)
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):
                raise _Refused(f"key {short_repr(key)} is not a name; keys are names such as "
                               "'window'", key_node.start_mark)
            if key in seen:
                raise _Refused(f"key {short_repr(key)} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        if len(node.value) > MAX_INT_DIGITS:
            raise _Refused(f"an integer of {len(node.value)} characters is too long "
                           f"(at most {MAX_INT_DIGITS})", node.start_mark)
        return super().construct_yaml_int(node)


_SpecLoader.add_constructor("tag:yaml.org,2002:int", _SpecLoader.construct_yaml_int)


def _yaml_error(path: str, err: yaml.YAMLError) -> SpecError:
    mark = getattr(err, "problem_mark", None)
    if mark is not None:
        where = f"line {mark.line + 1}, column {mark.column + 1}"
    elif isinstance(err, yaml.reader.ReaderError):
        where = f"character {err.position + 1}"
    else:
        where = "?"
    if isinstance(err, yaml.reader.ReaderError):
        problem = f"character {err.character!r} is not allowed in YAML"
    else:
        problem = short_text(getattr(err, "problem", None) or str(err), 160)
    rule = problem if isinstance(err, _Refused) else f"malformed YAML: {problem}"
    return SpecError(path, f"<yaml {where}>", None, rule)


_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
         (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))


def _read_spec_text(p: Path) -> str:
    """The text of a spec file: at most MAX_SPEC_BYTES of UTF-8 (a UTF-8 byte-order mark is
    dropped). Every way the file can be unreadable is a SpecError naming it."""
    source = str(p)
    if p.is_dir():
        raise SpecError(source, "<file>", None, "is a directory, not a spec file")
    try:
        with p.open("rb") as f:
            data = f.read(MAX_SPEC_BYTES + 1)
    except OSError as err:
        raise SpecError(source, "<file>", None, f"cannot be read: {err.strerror or err}") from None
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(source, "<file>", None, f"is larger than {MAX_SPEC_BYTES // 1024} KiB; "
                                                "a spec is a few lines of YAML")
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            raise SpecError(source, "<file>", None,
                            f"is {encoding} text; save the spec as UTF-8")
    if b"\0" in data:
        raise SpecError(source, "<file>", None,
                        "holds NUL bytes (binary data, or UTF-16 text); a spec is UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise SpecError(source, "<file>", None,
                        f"is not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); "
                        "save the spec as UTF-8") from None


def load_spec(path: str | Path) -> Spec | DSASpec:
    """Load and validate a YAML spec file, of either family (`attention: nsa`, the default, or
    `attention: dsa`). Also accepts the name of a shipped spec (e.g. 'nsa-paper')."""
    p = Path(path)
    try:
        exists = p.exists()
    except (OSError, ValueError) as err:       # ValueError: a NUL in the path
        if getattr(err, "errno", None) != errno.ENAMETOOLONG:
            reason = getattr(err, "strerror", None) or str(err)
            raise SpecError(str(p), "<file>", None, f"cannot be read: {reason}") from None
        exists = False                         # too long a name is no file: maybe a shipped one
    if not exists:
        shipped = shipped_spec_path(str(path))
        if shipped is None:
            raise FileNotFoundError(f"spec file not found: {short_path(path)}")
        p = shipped
    text = _read_spec_text(p)
    try:
        data = yaml.load(text, Loader=_SpecLoader)
    except yaml.YAMLError as err:
        raise _yaml_error(str(p), err) from None
    if data is None:
        raise SpecError(str(p), "<root>", None, "the file is empty")
    return spec_from_dict(data, source=str(p))


def spec_from_dict(d: Any, source: str = "<dict>") -> Spec | DSASpec:
    """A spec of the family its `attention` key names (nsa when absent)."""
    family = d.get("attention", "nsa") if isinstance(d, dict) else "nsa"
    if family not in FAMILIES:
        raise SpecError(source, "attention", family, f"choose from {', '.join(FAMILIES)}")
    return (DSASpec if family == "dsa" else Spec).from_dict(d, source=source)
