"""Progress shows what agents are doing: the live line carries each running task's latest
event, plain output gives retries and errors a line each, without flooding a CI log."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from parallel_dispatch.api import new_result
from parallel_dispatch.events import AgentEvent
from parallel_dispatch.loader import load_spec
from parallel_dispatch.progress import EVENT_LINE_EVERY_S, LiveProgress, PlainProgress
from parallel_dispatch.result import RunResult


@pytest.fixture
def result(tmp_path: Path) -> RunResult:
    (tmp_path / ".aiwg").mkdir()
    (tmp_path / "t.yaml").write_text(
        "tasks:\n"
        "  - {id: review, agent: shell, prompt: 'true', output: r.md}\n"
        "  - {id: tests, agent: shell, prompt: 'true', output: t.md}\n")
    return new_result(load_spec(tmp_path / "t.yaml", cwd=tmp_path))


def test_live_line_shows_each_running_tasks_latest_event(result: RunResult) -> None:
    out = io.StringIO()
    live = LiveProgress(out)
    live.run_started(result)
    review, tests = result.records
    live.task_started(review)
    live.task_started(tests)
    live.task_event(review, AgentEvent("tool: Bash `git diff`", kind="tool"))
    live._drawn = 0.0  # the next event redraws at once (redraws are throttled)
    live.task_event(tests, AgentEvent("tokens so far: 1,200 in, 80 out", kind="tokens"))
    last = out.getvalue().rsplit("\r\x1b[2K", 1)[-1]
    assert "running 2:" in last
    assert "review 0s (tool: Bash `git diff`)" in last
    assert "tests 0s (tokens so far: 1,200 in, 80 out)" in last
    live.task_finished(review)
    last = out.getvalue().rsplit("\r\x1b[2K", 1)[-1]
    assert "git diff" not in last


def test_plain_output_prints_retries_not_tool_chatter(result: RunResult) -> None:
    out = io.StringIO()
    plain = PlainProgress(out)
    plain.run_started(result)
    review = result.records[0]
    plain.task_event(review, AgentEvent("tool: Read", kind="tool"))
    plain.task_event(review, AgentEvent("API retry 1/10: provider overloaded (HTTP 529)",
                                        kind="retry", cause="overloaded"))
    plain.task_event(review, AgentEvent("API retry 1/10: provider overloaded (HTTP 529)",
                                        kind="retry", cause="overloaded"))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines  # the start line and one retry line
    assert lines[1].endswith("… review: API retry 1/10: provider overloaded (HTTP 529)")


def test_plain_output_throttles_a_fast_retry_loop(result: RunResult,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    plain = PlainProgress(out)
    review = result.records[0]
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    for n in range(1, 51):  # a client retrying every 200 ms for 10 s
        plain.task_event(review, AgentEvent(f"API retry {n}/50", kind="retry"))
        now[0] += 0.2
    shown = [line for line in out.getvalue().splitlines() if "API retry" in line]
    # changing text: at most one line per EVENT_LINE_EVERY_S / 5 = 1 s, so 10 in 10 s
    assert len(shown) == 10 * 5 / EVENT_LINE_EVERY_S, shown
    assert shown[0].endswith("API retry 1/50")


def test_agent_text_cannot_start_a_line_of_its_own(result: RunResult) -> None:
    """An error or event holding a newline stays on its progress line: in an Actions log
    a line starting with `::` would be a workflow command (a forged annotation)."""
    out = io.StringIO()
    plain = PlainProgress(out)
    review = result.records[0]
    plain.task_event(review, AgentEvent("API retry 1/2: bad\n::error::forged\r::stop-commands::x",
                                        kind="retry"))
    review.status, review.error = "failed", "exit 1\n::warning::forged"
    plain.task_finished(review)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert not any(line.lstrip().startswith("::") for line in lines)
    assert "bad ⏎ ::error::forged ⏎ ::stop-commands::x" in lines[0]
