"""Fuzzing the loading path: whatever a task file or `dispatch.toml` holds, loading it
either gives a valid spec or raises the project's own error, never a traceback.

The input reaches the product the way a user's does: bytes written to a file in a
project, then `load_spec` (yamlsafe → schema → graph → outputs and agents, with the
project's config read from disk) or `load_config`. Three kinds of input:

* raw bytes and arbitrary text (and a token soup of YAML punctuation and keys);
* task files generated from a grammar of the format — ids, agents, dependencies,
  outputs, timeouts, settings — with hostile values (huge numbers, NaN/inf, control
  characters, NUL, bidi marks, long strings, tags on empty values, anchors and aliases,
  duplicate keys, deep nesting), written out as YAML by hand, so that what no emitter
  would write (a duplicate key, `!!int` with nothing after it) is written too; a few
  bytes of each are sometimes mutated;
* `dispatch.toml` configs from a similar grammar, loaded alone and under a task file.

The properties: a refusal is a `TaskFileError` (`ConfigError` for the config) whose
every diagnostic names the file, has a line within it (but for the whole-file cases
in `NO_LINE`), and carries no raw control or invisible character; and a file that
loads also plans (`run_spec(dry_run=True)`, no agent runs, nothing written).

The budget is fixed and the examples derandomized, so CI is deterministic and runs
no database: `FUZZ_EXAMPLES=20000` raises the count (and draws fresh random examples)
for a deep run on a developer machine. Regressions found by deep runs stay as
`@example`s (and, for whole files, as tests/corpus/ entries).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from parallel_dispatch.api import run_spec
from parallel_dispatch.cli.plan_view import render_plan
from parallel_dispatch.config import load_config
from parallel_dispatch.errors import ConfigError, TaskFileError
from parallel_dispatch.loader import load_spec
from parallel_dispatch.plan import Plan
from parallel_dispatch.result import TaskStatus
from parallel_dispatch.runners import RunnerSet
from parallel_dispatch.spec import DispatchSpec

# -- budget ------------------------------------------------------------------------
DEEP = int(os.environ.get("FUZZ_EXAMPLES", "0"))
"""Examples per test for a local deep run (randomised); 0: the fixed CI budget."""

if DEEP:  # a deep run takes many minutes per test: no per-test timeout (pyproject's 300 s)
    pytestmark = pytest.mark.timeout(0)

settings.register_profile(
    "loader-fuzz-ci", max_examples=300, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much])
settings.register_profile(
    "loader-fuzz-deep", settings.get_profile("loader-fuzz-ci"), derandomize=False,
    max_examples=max(DEEP, 1), print_blob=True)
FUZZ = settings.get_profile("loader-fuzz-deep" if DEEP else "loader-fuzz-ci")


def budget(ci: int) -> settings:
    """`FUZZ` with this test's share of the CI budget (the deep count when set)."""
    return settings(FUZZ, max_examples=DEEP or ci)


# -- the project every example is loaded in ------------------------------------------
CONFIG = """\
[defaults]
runner = "claude"
timeout_per_task = 30000
retry_backoff = 0

[agents.reviewer]
command = ["true"]
prompt = "arg"

[agents.envy]
command = ["true"]
env = { GOOD = "1" }

[agents.claudish]
runner = "claude"
model = "sonnet"
"""
AGENT_DEF = """\
---
name: writer
description: writes things
tools: Read, Write
---
You write.
"""


class Workspace:
    """A project with a fixed config and agent definition, and an empty HOME."""

    def __init__(self, top: Path) -> None:
        self.root = top / "project"
        (self.root / ".aiwg").mkdir(parents=True)
        (self.root / ".claude" / "agents").mkdir(parents=True)
        (self.root / ".aiwg" / "dispatch.toml").write_text(CONFIG)
        (self.root / ".claude" / "agents" / "writer.md").write_text(AGENT_DEF)
        self.task = self.root / "fuzz.yaml"
        self.cfg_root = top / "cfg-project"
        (self.cfg_root / ".aiwg").mkdir(parents=True)
        self.cfg = self.cfg_root / ".aiwg" / "dispatch.toml"
        self.cfg_task = self.cfg_root / "tasks.yaml"
        self.cfg_task.write_text(CONFIG_TASKS)


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    top = tmp_path_factory.mktemp("fuzz")
    (top / "home").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(top / "home"))  # no ~/.claude/agents of the machine's
        mp.chdir(top)
        yield Workspace(top)


# -- the properties ------------------------------------------------------------------
UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b\u200e\u200f\u2028-\u202e"
                    "\u2060\u2066-\u2069\ufeff]")
"""What must not reach a terminal raw: C0 (tab and newline too: a diagnostic is one
line), DEL, C1, line separators, invisible and direction-changing marks (loader.py's
`_CONTROL`)."""

NO_LINE = (
    "file is ",                                 # over 32 MiB: refused before reading
    "document has more than ",                  # the value budget, counted at the end
)
"""Whole-file refusals that have no line (README "Validation"); every other
diagnostic of a file's content has one."""

LINE_BREAKS = re.compile("\r\n|[\r\n\x85\u2028\u2029]")
"""libyaml's line breaks: a reported line must exist in the file as it counts them."""


def _lines(data: bytes, toml: bool = False) -> int:
    if not toml and data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        text = data.decode("utf-16", "replace")
    else:
        text = data.decode("utf-8", "replace")
    if toml:
        return text.count("\n") + 1
    return len(LINE_BREAKS.split(text))


