"""`isolation: worktree` as a runner that wraps the real one, as `DryRunRunner` does.

For an isolated task each attempt gets a fresh worktree (worktree.py), the inner
runner runs the agent there (`Job.workdir`), a successful attempt's changes become
`changes/<id>.patch`, and the worktree goes whatever happened, cancellation included.
Other tasks pass straight through.  The scheduler knows nothing of this.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import trio

from .. import worktree
from ..atomic import write_bytes
from ..spec import CHANGES_DIR, DispatchSpec
from .base import Job, Outcome, Runner


class IsolatedRunner:
    """Runs isolated tasks in worktrees around `inner`; records each task's changes."""

    name = "isolated"

    def __init__(self, inner: Runner, spec: DispatchSpec, base: str) -> None:
        self.inner = inner
        self.spec = spec
        self.base = base
        self.changes: dict[str, dict[str, Any]] = {}
        """Task id → its `TaskRecord.changes`, for each task whose last attempt succeeded."""

    def describe(self, job: Job) -> str:
        text = self.inner.describe(job)
        if self.spec.isolation(job.index) == "worktree":
            text += "  (in a git worktree)"
        return text

    async def run(self, job: Job) -> Outcome:
        if self.spec.isolation(job.index) != "worktree":
            return await self.inner.run(job)
        return await self._attempt(job, self.base, self._dependency_patches(job.index))

    async def rerun_at(self, job: Job, start: str) -> Outcome:
        """An attempt in a fresh worktree at `start`, the merge queue's merged state (which
        already holds the dependencies' changes): merge.py re-runs a conflicting task on
        top of the tasks merged before it.  Its changes replace the task's patch."""
        return await self._attempt(job, start, [])

    async def _attempt(self, job: Job, start: str,
                       patches: list[tuple[str, Path]]) -> Outcome:
        root = self.spec.root
        path = worktree.worktree_path(root, job.run_id, job.task.id)
        try:
            try:
                tree = await worktree.create(root, job.run_id, job.task.id, start, patches)
            except (worktree.GitError, OSError) as exc:
                return Outcome(ok=False, retryable=False,
                               error=f"cannot make the task's git worktree: {exc}")
            outcome = await self.inner.run(dataclasses.replace(job, workdir=tree.workdir))
            if outcome.ok:
                try:
                    self.changes[job.task.id] = await self._keep(job.index, tree)
                except (worktree.GitError, OSError) as exc:
                    outcome.ok = False
                    outcome.retryable = False
                    outcome.error = f"cannot capture the task's changes: {exc}"
            return outcome
        finally:
            with trio.CancelScope(shield=True):
                await worktree.remove(root, path)

    def _dependency_patches(self, i: int) -> list[tuple[str, Path]]:
        """The patches of every isolated task `i` depends on, directly or not, in
        topological order: its worktree must hold what they changed."""
        graph = self.spec.graph
        ancestors = graph.ancestors(i)
        out = []
        for d in graph.order:
            if d in ancestors and self.spec.isolation(d) == "worktree":
                patch = self.spec.patch_path(d)
                if patch.is_file():
                    out.append((self.spec.tasks[d].id, patch))
        return out

    async def _keep(self, i: int, tree: worktree.Worktree) -> dict[str, Any]:
        """Write the attempt's patch (atomically) and say what it holds; no changes, no
        file (and none left from an earlier run)."""
        found = await worktree.capture(tree)
        path = self.spec.patch_path(i)
        if found is None:
            path.unlink(missing_ok=True)
            return {"patch": None, "files": [], "added": 0, "removed": 0}
        await trio.to_thread.run_sync(write_bytes, path, found.patch)
        return {"patch": f"{CHANGES_DIR}/{self.spec.tasks[i].id}.patch", "files": found.files,
                "added": found.added, "removed": found.removed}

    async def close(self, run_id: str) -> None:
        """The run is over: its worktree folder goes."""
        await worktree.finish_run(self.spec.root, run_id)
