"""Run state: what happened to each task, kept separate from how it is shown.

Statuses are `StrEnum`s: each member *is* its string, so the JSON report, the state
file and the daemon's status file read exactly as they did with bare strings (the
contract in docs/architecture.md; tests/test_report_golden.py holds it byte for byte).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # types only: the Action and `status` read statuses without pydantic/trio
    from .events import Cause
    from .spec import DispatchSpec


class TaskStatus(StrEnum):
    """Where a task is: `COUNTED` are final, `planned` ends a dry run, the rest are live."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    CACHED = "cached"
    """Unchanged since its last successful run: the output was reused, nothing ran."""
    FAILED = "failed"
    """The agent ran and failed."""
    TIMEOUT = "timeout"
    """The deadline passed."""
    PROVIDER_ERROR = "provider_error"
    """The provider could not be used (bad credentials, unreachable, rate limit...)."""
    STALLED = "stalled"
    """The agent went silent for longer than `idle_timeout`."""
    SKIPPED = "skipped"
    """Not started: a dependency did not succeed, or the run stopped first."""
    CANCELLED = "cancelled"
    """Stopped while running (`on_failure: stop`, Ctrl-C, the file changed)."""
    PLANNED = "planned"
    """A dry run's verdict: it would run."""
    WAITING_FOR_QUOTA = "waiting_for_quota"
    """Live only: refused by its provider's rate or usage limit, waiting for its pool to
    reopen; no retry is used up.  A run never ends with a task in it."""
    CONFLICT = "conflict"
    """Succeeded, but its changes did not apply on top of the tasks merged before it
    (`merge: apply | branch`, merge.py): its patch is kept, not merged."""
    MERGE_FAILED = "merge_failed"
    """Succeeded and merged, but `verify` failed after it: its merge was reverted."""

    @property
    def mark(self) -> str:
        """One symbol for progress lines and report tables."""
        return MARKS[self]

    @property
    def label(self) -> str:
        """The status as words: `provider error`."""
        return self.value.replace("_", " ")


class RunStatus(StrEnum):
    """A run's status in the report, the state file and the Action's outputs."""

    RUNNING = "running"
    """Only in the state file, while the run goes on (`status` reads it)."""
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    INVALID = "invalid"
    """The task file did not validate: nothing ran (the daemon's and Action's report)."""
    ERROR = "error"
    """A valid file whose run failed partway (an unwritable output dir, a full disk)."""


MARKS: dict[str, str] = {
    TaskStatus.PENDING: "…", TaskStatus.RUNNING: "▶", TaskStatus.SUCCEEDED: "✓",
    TaskStatus.CACHED: "≡", TaskStatus.FAILED: "✗", TaskStatus.TIMEOUT: "⏱",
    TaskStatus.PROVIDER_ERROR: "⚠", TaskStatus.STALLED: "⏸", TaskStatus.SKIPPED: "↷",
    TaskStatus.CANCELLED: "⊘", TaskStatus.PLANNED: "·", TaskStatus.WAITING_FOR_QUOTA: "⧗",
    TaskStatus.CONFLICT: "⇆", TaskStatus.MERGE_FAILED: "↶",
}
"""The one table of status marks (progress lines, the Markdown report); keyed by
`TaskStatus`, so a status read back from a report's JSON finds its mark too."""

MERGE_PROBLEMS = (TaskStatus.CONFLICT, TaskStatus.MERGE_FAILED)
"""Set after the run by the merge queue: the task's output is there, its changes were
not merged.  The state file counts them only when non-zero (runs without a merge read as
before)."""
PROBLEMS = (TaskStatus.FAILED, TaskStatus.TIMEOUT, TaskStatus.PROVIDER_ERROR,
            TaskStatus.STALLED, *MERGE_PROBLEMS)
"""The task ran and its result is not usable (no output, or its changes not merged)."""
COUNTED = (TaskStatus.SUCCEEDED, TaskStatus.CACHED, *PROBLEMS, TaskStatus.SKIPPED,
           TaskStatus.CANCELLED)
"""Every status a finished task of a real run can have, in report order."""
OK = frozenset({TaskStatus.SUCCEEDED, TaskStatus.CACHED, TaskStatus.PLANNED})
"""A task in one of these left (or would leave) its output in place."""

VERBS: dict[str, str] = {TaskStatus.TIMEOUT: "timed out", TaskStatus.FAILED: "failed",
         TaskStatus.PROVIDER_ERROR: "hit a provider error", TaskStatus.STALLED: "stalled",
         TaskStatus.CANCELLED: "was cancelled", TaskStatus.SKIPPED: "was skipped",
         TaskStatus.CONFLICT: "could not be merged (conflict)",
         TaskStatus.MERGE_FAILED: "failed verify after merging"}
"""How a status reads after a task id: "task 'a' timed out"."""


def verb(status: str) -> str:
    return VERBS.get(status, status)


@dataclass
class TaskRecord:
    id: str
    agent: str
    wave: int
    output: str
    spec: DispatchSpec = field(repr=False)
    index: int
    status: TaskStatus = TaskStatus.PENDING
    attempts: int = 0
    start_s: float | None = None
    end_s: float | None = None
    busy_s: float = 0.0
    """Time spent inside attempts, excluding retry backoff: what a slot was used for."""
    exit_code: int | None = None
    error: str | None = None
    reason: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    cause: Cause | None = None
    """For `provider_error`: auth, unreachable, rate_limit, quota, overloaded, server..."""
    last_event: str | None = None
    """The agent's last live event when the task ended ("API retry 3/10: 529 overloaded")."""
    event: str | None = None
    """The agent's latest live event while it runs (for progress and `status`)."""
    quota_waits: int = 0
    """Times the provider's limits sent this task to `waiting_for_quota` (not retries)."""
    quota_wait_s: float = 0.0
    """Time spent waiting for quota, summed."""
    quota_since: float | None = field(default=None, repr=False)
    """When the current wait began (scheduler clock), while waiting."""
    nodes: list[str] = field(default_factory=list)
    """The cluster node of each attempt that ran on one, in order (`--executor ray`)."""
    changes: dict[str, Any] | None = None
    """An isolated task's changes: `{"patch": "changes/<id>.patch" or None, "files": [...],
    "added": N, "removed": N}` (runners/isolated.py); None when it is not isolated or did
    not succeed in this run."""

    @property
    def output_path(self) -> Path:
        return self.spec.output_path(self.index)

    @property
    def log_path(self) -> Path:
        return self.spec.log_path(self.index)

    @property
    def ok(self) -> bool:
        return self.status in OK


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
    pools: list[dict[str, Any]] = field(default_factory=list)
    """Each runner and agent pool at the end of the run (quota.py `Pool.snapshot`)."""
    base_commit: str | None = None
    """`git rev-parse HEAD` of the project when the run started, which isolated tasks'
    worktrees start from; None when no task is isolated."""
    merge: dict[str, Any] | None = None
    """What the merge queue did (merge.py), for the reports; None with `merge: none`."""

    def count(self, status: TaskStatus) -> int:
        return sum(1 for r in self.records if r.status == status)

    @property
    def status(self) -> RunStatus:
        if self.interrupted:
            return RunStatus.INTERRUPTED
        return RunStatus.SUCCEEDED if all(r.ok for r in self.records) else RunStatus.FAILED

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 0 if self.status == RunStatus.SUCCEEDED else 1

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
