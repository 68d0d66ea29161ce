"""Agent definitions: Markdown files with YAML frontmatter, as Claude Code and AIWG write them.

A task says `agent: security-architect`; the definition tells the runner which system
prompt (the Markdown body), model and tools to give the CLI.  The format is Claude Code's
subagent file::

    ---
    name: security-architect
    description: Reviews designs for security flaws
    model: sonnet            # optional; "inherit" means "no override"
    tools: Read, Grep, Glob  # optional; a comma-separated string or a YAML list
    ---
    You are a security architect...

Search order (the first definition of a name wins, later ones are *shadowed*):

1. `<project>/.aiwg/agents/`
2. `<project>/.claude/agents/`
3. `<project>/.codex/agents/`
4. `<project>/.opencode/agent/`
5. `<project>/.cursor/agents/`
6. `<home>/.claude/agents/`  (home defaults to `$HOME`)

Only `*.md` files directly inside those folders are read (`README*.md` is skipped).
Within a folder, files are taken in name order.  Two kinds of Markdown file there are
not agents, and are *skipped* (listed as notes by `agents` and `doctor`, never errors):
files without frontmatter (AIWG keeps notes such as `openai-compat.md` beside its
agents; Claude Code ignores them too) and templates, whose name is a placeholder such
as AIWG's `agent-template.md` with `name: <AGENT_NAME>` (Claude Code 2.1.332 does list
that one as an agent; it cannot do anything useful, so it is not offered here).

A task's `agent: X` matches a definition whose frontmatter `name` or file stem folds
to the same key as X: case-insensitive, with runs of spaces, hyphens and underscores
treated as one hyphen ("Security Architect" == `security-architect` ==
`security_architect`).

Errors: a malformed file never hides the others.  `scan()` returns the good
definitions, the skipped files, and, separately, one `AgentDefinitionError` per bad
file, so the dispatcher can report bad files only when they matter (an unknown agent, or
`parallel-dispatch agents` / `doctor`) instead of failing every run.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import Diagnostic, DispatchError
from .probe import exists

PROJECT_AGENT_DIRS: tuple[str, ...] = (
    ".aiwg/agents",
    ".claude/agents",
    ".codex/agents",
    ".opencode/agent",
    ".cursor/agents",
)
HOME_AGENT_DIRS: tuple[str, ...] = (".claude/agents",)

#: Frontmatter keys with a meaning here; anything else is kept in `extra`.
KNOWN_KEYS = frozenset({"name", "description", "model", "tools"})

_FOLD_RE = re.compile(r"[\s_\-]+")

#: Template placeholders: `<AGENT_NAME>` (AIWG), `{{name}}` (mustache), `${NAME}`.
_PLACEHOLDER_RE = re.compile(r"<[A-Za-z_][^<>]*>|\{\{.*?\}\}|\$\{[^}]*\}")

NO_FRONTMATTER = "no frontmatter"
TEMPLATE = "template"


def fold(name: str) -> str:
    """The lookup key for an agent name: "Security Architect" -> "security-architect"."""
    return _FOLD_RE.sub("-", name.strip().casefold()).strip("-")


class AgentDefinitionError(DispatchError):
    """One agent definition file is malformed; says which file and, when known, which line."""

    def __init__(self, path: Path, line: int | None, message: str) -> None:
        self.path = Path(path)
        self.line = line
        self.message = message
        super().__init__(self.to_diagnostic().format())

    def to_diagnostic(self) -> Diagnostic:
        """The shared error shape, so CLI and reports print it like any other input error."""
        return Diagnostic(file=str(self.path), line=self.line, column=None, message=self.message)


class NotAnAgentFile(AgentDefinitionError):
    """A Markdown file that is not an agent definition at all: no frontmatter, or a template.

    `parse_file` raises it like any error (the caller asked for that file); `scan`
    records the file as skipped instead, since agent folders legitimately hold both.
    """

    def __init__(self, path: Path, line: int | None, message: str, reason: str,
                 detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(path, line, message)


class UnreadableFolder(AgentDefinitionError):
    """An agent folder that exists but cannot be listed (permissions): its agents are unknown."""


@dataclass(frozen=True)
class SkippedFile:
    """A Markdown file in an agent folder that is not an agent (see `NotAnAgentFile`)."""

    path: Path
    reason: str
    """`NO_FRONTMATTER` or `TEMPLATE`."""
    detail: str = ""

    def note(self) -> str:
        """How `agents` and `doctor` show it: "skipped: template (placeholder name ...)"."""
        return f"skipped: {self.reason}" + (f" ({self.detail})" if self.detail else "")


def is_placeholder(name: str) -> bool:
    """Whether a frontmatter name is a template placeholder like `<AGENT_NAME>`."""
    return bool(_PLACEHOLDER_RE.search(name))


@dataclass(frozen=True)
class AgentDefinition:
    """A parsed agent file: what a runner needs to run that agent."""

    name: str
    description: str
    model: str | None
    tools: tuple[str, ...]
    system_prompt: str
    path: Path
    #: Other frontmatter keys (e.g. opencode's `mode`, `temperature`), for runners that care.
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> str:
        """The folded name this definition is registered under."""
        return fold(self.name)


@dataclass(frozen=True)
class Discovery:
    """Everything found on one search: usable definitions, bad files, and where we looked."""

    #: Canonical folded name -> definition, in search order (for listing).
    agents: dict[str, AgentDefinition]
    #: Every lookup key (folded frontmatter name *and* folded file stem) -> definition.
    index: dict[str, AgentDefinition]
    errors: tuple[AgentDefinitionError, ...]
    #: Definitions that lost to an earlier one with the same key.
    shadowed: tuple[AgentDefinition, ...]
    searched: tuple[Path, ...]
    #: Markdown files that are not agents: no frontmatter, or a template.
    skipped: tuple[SkippedFile, ...] = ()

    def get(self, name: str) -> AgentDefinition | None:
        """The definition `agent: name` resolves to, or None."""
        return self.index.get(fold(name))

    def names(self) -> list[str]:
        """Display names of all usable definitions, in search order."""
        return [d.name for d in self.agents.values()]

    def unknown_message(self, name: str, also_known: Iterable[str] = ()) -> str:
        """A validation message for an unknown agent: did-you-mean, the known names, bad files.

        `also_known` lets the caller add agents known from elsewhere (configured ones),
        so the suggestion covers everything a task may name.
        """
        known = sorted({*self.names(), *also_known}, key=fold)
        parts = [f"unknown agent '{name}'"]
        hint = suggest(name, known)
        if hint:
            parts[0] += f"; did you mean '{hint}'?"
        parts.append("known agents: " + (", ".join(known) if known else "(none)"))
        folders = [e for e in self.errors if isinstance(e, UnreadableFolder)]
        files = [e for e in self.errors if not isinstance(e, UnreadableFolder)]
        if files:
            bad = ", ".join(str(e.path) for e in files)
            parts.append(f"unreadable agent definitions: {bad}")
        if folders:
            bad = ", ".join(str(e.path) for e in folders)
            parts.append(f"agent folders that cannot be read (it may be in one; make them "
                         f"readable with chmod u+rx, or remove them): {bad}")
        target = fold(name)
        for s in self.skipped:
            if fold(s.path.stem) == target:
                parts.append(f"{s.path} is not an agent definition ({s.note()})")
        return "; ".join(parts)


def search_dirs(project: Path, home: Path | None = None) -> list[Path]:
    """The folders searched, in priority order, without duplicates (project may be home)."""
    home_dir = Path(home) if home is not None else _default_home()
    candidates = [Path(project) / d for d in PROJECT_AGENT_DIRS]
    candidates += [home_dir / d for d in HOME_AGENT_DIRS]
    seen: set[Path] = set()
    result: list[Path] = []
    for directory in candidates:
        key = directory.resolve() if exists(directory) else directory.absolute()
        if key not in seen:
            seen.add(key)
            result.append(directory)
    return result


def _default_home() -> Path:
    # $HOME first so tests (and sandboxes) can redirect it; Path.home() also honours it
    # on POSIX, but be explicit about the contract.
    env = os.environ.get("HOME")
    return Path(env) if env else Path.home()



def _is_file(entry: os.DirEntry[str]) -> bool:
    """A file (or a symlink to one); an entry we may not stat is one too, so that
    `parse_file` reports it by name instead of it vanishing."""
    try:
        return entry.is_file()
    except OSError:
        return True


def _definition_files(directory: Path) -> list[Path]:
    """The candidate files of one folder; raises AgentDefinitionError if it cannot be listed."""
    try:
        if not directory.is_dir():
            return []
        with os.scandir(directory) as entries:
            files = [
                Path(e.path) for e in entries
                if e.name.lower().endswith(".md") and not e.name.lower().startswith("readme")
                and _is_file(e)
            ]
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise UnreadableFolder(
            directory, None,
            f"cannot list this agent folder ({why}); make it readable by the user running "
            "parallel-dispatch (chmod u+rx), or remove it") from None
    return sorted(files, key=lambda p: p.name)


def scan(project: Path, home: Path | None = None) -> Discovery:
    """Read every definition in the search path; never raises for a bad file."""
    dirs = search_dirs(project, home)
    agents: dict[str, AgentDefinition] = {}
    index: dict[str, AgentDefinition] = {}
    errors: list[AgentDefinitionError] = []
    shadowed: list[AgentDefinition] = []
    skipped: list[SkippedFile] = []
    for directory in dirs:
        try:
            paths = _definition_files(directory)
        except AgentDefinitionError as exc:
            errors.append(exc)
            continue
        for path in paths:
            try:
                definition = parse_file(path)
            except NotAnAgentFile as exc:
                skipped.append(SkippedFile(path, exc.reason, exc.detail))
                continue
            except AgentDefinitionError as exc:
                errors.append(exc)
                continue
            if definition.key in agents:
                shadowed.append(definition)
            else:
                agents[definition.key] = definition
            for alias in (definition.key, fold(path.stem)):
                index.setdefault(alias, definition)
    return Discovery(
        agents=agents,
        index=index,
        errors=tuple(errors),
        shadowed=tuple(shadowed),
        searched=tuple(dirs),
        skipped=tuple(skipped),
    )


def discover(project: Path, home: Path | None = None) -> dict[str, AgentDefinition]:
    """Usable definitions by folded name, first found winning; bad files are left to `scan()`."""
    return scan(project, home).agents


def find(name: str, project: Path, home: Path | None = None) -> AgentDefinition | None:
    """The definition `agent: name` resolves to (by frontmatter name or file stem), or None."""
    return scan(project, home).get(name)


def suggest(name: str, known: Iterable[str]) -> str | None:
    """A did-you-mean for a mistyped agent name, compared in folded form; None if nothing close."""
    by_key: dict[str, str] = {}
    for candidate in known:
        by_key.setdefault(fold(candidate), candidate)
    target = fold(name)
    if target in by_key:
        return by_key[target]
    matches = difflib.get_close_matches(target, list(by_key), n=1, cutoff=0.6)
    return by_key[matches[0]] if matches else None


def parse_file(path: Path) -> AgentDefinition:
    """Parse one definition file; raises AgentDefinitionError naming the file on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise AgentDefinitionError(path, None, f"not valid UTF-8 ({exc.reason})") from exc
    except OSError as exc:
        raise AgentDefinitionError(path, None, f"cannot read: {exc.strerror or exc}") from exc
    return parse_text(text, path)


