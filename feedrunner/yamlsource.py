"""YAML to plain data, keeping where every key came from, with ${VAR} interpolation.

PyYAML's constructors forget line numbers, expand alias bombs without limit, and accept duplicate
keys silently. This walker composes the node graph (no construction), then builds plain dicts, lists
and scalars itself with a node budget, a depth limit, duplicate-key detection and a location per path.
Interpolated values are tracked so no message ever prints them.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import yaml

Path = tuple[str | int, ...]

MAX_BYTES = 8 * 1024 * 1024  # a feeds.yaml is kilobytes; anything near this is a mistake
MAX_NODES = 500_000  # after alias expansion
MAX_DEPTH = 64

_VAR = re.compile(r"\$\$|\$\{([^}]*)\}|\$\{")
_PLAIN_TAGS = frozenset(
    f"tag:yaml.org,2002:{t}" for t in ("map", "seq", "str", "int", "float", "bool", "null", "timestamp", "merge")
)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a spec, located in its file."""

    file: str
    line: int  # 1-based; 0 when the problem is the file itself
    column: int
    path: str  # dotted key path, e.g. venues.binance.backoff.cap
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}" if self.line else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"

    def as_dict(self) -> dict[str, object]:
        return {
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "path": self.path,
            "message": self.message,
        }


def format_path(path: Path) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


@dataclass(slots=True)
class Document:
    """Plain data from one YAML file plus what the checks need to point at it."""

    file: str
    data: object
    marks: dict[Path, tuple[int, int]] = field(default_factory=dict)  # 1-based (line, column)
    interpolated: dict[Path, str] = field(default_factory=dict)  # path -> variable names used
    secrets: set[str] = field(default_factory=set)  # interpolated values, scrubbed from any message
    broken: set[Path] = field(default_factory=set)  # paths already reported; later checks stay quiet there

    def locate(self, path: Path) -> tuple[int, int]:
        """Where `path` is, or the nearest enclosing node that exists (a missing key's parent)."""
        p = tuple(path)
        while p and p not in self.marks:
            p = p[:-1]
        return self.marks.get(p, (1, 1))

    def problem(self, path: Path, message: str) -> Problem:
        line, col = self.locate(path)
        return Problem(self.file, line, col, format_path(path), self.scrub(message))

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            if len(secret) >= 4:
                text = text.replace(secret, "***")
        return text


class _Budget(Exception):
    pass


