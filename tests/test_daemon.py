"""The daemon as a real subprocess in a temporary project."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import Project, cli_env, pid_alive, wait_until
from warmcli import run_cli

WAIT = 60.0


class Daemon:
    def __init__(self, project: Project, *args: str, env: dict[str, str] | None = None) -> None:
        self.project = project
        self.log = project.root / f"daemon-{time.monotonic_ns()}.log"
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "parallel_dispatch", "watch", str(project.root), *args],
                stdout=subprocess.DEVNULL, stderr=err, env=env or cli_env())

    def text(self) -> str:
        return self.log.read_text()

    def wait_log(self, needle: str, count: int = 1) -> None:
        assert wait_until(lambda: self.text().count(needle) >= count, WAIT), (
            f"never saw {needle!r} x{count}:\n{self.text()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=WAIT)


@pytest.fixture
def daemons(project: Project) -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


def report(project: Project, name: str) -> dict[str, object] | None:
    try:
        return json.loads((project.root / ".aiwg/working" / name / "dispatch-report.json")
                          .read_text())
    except (OSError, ValueError):
        return None


def wait_report(project: Project, name: str, after: str | None = None,
                status: tuple[str, ...] = ("succeeded", "failed")) -> dict[str, object]:
    """The next finished report of `name` whose run id differs from `after`."""
    def ready() -> bool:
        r = report(project, name)
        return bool(r and r.get("status") in status and (after is None or r.get("run_id") != after))
    assert wait_until(ready, WAIT), f"no new report for {name}: {report(project, name)}"
    r = report(project, name)
    assert r is not None
    return r


def starts(project: Project) -> list[str]:
    """Agents started since the last call (and reset)."""
    got = sorted(str(e["task"]) for e in project.events() if e["event"] == "start")
    project.agent_log.unlink(missing_ok=True)
    return got


PIPELINE = """\
tasks:
  - {id: a, agent: w, prompt: "%s", output: a.md}
  - {id: b, agent: w, prompt: "x", output: b.md, dependencies: [a]}
  - {id: c, agent: w, prompt: "%s", output: c.md}
