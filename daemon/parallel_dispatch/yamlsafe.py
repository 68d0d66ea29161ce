"""Safe YAML loading that can tell where every value came from.

PyYAML's safe loader refuses arbitrary objects, but it forgets positions,
ignores duplicate keys and happily hands back an alias bomb (shared lists
that explode when walked).  We build plain data straight from libyaml's event
stream instead: only standard tags are accepted, duplicate keys are errors,
and aliases are charged their full expanded size against a budget, so a
"billion laughs" document is refused after a few hundred events.

Positions (1-based line, column) are only collected when someone asks for
them, by a second pass: valid files, the common case, pay nothing for them.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

try:  # libyaml's parser is ~10x faster on large files; fall back to pure Python.
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover - depends on how PyYAML was built
    from yaml import SafeLoader as _Loader  # type: ignore[assignment]

from .errors import Diagnostic, TaskFileError

MAX_FILE_BYTES = 32 * 1024 * 1024
"""Task files beyond this are refused before reading (a 50,000-task file is ~6 MB)."""

MAX_NODES = 5_000_000
"""Total value budget, counting aliases at their expanded size.  A 50,000-task
file has under a million values; a "billion laughs" document claims billions."""

Path_ = tuple[str | int, ...]

_T = "tag:yaml.org,2002:"
_IMPLICIT = Resolver.yaml_implicit_resolvers
_CONSTRUCT = {
    _T + "int": SafeConstructor.construct_yaml_int,
    _T + "float": SafeConstructor.construct_yaml_float,
    _T + "bool": SafeConstructor.construct_yaml_bool,
    _T + "null": SafeConstructor.construct_yaml_null,
    _T + "timestamp": SafeConstructor.construct_yaml_timestamp,
}
_NOT_SET = object()
_UNUSUAL = object()
"""`_Builder.run_plain` met more than plain data: `run` builds (or refuses) the document."""
_COMPLEX_KEY = object()
"""Where the value of a refused complex key goes, so that it is not taken for the next
key (which reported a bogus duplicate key): the document is refused anyway."""


@dataclass
class Positions:
    """1-based (line, column) of values and of mapping keys, by data path."""

    values: dict[Path_, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Path_, tuple[int, int]] = field(default_factory=dict)
    end: tuple[int, int] | None = None
    """The last line and the column after it: no position is reported past it."""

    def of(self, path: Path_, key: bool = False) -> tuple[int, int] | None:
        """Position of `path` (its key if `key`), else of its deepest known ancestor."""
        p = tuple(path)
        first, second = (self.keys, self.values) if key else (self.values, self.keys)
        found = None
        while p and found is None:
            found = first.get(p) or second.get(p)
            p = p[:-1]
        if found is None:
            found = self.values.get((), None)
        if found is not None and self.end is not None and found[0] > self.end[0]:
            return self.end  # libyaml marks an empty value at the very end a line further
        return found


@dataclass
class Document:
    data: Any
    file: str
    text: bytes | str
    _positions: Positions | None = None

    @property
    def positions(self) -> Positions:
        """Computed on first use by re-reading the text with position tracking."""
        if self._positions is None:
            self._positions = _Builder(self.file, track=True).run(self.text)[1]
            self._positions.end = _end(self.text)
        return self._positions


class _Frame:
    __slots__ = ("anchor", "container", "key", "path", "start")

    def __init__(self, container: Any, path: Path_, anchor: str | None, start: int) -> None:
        self.container = container
        self.path = path
        self.anchor = anchor
        self.start = start
        self.key: Any = _NOT_SET


def _where(event: yaml.Event) -> tuple[int, int]:
    """1-based (line, column) where `event` starts.

    Both of PyYAML's parsers mark every event; the stubs allow None for events built by hand.
    """
    mark = event.start_mark
    if mark is None:  # pragma: no cover - never from a parser
        return 0, 0
    return mark.line + 1, mark.column + 1


class _Builder:
    def __init__(self, file: str, track: bool) -> None:
        self.file = file
        self.track = track
        self.positions = Positions()
        self.errors: list[Diagnostic] = []
        self.nodes = 0
        self.anchors: dict[str, tuple[Any, int]] = {}
        self._constructor = SafeConstructor()
        self._plain: dict[str, str] = {}

    def _error(self, event: yaml.Event, message: str) -> None:
        self.errors.append(Diagnostic(self.file, *_where(event), message))

    def _charge(self, event: yaml.Event, n: int) -> None:
        self.nodes += n
        if self.nodes > MAX_NODES:
            raise TaskFileError([Diagnostic(
                self.file, *_where(event),
                f"document expands to more than {MAX_NODES:,} values (an alias bomb?); "
                "remove the nested anchors and aliases",
            )])

    def run(self, text: bytes | str) -> tuple[Any, Positions]:
        """Build the document's data from libyaml events.

        The loop is written flat on purpose: it runs once per YAML event, and
        a 50,000-task file has three quarters of a million of them.
        """
        stack: list[_Frame] = []
        root: Any = _NOT_SET
        documents = 0
        track = self.track
        scalar_t, alias_t = yaml.ScalarEvent, yaml.AliasEvent
        map_start, seq_start = yaml.MappingStartEvent, yaml.SequenceStartEvent
        ends = (yaml.MappingEndEvent, yaml.SequenceEndEvent)
        loader = _Loader(text)
        next_event = loader.get_event  # returns None at the end; no check_event round trip
        try:
            for event in iter(next_event, None):  # (faster than a `while` calling it)
                # `type(event) is X` where a branch reads X's fields: mypy narrows on it
                kind = event.__class__
                if type(event) is scalar_t:
                    self.nodes += 1
                    if event.tag is None and not event.implicit[0]:
                        value: Any = event.value  # quoted: always a string
                    else:
                        value = self._scalar(event)
                    if event.anchor:
                        self.anchors[event.anchor] = (value, 1)
                    if not track and stack:  # fast paths; _deliver handles the rest
                        top = stack[-1]
                        container = top.container
                        if type(container) is list:
                            container.append(value)
                            continue
                        if top.key is not _NOT_SET:
                            container[top.key] = value
                            top.key = _NOT_SET
                            continue
                        if type(value) is str and value != "<<" and value not in container:
                            top.key = value
                            continue
                    root = self._deliver(stack, value, event, root)
                elif type(event) is map_start or type(event) is seq_start:
                    self._charge(event, 1)
                    is_map = kind is map_start
                    if event.tag not in (None, "!", _T + ("map" if is_map else "seq")):
                        self._error(event, f"unsupported YAML tag {event.tag!r}; "
                                           "only plain data is allowed")
                    path = self._child_path(stack, event)
                    if stack and path is None:
                        self._error(event, "mapping keys must be plain scalars")
                    stack.append(_Frame({} if is_map else [], path or (), event.anchor,
                                        self.nodes))
                elif kind in ends:
                    frame = stack.pop()
                    if frame.anchor:
                        self.anchors[frame.anchor] = (frame.container,
                                                      self.nodes - frame.start + 1)
                    root = self._deliver(stack, frame.container, event, root, placed=True)
                elif type(event) is alias_t:
                    if event.anchor not in self.anchors:
                        self._error(event, f"unknown alias '*{event.anchor}'")
                        value, size = None, 1
                    else:
                        value, size = self.anchors[event.anchor]
                    self._charge(event, size)
                    root = self._deliver(stack, value, event, root)
                elif kind is yaml.DocumentStartEvent:
                    documents += 1
                    if documents > 1:
                        self._error(event, "a task file holds one YAML document; "
                                           "remove the '---'")
        finally:
            loader.dispose()
        self._charge_check()
        if self.errors:
            raise TaskFileError(_on_lines(self.errors, text))
        return (None if root is _NOT_SET else root), self.positions

    def run_plain(self, text: bytes | str) -> Any:
        """The document's data, if it is plain data; else `_UNUSUAL`, and `run` decides.

        A fast path for what task files nearly always are: untagged scalars and
        containers, no anchors or aliases, string keys that are neither repeated nor
        `<<`, one document, within `MAX_NODES`.  It gives up (returns `_UNUSUAL`) at
        the first event outside that, so every refusal, and every file using more of
        YAML, still goes through `run`; where it does not give up it builds what `run`
        builds (`tests/test_load_fast_paths.py` compares both).  It keeps the state of
        the innermost container in locals: 0.05 s less than `run` on 50,000 tasks.
        libyaml's own errors propagate from here as they would from `run`.
        """
        scalar_t, map_start, seq_start = (yaml.ScalarEvent, yaml.MappingStartEvent,
                                          yaml.SequenceStartEvent)
        map_end, seq_end = yaml.MappingEndEvent, yaml.SequenceEndEvent
        stream_t = (yaml.StreamStartEvent, yaml.StreamEndEvent, yaml.DocumentEndEvent)
        plain = self._plain
        resolve = self._scalar
        outer: list[tuple[Any, Any]] = []  # the enclosing containers and their pending keys
        container: Any = None  # None: at the top level
        key: Any = _NOT_SET
        root: Any = None
        nodes = documents = 0
        loader = _Loader(text)
        next_event = loader.get_event
        try:
            for event in iter(next_event, None):  # (as in `run`)
                if type(event) is scalar_t:
                    if event.tag is not None or event.anchor is not None:
                        return _UNUSUAL
                    nodes += 1
                    value: Any = event.value
                    if event.implicit[0]:  # plain, not quoted: may be a number, bool, null
                        value = plain.get(value) or resolve(event)  # (cached: non-empty str)
                    if type(container) is list:
                        container.append(value)
                    elif key is not _NOT_SET:
                        container[key] = value
                        key = _NOT_SET
                    elif container is None:
                        root = value
                    elif type(value) is str and value != "<<" and value not in container:
                        key = value
                    else:
                        return _UNUSUAL  # a non-string, merge or duplicate key
                elif type(event) is map_start or type(event) is seq_start:
                    nodes += 1
                    if (event.tag is not None or event.anchor is not None or nodes > MAX_NODES
                            or (type(container) is dict and key is _NOT_SET)):  # complex key
                        return _UNUSUAL
                    outer.append((container, key))
                    container, key = ({} if type(event) is map_start else []), _NOT_SET
                elif type(event) is map_end or type(event) is seq_end:
                    value = container
                    container, key = outer.pop()
                    if type(container) is list:
                        container.append(value)
                    elif container is None:
                        root = value
                    else:
                        container[key] = value
                        key = _NOT_SET
                elif type(event) is yaml.DocumentStartEvent:
                    documents += 1
                    if documents > 1:
                        return _UNUSUAL
                elif not isinstance(event, stream_t):
                    return _UNUSUAL  # an alias
        finally:
            loader.dispose()
        if self.errors or nodes > MAX_NODES:
            return _UNUSUAL
        return root

    def _charge_check(self) -> None:
        if self.nodes > MAX_NODES:  # scalars are counted without a check in the loop
            raise TaskFileError([Diagnostic(
                self.file, None, None,
                f"document has more than {MAX_NODES:,} values; split it into several files")])

    def _child_path(self, stack: list[_Frame], event: yaml.Event) -> Path_ | None:
        """Path of the value starting at `event`, recording its position."""
        if not stack:
            path: Path_ = ()
        else:
            top = stack[-1]
            if isinstance(top.container, list):
                path = (*top.path, len(top.container))
            elif top.key is _NOT_SET:
                return None  # a complex key
            else:
                path = (*top.path, top.key)
        if self.track:
            self.positions.values[path] = _where(event)
        return path

    def _deliver(self, stack: list[_Frame], value: Any, event: yaml.Event, root: Any,
                 placed: bool = False) -> Any:
        if not stack:
            if not placed and self.track:
                self.positions.values[()] = _where(event)
            return value
        top = stack[-1]
        container = top.container
        if isinstance(container, list):
            if not placed and self.track:
                self._child_path(stack, event)
            container.append(value)
            return root
        if top.key is _NOT_SET:
            if isinstance(value, dict | list):
                top.key = _COMPLEX_KEY  # already reported as a complex key
                return root
            key = value if isinstance(value, str) else str(value)
            if key == "<<" and isinstance(event, yaml.ScalarEvent) and event.implicit[0]:
                self._error(event, "YAML merge keys ('<<') are not supported; repeat the keys")
            if key in container:
                self._error(event, f"duplicate key {key!r}")
            top.key = key
            if self.track:
                self.positions.keys[(*top.path, key)] = _where(event)
            return root
        if not placed and self.track:
            self._child_path(stack, event)
        container[top.key] = value
        top.key = _NOT_SET
        return root

    def _scalar(self, event: yaml.ScalarEvent) -> Any:
        value = event.value
        tag = event.tag
        if tag is None or tag == "!":
            if not event.implicit[0]:
                return value  # quoted: always a string
            if value in self._plain:
                return self._plain[value]
            for candidate, regexp in _IMPLICIT.get(value[:1], ()):
                if regexp.match(value):
                    tag = candidate
                    break
            else:
                if len(value) <= 24:  # keys and short words repeat thousands of times
                    self._plain[value] = value
                return value
        if tag == _T + "str" or tag == _T + "merge" or tag == _T + "value":
            return value
        construct = _CONSTRUCT.get(tag)
        if construct is None:
            self._error(event, f"unsupported YAML tag {tag!r}; only plain data is allowed")
            return value
        try:
            return construct(self._constructor, yaml.ScalarNode(tag, value))
        except Exception:  # PyYAML's constructors assume the resolver's regexp matched:
            # `!!int` on an empty value is an IndexError, `!!timestamp` an AttributeError.
            shown = value if len(value) <= 40 else value[:37] + "..."
            self._error(event, f"invalid {tag.rsplit(':', 1)[-1]} value {shown!r}")
            return value


def _end(text: bytes | str) -> tuple[int, int]:
    """The file's last line (as libyaml counts lines) and the column after its end."""
    lines = _BREAKS.split(_source(text))
    return len(lines), len(lines[-1]) + 1


