"""Per-output-dir memory between runs (ninja's `BuildLog`).

`.dispatch-state.toml` records each task's last duration and result.  The
scheduler uses the durations to weight the critical path; later runs of the
daemon use the rest.  Written atomically with tomli-w, read with tomllib; a
damaged file is treated as empty rather than blocking work.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from .atomic import write_text

STATE_FILE = ".dispatch-state.toml"


@dataclass
class State:
    path: Path
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: dict[str, Any] = field(default_factory=dict)

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

    def record(self, task_id: str, **fields: Any) -> None:
        entry = self.tasks.setdefault(task_id, {})
        entry.update({k: v for k, v in fields.items() if v is not None})

    def save(self) -> None:
        data: dict[str, Any] = {"version": 1, "last_run": self.runs, "tasks": self.tasks}
        write_text(self.path, tomli_w.dumps(data))
