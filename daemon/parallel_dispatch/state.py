"""Per-output-dir memory between runs (ninja's `BuildLog`).

`.dispatch-state.toml` records, per task, its last duration, result,
fingerprint and output hash, and, per file, how the last run went.  The
scheduler uses durations to weight the critical path; `--resume` and the
daemon use fingerprints to reuse outputs.  It is rewritten atomically (temp
file, fsync, rename) as tasks finish, so a crash never leaves half a file and
loses at most the records of the last instant.  A damaged file is treated as
empty rather than blocking work.
"""

from __future__ import annotations

import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from .atomic import write_text

STATE_FILE = ".dispatch-state.toml"

SAVE_EVERY_TASK_UP_TO = 200
"""Runs with more tasks than this save at most every `SAVE_INTERVAL_S`: rewriting a
big state file per task would cost more than the tasks (a crash then re-runs the
few tasks finished in the last interval, which is safe)."""
SAVE_INTERVAL_S = 0.5


@dataclass
class State:
    path: Path
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: dict[str, Any] = field(default_factory=dict)
    _last_save: float = 0.0

    @classmethod
    def load(cls, output_dir: Path) -> State:
        path = output_dir / STATE_FILE
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
            return cls(path)
        tasks = data.get("tasks", {})
        runs = data.get("last_run", {})
        return cls(path, tasks if isinstance(tasks, dict) else {},
                   runs if isinstance(runs, dict) else {})

    def durations(self) -> dict[str, float]:
        out = {}
        for tid, entry in self.tasks.items():
            d = entry.get("duration_s") if isinstance(entry, dict) else None
            if isinstance(d, int | float) and d >= 0:
                out[tid] = float(d)
        return out

    def task(self, task_id: str) -> dict[str, Any]:
        entry = self.tasks.get(task_id)
        return entry if isinstance(entry, dict) else {}

    def record(self, task_id: str, **fields: Any) -> None:
        entry = self.tasks.setdefault(task_id, {})
        entry.update({k: v for k, v in fields.items() if v is not None})

    def forget(self, task_id: str, *keys: str) -> None:
        entry = self.tasks.get(task_id)
        if isinstance(entry, dict):
            for k in keys:
                entry.pop(k, None)

    def save(self) -> None:
        data: dict[str, Any] = {"version": 1, "last_run": self.runs, "tasks": self.tasks}
        write_text(self.path, tomli_w.dumps(data))
        self._last_save = time.monotonic()

    def save_soon(self, n_tasks: int) -> None:
        """Save now, unless this is a big run and the last save was very recent."""
        if n_tasks <= SAVE_EVERY_TASK_UP_TO or (
                time.monotonic() - self._last_save >= SAVE_INTERVAL_S):
            self.save()