def _on_lines(errors: list[Diagnostic], text: bytes | str) -> list[Diagnostic]:
    """`errors` without repeats, and at a line of the file: libyaml marks an empty value
    at the very end (`key:` before a last comment) on a line after the last one."""
    end = _end(text)
    out: dict[Diagnostic, None] = {}
    for d in errors:
        if d.line is not None and d.line > end[0]:
            d = Diagnostic(d.file, *end, d.message, d.task_id)
        out[d] = None
    return list(out)


_KEY_LINE = re.compile(r"^[ \t]*(?:-[ \t]+)?(?:\{[ \t]*)?[A-Za-z_][\w.-]*:(?:[ \t].*|)$",
                       re.MULTILINE)
"""A line that reads like `key: value`, `- key: value` or `- {key: value`: structure."""


def _unclosed_quote(text: bytes | str, exc: yaml.MarkedYAMLError,
                    file: str) -> Diagnostic | None:
    """Where a quote that was never closed opens, when that is what broke the file.

    libyaml reports an unclosed quote where it gave up — the end of the file, or
    wherever a later quote happened to close the string and the rest no longer
    parsed — which is far from the mistake.  Two cases are recognised:

    * a quoted string that swallowed lines reading like `key: value` and ends on the
      line of the error (its closing quote is missing, and a later quote closed it by
      accident, so what follows no longer parses);
    * an error while scanning a quoted scalar (nothing closed it before the end).
    """
    try:
        source = text.decode("utf-8-sig") if isinstance(text, bytes) else text
    except UnicodeDecodeError:
        return None
    problem = exc.problem_mark
    stop = (problem.line, problem.column) if problem is not None else (1 << 62, 0)
    swallowed: tuple[yaml.ScalarToken, str] | None = None
    try:  # tokens only, with libyaml: this runs once, on a file that failed anyway
        for token in yaml.scan(source, Loader=_Loader):
            start = token.start_mark
            if (start.line, start.column) >= stop:
                break
            if (isinstance(token, yaml.ScalarToken) and token.style in ('"', "'")
                    and start.line < token.end_mark.line == stop[0]):
                body = source[start.index + 1:token.end_mark.index]
                key = _KEY_LINE.search(body, body.find("\n") + 1)
                if key is not None:
                    swallowed = (token, key.group(0).strip())
                    break
    except yaml.YAMLError:
        pass  # the scan meets the same error; the tokens before it are what matter
    if swallowed is not None:
        token, line = swallowed
        mark, quote = token.start_mark, token.style
        after = (f" ({exc.problem} at line {problem.line + 1}, column {problem.column + 1})"
                 if exc.problem and problem is not None else "")
        return Diagnostic(file, mark.line + 1, mark.column + 1,
                          f"invalid YAML: this {quote} quote is never closed: the string runs "
                          f"on to line {token.end_mark.line + 1} and swallows the line "
                          f"'{line}'{after}; add the closing {quote}")
    if exc.context == "while scanning a quoted scalar" and exc.context_mark is not None:
        mark = exc.context_mark
        lines = source.splitlines()
        here = lines[mark.line] if mark.line < len(lines) else ""
        quote = here[mark.column] if mark.column < len(here) else "quote"
        why = ("the file ends inside the string" if "end of stream" in (exc.problem or "")
               else f"{exc.problem} at line {problem.line + 1}, column {problem.column + 1}"
               if problem is not None else exc.problem)
        return Diagnostic(file, mark.line + 1, mark.column + 1,
                          f"invalid YAML: this {quote} quote is never closed ({why}); add the "
                          f"closing {quote}")
    return None


