"""A registry of live agents, so no agent outlives a crashed dispatcher.

Agents run in their own sessions, so they survive a `kill -9` of the
dispatcher.  Each spawn writes `<project>/.aiwg/.dispatch-agents/<pgid>`
(JSON: dispatcher pid, run id); the file goes when the group is gone.  At
start the daemon (and the CLI) reap entries whose dispatcher is dead: the
group is killed if `/proc/<pid>/environ` still carries that run's
`DISPATCH_RUN_ID`, which guards against a recycled pid.  Under systemd,
`KillMode=control-group` already kills the whole cgroup; this covers the rest.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from pathlib import Path

from .process import signal_group

log = logging.getLogger("parallel_dispatch")

REGISTRY_DIR = ".aiwg/.dispatch-agents"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _group_members(pgid: int) -> list[int]:
    """Live processes of a group (its leader may be gone while children remain)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            members.append(int(entry))
    return members


def _runs_with(pid: int, run_id: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            env = fh.read().split(b"\0")
    except OSError:
        return False
    return f"DISPATCH_RUN_ID={run_id}".encode() in env


class AgentRegistry:
    """Records this process's live agent groups under the project."""

    def __init__(self, project: Path) -> None:
        self.dir = project / REGISTRY_DIR

    def add(self, pgid: int, run_id: str) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            data = {"pgid": pgid, "dispatcher": os.getpid(), "run_id": run_id}
            (self.dir / str(pgid)).write_text(json.dumps(data))
        except OSError as exc:  # a registry we cannot write must not fail the task
            log.warning("cannot record agent %s in %s: %s", pgid, self.dir, exc)

    def remove(self, pgid: int) -> None:
        with contextlib.suppress(OSError):
            (self.dir / str(pgid)).unlink()

    def reap(self) -> list[int]:
        """Kill agent groups left behind by dead dispatchers; return their pgids."""
        killed: list[int] = []
        try:
            entries = list(self.dir.iterdir())
        except OSError:
            return killed
        for entry in entries:
            try:
                data = json.loads(entry.read_text())
                pgid, owner, run_id = int(data["pgid"]), int(data["dispatcher"]), data["run_id"]
            except (OSError, ValueError, KeyError, TypeError):
                entry.unlink(missing_ok=True)
                continue
            if owner != os.getpid() and _alive(owner):
                continue  # its dispatcher is still looking after it
            if any(_runs_with(p, str(run_id)) for p in _group_members(pgid)):
                signal_group(pgid, signal.SIGKILL)
                killed.append(pgid)
                log.warning("killed orphaned agent process group %s (run %s)", pgid, run_id)
            entry.unlink(missing_ok=True)
        return killed
