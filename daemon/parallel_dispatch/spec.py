"""A validated, fully resolved dispatch: what the scheduler and runners consume."""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from .agents import AgentSpec
from .config import ProjectConfig, ResolvedSettings
from .graph import Graph
from .model import InputsMode, Isolation, Task

CHANGES_DIR = "changes"
"""Under the output dir: `<task id>.patch` for each isolated task that changed files."""
STDOUT_FILE_IN_DIR = "output.md"
"""Where stdout goes when a task's output is a directory (`api/` → `api/output.md`)."""


@dataclass(frozen=True)
class DispatchSpec:
    """Everything known before the first process starts; immutable."""

    path: Path
    display: str
    name: str
    description: str | None
    tasks: tuple[Task, ...]
    agents: tuple[AgentSpec, ...]
    graph: Graph
    settings: ResolvedSettings
    config: ProjectConfig
    source_hash: str = ""
    """sha256 of the task file's bytes, to tell whether the file changed since a run."""
    foreach: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Each `foreach` task's id → its expanded tasks' ids, in item order (fanout.py)."""
    foreach_watch: tuple[str, ...] = ()
    """`foreach: files:` globs: a file that starts matching adds a task (the daemon)."""

    @property
    def root(self) -> Path:
        return self.config.root

    @cached_property
    def _index(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.graph.ids)}

    @cached_property
    def _paths(self) -> dict[tuple[str, int], Path]:
        return {}

    def _path(self, kind: str, i: int) -> Path:
        """Paths are built on demand: a 50,000-task plan should not build 100,000 of them."""
        key = (kind, i)
        path = self._paths.get(key)
        if path is None:
            base = str(self.settings.output_dir)
            task = self.tasks[i]
            rel = task.output.rstrip("/") if kind == "out" else f"logs/{task.id}.log"
            path = self._paths[key] = Path(f"{base}/{rel}")
        return path

    def output_text(self, i: int) -> str:
        """`output_path(i)` as text, without building a Path (plans of 50,000 tasks)."""
        return posixpath.normpath(f"{self.settings.output_dir}/{self.tasks[i].output}")

    def log_path(self, i: int) -> Path:
        """The task's stderr log, appended to by every attempt of a run."""
        return self._path("log", i)

    def index(self, task_id: str) -> int:
        return self._index[task_id]

    def timeout_s(self, i: int) -> float:
        """A task's own `timeout` wins over every settings layer."""
        ms = self.tasks[i].timeout or self.settings.timeout_per_task
        return ms / 1000.0

    def idle_timeout_s(self, i: int) -> float | None:
        """Seconds of silence after which the agent is stalled; None when off."""
        ms = self.tasks[i].idle_timeout or self.settings.idle_timeout
        return ms / 1000.0 if ms else None

    def max_attempts(self, i: int) -> int:
        """1 + retries: a task's `retries` applies under any policy."""
        task = self.tasks[i]
        if task.retries is not None:
            return 1 + task.retries
        if self.settings.on_failure == "retry":
            return 1 + self.settings.max_retries
        return 1

    def inputs_mode(self, i: int) -> InputsMode:
        return self.tasks[i].inputs or self.agents[i].inputs

    def isolation(self, i: int) -> Isolation:
        """A task's own `isolation` wins over the settings'."""
        return self.tasks[i].isolation or self.settings.isolation

    @cached_property
    def any_isolated(self) -> bool:
        return any(self.isolation(i) == "worktree" for i in range(len(self.tasks)))

    def patch_path(self, i: int) -> Path:
        """Where an isolated task's changes go (`changes/<id>.patch`)."""
        return Path(f"{self.settings.output_dir}/{CHANGES_DIR}/{self.tasks[i].id}.patch")

    def output_path(self, i: int) -> Path:
        """Absolute final output path (a directory for `dir/` outputs)."""
        return self._path("out", i)

