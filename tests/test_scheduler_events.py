"""The scheduler's handling of what agents say while they run, driven by a test runner.

As ninja's build_test.cc drives the real Builder with a fake CommandRunner, these drive
the real `Scheduler` with `ScriptedRunner`, a sibling of the real runners that plays a
script per task (events at given times, then an outcome), on trio's MockClock: no
processes and no wall-clock margins, so the time-dependent rules (timeouts, idle
deadlines, "last event N s ago") are checked exactly.  The same rules with real agent
CLIs are covered in tests/contract/.

The scheduling policies live here too (continue, stop, retry with backoff and
Retry-After, the cost budget, interrupts, cached tasks): the end-to-end tests in
test_policies.py keep only what needs real processes (group kills, SIGKILL escalation,
logs appended per attempt).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from parallel_dispatch.api import new_result
from parallel_dispatch.events import AgentEvent
from parallel_dispatch.loader import load_spec
from parallel_dispatch.quota import Governor
from parallel_dispatch.report import to_json, to_markdown
from parallel_dispatch.result import RunResult, TaskRecord
from parallel_dispatch.runners.base import Job, Outcome
from parallel_dispatch.scheduler import Scheduler
from support import Project, pid_alive


@dataclass
class Step:
    """Wait `after` seconds, then report `event` (if any)."""

    after: float
    event: AgentEvent | None = None


@dataclass
class Script:
    steps: list[Step] = field(default_factory=list)
    outcome: Outcome = field(default_factory=lambda: Outcome(ok=True, exit_code=0))


class ScriptedRunner:
    """Plays each task's script; records which tasks started and which were cancelled."""

    name = "scripted"

    def __init__(self, scripts: dict[str, list[Script]]) -> None:
        self.scripts = scripts
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.starts: list[tuple[str, int, float]] = []
        """(task, attempt, clock time) of every attempt started."""

    def describe(self, job: Job) -> str:
        return job.task.id

    async def run(self, job: Job) -> Outcome:
        tid = job.task.id
        self.started.append(tid)
        self.starts.append((tid, job.attempt, trio.current_time()))
        plays = self.scripts.get(tid, [Script()])
        script = plays[min(job.attempt, len(plays)) - 1]
        try:
            for step in script.steps:
                await trio.sleep(step.after)
                if job.activity is not None:
                    if step.event is None:
                        job.activity.saw_output()
                    else:
                        job.activity.event(step.event)
                        if step.event.fatal:
                            return Outcome(ok=False, error=step.event.text,
                                           cause=step.event.cause, retryable=False)
        except trio.Cancelled:
            self.cancelled.append(tid)
            raise
        return script.outcome


