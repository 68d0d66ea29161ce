"""The scheduler's handling of what agents say while they run, driven by a test runner.

As ninja's build_test.cc drives the real Builder with a fake CommandRunner, these drive
the real `Scheduler` with `ScriptedRunner`, a sibling of the real runners that plays a
script per task (events at given times, then an outcome), on trio's MockClock: no
processes and no wall-clock margins, so the time-dependent rules (timeouts, idle
deadlines, "last event N s ago") are checked exactly.  The same rules with real agent
CLIs are covered in tests/contract/.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing

from parallel_dispatch.api import new_result
from parallel_dispatch.events import AgentEvent
from parallel_dispatch.loader import load_spec
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

    def describe(self, job: Job) -> str:
        return job.task.id

    async def run(self, job: Job) -> Outcome:
        tid = job.task.id
        self.started.append(tid)
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

    def run_started(self, result: RunResult) -> None: ...
    def task_started(self, rec: TaskRecord) -> None: ...
    def task_retrying(self, rec: TaskRecord, delay: float) -> None: ...
    def task_finished(self, rec: TaskRecord) -> None: ...
    def run_finished(self, result: RunResult) -> None: ...

    def task_event(self, rec: TaskRecord, event: AgentEvent) -> None:
        self.events.append((rec.id, event.text))

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


def _run(spec: object, runner: ScriptedRunner, progress: Recorder | None = None) -> RunResult:
    result = new_result(spec)  # type: ignore[arg-type]
    sched = Scheduler(spec, runner, result, progress=progress)  # type: ignore[arg-type]

    async def main() -> RunResult:
        return await sched.run()

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