def check_refusal(exc: TaskFileError, files: dict[str, bytes]) -> None:
    """`files`: each file the diagnostics may name (as displayed) → its content."""
    assert exc.diagnostics, "a TaskFileError without diagnostics"
    assert not UNSAFE.search(str(exc).replace("\n", "")), repr(str(exc))
    for d in exc.diagnostics:
        shown = d.format()
        assert "\n" not in shown and not UNSAFE.search(shown), repr(shown)
        assert d.file in files, (d.file, list(files))
        if d.line is None:
            assert d.message.startswith(NO_LINE), f"no line: {shown!r}"
            continue
        assert isinstance(d.line, int) and d.line >= 1, shown
        assert d.column is None or d.column >= 1, shown
        toml = d.file.endswith(".toml")
        assert d.line <= _lines(files[d.file], toml), (shown, _lines(files[d.file], toml))


def load_task_bytes(ws: Workspace, data: bytes) -> DispatchSpec | None:
    """Load `data` as the project's task file: the spec, or None when refused (checked)."""
    ws.task.write_bytes(data)
    try:
        spec = load_spec(ws.task)
    except TaskFileError as exc:
        assert not isinstance(exc, ConfigError), "the project's config is valid"
        check_refusal(exc, {str(ws.task): data})
        event("refused")
        return None
    assert spec.tasks
    event("loaded")
    return spec


def check_plans(spec: DispatchSpec) -> None:
    """A spec that loads also plans: every task ready exactly once, after its deps,
    and the dry run (what `plan` prints) marks every task planned."""
    graph = spec.graph
    plan = Plan.with_weights(graph, [1.0] * len(graph))
    done: list[int] = []
    while plan.has_ready():
        i = plan.pop_ready()
        assert all(d in done for d in graph.deps[i]), (i, graph.deps[i], done)
        done.append(i)
        plan.succeeded(i)
    assert sorted(done) == list(range(len(spec.tasks)))
    real = RunnerSet()
    result = trio.run(partial(run_spec, spec, runner=real, dry_run=True))
    assert all(r.status == TaskStatus.PLANNED for r in result.records)
    assert render_plan(spec, result, real)


# -- strategy 1: raw bytes and text ----------------------------------------------------
TOKENS = [
    "tasks", "tasks:", "id", "id:", "agent:", "shell", "prompt:", "output:",
    "dependencies:", "settings:", "timeout:", "max_parallel:", "output_dir:", "name:",
    ":", ": ", "- ", "-", "\n", "\n  ", "\n    ", "  ", " ", "\t", "\r\n", "{", "}", "[", "]",
    ",", "&a ", "*a", "&b", "*b", "!!int", "!!float", "!!timestamp", "!!bool", "!!str",
    "!!binary", "!!python/object:os.system", "!x", "? ", "|", ">", "|-", "'", '"', "#", "%YAML",
    "---", "...", "<<", "~", "null", ".inf", ".nan", "1e400", "1" + "0" * 30, "0x1F",
    "2001-12-14", "a", "b", "a.txt", "o/", "..", "/", "\\", "\\x00", "\\e", "\\u202e",
    "\x00", "\x1b", "\x85", "\u2028", "\u202e", "\ufeff", "é", "😀", "\udcff",
]


def encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


raw_bytes = st.binary(max_size=400)
raw_text = st.text(max_size=300).map(encode)
token_soup = st.lists(st.sampled_from(TOKENS), max_size=80).map("".join).map(encode)


@budget(600)
@given(data=st.one_of(raw_bytes, raw_text, token_soup))
@example(data=b"")
@example(data=b"\xff\xfe")
@example(data=b"\xef\xbb\xbf")
@example(data=b"tasks: [{id: a, agent: shell, prompt: x, output: \xe9}]\n")
@example(data=b"? tasks")  # found by a deep run: reported on line 2 of a 1-line file
def test_arbitrary_bytes_load_or_are_refused_with_lines(ws: Workspace, data: bytes) -> None:
    spec = load_task_bytes(ws, data)
    if spec is not None:
        check_plans(spec)


# -- strategy 2: a grammar of task files -----------------------------------------------
class Node:
    def __repr__(self) -> str:  # short: hypothesis shows strategies holding nodes
        return f"<{type(self).__name__}>"


class Raw(Node):
    """Text placed as it is: plain scalars, flow collections, hostile fragments."""

    def __init__(self, text: str) -> None:
        self.text = text


class Quoted(Node):
    def __init__(self, text: str, style: str) -> None:
        self.text, self.style = text, style  # style: ' " | >


class Map(Node):
    def __init__(self, items: list[tuple[Any, Any]], flow: bool = False) -> None:
        self.items, self.flow = items, flow


class Seq(Node):
    def __init__(self, items: list[Any], flow: bool = False) -> None:
        self.items, self.flow = items, flow


class Decorated(Node):
    """A node with a tag and/or an anchor in front."""

    def __init__(self, node: Any, tag: str = "", anchor: str = "") -> None:
        self.node, self.tag, self.anchor = node, tag, anchor