class Recorder:
    """Progress that remembers the events it was shown."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.notes: list[str] = []
        self.waits: list[tuple[str, str, float]] = []
        """(task, pool, seconds the pool is paused) of every wait for quota."""

    def run_started(self, result: RunResult) -> None: ...
    def task_started(self, rec: TaskRecord) -> None: ...
    def task_retrying(self, rec: TaskRecord, delay: float) -> None: ...
    def task_finished(self, rec: TaskRecord) -> None: ...
    def run_finished(self, result: RunResult) -> None: ...

    def task_event(self, rec: TaskRecord, event: AgentEvent) -> None:
        self.events.append((rec.id, event.text))

    def task_waiting(self, rec: TaskRecord, pool: str, wait_s: float) -> None:
        self.waits.append((rec.id, pool, wait_s))

    def note(self, text: str) -> None:
        self.notes.append(text)


def _spec(tmp_path: Path, tasks: str, settings: str = "", agents: str = "") -> object:
    (tmp_path / ".aiwg").mkdir(exist_ok=True)
    (tmp_path / ".aiwg" / "dispatch.toml").write_text(textwrap.dedent(agents or """
        [agents.c]
        runner = "claude"
        [agents.g]
        runner = "gemini"
    """))
    path = tmp_path / "t.yaml"
    path.write_text(textwrap.dedent(tasks) + textwrap.dedent(settings))
    return load_spec(path, cwd=tmp_path)


def _run(spec: object, runner: ScriptedRunner, progress: Recorder | None = None, *,
         interrupt_at: float | None = None, **kw: Any) -> RunResult:
    """Run `spec` on the mock clock (it starts at 0); `interrupt_at`: call `interrupt()`
    then, as Ctrl-C would."""
    result = new_result(spec)  # type: ignore[arg-type]
    # Starts are not staggered here: these tests pin the scheduler's rules to exact times
    # (tests/test_quota.py covers the stagger).
    kw.setdefault("governor", Governor(stagger_s=0.0))
    sched = Scheduler(spec, runner, result, progress=progress, **kw)  # type: ignore[arg-type]

    async def main() -> RunResult:
        if interrupt_at is None:
            return await sched.run()
        async with trio.open_nursery() as nursery:
            async def interrupt() -> None:
                await trio.sleep(interrupt_at)
                sched.interrupt()
            nursery.start_soon(interrupt)
            out = await sched.run()
            nursery.cancel_scope.cancel()
            return out

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def _rec(result: RunResult, tid: str) -> TaskRecord:
    return next(r for r in result.records if r.id == tid)


RETRY_401 = AgentEvent("API retry 1/10: 401 authentication_failed", kind="retry",
                       cause="auth", fatal=True)


def test_outcome_with_a_cause_is_a_provider_error_not_a_failure(tmp_path: Path) -> None:
    spec = _spec(tmp_path, """
        tasks:
          - {id: a, agent: c, prompt: p, output: a.md}
          - {id: b, agent: c, prompt: p, output: b.md}
    """)
    runner = ScriptedRunner({
        "a": [Script(outcome=Outcome(ok=False, error="provider overloaded: 529",
                                     cause="overloaded", retryable=True))],
        "b": [Script(outcome=Outcome(ok=False, error="agent exited with code 3"))],
    })
    result = _run(spec, runner)
    a, b = _rec(result, "a"), _rec(result, "b")
    assert (a.status, a.cause) == ("provider_error", "overloaded")
    assert (b.status, b.cause) == ("failed", None)
    data = to_json(result)
    assert data["summary"]["provider_errors"] == 1 and data["summary"]["failed"] == 1
    md = to_markdown(result, data)
    assert "### a — provider_error (provider overloaded)" in md
    assert "- **Provider errors**: 1" in md


def test_bad_credentials_stop_the_runners_other_tasks_only(tmp_path: Path) -> None:
    """The first 401 ends that runner's running and queued tasks with one clear message;
    another runner's tasks run on."""
    spec = _spec(tmp_path, """
        tasks:
          - {id: first, agent: c, prompt: p, output: 1.md}
          - {id: running, agent: c, prompt: p, output: 2.md}
          - {id: queued, agent: c, prompt: p, output: 3.md}
          - {id: other, agent: g, prompt: p, output: 4.md}
    """, "settings: {max_parallel: 2, on_failure: retry, max_retries: 2}\n")
    runner = ScriptedRunner({
        "first": [Script([Step(1.0, RETRY_401)])],
        "running": [Script([Step(100.0)])],
        "other": [Script([Step(5.0)])],
    })
    progress = Recorder()
    result = _run(spec, runner, progress)
    first, running, queued, other = (_rec(result, t) for t in
                                     ("first", "running", "queued", "other"))
    assert first.status == "provider_error" and first.cause == "auth"
    assert first.attempts == 1, "bad credentials are not retried"
    assert running.status == "provider_error" and running.cause == "auth"
    assert "running" in runner.cancelled
    assert "rejected in task 'first'" in (running.error or "")
    assert queued.status == "provider_error" and queued.attempts == 0
    assert "queued" not in runner.started
    assert other.status == "succeeded"
    assert any("Bad credentials for the claude runner" in n for n in result.notes)
    assert progress.events == [("first", RETRY_401.text)]


