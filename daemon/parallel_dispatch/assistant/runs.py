"""Runs an assistant started: each one a `run_spec` in the MCP server's own nursery.

The assistant gets a run id at once and asks later (`status`, `wait`, `result`), so the
run lives in a nursery the server owns, not in the tool call.  Paths are confined to the
project: the assistant runs with the user's authority, but a tool argument is text from
a model, and `../../etc/x` must not read or run anything outside the project.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ..api import new_run_id, overrides_from, run_spec
from ..control import ControlError, ControlledRun
from ..errors import DispatchError, TaskFileError
from ..loader import load_spec
from ..result import RunResult
from ..runners import RunnerSet
from ..scheduler import Refused, Scheduler
from ..spec import DispatchSpec

INLINE_DIR = ".aiwg/mcp/tasks"
"""Task files given as text.  Not under `.aiwg/tasks/`: a daemon watching the project
would run them a second time (README "From Claude Code")."""
MAX_RESULT_BYTES = 64 * 1024
MAX_RESULT_LIMIT = 1024 * 1024
MAX_WAIT_S = 600.0
"""One `wait` call at most; the assistant calls again for longer runs."""


class ToolInputError(DispatchError):
    """A tool argument the assistant must fix (the message says how)."""


@dataclass
class Run:
    run_id: str
    spec: DispatchSpec
    task_file: str
    done: trio.Event = field(default_factory=trio.Event)
    scheduler: Scheduler | None = None
    result: RunResult | None = None
    error: str | None = None


class Runs:
    """The runs of one MCP server process, by id; `start` needs `bind(nursery)` first.

    Also what the server's control socket serves (`control.Controlled`), so
    `parallel-dispatch cancel RUN-ID` and `status --json` reach these runs too."""

    kind = "mcp"

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.by_id: dict[str, Run] = {}
        self._nursery: trio.Nursery | None = None

    def bind(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    # -- inputs ------------------------------------------------------------------------
    def confine(self, path: str) -> Path:
        """`path` (relative to the project, or absolute inside it) as an existing file."""
        p = Path(path)
        full = (p if p.is_absolute() else self.root / p).resolve()
        if not full.is_relative_to(self.root):
            raise ToolInputError(f"{path}: outside the project {self.root}; give a path "
                                 "inside it (relative paths are taken from the project root)")
        if not full.is_file():
            raise ToolInputError(f"{path}: no such task file in the project")
        return full

    def task_file(self, path: str | None, text: str | None) -> Path:
        """The task file a tool names: a path, or text written under `INLINE_DIR`."""
        if (path is None) == (text is None):
            raise ToolInputError("give exactly one of `path` (a task file in the project) "
                                 "or `text` (the YAML of a task file)")
        if path is not None:
            return self.confine(path)
        assert text is not None
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        folder = self.root / INLINE_DIR
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"inline-{digest}.yaml"
        if not target.exists():
            tmp = target.with_suffix(".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(target)
        return target

    def load(self, file: Path, options: Mapping[str, Any] | None = None) -> DispatchSpec:
        """The validated spec, with the CLI-flag layer of settings from `options`
        (`max_parallel`, `timeout_ms`, `output` inside the project, `on_failure`)."""
        opts = dict(options or {})
        output = opts.get("output")
        if output is not None:
            full = (self.root / output).resolve()
            if not full.is_relative_to(self.root):
                raise ToolInputError(f"output {output}: outside the project {self.root}; "
                                     "give a folder inside it")
        overrides = overrides_from(max_parallel=opts.get("max_parallel"),
                                   timeout_ms=opts.get("timeout_ms"), output_dir=output,
                                   on_failure=opts.get("on_failure"))
        return load_spec(str(file), overrides=overrides)

    def display(self, file: Path) -> str:
        return str(file.relative_to(self.root))

    # -- runs ----------------------------------------------------------------------------
    def start(self, file: Path, options: Mapping[str, Any] | None = None) -> Run:
        """Validate and start a run; a TaskFileError (with file:line) when invalid."""
        if self._nursery is None:
            raise RuntimeError("Runs.start before bind")
        spec = self.load(file, options)
        run = Run(new_run_id(), spec, self.display(file))
        self.by_id[run.run_id] = run
        self._nursery.start_soon(self._run, run)
        return run

    async def _run(self, run: Run) -> None:
        def hook(scheduler: Scheduler) -> None:
            run.scheduler = scheduler

        try:
            run.result = await run_spec(run.spec, run_id=run.run_id, runner=RunnerSet(),
                                        scheduler_hook=hook)
        except Exception as exc:  # the server outlives a run that crashed
            run.error = f"{type(exc).__name__}: {exc}"
        finally:
            run.done.set()

    def runs(self) -> list[ControlledRun]:
        return [ControlledRun(Path(r.task_file).stem, self.root / r.task_file,
                              None if r.done.is_set() else r.scheduler, r.result)
                for r in self.by_id.values()]

    def rerun_ended(self, run: ControlledRun, task: str) -> dict[str, Any]:
        raise ControlError(f"the run of {run.name} has ended; start it again with the MCP "
                           "`run` tool", "refused")

    def get(self, run_id: str) -> Run:
        run = self.by_id.get(run_id)
        if run is None:
            known = ", ".join(sorted(self.by_id)[-5:]) or "none yet"
            raise ToolInputError(f"no run {run_id!r} was started by this server "
                                 f"(recent: {known}); `run` returns the id")
        return run

    def status(self, run: Run) -> dict[str, Any]:
        result = run.result or (run.scheduler.result if run.scheduler else None)
        tasks = [] if result is None else [
            {"id": r.id, "status": str(r.status), "attempts": r.attempts,
             **({"error": r.error} if r.error else {}),
             **({"event": r.event} if r.event and not run.done.is_set() else {})}
            for r in result.records]
        out: dict[str, Any] = {
            "run_id": run.run_id, "task_file": run.task_file,
            "state": "finished" if run.done.is_set() else "running", "tasks": tasks}
        if run.result is not None:
            out["status"] = str(run.result.status)
            out["report"] = str(run.result.report_md_path or "")
        if run.error:
            out["state"], out["error"] = "crashed", run.error
        return out

    async def wait(self, run: Run, timeout_s: float) -> dict[str, Any]:
        with trio.move_on_after(max(0.0, min(timeout_s, MAX_WAIT_S))):
            await run.done.wait()
        return self.status(run)

    async def cancel(self, run: Run, task_id: str | None) -> dict[str, Any]:
        """Stop the run, or one task (its dependents then skipped per the run's policy);
        returns once what was cancelled has stopped."""
        if run.done.is_set():
            raise ToolInputError(f"run {run.run_id} has already finished")
        scheduler = run.scheduler
        if scheduler is None:
            raise ToolInputError(f"run {run.run_id} is still starting; try again")
        if task_id is None:
            scheduler.interrupt("cancelled by the assistant (MCP `cancel`)")
            await run.done.wait()
            return {"run_id": run.run_id, "cancelled": "run"}
        ids = [t.id for t in run.spec.tasks]
        if task_id not in ids:
            raise ToolInputError(f"run {run.run_id} has no task {task_id!r} "
                                 f"(tasks: {', '.join(ids[:20])})")
        i = ids.index(task_id)
        try:
            scheduler.cancel_task(i, "cancelled by the assistant (MCP `cancel`)")
        except Refused as exc:
            raise ToolInputError(f"task {task_id!r} cannot be cancelled: {exc}") from None
        await scheduler.wait_done(i)
        return {"run_id": run.run_id, "cancelled": task_id}

    def result_text(self, run: Run, task_id: str | None, max_bytes: int) -> str:
        """The Markdown report, or one task's output, cut at `max_bytes` (said so)."""
        limit = max(1, min(max_bytes, MAX_RESULT_LIMIT))
        if not run.done.is_set() or run.result is None:
            raise ToolInputError(f"run {run.run_id} has not finished; call `wait` first")
        if task_id is None:
            path = run.result.report_md_path
            if path is None:
                raise ToolInputError(f"run {run.run_id} wrote no report")
        else:
            ids = [r.id for r in run.result.records]
            if task_id not in ids:
                raise ToolInputError(f"run {run.run_id} has no task {task_id!r} "
                                     f"(tasks: {', '.join(ids[:20])})")
            path = run.spec.output_path(ids.index(task_id))
            if not path.is_file():
                raise ToolInputError(f"task {task_id!r} has no output file ({path})")
        return _cut(path, limit)


def _cut(path: Path, limit: int) -> str:
    with open(path, "rb") as fh:
        data = fh.read(limit + 1)
    text = data[:limit].decode("utf-8", "replace")
    if len(data) > limit:
        size = path.stat().st_size
        text += f"\n[… cut at {limit} of {size} bytes; read {path} for the rest]\n"
    return text


def errors_of(exc: TaskFileError) -> list[str]:
    return [d.format() for d in exc.diagnostics]


def recent_reports(root: Path, limit: int = 20) -> list[Path]:
    """`dispatch-report.json` files under `.aiwg/working/`, newest first."""
    base = root / ".aiwg" / "working"
    name = "dispatch-report.json"
    found = [p for depth in ("*", "*/*", "*/*/*") for p in base.glob(f"{depth}/{name}")]
    found += [base / "dispatch-report.json"] if (base / "dispatch-report.json").exists() else []
    return sorted(set(found), key=lambda p: p.stat().st_mtime, reverse=True)[:limit]


def report_for(root: Path, run_id: str) -> Path | None:
    for path in recent_reports(root, 200):
        try:
            if json.loads(path.read_text(encoding="utf-8")).get("run_id") == run_id:
                return path.with_suffix(".md")
        except (OSError, ValueError):
            continue
    return None
