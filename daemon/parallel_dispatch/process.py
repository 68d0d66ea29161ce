"""Agents run in their own session; when an attempt ends, every process it started dies.

trio's default cancel signals only the direct child, which would orphan any
grandchildren an agent CLI spawns (node workers, shells, language servers), so
the whole process group is killed.  A descendant that calls `setsid` (or
`setpgid`) leaves that group, though, and would outlive its task and keep
writing into the output file it inherited.  Two things find those escapees:

* every agent's environment carries a marker unique to the attempt,
  `DISPATCH_AGENT_TOKEN=<random>`, which its descendants inherit and which
  `/proc/<pid>/environ` still shows after `setsid`;
* the dispatcher is a child subreaper (Linux `PR_SET_CHILD_SUBREAPER`): an
  escapee whose parent dies is re-parented to the dispatcher, not to init, so a
  quick look at the dispatcher's own children tells whether anything escaped at
  all (the common case costs no `/proc` scan).

When an attempt ends, `run_in_group` kills the group, then every process with
the attempt's marker, and waits until they are dead, before the caller promotes
the output: a dead process holds no file descriptor, so nothing can write into
a promoted output afterwards.  As a subreaper the dispatcher also reaps the
orphaned agent processes re-parented to it (see `_reapable`).

A process that is nothing but a dispatcher (the CLI, the daemon: they keep an
agent registry, which calls `claim_orphans`) also owns every other orphan that
lands on it: an escapee that cleared its environment, so carries no marker, is
killed at the next moment no agent runs (the end of a CLI run; for the daemon,
when it is idle), or at the next start if the dispatcher was killed
(`orphans.py`).  A program that merely calls `run_spec` may have children of its
own, so there only marked processes are killed and only agents' orphans reaped.

Limit: a descendant that clears its environment *and* leaves the group is not
found before its own attempt's output is promoted if another agent is running
at that moment; it could write into that output until it is killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO

import trio

from .probe import signal_group, tagged

KILL_GRACE_S = 2.0
"""How long an agent gets between SIGTERM and SIGKILL."""

AGENT_TOKEN_ENV = "DISPATCH_AGENT_TOKEN"
"""Marks every process of one attempt, so escaped descendants can be found."""

SWEEP_LIMIT_S = 10.0
"""How long killing an attempt's leftovers may take (a process in uninterruptible
sleep, e.g. on a hung network mount, dies only when its system call returns)."""

_PR_SET_CHILD_SUBREAPER = 36

_live: set[int] = set()
"""Agent leaders trio is still waiting for (pid == their group and session id)."""
_spawning = 0
"""Leaders being started: their pid is not known yet (trio forks in a worker thread)."""
_groups: set[int] = set()
"""Agent groups, running or finished but maybe not empty yet: their zombies are ours."""
_killed: set[int] = set()
"""Marked processes we killed and may have to reap (escapees re-parented to us)."""
_claimed = False
"""Whether every orphan re-parented to this process is an agent's (`claim_orphans`)."""
_subreaper: bool | None = None


def claim_orphans() -> None:
    """Declare this process a dedicated dispatcher: any orphan that is re-parented to it
    came from an agent, marked or not, and is killed when no agent runs."""
    global _claimed
    _claimed = True


def make_group_killer(grace: float = KILL_GRACE_S) -> Callable[[trio.Process], Awaitable[None]]:
    """A `deliver_cancel` for `trio.run_process` that terminates the whole group."""

    async def deliver_cancel(process: trio.Process) -> None:
        signal_group(process.pid, signal.SIGTERM)
        await trio.sleep(grace)
        signal_group(process.pid, signal.SIGKILL)

    return deliver_cancel


def become_subreaper() -> bool:
    """Make this process adopt orphaned descendants (Linux); idempotent."""
    global _subreaper
    if _subreaper is None:
        _subreaper = False
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                libc = ctypes.CDLL(None, use_errno=True)
                _subreaper = libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    return _subreaper


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgrp) of a process, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return fields[0].decode(), int(fields[1]), int(fields[2])
    except (OSError, IndexError, ValueError):
        return None


