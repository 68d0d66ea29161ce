"""The programmatic front door: load, schedule, run, report.

The CLI and the daemon call `run_spec` on a spec they loaded themselves; the
GitHub Action and scripts call `dispatch` (sync) or `run_dispatch` (async).
None of them knows about the scheduler's internals.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import errno
import json
import resource
import secrets
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from .atomic import write_text
from .budget import history, per_attempt
from .errors import DispatchError
from .fmt import now_iso, plural
from .incremental import Reuse
from .live import LiveJournal
from .loader import load_spec
from .merge import merge_changes
from .notify import NotifyingProgress, notifying
from .outputs import clean_staging, clean_stale_staging
from .probe import pid_alive
from .process import sweep_run
from .progress import LiveProgress, NullProgress, Progress
from .quota import Governor
from .report import REPORT_JSON, REPORT_MD, to_json, to_markdown, write_reports
from .result import (
    COUNTED,
    MERGE_PROBLEMS,
    PROBLEMS,
    RunResult,
    RunStatus,
    TaskRecord,
    TaskStatus,
)
from .runners import DryRunRunner, Runner, RunnerSet
from .runners.isolated import IsolatedRunner
from .scheduler import Scheduler
from .spec import CHANGES_DIR, DispatchSpec
from .state import State
from .worktree import GitError, base_commit, clean_leftovers, git, read_numstat


def new_run_id() -> str:
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(3)}"


def overrides_from(
    *, max_parallel: int | None = None, timeout_ms: int | None = None,
    output_dir: str | None = None, on_failure: str | None = None,
    max_cost_usd: float | None = None, idle_timeout_ms: int | None = None,
    max_tokens: int | None = None, warn_cost_usd: float | None = None,
    max_quota_wait_ms: int | None = None, fixed_parallel: bool = False,
) -> dict[str, Any]:
    """CLI-flag layer of the settings precedence (None = not given)."""
    return {"max_parallel": max_parallel, "timeout_per_task": timeout_ms,
            "output_dir": output_dir, "on_failure": on_failure, "max_cost_usd": max_cost_usd,
            "idle_timeout": idle_timeout_ms, "max_tokens": max_tokens,
            "warn_cost_usd": warn_cost_usd, "max_quota_wait": max_quota_wait_ms,
            "adaptive_parallel": False if fixed_parallel else None}


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
    governor: Governor | None = None,
) -> RunResult:
    """Run a validated spec to completion and write its reports (unless dry run).

    With `reuse`, tasks unchanged since their last successful run are `cached`
    instead of run (`--resume`, the daemon).  `limiter` is a slot pool shared
    with other runs, `governor` their runner and agent pools (quota.py).  With
    `handle_signals`, SIGINT/SIGTERM interrupt the run:
    agents' process groups are killed, a partial report is written, and the
    result says `interrupted` (exit code 130).  `scheduler_hook` receives the
    scheduler before it starts, so a caller can `interrupt()` it later.
    """
    progress = progress or NullProgress()
    notify = spec.config.notify
    if notify is not None and not dry_run and not isinstance(progress, NotifyingProgress):
        async with notifying(notify, progress) as tee:  # `[notify]`: a tee to notify.py
            return await run_spec(spec, runner=runner, progress=tee, run_id=run_id,
                                  handle_signals=handle_signals, reuse=reuse, limiter=limiter,
                                  scheduler_hook=scheduler_hook, governor=governor)
    if not dry_run:  # the live page's feed (live.py), beside whatever shows progress
        progress = LiveJournal(progress)
    real = runner or RunnerSet()
    active: Runner = DryRunRunner(real) if dry_run else real
    fd_note = None
    if not dry_run:
        spec, fd_note = _within_fd_limit(spec)
    result = new_result(spec, run_id, dry_run)
    if fd_note is not None:
        result.notes.append(fd_note)
    isolated: IsolatedRunner | None = None
    if not dry_run:
        await clean_leftovers(spec.root)  # worktrees of a dispatcher killed outright
        if spec.any_isolated:
            active = isolated = IsolatedRunner(real, spec, await _base_commit(spec))
            result.base_commit = isolated.base
    state = State.load(spec.settings.output_dir)
    cache = None if dry_run else Reuse(spec, state, enabled=reuse)
    scheduler = Scheduler(
        spec, active, result, progress=progress, durations=state.durations(), reuse=cache,
        limiter=limiter, usage=history(state.tasks), governor=governor,
        on_task_done=None if dry_run else _recorder(result, state))
    if scheduler_hook is not None:
        scheduler_hook(scheduler)
    if isinstance(progress, LiveProgress | LiveJournal):
        progress.watch_pools(scheduler.governor, trio.current_time)
    if not dry_run:
        _open_output_dir(spec, state, result)
    progress.run_started(result)
    merging = trio.CancelScope()  # a signal while merging stops the merge queue too
    try:
        async with trio.open_nursery() as nursery:
            if handle_signals:
                nursery.start_soon(_interrupt_on_signals, scheduler, merging)
            redraw = getattr(progress, "redraw", None)
            if callable(redraw):
                nursery.start_soon(_tick, redraw)
            await scheduler.run()
            if isolated is not None and spec.settings.merge != "none":
                with merging:
                    await _merge(result, isolated, progress, state)
            nursery.cancel_scope.cancel()
    finally:
        # Settled even when the run was cancelled from outside (see `Scheduler.run`):
        # the report below must hold no `running` or `pending` task.
        result.finished_at = now_iso()
        if isinstance(active, DryRunRunner):
            result.plan_lines = list(active.started)
            _mark_planned(result)
        else:
            with trio.CancelScope(shield=True):
                await _kill_leftovers(result)
                if isolated is not None:
                    await _settle_worktrees(result, isolated)
                close_checks = getattr(real, "close_checks", None)
                if close_checks is not None:  # the schema-check worker (schema_check.py)
                    await close_checks()
                _finish(result, state)
    progress.run_finished(result)
    return result


def _mark_planned(result: RunResult) -> None:
    for rec in result.records:
        if rec.status == TaskStatus.SUCCEEDED:
            rec.status = TaskStatus.PLANNED
        rec.start_s = rec.end_s = None
        rec.busy_s = 0.0
    result.wall_s = 0.0


def _recorder(result: RunResult, state: State) -> Callable[[TaskRecord], None]:
    """Record each finished task in the state as it finishes (journaled: crash safety)."""

    def record(rec: TaskRecord) -> None:
        used = per_attempt(rec.metrics, rec.attempts)
        if rec.status == TaskStatus.SUCCEEDED:
            state.record(rec.id, duration_s=round(rec.busy_s, 3), status=rec.status,
                         finished_run=result.run_id, cost_usd=used.cost_usd,
                         tokens=used.tokens)
        elif rec.status in PROBLEMS:
            state.record(rec.id, status=rec.status, finished_run=result.run_id,
                         cost_usd=used.cost_usd, tokens=used.tokens)
        # cached, skipped, cancelled: the last real result still stands

    return record


async def _kill_leftovers(result: RunResult) -> None:
    """Every attempt killed its own processes; this catches any that escaped all the same
    (see `process.py`), before the staging folder goes and the report is written."""
    survivors = await sweep_run(result.run_id)
    if survivors:
        result.notes.append(
            f"{plural(len(survivors), 'agent process', 'agent processes')} of this run "
            f"could not be killed (pids {', '.join(map(str, survivors[:10]))}); they may "
            "still be writing under the output dir.")


async def _base_commit(spec: DispatchSpec) -> str:
    try:
        return await base_commit(spec.root)
    except (GitError, OSError) as exc:
        raise DispatchError(f"{spec.display}: {exc}") from None


async def _settle_worktrees(result: RunResult, isolated: IsolatedRunner) -> None:
    """Each succeeded isolated task's changes onto its record; the run's worktrees go."""
    for rec in result.records:
        if rec.status == TaskStatus.SUCCEEDED:
            rec.changes = isolated.changes.get(rec.id)
    await _cached_changes(result)
    await isolated.close(result.run_id)


async def _cached_changes(result: RunResult) -> None:
    """A `cached` isolated task's changes are its kept patch from the run that made it:
    without them an incremental run (`--resume`, the daemon) would leave that task's
    changes off the merge branch, and its dependents' patches, which assume them, would
    conflict."""
    spec = result.spec
    for i, rec in enumerate(result.records):
        if (rec.status != TaskStatus.CACHED or rec.changes is not None
                or spec.isolation(i) != "worktree"):
            continue
        patch = spec.patch_path(i)
        if not patch.is_file():
            continue
        try:
            numstat = await git(["apply", "--numstat", "-z", str(patch.resolve())], spec.root)
        except (GitError, OSError):
            continue  # not a patch git reads: the merge would fail on it the same way
        files, added, removed = read_numstat(numstat)
        rec.changes = {"patch": f"{CHANGES_DIR}/{rec.id}.patch", "files": files,
                       "added": added, "removed": removed}


async def _merge(result: RunResult, isolated: IsolatedRunner, progress: Progress,
                 state: State) -> None:
    """The merge queue (merge.py), once every task is done; a task it could not merge is
    recorded as such, so `--resume` and the daemon run it again."""
    for rec in result.records:
        if rec.status == TaskStatus.SUCCEEDED:
            rec.changes = isolated.changes.get(rec.id)
    await _cached_changes(result)
    await merge_changes(result, progress, isolated)
    for rec in result.records:
        if rec.status in MERGE_PROBLEMS:
            state.record(rec.id, status=rec.status, finished_run=result.run_id)


def _open_output_dir(spec: DispatchSpec, state: State, result: RunResult) -> None:
    """Create the output dir and start the state journal there, before any agent runs:
    a dir that cannot be written is one clear error (exit 2), not a traceback later."""
    out = spec.settings.output_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DispatchError(f"cannot create the output dir {out}: {_why(exc)}; choose a "
                            "writable one (--output or settings.output_dir)") from None
    if not _run_in_progress(state):
        clean_stale_staging(out)  # folders a crashed run left behind
    state.runs = {"run_id": result.run_id, "started_at": result.started_at,
                  "status": RunStatus.RUNNING, "task_file": str(spec.path),
                  "task_file_hash": spec.source_hash}
    try:
        state.begin()
    except OSError as exc:
        raise DispatchError(f"cannot write to the output dir {out}: {_why(exc)}; choose a "
                            "writable one (--output or settings.output_dir)") from None


def _why(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        text += " (the disk is full)"
    return text


def _run_in_progress(state: State) -> bool:
    """Whether the state says another run on this output dir is going on right now (a
    dispatcher still alive, maybe this very daemon): then its staging must stay."""
    runs = state.runs
    pid = runs.get("pid")
    return (runs.get("status") == RunStatus.RUNNING and isinstance(pid, int) and pid > 0
            and pid_alive(pid))


FDS_PER_AGENT = 8
"""File descriptors one running agent may need at once in the dispatcher (its log, its
output, /dev/null, a pidfd, the pipes of a spawn or of a preset's stream), with margin."""
FDS_RESERVED = 32
"""For the dispatcher itself: its state journal, registry, trio's wakeup fds, reports."""


def _within_fd_limit(spec: DispatchSpec) -> tuple[DispatchSpec, str | None]:
    """Lower max_parallel to what the open-files limit (ulimit -n) allows, and say so:
    otherwise agents past the limit fail with "Too many open files"."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return spec, None
    fits = max(1, (soft - FDS_RESERVED) // FDS_PER_AGENT)
    wanted = spec.settings.max_parallel
    if wanted <= fits:
        return spec, None
    settings = dataclasses.replace(spec.settings, max_parallel=fits)
    note = (f"max_parallel {wanted} was lowered to {fits}: this process may open only {soft} "
            f"files (ulimit -n), and each running agent needs about {FDS_PER_AGENT}; raise "
            "the limit to run more at once.")
    return dataclasses.replace(spec, settings=settings), note


def _finish(result: RunResult, state: State) -> None:
    """Clean up, save the state, write the reports: each step survives the one before
    failing (a full disk), so the user still gets a report, and learns where it is."""
    with contextlib.suppress(OSError):
        clean_staging(result.spec, result.run_id)
    try:
        state.update_run(finished_at=result.finished_at, status=result.status,
                         **{k: result.count(k) for k in COUNTED
                            if k not in MERGE_PROBLEMS or result.count(k)})
        state.save()
    except OSError as exc:
        result.notes.append(
            f"The state file {state.path} could not be saved ({_why(exc)}): --resume and "
            "the daemon may run again tasks that finished.")
    if state.error is not None:
        result.notes.append(f"Some task results could not be recorded in {state.journal_path} "
                            f"({_why(state.error)}).")
    try:
        write_reports(result)
    except OSError as exc:
        _write_reports_elsewhere(result, exc)


def _write_reports_elsewhere(result: RunResult, exc: OSError) -> None:
    """The output dir refused the reports: write them to a fresh folder in the temp dir
    (usually another file system), and say so in them and in `report_md_path`."""
    out_dir = result.spec.settings.output_dir
    folder = Path(tempfile.mkdtemp(prefix=f"parallel-dispatch-{result.run_id}-"))
    result.notes.append(f"The reports could not be written to the output dir {out_dir} "
                        f"({_why(exc)}); they are in {folder} instead.")
    data = to_json(result)
    result.report = data
    md, js = folder / REPORT_MD, folder / REPORT_JSON
    write_text(md, to_markdown(result, data))
    write_text(js, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    result.report_md_path, result.report_json_path = md, js


async def _interrupt_on_signals(scheduler: Scheduler, merging: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            scheduler.interrupt(f"interrupted by {signal.Signals(signum).name}")
            merging.cancel()


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
