"""Task file → validated `DispatchSpec`, reporting every problem at once.

Validation never touches the output directory except to read symlinks, so a
file with errors runs nothing and writes nothing.
"""

from __future__ import annotations

import difflib
import errno
import gc
import hashlib
import os
import posixpath
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .agents import SHELL_AGENT
from .config import (
    ProjectConfig,
    find_project_root,
    git_toplevel,
    load_config,
    resolve_settings,
)
from .errors import ConfigError, Diagnostic, TaskFileError
from .fanout import Expansion, Item, expand
from .graph import Graph, find_cycles
from .model import (
    MAX_ARG_BYTES,
    MAX_ID_CHARS,
    MAX_NAME_BYTES,
    MAX_PATH_BYTES,
    RESERVED_OUTPUTS,
    STAGED_NAME,
    Foreach,
    Settings,
    Task,
    TaskFile,
)
from .resolve import AgentResolver, ResolveError
from .spec import DispatchSpec
from .suggest import Suggester
from .yamlsafe import Document, load_yaml

_FIELDS: dict[str, list[str]] = {
    "root": list(TaskFile.model_fields),
    "task": list(Task.model_fields),
    "settings": list(Settings.model_fields),
    "foreach": [f.alias or name for name, f in Foreach.model_fields.items()],
}


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Parsing builds ~15 objects per task and no cycles; without this pause, the
    cyclic collector re-walks the growing document over and over (30% of the time
    for a 50,000-task file).  Reference counting still frees all garbage."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def load_spec(
    path: str | Path,
    *,
    overrides: dict[str, Any] | None = None,
    config_path: str | Path | None = None,
    cwd: Path | None = None,
    default_subdir: str | None = None,
    config: ProjectConfig | None = None,
    confine_to: Sequence[Path] = (),
    foreach_items: Mapping[str, Sequence[Item]] | None = None,
) -> DispatchSpec:
    """Parse, validate and resolve one task file; raise `TaskFileError` listing all errors.

    `default_subdir` gives each file its own directory under a default output
    dir, and `config` replaces reading `.aiwg/dispatch.toml` (the daemon's
    layout, and its config as of the last start or SIGHUP). A file that a symlink
    leads out of its project, the current directory and `confine_to` is refused
    unread (`check_confined`). `foreach_items` gives `from:` fan-outs their items
    (their source's output, fanout.py); without them those stay one unexpanded task.
    """
    root = config.root if config is not None else find_project_root(Path(path), cwd)
    roots = [root, *confine_to] if config is not None else [root, cwd or Path.cwd(), *confine_to]
    check_confined(Path(path), roots)
    with _gc_paused():
        return _load_spec(Path(path), overrides, config_path, cwd, default_subdir, config,
                          foreach_items)


def _load_spec(
    path: Path, overrides: dict[str, Any] | None, config_path: str | Path | None,
    cwd: Path | None, default_subdir: str | None, given_config: ProjectConfig | None,
    foreach_items: Mapping[str, Sequence[Item]] | None = None,
) -> DispatchSpec:
    display = str(path)
    doc = load_yaml(path, display)
    checker = _Checker(doc)
    model = checker.validate_model()
    checker.check_graph()
    root = given_config.root if given_config else find_project_root(path, cwd)
    schemas = checker.check_output_schemas(path, root)
    if model is not None and schemas:
        model = _with_schemas(model, schemas)
    config: ProjectConfig | None = given_config
    if config is None:
        try:
            config = load_config(root, Path(config_path) if config_path else None)
        except ConfigError as exc:
            checker.diagnostics.extend(exc.diagnostics)
    spec = None
    if config is not None:
        # Outputs and agents are checked even when the schema has errors, from the
        # raw tasks, so that every problem of the file is reported in one pass.
        file_settings = model.settings if model is not None else _settings_or_default(doc.data)
        settings = resolve_settings(root, file_settings, config, overrides or {},
                                    default_subdir)
        checker.check_overrides(overrides or {})
        checker.check_outputs(settings.output_dir)
        agents = checker.check_agents(config)
        checker.check_isolation(root, settings.isolation)
        fanned = Expansion()
        if model is not None and not checker.diagnostics:
            fanned = checker.check_foreach(model.tasks, root, settings.output_dir,
                                           foreach_items)
        if model is not None and not checker.diagnostics:
            tasks, edges = model.tasks, checker.edges
            if fanned.tasks:
                tasks, edges = fanned.tasks, _edges(fanned.tasks)
                agents = [agents[i] for i in fanned.origin]
            graph = Graph.build([t.id for t in tasks], edges)
            spec = DispatchSpec(
                path=path, display=display, name=model.name or path.stem,
                description=model.description, tasks=tuple(tasks),
                agents=tuple(agents), graph=graph, settings=settings, config=config,
                source_hash=hashlib.sha256(_as_bytes(doc.text)).hexdigest(),
                foreach=fanned.groups, foreach_watch=tuple(fanned.watch),
            )
    if checker.diagnostics or spec is None:
        raise TaskFileError(sorted(checker.diagnostics, key=_order))
    return spec