def parse_text(text: str, path: Path) -> AgentDefinition:
    """Parse definition text; `path` names the file in errors and supplies the default name."""
    path = Path(path)
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if not lines or lines[0].strip() != "---":
        raise NotAnAgentFile(path, 1, "no YAML frontmatter: the file must start with a '---' line",
                             NO_FRONTMATTER, "not an agent definition")
    try:
        end = next(i for i in range(1, len(lines)) if lines[i].rstrip() == "---")
    except StopIteration:
        raise AgentDefinitionError(
            path, 1, "frontmatter is not closed: add a '---' line after it"
        ) from None

    front_text = "\n".join(lines[1:end])
    body = "\n".join(lines[end + 1 :]).strip()
    data, key_lines = _load_frontmatter(front_text, path)

    def where(key: str) -> int:
        return key_lines.get(key, 2)

    raw_name = data.get("name")
    if isinstance(raw_name, str) and is_placeholder(raw_name):
        raise NotAnAgentFile(path, where("name"), f"a template, not an agent: its name "
                             f"{raw_name.strip()!r} is a placeholder", TEMPLATE,
                             f"placeholder name {raw_name.strip()!r}")
    name = _optional_str(data, "name", path, where)
    if name is not None and not name.strip():
        raise AgentDefinitionError(path, where("name"), "'name' is empty")
    description = _optional_str(data, "description", path, where) or ""
    model = _optional_str(data, "model", path, where)
    if model is not None and (not model.strip() or model.strip().casefold() == "inherit"):
        # Claude Code's "inherit" means "use the caller's model"; passing it on as
        # `--model inherit` would fail, so it is the same as not choosing a model.
        model = None
    tools = _parse_tools(data.get("tools"), path, where("tools"))

    display_name = name.strip() if name else path.stem
    if not fold(display_name):
        raise AgentDefinitionError(path, where("name"), f"name {display_name!r} has no letters")
    return AgentDefinition(
        name=display_name,
        description=description.strip(),
        model=model.strip() if model else None,
        tools=tools,
        system_prompt=body,
        path=path,
        extra={k: v for k, v in data.items() if k not in KNOWN_KEYS},
    )