def _double(text: str) -> str:
    out = []
    for ch in text:
        o = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= o < 0x7F or (o >= 0xA0 and ch.isprintable()
                                  and not 0xD800 <= o < 0xE000):
            out.append(ch)
        elif o < 0x100:
            out.append(f"\\x{o:02x}")
        elif o < 0x10000:
            out.append(f"\\u{o:04x}")
        else:
            out.append(f"\\U{o:08x}")
    return '"' + "".join(out) + '"'


def _inline(node: Any) -> str | None:
    """`node` on one line, or None when it needs block lines."""
    if isinstance(node, Raw):
        return node.text
    if isinstance(node, Quoted):
        if node.style == '"':
            return _double(node.text)
        if node.style == "'":
            return "'" + node.text.replace("'", "''") + "'"
        return None
    if isinstance(node, Decorated):
        inner = _inline(node.node)
        head = " ".join(x for x in (node.tag, node.anchor) if x)
        if inner is None:
            return None
        return f"{head} {inner}" if inner else head
    if isinstance(node, Map | Seq) and (node.flow or not node.items):
        return _flow(node)
    return None


def _flow(node: Any) -> str:
    """`node` in flow style, whatever style its parts asked for."""
    if isinstance(node, Map):
        return "{" + ", ".join(f"{_key(k)}: {_flow(v)}" for k, v in node.items) + "}"
    if isinstance(node, Seq):
        return "[" + ", ".join(_flow(v) for v in node.items) + "]"
    if isinstance(node, Decorated):
        head = " ".join(x for x in (node.tag, node.anchor) if x)
        return f"{head} {_flow(node.node)}"
    if isinstance(node, Quoted) and node.style in "|>":
        return _double(node.text)
    inline = _inline(node)
    assert inline is not None
    return inline


def _key(key: Any) -> str:
    if isinstance(key, str):
        return key if re.fullmatch(r"[A-Za-z_][\w.-]*", key) else _double(key)
    return _inline(key) or "x"


def emit(node: Any, indent: int = 0) -> list[str]:
    """Block lines for `node` at `indent` (its first line is where the node starts)."""
    pad = " " * indent
    inline = _inline(node)
    if inline is not None:
        return [pad + inline]
    if isinstance(node, Decorated):
        head = " ".join(x for x in (node.tag, node.anchor) if x)
        return [pad + head, *emit(node.node, indent + 2)]
    if isinstance(node, Quoted):  # a block scalar
        body = node.text.split("\n")
        return [pad + node.style] + [" " * (indent + 2) + line for line in body]
    lines: list[str] = []
    if isinstance(node, Map):
        for k, v in node.items:
            value = _inline(v)
            if value is not None:
                lines.append(f"{pad}{_key(k)}: {value}".rstrip() if value else
                             f"{pad}{_key(k)}:")
            elif isinstance(v, Quoted):
                lines.append(f"{pad}{_key(k)}: {v.style}")
                lines += [" " * (indent + 2) + line for line in v.text.split("\n")]
            else:
                lines.append(f"{pad}{_key(k)}:")
                lines += emit(v, indent + 2)
        return lines
    assert isinstance(node, Seq)
    for v in node.items:
        if isinstance(v, Map) and not v.flow and v.items:
            inner = emit(v, indent + 2)
            lines.append(pad + "- " + inner[0][indent + 2:])
            lines += inner[1:]
        elif _inline(v) is not None:
            lines.append(f"{pad}- {_inline(v)}")
        else:
            lines.append(pad + "-")
            lines += emit(v, indent + 2)
    return lines


BIG = {
    "<int 400 digits>": "1" + "0" * 400,
    "<int 5000 digits>": "1" + "0" * 5000,
    "<256 x>": "x" * 256,
    "<201 a>": "a" * 201,
    "<200 a>": "a" * 200,
    "<5000 y>": "y" * 5000,
    "<128 KiB p>": "p" * (128 * 1024),
    "<201 x>": "x" * 201,
    "<1500 dirs>": "d/" * 1500 + "f",
    "<5000 o>": "o" * 5000,
    "<300 k>": "k" * 300,
}
"""Long values, named short so that hypothesis's reports stay readable."""


def big(name: str) -> str:
    return BIG.get(name, name)


def pick(values: list[str]) -> st.SearchStrategy[str]:
    return st.sampled_from(values).map(big)


IDS = ["a", "b", "c", "build", "test-1", "x.y", "A_b", "t0", "t1", "t2"]
HOSTILE_IDS = ["", "-a", "a b", "a\x1bb", "a\x1bc", "é", "<200 a>", "<201 a>", "\u202ea",
               "a\0", "a\n", "../a", "a/b", "buil", "tset-1"]
AGENTS = ["shell", "reviewer", "envy", "claudish", "writer", "nobody", "shel", "",
          "a\x1b[31m", "\u202eshell", "../etc", "*", "Shell", "code reviewer"]
OUTPUTS = ["a.txt", "b.txt", "out/", "out/a.md", "o/b/c.txt", "a.txt/", ".", "..", "../x",
           "/etc/passwd", "~/x", "a\0b", "a\nb", "a\x1b", "\u202etxt.exe", "logs",
           "logs/x", "dispatch-report.md", ".dispatch-journal.jsonl", ".dispatch-x",
           ".a.20240101T000000Z-abc.1.partial", "a//b", "./a", "a/./b", "<201 x>",
           "<1500 dirs>", "C:\\x", "a\\..\\..\\b", "\\\\host\\x", "é.txt", " ", "-"]