def _edges(tasks: Sequence[Task]) -> list[list[int]]:
    """Dependency edges of the expanded task list (validated before expansion)."""
    index = {t.id: i for i, t in enumerate(tasks)}
    return [[index[d] for d in t.dependencies] for t in tasks]


def _with_schemas(model: TaskFile, schemas: dict[int, dict[str, Any]]) -> TaskFile:
    """Each `output_schema` path replaced by the schema it names (already checked)."""
    tasks = [t.model_copy(update={"output_schema": schemas[i]}) if i in schemas else t
             for i, t in enumerate(model.tasks)]
    return model.model_copy(update={"tasks": tasks})


def _settings_or_default(data: Any) -> Settings:
    """The file's settings if they are valid on their own, else none (already reported)."""
    raw = data.get("settings") if isinstance(data, dict) else None
    try:
        return Settings.model_validate(raw if isinstance(raw, dict) else {})
    except ValidationError:
        return Settings()


def _str_field(raw: Any, key: str) -> str | None:
    value = raw.get(key) if isinstance(raw, dict) else None
    return value if isinstance(value, str) and value else None


def _as_bytes(text: bytes | str) -> bytes:
    return text.encode("utf-8") if isinstance(text, str) else text


def _order(d: Diagnostic) -> tuple[str, int, int]:
    return (d.file, d.line or 0, d.column or 0)