def test_timeout_quotes_the_last_event_and_blames_the_provider(tmp_path: Path) -> None:
    spec = _spec(tmp_path, """
        tasks:
          - {id: waits, agent: c, prompt: p, output: a.md, timeout: 60000}
          - {id: busy, agent: c, prompt: p, output: b.md, timeout: 60000}
    """)
    retry = AgentEvent("API retry 7/10: connection refused", kind="retry", cause="unreachable")
    tool = AgentEvent("tool: Bash", kind="tool")
    runner = ScriptedRunner({
        "waits": [Script([Step(57.0, retry), Step(100.0)])],
        "busy": [Script([Step(50.0, tool), Step(100.0)])],
    })
    result = _run(spec, runner)
    waits, busy = _rec(result, "waits"), _rec(result, "busy")
    assert waits.status == "provider_error" and waits.cause == "unreachable"
    assert waits.error == ("claude runner: provider unreachable: timed out after 60s (last "
                           "event 3 s ago: API retry 7/10: connection refused); the agent's "
                           "process group was killed")
    assert busy.status == "timeout" and busy.cause is None
    assert "(last event 10 s ago: tool: Bash)" in (busy.error or "")
    assert to_json(result)["tasks"][1]["last_event"] == "tool: Bash"


def test_idle_timeout_stalls_a_silent_agent_but_not_a_talking_one(tmp_path: Path) -> None:
    spec = _spec(tmp_path, """
        tasks:
          - {id: silent, agent: c, prompt: p, output: a.md}
          - {id: talks, agent: c, prompt: p, output: b.md}
          - {id: own, agent: c, prompt: p, output: c.md, idle_timeout: 50000}
    """, "settings: {idle_timeout: 10000}\n")
    runner = ScriptedRunner({
        "silent": [Script([Step(2.0), Step(30.0)])],
        "talks": [Script([Step(9.0)] * 5)],  # 45 s of work, never 10 s quiet
        "own": [Script([Step(40.0)])],  # its own idle_timeout (50 s) wins
    })
    result = _run(spec, runner)
    silent = _rec(result, "silent")
    assert silent.status == "stalled"
    assert silent.error == ("claude runner: stalled: no output for 10s (the agent printed no "
                            "event); the agent's process group was killed")
    assert silent.end_s == pytest.approx(12.0)
    assert _rec(result, "talks").status == "succeeded"
    assert _rec(result, "own").status == "succeeded"


def test_stalled_and_provider_errors_are_retried_under_the_policy(tmp_path: Path) -> None:
    spec = _spec(tmp_path, """
        tasks:
          - {id: a, agent: c, prompt: p, output: a.md, retries: 2}
          - {id: b, agent: c, prompt: p, output: b.md, retries: 2}
          - {id: q, agent: c, prompt: p, output: q.md, retries: 2}
    """, "settings: {idle_timeout: 5000}\n")
    runner = ScriptedRunner({
        "a": [Script([Step(20.0)]), Script()],
        "b": [Script(outcome=Outcome(ok=False, error="x", cause="server")), Script()],
        "q": [Script(outcome=Outcome(ok=False, error="quota", cause="quota",
                                     retryable=False))],
    })
    result = _run(spec, runner)
    assert (_rec(result, "a").status, _rec(result, "a").attempts) == ("succeeded", 2)
    assert (_rec(result, "b").status, _rec(result, "b").attempts) == ("succeeded", 2)
    assert (_rec(result, "q").status, _rec(result, "q").attempts) == ("provider_error", 1)


def test_dependents_of_a_provider_error_are_skipped_with_the_reason(tmp_path: Path) -> None:
    spec = _spec(tmp_path, """
        tasks:
          - {id: a, agent: c, prompt: p, output: a.md}
          - {id: b, agent: g, prompt: p, output: b.md, dependencies: [a]}
    """)
    runner = ScriptedRunner({"a": [Script([Step(1.0, RETRY_401)])]})
    result = _run(spec, runner)
    b = _rec(result, "b")
    assert b.status == "skipped"
    assert b.reason == "dependency 'a' hit a provider error"