def _syntax_error(text: bytes | str, exc: yaml.MarkedYAMLError, file: str) -> Diagnostic:
    """libyaml's error at its line, naming where the construct it was parsing began.

    The parser gives up where the structure breaks — often the line *after* an
    unclosed `[` or `{` — so the opening line is named too; and a mark past the
    last line (the end of a file without a final newline) is moved onto it.
    """
    mark = exc.problem_mark or exc.context_mark
    problem = exc.problem or str(exc)
    if exc.context:
        start = exc.context_mark
        if start is not None and mark is not None and start.line != mark.line:
            problem = (f"{exc.context} (from line {start.line + 1}, column {start.column + 1}), "
                       f"{problem}")
        else:
            problem = f"{exc.context}, {problem}"
    if mark is None:
        return Diagnostic(file, None, None, f"invalid YAML: {problem}")
    line, col = mark.line + 1, mark.column + 1
    if line > 1 and col == 1:
        lines = _source(text).splitlines()
        if line > len(lines) >= 1:
            line, col = len(lines), len(lines[-1]) + 1
    return Diagnostic(file, line, col, f"invalid YAML: {problem}")


_BREAKS = re.compile("\r\n|[\r\n\x85\u2028\u2029]")
"""What libyaml counts as a line break (so lines agree with its marks)."""


