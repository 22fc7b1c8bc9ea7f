"""YAML to plain data, keeping where every key came from, with ${VAR} interpolation.

PyYAML's constructors forget line numbers, expand alias bombs without limit, and accept duplicate
keys silently. This module bounds every step itself rather than trusting whichever PyYAML or libyaml is
installed: the file read (regular files only, size and time), the nesting and the number of values
(measured from the text before any parser sees it), and the expansion (measured on the composed node
graph, where aliases share nodes, before any of it is built). Then it builds plain dicts, lists and
scalars with duplicate-key detection and a location per path. Interpolated values are tracked so no
message ever prints them.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import yaml

Path = tuple[str | int, ...]

# Fixed, not in feeds.yaml: they bound the reading of feeds.yaml itself.
MAX_BYTES = 8 * 1024 * 1024  # a feeds.yaml is kilobytes; anything near this is a mistake
MAX_NODES = 500_000  # values, counted in the text and again after alias expansion
MAX_DEPTH = 64
READ_SECONDS = 5.0  # a local file reads in microseconds; longer is a file system that stopped answering

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
    from_env: set[Path] = field(default_factory=set)  # paths with a value that came from the environment
    secrets: set[str] = field(default_factory=set)  # values from the environment, scrubbed from any message
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
    """A bound the document exceeds; located where it was found, when that is known."""

    def __init__(self, message: str, where: tuple[int, int] = (0, 0)) -> None:
        super().__init__(message)
        self.where = where


def _at_mark(mark: yaml.Mark | None) -> tuple[int, int]:
    return (mark.line + 1, mark.column + 1) if mark else (0, 0)


def _too_deep(where: tuple[int, int]) -> _Budget:
    return _Budget(f"nesting deeper than {MAX_DEPTH} levels", where)


class _Builder:
    def __init__(self, doc: Document, env: Mapping[str, str]) -> None:
        self.doc = doc
        self.env = env
        self.problems: list[Problem] = []
        self._constructor = yaml.constructor.SafeConstructor()

    def add(self, path: Path, mark: yaml.Mark | None, message: str) -> None:
        self.doc.broken.add(path)
        line, col = (mark.line + 1, mark.column + 1) if mark else self.doc.locate(path)
        self.problems.append(Problem(self.doc.file, line, col, format_path(path), message))

    def build(self, node: yaml.Node, path: Path) -> object:
        """Plain data for a node graph that _measure already bounded in size and depth."""
        self.doc.marks.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
        if node.tag not in _PLAIN_TAGS:
            self.add(path, node.start_mark, f"unsupported YAML tag {node.tag}")
            return None
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        return self._scalar(node, path)

    def _mapping(self, node: yaml.MappingNode, path: Path) -> dict[str, object]:
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
            out[key] = self.build(value_node, (*path, key))
        for merge in merges:  # explicit keys win over merged ones, as YAML's << specifies
            sources = merge.value if isinstance(merge, yaml.SequenceNode) else [merge]
            for src in sources:
                value = self.build(src, path)
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
        from_env = False

        def sub(m: re.Match[str]) -> str:
            nonlocal from_env
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
                return default  # written in the file: no secret
            from_env = True
            if value:
                self.doc.secrets.add(value)
            return value

        out = _VAR.sub(sub, text)
        if names:
            self.doc.interpolated[path] = ", ".join(names)
        if from_env:
            self.doc.from_env.add(path)
        return out


# ---------------------------------------------------------------------------------------------------
# Nesting and size, measured from the text before any parser sees it


_PLAIN_END = re.compile(r":(?=[ \t]|$)|[ \t]#")  # a block plain scalar ends at a key indicator or a comment
_FLOW_TOKEN = re.compile(r"""[\[\]{},:?#"']""")
_DOUBLE_END = re.compile(r'\\.?|"')
_SINGLE_END = re.compile(r"''|'")
_DOC_MARKER = re.compile(r"(---|\.\.\.)(?=[ \t]|$)")


class _Shape:
    """Counts open collections line by line: block ones by their indicators and columns (a key, a `-`,
    a `?`), flow ones by brackets outside quoted scalars and comments. For the layouts YAML writers
    produce the count is the parser's; odd layouts can only raise it. Linear in the text, no recursion.

    It also counts entries (keys, `-` items, flow items), so a file of millions of values is refused
    before the parser builds a node for each (composing an 8 MiB flow list takes half a minute and
    nearly 1 GiB)."""

    def __init__(self) -> None:
        self.blocks: list[tuple[int, bool]] = []  # (column, is a sequence) of each open block collection
        self.flow = 0  # open flow collections
        self.at_node = False  # in flow context, whether a node (so a quoted scalar) may start here
        self.quote = ""  # the quote of a quoted scalar that continues on the next line
        self.scalar: int | None = None  # in a block or multi-line plain scalar: deeper lines belong to it
        self.line = 0
        self.entries = 0

    def check(self, column: int) -> None:
        """Called for each entry or collection that starts at `column` of the current line."""
        self.entries += 1
        if len(self.blocks) + self.flow > MAX_DEPTH:
            raise _too_deep((self.line + 1, column + 1))
        if self.entries > MAX_NODES:
            raise _Budget(f"the document has more than {MAX_NODES} values", (self.line + 1, column + 1))

    def scan(self, text: str) -> None:
        for self.line, s in enumerate(text.splitlines()):
            start = 0
            if self.scalar is not None:
                indent = len(s) - len(s.lstrip(" "))
                if not s.strip() or (indent > self.scalar and not _DOC_MARKER.match(s)):
                    continue
                self.scalar = None
            if self.quote:
                end = self._quoted(s, 0, self.quote)
                if end is None or not self.flow:
                    continue  # still inside; or, in block context, it ended and only a comment may follow
                start, self.at_node = end, False
            if self.flow:
                self._flow(s, start)  # the rest of a line that closes a multi-line flow is a comment
                continue
            self._block_line(s)

    def _push(self, column: int, sequence: bool) -> None:
        b = self.blocks
        while b and (b[-1][0] > column or (b[-1][0] == column and b[-1][1] and not sequence)):
            b.pop()
        if not b or b[-1][0] < column or (sequence and not b[-1][1]):  # a sequence may sit at its key's column
            b.append((column, sequence))
        self.check(column)

    def _block_line(self, s: str) -> None:
        i = len(s) - len(s.lstrip(" "))
        if i == len(s) or s[i] == "#":
            return
        if i == 0 and (marker := _DOC_MARKER.match(s)):
            self.blocks.clear()
            if marker.group() == "...":
                return
            i = 3
        elif i == 0 and s[0] == "%":
            return  # a directive
        while self.blocks and self.blocks[-1][0] > i:
            self.blocks.pop()
        self._node(s, i)

    def _node(self, s: str, i: int) -> None:
        """Scan from where a block node may start: indicators, properties, then its content."""
        n = len(s)
        while True:
            while i < n and s[i] in " \t":
                i += 1
            if i >= n or s[i] == "#":
                return
            c, after = s[i], s[i + 1] if i + 1 < n else " "
            if c in "-?:" and after in " \t":
                self._push(i, c == "-")
                i += 1
                continue
            if c in "&!":  # an anchor or a tag before the content
                while i < n and s[i] not in " \t":
                    i += 1
                continue
            if c in "|>":
                self.scalar = self.blocks[-1][0] if self.blocks else -1
                return
            column = i
            if c in "[{":
                self.at_node = True
                i = self._flow(s, i)
                if self.flow:
                    return
            elif c in "\"'":
                end = self._quoted(s, i + 1, c)
                if end is None:
                    return
                i = end
            elif c == "*":  # an alias
                while i < n and s[i] not in " \t":
                    i += 1
            else:
                m = _PLAIN_END.search(s, i)
                if m is None:  # it may go on over the next, deeper lines, whatever they start with
                    self.scalar = self.blocks[-1][0] if self.blocks else -1
                if m is None or m.group() != ":":
                    return
                self._push(column, False)
                i = m.end()
                continue
            while i < n and s[i] in " \t":
                i += 1
            if i < n and s[i] == ":" and (i + 1 == n or s[i + 1] in " \t"):  # that node was a key
                self._push(column, False)
                i += 1
                continue
            return

    def _flow(self, s: str, i: int) -> int:
        """Scan flow context from i; returns where the outermost flow collection closed, else len(s)."""
        after_quote = -1
        for m in _FLOW_TOKEN.finditer(s, i):
            j, c = m.start(), m.group()
            if j < i:
                continue  # inside a quoted scalar already scanned
            if self.at_node and j > i:
                self._text(s[i:j])
            i = j + 1
            if c in "[{":
                self.flow += 1
                self.check(j)
                self.at_node = True
            elif c in "]}":
                self.flow -= 1
                self.at_node = False
                if self.flow <= 0:
                    self.flow = 0
                    return i
            elif c == ",":
                self.at_node = True
                self.check(j)
            elif c in ":?":
                nxt = s[i] if i < len(s) else " "
                self.at_node = nxt in " \t,[]{}" or (c == ":" and j == after_quote)
            elif c == "#":
                if j == 0 or s[j - 1] in " \t":
                    return len(s)
                self.at_node = False
            elif self.at_node:  # a quote that starts a quoted scalar
                end = self._quoted(s, i, c)
                if end is None:
                    return len(s)
                i = after_quote = end
                self.at_node = False
            else:
                self.at_node = False  # a quote inside a plain scalar
        self._text(s[i:])
        return len(s)

    def _text(self, gap: str) -> None:
        """Text between flow tokens: a plain scalar ends a node's start; anchors and tags keep it."""
        gap = gap.strip()
        if gap and (gap[0] not in "&!" or not all(w[0] in "&!" for w in gap.split())):
            self.at_node = False

    def _quoted(self, s: str, i: int, quote: str) -> int | None:
        """The end of a quoted scalar opened before i, or None (and remember it) if it goes on."""
        for m in (_DOUBLE_END if quote == '"' else _SINGLE_END).finditer(s, i):
            if m.group() == quote:
                self.quote = ""
                return m.end()
        self.quote = quote
        return None


# ---------------------------------------------------------------------------------------------------
# Expansion, measured on the composed graph before building it


def _children(node: yaml.Node) -> list[yaml.Node]:
    """What _Builder builds under a node: items, mapping values, the mappings a `<<` merges."""
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if not isinstance(node, yaml.MappingNode):
        return []
    out: list[yaml.Node] = []
    for key, value in node.value:
        if key.tag == "tag:yaml.org,2002:merge":
            out += value.value if isinstance(value, yaml.SequenceNode) else [value]
        elif isinstance(key, yaml.ScalarNode):
            out.append(value)
    return out


def _measure(root: yaml.Node) -> None:
    """Refuse a graph whose expansion is too large or too deep before any of it is built.

    Aliases share nodes, so a billion-laughs file composes to a few dozen nodes: each node's expanded
    size and height are computed once and reused wherever an alias points at it.
    """
    known: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded size, height)
    open_: set[int] = set()

    def visit(node: yaml.Node, depth: int) -> tuple[int, int]:
        key = id(node)
        size_height = known.get(key)
        if size_height is None:
            if key in open_:
                raise _Budget("an alias refers to a collection that contains it", _at_mark(node.start_mark))
            if depth > MAX_DEPTH:
                raise _too_deep(_at_mark(node.start_mark))
            open_.add(key)
            size, height = 1, 0
            for child in _children(node):
                n, h = visit(child, depth + 1)
                size, height = size + n, max(height, h + 1)
                if size > MAX_NODES:
                    aliases = len(known) < MAX_NODES  # fewer distinct nodes than that: aliases repeat them
                    what = "expands through aliases to" if aliases else "has"
                    hint = " (an alias bomb?)" if aliases else ""
                    raise _Budget(f"the document {what} more than {MAX_NODES} values{hint}", _at_mark(node.start_mark))
            open_.discard(key)
            size_height = known[key] = (size, height)
        if depth + size_height[1] > MAX_DEPTH:
            raise _too_deep(_at_mark(node.start_mark))
        return size_height

    visit(root, 0)