def test_idle_timeout_with_real_command_agents(project: Project) -> None:
    """A command agent's liveness is its output files growing: a silent one is killed
    as stalled (its process group with it), one that keeps printing runs to the end."""
    project.config()
    pidfile = project.root / "silent.pid"
    project.write("t.yaml", f"""\
        tasks:
          - {{id: silent, agent: w, prompt: "hang pidfile={pidfile}", output: s.md}}
          - {{id: ticks, agent: w, prompt: "tick=20", output: t.md}}
        settings: {{idle_timeout: 2000}}
    """)
    proc = project.run("run", "t.yaml")
    assert proc.returncode == 1, proc.stderr
    tasks = {t["id"]: t for t in project.report()["tasks"]}  # type: ignore[union-attr]
    assert tasks["silent"]["status"] == "stalled"
    assert tasks["silent"]["error"].startswith("stalled: no output for 2s")
    assert not pid_alive(int(pidfile.read_text()))
    assert tasks["ticks"]["status"] == "succeeded"
    assert "test-agent: tick 19" in (project.root / ".aiwg/working/logs/ticks.log").read_text()
    assert project.report()["summary"]["stalled"] == 1  # type: ignore[index]


def test_idle_timeout_flag_overrides_the_file(project: Project) -> None:
    project.config()
    project.write("t.yaml", """\
        tasks:
          - {id: quiet, agent: w, prompt: "sleep=3", output: q.md}
        settings: {idle_timeout: 1000}
    """)
    proc = project.run("run", "t.yaml", "--idle-timeout", "60000")
    assert proc.returncode == 0, proc.stderr
    assert project.report()["settings"]["idle_timeout"] == 60000  # type: ignore[index]


def test_retry_backoff_is_capped_at_an_hour(tmp_path: Path) -> None:
    """`retry_backoff: 3600` with 20 retries would wait 2^19 hours uncapped."""
    spec = _spec(tmp_path, """
        tasks:
          - {id: a, agent: c, prompt: p, output: a.md, retries: 20}
    """, "settings: {retry_backoff: 3600}\n")
    fail = Script(outcome=Outcome(ok=False, error="exit 1"))
    result = _run(spec, ScriptedRunner({"a": [fail] * 21}))
    a = _rec(result, "a")
    assert (a.status, a.attempts) == ("failed", 21)
    assert a.end_s is not None and a.end_s <= 20 * 2 * 3600


# -- policies: continue, stop, retry (ninja's build_test.cc style) -----------------------------
FAIL = Script(outcome=Outcome(ok=False, exit_code=3, error="agent exited with code 3"))

POLICY_TASKS = """
    tasks:
      - {id: bad, agent: c, prompt: p, output: bad.md}
      - {id: after-bad, agent: c, prompt: p, output: ab.md, dependencies: [bad]}
      - {id: after-after, agent: c, prompt: p, output: aab.md, dependencies: [after-bad]}
      - {id: independent, agent: c, prompt: p, output: ind.md}
"""


def _starts(runner: ScriptedRunner, tid: str) -> list[tuple[int, float]]:
    return [(attempt, t) for task, attempt, t in runner.starts if task == tid]


def test_continue_skips_dependents_transitively_and_runs_the_rest(tmp_path: Path) -> None:
    spec = _spec(tmp_path, POLICY_TASKS, "settings: {on_failure: continue, max_parallel: 4}\n")
    runner = ScriptedRunner({"bad": [FAIL] * 4, "independent": [Script([Step(5.0)])]})
    result = _run(spec, runner)
    bad = _rec(result, "bad")
    assert (bad.status, bad.exit_code, bad.attempts) == ("failed", 3, 1)
    for tid in ("after-bad", "after-after"):  # the reason names the root failure
        rec = _rec(result, tid)
        assert (rec.status, rec.attempts) == ("skipped", 0)
        assert rec.reason == "dependency 'bad' failed"
    assert _rec(result, "independent").status == "succeeded"
    assert sorted(runner.started) == ["bad", "independent"]


