"""`parallel-dispatch status`: each task file's last run, and what runs now.

Reads what the daemon and the runs leave behind — `.aiwg/dispatch-daemon.json`
and each output dir's `.dispatch-state.toml` / report — so it works whether
or not a daemon is running; only `--json` also asks the live control sockets
(control.py) about the runs going on now.  Runs made with the CLI are
found too: their state lives in the output dir they wrote to (`.aiwg/working/`
by default), and names the task file it ran (see `State.begin`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ProjectConfig, load_config, resolve_settings
from ..control import list_runs
from ..errors import DispatchError, TaskFileError
from ..fmt import plural
from ..loader import load_spec
from ..model import Settings
from ..outputs import dirs_holding
from ..probe import pid_alive
from ..quota import pool_lines
from ..report import REPORT_JSON
from ..result import COUNTED, RunStatus
from ..state import STATE_FILE, State
from ..taskfiles import STATUS_FILE, is_task_file, task_name


def _daemon(project: Path) -> dict[str, Any] | None:
    """The running daemon's status file; a daemon of another user (EPERM) is running."""
    try:
        data = json.loads((project / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and _alive(data.get("pid")) else None




@dataclass
class _Run:
    """The last run recorded in one output dir (`.dispatch-state.toml`)."""

    out: Path
    state: State

    @property
    def info(self) -> Mapping[str, Any]:
        """`[last_run]` (a `RunEntry`), read with its per-status counts by name."""
        return self.state.runs

    @property
    def when(self) -> str:
        return str(self.info.get("finished_at") or self.info.get("started_at") or "")

    def task_file(self, project: Path) -> Path | None:
        """The task file it ran; a relative path (older state files) is taken from the root."""
        raw = self.info.get("task_file")
        if not isinstance(raw, str) or not raw:
            return None
        path = Path(raw)
        return (path if path.is_absolute() else project / path).resolve()


def _state_dirs(bases: list[Path]) -> set[Path]:
    """Output dirs under `bases` holding a `.dispatch-state.toml`."""
    return dirs_holding(bases, STATE_FILE)


def _runs(project: Path, config: ProjectConfig, more: set[Path]) -> list[_Run]:
    """Every run `status` can find: the daemon's dirs, the CLI's default dir, under `.aiwg/`."""
    cli_dir = resolve_settings(project, Settings(), config, {}).output_dir
    dirs = more | {cli_dir} | _state_dirs([project / ".aiwg", cli_dir])
    runs = []
    for out in sorted(dirs):
        state = State.load(out)
        if state.runs:
            runs.append(_Run(out, state))
    return runs


def _rel(path: Path, project: Path) -> str:
    return str(path.relative_to(project) if path.is_relative_to(project) else path)


def _alive(pid: Any) -> bool:
    return isinstance(pid, int) and pid > 0 and pid_alive(pid)


def _run_lines(run: _Run, project: Path) -> list[str]:
    last = run.info
    status = last.get("status", "?")
    out = _rel(run.out, project)
    if status == RunStatus.RUNNING:
        pid = last.get("pid")
        done = sum(1 for t in run.state.tasks.values()
                   if isinstance(t, dict) and t.get("finished_run") == last.get("run_id"))
        if pid is not None and not _alive(pid):
            return [f"  last run: did not finish — started {last.get('started_at', '?')}, its "
                    f"dispatcher (pid {pid}) is gone (killed?) — run {last.get('run_id', '?')}",
                    f"  output: {out}"]
        who = f"pid {pid}, " if pid is not None else ""
        return [f"  running now ({who}started {last.get('started_at', '?')}): "
                f"{plural(done, 'task')} finished so far — run {last.get('run_id', '?')}",
                f"  output: {out}"]
    counts = ", ".join(f"{last[k]} {k}" for k in COUNTED if last.get(k))
    return [f"  last run: {status} at {run.when or '?'} ({counts or 'no tasks'}) — run "
            f"{last.get('run_id', '?')}", f"  output: {out}"]


def render_status(project: Path, tasks_dir: Path | None = None) -> str:
    """The daemon, each task file of the tasks dir, then runs of other files (the CLI's).

    A task file's last run is the latest recorded for it anywhere `status` looks: the
    daemon's per-file dir, or the dir a CLI run wrote to (`.aiwg/working/` by default).
    """
    project = project.resolve()
    tasks_dir = tasks_dir or project / ".aiwg" / "tasks"
    daemon = _daemon(project)
    lines = []
    if daemon:
        lines.append(f"daemon: running (pid {daemon['pid']}, since {daemon['started_at']}, "
                     f"global max_parallel {daemon['max_parallel']})")
        lines += [f"  pool {line}" for line in pool_lines(daemon.get("pools") or [])]
    else:
        lines.append("daemon: not running")
    live = (daemon or {}).get("files", {})
    try:
        config = load_config(project)
    except DispatchError as exc:
        return "\n".join([*lines, f"config: invalid — {exc}"])
    files = sorted(p for p in tasks_dir.rglob("*")
                   if p.is_file() and is_task_file(p.relative_to(tasks_dir))) \
        if tasks_dir.is_dir() else []
    if not files:
        lines.append(f"no task files in {tasks_dir}")
    specs: dict[Path, tuple[str, Path | None, str | None]] = {}
    for path in files:
        name = task_name(path, tasks_dir)
        try:
            spec = load_spec(path, config=config, default_subdir=name)
        except TaskFileError as exc:
            first = exc.diagnostics[0].format()
            count = plural(len(exc.diagnostics), "error")
            specs[path.resolve()] = (name, None, f"  invalid: {count}, first: {first}")
            continue
        specs[path.resolve()] = (name, spec.settings.output_dir, None)
    runs = _runs(project, config, {out for _n, out, _e in specs.values() if out is not None})
    by_file: dict[Path | None, _Run] = {}
    for candidate in runs:
        key = candidate.task_file(project)
        if key not in by_file or candidate.when > by_file[key].when:
            by_file[key] = candidate
    for path, (name, out, invalid) in specs.items():
        lines.append("")
        lines.append(f"{name}  ({_rel(path, project)})")
        if invalid is not None:
            lines.append(invalid)
        run = by_file.pop(path, None)
        now = live.get(name) or {}
        if invalid is None and now.get("error"):
            lines.append(f"  could not run: {now['error']}")
        if (run is not None and now.get("running")
                and run.info.get("status") == RunStatus.RUNNING):
            run = None  # the daemon runs it now: its own live view (below) says more
        if run is not None:
            lines += _run_lines(run, project)
        elif now.get("running"):
            pass
        elif out is not None and (out / REPORT_JSON).is_file():
            lines.append("  last run: none (see its report)")
        elif invalid is None:
            lines.append("  last run: never")
        if now.get("running"):
            lines.append(f"  running now: {now.get('done')}/{now.get('total')} done; "
                         f"agents: {', '.join(now.get('running_tasks') or []) or '(none)'}")
            if now.get("waiting_for_quota"):
                lines.append(f"  waiting for quota: {', '.join(now['waiting_for_quota'])}")
        if run is None and out is not None:
            lines.append(f"  output: {_rel(out, project)}")
    if by_file:
        lines += ["", "Other task files (run from the command line):"]
        for key, run in sorted(by_file.items(), key=lambda kv: kv[1].when, reverse=True):
            lines.append("")
            if key is None:
                lines.append("(task file not recorded)")
            else:
                lines.append(_rel(key, project)
                             + ("" if key.exists() else "  (file no longer exists)"))
            lines += _run_lines(run, project)
    return "\n".join(lines)


def status_json(project: Path, tasks_dir: Path | None = None) -> str:
    """`status --json`: what runs now, asked of the live control sockets (`runs`: each
    `list` view of control.py, with its `dispatcher`), and the last run recorded in each
    output dir (`last_runs`), read from the files as `status` does."""
    project = project.resolve()
    daemon = _daemon(project)
    config = load_config(project)
    more = set()
    for entry in ((daemon or {}).get("files") or {}).values():
        if isinstance(entry, dict) and entry.get("output_dir"):
            more.add(Path(entry["output_dir"]))
    last = []
    for run in _runs(project, config, more):
        info = run.info
        pid = info.get("pid")
        status = info.get("status")
        if status == RunStatus.RUNNING and pid is not None and not _alive(pid):
            status = "did_not_finish"  # its dispatcher is gone (killed?)
        last.append({
            "task_file": str(run.task_file(project) or "") or None,
            "output_dir": str(run.out),
            "run_id": info.get("run_id"), "status": status, "pid": pid,
            "started_at": info.get("started_at"), "finished_at": info.get("finished_at"),
            "counts": {k: info[k] for k in COUNTED if info.get(k)},
        })
    live = list_runs(project)
    return json.dumps({
        "project": str(project),
        "tasks_dir": str(tasks_dir or project / ".aiwg" / "tasks"),
        "daemon": ({k: daemon.get(k) for k in ("pid", "started_at", "max_parallel")}
                   if daemon else None),
        "live": bool(live),
        "runs": live,
        "last_runs": last,
    }, indent=2, ensure_ascii=False)