NUMBERS = ["0", "1", "-1", "+1", "2592000000", "2592000001", "9223372036854775808",
           "<int 400 digits>", "<int 5000 digits>", "0x1F", "0o17", "0b101", "1_000", "1:30",
           "190:20:30", "1.5", "1e400", "-1e400", ".inf", "-.inf", ".nan", ".NaN",
           "1e-400", "0.0", "-0", "3600", "3600.0001", "10000", "10001", "100", "101"]
SCALARS = ["~", "null", "", "true", "yes", "no", "on", "Off", "2001-12-14",
           "2001-12-14t21:59:43.10-05:00", "2001-13-45", "2001-02-30", "=", "<<", "none",
           "paths", "inline", "continue", "stop", "retry", "Retry"]
TAGS = ["!!int", "!!float", "!!bool", "!!null", "!!timestamp", "!!str", "!!binary", "!!set",
        "!!omap", "!!map", "!!seq", "!!merge", "!!value", "!!python/object:os.system",
        "!custom", "!", "!<tag:yaml.org,2002:int>"]
LONG = ["<256 x>", "<5000 y>", "<128 KiB p>"]
"""Long strings (the last is an argument Linux refuses: E2BIG)."""


def raw_nest(depth: int, flow: bool) -> Raw:
    return Raw("[" * depth + "]" * depth if flow else "- " * depth + "x")


string_values = st.one_of(
    pick(IDS + HOSTILE_IDS + OUTPUTS + SCALARS + LONG),
    st.text(st.characters(codec="utf-8"), max_size=20), st.text(max_size=10),
)
plain_scalars = pick(IDS + SCALARS + NUMBERS + ["a.txt", "out/"]).map(Raw)
scalars = st.one_of(plain_scalars,
                    st.builds(Quoted, string_values, st.sampled_from(['"', '"', "'", "|", ">"])))
"""A string in one of YAML's styles (plain only where it stays one token)."""

HOSTILE = st.recursive(
    st.one_of(
        scalars,
        st.builds(Decorated, st.sampled_from([Raw(""), Raw("1"), Raw("x"), Raw("1e400"),
                                              Quoted("", '"'), Raw("2001-12-14")]),
                  st.sampled_from(TAGS)),
        st.sampled_from([raw_nest(d, flow) for d in (1, 10, 999, 1001, 5000)
                         for flow in (True, False)]),
    ),
    lambda inner: st.one_of(
        st.builds(Seq, st.lists(inner, max_size=3), st.booleans()),
        st.builds(Map, st.lists(st.tuples(st.sampled_from([*IDS, "<<", "", "k"]), inner),
                                max_size=3), st.booleans()),
    ),
    max_leaves=8,
)
"""Any value: typed scalars, tags (on empty values too), nesting, odd collections."""


def sometimes(good: st.SearchStrategy[Any], bad_one_in: int = 6) -> st.SearchStrategy[Any]:
    """Mostly `good`, one time in `bad_one_in` a hostile value instead."""
    return st.one_of(HOSTILE, *[good] * (bad_one_in - 1))


ids = pick(IDS).map(Raw) | pick(HOSTILE_IDS).map(lambda s: Quoted(s, '"'))
ms = st.sampled_from(["1", "100", "30000", "2592000000"]).map(Raw)

TASK_FIELDS: list[tuple[str, st.SearchStrategy[Any], int]] = [
    # key, its value (mostly good), how often (in 10) it is there
    ("id", ids, 9),
    ("agent", st.sampled_from(AGENTS[:5]).map(Raw)
     | st.sampled_from(AGENTS).map(lambda s: Quoted(s, '"')), 9),
    ("prompt", st.sampled_from(["x", "echo hi", "exit 0"]).map(Raw)
     | st.builds(Quoted, string_values, st.sampled_from(['"', "|", "'"])), 9),
    ("output", st.sampled_from(OUTPUTS[:5]).map(Raw)
     | pick(OUTPUTS).map(lambda s: Quoted(s, '"')), 9),
    ("dependencies", st.builds(Seq, st.lists(ids, max_size=3), st.booleans()), 4),
    ("timeout", ms, 2),
    ("idle_timeout", ms, 1),
    ("retries", st.sampled_from(["0", "3", "100"]).map(Raw), 1),
    ("inputs", st.sampled_from(["none", "paths", "inline"]).map(Raw), 1),
    ("files", st.builds(Seq, st.lists(st.sampled_from(["*.py", "src/**", "", "/etc/*"])
                                      .map(lambda s: Quoted(s, '"')), max_size=2)), 1),
    # the surface issues 11-14 added: isolation, output_schema, foreach
    ("isolation", st.sampled_from(["none", "worktree", "chroot", "1"]).map(Raw), 1),
    ("output_schema", st.one_of(
        st.sampled_from(["{type: object}", "{type: objekt}", "{$ref: '#/$defs/x'}",
                         "{type: string, pattern: '^(a+)+$'}", "true", "s.json",
                         "../../etc/passwd", "{$defs: {l: {$ref: '#/$defs/l'}}, $ref: "
                         "'#/$defs/l'}"]).map(Raw),
        st.builds(Quoted, string_values, st.just('"'))), 1),
    ("foreach", st.one_of(
        st.builds(lambda xs: Map([("items", Seq(xs, flow=True))], flow=True),
                  st.lists(st.one_of(pick(["a", "b", "../x", "a\0b", "", "é"]).map(
                      lambda s: Quoted(s, '"')), st.sampled_from(
                      [Raw("1"), Raw("true"), Raw("null"), Raw("{key: k, v: 1}"),
                       Raw("{key: '../k'}"), Raw("{k: [1]}")])), max_size=3)),
        st.sampled_from([Raw("{files: ['*.txt']}"), Raw("{files: ['../**']}"),
                         Raw("{from: t0}"), Raw("{from: nope}"), Raw("{}"),
                         Raw("{items: [a], files: ['*']}"), Raw("{items: [a, b], max_items: 1}"),
                         Raw("{items: [a], max_items: -1}"), Raw("{items: x}")])), 1),
]
SETTINGS_FIELDS: list[tuple[str, st.SearchStrategy[Any], int]] = [
    ("max_parallel", st.sampled_from(["1", "4", "10000"]).map(Raw), 3),
    ("timeout_per_task", ms, 3),
    ("output_dir", pick(["out", "out/", ".", "a/b", "/tmp/../x", "~", "~/x",
                         "~nobody-here/x", "", "a\0b", "\u202eo", "<5000 o>", "/proc/self/x",
                         "/dev/null"]).map(lambda s: Quoted(s, '"')), 5),
    ("on_failure", st.sampled_from(["continue", "stop", "retry"]).map(Raw), 3),
    ("max_retries", st.sampled_from(["0", "3"]).map(Raw), 3),
    ("retry_backoff", st.sampled_from(["0", "1.5", "3600"]).map(Raw), 3),
    ("max_cost_usd", st.sampled_from(["0.5", "10"]).map(Raw), 3),
    ("idle_timeout", ms, 3),
]
ODD_KEYS = ["dependancies", "ID", "id ", "<<", "=", "", "tasks", "a\x1bkey", "\u202ekey",
            "<300 k>"]
