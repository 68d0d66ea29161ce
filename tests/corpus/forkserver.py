"""Run `python -m parallel_dispatch ARGS...` many times without paying start-up each time.

The corpus runs the CLI about 300 times (validate and run per entry). A cold start
imports trio, pydantic and the package (~0.45 s of CPU here), which would make the
corpus take over a minute on 2 cores. This server imports the package once, then
for each request forks a child that executes `parallel_dispatch/__main__.py` with
`runpy` — exactly what `python -m parallel_dispatch` does — in its own process
group, with its own cwd, environment, stdin (/dev/null), stdout and stderr files.
An exception that escapes `__main__` is printed as the interpreter would print it
(a `Traceback`), with exit code 1, so the corpus sees what a user would see.

Protocol: one JSON object per line on stdin
(`{"argv", "cwd", "env", "stdout", "stderr", "timeout"}`), one JSON line back
(`{"rc", "status", "timed_out", "seconds"}`: `rc` as a shell shows it, 128+signal,
`status` as subprocess does, -signal). The server is single-threaded, so forking it
is safe. The corpus uses it directly; the other tests through `tests/warmcli.py`.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import select
import signal
import sys
import tempfile
import time
from typing import Any

WARM = ("parallel_dispatch", "parallel_dispatch.cli", "parallel_dispatch.api",
        "parallel_dispatch.loader", "parallel_dispatch.runners", "trio", "pydantic", "yaml")
"""Imported once up front; whichever exist (front ends may move between packages)."""


def _child(req: dict[str, Any]) -> None:
    """In the forked child: become `python -m parallel_dispatch ARGV`, then exit."""
    import runpy
    import traceback

    code: int = 1
    try:
        os.setpgid(0, 0)
        os.chdir(req["cwd"])
        sys.path[0] = os.getcwd()  # as `python -m` has it
        os.environ.clear()
        os.environ.update(req["env"])
        tempfile.tempdir = None  # gettempdir() caches: read this run's TMPDIR afresh
        time.tzset()  # localtime() caches TZ too: read this run's (codex's local reset time)
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                                (1, req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                (2, req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
            new = os.open(path, flags, 0o644)
            os.dup2(new, fd)
            os.close(new)
        sys.argv = ["parallel_dispatch", *req["argv"]]
        try:
            runpy.run_module("parallel_dispatch", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        with contextlib.suppress(Exception):
            atexit._run_exitfuncs()  # what the interpreter does at exit (os._exit skips it)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
    finally:
        os._exit(code)


def _wait(pid: int, timeout: float) -> tuple[int, bool]:
    """Exit status of `pid` as subprocess gives it (-signal when killed); kill its
    group after `timeout`."""
    fd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    timed_out = not ready
    if timed_out:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), timed_out


def serve() -> None:
    for name in WARM:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    out = sys.stdout
    print(json.dumps({"ready": True}), file=out, flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:
            _child(req)
        status, timed_out = _wait(pid, float(req["timeout"]))
        rc = 128 - status if status < 0 else status  # as a shell shows it
        print(json.dumps({"rc": rc, "status": status, "timed_out": timed_out,
                          "seconds": round(time.monotonic() - started, 3)}),
              file=out, flush=True)


if __name__ == "__main__":
    serve()
