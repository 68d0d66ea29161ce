"""Reuse of earlier results: the scheduler's cache, backed by `State`.

Before a task starts, its fingerprint is computed from what it is and from its
dependencies' output hashes *in this run*.  With reuse on (`--resume`, the
daemon), a task whose fingerprint matches its last successful run and whose
output is intact is `cached`: no process starts.  With reuse off (the CLI's
default) fingerprints and output hashes are still recorded for next time.
"""

from __future__ import annotations

import trio

from .fingerprint import hash_output, output_stamp, task_fingerprint
from .spec import DispatchSpec
from .state import State


class Reuse:
    def __init__(self, spec: DispatchSpec, state: State, enabled: bool) -> None:
        self.spec = spec
        self.state = state
        self.enabled = enabled
        self.hashes: dict[str, str | None] = {}
        self.fingerprints: dict[int, str] = {}

    def _fingerprint(self, i: int) -> str:
        deps = {d: self.hashes.get(d) for d in self.spec.tasks[i].dependencies}
        return task_fingerprint(self.spec, i, deps)

    def _intact(self, i: int, entry: dict[str, object]) -> str | None:
        """The recorded output hash if the output is still what was recorded."""
        path = self.spec.output_path(i)
        stamp = output_stamp(path)
        recorded = entry.get("output_hash")
        if stamp is None or not isinstance(recorded, str):
            return None
        if stamp == entry.get("output_stamp"):
            return recorded
        return recorded if hash_output(path) == recorded else None

    async def lookup(self, i: int) -> bool:
        """Compute the fingerprint; True if the previous output can be reused."""
        fp = await trio.to_thread.run_sync(self._fingerprint, i)
        self.fingerprints[i] = fp
        if not self.enabled:
            return False
        entry = self.state.task(self.spec.tasks[i].id)
        if entry.get("status") != "succeeded" or entry.get("fingerprint") != fp:
            return False
        recorded = await trio.to_thread.run_sync(self._intact, i, entry)
        if recorded is None:
            return False
        self.hashes[self.spec.tasks[i].id] = recorded
        return True

    async def succeeded(self, i: int) -> None:
        """Hash the new output so dependents' fingerprints and the next run can use it."""
        path = self.spec.output_path(i)
        digest = await trio.to_thread.run_sync(hash_output, path)
        task_id = self.spec.tasks[i].id
        self.hashes[task_id] = digest
        self.state.record(task_id, fingerprint=self.fingerprints.get(i), output_hash=digest,
                          output_stamp=output_stamp(path))

    def invalidate(self, i: int) -> None:
        """A failed attempt: the task's recorded success no longer describes its inputs."""
        self.state.forget(self.spec.tasks[i].id, "fingerprint")
