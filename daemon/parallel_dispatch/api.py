"""The programmatic front door: load, schedule, run, report.

The CLI and the daemon call `run_spec` on a spec they loaded themselves; the
GitHub Action and scripts call `dispatch` (sync) or `run_dispatch` (async).
None of them knows about the scheduler's internals.
"""

from __future__ import annotations

import datetime as _dt
import secrets
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from .errors import DispatchError
from .fmt import now_iso
from .incremental import Reuse
from .loader import load_spec
from .outputs import clean_staging
from .progress import NullProgress, Progress
from .report import write_reports
from .result import COUNTED, PROBLEMS, RunResult, TaskRecord
from .runners import DryRunRunner, Runner, RunnerSet
from .scheduler import Scheduler
from .spec import DispatchSpec
from .state import State


def new_run_id() -> str:
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(3)}"


def overrides_from(
    *, max_parallel: int | None = None, timeout_ms: int | None = None,
    output_dir: str | None = None, on_failure: str | None = None,
    max_cost_usd: float | None = None, idle_timeout_ms: int | None = None,
) -> dict[str, Any]:
    """CLI-flag layer of the settings precedence (None = not given)."""
    return {"max_parallel": max_parallel, "timeout_per_task": timeout_ms,
            "output_dir": output_dir, "on_failure": on_failure, "max_cost_usd": max_cost_usd,
            "idle_timeout": idle_timeout_ms}


def new_result(spec: DispatchSpec, run_id: str | None = None, dry_run: bool = False) -> RunResult:
    levels = spec.graph.levels()
    records = [
        TaskRecord(id=t.id, agent=t.agent, wave=levels[i] + 1, output=t.output, spec=spec,
                   index=i)
        for i, t in enumerate(spec.tasks)
    ]
    return RunResult(spec=spec, run_id=run_id or new_run_id(), started_at=now_iso(),
                     records=records, dry_run=dry_run)


async def run_spec(
    spec: DispatchSpec,
    *,
    runner: Runner | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
    handle_signals: bool = False,
    run_id: str | None = None,
    reuse: bool = False,
    limiter: trio.CapacityLimiter | None = None,
    scheduler_hook: Callable[[Scheduler], None] | None = None,
) -> RunResult:
    """Run a validated spec to completion and write its reports (unless dry run).

    With `reuse`, tasks unchanged since their last successful run are `cached`
    instead of run (`--resume`, the daemon).  `limiter` is a slot pool shared
    with other runs.  With `handle_signals`, SIGINT/SIGTERM interrupt the run:
    agents' process groups are killed, a partial report is written, and the
    result says `interrupted` (exit code 130).  `scheduler_hook` receives the
    scheduler before it starts, so a caller can `interrupt()` it later.
    """
    progress = progress or NullProgress()
    real = runner or RunnerSet()
    active: Runner = DryRunRunner(real) if dry_run else real
    result = new_result(spec, run_id, dry_run)
    state = State.load(spec.settings.output_dir)
    cache = None if dry_run else Reuse(spec, state, enabled=reuse)
    scheduler = Scheduler(
        spec, active, result, progress=progress, durations=state.durations(), reuse=cache,
        limiter=limiter, on_task_done=None if dry_run else _recorder(result, state))
    if scheduler_hook is not None:
        scheduler_hook(scheduler)
    if not dry_run:
        try:
            spec.settings.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DispatchError(
                f"cannot create the output dir {spec.settings.output_dir}: "
                f"{exc.strerror or exc}; choose a writable one (--output or settings.output_dir)"
            ) from None
        state.runs = {"run_id": result.run_id, "started_at": result.started_at,
                      "status": "running", "task_file": str(spec.path),
                      "task_file_hash": spec.source_hash}
        state.begin()
    progress.run_started(result)
    try:
        async with trio.open_nursery() as nursery:
            if handle_signals:
                nursery.start_soon(_interrupt_on_signals, scheduler)
            redraw = getattr(progress, "redraw", None)
            if callable(redraw):
                nursery.start_soon(_tick, redraw)
            await scheduler.run()
            nursery.cancel_scope.cancel()
    finally:
        result.finished_at = now_iso()
        if isinstance(active, DryRunRunner):
            result.plan_lines = list(active.started)
            _mark_planned(result)
        else:
            with trio.CancelScope(shield=True):
                _finish(result, state)
    progress.run_finished(result)
    return result


def _mark_planned(result: RunResult) -> None:
    for rec in result.records:
        if rec.status == "succeeded":
            rec.status = "planned"
        rec.start_s = rec.end_s = None
        rec.busy_s = 0.0
    result.wall_s = 0.0


def _recorder(result: RunResult, state: State) -> Callable[[TaskRecord], None]:
    """Record each finished task in the state as it finishes (journaled: crash safety)."""

    def record(rec: TaskRecord) -> None:
        if rec.status == "succeeded":
            state.record(rec.id, duration_s=round(rec.busy_s, 3), status="succeeded",
                         finished_run=result.run_id)
        elif rec.status in PROBLEMS:
            state.record(rec.id, status=rec.status, finished_run=result.run_id)
        # cached, skipped, cancelled: the last real result still stands

    return record


def _finish(result: RunResult, state: State) -> None:
    clean_staging(result.spec, result.run_id)
    state.update_run(finished_at=result.finished_at, status=result.status,
                     **{k: result.count(k) for k in
                        COUNTED})
    state.save()
    write_reports(result)


async def _interrupt_on_signals(scheduler: Scheduler) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            scheduler.interrupt(f"interrupted by {signal.Signals(signum).name}")


async def _tick(redraw: Any) -> None:
    while True:
        await trio.sleep(1.0)
        redraw()


async def run_dispatch(
    task_file: str | Path,
    *,
    max_parallel: int | None = None,
    timeout_ms: int | None = None,
    output_dir: str | None = None,
    on_failure: str | None = None,
    config_path: str | Path | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
    runner: Runner | None = None,
    handle_signals: bool = False,
    max_cost_usd: float | None = None,
    idle_timeout_ms: int | None = None,
) -> RunResult:
    """Validate `task_file` (raising `TaskFileError`) and run it."""
    spec = load_spec(task_file, config_path=config_path, overrides=overrides_from(
        max_parallel=max_parallel, timeout_ms=timeout_ms, output_dir=output_dir,
        on_failure=on_failure, max_cost_usd=max_cost_usd, idle_timeout_ms=idle_timeout_ms))
    return await run_spec(spec, runner=runner, dry_run=dry_run, progress=progress,
                          handle_signals=handle_signals)


def dispatch(task_file: str | Path, **kwargs: Any) -> RunResult:
    """Synchronous `run_dispatch`, for scripts and the GitHub Action."""
    return trio.run(lambda: run_dispatch(task_file, **kwargs))
