"""`python -m parallel_dispatch ARGS...` for the tests, forked from a warm interpreter.

A cold start imports trio, pydantic and the package: ~0.4 s of CPU, and the suite
starts the CLI several hundred times, which on 2 cores is about a minute of the
suite's wall time.  Each pytest process therefore keeps one server
(`corpus/forkserver.py`, started on first use) that has imported the package once and
forks a child per run: the same `runpy` of `__main__` that `python -m` does, in its
own process group, with the run's cwd, environment, stdout and stderr, stdin
/dev/null.  `run_cli` returns what `subprocess.run(..., capture_output=True,
text=True)` would: the same `args`, negative return codes for signals, newlines
translated, `TimeoutExpired` after killing the run's process group.

What a fork cannot reproduce runs cold, as a real `python -m parallel_dispatch`:

* a test about process behaviour (signals, process groups, RSS, zombies, escapees):
  `cold=True`, or the `fresh_cli` marker for a whole test or module (the `project`
  fixture reads it);
* a run whose `PYTHON*`, `LANG` or `LC_*` variables differ from the server's: they act
  while the interpreter starts, which the fork has already done;
* a second run while one is in flight (a test that starts runs from threads);
* every run when `PD_TESTS_COLD=1` (or the corpus's `CORPUS_COLD=1`).

`test_corpus.py::test_forkserver_matches_a_cold_start` and
`test_warmcli.py` keep the two honest.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import locale
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

SERVER = Path(__file__).parent / "corpus" / "forkserver.py"
STARTUP_VARS = ("PYTHON", "LANG", "LC_")
"""Variables read while the interpreter starts: a run that changes one runs cold."""


def cold_requested() -> bool:
    return bool(os.environ.get("PD_TESTS_COLD") or os.environ.get("CORPUS_COLD"))


def command(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "parallel_dispatch", *args]


def _startup(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(STARTUP_VARS)}


def _text(data: bytes) -> str:
    """What `subprocess.run(text=True)` makes of a stream: the locale's encoding,
    strict, universal newlines."""
    enc = locale.getpreferredencoding(False)
    return data.decode(enc).replace("\r\n", "\n").replace("\r", "\n")


class ForkServer:
    """One warm interpreter; one request at a time (`busy` says when it is taken)."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.startup = _startup(env)
        self.capture = Path(tempfile.mkdtemp(prefix="pd-warmcli-"))
        self.proc = subprocess.Popen([sys.executable, str(SERVER)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=dict(env))
        assert self.proc.stdout is not None
        ready = self.proc.stdout.readline()
        if not ready or json.loads(ready) != {"ready": True}:
            self.close()
            raise RuntimeError(f"the CLI fork server did not start: {ready!r}")
        self.lock = threading.Lock()
        self.n = 0

    def fits(self, env: Mapping[str, str]) -> bool:
        return self.proc.poll() is None and _startup(env) == self.startup

    def run(self, args: Sequence[str], cwd: Path, env: Mapping[str, str],
            timeout: float) -> subprocess.CompletedProcess[str]:
        """The caller holds `lock`.  Anything that interrupts a request (a test timeout,
        ^C) leaves its reply unread, so the server is closed rather than reused."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.n += 1
        out, err = self.capture / f"{self.n}.out", self.capture / f"{self.n}.err"
        try:
            self.proc.stdin.write(json.dumps({
                "argv": list(args), "cwd": str(cwd), "env": dict(env), "stdout": str(out),
                "stderr": str(err), "timeout": timeout}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("the CLI fork server died")
            reply = json.loads(line)
            stdout, stderr = out.read_bytes(), err.read_bytes()
        except BaseException:
            self.close()
            raise
        finally:
            out.unlink(missing_ok=True)
            err.unlink(missing_ok=True)
        if reply["timed_out"]:
            raise subprocess.TimeoutExpired(command(args), timeout, stdout, stderr)
        return subprocess.CompletedProcess(command(args), int(reply["status"]),
                                           _text(stdout), _text(stderr))

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.capture, ignore_errors=True)


_server: ForkServer | None = None
_start_lock = threading.Lock()


def _warm(env: Mapping[str, str]) -> ForkServer | None:
    """This process's server, started (or restarted after a death) on first use; None
    when the run must be cold."""
    global _server
    if cold_requested():
        return None
    with _start_lock:
        if _server is not None and _server.proc.poll() is not None:
            _server.close()
            _server = None
        if _server is None:
            from support import cli_env

            _server = ForkServer(cli_env())
            atexit.register(_server.close)
        return _server if _server.fits(env) else None


def run_cli(args: Sequence[str], cwd: Path, env: Mapping[str, str], timeout: float = 120,
            cold: bool = False) -> subprocess.CompletedProcess[str]:
    """`subprocess.run([python, -m, parallel_dispatch, *args], cwd=cwd, env=env,
    capture_output=True, text=True, timeout=timeout)`, forked warm unless `cold` (or
    see the module docstring)."""
    server = None if cold else _warm(env)
    if server is not None and server.lock.acquire(blocking=False):
        try:
            return server.run(args, cwd, env, timeout)
        finally:
            server.lock.release()
    return subprocess.run(command(args), cwd=cwd, text=True, capture_output=True,
                          timeout=timeout, env=dict(env), check=False)