NON_STRING_KEYS = ["1", "null", "true", "? [a]"]


def _any_of(values: list[Any]) -> st.SearchStrategy[Any]:
    """One of `values`, drawn by index: strategies made per draw from values (nodes,
    lists) would fill hypothesis's strategy cache with one-off entries."""
    return st.integers(0, len(values) - 1).map(values.__getitem__)


def _shuffled(draw: st.DrawFn, items: list[Any]) -> list[Any]:
    return [items[i] for i in draw(st.permutations(range(len(items))))]


@st.composite
def extra_items(draw: st.DrawFn, keys: list[str], least: int = 0) -> list[tuple[Any, Any]]:
    """Typo'd, unknown or duplicate keys (plain, odd, or not strings at all)."""
    out: list[tuple[Any, Any]] = []
    for _ in range(draw(st.integers(least, 2))):
        key = big(draw(_any_of(keys + ODD_KEYS + NON_STRING_KEYS)))
        out.append((Raw(key) if key in NON_STRING_KEYS else key, draw(HOSTILE)))
    return out


@st.composite
def mapping(draw: st.DrawFn, fields: list[tuple[str, st.SearchStrategy[Any], int]],
            hostile: bool = True) -> Map:
    items: list[tuple[Any, Any]] = []
    for key, value, often in fields:
        if draw(st.integers(0, 9)) < often:
            items.append((key, draw(value)))
    if hostile:
        items += draw(extra_items([k for k, _, _ in fields]))
    if hostile and items and draw(st.integers(0, 5)) == 0:  # the same key twice
        items.append(draw(_any_of(items)))
    if len(items) > 1 and draw(st.integers(0, 4)) == 0:
        items = _shuffled(draw, items)
    return Map(items, flow=draw(st.integers(0, 3)) == 0)


HOSTILE_TASK_FIELDS = [(k, sometimes(v), n) for k, v, n in TASK_FIELDS]
HOSTILE_SETTINGS_FIELDS = [(k, sometimes(v), n) for k, v, n in SETTINGS_FIELDS]
PREFIXES = ["", "", "", "", "# c\n", "---\n", "%YAML 1.1\n---\n", "\ufeff",
            "a: &x [1]\nb: [*x, *x]\n", "%TAG !e! tag:example.com,2000:\n---\n"]
SUFFIXES = ["", "", "", "", "...\n", "---\nx: 1\n", "# end", "\0", "lol: &l [*l]\n",
            "\n\n\n"]


clean_prompts = st.one_of(
    st.sampled_from(["x", "echo hi", "exit 0"]).map(Raw),
    st.builds(Quoted, string_values, st.just('"')),
    st.builds(Quoted, st.text("abc $'\"\n#:-", min_size=1).map(str.strip).filter(bool),
              st.sampled_from(["|", ">"])),
)
"""Prompts in any style, but with nothing a YAML file cannot hold raw."""

GOOD_SETTINGS = [(k, v, 2) for k, v, _ in SETTINGS_FIELDS if k != "output_dir"]