"""


def test_drop_edit_and_incremental_rerun(project: Project, daemons: list[Daemon]) -> None:
    project.config()
    d = Daemon(project)
    daemons.append(d)
    d.wait_log("watching")
    project.write(".aiwg/tasks/pipe.yaml", PIPELINE % ("v1", "x"))
    r1 = wait_report(project, "pipe")
    assert r1["status"] == "succeeded"
    out = project.root / ".aiwg/working/pipe"
    assert (out / "b.md").exists() and (out / "dispatch-report.md").exists()
    assert starts(project) == ["a", "b", "c"]

    # Edit one prompt: only it and its dependents re-run; the rest is cached.
    project.write(".aiwg/tasks/pipe.yaml", PIPELINE % ("v2", "x"))
    r2 = wait_report(project, "pipe", after=str(r1["run_id"]))
    assert starts(project) == ["a", "b"]
    st = {t["id"]: t["status"] for t in r2["tasks"]}  # type: ignore[index, union-attr]
    assert st == {"a": "succeeded", "b": "succeeded", "c": "cached"}
    assert "v2" in (out / "a.md").read_text()
    assert d.stop() == 0


def test_invalid_file_gets_an_error_report_and_the_daemon_goes_on(
        project: Project, daemons: list[Daemon]) -> None:
    project.config()
    d = Daemon(project)
    daemons.append(d)
    d.wait_log("watching")
    project.write(".aiwg/tasks/bad.yaml", """\
        tasks:
          - {id: a, agent: w, prompt: x, output: a.md, dependencies: [nope]}
    """)
    bad = wait_report(project, "bad", status=("invalid",))
    assert "unknown dependency 'nope'" in bad["errors"][0]["message"]  # type: ignore[index]
    assert bad["errors"][0]["line"] == 2  # type: ignore[index]
    md = (project.root / ".aiwg/working/bad/dispatch-report.md").read_text()
    assert "bad.yaml:2:" in md and "nothing was run" in md
    assert "unknown dependency 'nope'" in d.text()
    project.write(".aiwg/tasks/good.yaml", one_task("g", "x"))
    assert wait_report(project, "good")["status"] == "succeeded"
    assert d.proc.poll() is None


def test_rapid_saves_give_one_run_of_the_final_version(
        project: Project, daemons: list[Daemon]) -> None:
    project.config()
    d = Daemon(project)
    daemons.append(d)
    d.wait_log("watching")
    target = project.root / ".aiwg/tasks/burst.yaml"
    for i in range(10):
        target.write_text(f"tasks:\n  - {{id: t, agent: w, prompt: 'version{i}', output: t.md}}\n")
    r = wait_report(project, "burst")
    d.wait_log("[burst] settled")  # nothing left to run: a second (wrong) run would be due
    assert starts(project) == ["t"]
    assert "version9" in (project.root / ".aiwg/working/burst/t.md").read_text()
    assert report(project, "burst")["run_id"] == r["run_id"]  # type: ignore[index]


def test_atomic_rename_save_and_ignored_temp_files(project: Project,
                                                   daemons: list[Daemon]) -> None:
    project.config()
    d = Daemon(project)
    daemons.append(d)
    d.wait_log("watching")
    tasks = project.root / ".aiwg/tasks"
    for junk in ("x.yaml.tmp", ".x.yaml.swp", "x.yaml~", "notes.txt"):
        (tasks / junk).write_text("tasks: [broken\n")
    tmp = tasks / ".save.yaml.tmp"
    tmp.write_text("tasks:\n  - {id: t, agent: w, prompt: renamed, output: t.md}\n")
    os.replace(tmp, tasks / "saved.yaml")
    assert wait_report(project, "saved")["status"] == "succeeded"
    assert sorted(p.name for p in (project.root / ".aiwg/working").iterdir()) == ["saved"]


def test_change_during_a_run_kills_the_old_agents(project: Project,
                                                  daemons: list[Daemon]) -> None:
    project.config()
    d = Daemon(project)
    daemons.append(d)
    d.wait_log("watching")
    pid, gc = project.root / "old.pid", project.root / "old-gc.pid"
    project.write(".aiwg/tasks/long.yaml", f"""\
        tasks:
          - {{id: t, agent: w, prompt: "pidfile={pid} grandchild={gc} hang", output: t.md}}
    """)
    assert wait_until(lambda: pid.exists() and gc.exists(), WAIT)
    project.write(".aiwg/tasks/long.yaml", one_task("t", "new"))
    r = wait_report(project, "long")
    assert r["status"] == "succeeded"
    assert "new" in (project.root / ".aiwg/working/long/t.md").read_text()
    for f in (pid, gc):
        assert wait_until(lambda f=f: not pid_alive(int(f.read_text())), 10)
    assert "task file changed" in d.text()


def test_deleted_file_cancels_its_run_and_keeps_outputs(project: Project,
                                                        daemons: list[Daemon]) -> None:
    project.config()
    d = Daemon(project)
    daemons.append(d)
    d.wait_log("watching")
    f = project.write(".aiwg/tasks/del.yaml", one_task("t", "x"))
    wait_report(project, "del")
    pid = project.root / "h.pid"
    f.write_text(f"tasks:\n  - {{id: t, agent: w, prompt: 'pidfile={pid} hang', output: t.md}}\n")
    assert wait_until(pid.exists, WAIT)
    f.unlink()
    assert wait_until(lambda: not pid_alive(int(pid.read_text())), WAIT)
    d.wait_log("deleted; its outputs stay")
    assert (project.root / ".aiwg/working/del/t.md").exists()


def test_sigterm_leaves_no_agent_and_writes_partial_report(project: Project,
                                                           daemons: list[Daemon]) -> None:
    project.config()
    d = Daemon(project)
    daemons.append(d)
    d.wait_log("watching")
    pid, gc = project.root / "p.pid", project.root / "gc.pid"
    project.write(".aiwg/tasks/hang.yaml", f"""\
        tasks:
          - {{id: t, agent: w, prompt: "pidfile={pid} grandchild={gc} hang", output: t.md}}
    """)
    assert wait_until(lambda: pid.exists() and gc.exists(), WAIT)
    t0 = time.monotonic()
    assert d.stop(signal.SIGTERM) == 0
    took = time.monotonic() - t0
    for f in (pid, gc):
        assert not pid_alive(int(f.read_text()))
    r = report(project, "hang")
    assert r is not None and r["status"] == "interrupted"
    assert r["tasks"][0]["status"] == "cancelled"  # type: ignore[index]
    assert took < 30  # "a few seconds"; the real number is in BENCHMARKS.md


def test_sigterm_with_queued_work_starts_nothing_more(project: Project,
                                                      daemons: list[Daemon]) -> None:
    """A task waiting for a global slot must not start during shutdown."""
    project.config()
    d = Daemon(project, "--max-parallel", "1")
    daemons.append(d)
    d.wait_log("watching")
    pid = project.root / "first.pid"
    project.write(".aiwg/tasks/one.yaml", one_task("first", f"pidfile={pid} hang"))
    assert wait_until(pid.exists, WAIT)
    project.write(".aiwg/tasks/two.yaml", one_task("second", "hang"))
    d.wait_log("[two] dispatch")  # its run is up, its task queued behind the global slot
    t0 = time.monotonic()
    assert d.stop(signal.SIGTERM) == 0
    took = time.monotonic() - t0
    assert sorted(str(e["task"]) for e in project.events() if e["event"] == "start") == [
        "first"]
    two = report(project, "two")
    assert two is not None and two["tasks"][0]["status"] == "skipped"  # type: ignore[index]
    assert "not started" in two["tasks"][0]["reason"]  # type: ignore[index]
    assert took < 20, took  # well under the 120 s task timeout it would otherwise wait for


def test_sigkill_then_restart_resumes_without_losing_work(project: Project,
                                                          daemons: list[Daemon]) -> None:
    project.config()
    d = Daemon(project)
    daemons.append(d)
    d.wait_log("watching")
    pid = project.root / "slow.pid"
    released = project.root / "release"
    project.write(".aiwg/tasks/crash.yaml", f"""\
        tasks:
          - {{id: quick1, agent: w, prompt: x, output: q1.md}}
          - {{id: quick2, agent: w, prompt: x, output: q2.md}}
          - {{id: slow, agent: w, prompt: "pidfile={pid} hang-unless={released}", output: s.md,
             dependencies: [quick1]}}
          - {{id: after, agent: w, prompt: x, output: after.md, dependencies: [slow]}}
    """)
    out = project.root / ".aiwg/working/crash"
    assert wait_until(lambda: pid.exists() and (out / "q2.md").exists(), WAIT)
    first = {p.name: p.read_text() for p in out.glob("q*.md")}
    d.proc.kill()
    d.proc.wait()
    orphan = int(pid.read_text())
    assert pid_alive(orphan)  # the agent outlived its dispatcher ...
    starts(project)
    # ... until the next daemon starts: it reaps the orphan and resumes the same file.
    released.touch()  # (the re-run of `slow` will finish; the orphan never re-checks)
    pid.unlink()
    d2 = Daemon(project)
    daemons.append(d2)
    r = wait_report(project, "crash")
    assert not pid_alive(orphan)
    assert "orphaned agent" in d2.text()
    st = {t["id"]: t["status"] for t in r["tasks"]}  # type: ignore[index, union-attr]
    assert st == {"quick1": "cached", "quick2": "cached", "slow": "succeeded",
                  "after": "succeeded"}
    assert starts(project) == ["after", "slow"]
    assert {p.name: p.read_text() for p in out.glob("q*.md")} == first
    import tomllib

    tomllib.loads((out / ".dispatch-state.toml").read_text())  # never half-written


def test_restart_skips_up_to_date_files(project: Project, daemons: list[Daemon]) -> None:
    project.config()
    project.write(".aiwg/tasks/done.yaml", one_task("t", "x"))
    d = Daemon(project)
    daemons.append(d)
    wait_report(project, "done")
    assert d.stop() == 0
    starts(project)
    d2 = Daemon(project)
    daemons.append(d2)
    d2.wait_log("[done] up to date")
    assert starts(project) == []
    d2.stop()
    d3 = Daemon(project, "--force")
    daemons.append(d3)
    d3.wait_log("[done] run ")
    assert starts(project) == ["t"]


def test_files_glob_change_reruns_only_affected_tasks(project: Project,
                                                      daemons: list[Daemon]) -> None:
    project.config()
    doc = project.write("docs/sad.md", "v1\n")
    project.write(".aiwg/tasks/rev.yaml", """\
        tasks:
          - {id: review, agent: shell, prompt: "cat docs/sad.md", output: r.md,
             files: ["docs/*.md"]}
          - {id: summary, agent: w, prompt: x, output: s.md, dependencies: [review]}
          - {id: other, agent: w, prompt: x, output: o.md}
    """)
    d = Daemon(project)
    daemons.append(d)
    r1 = wait_report(project, "rev")
    assert starts(project) == ["other", "summary"]
    d.wait_log("watching")
    doc.write_text("v2\n")
    r2 = wait_report(project, "rev", after=str(r1["run_id"]))
    st = {t["id"]: t["status"] for t in r2["tasks"]}  # type: ignore[index, union-attr]
    assert st == {"review": "succeeded", "summary": "succeeded", "other": "cached"}
    assert starts(project) == ["summary"]
    assert (project.root / ".aiwg/working/rev/r.md").read_text() == "v2\n"


def test_unchanged_output_stops_the_rerun_early(project: Project,
                                                daemons: list[Daemon]) -> None:
    """A re-run task whose output comes out identical leaves its dependents cached."""
    project.config()
    doc = project.write("docs/sad.md", "v1\n")
    project.write(".aiwg/tasks/rev.yaml", """\
        tasks:
          - {id: review, agent: shell, prompt: "wc -l < docs/sad.md", output: r.md,
             files: ["docs/*.md"]}
          - {id: summary, agent: w, prompt: x, output: s.md, dependencies: [review]}
    """)
    d = Daemon(project)
    daemons.append(d)
    r1 = wait_report(project, "rev")
    d.wait_log("watching")
    doc.write_text("v2, still one line\n")
    r2 = wait_report(project, "rev", after=str(r1["run_id"]))
    st = {t["id"]: t["status"] for t in r2["tasks"]}  # type: ignore[index, union-attr]
    assert st == {"review": "succeeded", "summary": "cached"}


def one_task(tid: str, prompt: str, output: str = "t.md", agent: str = "w") -> str:
    return f"tasks:\n  - {{id: {tid}, agent: {agent}, prompt: '{prompt}', output: {output}}}\n"


def test_two_files_run_at_once_without_collisions(project: Project,
                                                  daemons: list[Daemon]) -> None:
    project.config()
    d = Daemon(project, "--max-parallel", "2")
    daemons.append(d)
    d.wait_log("watching")
    project.write(".aiwg/tasks/one.yaml", one_task("first", "sleep=2", "same.md"))
    project.write(".aiwg/tasks/two.yaml", one_task("second", "sleep=2", "same.md"))
    wait_report(project, "one")
    wait_report(project, "two")
    spans = project.spans()
    (s1, e1), (s2, e2) = spans["first"], spans["second"]
    assert s1 < e2 and s2 < e1  # they overlapped
    for name, tid in (("one", "first"), ("two", "second")):
        assert f"for {tid}" in (project.root / ".aiwg/working" / name / "same.md").read_text()


def test_global_limit_applies_across_files(project: Project, daemons: list[Daemon]) -> None:
    project.config()
    d = Daemon(project, "--max-parallel", "1")
    daemons.append(d)
    d.wait_log("watching")
    project.write(".aiwg/tasks/one.yaml", one_task("first", "sleep=0.5"))
    project.write(".aiwg/tasks/two.yaml", one_task("second", "sleep=0.5"))
    wait_report(project, "one")
    wait_report(project, "two")
    (s1, e1), (s2, e2) = project.spans()["first"], project.spans()["second"]
    assert e1 <= s2 or e2 <= s1  # never both at once


def test_sd_notify_and_sighup_reload(project: Project, daemons: list[Daemon],
                                     tmp_path_factory: pytest.TempPathFactory) -> None:
    sock_dir = tmp_path_factory.mktemp("notify")
    addr = str(sock_dir / "notify.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(addr)
    server.settimeout(WAIT)
    project.config()
    env = cli_env()
    env.update(NOTIFY_SOCKET=addr, WATCHDOG_USEC="2000000")
    d = Daemon(project, env=env)
    daemons.append(d)

    def receive_until(prefix: str) -> list[str]:
        seen = []
        while True:
            msg = server.recv(4096).decode()
            seen.append(msg)
            if msg.startswith(prefix) or f"\n{prefix}" in msg:
                return seen

    first = receive_until("READY=1")
    assert any(m.startswith("STATUS=") for m in first) or "STATUS=" in first[-1]
    assert "WATCHDOG=1" in receive_until("WATCHDOG=1")[-1]
    # Agents never see the notify socket.
    project.write(".aiwg/tasks/env.yaml", """\
        tasks:
          - {id: e, agent: shell, prompt: 'echo "[$NOTIFY_SOCKET][$WATCHDOG_USEC]"', output: e.txt}
    """)
    wait_report(project, "env")
    assert (project.root / ".aiwg/working/env/e.txt").read_text() == "[][]\n"
    # SIGHUP reloads the config: a new command for agent `w` takes effect.
    project.write(".aiwg/dispatch.toml", """\
        [agents.w]
        command = ["/bin/sh", "-c", "echo reloaded-config"]
    """)
    d.proc.send_signal(signal.SIGHUP)
    msgs = receive_until("READY=1")
    reload_msg = next(m for m in msgs if "RELOADING=1" in m)
    assert "MONOTONIC_USEC=" in reload_msg
    assert msgs.index(reload_msg) < len(msgs) - 1
    project.write(".aiwg/tasks/after.yaml", one_task("t", "x"))
    wait_report(project, "after")
    assert (project.root / ".aiwg/working/after/t.md").read_text() == "reloaded-config\n"
    assert d.stop() == 0
    assert "STOPPING=1" in "".join(receive_until("STOPPING=1"))
    server.close()


def test_status_command(project: Project, daemons: list[Daemon]) -> None:
    project.config()
    project.write(".aiwg/tasks/s.yaml", one_task("t", "x"))
    d = Daemon(project)
    daemons.append(d)
    wait_report(project, "s")
    out = run_cli(["status", str(project.root)], project.root, cli_env())
    assert out.returncode == 0
    assert "daemon: running" in out.stdout
    assert "last run: succeeded" in out.stdout and "1 succeeded" in out.stdout
    d.stop()
    out = run_cli(["status", str(project.root)], project.root, cli_env())
    assert "daemon: not running" in out.stdout


def test_agent_definition_change_reruns_its_tasks(project: Project, daemons: list[Daemon],
                                                  tmp_path: Path) -> None:
    """Claude Code agents (the fake `claude` first on PATH): editing a definition re-runs
    the tasks that use it, and only those."""
    from preset_support import make_agent_project

    ap = make_agent_project(project, tmp_path)
    ap.define("security-architect", body="You review security. v1")
    project.write(".aiwg/tasks/defs.yaml", """\
        tasks:
          - {id: sec, agent: security-architect, prompt: "Review it", output: sec.md}
          - {id: sh, agent: shell, prompt: "echo plain", output: sh.txt}
    """)
    d = Daemon(project, env=ap.env)
    daemons.append(d)
    r1 = wait_report(project, "defs")
    assert r1["status"] == "succeeded", r1
    assert len(ap.calls("claude")) == 1
    d.wait_log("watching")
    ap.define("security-architect", body="You review security. v2")
    r2 = wait_report(project, "defs", after=str(r1["run_id"]))
    st = {t["id"]: t["status"] for t in r2["tasks"]}  # type: ignore[index, union-attr]
    assert st == {"sec": "succeeded", "sh": "cached"}
    calls = ap.calls("claude")
    assert len(calls) == 2 and "v2" in json.dumps(calls[-1])
