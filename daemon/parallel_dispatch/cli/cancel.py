"""`parallel-dispatch cancel FILE|RUN-ID [TASK-ID]`: stop a task, or a run, that runs now.

It asks the dispatcher running it (the daemon, or a run started with `--control`) on
its control socket (control.py), and prints what became of it once it has stopped.
Exit codes: 0 cancelled; 1 refused (the task already finished, the run ended); 2 no
dispatcher running, or no such run or task (with a did-you-mean).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TextIO

from ..control import ControlError, cancel


def cancel_command(project: Path, target: str, task: str | None, *, out: TextIO,
                   err: TextIO) -> int:
    try:
        reply = cancel(project.resolve(), target, task,
                       by=f"parallel-dispatch cancel (pid {os.getpid()})")
    except ControlError as exc:
        print(f"parallel-dispatch: error: {exc}", file=err)
        return 1 if exc.kind == "refused" else 2
    if task is None:
        tasks = reply["tasks"]
        counts: dict[str, int] = {}
        for status in tasks.values():
            counts[status] = counts.get(status, 0) + 1
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        print(f"run {reply['run_id']} cancelled: {summary}", file=out)
        return 0
    line = f"task '{reply['task']}' of run {reply['run_id']}: {reply['status']}"
    if reply.get("reason"):
        line += f" ({reply['reason']})"
    print(line, file=out)
    if reply.get("skipped"):
        print(f"skipped, as they depend on it: {', '.join(reply['skipped'])}", file=out)
    if reply["status"] != "cancelled":
        print("it ended before the cancel reached it" if reply["status"] != "running"
              else "still stopping: `parallel-dispatch status --json` shows when it has",
              file=out)
    return 0