def test_stop_cancels_running_tasks_and_starts_no_more(tmp_path: Path) -> None:
    spec = _spec(tmp_path, """
        tasks:
          - {id: fails-soon, agent: c, prompt: p, output: f.md}
          - {id: long, agent: c, prompt: p, output: l.md}
          - {id: later, agent: c, prompt: p, output: later.md, dependencies: [fails-soon]}
          - {id: queued, agent: c, prompt: p, output: q.md}
    """, "settings: {max_parallel: 2, on_failure: stop}\n")
    runner = ScriptedRunner({
        "fails-soon": [Script([Step(1.0)], FAIL.outcome)],
        "long": [Script([Step(1000.0)])],
    })
    result = _run(spec, runner)
    assert _rec(result, "fails-soon").status == "failed"
    long = _rec(result, "long")
    assert long.status == "cancelled" and "long" in runner.cancelled
    assert long.error == "cancelled: on_failure is 'stop' and task 'fails-soon' failed"
    assert long.end_s == pytest.approx(1.0)  # cancelled at once, not after its 1000 s
    for tid in ("later", "queued"):
        rec = _rec(result, tid)
        assert (rec.status, rec.attempts) == ("skipped", 0)
    assert "not started" in (_rec(result, "queued").reason or "")
    assert sorted(runner.started) == ["fails-soon", "long"]


def test_retry_policy_retries_with_exponential_backoff_then_skips_dependents(
        tmp_path: Path) -> None:
    spec = _spec(tmp_path, POLICY_TASKS,
                 "settings: {on_failure: retry, max_retries: 3, retry_backoff: 10}\n")
    runner = ScriptedRunner({"bad": [FAIL] * 4})
    result = _run(spec, runner)
    bad = _rec(result, "bad")
    assert (bad.status, bad.attempts) == ("failed", 4)  # 1 + max_retries
    assert _rec(result, "after-bad").status == "skipped"
    assert _rec(result, "independent").status == "succeeded"
    starts = _starts(runner, "bad")
    assert [a for a, _ in starts] == [1, 2, 3, 4]
    # Attempt n waits base·2^(n-1) · [1, 2) after the failure before it (full jitter on top).
    for (n, t0), (_, t1) in pairwise(starts):
        base = 10 * 2 ** (n - 1)
        assert base <= t1 - t0 < 2 * base, (n, t1 - t0)


def test_retry_recovers_a_flaky_task_and_its_dependents_run(tmp_path: Path) -> None:
    spec = _spec(tmp_path, """
        tasks:
          - {id: flaky, agent: c, prompt: p, output: f.md}
          - {id: next, agent: c, prompt: p, output: n.md, dependencies: [flaky]}
    """, "settings: {on_failure: retry, max_retries: 5, retry_backoff: 0.05}\n")
    runner = ScriptedRunner({"flaky": [FAIL, FAIL, Script()]})
    result = _run(spec, runner)
    assert (_rec(result, "flaky").status, _rec(result, "flaky").attempts) == ("succeeded", 3)
    assert _rec(result, "next").status == "succeeded"


def test_task_level_retries_apply_under_continue(tmp_path: Path) -> None:
    spec = _spec(tmp_path, """
        tasks:
          - {id: flaky, agent: c, prompt: p, output: f.md, retries: 1}
          - {id: once, agent: c, prompt: p, output: o.md}
    """, "settings: {retry_backoff: 0.05}\n")
    runner = ScriptedRunner({"flaky": [FAIL, Script()], "once": [FAIL, Script()]})
    result = _run(spec, runner)
    assert (_rec(result, "flaky").status, _rec(result, "flaky").attempts) == ("succeeded", 2)
    assert (_rec(result, "once").status, _rec(result, "once").attempts) == ("failed", 1)


