"""Run state: what happened to each task, kept separate from how it is shown."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .spec import DispatchSpec

PROBLEMS = ("failed", "timeout", "provider_error", "stalled")
"""The task ran and produced no output.  `failed`: the agent ran and failed;
`provider_error`: the provider could not be used (bad credentials, unreachable, rate
limit, overloaded); `timeout`: the deadline passed; `stalled`: the agent went silent for
longer than `idle_timeout`."""
COUNTED = ("succeeded", "cached", *PROBLEMS, "skipped", "cancelled")
"""Every status a finished task of a real run can have, in report order."""
FINAL = (*COUNTED, "planned")

VERBS = {"timeout": "timed out", "failed": "failed", "provider_error": "hit a provider error",
         "stalled": "stalled", "cancelled": "was cancelled", "skipped": "was skipped"}
"""How a status reads after a task id: "task 'a' timed out"."""


@dataclass
class TaskRecord:
    id: str
    agent: str
    wave: int
    output: str
    spec: DispatchSpec = field(repr=False)
    index: int
    status: str = "pending"
    attempts: int = 0
    start_s: float | None = None
    end_s: float | None = None
    busy_s: float = 0.0
    """Time spent inside attempts, excluding retry backoff: what a slot was used for."""
    exit_code: int | None = None
    error: str | None = None
    reason: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    cause: str | None = None
    """For `provider_error`: auth, unreachable, rate_limit, quota, overloaded, server..."""
    last_event: str | None = None
    """The agent's last live event when the task ended ("API retry 3/10: 529 overloaded")."""
    event: str | None = None
    """The agent's latest live event while it runs (for progress and `status`)."""

    @property
    def output_path(self) -> Path:
        return self.spec.output_path(self.index)

    @property
    def log_path(self) -> Path:
        return self.spec.log_path(self.index)

    @property
    def ok(self) -> bool:
        return self.status in ("succeeded", "cached", "planned")


@dataclass
class RunResult:
    spec: DispatchSpec
    run_id: str
    started_at: str
    finished_at: str = ""
    wall_s: float = 0.0
    records: list[TaskRecord] = field(default_factory=list)
    critical_path: list[str] = field(default_factory=list)
    interrupted: bool = False
    dry_run: bool = False
    plan_lines: list[str] = field(default_factory=list)
    report_md_path: Path | None = None
    report_json_path: Path | None = None
    report: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    """Run-level remarks for both reports (e.g. the cost budget stopped new tasks)."""

    def count(self, status: str) -> int:
        return sum(1 for r in self.records if r.status == status)

    @property
    def status(self) -> str:
        if self.interrupted:
            return "interrupted"
        return "succeeded" if all(r.ok for r in self.records) else "failed"

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 0 if self.status == "succeeded" else 1

    @property
    def work_s(self) -> float:
        return sum(r.busy_s for r in self.records)

    @property
    def efficiency(self) -> float | None:
        """Work / (wall time × max_parallel); None for an interrupted run.

        An interrupted run has no honest figure: its cancelled attempts count as busy
        until they were killed (so full slots read as 100% while their work was thrown
        away), and its wall time includes the shutdown.  The reports say "not measured".
        """
        if self.interrupted:
            return None
        slots = self.spec.settings.max_parallel
        if self.wall_s <= 0 or slots <= 0:
            return 0.0
        return min(1.0, self.work_s / (self.wall_s * slots))
