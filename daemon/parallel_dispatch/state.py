"""Per-output-dir memory between runs (ninja's `BuildLog`).

`.dispatch-state.toml` records, per task, its last duration, result,
fingerprint and output hash, and how the last run went.  The scheduler uses
durations to weight the critical path; `--resume` and the daemon use
fingerprints to reuse outputs.

Like ninja's log, it is cheap to keep current: while a run goes on, each change
is one appended line in `.dispatch-journal.jsonl` (a write, no rewrite), and
the TOML snapshot is rewritten atomically (temp file, fsync, rename) at the
start and end of a run, after which the journal is emptied.  Loading replays
the journal over the snapshot, so after a `kill -9` nothing that finished is
forgotten; a torn last line is ignored.  A damaged snapshot is treated as empty
rather than blocking work.
"""

from __future__ import annotations

import contextlib
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypedDict, cast

import tomli_w

from .atomic import write_text

STATE_FILE = ".dispatch-state.toml"
JOURNAL_FILE = ".dispatch-journal.jsonl"

_compact = json.JSONEncoder(separators=(",", ":")).encode
"""`json.dumps` with any argument builds a new encoder per call: two journal lines a task."""


class TaskEntry(TypedDict, total=False):
    """`[tasks.<id>]`: what the last runs left for one task.

    Read from a file a user may have edited: a reader checks each value's type before
    trusting it (`durations`, `incremental.Reuse`)."""

    status: str
    """The last real result (a `TaskStatus`: succeeded or one of `PROBLEMS`)."""
    finished_run: str
    duration_s: float
    """Time spent in attempts by its last successful run: weights the critical path."""
    fingerprint: str
    output_hash: str
    output_stamp: list[int]
    """(size, mtime_ns) of the output when hashed: an unchanged stamp skips rehashing."""
    cost_usd: float
    """Cost per attempt in its last run (where known): what its next start reserves."""
    tokens: int
    """Input + output tokens per attempt in its last run (where known)."""


class RunEntry(TypedDict, total=False):
    """`[last_run]`: the latest run on this output dir (`status` and the daemon read it).

    Besides these, one count per `TaskStatus` of `COUNTED` (`succeeded = 3`, ...)."""

    run_id: str
    started_at: str
    finished_at: str
    status: str
    """A `RunStatus`: `running` until the run ends."""
    task_file: str
    task_file_hash: str
    pid: int
    """The dispatcher's: a run still `running` whose process is gone was killed."""


@dataclass
class State:
    path: Path
    tasks: dict[str, TaskEntry] = field(default_factory=dict)
    runs: RunEntry = field(default_factory=lambda: RunEntry())
    _journal: IO[str] | None = None
    error: OSError | None = None
    """Why journaling stopped (a full disk): the snapshot at `save` still has it all."""

    @property
    def journal_path(self) -> Path:
        return self.path.with_name(JOURNAL_FILE)

    @classmethod
    def load(cls, output_dir: Path) -> State:
        state = cls(output_dir / STATE_FILE)
        try:
            data = tomllib.loads(state.path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
            data = {}
        tasks, runs = data.get("tasks", {}), data.get("last_run", {})
        # As read: a damaged or edited file may hold anything; readers check each value.
        state.tasks = cast(dict[str, TaskEntry], tasks) if isinstance(tasks, dict) else {}
        state.runs = cast(RunEntry, runs) if isinstance(runs, dict) else RunEntry()
        state._replay()
        return state

    def _replay(self) -> None:
        try:
            lines = self.journal_path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                break  # a torn write: everything before it is good
            if not isinstance(entry, dict):
                break
            if isinstance(entry.get("task"), str) and isinstance(entry.get("set"), dict):
                self.tasks.setdefault(entry["task"], {}).update(entry["set"])
            elif isinstance(entry.get("run"), dict):
                self.runs.update(entry["run"])

    def durations(self) -> dict[str, float]:
        out = {}
        for tid, entry in self.tasks.items():
            d = entry.get("duration_s") if isinstance(entry, dict) else None
            if isinstance(d, int | float) and d >= 0:
                out[tid] = float(d)
        return out

    def task(self, task_id: str) -> TaskEntry:
        entry = self.tasks.get(task_id)
        return entry if isinstance(entry, dict) else TaskEntry()

    def _append(self, entry: dict[str, Any]) -> None:
        """Journal one change.  A write that fails (ENOSPC) stops the journal rather than
        the run: the state is a cache, and `save` writes everything kept in memory."""
        if self._journal is None:
            return
        try:
            self._journal.write(_compact(entry) + "\n")
            self._journal.flush()
        except OSError as exc:
            self.error = exc
            journal, self._journal = self._journal, None
            with contextlib.suppress(OSError):
                journal.close()

    def record(self, task_id: str, *, duration_s: float | None = None,
               status: str | None = None, finished_run: str | None = None,
               fingerprint: str | None = None, output_hash: str | None = None,
               output_stamp: list[int] | None = None, cost_usd: float | None = None,
               tokens: int | None = None) -> None:
        """Update a task's entry (journaled while a run is open); None leaves a key as it is."""
        given = {"duration_s": duration_s, "status": status, "finished_run": finished_run,
                 "fingerprint": fingerprint, "output_hash": output_hash,
                 "output_stamp": output_stamp, "cost_usd": cost_usd, "tokens": tokens}
        values = cast(TaskEntry, {k: v for k, v in given.items() if v is not None})
        self.tasks.setdefault(task_id, TaskEntry()).update(values)
        self._append({"task": task_id, "set": values})

    def update_run(self, **fields: Any) -> None:
        """Update `[last_run]`: `RunEntry` keys and the per-status counts."""
        self.runs.update(fields)  # type: ignore[typeddict-item]  # counts: keys it can't name
        self._append({"run": fields})

    def begin(self) -> None:
        """Snapshot now and journal every change until `save`.

        The run is also stamped with what `parallel-dispatch status` needs to find it
        and judge it, whoever started it (the CLI or the daemon): the task file as an
        absolute path (the CLI is given it relative to wherever it was started) and the
        dispatcher's pid (a run still "running" whose process is gone was killed).
        """
        task_file = self.runs.get("task_file")
        if isinstance(task_file, str) and task_file:
            self.runs["task_file"] = os.path.abspath(task_file)
        self.runs.setdefault("pid", os.getpid())
        self.save()
        self._journal = open(self.journal_path, "a", encoding="utf-8")  # noqa: SIM115

    def save(self) -> None:
        """Rewrite the snapshot atomically, then empty the journal it now includes."""
        data: dict[str, Any] = {"version": 1, "last_run": self.runs, "tasks": self.tasks}
        write_text(self.path, tomli_w.dumps(data))
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        self.journal_path.unlink(missing_ok=True)