def _reader_error(text: bytes | str, exc: yaml.reader.ReaderError, file: str) -> Diagnostic:
    """A byte libyaml refuses (not UTF-8, a control character), at its line and column.

    libyaml reports only a byte offset, and for a bad UTF-8 sequence the offset of
    the byte where it noticed, which may follow the culprit; Python's decoder finds
    the culprit itself.
    """
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    offset = min(max(exc.position, 0), len(data))
    utf16 = data[:2] in (b"\xff\xfe", b"\xfe\xff")
    encoding = "utf-16" if utf16 else "utf-8"
    if isinstance(exc.character, int) and not utf16 and (
            "UTF-8" in exc.reason or "Unicode" in exc.reason):
        skip = 3 if data.startswith(b"\xef\xbb\xbf") else 0
        try:
            data[skip:offset + 4].decode("utf-8")
        except UnicodeDecodeError as bad:
            offset = min(offset, skip + bad.start)
        byte = data[offset] if offset < len(data) else None
        what = f"byte 0x{byte:02x}" if byte is not None else "the file ends mid-character"
        message = (f"not valid UTF-8 ({what}); task files must be UTF-8: re-save it as "
                   "UTF-8 (e.g. iconv -f latin1 -t utf-8)")
    elif isinstance(exc.character, int) and "control" in exc.reason:
        message = (f"invalid YAML: control character U+{exc.character:04X} is not allowed in "
                   "a YAML file; remove it (inside double quotes it can be written as an "
                   f"escape, \\x{exc.character:02x})" if exc.character < 0x100 else
                   f"invalid YAML: character U+{exc.character:04X} is not allowed; remove it")
    else:
        message = f"invalid YAML: {exc.reason} (character {exc.character!r})"
    before = data[:offset].decode(encoding, "replace")
    if not utf16:
        before = before.removeprefix("\ufeff")
    lines = _BREAKS.split(before)
    return Diagnostic(file, len(lines), len(lines[-1]) + 1, message)