def _load_frontmatter(front_text: str, path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Frontmatter as a dict, plus the file line of each top-level key (for messages)."""
    if not front_text.strip():
        return {}, {}
    try:
        node = yaml.compose(front_text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(front_text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 2 if mark is not None else 1  # +1 for 1-based, +1 for the '---'
        problem = getattr(exc, "problem", None) or str(exc)
        raise AgentDefinitionError(path, line, f"invalid YAML frontmatter: {problem}") from exc
    if data is None:
        return {}, {}
    if not isinstance(data, dict) or not isinstance(node, yaml.MappingNode):
        raise AgentDefinitionError(
            path, 2, f"frontmatter must be a mapping of keys, not {type(data).__name__}"
        )
    key_lines: dict[str, int] = {}
    for key_node, _value in node.value:
        key = key_node.value
        line = key_node.start_mark.line + 2
        if key in key_lines:
            raise AgentDefinitionError(path, line, f"duplicate key {key!r} in frontmatter")
        key_lines[key] = line
    return {str(k): v for k, v in data.items()}, key_lines


def _optional_str(
    data: Mapping[str, Any], key: str, path: Path, where: Callable[[str], int]
) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # e.g. `model: 4o`-style values YAML reads as numbers
    raise AgentDefinitionError(
        path, where(key), f"'{key}' must be a string, not {type(value).__name__}"
    )


def _parse_tools(value: Any, path: Path, line: int) -> tuple[str, ...]:
    """`tools` as a tuple; accepts Claude's "A, B" string, a YAML list, or opencode's {name: bool}.

    An empty tuple means "not restricted": the runner passes no tool flag at all.
    """
    if value is None:
        return ()
    if isinstance(value, str):
        items = split_tools(value)
    elif isinstance(value, list):
        items = []
        for item in value:
            if not isinstance(item, str):
                raise AgentDefinitionError(
                    path, line, f"'tools' entries must be strings, not {type(item).__name__}"
                )
            items.append(item.strip())
    elif isinstance(value, dict):
        items = [str(k).strip() for k, enabled in value.items() if enabled is True]
    else:
        raise AgentDefinitionError(
            path, line, f"'tools' must be a string or a list, not {type(value).__name__}"
        )
    seen: dict[str, None] = {}
    for item in items:
        if item:
            seen.setdefault(item, None)
    return tuple(seen)


def split_tools(text: str) -> list[str]:
    """Split "Read, Bash(git log:*, git diff:*)" on top-level commas only."""
    items: list[str] = []
    depth = 0
    current: list[str] = []
    for char in text:
        if char in "([{":
            depth += 1
        elif char in ")]}" and depth:
            depth -= 1
        if char == "," and depth == 0:
            items.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    items.append("".join(current).strip())
    return [item for item in items if item]
