"""Reuse of earlier results: the scheduler's cache, backed by `State`.

Before a task starts, its fingerprint is computed from what it is and from its
dependencies' output hashes *in this run*.  With reuse on (`--resume`, the
daemon), a task whose fingerprint matches its last successful run and whose
output is intact is `cached`: no process starts.  With reuse off (the CLI's
default) fingerprints and output hashes are still recorded for next time.
"""

from __future__ import annotations

import trio

from .fingerprint import agent_identity_of, hash_output, output_stamp, task_fingerprint
from .result import TaskStatus
from .spec import DispatchSpec
from .state import State, TaskEntry

INLINE_HASH_BYTES = 256 * 1024


class Reuse:
    def __init__(self, spec: DispatchSpec, state: State, enabled: bool) -> None:
        self.spec = spec
        self.state = state
        self.enabled = enabled
        self.hashes: dict[str, str | None] = {}
        self.fingerprints: dict[int, str] = {}
        self._identities: dict[int, object] = {}
        """Resolved-agent material per agent object: tasks share a handful of agents."""

    def _fingerprint(self, i: int) -> str:
        deps = {d: self.hashes.get(d) for d in self.spec.tasks[i].dependencies}
        agent = self.spec.agents[i]
        identity = self._identities.get(id(agent))
        if identity is None:
            identity = self._identities[id(agent)] = agent_identity_of(self.spec, i)
        return task_fingerprint(self.spec, i, deps, identity)

    def _intact(self, i: int, entry: TaskEntry) -> str | None:
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
        if self.spec.tasks[i].files:  # globbing and hashing files: off the event loop
            fp = await trio.to_thread.run_sync(self._fingerprint, i)
        else:
            fp = self._fingerprint(i)
        self.fingerprints[i] = fp
        if not self.enabled:
            return False
        entry = self.state.task(self.spec.tasks[i].id)
        if entry.get("status") != TaskStatus.SUCCEEDED or entry.get("fingerprint") != fp:
            return False
        recorded = await trio.to_thread.run_sync(self._intact, i, entry)
        if recorded is None:
            return False
        self.hashes[self.spec.tasks[i].id] = recorded
        return True

    async def succeeded(self, i: int) -> None:
        """Hash the new output so dependents' fingerprints and the next run can use it."""
        path = self.spec.output_path(i)
        stamp = output_stamp(path)
        if stamp is not None and stamp[0] <= INLINE_HASH_BYTES and not path.is_dir():
            digest = hash_output(path)  # a thread hop would cost more than hashing
        else:
            digest = await trio.to_thread.run_sync(hash_output, path)
        task_id = self.spec.tasks[i].id
        self.hashes[task_id] = digest
        self.state.record(task_id, fingerprint=self.fingerprints.get(i), output_hash=digest,
                          output_stamp=stamp)