@st.composite
def clean_task(draw: st.DrawFn, i: int) -> Map:
    """Task `i` as a user would write it: unique id and output, earlier dependencies
    (a later one now and then, which may close a cycle)."""
    items: list[tuple[Any, Any]] = [
        ("id", Raw(f"t{i}")),
        ("agent", draw(st.sampled_from(AGENTS[:5]).map(Raw))),
        ("prompt", draw(clean_prompts)),
        ("output", Raw(f"o{i}.txt") if draw(st.integers(0, 3)) else Raw(f"d{i}/")),
    ]
    if i and draw(st.booleans()):
        deps = draw(st.lists(st.integers(0, i - 1 + (draw(st.integers(0, 5)) == 0)),
                             max_size=3, unique=True))
        items.append(("dependencies", Seq([Raw(f"t{d}") for d in deps],
                                          flow=draw(st.booleans()))))
    for key, value, often in TASK_FIELDS[5:]:
        if draw(st.integers(0, 9)) < often:
            items.append((key, draw(value)))
    if len(items) > 1 and draw(st.integers(0, 4)) == 0:
        items = _shuffled(draw, items)
    return Map(items, flow=draw(st.integers(0, 3)) == 0)


@st.composite
def task_file(draw: st.DrawFn, levels: tuple[str, ...] = ("clean", "one-change", "hostile"),
              ) -> str:
    """A task file as text: a clean one, one with a single hostile change, or one with
    hostile parts anywhere (a third each, roughly)."""
    level = draw(st.sampled_from(levels))
    n = draw(st.integers(0 if level == "hostile" else 1, 6))
    if level == "hostile":
        tasks: list[Any] = [draw(mapping(HOSTILE_TASK_FIELDS)) for _ in range(n)]
    else:
        tasks = [draw(clean_task(i)) for i in range(n)]
    if tasks and draw(st.integers(0, 5)) == 0:  # a task repeated through an alias
        tasks[0] = Decorated(tasks[0], anchor="&t")
        tasks.append(Raw("*t"))
    if level == "hostile" and draw(st.integers(0, 9)) == 0:
        tasks.append(draw(HOSTILE))  # a task that is not a mapping
    root: list[tuple[Any, Any]] = []
    if draw(st.booleans()):
        root.append(("name", draw(sometimes(scalars) if level == "hostile" else scalars)))
    if draw(st.integers(0, 3)) == 0:
        root.append(("description", draw(scalars)))
    tasks_node: Any = Seq(tasks, flow=draw(st.integers(0, 5)) == 0)
    root.append(("tasks", draw(sometimes(st.just(tasks_node), 10)) if level == "hostile"
                 else tasks_node))
    if draw(st.booleans()):
        fields = HOSTILE_SETTINGS_FIELDS if level == "hostile" else GOOD_SETTINGS
        settings_node: Any = draw(mapping(fields, hostile=level == "hostile"))
        if draw(st.integers(0, 5)) == 0:
            settings_node = Decorated(settings_node, anchor="&s")
            root.append(("x-settings", Raw("*s")) if level == "hostile" else
                        ("description", Raw("*s")))
        root.append(("settings", draw(sometimes(st.just(settings_node), 10))
                     if level == "hostile" else settings_node))
    if level == "hostile":
        root += draw(extra_items(["name", "description", "tasks", "settings"]))
    if len(root) > 1 and draw(st.integers(0, 4)) == 0:
        root = _shuffled(draw, root)
    doc: Any = Map(root)
    if level == "one-change":
        _one_change(draw, doc)
    elif level == "hostile" and draw(st.integers(0, 29)) == 0:
        doc = draw(HOSTILE)  # a root that is not a mapping
    text = "\n".join(emit(doc)) + "\n"
    if level == "clean":
        return text
    return draw(st.sampled_from(PREFIXES)) + text + draw(st.sampled_from(SUFFIXES))


def _one_change(draw: st.DrawFn, doc: Map) -> None:
    """One hostile edit somewhere in a clean document: a value replaced, a key added
    (unknown, odd or repeated), or a known key given a hostile value."""
    maps = [doc]
    for _, v in doc.items:
        node = v.node if isinstance(v, Decorated) else v
        if isinstance(node, Seq):
            maps += [t.node if isinstance(t, Decorated) else t for t in node.items
                     if isinstance(t, Map | Decorated)]
        elif isinstance(node, Map):
            maps.append(node)
    target = draw(_any_of(maps))
    how = draw(st.integers(0, 3))
    if how == 0 and target.items:
        i = draw(st.integers(0, len(target.items) - 1))
        target.items[i] = (target.items[i][0], draw(HOSTILE))
    elif how == 1:
        target.items.append(draw(extra_items([], least=1))[0])
    elif how == 2 and target.items:
        target.items.append(draw(_any_of(target.items)))
    else:
        fields = TASK_FIELDS if target is not doc else [("name", scalars, 0)]
        key = draw(_any_of([k for k, _, _ in [*fields, *SETTINGS_FIELDS]]))
        value = draw(st.one_of(HOSTILE, *(v for k, v, _ in [*TASK_FIELDS, *SETTINGS_FIELDS]
                                          if k == key)))
        target.items = [(k, v) for k, v in target.items if k != key] + [(key, value)]


BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n"
    for p, c in zip("abcdefgh", "bcdefghi", strict=True)) + "tasks: *i\n"


