"""The command line: exit codes, dry runs, plans, interrupts, precedence, reports."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

from parallel_dispatch import load_spec
from support import Project, cli_env, pid_alive, wait_until
from warmcli import run_cli


def test_exit_code_zero_and_report_layout(project: Project) -> None:
    project.config()
    project.write("t.yaml", """\
        name: demo
        tasks:
          - {id: a, agent: w, prompt: 'sleep=0.2', output: a.md}
          - {id: b, agent: w, prompt: 'x', output: b.md, dependencies: [a]}
    """)
    proc = project.run("t.yaml")
    assert proc.returncode == 0, proc.stderr
    md = (project.root / ".aiwg/working/dispatch-report.md").read_text()
    for heading in ("# Parallel Dispatch Report", "## Summary", "## Execution Timeline",
                    "## Task Details", "## Outputs", "```mermaid", "gantt"):
        assert heading in md
    assert "| Wave | Tasks | Duration | Status |" in md
    assert "| Task | Agent | Duration | Status | Attempts | Output |" in md
    assert "- .aiwg/working/a.md" in md and "- .aiwg/working/b.md" in md


def test_markdown_numbers_agree_with_json(project: Project) -> None:
    project.config()
    project.write("t.yaml", """\
        tasks:
          - {id: a, agent: w, prompt: 'sleep=0.3', output: a.md}
          - {id: b, agent: w, prompt: 'sleep=0.3', output: b.md}
          - {id: c, agent: w, prompt: 'exit=1', output: c.md}
          - {id: d, agent: w, prompt: 'x', output: d.md, dependencies: [c]}
        settings: {max_parallel: 2}
    """)
    assert project.run("t.yaml").returncode == 1
    data = project.report()
    md = (project.root / ".aiwg/working/dispatch-report.md").read_text()

    def field(name: str) -> str:
        m = re.search(rf"- \*\*{name}\*\*: (.+)", md)
        assert m, name
        return m.group(1)

    s = data["summary"]
    assert int(field("Total Tasks")) == s["total"] == 4
    assert int(field("Succeeded")) == s["succeeded"] == 2
    assert int(field("Failed")) == s["failed"] == 1
    assert int(field("Skipped")) == s["skipped"] == 1
    assert int(field("Timed out")) == s["timed_out"] == 0
    assert field("Total Time") == f"{s['total_time_s']:.1f}s"
    assert field("Parallel Efficiency") == f"{round(100 * s['parallel_efficiency'])}%"
    work = sum(t["duration_s"] for t in data["tasks"] if t["duration_s"] is not None)
    assert abs(work - s["work_time_s"]) < 0.01
    expected = s["work_time_s"] / (s["total_time_s"] * 2)
    assert abs(s["parallel_efficiency"] - expected) < 0.01
    for t in data["tasks"]:
        assert f"| {t['id']} | {t['agent']} |" in md
        assert set(t) >= {"id", "agent", "status", "attempts", "start_s", "end_s", "duration_s",
                          "output", "exit_code", "error"}


def test_efficiency_formula_matches_the_reference() -> None:
    """99.2 s of work in 45.2 s wall on 3 slots is the reference's 73%."""
    from parallel_dispatch.result import RunResult

    class _S:  # just the settings the formula reads
        class settings:
            max_parallel = 3

    r = RunResult(spec=_S(), run_id="x", started_at="", wall_s=45.2)  # type: ignore[arg-type]
    r.records = []
    from parallel_dispatch.result import TaskRecord

    for d in (32.1, 28.4, 25.6, 13.1):
        r.records.append(TaskRecord(id="t", agent="a", wave=1, output="o",
                                    spec=r.spec, index=0, busy_s=d))
    assert r.efficiency is not None and round(100 * r.efficiency) == 73
    r.interrupted = True  # cancelled work would count as busy: no figure at all
    assert r.efficiency is None


def test_dry_run_and_plan_write_nothing(project: Project) -> None:
    project.config()
    project.write("t.yaml", """\
        tasks:
          - {id: a, agent: w, prompt: 'touch ran', output: a.md}
          - {id: b, agent: shell, prompt: 'touch ran2', output: b.md, dependencies: [a]}
    """)
    before = sorted(p.relative_to(project.root) for p in project.root.rglob("*"))
    for args in (["t.yaml", "--dry-run"], ["plan", "t.yaml"], ["run", "t.yaml", "--dry-run"]):
        proc = project.run(*args)
        assert proc.returncode == 0, proc.stderr
        assert "Wave 1:" in proc.stdout and "Wave 2:" in proc.stdout
        assert "Critical path: a → b" in proc.stdout
        assert "Start order: a, b" in proc.stdout
        assert "test-agent --echo  (prompt on stdin)" in proc.stdout
        assert "/bin/sh -c <prompt>" in proc.stdout
    after = sorted(p.relative_to(project.root) for p in project.root.rglob("*"))
    assert before == after
    assert not project.events()


def test_usage_errors_exit_2(project: Project) -> None:
    assert project.run().returncode == 2
    assert project.run("t.yaml", "--max-parallel", "0").returncode == 2
    assert project.run("t.yaml", "--on-failure", "explode").returncode == 2
    proc = project.run("missing.yaml")
    assert proc.returncode == 2 and "missing.yaml: error: file not found" in proc.stderr


def test_schema_is_valid_json_schema(project: Project) -> None:
    proc = project.run("schema")
    assert proc.returncode == 0
    schema = json.loads(proc.stdout)
    assert schema["title"] == "parallel-dispatch task file"
    assert set(schema["properties"]) == {"name", "description", "tasks", "settings"}
    assert schema["additionalProperties"] is False


