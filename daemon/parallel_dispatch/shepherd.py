"""The shepherd: keeps a remote agent's process tree from outliving the attempt.

A Ray worker that dies (SIGKILL, its node lost, a forced cancel) takes its direct
children with it, but an agent runs in its own session, so the agent and its tools
would live on (docs/design/ray-executor.md §4, measured).  So the worker does not start
the agent itself: it starts this program, which detaches (double fork, `setsid`: Ray's
kill-the-children no longer reaches it) and runs the agent with the local rules of
`process.py`: its own session and group, the attempt's `DISPATCH_AGENT_TOKEN` marker,
and the shepherd as child subreaper, so that escaped descendants are found and killed.
The shepherd watches the `life` pipe, whose only write end the worker holds: EOF means
the worker is gone or gave up, and the agent's group gets SIGTERM, then SIGKILL after
the grace.  It also enforces its own deadline, so a lost driver cannot leave an agent
running forever.

It starts once per remote attempt, so it is plain blocking code on the standard library
(`select` on the pipe and a pidfd): importing trio would cost ~70 ms per attempt
(BENCHMARKS §k).

Protocol: `python -m parallel_dispatch.shepherd LIFE DONE OUT ERR` with a JSON request on
stdin (`argv`, `cwd`, `env`, `stdin` as latin-1 text, `grace`, `backstop_s`: how long the
agent may run at most, None for no limit).  The agent writes to OUT and ERR; the
shepherd closes its own copies, then writes one JSON line to DONE:
`{"code": N, "survivors": [...]}`, or `{"spawn_error": [errno, strerror]}`, or
`{"code": -1, "cause": "cancelled"|"deadline"}`.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from .probe import pid_alive, signal_group, tagged

TOKEN_ENV = "DISPATCH_AGENT_TOKEN"
"""process.AGENT_TOKEN_ENV (not imported: process.py imports trio)."""
SWEEP_LIMIT_S = 10.0
_PR_SET_CHILD_SUBREAPER = 36


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    life, done, out, err = (int(a) for a in args[:4])
    request = json.loads(sys.stdin.buffer.read())
    if os.fork() > 0:  # the worker's child exits at once: the rest is not its child
        os._exit(0)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    result = shepherd(request, life, out, err)
    for fd in (out, err):
        os.close(fd)  # the agent's are closed too: the worker's reads see EOF
    with contextlib.suppress(OSError):  # the worker is gone: nobody to tell
        os.write(done, (json.dumps(result) + "\n").encode())
    return 0


def shepherd(request: dict[str, Any], life: int, out: int, err: int) -> dict[str, Any]:
    """Run the agent until it exits, `life` closes, or the backstop deadline passes;
    then kill whatever the attempt left, escapees included."""
    _become_subreaper()
    token = os.urandom(12).hex()
    stdin = request.get("stdin", "").encode("latin-1")
    try:
        proc = subprocess.Popen(
            request["argv"], cwd=request["cwd"], env={**request["env"], TOKEN_ENV: token},
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, stdout=out, stderr=err,
            start_new_session=True, close_fds=True)
    except OSError as exc:  # could not start: no such command, E2BIG...
        return {"spawn_error": [exc.errno or 0, exc.strerror or str(exc)]}
    if proc.stdin is not None:
        threading.Thread(target=_feed, args=(proc.stdin, stdin), daemon=True).start()
    cause = _watch(proc, life, request.get("backstop_s"))
    if cause is not None:
        _terminate(proc, float(request.get("grace", 2.0)))
    code = proc.wait()
    survivors = _sweep(proc.pid, token)
    if cause is not None:
        return {"code": -1, "cause": cause}
    return {"code": code, "survivors": survivors}


def _feed(pipe: Any, data: bytes) -> None:
    with contextlib.suppress(OSError):  # the agent stopped reading: its business
        pipe.write(data)
        pipe.close()


def _watch(proc: subprocess.Popen[bytes], life: int, backstop: float | None) -> str | None:
    """Wait for the agent's exit (None), the worker's end of `life` closing
    ("cancelled"), or the backstop ("deadline")."""
    pidfd = os.pidfd_open(proc.pid)
    until = None if backstop is None else time.monotonic() + float(backstop)
    try:
        while True:
            timeout = None if until is None else max(0.0, until - time.monotonic())
            ready, _, _ = select.select([pidfd, life], [], [], timeout)
            if pidfd in ready:
                return None
            if life in ready and not os.read(life, 64):
                return "cancelled"
            if until is not None and time.monotonic() >= until:
                return "deadline"
    finally:
        os.close(pidfd)


def _terminate(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM to the group, SIGKILL after `grace` (process.make_group_killer's rule)."""
    signal_group(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    signal_group(proc.pid, signal.SIGKILL)


def _sweep(pgid: int, token: str) -> list[int]:
    """Kill the group's stragglers and every process carrying the attempt's marker
    (`setsid` escapees); reap what was re-parented to us.  The pids still alive after
    `SWEEP_LIMIT_S` (stuck in the kernel) are returned."""
    signal_group(pgid, signal.SIGKILL)
    until = time.monotonic() + SWEEP_LIMIT_S
    marker = f"{TOKEN_ENV}={token}"
    while True:
        _reap()
        alive = [p for p in tagged([marker]) if pid_alive(p)]
        if not alive:
            return []
        if time.monotonic() >= until:
            return alive
        for pid in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def _reap() -> None:
    """Collect our dead children (escapees re-parented to the subreaper)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _become_subreaper() -> None:
    """Orphaned descendants of the agent are re-parented to us, so we can reap them."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