def did_you_mean(word: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ""


class _Checker:
    """Accumulates diagnostics for one document."""

    def __init__(self, doc: Document) -> None:
        self.doc = doc
        self.diagnostics: list[Diagnostic] = []
        data = doc.data
        self.raw_tasks: list[Any] = []
        self.edges: list[list[int]] = []
        if isinstance(data, dict) and isinstance(data.get("tasks"), list):
            self.raw_tasks = data["tasks"]

    def add(self, loc: tuple[str | int, ...], message: str, key: bool = False) -> None:
        pos = self.doc.positions.of(loc, key=key)
        line, col = pos if pos else (None, None)
        self.diagnostics.append(Diagnostic(self.doc.file, line, col, message, self.task_id(loc)))

    def task_id(self, loc: tuple[str | int, ...]) -> str | None:
        if len(loc) >= 2 and loc[0] == "tasks" and isinstance(loc[1], int):
            i = loc[1]
            raw = self.raw_tasks[i] if i < len(self.raw_tasks) else None
            tid = raw.get("id") if isinstance(raw, dict) else None
            if isinstance(tid, str) and len(tid) <= MAX_ID_CHARS and not _CONTROL.search(tid):
                return tid
            return f"#{i + 1}"  # no id, or one that must not reach a terminal as it is
        return None

    # -- schema ---------------------------------------------------------------
    def validate_model(self) -> TaskFile | None:
        data = self.doc.data
        if not isinstance(data, dict):
            self.add((), "a task file must be a mapping with a 'tasks:' list")
            return None
        try:
            return TaskFile.model_validate(data)
        except ValidationError as exc:
            bad_items: dict[tuple[str | int, ...], list[Any]] = {}
            for err in exc.errors():
                loc = tuple(err["loc"])
                if _is_foreach_item(loc):
                    # One line per bad item, not one per member of the item type's union
                    # (pydantic's own locations name its internal union members).
                    bad_items.setdefault(loc[:5], []).append(err)
                    continue
                self.add(loc, self._message(err, loc), key=err["type"] == "extra_forbidden")
            for loc, errs in bad_items.items():
                self.add(loc, _item_message(loc, errs))
            return None

    def _message(self, err: Any, loc: tuple[str | int, ...]) -> str:
        kind = err["type"]
        key = str(loc[-1]) if loc else ""
        section = "root"
        if len(loc) >= 4 and loc[0] == "tasks" and loc[2] == "foreach":
            section = "foreach"
        elif len(loc) >= 3 and loc[0] == "tasks":
            section = "task"
        elif loc and loc[0] == "settings":
            section = "settings"
        if kind == "extra_forbidden":
            return (f"unknown key {_quoted(key)}{did_you_mean(key, _FIELDS[section])} "
                    f"(allowed: {', '.join(_FIELDS[section])})")
        if kind == "missing":
            return f"missing required key '{key}'"
        if loc == ("tasks",) and kind == "too_short":
            return "the task list is empty; add at least one task"
        got = err.get("input")
        field = ".".join(str(p) for p in loc if not isinstance(p, int) or section != "task")
        if section in ("task", "foreach"):
            field = ".".join(str(p) for p in loc[2:])
        if kind == "string_pattern_mismatch":
            return f"'{field}' must use only letters, digits, '.', '_' and '-' (got {_short(got)})"
        if kind in ("greater_than", "greater_than_equal"):
            bound = err.get("ctx", {}).get("gt", err.get("ctx", {}).get("ge"))
            op = ">" if kind == "greater_than" else "≥"
            return f"'{field}' must be {op} {bound} (got {_short(got)})"
        if kind == "literal_error":
            return f"'{field}' must be one of {err['ctx']['expected']} (got {_short(got)})"
        if kind in ("less_than_equal", "string_too_long", "finite_number"):
            return _limit_message(kind, field, err.get("ctx", {}), got)
        if kind == "value_error":  # model.py's own checks say what to do themselves
            said = str(err["ctx"]["error"])
            return f"'{field}': {said}" + ("" if "(got " in said else f" (got {_short(got)})")
        return f"'{field}': {err['msg'].lower()} (got {_short(got)})"

    def check_overrides(self, overrides: dict[str, Any]) -> None:
        """Command-line flags (and the Action's inputs) obey the limits the file does."""
        given = {k: v for k, v in overrides.items() if v is not None and k in _FLAGS}
        try:
            Settings.model_validate(given)
        except ValidationError as exc:
            for err in exc.errors():
                key = str(err["loc"][0])
                text = self._message(err, ("settings", key)).replace(
                    f"'settings.{key}'", f"{_FLAGS[key]} ({key})", 1)
                self.diagnostics.append(Diagnostic(self.doc.file, None, None, text))

    # -- graph ----------------------------------------------------------------
    def check_graph(self) -> None:
        ids: dict[str, int] = {}
        for i, raw in enumerate(self.raw_tasks):
            if isinstance(raw, dict) and isinstance(raw.get("id"), str):
                if raw["id"] in ids:
                    first = self.doc.positions.of(("tasks", ids[raw["id"]], "id"))
                    self.add(("tasks", i, "id"),
                             f"duplicate id {_quoted(raw['id'])} (first defined on line "
                             f"{first[0] if first else '?'}); ids must be unique")
                else:
                    ids[raw["id"]] = i
        suggester = Suggester(ids)  # did-you-mean, near-linear in unknown deps
        edges: list[list[int]] = [[] for _ in self.raw_tasks]
        self.edges = edges
        for i, raw in enumerate(self.raw_tasks):
            deps = raw.get("dependencies") if isinstance(raw, dict) else None
            if not isinstance(deps, list):
                continue
            own, found = raw.get("id"), edges[i]
            for j, dep in enumerate(deps):
                if not isinstance(dep, str):
                    continue
                k = ids.get(dep)
                if k is not None and dep != own:
                    found.append(k)
                    continue
                loc = ("tasks", i, "dependencies", j)
                if dep == own:
                    self.add(loc, "a task cannot depend on itself; remove it from 'dependencies'")
                else:
                    near = suggester.closest(dep)  # (an id may itself be invalid: quoted)
                    hint = f"; did you mean {_quoted(near)}?" if near else ""
                    self.add(loc, f"unknown dependency {_quoted(dep)}{hint}")
        for cycle in find_cycles(edges):
            # (the cycle ends with its first task again; a long one is shown shortened)
            long = len(cycle) > 12
            shown = [*cycle[:8], -1, *cycle[-2:]] if long else cycle
            arrow = " → ".join("…" if i < 0 else _quoted(self.raw_tasks[i]["id"], "")
                               for i in shown)
            if long:
                arrow += f" ({len(cycle) - 1:,} tasks)"
            self.add(("tasks", cycle[0], "dependencies"),
                     f"dependency cycle: {arrow} (each depends on the next); break one link")

    # -- outputs and agents -----------------------------------------------------
    def check_outputs(self, output_dir: Path) -> None:
        symlinks = _SymlinkCheck(output_dir)
        seen: dict[str, int] = {}
        dirs: dict[str, int] = {}
        norms: dict[int, str] = {}
        outputs = {i: out for i, raw in enumerate(self.raw_tasks)  # (`_str_field`, inlined)
                   if isinstance(raw, dict) and isinstance(out := raw.get("output"), str) and out}
        plain = _PLAIN_OUTPUT.fullmatch
        room = min(MAX_NAME_BYTES, MAX_PATH_BYTES // 4 - len(str(output_dir)) - 1)
        for i, out in outputs.items():
            loc = ("tasks", i, "output")
            if plain(out):  # most outputs: only the checks of `_name_problem` can apply,
                norm = out[:-1] if out[-1] == "/" else out
                # and to a plain one only if it is long or its top is a reserved name
                if len(norm) > room or norm.partition("/")[0] in RESERVED_OUTPUTS:
                    problem = _name_problem(out, norm, output_dir)
                    if problem is not None:
                        self.add(loc, problem)
                        continue
            else:
                normal = self._unusual_output(loc, out, output_dir)
                if normal is None:
                    continue
                norm = normal
            escape = symlinks.escape(norm)
            if escape is not None:
                self.add(loc, f"output {_quoted(out)} {escape}")
                continue
            if norm in seen:
                other = self.task_id(("tasks", seen[norm]))
                self.add(loc, f"output {_quoted(out)} is also the output of task '{other}'; "
                              "give each task its own output")
                continue
            seen[norm] = i
            norms[i] = norm
            if out.endswith("/"):
                dirs[norm] = i
        for i, norm in norms.items():
            # (`norm` is normalised and relative: rpartition is posixpath.dirname, faster)
            parent = norm.rpartition("/")[0]
            while parent:
                j = seen.get(parent)
                if j is not None and j != i:  # a file output cannot hold another one either
                    kind = "directory output" if parent in dirs else "output (a file)"
                    self.add(("tasks", i, "output"),
                             f"output {_quoted(outputs[i])} is inside the {kind} "
                             f"{_quoted(outputs[j])} of task '{self.task_id(('tasks', j))}'; "
                             "outputs must not overlap")
                    break
                parent = parent.rpartition("/")[0]

    def _unusual_output(self, loc: tuple[str | int, ...], out: str,
                        output_dir: Path) -> str | None:
        """`out` normalised, or None when it cannot be an output (reported)."""
        norm = posixpath.normpath(out.replace("\\", "/"))
        if os.path.isabs(out) or out.startswith("~") or norm.startswith("/"):
            self.add(loc, f"output {_quoted(out)} is absolute; give a path relative to "
                          f"output_dir ({output_dir})")
            return None
        if norm == ".." or norm.startswith("../"):
            self.add(loc, f"output {_quoted(out)} leaves the output dir through '..'")
            return None
        if norm == ".":
            self.add(loc, f"output {_quoted(out)} names the output dir itself; name a file or "
                          "directory inside it")
            return None
        problem = _output_problem(out, norm, output_dir)
        if problem is not None:
            self.add(loc, problem)
            return None
        return norm

    def check_foreach(self, tasks: Sequence[Task], root: Path, output_dir: Path,
                      given: Mapping[str, Sequence[Item]] | None) -> Expansion:
        """Expand the fan-outs; report their problems, and outputs that collide, at the
        `foreach` task."""
        if not any(t.foreach is not None for t in tasks):
            return Expansion()  # (most files: nothing to do for 50,000 tasks)
        ids = {t.id: i for i, t in enumerate(tasks)}
        for i, task in enumerate(tasks):
            source = task.foreach.from_ if task.foreach is not None else None
            if source is None:
                continue
            if source not in ids or source == task.id or tasks[ids[source]].foreach:
                what = ("itself" if source == task.id else f"unknown task {_quoted(source)}"
                        if source not in ids else f"the fan-out {_quoted(source)}")
                self.add(("tasks", i, "foreach", "from"),
                         f"from: names {what}; give the id of the one task whose output (a "
                         "JSON array) lists the items")
            elif source not in task.dependencies:  # it must finish first
                tasks = [*tasks[:i], task.model_copy(update={
                    "dependencies": [*task.dependencies, source]}), *tasks[i + 1:]]
        if self.diagnostics:
            return Expansion()
        fanned = expand(tasks, root, output_dir, given)
        for i, exc in fanned.problems:
            where: tuple[str | int, ...] = ("tasks", i, "foreach")
            if exc.field in ("files", "items", "from"):
                where = (*where, exc.field)
            elif exc.field in ("prompt", "output"):
                where = ("tasks", i, exc.field)
            self.add(where, str(exc))
        pairs = list(zip(fanned.tasks, fanned.origin, strict=True))
        seen = {posixpath.normpath(t.output): n for n, (t, i) in enumerate(pairs)
                if tasks[i].foreach is None or t.foreach is not None}
        for n, (task, i) in enumerate(pairs):
            if tasks[i].foreach is None or task.foreach is not None:
                continue
            loc = ("tasks", i, "output")
            norm = self._unusual_output(loc, task.output, output_dir)
            if norm is None:
                return fanned
            other = seen.setdefault(norm, n)
            if other != n:
                self.add(loc, f"output {_quoted(task.output)} of '{task.id}' is also the "
                              f"output of '{fanned.tasks[other].id}'; put {{stem}}, {{path}}, "
                              "{item} or {item.<field>} in output so each item gets its own")
                return fanned
        return fanned

    def check_output_schemas(self, path: Path, root: Path) -> dict[int, dict[str, Any]]:
        """Each task's `output_schema` as a checked schema (a path read, relative to the
        task file); problems are reported at the key, or inside an inline schema."""
        found: dict[int, dict[str, Any]] = {}
        for i, raw in enumerate(self.raw_tasks):
            given = raw.get("output_schema") if isinstance(raw, dict) else None
            if not isinstance(given, dict | str) or (isinstance(given, str)
                                                       and not given.strip()):
                continue  # absent, or a wrong shape the model already reported
            loc: tuple[str | int, ...] = ("tasks", i, "output_schema")
            output = raw.get("output")
            if isinstance(output, str) and output.endswith("/"):
                self.add(loc, "output_schema needs a file output (the JSON answer), not the "
                              f"directory {_quoted(output)}; remove the trailing '/'")
                continue
            if isinstance(given, str):
                schema = self._schema_file(loc, given, path, root)
                if schema is not None:
                    found[i] = schema
                continue
            from .output_schema import schema_problems

            problems = schema_problems(given)
            for where, problem in problems:
                self.add((*loc, *where), f"output_schema: {problem}")
        return found

    def _schema_file(self, loc: tuple[str | int, ...], given: str, path: Path,
                     root: Path) -> dict[str, Any] | None:
        """The schema in file `given` (relative to the task file, inside the project or
        the task file's folder), or None (reported, naming both files)."""
        from .yamlsafe import load_yaml

        if _CONTROL.search(given):  # it would reach the terminal in every message below
            self.add(loc, f"output_schema {_quoted(given)} holds a control or invisible "
                          "character; name the schema file with printable characters")
            return None
        folder = path.parent
        target = Path(os.path.expanduser(given)) if given.startswith("~") else folder / given
        real = os.path.realpath(target)
        if not any(_inside(real, os.path.realpath(r)) for r in (root, folder)):
            self.add(loc, f"output_schema {_quoted(given)} resolves to {real}, outside the "
                          f"project ({root}); keep schema files in the project")
            return None
        try:
            doc = load_yaml(target, given)
        except TaskFileError as exc:
            first = exc.diagnostics[0]
            where = f"{first.file}:{first.line}" if first.line is not None else first.file
            hint = (f" (looked for {os.path.abspath(target)}; the path is relative to the "
                    "task file)" if first.line is None and "not found" in first.message else "")
            self.add(loc, f"output_schema: {where}: {first.message}{hint}")
            return None
        if not isinstance(doc.data, dict):
            self.add(loc, f"output_schema: {given}: a JSON Schema must be a mapping (got "
                          f"{type(doc.data).__name__})")
            return None
        from .output_schema import schema_problems

        for where_in, problem in schema_problems(doc.data):
            pos = doc.positions.of(where_in)
            at = f"{given}:{pos[0]}" if pos else given
            self.add(loc, f"output_schema: {at}: {problem}")
            return None
        return doc.data

    def check_isolation(self, root: Path, default: str) -> None:
        """`isolation: worktree` needs a git repository around the project root."""
        data = self.doc.data
        raw_settings = data.get("settings") if isinstance(data, dict) else None
        from_file = (isinstance(raw_settings, dict)
                     and raw_settings.get("isolation") == "worktree")
        where: list[tuple[str | int, ...]] = []
        for i, raw in enumerate(self.raw_tasks):
            own = raw.get("isolation") if isinstance(raw, dict) else None
            if own == "worktree":
                where.append(("tasks", i, "isolation"))
            elif own is None and default == "worktree" and not from_file:
                where.append(("tasks", i))  # the default comes from dispatch.toml
        if from_file:
            where.insert(0, ("settings", "isolation"))
        if not where or git_toplevel(root) is not None:
            return
        for loc in where:
            self.add(loc, "isolation: worktree needs a git repository; run `git init` or "
                          f"remove it ({root} is not in one)")

    def check_agents(self, config: ProjectConfig) -> list[Any]:
        """Resolve every task's agent (None where it does not resolve)."""
        specs = []
        bad_env: dict[str, bool] = {}
        resolver = AgentResolver(config)
        for i, raw in enumerate(self.raw_tasks):
            name = _str_field(raw, "agent")
            spec: Any = None
            if name is not None and _CONTROL.search(name):
                self.add(("tasks", i, "agent"),
                         f"agent name {name!r} contains a control or invisible character; "
                         "agent names are plain words like 'shell' or 'code-reviewer'")
            elif name is not None:
                try:
                    spec = resolver.resolve(name)
                except ResolveError as exc:
                    self.add(("tasks", i, "agent"), str(exc))
            inputs = raw.get("inputs") if isinstance(raw, dict) else None
            if spec is not None and spec.name == SHELL_AGENT and inputs not in (None, "none"):
                self.add(("tasks", i, "inputs"),
                         "the shell agent's prompt is a script, so nothing can be appended to "
                         "it; remove 'inputs' and read $DISPATCH_INPUTS (a JSON object of "
                         "dependency id → output path) instead")
            if spec is not None:
                self._check_prompt(i, raw, spec)
                if spec.name not in bad_env:
                    bad_env[spec.name] = self._check_env(i, spec, config)
            specs.append(spec)
        return specs

    def _check_prompt(self, i: int, raw: Any, spec: Any) -> None:
        """An argument cannot hold a NUL, nor (on Linux) 128 KiB or more."""
        prompt = _str_field(raw, "prompt")
        if prompt is None or spec.runner is not None or spec.prompt_mode != "arg":
            return
        if "\0" in prompt:
            self.add(("tasks", i, "prompt"),
                     f"the prompt contains a NUL character, which cannot be passed as an "
                     f"argument (agent '{spec.name}' takes its prompt as one); remove it")
        elif spec.source != "built-in" and len(prompt.encode()) > MAX_ARG_BYTES:
            # (the built-in shell agent runs a long script from a file instead)
            self.add(("tasks", i, "prompt"),
                     f"the prompt is {len(prompt.encode()):,} bytes, and agent '{spec.name}' "
                     f"({spec.source}) takes it as an argument, which Linux limits to 128 KiB; "
                     "set prompt = \"stdin\" for that agent, or shorten the prompt")

    def _check_env(self, i: int, spec: Any, config: ProjectConfig) -> bool:
        """`env` entries that no process could be given (reported once per agent)."""
        for key, value in spec.env.items():
            if key and "=" not in key and "\0" not in key and "\0" not in value:
                continue
            if not key:
                what = "has an empty variable name"
            elif "=" in key or "\0" in key:
                what = f"variable {key!r} has '=' or a NUL in its name"
            else:
                what = f"variable {key!r} has a NUL in its value"
            where = f" in {config.path}" if config.path is not None else ""
            self.add(("tasks", i, "agent"),
                     f"agent '{spec.name}': the env of {spec.source}{where} {what}; names "
                     "must be non-empty without '=' or NUL, values without NUL")
            return True
        return False


def _output_problem(out: str, norm: str, output_dir: Path) -> str | None:
    """A name the file system, or dispatch itself, would refuse at run time."""
    bad = _CONTROL.search(out)
    if bad is not None:
        code = ord(bad.group())
        kind = ("a control character" if code < 0x20 or 0x7F <= code <= 0x9F
                else "an invisible or direction-changing character")
        return f"output {_short(out)} contains {kind} (U+{code:04X}); use printable characters"
    return _name_problem(out, norm, output_dir)


_PLAIN_OUTPUT = re.compile(r"(?:[A-Za-z0-9_][\w.-]*/)*[A-Za-z0-9_][\w.-]*/?", re.ASCII)
"""An output that is normalised (but for a final `/`) and relative, in printable ASCII,
no part of it starting with a dot: of the checks of `_output_problem` only those of
`_name_problem` can apply to it.  Most outputs; this skips 0.05 s of 50,000."""


def _name_problem(out: str, norm: str, output_dir: Path) -> str | None:
    """A reserved name, or a part or whole path too long: `_output_problem` without the
    character check."""
    top = norm.split("/", 1)[0]
    if (top in RESERVED_OUTPUTS or top.startswith(".dispatch")
            or STAGED_NAME.match(norm.rpartition("/")[2])):
        return (f"output {_quoted(out)} is reserved for dispatch's own files (reports, logs/, "
                "changes/, state, staging); rename it")
    # A UTF-8 character takes at most 4 bytes: most paths need no encoding to be sure.
    for part in norm.split("/") if len(norm) * 4 > MAX_NAME_BYTES else ():
        if len(part.encode()) > MAX_NAME_BYTES:
            return (f"output '{_clip(out)}': the name '{_clip(part)}' is "
                    f"{len(part.encode()):,} bytes; each part of an output path is limited "
                    f"to {MAX_NAME_BYTES} bytes (file names end at 255); shorten it")
    if ((len(str(output_dir)) + 1 + len(norm)) * 4 > MAX_PATH_BYTES
            and len(f"{output_dir}/{norm}".encode()) > MAX_PATH_BYTES):
        return (f"output '{_clip(out)}' is too long: with the output dir it makes a path of "
                f"{len(f'{output_dir}/{norm}'.encode()):,} bytes (at most {MAX_PATH_BYTES:,})")
    return None


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b\u200e\u200f\u2028-\u202e"
                      "\u2060\u2066-\u2069\ufeff]")
"""Control characters (C0, DEL, C1), line separators, and the invisible or bidirectional
formatting ones that make a name print as another (`a\u202etxt.exe` shows as `aexe.txt`).
ZWJ and ZWNJ stay allowed: some scripts need them."""


def _quoted(text: str, quote: str = "'") -> str:
    """`text` in quotes, or as a Python literal when it holds a control or invisible
    character: a diagnostic must not carry a raw ESC, newline or NUL to the terminal."""
    return repr(text) if _CONTROL.search(text) else f"{quote}{text}{quote}"


def _clip(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


class _SymlinkCheck:
    """Finds outputs that a symlink would carry outside the output dir, or that a
    symlink loop or a file in the way would make impossible to write.

    Resolves each distinct parent directory once and lists it once, so 50,000
    outputs in a handful of directories cost a handful of system calls.
    """

    def __init__(self, output_dir: Path) -> None:
        self.base = str(output_dir)
        self.root = os.path.realpath(output_dir)
        self._dirs: dict[str, str | None] = {}
        self._links: dict[str, frozenset[str]] = {}

    def _inside(self, real: str) -> bool:
        return real == self.root or real.startswith(self.root.rstrip(os.sep) + os.sep)

    def _dir_escape(self, rel: str) -> str | None:
        if rel not in self._dirs:
            self._dirs[rel] = self._dir_problem(rel)
        return self._dirs[rel]

    def _dir_problem(self, rel: str) -> str | None:
        if not rel:
            return None
        path = os.path.join(self.base, rel)
        try:
            os.stat(path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return (f"goes through a symlink loop ({path}: {exc.strerror}); remove the "
                        "loop or choose another path")
            if exc.errno == errno.ENOTDIR:
                return (f"needs {rel} to be a folder, but something in that path is a file; "
                        "choose another path")
        real = os.path.realpath(path)
        if self._inside(real):
            return None
        return f"leaves the output dir through a symlink (it resolves to {real})"

    def _symlinks(self, rel: str) -> frozenset[str]:
        if rel not in self._links:
            try:
                with os.scandir(os.path.join(self.base, rel)) as it:
                    self._links[rel] = frozenset(e.name for e in it if e.is_symlink())
            except OSError:
                self._links[rel] = frozenset()
        return self._links[rel]

    def escape(self, norm: str) -> str | None:
        """What is wrong with writing `norm` (normalised, relative: it leads outside, ...),
        else None."""
        parent, _, name = norm.rpartition("/")
        bad = self._dir_escape(parent)
        if bad is not None:
            return bad
        if name in self._symlinks(parent):
            real = os.path.realpath(os.path.join(self.base, norm))
            if not self._inside(real):
                return f"leaves the output dir through a symlink (it resolves to {real})"
        return None


def _limit_message(kind: str, field: str, ctx: dict[str, Any], got: Any) -> str:
    """Past one of model.py's upper bounds: say the bound, and what it means."""
    if kind == "finite_number":
        return f"'{field}' must be a finite number (got {_short(got)})"
    if kind == "string_too_long":
        return (f"'{field}' is {len(got):,} characters long; at most {ctx['max_length']} are "
                "allowed (it names files, and file names end at 255 bytes)")
    bound = ctx.get("le")
    shown = f"{bound:,}" if isinstance(bound, int) else f"{bound:g}"
    if field.rsplit(".", 1)[-1] in _MS_FIELDS:
        shown += " ms (30 days)"
    elif field.rsplit(".", 1)[-1] == "retry_backoff":
        shown += " s (1 hour)"
    return f"'{field}' must be ≤ {shown} (got {_short(got)})"


_MS_FIELDS = ("timeout", "timeout_per_task", "idle_timeout")
_FLAGS = {"max_parallel": "--max-parallel", "timeout_per_task": "--timeout",
          "idle_timeout": "--idle-timeout", "max_cost_usd": "--max-cost"}


def _is_foreach_item(loc: tuple[str | int, ...]) -> bool:
    """A location inside one `foreach: items:` entry (tasks, i, foreach, items, j, ...)."""
    return (len(loc) > 5 and loc[0] == "tasks" and loc[2] == "foreach" and loc[3] == "items"
            and isinstance(loc[4], int))


def _item_message(loc: tuple[str | int, ...], errs: list[Any]) -> str:
    """What a bad `foreach: items:` entry must be instead: a mapping's bad fields by name."""
    fields = sorted({str(e["loc"][6]) for e in errs if len(e["loc"]) > 6})
    if fields:
        bad = ", ".join(_quoted(f) for f in fields)
        return (f"'foreach.items.{loc[4]}': field{'s' if len(fields) > 1 else ''} {bad} must "
                f"be a string, number, true/false or null, not a list or mapping")
    return (f"'foreach.items.{loc[4]}': an item must be a string or a flat mapping of "
            f"strings, numbers, true/false or null (got {_short(errs[0].get('input'))})")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_confined(path: Path, roots: Sequence[Path]) -> None:
    """Refuse a task file that a symlink leads out of `roots`, before opening it.

    A file whose path (as given, made absolute) lies under one of `roots` must
    really be inside one of them once every symlink is resolved; a file under
    none may itself be a symlink only into its own folder or a root. Symlinked
    folders *above* a root (`/home` → `/var/home`) do not matter. Why: the daemon
    runs as root and a PR controls the Action's checkout, so whoever can drop a
    symlink must not make us read `/etc/shadow` or `/proc/self/environ` and quote it
    back in an error. Nothing of a refused target is read; the error names only
    where the link leads. (A link swapped between this check and the read is not
    caught: that needs write access to the folder at that very moment.)
    """
    lexical = os.path.abspath(path)
    real = os.path.realpath(path)
    if real == lexical:
        return  # no symlink anywhere on the way
    folders = [(os.path.abspath(r), os.path.realpath(r)) for r in roots]
    if any(_inside(real, r_real) for _, r_real in folders):
        return
    under = [r_lex for r_lex, r_real in folders
             if _inside(lexical, r_lex) or _inside(lexical, r_real)]
    if not under:
        if not os.path.islink(lexical):
            return  # only folders above it are links: the path was chosen as a whole
        if _inside(real, os.path.realpath(os.path.dirname(lexical))):
            return
        under = [os.path.dirname(lexical)]
    raise TaskFileError([Diagnostic(
        str(path), None, None,
        f"reached through a symlink that leads to {real}, outside {under[0]}; a task "
        "file must really be in its project (a link may point only within it), so it "
        "was not read. Copy the file in instead of linking to it")])
