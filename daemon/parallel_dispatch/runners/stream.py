"""Reading an agent's stdout and stderr live, without holding them in memory.

Each stream is a pipe the dispatcher reads in chunks: stdout goes to a capture file
(parsed when the agent ends), and both go to the task log, so the agent's own event
stream survives a timeout, a stall or a cancel.  Complete lines are handed to a
callback as they arrive; that is how presets see retries and provider errors while
the agent still runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import IO

import trio

CHUNK = 64 * 1024
MAX_LINE = 1024 * 1024
"""Longer lines (a huge final result, say) are not handed to the callback; they still
reach the capture file whole."""
LOG_BUDGET = 8 * 1024 * 1024
"""How much of one attempt's stdout is copied into the task log; the rest is counted."""


class LogBudget:
    """Bytes of stdout the log may still take in this attempt (shared by both pumps)."""

    def __init__(self, limit: int = LOG_BUDGET) -> None:
        self.left = limit
        self.dropped = 0

    def take(self, n: int) -> int:
        granted = min(n, self.left)
        self.left -= granted
        self.dropped += n - granted
        return granted


async def pump(fd: int, *, log: IO[bytes], on_line: Callable[[str], None],
               capture: IO[bytes] | None = None, budget: LogBudget | None = None,
               on_data: Callable[[], None] | None = None) -> None:
    """Copy the pipe `fd` to `capture` and `log` until EOF, calling `on_line` per line
    and `on_data` per chunk read (text streamed without newlines is activity too).

    Owns `fd` (closes it).  Ends at EOF, i.e. once every process holding the write
    end is gone, or when cancelled.
    """
    stream = trio.lowlevel.FdStream(fd)
    pending = bytearray()
    skipping = False
    try:
        while True:
            data = await stream.receive_some(CHUNK)
            if not data:
                break
            if on_data is not None:
                on_data()
            if capture is not None:
                capture.write(data)
            n = budget.take(len(data)) if budget is not None else len(data)
            if n:
                log.write(data[:n])
                log.flush()
            pending += data
            while True:
                nl = pending.find(b"\n")
                if nl < 0:
                    if len(pending) > MAX_LINE:
                        pending.clear()
                        skipping = True
                    break
                line = bytes(pending[:nl])
                del pending[:nl + 1]
                if skipping:
                    skipping = False
                    continue
                on_line(line.decode("utf-8", errors="replace"))
        if pending and not skipping:
            on_line(pending.decode("utf-8", errors="replace"))
    finally:
        await stream.aclose()


def pipe() -> tuple[int, int]:
    """A (read, write) pipe whose read end the child does not inherit."""
    r, w = os.pipe()
    os.set_inheritable(r, False)
    return r, w
