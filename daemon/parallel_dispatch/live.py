"""The live journal: what a run is doing now, one JSON line per change (the live page's feed).

`.dispatch-state.toml` and its journal (state.py) remember results between runs; they
never say which task runs *now*, which one waits for quota, or how full each pool is.
`LiveJournal` is a `Progress` observer that tees every progress call to the display it
wraps and appends one line to `<output_dir>/.dispatch-live.jsonl`, so any reader — the
live page (service/webpage.py), a `tail -f` — can follow a CLI run or the daemon's runs
without talking to the dispatcher.  The file is emptied when the next run on the same
output dir starts and kept after the run ends (the page shows finished runs too).

Lines (times are epoch seconds, `t`):
  {"ev": "run", "v": 1, "run_id", "name", "task_file", "output_dir", "pid", "t",
   "started_at", "max_parallel", "on_failure", "tasks": [{"id", "agent", "deps"}]}
  {"ev": "start", "id", "attempt", "t"}
  {"ev": "event", "id", "text", "kind", "t"}   (throttled per task)
  {"ev": "retry", "id", "status", "error", "delay", "t"}
  {"ev": "wait", "id", "pool", "wait_s", "error", "t"}   (waiting_for_quota)
  {"ev": "end", "id", "status", "attempts", "busy_s", "error", "cost_usd", "tokens", "t"}
  {"ev": "pools", "pools": [quota.Pool.snapshot...], "t"}   (when they change)
  {"ev": "note", "text", "t"}
  {"ev": "done", "status", "report", "t"}
Writing never stops a run: a failed write (a full disk) ends the journal, not the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .budget import Usage
from .events import AgentEvent
from .progress import Progress
from .quota import Governor
from .result import RunResult, TaskRecord

LIVE_FILE = ".dispatch-live.jsonl"
EVENT_EVERY_S = 1.0
"""A task's live events are journaled at most this often (retries and errors always)."""
MAX_BYTES = 16 * 1024 * 1024
"""Past this size only starts, ends and the run's end are written: a chatty run of
thousands of tasks must not fill the disk with progress lines."""
_compact = json.JSONEncoder(separators=(",", ":"), default=str).encode


class LiveJournal:
    """A `Progress` that forwards to `inner` and journals each call (see module doc)."""

    def __init__(self, inner: Progress) -> None:
        self.inner = inner
        self._file: IO[str] | None = None
        self._written = 0
        self._last_event: dict[str, float] = {}
        self._pools: Callable[[], list[dict[str, Any]]] | None = None
        self._pools_seen = "[]"
        self.error: OSError | None = None

    # -- journal --------------------------------------------------------------------
    def _write(self, entry: dict[str, Any], *, essential: bool = True) -> None:
        if self._file is None or (not essential and self._written > MAX_BYTES):
            return
        entry["t"] = round(time.time(), 3)
        line = _compact(entry) + "\n"
        try:
            self._file.write(line)
            self._file.flush()
        except OSError as exc:  # ENOSPC: the page loses its feed; the run goes on
            self.error = exc
            self.close()
            return
        self._written += len(line)

    def _check_pools(self) -> None:
        if self._pools is None:
            return
        pools = self._pools()
        seen = _compact(pools)
        if seen != self._pools_seen:
            self._pools_seen = seen
            self._write({"ev": "pools", "pools": pools}, essential=False)

    def close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(OSError):
                file.close()

    def watch_pools(self, governor: Governor, clock: Callable[[], float]) -> None:
        """Journal the run's pools (limits, running, waiting, pauses) as they change."""
        self._pools = lambda: governor.snapshot(clock())
        watch = getattr(self.inner, "watch_pools", None)
        if callable(watch):
            watch(governor, clock)

    def redraw(self) -> None:
        """Called every second while the run goes on (api._tick): pools change between
        events too (a pause ends, an adaptive limit grows back)."""
        self._check_pools()
        redraw = getattr(self.inner, "redraw", None)
        if callable(redraw):
            redraw()

    # -- Progress -------------------------------------------------------------------
    def run_started(self, result: RunResult) -> None:
        spec = result.spec
        path = Path(spec.settings.output_dir) / LIVE_FILE
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "w", encoding="utf-8")  # noqa: SIM115  # closed at run end
        except OSError as exc:
            self.error = exc
        s = spec.settings
        self._write({
            "ev": "run", "v": 1, "run_id": result.run_id, "name": spec.name,
            "task_file": os.path.abspath(spec.path), "output_dir": str(s.output_dir),
            "pid": os.getpid(), "started_at": result.started_at,
            "max_parallel": s.max_parallel, "on_failure": s.on_failure,
            "tasks": [{"id": t.id, "agent": t.agent, "deps": list(t.dependencies)}
                      for t in spec.tasks],
        })
        self._check_pools()
        self.inner.run_started(result)

    def task_started(self, rec: TaskRecord) -> None:
        # Pools are looked at once a second (`redraw`), not per start or end: a snapshot
        # and its encoding per task would be on the scheduler's hot path for nothing the
        # page shows much sooner (it polls the journal every 0.25 s).
        self._write({"ev": "start", "id": rec.id, "attempt": rec.attempts})
        self.inner.task_started(rec)

    def task_event(self, rec: TaskRecord, event: AgentEvent) -> None:
        now = time.monotonic()
        if event.kind in ("retry", "error") or \
                now - self._last_event.get(rec.id, -EVENT_EVERY_S) >= EVENT_EVERY_S:
            self._last_event[rec.id] = now
            self._write({"ev": "event", "id": rec.id, "text": event.text[:300],
                         "kind": event.kind}, essential=False)
        self.inner.task_event(rec, event)

    def task_retrying(self, rec: TaskRecord, delay: float) -> None:
        self._write({"ev": "retry", "id": rec.id, "status": rec.status,
                     "error": (rec.error or "")[:500], "delay": round(delay, 3)})
        self._check_pools()
        self.inner.task_retrying(rec, delay)

    def task_waiting(self, rec: TaskRecord, pool: str, wait_s: float) -> None:
        self._write({"ev": "wait", "id": rec.id, "pool": pool, "wait_s": round(wait_s, 3),
                     "error": (rec.error or "")[:500]})
        self._check_pools()
        self.inner.task_waiting(rec, pool, wait_s)

    def task_finished(self, rec: TaskRecord) -> None:
        used = Usage.of(rec.metrics)
        self._write({"ev": "end", "id": rec.id, "status": rec.status,
                     "attempts": rec.attempts, "busy_s": round(rec.busy_s, 3),
                     "error": (rec.reason or rec.error or "")[:500] or None,
                     "cost_usd": used.cost_usd, "tokens": used.tokens})
        self._last_event.pop(rec.id, None)
        self.inner.task_finished(rec)

    def note(self, text: str) -> None:
        self._write({"ev": "note", "text": text[:1000]})
        self.inner.note(text)

    def task_merged(self, rec: TaskRecord, text: str) -> None:
        self._write({"ev": "end", "id": rec.id, "status": rec.status, "merge": text[:500]})
        self.inner.task_merged(rec, text)

    def run_finished(self, result: RunResult) -> None:
        self._check_pools()
        report = result.report_md_path
        self._write({"ev": "done", "status": result.status,
                     "report": str(report) if report is not None else None})
        self.close()
        self.inner.run_finished(result)
