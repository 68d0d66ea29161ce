"""A validated, fully resolved dispatch: what the scheduler and runners consume."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .agents import AgentSpec
from .config import ProjectConfig, ResolvedSettings
from .graph import Graph
from .model import InputsMode, Task

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

    @property
    def root(self) -> Path:
        return self.config.root

    def index(self, task_id: str) -> int:
        return self.graph.ids.index(task_id)

    def timeout_s(self, i: int) -> float:
        """A task's own `timeout` wins over every settings layer."""
        ms = self.tasks[i].timeout or self.settings.timeout_per_task
        return ms / 1000.0

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

    def output_path(self, i: int) -> Path:
        """Absolute final output path (a directory for `dir/` outputs)."""
        return self.settings.output_dir / self.tasks[i].output.rstrip("/")

    def stdout_path(self, i: int) -> Path:
        """The file that receives stdout once the task succeeds."""
        out = self.output_path(i)
        return out / STDOUT_FILE_IN_DIR if self.tasks[i].is_directory else out
