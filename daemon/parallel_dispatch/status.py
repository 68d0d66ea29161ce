"""`parallel-dispatch status`: each task file's last run, and what runs now.

Reads what the daemon and the runs leave behind — `.aiwg/dispatch-daemon.json`
and each output dir's `.dispatch-state.toml` / report — so it works whether
or not a daemon is running, and never talks to one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .config import load_config
from .daemon import STATUS_FILE, _name
from .errors import DispatchError, TaskFileError
from .loader import load_spec
from .report import REPORT_JSON
from .result import COUNTED
from .state import State
from .watcher import is_task_file


def _daemon(project: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((project / STATUS_FILE).read_text())
        os.kill(int(data["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return data if isinstance(data, dict) else None


def render_status(project: Path, tasks_dir: Path | None = None) -> str:
    project = project.resolve()
    tasks_dir = tasks_dir or project / ".aiwg" / "tasks"
    daemon = _daemon(project)
    lines = []
    if daemon:
        lines.append(f"daemon: running (pid {daemon['pid']}, since {daemon['started_at']}, "
                     f"global max_parallel {daemon['max_parallel']})")
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
    for path in files:
        name = _name(path, tasks_dir)
        lines.append("")
        shown = path.relative_to(project) if path.is_relative_to(project) else path
        lines.append(f"{name}  ({shown})")
        try:
            spec = load_spec(path, config=config, default_subdir=name)
        except TaskFileError as exc:
            lines.append(f"  invalid: {len(exc.diagnostics)} error(s), first: "
                         f"{exc.diagnostics[0].format()}")
            continue
        out = spec.settings.output_dir
        last = State.load(out).runs
        if last:
            counts = ", ".join(f"{last[k]} {k}" for k in
                               COUNTED if last.get(k))
            when = last.get("finished_at") or last.get("started_at", "?")
            lines.append(f"  last run: {last.get('status', '?')} at {when} "
                         f"({counts or 'no tasks'}) — run {last.get('run_id', '?')}")
        elif (out / REPORT_JSON).is_file():
            lines.append("  last run: none (see its report)")
        else:
            lines.append("  last run: never")
        now = live.get(name)
        if now and now.get("running"):
            lines.append(f"  running now: {now.get('done')}/{now.get('total')} done; "
                         f"agents: {', '.join(now.get('running_tasks') or []) or '(none)'}")
        lines.append(f"  output: {out}")
    return "\n".join(lines)