def test_timeouts_are_retried_and_each_attempt_is_cancelled(tmp_path: Path) -> None:
    spec = _spec(tmp_path, """
        tasks:
          - {id: hangs, agent: c, prompt: p, output: h.md, timeout: 500, retries: 1}
    """, "settings: {retry_backoff: 0.05}\n")
    runner = ScriptedRunner({"hangs": [Script([Step(1000.0)])] * 2})
    result = _run(spec, runner)
    hangs = _rec(result, "hangs")
    assert (hangs.status, hangs.attempts) == ("timeout", 2)
    assert hangs.error is not None and "timed out after 0.5s" in hangs.error
    assert runner.cancelled == ["hangs", "hangs"]


def test_retry_after_from_the_provider_outlasts_a_short_backoff(tmp_path: Path) -> None:
    """With the governor off (`adaptive_parallel: false`, as `--fixed-parallel`), a 429 is
    an ordinary retryable failure: "retry after 30 s" is waited out even though the
    backoff is 0.05 s; a longer backoff wins over a short Retry-After.  (With the governor
    on, tests/test_quota.py.)"""
    spec = _spec(tmp_path, """
        tasks:
          - {id: limited, agent: c, prompt: p, output: a.md, retries: 1}
          - {id: patient, agent: c, prompt: p, output: b.md, retries: 1, dependencies: [limited]}
    """, "settings: {retry_backoff: 0.05, adaptive_parallel: false}\n")
    limited = Script(outcome=Outcome(ok=False, error="rate limited", cause="rate_limit",
                                     retry_after=30.0))
    runner = ScriptedRunner({"limited": [limited, Script()]})
    delays: list[float] = []

    class Delays(Recorder):
        def task_retrying(self, rec: TaskRecord, delay: float) -> None:
            delays.append(delay)

    result = _run(spec, runner, Delays())
    assert (_rec(result, "limited").status, _rec(result, "limited").attempts) == \
        ("succeeded", 2)
    (t1, t2) = [t for _, t in _starts(runner, "limited")]
    assert t2 - t1 >= 30.0
    assert delays == [30.0]

    spec = _spec(tmp_path, """
        tasks:
          - {id: limited, agent: c, prompt: p, output: a.md, retries: 1}
    """, "settings: {retry_backoff: 100, adaptive_parallel: false}\n")
    short = Script(outcome=Outcome(ok=False, error="rate limited", cause="rate_limit",
                                   retry_after=1.0))
    runner = ScriptedRunner({"limited": [short, Script()]})
    _run(spec, runner)
    (t1, t2) = [t for _, t in _starts(runner, "limited")]
    assert t2 - t1 >= 100.0


def test_budget_lets_running_tasks_finish_and_starts_nothing_more(tmp_path: Path) -> None:
    spec = _spec(tmp_path, """
        tasks:
          - {id: a, agent: c, prompt: p, output: a.md}
          - {id: b, agent: c, prompt: p, output: b.md}
          - {id: c, agent: c, prompt: p, output: c.md}
          - {id: d, agent: c, prompt: p, output: d.md}
    """, "settings: {max_parallel: 2, max_cost_usd: 1.0, estimate_cost_usd: 0.1}\n")

    def costs(usd: float, after: float) -> list[Script]:
        return [Script([Step(after)], Outcome(ok=True, exit_code=0,
                                              metrics={"cost_usd": usd}))]

    # a (0.7) ends at 1 s, so c starts (0.7 + 0.1 reserved for b + 0.1 expected ≤ 1.0); b
    # (0.5) ends at 2 s: 1.2 spent, d waits forever; c, already running, finishes.
    runner = ScriptedRunner({"a": costs(0.7, 1.0), "b": costs(0.5, 2.0), "c": costs(0.1, 5.0)})
    result = _run(spec, runner)
    assert [_rec(result, t).status for t in "abc"] == ["succeeded"] * 3
    d = _rec(result, "d")
    assert (d.status, d.attempts) == ("skipped", 0)
    assert d.reason == "not started: budget reached (max_cost_usd $1)"
    assert sorted(runner.started) == ["a", "b", "c"]  # (trio starts a and b in any order)
    assert any(n.startswith("Budget reached: $1.3000 spent of max_cost_usd $1")
               for n in result.notes)