# ---------------------------------------------------------------------------------------------------
# Reading a file and loading it


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_NOT_REGULAR = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def too_large(file: str, size: int | None) -> Problem:
    """The size refusal, with the real size when it is known."""
    limit = f"a spec may be at most {MAX_BYTES // (1024 * 1024)} MiB"
    if size is None:
        return Problem(file, 0, 0, "", f"file grew past {MAX_BYTES // (1024 * 1024)} MiB while being read; {limit}")
    return Problem(file, 0, 0, "", f"file is {size / (1024 * 1024):.1f} MiB ({size:,} bytes); {limit}")


def _not_regular(file: str, mode: int) -> Problem:
    kind = next((name for test, name in _NOT_REGULAR if test(mode)), "not a file")
    return Problem(file, 0, 0, "", f"not a regular file (it is {kind}); give the path of a feeds.yaml file")


def _read(file: str) -> tuple[bytes | None, list[Problem]]:
    try:
        st = os.stat(file)
        if not stat.S_ISREG(st.st_mode):
            return None, [_not_regular(file, st.st_mode)]  # open() on a FIFO would wait for a writer
        if st.st_size > MAX_BYTES:
            return None, [too_large(file, st.st_size)]
        # Non-blocking, so a FIFO swapped in since the stat cannot block open(); fstat says what was opened.
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None, [_not_regular(file, st.st_mode)]
            if st.st_size > MAX_BYTES:
                return None, [too_large(file, st.st_size)]
            chunks: list[bytes] = []
            total = 0
            while total <= MAX_BYTES:
                chunk = os.read(fd, min(1 << 20, MAX_BYTES + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
        finally:
            os.close(fd)
    except FileNotFoundError:
        return None, [Problem(file, 0, 0, "", "no such file")]
    except OSError as exc:
        return None, [Problem(file, 0, 0, "", f"cannot read: {exc.strerror or exc}")]
    if total > MAX_BYTES:
        return None, [too_large(file, None)]  # it grew while being read
    return b"".join(chunks), []


def read(file: str, timeout: float = READ_SECONDS) -> tuple[bytes | None, list[Problem]]:
    """The bytes of a spec file, or why not; never blocks for longer than `timeout`.

    A local read takes microseconds, but a stat or read on a file system that stopped answering (NFS,
    FUSE) blocks in the kernel where nothing can interrupt it. It runs in a daemon thread that is
    abandoned after `timeout`, so a reload or `validate` still answers and the process can still exit.
    """
    result: list[tuple[bytes | None, list[Problem]]] = []

    def work() -> None:
        try:
            result.append(_read(file))
        except ValueError:  # a path with a NUL byte
            result.append((None, [Problem(file, 0, 0, "", "cannot read: not a valid path")]))

    worker = threading.Thread(target=work, name="feedrunner-read", daemon=True)
    worker.start()
    worker.join(timeout)
    if not result:
        return None, [Problem(file, 0, 0, "", f"cannot read: no answer within {timeout:g} s (a stalled file system?)")]
    return result[0]


def load(source: str | bytes, file: str, env: Mapping[str, str] | None = None) -> tuple[Document, list[Problem]]:
    """Parse one YAML document into plain data with locations; never raises for bad input."""
    doc = Document(file=file, data=None)
    if isinstance(source, bytes):
        if len(source) > MAX_BYTES:
            return doc, [too_large(file, len(source))]
        try:
            source = source.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            return doc, [Problem(file, 0, 0, "", f"not UTF-8 text (invalid byte at offset {exc.start})")]
    elif len(source) > MAX_BYTES // 4 and (size := len(source.encode("utf-8", "surrogatepass"))) > MAX_BYTES:
        return doc, [too_large(file, size)]
    builder = _Builder(doc, os.environ if env is None else env)
    try:
        _Shape().scan(source)  # whatever limits the installed parser has, ours hold first
        node = yaml.compose(source, Loader=_LOADER)
        if node is None:
            return doc, [Problem(file, 1, 1, "", "the file is empty; start from the shipped feeds.yaml")]
        _measure(node)
        doc.data = builder.build(node, ())
    except _Budget as exc:
        return doc, [Problem(file, *exc.where, "", str(exc))]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        what = " ".join(str(x) for x in (exc.context, exc.problem) if x)
        return doc, [Problem(file, line, col, "", f"YAML syntax error: {what}")]
    except yaml.reader.ReaderError as exc:
        line = source.count("\n", 0, exc.position) + 1
        col = exc.position - (source.rfind("\n", 0, exc.position) + 1) + 1
        char = chr(exc.character) if isinstance(exc.character, int) else exc.character
        return doc, [Problem(file, line, col, "", f"YAML syntax error: character {char!r} is not allowed")]
    except yaml.YAMLError as exc:
        return doc, [Problem(file, 0, 0, "", f"YAML error: {exc}")]
    except RecursionError:  # only a pure-Python PyYAML recurses; the scan above should have refused first
        return doc, [Problem(file, 0, 0, "", f"nesting deeper than {MAX_DEPTH} levels")]
    return doc, builder.problems
