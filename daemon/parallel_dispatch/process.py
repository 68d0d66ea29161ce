"""Agents run in their own session; cancelling one kills its whole process group.

trio's default cancel signals only the direct child, which would orphan any
grandchildren an agent CLI spawns (node workers, shells, language servers).
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO

import trio

KILL_GRACE_S = 2.0
"""How long an agent gets between SIGTERM and SIGKILL."""


def signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to a process group; False when the group is already gone."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:  # pgid reused by someone else's process: not ours to kill
        return False
    return True


def make_group_killer(grace: float = KILL_GRACE_S):
    """A `deliver_cancel` for `trio.run_process` that terminates the whole group."""

    async def deliver_cancel(process: trio.Process) -> None:
        signal_group(process.pid, signal.SIGTERM)
        await trio.sleep(grace)
        signal_group(process.pid, signal.SIGKILL)

    return deliver_cancel


@dataclass
class Exit:
    returncode: int
    pid: int


async def run_in_group(
    argv: Sequence[str],
    *,
    cwd: str,
    env: Mapping[str, str],
    stdin: bytes,
    stdout: IO[bytes] | int,
    stderr: IO[bytes] | int,
    grace: float = KILL_GRACE_S,
    on_spawn: Callable[[int], None] | None = None,
    on_reaped: Callable[[int], None] | None = None,
) -> Exit:
    """Run `argv` as a new session leader and wait for it.

    Output goes straight to the given files, so the dispatcher never holds it in
    memory.  On cancellation the group gets SIGTERM, then SIGKILL after `grace`.
    However the leader ends, leftover group members are killed: an agent's
    background processes never outlive its task.  `on_spawn(pid)` runs as soon as
    the group exists and `on_reaped(pid)` once it is gone, so callers can keep a
    registry of live agents (see `orphans.py`).
    """
    pid = -1
    try:
        async with trio.open_nursery() as nursery:
            process: trio.Process = await nursery.start(_start, argv, cwd, env, stdin,
                                                        stdout, stderr, grace)
            pid = process.pid
            if on_spawn is not None:
                on_spawn(pid)
        return Exit(process.returncode if process.returncode is not None else -1, pid)
    finally:
        if pid > 0:
            signal_group(pid, signal.SIGKILL)
            if on_reaped is not None:
                on_reaped(pid)


async def _start(
    argv: Sequence[str], cwd: str, env: Mapping[str, str], stdin: bytes,
    stdout: IO[bytes] | int, stderr: IO[bytes] | int, grace: float,
    task_status: trio.TaskStatus[trio.Process] = trio.TASK_STATUS_IGNORED,
) -> None:
    await trio.run_process(
        list(argv), stdin=stdin or subprocess.DEVNULL,  # no pipe and feeder task for nothing
        stdout=stdout, stderr=stderr, cwd=cwd, env=dict(env),
        check=False, start_new_session=True, deliver_cancel=make_group_killer(grace),
        task_status=task_status,
    )