@st.composite
def encoded(draw: st.DrawFn, texts: st.SearchStrategy[str]) -> bytes:
    """The text in an encoding a user's editor might save, sometimes a few bytes off."""
    text = draw(texts)
    how = draw(st.sampled_from(["utf-8"] * 12 + ["utf-8-sig", "utf-16", "utf-16-le",
                                                  "latin-1", "crlf", "cr"]))
    if how == "crlf":
        data = encode(text.replace("\n", "\r\n"))
    elif how == "cr":
        data = encode(text.replace("\n", "\r"))
    else:
        data = text.encode(how, "surrogatepass" if how.startswith("utf") else "replace")
    if data and draw(st.integers(0, 5)) == 0:  # a few bytes changed, dropped or added
        edits = draw(st.lists(st.tuples(st.integers(0, 1 << 20).map(lambda i: i % len(data)),
                                        st.integers(0, 2),
                                        st.integers(0, 255)), min_size=1, max_size=3))
        buf = bytearray(data)
        for pos, op, byte in edits:
            pos = min(pos, len(buf) - 1) if buf else 0
            if op == 0 and buf:
                buf[pos] = byte
            elif op == 1 and buf:
                del buf[pos]
            else:
                buf.insert(pos, byte)
        data = bytes(buf)
    return data


@budget(600)
@given(data=encoded(task_file()))
@example(data=b"tasks:\n  - id: a\n    agent: shell\n    prompt: x\n    output: o\n"
              b"    timeout: !!int\n")
@example(data=BILLION_LAUGHS.encode())
# Found by deep runs (each a ValueError, RuntimeError or raw ESC before the fix):
@example(data=b'settings: {output_dir: "a\\0b"}\ntasks: [{id: a, agent: shell, prompt: x, '
              b'output: o}]\n')
@example(data=b'settings: {output_dir: "~nobody-here/x"}\ntasks: [{id: a, agent: shell, '
              b'prompt: x, output: o}]\n')
@example(data=b'tasks: [{id: "a\\eb", agent: shell, prompt: x, output: o}, {id: c, '
              b'agent: shell, prompt: x, output: p, dependencies: ["a\\ec"]}]\n')
@example(data=b"tasks: a\nnull: a\n? [a]: a\n# end")  # a duplicate key past the last line
@example(data=b'tasks: [{id: t1, agent: shell, prompt: x, output: o1.txt, '  # raw ESC (s6)
              b'output_schema: "\\x1b"}]\n')
def test_task_files_load_or_are_refused_with_lines(ws: Workspace, data: bytes) -> None:
    spec = load_task_bytes(ws, data)
    if spec is not None:
        check_plans(spec)
    assert sorted(os.listdir(ws.root)) == [".aiwg", ".claude", "fuzz.yaml"]  # wrote nothing


# -- strategy 3: dispatch.toml ---------------------------------------------------------
CONFIG_TASKS = """\
tasks:
  - {id: a, agent: shell, prompt: "true", output: a.txt}
  - {id: b, agent: reviewer, prompt: "x", output: b.txt, dependencies: [a]}
  - {id: c, agent: claude-ish, prompt: "x", output: c.txt}
  - {id: d, agent: other, prompt: "x", output: d/}
"""
"""The task file loaded under each fuzzed config: agents it may or may not define."""

TOML_KEYS = {
    "defaults": ["max_parallel", "timeout_per_task", "output_dir", "on_failure",
                 "max_retries", "retry_backoff", "max_cost_usd", "idle_timeout", "runner",
                 "max_quota_wait", "isolation", "merge"],
    "agent": ["command", "runner", "model", "args", "env", "prompt", "output", "inputs",
              "base_url", "api_key_env", "read_timeout", "max_parallel", "shared_state",
              "resources"],
    "runner": ["command", "model", "args", "env", "base_url", "api_key_env",
               "read_timeout", "max_parallel", "resources"],
    "executor": ["kind", "address", "workspace", "excludes", "forward_env", "resources"],
    "notify": ["webhook", "format", "command", "events", "timeout", "retries"],
}
AGENT_NAMES = ["reviewer", "claude-ish", "*", "other", "shell", "", "a b", "a\x1bb", "é",
               "\u202ex"]
RUNNER_NAMES = ["claude", "codex", "gemini", "opencode", "llm", "openai", "nope"]
TOML_STRINGS = ["true", "stdin", "arg", "stdout", "file", "paths", "claude", "openai",
                "continue", "stop", "retry", "http://localhost:1/v1", "KEY", "", "out/",
                "~nobody-here/x", "a\0b", "a=b", "\x1b[31m", "\u202e", "x" * 300]


def toml_string(s: str) -> str:
    return json.dumps(s)  # a JSON string is a TOML basic string (\uXXXX escapes)


def toml_key(s: str) -> str:
    return s if re.fullmatch(r"[A-Za-z0-9_-]+", s) else toml_string(s)


