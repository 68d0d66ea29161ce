"""`--dry-run` is just another runner: it starts nothing and writes nothing."""

from __future__ import annotations

from .base import Job, Outcome, Runner


class DryRunRunner:
    """Succeeds instantly, remembering what the real runner would have started."""

    name = "dry-run"

    def __init__(self, real: Runner) -> None:
        self.real = real
        self.started: list[str] = []

    def describe(self, job: Job) -> str:
        return self.real.describe(job)

    def run_now(self, job: Job) -> Outcome:
        """Completes at once, so the scheduler need not spawn a task for it."""
        self.started.append(job.task.id)
        return Outcome(ok=True, exit_code=None)

    async def run(self, job: Job) -> Outcome:
        return self.run_now(job)
