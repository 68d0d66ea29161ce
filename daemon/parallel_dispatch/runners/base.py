"""The runner interface: the scheduler's only way to make an agent do work.

As in ninja's CommandRunner, the scheduler never knows whether a job is a
real process, a dry run or a test double.  Timeouts and cancellation are the
scheduler's business (cancel scopes around `run`); a runner only has to clean
up when it is cancelled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..agents import AgentSpec
from ..events import Activity, Cause
from ..model import Task
from ..spec import DispatchSpec


@dataclass(frozen=True)
class Job:
    """One attempt of one task."""

    spec: DispatchSpec
    index: int
    attempt: int
    run_id: str
    activity: Activity | None = field(default=None, compare=False)
    """Where the runner reports the agent's live output and events (None: nobody asks)."""
    workdir: Path | None = None
    """Where the agent runs when not in the project root (its git worktree, `isolation`)."""

    @property
    def task(self) -> Task:
        return self.spec.tasks[self.index]

    @property
    def agent(self) -> AgentSpec:
        return self.spec.agents[self.index]

    @property
    def output_path(self) -> Path:
        return self.spec.output_path(self.index)

    @property
    def log_path(self) -> Path:
        return self.spec.log_path(self.index)

    def input_paths(self) -> dict[str, Path]:
        """Dependency id → absolute output path, in dependency order."""
        return {d: self.spec.output_path(self.spec.index(d)) for d in self.task.dependencies}


@dataclass
class Outcome:
    """What an attempt produced, as far as the runner can tell."""

    ok: bool
    exit_code: int | None = None
    error: str | None = None
    retryable: bool = True
    pid: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    """Runner-reported facts such as cost_usd, input_tokens, output_tokens, turns."""
    retry_after: float | None = None
    """Seconds the service asked us to wait (HTTP 429 Retry-After); the retry waits at least
    this long."""
    cause: Cause | None = None
    """Set when the provider could not be used (bad credentials, unreachable, rate limit,
    overloaded...): the task ends `provider_error` instead of `failed`."""
    node: str | None = None
    """The cluster node that ran the attempt (None: this machine)."""
    requests_per_min: float | None = None
    """The provider's stated request limit (`x-ratelimit-limit-requests`), when a rate limit
    said it: the runner's pool paces its starts to it."""


class Runner(Protocol):
    """Runs one attempt; must kill everything it started when cancelled."""

    name: str

    async def run(self, job: Job) -> Outcome: ...

    def describe(self, job: Job) -> str:
        """One line saying what `run` would do (for plans and progress)."""
        ...
