"""Timeouts kill whole process groups; continue, stop and retry behave as documented.

End to end, with real agent processes: what needs them (group kills, SIGKILL
escalation, logs appended per attempt, exit codes and reports).  The policies' timing
and bookkeeping (backoff, Retry-After, budget, interrupts, task-level retries, retried
timeouts) are tested in process on a mock clock in test_scheduler_events.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from support import Project, pid_alive, wait_until


def by_id(report: dict[str, object]) -> dict[str, dict[str, object]]:
    return {t["id"]: t for t in report["tasks"]}  # type: ignore[index, union-attr]


def read_pid(path: Path) -> int:
    assert wait_until(lambda: path.exists() and path.read_text().strip() != "", 30)
    return int(path.read_text())


@pytest.mark.fresh_cli  # process groups and signals: a real interpreter
def test_timeout_kills_the_grandchild(project: Project) -> None:
    project.config()
    gc = project.root / "grandchild.pid"
    me = project.root / "agent.pid"
    project.write("t.yaml", f"""\
        tasks:
          - id: slow
            agent: w
            prompt: "grandchild={gc} pidfile={me} hang"
            output: slow.md
            timeout: 5000
    """)
    proc = project.run("t.yaml")
    assert proc.returncode == 1
    t = by_id(project.report())["slow"]
    assert t["status"] == "timeout"
    assert "timed out after 5s" in str(t["error"])
    assert not pid_alive(read_pid(me))
    assert wait_until(lambda: not pid_alive(read_pid(gc)), 10)
    assert not (project.root / ".aiwg/working/slow.md").exists()


@pytest.mark.fresh_cli  # process groups and signals: a real interpreter
def test_timeout_escalates_to_sigkill_for_term_ignorers(project: Project) -> None:
    project.config()
    gc = project.root / "grandchild.pid"
    project.write("t.yaml", f"""\
        tasks:
          - id: stubborn
            agent: w
            prompt: "ignore-term grandchild={gc} hang"
            output: s.md
            timeout: 5000
    """)
    proc = project.run("t.yaml")
    assert proc.returncode == 1
    assert by_id(project.report())["stubborn"]["status"] == "timeout"
    assert wait_until(lambda: not pid_alive(read_pid(gc)), 10)


@pytest.mark.fresh_cli  # process groups and signals: a real interpreter
def test_leftover_background_processes_are_killed_after_success(project: Project) -> None:
    project.config()
    gc = project.root / "bg.pid"
    project.write("t.yaml", f"""\
        tasks:
          - {{id: a, agent: w, prompt: "grandchild={gc}", output: a.md}}
    """)
    assert project.run("t.yaml").returncode == 0
    assert wait_until(lambda: not pid_alive(read_pid(gc)), 10)


POLICY_FILE = """\
tasks:
  - {id: bad, agent: w, prompt: "exit=3", output: bad.md}
  - {id: after-bad, agent: w, prompt: x, output: ab.md, dependencies: [bad]}
  - {id: after-after, agent: w, prompt: x, output: aab.md, dependencies: [after-bad]}
  - {id: independent, agent: w, prompt: "sleep=0.5", output: ind.md}
settings:
  max_parallel: 4
  retry_backoff: 0.05
"""


def test_continue_skips_dependents_and_runs_the_rest(project: Project) -> None:
    project.config()
    project.write("t.yaml", POLICY_FILE)
    proc = project.run("t.yaml", "--on-failure", "continue")
    assert proc.returncode == 1
    t = by_id(project.report())
    assert t["bad"]["status"] == "failed" and t["bad"]["exit_code"] == 3
    assert t["bad"]["attempts"] == 1
    assert t["after-bad"]["status"] == "skipped"
    assert t["after-bad"]["reason"] == "dependency 'bad' failed"
    assert t["after-after"]["status"] == "skipped"
    assert t["independent"]["status"] == "succeeded"
    assert "test-agent: exiting with 3" in "\n".join(t["bad"]["log_tail"])


def test_stop_cancels_running_tasks_and_starts_no_more(project: Project) -> None:
    project.config()
    victim = project.root / "victim.pid"
    project.write("t.yaml", f"""\
        tasks:
          - {{id: fails-soon, agent: w, prompt: "wait-for={victim} exit=1", output: f.md}}
          - {{id: long, agent: w, prompt: "pidfile={victim} hang", output: l.md}}
          - {{id: later, agent: w, prompt: x, output: later.md, dependencies: [fails-soon]}}
          - {{id: queued, agent: w, prompt: x, output: q.md}}
        settings:
          max_parallel: 2
          on_failure: stop
    """)
    proc = project.run("t.yaml")
    assert proc.returncode == 1
    t = by_id(project.report())
    assert t["fails-soon"]["status"] == "failed"
    assert t["long"]["status"] == "cancelled"
    assert "on_failure is 'stop'" in str(t["long"]["error"])
    assert t["later"]["status"] == "skipped"
    assert t["queued"]["status"] == "skipped"
    assert t["queued"]["attempts"] == 0
    assert "not started" in str(t["queued"]["reason"])
    assert not pid_alive(read_pid(victim))
    started = {e["task"] for e in project.events() if e["event"] == "start"}
    assert "queued" not in started and "later" not in started


def test_retry_retries_then_continues(project: Project) -> None:
    project.config()
    project.write("t.yaml", POLICY_FILE)
    proc = project.run("t.yaml", "--on-failure", "retry")
    assert proc.returncode == 1
    t = by_id(project.report())
    assert t["bad"]["status"] == "failed"
    assert t["bad"]["attempts"] == 4  # 1 + max_retries (3)
    assert t["after-bad"]["status"] == "skipped"
    assert t["independent"]["status"] == "succeeded"
    attempts = [e["attempt"] for e in project.events()
                if e["event"] == "start" and e["task"] == "bad"]
    assert attempts == ["1", "2", "3", "4"]
    md = (project.root / ".aiwg/working/dispatch-report.md").read_text()
    assert "| bad | w |" in md and "| ✗ | 4 |" in md


def test_retry_recovers_a_flaky_task(project: Project) -> None:
    project.config()
    project.write("t.yaml", """\
        tasks:
          - {id: flaky, agent: w, prompt: "fail-until=3", output: f.md}
          - {id: next, agent: w, prompt: x, output: n.md, dependencies: [flaky]}
        settings: {on_failure: retry, max_retries: 5, retry_backoff: 0.05}
    """)
    assert project.run("t.yaml").returncode == 0
    t = by_id(project.report())
    assert t["flaky"]["status"] == "succeeded" and t["flaky"]["attempts"] == 3
    assert t["next"]["status"] == "succeeded"
    log = (project.root / ".aiwg/working/logs/flaky.log").read_text()
    assert log.count("attempt ") == 3  # one log, every attempt appended