class _Builder:
    def __init__(self, doc: Document, env: Mapping[str, str]) -> None:
        self.doc = doc
        self.env = env
        self.nodes = 0
        self.problems: list[Problem] = []
        self._constructor = yaml.constructor.SafeConstructor()

    def add(self, path: Path, mark: yaml.Mark | None, message: str) -> None:
        self.doc.broken.add(path)
        line, col = (mark.line + 1, mark.column + 1) if mark else self.doc.locate(path)
        self.problems.append(Problem(self.doc.file, line, col, format_path(path), message))

    def build(self, node: yaml.Node, path: Path, depth: int = 0) -> object:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise _Budget(f"the document expands to more than {MAX_NODES} nodes (an alias bomb?)")
        if depth > MAX_DEPTH:
            raise _Budget(f"nesting deeper than {MAX_DEPTH} levels")
        self.doc.marks.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
        if node.tag not in _PLAIN_TAGS:
            self.add(path, node.start_mark, f"unsupported YAML tag {node.tag}")
            return None
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path, depth)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i), depth + 1) for i, item in enumerate(node.value)]
        return self._scalar(node, path)

    def _mapping(self, node: yaml.MappingNode, path: Path, depth: int) -> dict[str, object]:
        out: dict[str, object] = {}
        seen: dict[str, int] = {}
        merges: list[yaml.Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                merges.append(value_node)
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self.add(path, key_node.start_mark, "mapping keys must be plain strings")
                continue
            key = str(key_node.value)  # the text as written: `on`, `1`, `null` stay strings
            if key in seen:
                self.add((*path, key), key_node.start_mark, f"duplicate key '{key}' (first at line {seen[key]})")
                continue
            seen[key] = key_node.start_mark.line + 1
            self.doc.marks[(*path, key)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            out[key] = self.build(value_node, (*path, key), depth + 1)
        for merge in merges:  # explicit keys win over merged ones, as YAML's << specifies
            sources = merge.value if isinstance(merge, yaml.SequenceNode) else [merge]
            for src in sources:
                value = self.build(src, path, depth + 1)
                if not isinstance(value, dict):
                    self.add(path, src.start_mark, "'<<' merges only mappings")
                    continue
                for k, v in value.items():
                    out.setdefault(k, v)
        return out

    def _scalar(self, node: yaml.ScalarNode, path: Path) -> object:
        if node.tag == "tag:yaml.org,2002:str" and "$" in node.value:
            # Always a string here; spec coerces it where the schema wants a number or a boolean.
            return self._interpolate(node.value, path, node.start_mark)
        return self._construct(node, path, node.value)

    def _construct(self, node: yaml.ScalarNode, path: Path, text: str) -> object:
        try:
            value = self._constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            self.add(path, node.start_mark, f"cannot read this value: {getattr(exc, 'problem', exc)}")
            return None
        if isinstance(value, _dt.date | bytes):  # dates and !!binary are not spec values: keep the text
            return text
        return value

    def _interpolate(self, text: str, path: Path, mark: yaml.Mark) -> str:
        names: list[str] = []

        def sub(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            expr = m.group(1)
            if expr is None:
                self.add(path, mark, "unterminated '${': write ${VAR} or ${VAR:-default} ($$ for a literal $)")
                return ""
            name, sep, default = expr.partition(":-")
            if not _NAME.fullmatch(name):
                self.add(path, mark, f"bad variable reference '${{{expr}}}': write ${{VAR}} or ${{VAR:-default}}")
                return ""
            names.append(name)
            value = self.env.get(name)
            if value is None or (sep and value == ""):
                if not sep:
                    self.add(
                        path,
                        mark,
                        f"environment variable {name} is not set (write ${{{name}:-default}} to make it optional)",
                    )
                    return ""
                value = default
            if value:
                self.doc.secrets.add(value)
            return value

        out = _VAR.sub(sub, text)
        if names:
            self.doc.interpolated[path] = ", ".join(names)
        return out


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_OPEN = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
_CLOSE = (yaml.MappingEndEvent, yaml.SequenceEndEvent)


def _check_depth(source: str) -> None:
    depth = 0
    for event in yaml.parse(source, Loader=_LOADER):
        if isinstance(event, _OPEN):
            depth += 1
            if depth > MAX_DEPTH:
                raise _Budget(f"nesting deeper than {MAX_DEPTH} levels")
        elif isinstance(event, _CLOSE):
            depth -= 1


def load(source: str | bytes, file: str, env: Mapping[str, str] | None = None) -> tuple[Document, list[Problem]]:
    """Parse one YAML document into plain data with locations; never raises for bad input."""
    doc = Document(file=file, data=None)
    if isinstance(source, bytes):
        if len(source) > MAX_BYTES:
            return doc, [
                Problem(
                    file,
                    0,
                    0,
                    "",
                    f"file is {len(source) / 1e6:.1f} MB; a spec may be at most {MAX_BYTES // (1024 * 1024)} MiB",
                )
            ]
        try:
            source = source.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            return doc, [Problem(file, 0, 0, "", f"not UTF-8 text (invalid byte at offset {exc.start})")]
    if len(source) > MAX_BYTES:
        return doc, [Problem(file, 0, 0, "", f"file is too large (at most {MAX_BYTES // (1024 * 1024)} MiB)")]
    builder = _Builder(doc, os.environ if env is None else env)
    try:
        _check_depth(source)  # libyaml's composer recurses in C: a deep document would crash it
        node = yaml.compose(source, Loader=_LOADER)
        if node is None:
            return doc, [Problem(file, 1, 1, "", "the file is empty; start from the shipped feeds.yaml")]
        doc.data = builder.build(node, ())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        what = " ".join(str(x) for x in (exc.context, exc.problem) if x)
        return doc, [Problem(file, line, col, "", f"YAML syntax error: {what}")]
    except yaml.reader.ReaderError as exc:
        text = source if isinstance(source, str) else ""
        line = text.count("\n", 0, exc.position) + 1
        col = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        char = chr(exc.character) if isinstance(exc.character, int) else exc.character
        return doc, [
            Problem(
                file,
                line,
                col,
                "",
                f"YAML syntax error: character {char!r} is not allowed",
            )
        ]
    except yaml.YAMLError as exc:
        return doc, [Problem(file, 0, 0, "", f"YAML error: {exc}")]
    except _Budget as exc:
        return doc, [Problem(file, 0, 0, "", str(exc))]
    except RecursionError:
        return doc, [Problem(file, 0, 0, "", f"nesting deeper than {MAX_DEPTH} levels")]
    return doc, builder.problems
