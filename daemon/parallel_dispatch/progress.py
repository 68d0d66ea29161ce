"""Progress output (ninja's `Status`), kept apart from scheduling.

On a terminal a single live line shows done/total, elapsed time and what is
running; elsewhere (CI logs, pipes) each event is one plain line.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Protocol, TextIO

from .events import AgentEvent
from .fmt import fmt_duration, plural
from .quota import Governor, pool_lines
from .result import MARKS, RunResult, TaskRecord, TaskStatus

EVENT_LINE_EVERY_S = 5.0
"""Plain progress prints a task's retry/error events at most this often (unless the text
changes): a client retrying every 200 ms must not flood a CI log."""


class Progress(Protocol):
    def run_started(self, result: RunResult) -> None: ...
    def task_started(self, rec: TaskRecord) -> None: ...
    def task_event(self, rec: TaskRecord, event: AgentEvent) -> None: ...
    def task_retrying(self, rec: TaskRecord, delay: float) -> None: ...
    def task_waiting(self, rec: TaskRecord, pool: str, wait_s: float) -> None: ...
    def task_finished(self, rec: TaskRecord) -> None: ...
    def note(self, text: str) -> None: ...
    def task_merged(self, rec: TaskRecord, text: str) -> None: ...
    def run_finished(self, result: RunResult) -> None: ...


class NullProgress:
    def run_started(self, result: RunResult) -> None: ...
    def task_started(self, rec: TaskRecord) -> None: ...
    def task_event(self, rec: TaskRecord, event: AgentEvent) -> None: ...
    def task_retrying(self, rec: TaskRecord, delay: float) -> None: ...
    def task_waiting(self, rec: TaskRecord, pool: str, wait_s: float) -> None: ...
    def task_finished(self, rec: TaskRecord) -> None: ...
    def note(self, text: str) -> None: ...
    def task_merged(self, rec: TaskRecord, text: str) -> None: ...
    def run_finished(self, result: RunResult) -> None: ...


_NOT_RUN = (TaskStatus.SKIPPED, TaskStatus.PLANNED, TaskStatus.CACHED)
"""Finished without running now: no duration to show."""


def _describe_end(rec: TaskRecord) -> str:
    text = f"{MARKS.get(rec.status, '?')} {rec.id} {rec.status}"
    if rec.status not in _NOT_RUN and rec.end_s is not None:
        text += f" in {rec.busy_s:.1f}s"
    if rec.attempts > 1:
        text += f" after {rec.attempts} attempts"
    detail = rec.reason or (rec.error if rec.status != TaskStatus.SUCCEEDED else None)
    if detail:
        text += f": {detail}"
    return text


class PlainProgress:
    """One line per event, prefixed by the elapsed time."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.t0 = time.monotonic()
        self.total = 0
        self.done = 0
        self._shown: dict[str, tuple[float, str]] = {}

    def _line(self, text: str) -> None:
        self.stream.write(f"[{time.monotonic() - self.t0:7.1f}s] {one_line(text)}\n")
        self.stream.flush()

    def run_started(self, result: RunResult) -> None:
        self.t0 = time.monotonic()
        self.total = len(result.records)
        s = result.spec.settings
        self._line(f"dispatch '{result.spec.name}': {plural(self.total, 'task')}, max_parallel "
                   f"{s.max_parallel}, on_failure {s.on_failure}, output {s.output_dir}")

    def task_started(self, rec: TaskRecord) -> None:
        attempt = f" (attempt {rec.attempts})" if rec.attempts > 1 else ""
        self._line(f"▶ {rec.id} [{rec.agent}]{attempt}")

    def task_event(self, rec: TaskRecord, event: AgentEvent) -> None:
        """Retries and errors get a line (throttled per task); other events only feed
        the live line."""
        if event.kind not in ("retry", "error"):
            return
        now = time.monotonic()
        last = self._shown.get(rec.id)
        if last is not None and last[1] == event.text and now - last[0] < EVENT_LINE_EVERY_S:
            return
        if last is not None and now - last[0] < EVENT_LINE_EVERY_S / 5:
            return
        self._shown[rec.id] = (now, event.text)
        self._line(f"… {rec.id}: {event.text}")

    def task_retrying(self, rec: TaskRecord, delay: float) -> None:
        self._line(f"↻ {rec.id} {rec.status} ({rec.error}); retrying in {delay:.1f}s")

    def task_waiting(self, rec: TaskRecord, pool: str, wait_s: float) -> None:
        """A provider's limit: no retry is used; the pool's pause is the countdown."""
        until = (f"the {pool} pool is paused for {fmt_duration(wait_s)}" if wait_s > 0
                 else f"the {pool} pool slowed down")
        self._line(f"{rec.status.mark} {rec.id} waiting for quota ({rec.error}); {until}")

    def task_finished(self, rec: TaskRecord) -> None:
        self.done += 1
        self.total = max(self.total, len(rec.spec.tasks))  # a `foreach: from:` grew the run
        self._shown.pop(rec.id, None)
        self._line(f"{_describe_end(rec)}  [{self.done}/{self.total}]")

    def note(self, text: str) -> None:
        self._line(f"! {text}")

    def task_merged(self, rec: TaskRecord, text: str) -> None:
        """The merge queue's word on one task (merge.py): merged, conflict, reverted."""
        mark = MARKS.get(rec.status, "") if rec.status != TaskStatus.SUCCEEDED else "⤵"
        self._line(f"{mark} {rec.id} {text}")

    def run_finished(self, result: RunResult) -> None:
        count = result.count
        counts = [f"{count(TaskStatus.SUCCEEDED)} succeeded", f"{count(TaskStatus.CACHED)} cached",
                  f"{count(TaskStatus.FAILED)} failed", f"{count(TaskStatus.TIMEOUT)} timed out"]
        for status, label in ((TaskStatus.PROVIDER_ERROR, "provider errors"),
                              (TaskStatus.STALLED, "stalled"),
                              (TaskStatus.CONFLICT, "conflicts"),
                              (TaskStatus.MERGE_FAILED, "failed verify")):
            if count(status):
                counts.append(f"{count(status)} {label}")
        counts += [f"{count(TaskStatus.SKIPPED)} skipped",
                   f"{count(TaskStatus.CANCELLED)} cancelled"]
        self._line(f"finished: {result.status} — {', '.join(counts)} in {result.wall_s:.1f}s")


