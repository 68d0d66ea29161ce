"""A registry of live agents, so no agent outlives a crashed dispatcher.

Agents run in their own sessions, so they survive a `kill -9` of the
dispatcher.  Each dispatcher appends every spawn and every reaped group to
`<project>/.aiwg/.dispatch-agents/<its pid>.log`.  At start the daemon (and
the CLI) replay the files of dead dispatchers: each group still alive is
killed if a member's `/proc/<pid>/environ` carries that run's
`DISPATCH_RUN_ID`, which guards against a recycled pid.  Processes that left
their agent's group (`setsid`) are found the same way: any process still
carrying the `DISPATCH_RUN_ID` of a dead dispatcher's run is killed.  Under
systemd, `KillMode=control-group` already kills the whole cgroup; this covers
the rest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import IO

from .probe import pid_alive, signal_group, tagged
from .process import claim_orphans

log = logging.getLogger("parallel_dispatch")

REGISTRY_DIR = ".aiwg/.dispatch-agents"


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
    """This process's live agent groups, as an append-only file under the project.

    One file per dispatcher (`<dispatcher pid>.log`), one short line per spawn
    (`+ <pgid> <run id>`) and per reaped group (`- <pgid>`): a single appended
    write each, cheap enough for a thousand trivial tasks.
    """

    def __init__(self, project: Path) -> None:
        self.dir = project / REGISTRY_DIR
        self._file: IO[str] | None = None
        claim_orphans()  # only dedicated dispatchers (CLI, daemon) keep a registry

    def _write(self, line: str) -> None:
        try:
            if self._file is None:
                self.dir.mkdir(parents=True, exist_ok=True)
                self._file = open(self.dir / f"{os.getpid()}.log", "a")  # noqa: SIM115
            self._file.write(line + "\n")
            self._file.flush()
        except OSError as exc:  # a registry we cannot write must not fail the task
            log.warning("cannot record agents in %s: %s", self.dir, exc)

    def add(self, pgid: int, run_id: str) -> None:
        self._write(f"+ {pgid} {run_id}")

    def remove(self, pgid: int) -> None:
        self._write(f"- {pgid}")

    def close(self) -> None:
        """At a clean exit every group is gone: drop this process's file."""
        if self._file is not None:
            self._file.close()
            self._file = None
            with contextlib.suppress(OSError):
                (self.dir / f"{os.getpid()}.log").unlink()

    def reap(self) -> list[int]:
        """Kill agent groups left behind by dead dispatchers; return their pgids."""
        killed: list[int] = []
        try:
            entries = sorted(self.dir.glob("*.log"))
        except OSError:
            return killed
        runs: set[str] = set()
        dead: list[Path] = []
        for entry in entries:
            try:
                owner = int(entry.stem)
            except ValueError:
                continue
            if owner == os.getpid() or pid_alive(owner):
                continue  # its dispatcher is still looking after its agents
            live, seen = _replay(entry)
            runs |= seen
            for pgid, run_id in live.items():
                if any(_runs_with(p, run_id) for p in _group_members(pgid)):
                    signal_group(pgid, signal.SIGKILL)
                    killed.append(pgid)
                    log.warning("killed orphaned agent process group %s (run %s)", pgid,
                                run_id)
            dead.append(entry)
        # Escaped descendants (setsid) are in no recorded group: find them by run id.
        for pid, marker in tagged(f"DISPATCH_RUN_ID={r}" for r in runs).items():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                log.warning("killed orphaned agent process %s (%s, escaped its group)", pid,
                            marker.partition("=")[2])
        for entry in dead:
            entry.unlink(missing_ok=True)
        return killed


def _replay(path: Path) -> tuple[dict[int, str], set[str]]:
    """Groups spawned and not yet reaped, and every run id the file names."""
    live: dict[int, str] = {}
    runs: set[str] = set()
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return live, runs
    for line in lines:
        parts = line.split()
        try:
            if len(parts) == 3 and parts[0] == "+":
                live[int(parts[1])] = parts[2]
                runs.add(parts[2])
            elif len(parts) == 2 and parts[0] == "-":
                live.pop(int(parts[1]), None)
        except ValueError:
            continue
    return live, runs
