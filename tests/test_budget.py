"""Budgets reserved before each start (issue 10 §3, daemon/parallel_dispatch/budget.py).

The dispatcher runs as a subprocess on the fake agent CLIs (tests/fakes): real
processes that report the cost and tokens each task's prompt tag asks for.  What the
fakes record (one line per real call) is the ground truth of how many agents started.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from parallel_dispatch.api import new_result
from parallel_dispatch.loader import load_spec
from parallel_dispatch.runners.base import Job, Outcome
from parallel_dispatch.scheduler import Scheduler
from preset_support import AgentProject, make_agent_project
from support import Project


@pytest.fixture
def ap(project: Project, tmp_path: Path) -> AgentProject:
    ap = make_agent_project(project, tmp_path)
    ap.define("reviewer")
    ap.define("coder")
    ap.config('[agents.coder]\nrunner = "codex"\n')
    return ap


def many(n: int, tag: str, agent: str = "reviewer", extra: str = "") -> str:
    rows = "".join(f'  - {{id: t{k:02d}, agent: {agent}, output: t{k:02d}.md, '
                   f'prompt: "[fake {tag}] task {k}"{extra}}}\n' for k in range(n))
    return "tasks:\n" + rows


def test_sixteen_parallel_starts_do_not_overshoot_the_run_budget(ap: AgentProject) -> None:
    ap.tasks(many(16, "cost=0.25 delay=0.5") + "settings:\n  max_parallel: 16\n"
             "  estimate_cost_usd: 0.25\n")
    proc = ap.run("t.yaml", "--max-cost", "1")
    assert proc.returncode == 1
    assert len(ap.calls("claude")) == 4  # 4 × 0.25 = the budget; the 5th would pass it
    data = ap.report()
    assert data["summary"]["cost_usd"] == pytest.approx(1.0)
    skipped = [t for t in data["tasks"] if t["status"] == "skipped"]
    assert len(skipped) == 12
    assert all(t["reason"] == "not started: budget reached (max_cost_usd $1)" for t in skipped)


def test_without_an_estimate_the_first_start_runs_alone_then_its_cost_is_the_estimate(
        ap: AgentProject) -> None:
    ap.tasks(many(16, "cost=0.25 delay=0.5") + "settings:\n  max_parallel: 16\n")
    ap.run("t.yaml", "--max-cost", "1")
    calls = sorted(ap.calls("claude"), key=lambda c: c["time"])
    assert len(calls) == 4
    # The blind start (no recorded cost, no estimate) ran alone: the others started after
    # it had answered (its delay is a lower bound, whatever the machine's load).
    assert all(c["time"] >= calls[0]["time"] + 0.5 for c in calls[1:])
    assert ap.report()["summary"]["cost_usd"] == pytest.approx(1.0)


def test_a_task_recorded_too_expensive_is_skipped_with_the_reason(ap: AgentProject) -> None:
    ap.tasks(many(2, "cost=0.4"))
    assert ap.run("t.yaml").returncode == 0  # no budget: records 0.4 per task
    assert ap.run("t.yaml", "--max-cost", "0.5").returncode == 1
    assert len(ap.calls("claude")) == 3
    status = {t["id"]: (t["status"], t["reason"]) for t in ap.report()["tasks"]}
    skipped = [r for s, r in status.values() if s == "skipped"]
    assert skipped == ["not started: expected $0.40 would exceed the remaining budget "
                       "($0.10 left of max_cost_usd $0.5)"]
    notes = ap.report()["notes"]
    assert any("1 task did not start" in n for n in notes)
    md = ap.report_md()
    assert "expected $0.40 would exceed the remaining budget" in md


def test_dependents_of_a_budget_skipped_task_are_skipped(ap: AgentProject) -> None:
    ap.tasks("""\
        tasks:
          - {id: a, agent: reviewer, output: a.md, prompt: "[fake cost=0.8] A"}
          - {id: b, agent: reviewer, output: b.md, prompt: "[fake cost=0.8] B",
             dependencies: [a]}
          - {id: c, agent: reviewer, output: c.md, prompt: "C", dependencies: [b]}
        settings:
          max_cost_usd: 1
          estimate_cost_usd: 0.5
    """)
    ap.run("t.yaml")
    tasks = {t["id"]: t for t in ap.report()["tasks"]}
    assert tasks["a"]["status"] == "succeeded"
    assert tasks["b"]["reason"] == ("not started: expected $0.50 would exceed the remaining "
                                    "budget ($0.20 left of max_cost_usd $1)")
    assert tasks["c"]["status"] == "skipped" and "dependency 'b' was skipped" in \
        tasks["c"]["reason"]


def test_run_token_budget_counts_tokens_of_runners_without_cost(ap: AgentProject) -> None:
    ap.tasks(many(5, "input_tokens=600 output_tokens=400 delay=0.3", agent="coder")
             + "settings:\n  max_parallel: 5\n  estimate_tokens: 1000\n  max_tokens: 2500\n")
    proc = ap.run("t.yaml")
    assert proc.returncode == 1
    assert len(ap.calls("codex")) == 2  # 2 × 1,000 reserved; a third would pass 2,500
    data = ap.report()
    assert data["summary"]["input_tokens"] + data["summary"]["output_tokens"] == 2000
    assert data["settings"]["max_tokens"] == 2500
    reasons = {t["reason"] for t in data["tasks"] if t["status"] == "skipped"}
    assert reasons == {"not started: expected 1,000 tokens would exceed the remaining budget "
                       "(500 tokens left of max_tokens 2,500)"}


def test_max_tokens_flag_and_unpriced_agents_are_named(ap: AgentProject) -> None:
    ap.tasks(many(3, "input_tokens=600 output_tokens=400", agent="coder")
             + "settings:\n  max_parallel: 1\n")
    ap.run("t.yaml", "--max-tokens", "1500", "--max-cost", "5")
    assert len(ap.calls("codex")) == 1  # the blind first, then 1,000 + 1,000 > 1,500
    notes = ap.report()["notes"]
    assert any("max_cost_usd could not cover agent(s) coder: they report no cost" in n
               for n in notes), notes


def test_task_token_budget_stops_retries(ap: AgentProject) -> None:
    ap.tasks("""\
        tasks:
          - {id: a, agent: reviewer, output: a.md, retries: 3, max_tokens: 1500,
             prompt: "[fake exit_code=1 input_tokens=600 output_tokens=400] A"}
        settings:
          retry_backoff: 0
    """)
    ap.run("t.yaml")
    task = ap.task("a")
    assert task["status"] != "succeeded" and task["attempts"] == 2
    assert task["error"].endswith("not retried: task budget reached: 2,000 tokens of "
                                  "max_tokens 1,500")
    assert len(ap.calls("claude")) == 2


def test_task_cost_budget_goes_to_claude_as_max_budget_usd(ap: AgentProject) -> None:
    ap.tasks("tasks:\n  - {id: a, agent: reviewer, output: a.md, prompt: A, "
             "max_cost_usd: 0.75}\n  - {id: b, agent: reviewer, output: b.md, prompt: B}\n")
    assert ap.run("t.yaml").returncode == 0
    argv = {c["prompt"].strip(): c["argv"] for c in ap.calls("claude")}
    assert argv["A"][argv["A"].index("--max-budget-usd") + 1] == "0.75"
    assert "--max-budget-usd" not in argv["B"]


def test_warn_cost_is_printed_once_and_noted_in_the_report(ap: AgentProject) -> None:
    ap.tasks(many(4, "cost=0.3") + "settings:\n  max_parallel: 1\n")
    proc = ap.run("t.yaml", "--warn-cost", "0.5")
    assert proc.returncode == 0
    assert proc.stderr.count("cost warning") == 1, proc.stderr
    assert "cost warning: $0.6000 spent, past warn_cost_usd $0.5" in proc.stderr
    notes = [n for n in ap.report()["notes"] if "warn_cost_usd" in n]
    assert notes == ["Cost warning: $0.6000 spent, past warn_cost_usd $0.5."]
    assert "> **Note:** Cost warning: $0.6000 spent" in ap.report_md()


def test_task_file_budget_keys_are_validated(ap: AgentProject) -> None:
    ap.tasks("tasks:\n  - {id: a, agent: reviewer, output: a.md, prompt: A, max_tokens: 0}\n"
             "settings:\n  warn_cost_usd: -1\n")
    proc = ap.run("validate", "t.yaml")
    assert proc.returncode == 2
    assert "t.yaml:2" in proc.stderr and "max_tokens" in proc.stderr
    assert "t.yaml:4" in proc.stderr and "warn_cost_usd" in proc.stderr


def test_a_priced_tokens_only_runner_is_held_to_the_cost_budget(ap: AgentProject) -> None:
    ap.config("""
        [agents.coder]
        runner = "codex"
        model = "gpt-x"

        [pricing."gpt-x"]
        input_per_mtok = 1.0
        output_per_mtok = 0.0
        source = "test"
    """)
    ap.tasks(many(4, "input_tokens=500000 output_tokens=0", agent="coder")
             + "settings:\n  max_parallel: 1\n")
    ap.run("t.yaml", "--max-cost", "1")
    # $0.50 each, priced: the first runs blind, the second is expected to cost the same
    # and fits; then $1.00 is spent and the budget is reached.
    assert len(ap.calls("codex")) == 2
    data = ap.report()
    assert data["summary"]["priced_cost_usd"] == pytest.approx(1.0)
    assert data["notes"][0].startswith("Budget reached: $1.0000 spent of max_cost_usd $1")


# --- the scheduler's side, on a scripted runner and the mock clock ------------------------


class _Costly:
    """Each attempt waits 1 s on the clock, then fails (retryable) having cost $0.60."""

    name = "costly"

    def __init__(self) -> None:
        self.attempts: list[tuple[str, int]] = []

    def describe(self, job: Job) -> str:
        return job.task.id

    async def run(self, job: Job) -> Outcome:
        self.attempts.append((job.task.id, job.attempt))
        await trio.sleep(1.0)
        return Outcome(ok=False, exit_code=1, error="agent exited with code 1",
                       metrics={"cost_usd": 0.6, "input_tokens": 10, "output_tokens": 1})


def test_a_retry_the_budget_cannot_afford_keeps_its_failure(tmp_path: Path) -> None:
    (tmp_path / ".aiwg").mkdir()
    (tmp_path / ".aiwg" / "dispatch.toml").write_text('[agents.c]\nrunner = "claude"\n')
    (tmp_path / "t.yaml").write_text(
        "tasks:\n  - {id: a, agent: c, prompt: p, output: a.md, retries: 2}\n"
        "  - {id: b, agent: c, prompt: p, output: b.md, dependencies: [a]}\n"
        "settings: {max_cost_usd: 1.0, retry_backoff: 0}\n")
    spec = load_spec(tmp_path / "t.yaml", cwd=tmp_path)
    runner = _Costly()
    result = new_result(spec)
    sched = Scheduler(spec, runner, result)
    trio.run(sched.run, clock=trio.testing.MockClock(autojump_threshold=0))
    a, b = result.records
    assert runner.attempts == [("a", 1)]  # the retry is expected to cost 0.6 too: 1.2 > 1
    assert (a.status, a.attempts) == ("failed", 1)
    assert a.error == ("agent exited with code 1; not retried: expected $0.60 would exceed "
                       "the remaining budget ($0.40 left of max_cost_usd $1)")
    assert b.status == "skipped" and b.reason == "dependency 'a' failed"
    assert sched.spent_usd == pytest.approx(0.6)