class LiveProgress(PlainProgress):
    """A redrawn status line on a TTY; finished tasks scroll above it."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        self.running: dict[str, float] = {}
        self.events: dict[str, str] = {}
        self.waiting: dict[str, float] = {}
        """Task → when its pool's pause ends (monotonic): the live line's countdown."""
        self.pools: Callable[[], list[str]] | None = None
        """The pools a provider limited, one phrase each (`watch_pools`)."""
        self._drawn = 0.0

    def _clear(self) -> None:
        self.stream.write("\r\x1b[2K")

    def _line(self, text: str) -> None:
        self._clear()
        self.stream.write(f"[{time.monotonic() - self.t0:7.1f}s] {one_line(text)}\n")
        self.redraw()

    def redraw(self) -> None:
        now = time.monotonic()
        self._drawn = now
        names = sorted(self.running, key=self.running.__getitem__)
        width = _width(self.stream)
        # Each shown task gets an equal share of the line for its latest event.
        share = (width - 50) // max(1, min(len(names), 4))
        pieces = []
        for n in names[:4]:
            piece = f"{n} {now - self.running[n]:.0f}s"
            room = share - len(piece) - 3
            if n in self.events and room >= 12:
                piece += f" ({_short(self.events[n], room)})"
            pieces.append(piece)
        shown = ", ".join(pieces)
        if len(names) > 4:
            shown += f", +{len(names) - 4}"
        running = f"running {len(names)}: {shown}" if names else "nothing running"
        if self.waiting:
            left = max(0.0, min(self.waiting.values()) - now)
            running += (f" · ⧗ {len(self.waiting)} waiting for quota"
                        + (f", next in {fmt_duration(left)}" if left > 0 else ""))
        if self.pools is not None:
            running += "".join(f" · pool {text}" for text in self.pools())
        status = f"[{self.done}/{self.total}] {now - self.t0:.0f}s elapsed · {running}"[:width]
        self._clear()
        self.stream.write(status)
        self.stream.flush()

    def watch_pools(self, governor: Governor, clock: Callable[[], float]) -> None:
        """Show the pools a provider limited on the live line (limit, waiting, pause)."""
        self.pools = lambda: pool_lines(governor.snapshot(clock()))

    def task_started(self, rec: TaskRecord) -> None:
        self.running[rec.id] = time.monotonic()
        self.waiting.pop(rec.id, None)
        self.redraw()

    def task_event(self, rec: TaskRecord, event: AgentEvent) -> None:
        self.events[rec.id] = event.text
        if event.kind in ("retry", "error"):
            super().task_event(rec, event)
        elif time.monotonic() - self._drawn >= 0.2:  # tokens stream fast: redraw calmly
            self.redraw()

    def task_finished(self, rec: TaskRecord) -> None:
        self.running.pop(rec.id, None)
        self.events.pop(rec.id, None)
        self.waiting.pop(rec.id, None)
        super().task_finished(rec)

    def task_retrying(self, rec: TaskRecord, delay: float) -> None:
        self.running.pop(rec.id, None)
        self.events.pop(rec.id, None)
        super().task_retrying(rec, delay)

    def task_waiting(self, rec: TaskRecord, pool: str, wait_s: float) -> None:
        self.running.pop(rec.id, None)
        self.events.pop(rec.id, None)
        self.waiting[rec.id] = time.monotonic() + wait_s
        super().task_waiting(rec, pool, wait_s)

    def run_finished(self, result: RunResult) -> None:
        self.running.clear()
        self._clear()
        super().run_finished(result)
        self._clear()
        self.stream.flush()


def one_line(text: str) -> str:
    """A progress line is one line: agent text (errors, events) may hold newlines, and
    in a GitHub Actions log a line of its own starting with `::` is a workflow command
    (and `##[name]` is one anywhere in a line)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", " ⏎ ")
    return text.replace("##[", "#\u200b#[")  # the runner's legacy `##[command]` form


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _width(stream: TextIO) -> int:
    """The terminal's width, so the live line never wraps (which would break redraws)."""
    import os

    try:
        return max(20, os.get_terminal_size(stream.fileno()).columns - 1)
    except (OSError, ValueError, AttributeError):
        return 200


def for_stream(stream: TextIO | None = None, quiet: bool = False) -> Progress:
    stream = stream or sys.stderr
    if quiet:
        return NullProgress()
    if stream.isatty():
        return LiveProgress(stream)
    return PlainProgress(stream)
