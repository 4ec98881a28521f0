"""A reader for block-style YAML: what ``docker stack config`` prints, and deploy/swarm's
prometheus.yml. The test environment has no YAML library (PyYAML is not a dependency), and
``docker stack config`` has no JSON output, so the swarm file checks read its rendered YAML
with this.

Supported: nested mappings and sequences in block style (indentation by spaces), comments,
plain / single-quoted / double-quoted scalars, ``null`` / ``~``, ``true`` / ``false``,
integers, and the empty flow collections ``{}`` and ``[]``. Anything else (flow collections
with content, block scalars ``|`` / ``>``, anchors, tags, several documents, tabs) raises
ValueError naming the line: a check must never pass on a misread file.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["loads"]

_INT = re.compile(r"^[-+]?[0-9]+$")


def _strip_comment(line: str) -> str:
    """The line without a trailing ``# comment`` (a # outside quotes, after a space)."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
            continue
        if ch in "\"'" and (i == 0 or line[i - 1] in " :-[{,"):
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip()
    return line.rstrip()


def _scalar(text: str, where: int) -> Any:
    text = text.strip()
    if text.startswith('"'):
        try:
            return json.loads(text)
        except ValueError:
            raise ValueError(f"line {where}: unsupported double-quoted scalar {text!r}") from None
    if text.startswith("'"):
        if len(text) < 2 or not text.endswith("'"):
            raise ValueError(f"line {where}: unterminated single-quoted scalar")
        return text[1:-1].replace("''", "'")
    if text in ("null", "~", ""):
        return None
    if text == "true":
        return True
    if text == "false":
        return False
    if text == "{}":
        return {}
    if text == "[]":
        return []
    if text[0] in "[{|>&*!%@`":
        raise ValueError(f"line {where}: unsupported YAML ({text[:20]!r}): block style only")
    if _INT.match(text):
        return int(text)
    return text


def _split_key(content: str, where: int) -> tuple[str, str] | None:
    """(key, rest) when ``content`` is ``key: rest`` or ``key:``; None for a plain scalar."""
    if content.startswith('"'):
        end = content.find('"', 1)
        while end > 0 and content[end - 1] == "\\":
            end = content.find('"', end + 1)
        if end < 0:
            raise ValueError(f"line {where}: unterminated quoted key")
        after = content[end + 1 :]
        if after == ":" or after.startswith(": "):
            return json.loads(content[: end + 1]), after[1:].strip()
        return None
    m = re.match(r"^([^\s:#'\"][^:#]*?|'[^']*'):(?:\s+(.*))?$", content)
    if m is None:
        return None
    key = m.group(1)
    if key.startswith("'"):
        key = key[1:-1]
    return key, (m.group(2) or "").strip()


class _Reader:
    def __init__(self, text: str) -> None:
        self.lines: list[tuple[int, int, str]] = []  # (line number, indent, content)
        for n, raw in enumerate(text.splitlines(), 1):
            if "\t" in raw[: len(raw) - len(raw.lstrip())]:
                raise ValueError(f"line {n}: tab in indentation")
            line = _strip_comment(raw)
            if not line.strip():
                continue
            if line.strip() in ("---", "..."):
                if self.lines:
                    raise ValueError(f"line {n}: several documents")
                continue
            self.lines.append((n, len(line) - len(line.lstrip(" ")), line.strip()))
        self.pos = 0

    def block(self, indent: int) -> Any:
        n, ind, content = self.lines[self.pos]
        if ind != indent:
            raise ValueError(f"line {n}: indentation {ind}, expected {indent}")
        if content == "-" or content.startswith("- "):
            return self.sequence(indent)
        return self.mapping(indent)

    def _nested(self, indent: int, n: int, allow_same_seq: bool) -> Any:
        """The value of a ``key:`` / ``-`` with nothing after it: the block below, or null."""
        if self.pos < len(self.lines):
            _, ind, content = self.lines[self.pos]
            if ind > indent:
                return self.block(ind)
            if allow_same_seq and ind == indent and (content == "-" or content.startswith("- ")):
                return self.sequence(indent)
        return None

    def mapping(self, indent: int) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        while self.pos < len(self.lines):
            n, ind, content = self.lines[self.pos]
            if ind < indent:
                break
            if ind > indent:
                raise ValueError(f"line {n}: unexpected indentation")
            if content == "-" or content.startswith("- "):
                break
            kv = _split_key(content, n)
            if kv is None:
                raise ValueError(f"line {n}: expected 'key: value', got {content[:40]!r}")
            key, rest = kv
            if key in out:
                raise ValueError(f"line {n}: duplicate key {key!r}")
            self.pos += 1
            out[key] = _scalar(rest, n) if rest else self._nested(indent, n, True)
        return out

    def sequence(self, indent: int) -> list[Any]:
        out: list[Any] = []
        while self.pos < len(self.lines):
            n, ind, content = self.lines[self.pos]
            if ind != indent or not (content == "-" or content.startswith("- ")):
                if ind > indent:
                    raise ValueError(f"line {n}: unexpected indentation")
                break
            rest = content[1:].strip()
            if not rest:
                self.pos += 1
                out.append(self._nested(indent, n, False))
                continue
            item_indent = indent + (len(content) - len(content[1:].lstrip()))
            if _split_key(rest, n) is not None:
                # "- key: value": a mapping whose first line shares the dash's line
                self.lines[self.pos] = (n, item_indent, rest)
                out.append(self.mapping(item_indent))
            else:
                self.pos += 1
                out.append(_scalar(rest, n))
        return out


def loads(text: str) -> Any:
    """The document in ``text`` (block-style YAML, see the module's docstring)."""
    reader = _Reader(text)
    if not reader.lines:
        return None
    doc = reader.block(reader.lines[0][1])
    if reader.pos != len(reader.lines):
        n = reader.lines[reader.pos][0]
        raise ValueError(f"line {n}: unexpected content after the document")
    return doc
