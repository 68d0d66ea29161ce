"""Checking answers against `output_schema` in a child process, under a deadline.

A check can run for ever (a backtracking `pattern`, a quadratic `uniqueItems`, `$ref`s
that fan out), and Python's `re` holds the GIL while it does: run in the dispatcher, one
task file's schema would freeze every run and the daemon's watchdog pings. So the
checks go to one long-lived `schema_worker` process per runner, started on the first
check (about 0.15 s: an interpreter and jsonschema) and reused. A check that passes its
deadline (`SCHEMA_CHECK_S`, or `$PARALLEL_DISPATCH_SCHEMA_CHECK_S`) kills the worker,
fails its attempt without a retry, and the next check starts a new one.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from .output_schema import SchemaUnusable

SCHEMA_CHECK_S = 30.0
"""How long one answer's check may take: generous for a 16 MiB answer, short of a hang."""


class SchemaCheckTimeout(Exception):
    """The check outran its deadline; the worker was killed."""


def deadline_s() -> float:
    raw = os.environ.get("PARALLEL_DISPATCH_SCHEMA_CHECK_S", "")
    try:
        value = float(raw)
    except ValueError:
        return SCHEMA_CHECK_S
    return value if math.isfinite(value) and value > 0 else SCHEMA_CHECK_S


class SchemaChecker:
    """One worker, one check at a time (checks take milliseconds; the lock only orders
    them). Belongs to one trio run: a runner reused by a later `trio.run` starts anew."""

    def __init__(self) -> None:
        self._proc: trio.Process | None = None
        self._buffer = b""
        self._lock: trio.Lock | None = None
        self._token: object = None

    async def check(self, path: Path, schema: dict[str, Any], lenient: bool) -> list[str]:
        """[] when the answer at `path` matches (and `path` now holds its canonical text),
        else the mismatches. Raises `SchemaUnusable` (the schema cannot be applied) and
        `SchemaCheckTimeout`."""
        token = trio.lowlevel.current_trio_token()
        if self._token is not token or self._lock is None:
            self._token, self._lock, self._proc, self._buffer = token, trio.Lock(), None, b""
        limit = deadline_s()
        async with self._lock:
            request = json.dumps({"path": str(path), "schema": schema, "lenient": lenient})
            try:
                with trio.move_on_after(limit) as scope:
                    reply = await self._ask(request, limit)
            except BaseException:  # cancelled from outside: its reply must not be read later
                await self._kill()
                raise
            if scope.cancelled_caught:
                await self._kill()
                raise SchemaCheckTimeout(
                    f"the schema check took longer than {limit:g} s and was stopped (a "
                    "`pattern` that backtracks, `uniqueItems` over a huge array, or $refs "
                    "that fan out?)")
        if reply.get("unusable"):
            raise SchemaUnusable(str(reply["unusable"]))
        return [str(e) for e in reply.get("errors", [])]

    async def _ask(self, request: str, limit: float) -> dict[str, Any]:
        proc = await self._worker(limit)
        assert proc.stdin is not None
        try:
            await proc.stdin.send_all(request.encode() + b"\n")
            line = await self._read_line(proc)
        except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError):
            code = await self._kill()
            raise SchemaUnusable(f"the schema checker stopped (exit {code}); see the "
                                 "dispatcher's stderr") from None
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def _worker(self, limit: float) -> trio.Process:
        if self._proc is None or self._proc.returncode is not None:
            self._buffer = b""
            self._proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "parallel_dispatch.schema_worker",
                 str(math.ceil(limit) + 2)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        return self._proc

    async def _read_line(self, proc: trio.Process) -> bytes:
        assert proc.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await proc.stdout.receive_some(65536)
            if not chunk:
                raise EOFError
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    async def _kill(self) -> int | None:
        proc, self._proc, self._buffer = self._proc, None, b""
        if proc is None:
            return None
        with trio.CancelScope(shield=True):
            proc.kill()
            code = await proc.wait()
        return code

    async def aclose(self) -> None:
        """Ends the worker once a check in flight is done: EOF, then a kill if it does not
        go within a second. A later check starts a new one (the daemon's runs share one
        checker, and each run closes it at its end)."""
        if self._lock is None or self._token is not trio.lowlevel.current_trio_token():
            return
        with trio.CancelScope(shield=True):
            async with self._lock:
                proc, self._proc, self._buffer = self._proc, None, b""
                if proc is None:
                    return
                if proc.stdin is not None:
                    await proc.stdin.aclose()
                with trio.move_on_after(1):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