def _source(text: bytes | str) -> str:
    if isinstance(text, str):
        return text
    if text[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return text.decode("utf-16", "replace")
    return text.decode("utf-8", "replace").removeprefix("\ufeff")


def _whole_file(file: str, message: str) -> TaskFileError:
    return TaskFileError([Diagnostic(file, None, None, message)])


def load_yaml(path: Path, display: str | None = None) -> Document:
    """Load one YAML document from `path`, refusing anything unsafe or oversized.

    Only a regular file is read (a device such as `/dev/zero` reports size 0 and
    never ends; a FIFO could block forever), and never more than `MAX_FILE_BYTES`
    whatever its size claims (`/proc` files report 0 too).
    """
    file = display or str(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; regular files ignore it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise _whole_file(file, "file not found") from None
    except IsADirectoryError:
        raise _whole_file(file, "is a directory, not a task file") from None
    except OSError as exc:
        raise _whole_file(file, f"cannot read: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise _whole_file(file, "is a directory, not a task file")
        if not stat.S_ISREG(info.st_mode):
            raise _whole_file(file, f"is not a regular file (it is {_kind(info.st_mode)}); "
                                    "give the path of a YAML file")
        if info.st_size > MAX_FILE_BYTES:
            raise _too_big(file, info.st_size)
        chunks: list[bytes] = []
        left = MAX_FILE_BYTES + 1
        want = info.st_size + 1 if info.st_size else 1 << 16  # one read for a real file
        while left > 0 and (chunk := os.read(fd, min(left, want))):
            chunks.append(chunk)
            left -= len(chunk)
            want = 1 << 20
        text = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    except OSError as exc:
        raise _whole_file(file, f"cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(text) > MAX_FILE_BYTES:
        raise _too_big(file, None)
    return parse_yaml(text, file)


def _too_big(file: str, size: int | None) -> TaskFileError:
    how = (f"is {size / 2**20:.0f} MiB" if size is not None
           else f"is over {MAX_FILE_BYTES // 2**20} MiB")
    return TaskFileError([Diagnostic(
        file, None, None,
        f"file {how}; task files are limited to {MAX_FILE_BYTES // 2**20} MiB — split it "
        "into several files")])


def _kind(mode: int) -> str:
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISFIFO(mode):
        return "a pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a file"


def parse_yaml(text: bytes | str, file: str) -> Document:
    """Parse YAML text into plain data; raise TaskFileError on any problem."""
    try:
        data = _Builder(file, track=False).run_plain(text)
        if data is _UNUSUAL:
            data, _ = _Builder(file, track=False).run(text)
    except yaml.MarkedYAMLError as exc:
        unclosed = _unclosed_quote(text, exc, file)
        if unclosed is not None:
            raise TaskFileError([unclosed]) from None
        raise TaskFileError([_syntax_error(text, exc, file)]) from None
    except yaml.reader.ReaderError as exc:
        raise TaskFileError([_reader_error(text, exc, file)]) from None
    except yaml.YAMLError as exc:
        raise _whole_file(file, f"invalid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise _whole_file(file, f"not UTF-8 text: {exc.reason}") from None
    if data is None:
        raise TaskFileError([Diagnostic(file, 1, 1, "file is empty; it needs a 'tasks:' list")])
    return Document(data, file, text)