def test_console_script_and_version() -> None:
    exe = Path(sys.executable).parent / "parallel-dispatch"
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("parallel-dispatch ")


def test_interrupt_kills_agents_and_writes_partial_report(project: Project) -> None:
    project.config()
    pids = [project.root / f"p{i}.pid" for i in range(2)]
    gc = project.root / "gc.pid"
    project.write("t.yaml", f"""\
        tasks:
          - {{id: quick, agent: w, prompt: 'x', output: q.md}}
          - {{id: h0, agent: w, prompt: 'pidfile={pids[0]} grandchild={gc} hang', output: h0.md}}
          - {{id: h1, agent: w, prompt: 'pidfile={pids[1]} hang', output: h1.md}}
          - {{id: later, agent: w, prompt: x, output: l.md, dependencies: [h0]}}
    """)
    proc = subprocess.Popen([sys.executable, "-m", "parallel_dispatch", "t.yaml"],
                            cwd=project.root, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    quick = project.root / ".aiwg/working/q.md"
    assert wait_until(lambda: all(p.exists() for p in [*pids, gc, quick]), 60)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    report = project.report()
    assert report["status"] == "interrupted"
    t = {x["id"]: x for x in report["tasks"]}
    assert t["quick"]["status"] == "succeeded"
    assert t["h0"]["status"] == "cancelled" and t["h1"]["status"] == "cancelled"
    assert t["later"]["status"] == "skipped"
    for p in [*pids, gc]:
        assert wait_until(lambda p=p: not pid_alive(int(p.read_text())), 10)


def test_sigterm_is_an_interrupt_too(project: Project) -> None:
    project.config()
    pid = project.root / "p.pid"
    project.write("t.yaml", f"tasks:\n  - {{id: h, agent: w, prompt: 'pidfile={pid} hang', "
                            "output: h.md}\n")
    proc = subprocess.Popen([sys.executable, "-m", "parallel_dispatch", "t.yaml"],
                            cwd=project.root, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert wait_until(pid.exists, 60)
    proc.terminate()
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert not pid_alive(int(pid.read_text()))
    assert project.report()["tasks"][0]["status"] == "cancelled"


def test_settings_precedence(project: Project) -> None:
    project.write(".aiwg/dispatch.toml", """\
        [defaults]
        max_parallel = 7
        timeout_per_task = 5000
        on_failure = "retry"
        output_dir = "from-config/"
        max_retries = 9
    """)
    f = project.write("sub/dir/t.yaml", """\
        tasks:
          - {id: a, agent: shell, prompt: x, output: a}
        settings:
          max_parallel: 5
          timeout_per_task: 3000
    """)
    spec = load_spec(f)
    s = spec.settings
    assert (s.max_parallel, s.timeout_per_task, s.on_failure, s.max_retries) == (5, 3000,
                                                                                 "retry", 9)
    assert s.output_dir == project.root / "from-config"  # relative to the project root
    assert spec.root == project.root
    spec = load_spec(f, overrides={"max_parallel": 2, "output_dir": "cli-out",
                                   "timeout_per_task": None})
    assert spec.settings.max_parallel == 2 and spec.settings.timeout_per_task == 3000
    assert spec.settings.output_dir == project.root / "cli-out"
    (project.root / ".aiwg/dispatch.toml").unlink()
    s = load_spec(f).settings
    assert (s.max_parallel, s.timeout_per_task, s.on_failure, s.max_retries,
            s.retry_backoff) == (5, 3000, "continue", 3, 1.0)
    assert s.output_dir == project.root / ".aiwg/working"


def test_project_root_falls_back_to_cwd(tmp_path: Path) -> None:
    f = tmp_path / "t.yaml"
    f.write_text("tasks:\n  - {id: a, agent: shell, prompt: 'echo hi', output: a.txt}\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    proc = run_cli([str(f), "-q"], work, cli_env())
    assert proc.returncode == 0, proc.stderr
    assert (work / ".aiwg/working/a.txt").read_text() == "hi\n"


def test_plain_progress_lines(project: Project) -> None:
    project.config()
    project.write("t.yaml", "tasks:\n  - {id: a, agent: w, prompt: x, output: a.md}\n")
    proc = project.run("t.yaml")
    assert "▶ a [w]" in proc.stderr
    assert "✓ a succeeded" in proc.stderr and "[1/1]" in proc.stderr
    assert "finished: succeeded" in proc.stderr


def test_unwritable_output_dir_is_a_clear_usage_error(project: Project) -> None:
    project.write("t.yaml", "tasks:\n  - {id: a, agent: shell, prompt: 'echo hi', output: a}\n")
    blocker = project.write("blocker", "a file, not a folder\n")
    proc = project.run("t.yaml", "--output", str(blocker / "out"))
    assert proc.returncode == 2
    assert "cannot create the output dir" in proc.stderr and "--output" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bare_form_takes_options_before_the_task_file(project: Project) -> None:
    """`parallel-dispatch -q tasks.yaml` is the bare form too, not an unknown command."""
    project.config()
    project.write("t.yaml", "tasks:\n  - {id: a, agent: w, prompt: x, output: a.md}\n")
    proc = project.run("-q", "--max-parallel", "1", "t.yaml")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # -q: no progress
    assert (project.root / ".aiwg/working/a.md").exists()
    assert project.run("--version").stdout.startswith("parallel-dispatch ")