def _children() -> list[int]:
    """This process's direct children (each thread's, since trio forks in worker threads)."""
    pids: list[int] = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return pids
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/children", "rb") as fh:
                pids.extend(int(p) for p in fh.read().split())
        except (OSError, ValueError):
            continue
    return pids


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        found = tuple(int(n) for n in os.uname().release.split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return found >= (major, minor)


_ADOPTED_BY_LEADER = sys.platform.startswith("linux") and _kernel_at_least(3, 19)
"""Linux 3.19+ gives every orphan re-parented to a subreaper to its first live thread,
the thread-group leader (`find_new_reaper` → `find_alive_thread`), whichever thread
forked the agent; before, to the forking thread."""


def _adopted() -> list[int]:
    """Children an escaped process could be among: the leader thread's.

    The agents' own leaders are children of trio's spawn threads; reading those
    threads' lists too (one `/proc` file each) cost a quarter of a millisecond per
    attempt, on the event loop, for processes `_unknown_children` skips anyway.
    """
    if not _ADOPTED_BY_LEADER:
        return _children()
    try:
        with open(f"/proc/self/task/{os.getpid()}/children", "rb") as fh:
            return [int(p) for p in fh.read().split()]
    except (OSError, ValueError):
        return _children()


def _dead(pid: int) -> bool:
    st = _stat(pid)
    return st is None or st[0] in ("Z", "X")


def _reapable(pid: int, pgrp: int) -> bool:
    """A zombie child that came from an agent, and that no one else will wait for.

    Never a live leader (trio waits for those).  A member of an agent's group, or an
    escapee we killed, is always an agent's.  A dedicated dispatcher also reaps any
    other orphan, except in its own process group (a subprocess started some other
    way) and, while a leader is being started, a group leader (it could be that new
    leader before its pid is known).
    """
    if pid in _live:
        return False
    if pgrp in _groups or pid in _killed:
        return True
    if not _claimed or pgrp == os.getpgrp():
        return False
    return pgrp != pid or _spawning == 0


def reap_orphans() -> None:
    """Collect the exit status of orphaned agent processes re-parented to us."""
    for pid in _children():
        st = _stat(pid)
        if st is not None and st[0] == "Z" and _reapable(pid, st[2]):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    return True


async def kill_tagged(markers: Iterable[str], limit: float = SWEEP_LIMIT_S) -> list[int]:
    """SIGKILL every process carrying one of `markers` and wait until all are dead.

    Repeats until a pass finds none alive, since a process may fork between the scan
    and the kill.  Returns the pids still alive after `limit` seconds (normally none).
    """
    markers = list(markers)
    deadline = trio.current_time() + limit
    while True:
        alive = [p for p in tagged(markers) if not _dead(p)]
        if not alive:
            return []
        survivors = await _kill_and_settle(alive, deadline)
        if survivors is not None:
            return survivors


async def _kill_and_settle(pids: list[int], deadline: float) -> list[int] | None:
    """SIGKILL `pids` and wait for them; past the deadline, the ones still alive (the
    caller gives up), else None (the caller looks again: the dead may have had children)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            _killed.add(pid)
    await _settle(pids, deadline)
    if trio.current_time() >= deadline:
        return [p for p in pids if not _dead(p)]
    return None


async def _settle(pids: Iterable[int], deadline: float) -> None:
    """Wait (briefly, reaping) until `pids` are dead or the deadline passes."""
    pids = list(pids)
    pending = pids
    delay = 0.001
    while pending and trio.current_time() < deadline:
        reap_orphans()
        pending = [p for p in pending if not _dead(p)]
        if pending:
            await trio.sleep(delay)
            delay = min(delay * 2, 0.05)
    reap_orphans()
    _killed.difference_update(p for p in pids if _stat(p) is None)


def _environ_token(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            env = b"\0" + fh.read()
    except OSError:
        return None
    prefix = b"\0" + AGENT_TOKEN_ENV.encode() + b"="
    at = env.find(prefix)
    if at < 0:
        return None
    end = env.find(b"\0", at + len(prefix))
    return env[at + len(prefix):end if end >= 0 else None].decode(errors="replace")


def _unknown_children() -> dict[int, str | None]:
    """Live children that are neither a running leader nor in a running group, with the
    attempt marker each carries: processes that left an agent's group and lost their
    parent (`_adopted`; on kernels before 3.19 also a leader trio is starting right now,
    whose pid is not known yet: `_kill_unknown_children` spares it)."""
    out: dict[int, str | None] = {}
    for pid in _adopted():
        st = _stat(pid)
        if st is None or st[0] in ("Z", "X") or pid in _live or st[2] in _live:
            continue
        if st[2] == os.getpgrp():
            continue  # started by someone else in this process, not by an agent
        out[pid] = _environ_token(pid)
    return out


async def _kill_unknown_children(deadline: float) -> list[int]:
    """In a dedicated dispatcher (`claim_orphans`) with no agent running, every unknown
    child is an escapee: kill them and what they started (their children become ours
    when they die, so repeat)."""
    while True:
        if not _claimed or _live or _spawning:
            return []
        victims = _unknown_children()
        if not victims:
            return []
        survivors = await _kill_and_settle(list(victims), deadline)
        if survivors is not None:
            return survivors


async def sweep_attempt(pgid: int, token: str, limit: float = SWEEP_LIMIT_S) -> list[int]:
    """Kill what is left of an attempt whose leader has exited; return survivors' pids.

    The group first (SIGKILL, then wait until it is empty, reaping the members
    re-parented to us).  By then the root of anything that escaped the group is our
    child, so a glance at our children tells whether any carries this attempt's
    marker; only then is `/proc` scanned, and every process with the marker killed.
    When no other agent runs, unknown children (escapees that cleared their
    environment) are killed too.
    """
    deadline = trio.current_time() + limit
    await _empty_group(pgid, min(deadline, trio.current_time() + 0.5))
    known = become_subreaper() and not _group_exists(pgid)
    kids = _unknown_children() if known else {}
    left: list[int] = []
    if not known or token in kids.values():
        left = await kill_tagged([f"{AGENT_TOKEN_ENV}={token}"],
                                 max(0.0, deadline - trio.current_time()))
        # (a member whose parent had escaped stays a zombie until that parent dies)
        await _empty_group(pgid, deadline)
    if kids or not known:
        left += await _kill_unknown_children(deadline)
    if not _group_exists(pgid):
        _groups.discard(pgid)
    return left


async def _empty_group(pgid: int, until: float) -> None:
    """SIGKILL the group until no member is left (zombies included: we reap those
    re-parented to us), or until `until`."""
    delay = 0.001
    while signal_group(pgid, signal.SIGKILL):
        reap_orphans()
        if not _group_exists(pgid) or trio.current_time() >= until:
            return
        await trio.sleep(delay)
        delay = min(delay * 2, 0.05)


async def sweep_run(run_id: str, limit: float = SWEEP_LIMIT_S) -> list[int]:
    """At the end of a run: kill any process still carrying its `DISPATCH_RUN_ID`, and
    (when no agent runs any more) any unknown child; return survivors' pids."""
    deadline = trio.current_time() + limit
    left = await kill_tagged([f"DISPATCH_RUN_ID={run_id}"], limit)
    if become_subreaper():
        left += await _kill_unknown_children(deadline)
    return left


@dataclass
class Exit:
    returncode: int
    pid: int
    survivors: list[int] = field(default_factory=list)
    """Processes of the attempt that could not be killed within `SWEEP_LIMIT_S`."""
    node: str | None = None
    """Where it ran, when not on this machine (a Ray node: `10.0.0.5 (ab12cd34)`)."""
    lost: str | None = None
    """Why the remote side vanished mid-attempt (worker or node died): no exit code
    means anything then; the attempt is retried under the task's own policy."""


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
    However the leader ends, every process of the attempt is killed, escaped ones
    included (see the module docstring), and is dead when this returns: an agent's
    background processes never outlive its task nor write after it.  `on_spawn(pid)`
    runs as soon as the group exists and `on_reaped(pid)` once it is gone, so callers
    can keep a registry of live agents (see `orphans.py`).
    """
    global _spawning
    become_subreaper()
    token = secrets.token_hex(12)
    env = {**env, AGENT_TOKEN_ENV: token}
    pid = -1
    survivors: list[int] = []
    try:
        async with trio.open_nursery() as nursery:
            _spawning += 1
            try:
                process: trio.Process = await nursery.start(_start, argv, cwd, env, stdin,
                                                            stdout, stderr, grace)
            finally:
                _spawning -= 1
            pid = process.pid
            _live.add(pid)
            _groups.add(pid)
            if on_spawn is not None:
                on_spawn(pid)
    except BaseExceptionGroup as group:
        failed = _only(group)
        if pid < 0 and isinstance(failed, OSError):
            raise failed from None  # could not start (ENOENT, E2BIG, EMFILE...): plainly
        raise
    finally:
        if pid > 0:
            _live.discard(pid)
            with trio.CancelScope(shield=True):
                survivors = await sweep_attempt(pid, token)
            if on_reaped is not None:
                on_reaped(pid)
    return Exit(process.returncode if process.returncode is not None else -1, pid, survivors)


def _only(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


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
