"""`foreach:` fan-out: one task definition, one task per item (Snakemake wildcards,
the GitHub Actions matrix).

`files:` and `items:` are expanded when the file is loaded, so the plan, the
scheduler, fingerprints and the report see ordinary tasks with ids `<id>[<key>]`;
a task that depends on `<id>` depends on all of them, in item order.  `from:`
items exist only once their source task has run: its output is read here
(`items_from_output`) and the run driver loads the file again with them.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .globwalk import glob_files
from .graph import Graph
from .model import MAX_ID_CHARS, RESERVED_OUTPUTS, Task
from .spec import DispatchSpec

COLLAPSE_AFTER = 20
"""`plan` and the report list this many items of a group, then a count of the rest."""
PLACEHOLDER = re.compile(r"\{(item(?:\.([A-Za-z_][A-Za-z0-9_-]*))?|path|stem)\}")
"""`{item}`, `{item.field}`, `{path}`, `{stem}`; any other brace is left alone (shell
`${VAR}`, JSON in prompts)."""
KEY = re.compile(r"[A-Za-z0-9_.:@+,=-]+")
"""What a key may hold: ids name files (`logs/<id>.log`) and appear in URLs, so a path's
`/` becomes `:` and nothing else unusual is allowed."""


class FanoutError(ValueError):
    """A problem with one `foreach` task: `field` is the key it concerns."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Item:
    key: str
    value: Any
    """A string, or a mapping (`{item.field}`)."""
    path: str | None = None
    """The matched file, relative to the project root (`files:` only)."""


@dataclass
class Expansion:
    """The task list with every static `foreach` replaced by its items."""

    tasks: list[Task] = field(default_factory=list)
    origin: list[int] = field(default_factory=list)
    """Index in the file of the task each expanded task came from."""
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Fan-out id → its tasks' ids, in item order."""
    problems: list[tuple[int, FanoutError]] = field(default_factory=list)
    watch: list[str] = field(default_factory=list)
    """The `files:` globs: a file that starts matching one adds a task (the daemon)."""


def file_items(root: Path, files: Sequence[str], exclude: Sequence[str],
               output_dir: Path | None) -> list[Item]:
    """Files matched by `files` and not by `exclude`, sorted; never the output dir's
    own files (a `**` glob would otherwise fan out over the last run's outputs)."""
    out = os.path.realpath(output_dir) if output_dir is not None else None
    found: set[str] = set()
    for pattern in files:
        for rel in glob_files(root, pattern):
            match = os.path.join(root, rel)
            if not os.path.isfile(match):
                continue
            if out is not None and os.path.realpath(match).startswith(out + os.sep):
                continue
            found.add(rel)
    kept = sorted(p for p in found
                  if not any(fnmatch.fnmatchcase(p, x) or _glob_match(p, x) for x in exclude))
    return [Item(_file_key(p), p, p) for p in kept]


def _glob_match(path: str, pattern: str) -> bool:
    """`**/` also matches no folder at all, as in `glob`."""
    return pattern.startswith("**/") and fnmatch.fnmatchcase(path, pattern[3:])


def _file_key(path: str) -> str:
    key = path.replace("/", ":")
    if not KEY.fullmatch(key):
        raise FanoutError("files", f"the file '{path}' has a character that cannot be part of "
                          "a task id (letters, digits and . _ - : @ + , = only); "
                          "leave it out with exclude:")
    return key