def test_interrupt_cancels_running_keeps_a_waiting_retry_and_starts_nothing(
        tmp_path: Path) -> None:
    spec = _spec(tmp_path, """
        tasks:
          - {id: running, agent: c, prompt: p, output: r.md}
          - {id: backing-off, agent: c, prompt: p, output: b.md, retries: 3}
          - {id: queued, agent: c, prompt: p, output: q.md, dependencies: [running]}
    """, "settings: {max_parallel: 2, retry_backoff: 100}\n")
    runner = ScriptedRunner({"running": [Script([Step(1000.0)])],
                             "backing-off": [Script([Step(1.0)], FAIL.outcome)] * 4})
    result = _run(spec, runner, interrupt_at=10.0)
    assert result.interrupted
    running = _rec(result, "running")
    assert (running.status, running.error) == ("cancelled", "cancelled: run interrupted")
    assert running.end_s == pytest.approx(10.0)
    backing = _rec(result, "backing-off")
    assert (backing.status, backing.attempts) == ("failed", 1)  # its last failure, no retry
    assert backing.error == "agent exited with code 3"
    queued = _rec(result, "queued")
    assert (queued.status, queued.reason) == ("skipped", "not started: run interrupted")
    assert result.wall_s == pytest.approx(10.0)


class FakeReuse:
    """`Reuse` with the answers given: which tasks' previous outputs are still good."""

    def __init__(self, spec: Any, cached: set[str]) -> None:
        self.spec = spec
        self.cached = cached
        self.recorded: list[str] = []

    async def lookup(self, i: int) -> bool:
        return bool(self.spec.tasks[i].id in self.cached)

    async def succeeded(self, i: int) -> None:
        self.recorded.append(self.spec.tasks[i].id)


def test_cached_tasks_are_not_run_and_their_dependents_are(tmp_path: Path) -> None:
    spec = _spec(tmp_path, """
        tasks:
          - {id: a, agent: c, prompt: p, output: a.md}
          - {id: b, agent: c, prompt: p, output: b.md, dependencies: [a]}
          - {id: c, agent: c, prompt: p, output: c.md}
    """)
    reuse = FakeReuse(spec, {"a"})
    runner = ScriptedRunner({})
    result = _run(spec, runner, reuse=reuse)
    a = _rec(result, "a")
    assert (a.status, a.attempts) == ("cached", 0)
    assert a.reason == "unchanged since its last successful run; output reused"
    assert [_rec(result, t).status for t in "bc"] == ["succeeded", "succeeded"]
    assert sorted(runner.started) == ["b", "c"]
    assert sorted(reuse.recorded) == ["b", "c"]  # successes are recorded for next time


def test_max_parallel_caps_running_attempts(tmp_path: Path) -> None:
    rows = "".join(f"  - {{id: t{i}, agent: c, prompt: p, output: t{i}.md}}\n"
                   for i in range(7))
    spec = _spec(tmp_path, "tasks:\n" + rows, "settings: {max_parallel: 3}\n")
    runner = ScriptedRunner({f"t{i}": [Script([Step(1.0)])] for i in range(7)})
    result = _run(spec, runner)
    assert all(r.status == "succeeded" for r in result.records)
    starts = sorted(t for _, _, t in runner.starts)
    assert starts == [0.0] * 3 + [1.0] * 3 + [2.0]  # 3 at a time, no barrier between waves
    assert result.wall_s == pytest.approx(3.0)