toml_scalar = st.one_of(
    st.sampled_from(TOML_STRINGS).map(toml_string),
    st.text(max_size=8).map(toml_string),
    st.sampled_from(["0", "1", "-1", "4", "2592000001", "10001", "1.5", "inf", "-inf", "nan",
                     "+nan", "1e400", "1" + "0" * 30, "1" + "0" * 5000, "true", "false",
                     "1979-05-27T07:32:00Z", "07:32:00", "0x10", "0o7", "'lit'",
                     '"""multi\nline"""', "[]", "{}"]),
)
toml_value = st.recursive(
    toml_scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
        st.lists(st.tuples(st.sampled_from(["GOOD", "A", "a=b", "", "\x1b"]), inner),
                 max_size=2).map(lambda kv: "{" + ", ".join(
                     f"{toml_key(k)} = {v}" for k, v in kv) + "}"),
    ),
    max_leaves=4,
)
toml_good = {
    "command": st.sampled_from(['["true"]', '["sh", "-c", "cat"]', "[]", '"true"']),
    "runner": st.sampled_from(RUNNER_NAMES).map(toml_string),
    "env": st.sampled_from(['{ A = "1" }', '{ "a=b" = "1" }', '{ "" = "x" }',
                            '{ A = "x\\u0000y" }', '{ "\\u001b" = "1" }']),
    "prompt": st.sampled_from(['"stdin"', '"arg"']),
    "resources": st.sampled_from(["{ gpu = 1 }", "{ gpu = inf }", "{ gpu = -1 }",
                                  '{ gpu = "1" }', "{ \"\" = 1 }"]),
    "kind": st.sampled_from(['"local"', '"ray"', '"k8s"']),
    "workspace": st.sampled_from(['"shared"', '"working_dir"', '"/mnt/x"', '"rel"']),
    "webhook": st.sampled_from(['"http://127.0.0.1:9/x"', '"ftp://x/y"', '"http://a b"',
                                '"http://x/\u0000"']),
    "events": st.sampled_from(['["run_finished"]', '["all"]', "[]"]),
    "forward_env": st.sampled_from(['["KEY"]', '["A=B"]', '["\u0000"]']),
}


def _toml_line(key: str) -> st.SearchStrategy[str]:
    value = st.one_of(toml_value, toml_good.get(key, toml_value))
    return value.map(lambda v: f"{toml_key(key)} = {v}")


TOML_TABLES = {kind: st.lists(st.one_of(*(_toml_line(k) for k in [*keys, "unknown", "Command"])),
                              max_size=4)
               for kind, keys in TOML_KEYS.items()}
"""The body of each kind of table: known keys (mostly good values), unknown ones."""


@st.composite
def toml_config(draw: st.DrawFn) -> str:
    """A dispatch.toml as text: sections, dotted keys, inline tables, odd bits."""
    parts: list[str] = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["defaults", "agent", "runner", "executor", "notify",
                                     "other"]))
        if kind in ("defaults", "executor", "notify"):
            header = f"[{kind}]"
        elif kind == "agent":
            header = f"[agents.{toml_key(draw(st.sampled_from(AGENT_NAMES)))}]"
        elif kind == "runner":
            header = f"[runners.{toml_key(draw(st.sampled_from(RUNNER_NAMES)))}]"
        else:
            header = draw(st.sampled_from(["[agents]", "[[agents]]", "[x]", "[defaults.x]",
                                           "[ defaults ]", '["agents"."x"]', "[agents.x.env]",
                                           "[", "[]"]))
        body = draw(TOML_TABLES.get(kind, TOML_TABLES["agent"]))
        parts.append("\n".join([header, *body]))
    if draw(st.integers(0, 4)) == 0:  # dotted keys and inline tables at the top
        parts.insert(0, draw(st.sampled_from([
            'agents.x.command = ["true"]', "defaults = { max_parallel = 0 }",
            'agents = { "*" = { command = 1 } }', "runners.claude.model = 5",
            "defaults.max_parallel = " + "1" + "0" * 5000, "a = " + "[" * 100 + "]" * 100,
            "x = 1", "defaults = 1"])))
    if len(parts) > 1 and draw(st.integers(0, 6)) == 0:
        parts.append(parts[0])  # a table defined twice
    return "\n\n".join(parts) + draw(st.sampled_from(["\n", "", "\n# end\n", "\r\n"]))


toml_bytes = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(encode),
    st.lists(st.sampled_from(["[", "]", "=", '"', "'", "\n", "a", ".", "{", "}", ",", "1",
                              "agents", "defaults", "command", "\\u001b", "\x00", "#", " "]),
             max_size=60).map("".join).map(encode),
    encoded(toml_config()),
)


def check_config(ws: Workspace, data: bytes) -> None:
    """`data` as the project's dispatch.toml: loaded alone, then under a task file."""
    ws.cfg.write_bytes(data)
    shown = {str(ws.cfg): data, os.path.relpath(ws.cfg): data}
    try:
        load_config(ws.cfg_root)
    except ConfigError as exc:
        check_refusal(exc, shown)
    try:
        spec = load_spec(ws.cfg_task)
    except TaskFileError as exc:
        check_refusal(exc, {**shown, str(ws.cfg_task): CONFIG_TASKS.encode()})
    else:
        check_plans(spec)


@budget(400)
@given(data=toml_bytes)
@example(data=b"[agents.reviewer]\ncommand = [\"true\"]\n")
# Found by deep runs (no line, a raw control character, or a ValueError before the fix):
@example(data=b'"')  # "at end of document"
@example(data=b'[agents."\\b"]\n')  # "known agents: \b, shell"
@example(data=b"[defaults]\nmax_parallel = 1" + b"0" * 5000 + b"\n")
@example(data=b'x = 1\n"\\u001b" = 1\n')
def test_configs_load_or_are_refused_with_lines(ws: Workspace, data: bytes) -> None:
    check_config(ws, data)


def test_the_budget_is_fixed_and_deterministic() -> None:
    """CI runs the same examples every time and writes no example database."""
    if DEEP:
        pytest.skip("a deep run (FUZZ_EXAMPLES) is random on purpose")
    ci = settings.get_profile("loader-fuzz-ci")
    assert ci.derandomize and ci.database is None and ci.deadline is None
    assert FUZZ is ci