def list_items(values: Sequence[Any], what: str = "items") -> list[Item]:
    """Items from a list: a mapping's `key` field names its task, else its position."""
    items = []
    keys: dict[str, int] = {}
    for n, value in enumerate(values):
        if isinstance(value, Mapping):
            raw = value.get("key")
            if (raw is not None and not isinstance(raw, str | int)) or isinstance(raw, bool):
                raise FanoutError(what, f"item {n}: 'key' must be a string or a number "
                                  f"(got {raw!r})")
            key = str(raw) if raw is not None else str(n)
        elif isinstance(value, str | int | float | bool) or value is None:
            key = str(n)
        else:
            raise FanoutError(what, f"item {n} is a {type(value).__name__}; give a string "
                              "or a flat mapping")
        if not KEY.fullmatch(key):
            raise FanoutError(what, f"item {n}: key {key!r} cannot be part of a task id "
                              "(letters, digits and . _ - : @ + , = only)")
        if key in keys:
            raise FanoutError(what, f"items {keys[key]} and {n} have the same key {key!r}; "
                              "keys must be unique")
        keys[key] = n
        items.append(Item(key, value))
    return items


def items_from_output(path: Path, max_items: int) -> list[Item]:
    """The elements of a `from:` task's output (a JSON array)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise FanoutError("from", f"the output {path} is not JSON ({exc}); the task named "
                          "by from: must write a JSON array") from None
    if not isinstance(data, list):
        raise FanoutError("from", f"the output {path} is a JSON {type(data).__name__}, not "
                          "an array; the task named by from: must write a JSON array")
    if len(data) > max_items:
        raise FanoutError("from", f"the output {path} has {len(data):,} items, more than "
                          f"max_items ({max_items}); raise max_items or write fewer")
    return list_items(data, "from")


def substitute(template: str, item: Item, where: str = "foreach") -> str:
    """`template` (the task's `where`) with the item's placeholders replaced."""
    def one(m: re.Match[str]) -> str:
        name, fld = m.group(1), m.group(2)
        if name in ("path", "stem"):
            if item.path is None:
                raise FanoutError(where, f"{{{name}}} names a file, and these items are "
                                  "not files; use {item} or {item.field}")
            return item.path if name == "path" else PurePosixPath(item.path).stem
        if fld is None:
            if isinstance(item.value, str):
                return item.value
            return json.dumps(item.value, sort_keys=True)
        if not isinstance(item.value, Mapping) or fld not in item.value:
            raise FanoutError(where, f"{{item.{fld}}}: item '{item.key}' has no field "
                              f"{fld!r}")
        value = item.value[fld]
        return value if isinstance(value, str) else json.dumps(value)
    return PLACEHOLDER.sub(one, template)


def instantiate(task: Task, items: Sequence[Item]) -> list[Task]:
    """One task per item: same agent, settings and dependencies."""
    made = []
    for item in items:
        tid = f"{task.id}[{item.key}]"
        if len(tid) > MAX_ID_CHARS:
            raise FanoutError("foreach", f"the task id '{tid[:60]}…' would be {len(tid)} "
                              f"characters (at most {MAX_ID_CHARS}); shorten the id or keys")
        update: dict[str, Any] = {
            "id": tid, "prompt": substitute(task.prompt, item, "prompt"),
            "output": substitute(task.output, item, "output"), "foreach": None}
        if item.path is not None:  # its content joins the fingerprint; the daemon watches it
            update["files"] = [*task.files, item.path]
        made.append(task.model_copy(update=update))
    return made


def expand(tasks: Sequence[Task], root: Path, output_dir: Path | None,
           given: Mapping[str, Sequence[Item]] | None = None) -> Expansion:
    """Replace each `files:`/`items:` fan-out (and each `from:` one whose items are
    `given`) by its tasks, and point dependents at all of them."""
    result = Expansion()
    given = given or {}
    for i, task in enumerate(tasks):
        fe = task.foreach
        if fe is None or (fe.from_ is not None and task.id not in given):
            result.tasks.append(task)
            result.origin.append(i)
            continue
        try:
            if fe.files is not None:
                result.watch.extend(fe.files)
                items = file_items(root, fe.files, fe.exclude, output_dir)
            elif fe.items is not None:
                items = list_items(fe.items)
            else:
                items = list(given[task.id])
            if len(items) > fe.max_items:
                raise FanoutError("foreach", f"foreach gives {len(items):,} items, more than "
                                  f"max_items ({fe.max_items}); narrow it (exclude:) or raise "
                                  "max_items")
            made = instantiate(task, items)
        except FanoutError as exc:
            result.problems.append((i, exc))
            made = []
        result.groups[task.id] = tuple(t.id for t in made)
        result.tasks.extend(made)
        result.origin.extend([i] * len(made))
    if result.groups:
        result.tasks = [_redirect(t, result.groups) for t in result.tasks]
    return result


def grow(spec: DispatchSpec, p: int, items: Sequence[Item]) -> DispatchSpec:
    """`spec` with the tasks of the `from:` fan-out `p` appended (the other tasks keep
    their index: the scheduler is running them).  They take `p`'s dependencies; `p`
    waits for all of them, a join without a process; `p`'s dependents read their
    outputs, in item order."""
    task = spec.tasks[p]
    limit = task.foreach.max_items if task.foreach is not None else 0
    if len(items) > limit:
        raise FanoutError("from", f"{len(items):,} items, more than max_items ({limit})")
    made = instantiate(task, items)
    taken = {posixpath.normpath(t.output): t.id for t in spec.tasks if t.foreach is None}
    for t in made:
        norm = posixpath.normpath(t.output)
        top = norm.split("/", 1)[0]
        if (os.path.isabs(t.output) or norm in (".", "..") or norm.startswith("../")
                or "\0" in norm or top in RESERVED_OUTPUTS or top.startswith(".dispatch")):
            raise FanoutError("output", f"the output '{t.output}' of '{t.id}' is not a "
                              "path inside the output dir that dispatch may write")
        other = taken.setdefault(norm, t.id)
        if other != t.id:
            raise FanoutError("output", f"the output '{t.output}' of '{t.id}' is also the "
                              f"output of '{other}'; put {{item}} or {{item.<field>}} in "
                              "output so each item gets its own")
    group = {task.id: tuple(t.id for t in made)}
    n = len(spec.tasks)
    tasks = [t if i == p else _redirect(t, group) for i, t in enumerate(spec.tasks)]
    deps = [list(d) for d in spec.graph.deps]
    deps.extend(list(spec.graph.deps[p]) for _ in made)
    deps[p].extend(range(n, n + len(made)))
    tasks.extend(made)
    return dataclasses.replace(
        spec, tasks=tuple(tasks), agents=spec.agents + (spec.agents[p],) * len(made),
        graph=Graph.build([t.id for t in tasks], deps), foreach={**spec.foreach, **group})


def _redirect(task: Task, groups: Mapping[str, tuple[str, ...]]) -> Task:
    """A dependency on a fan-out becomes one on each of its tasks, in item order."""
    if not any(d in groups for d in task.dependencies):
        return task
    deps: list[str] = []
    for d in task.dependencies:
        deps.extend(groups.get(d, (d,)))
    return task.model_copy(update={"dependencies": deps})


def grouped(ids: Sequence[str], groups: Mapping[str, Sequence[str]]) -> list[tuple[str, list[str]]]:
    """`ids` in order, each fan-out's members gathered under its id (where the `from:`
    task that joins them is, else where the first of them is); other ids stand alone
    as (id, [])."""
    owner = {m: g for g, members in groups.items() for m in members}
    out: list[tuple[str, list[str]]] = []
    at: dict[str, int] = {}
    for tid in ids:
        g = owner.get(tid, tid if groups.get(tid) else None)
        if g is None:
            out.append((tid, []))
            continue
        if g not in at:
            at[g] = len(out)
            out.append((g, []))
        if g != tid:
            out[at[g]][1].append(tid)
    return out


def collapsed(members: Sequence[str]) -> tuple[list[str], int]:
    """The members shown, and how many more are not."""
    if len(members) <= COLLAPSE_AFTER:
        return list(members), 0
    return list(members[:COLLAPSE_AFTER]), len(members) - COLLAPSE_AFTER
