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

    async def run(self, job: Job) -> Outcome:
        self.started.append(job.task.id)
        return Outcome(ok=True, exit_code=None)
