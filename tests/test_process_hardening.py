"""Issue 9, items 10 and 15: no agent process outlives its task, and a cancelled run settles.

An agent's child that calls `setsid` leaves the agent's process group, so the group kill
misses it.  These tests run real agents that do exactly that and keep writing: to their
inherited stdout (the staged output file) and to `$DISPATCH_OUTPUT`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from parallel_dispatch.api import run_spec
from parallel_dispatch.loader import load_spec
from support import Project, cli_env, pid_alive, wait_until

WAIT = 30.0
pytestmark = pytest.mark.fresh_cli  # escapees and process groups: a real interpreter


@pytest.fixture(autouse=True)
def _kill_escapees(project: Project):  # type: ignore[no-untyped-def]
    """Whatever a test asserts, leave no escapee running on the machine."""
    yield
    pidfile = project.root / "escapee.pid"
    with contextlib.suppress(ValueError, OSError):
        os.kill(int(pidfile.read_text()), signal.SIGKILL)


ESCAPEE = """\
echo $$ > "$1"
while :; do echo leak; echo leak >> "$2"; sleep 0.02; done
"""


def _escapee_task(project: Project, pidfile: Path, *, clear_env: bool = False,
                  linger: str = "sleep 0.3", extra: str = "") -> str:
    """A shell task whose agent starts a `setsid` child that writes forever, then exits.

    The child writes to its stdout (the staged output file it inherited) and appends to
    `$DISPATCH_OUTPUT` by name."""
    script = project.write("escapee.sh", ESCAPEE)
    env_i = "env -i PATH=/usr/bin:/bin " if clear_env else ""
    return f"""\
        tasks:
          - id: leaky
            agent: shell
            output: out.txt{extra}
            prompt: |
              {env_i}setsid sh {script} {pidfile} "$DISPATCH_OUTPUT" &
              while [ ! -s {pidfile} ]; do sleep 0.01; done
              {linger}
              echo done
    """


def _output_settles(path: Path, escapee: int) -> tuple[str, str]:
    """The output when the run ended, and again once its only other writer, the escapee
    (a shell writing every 0.02 s while it lives), is seen dead: nobody is left to
    write, so no wait is needed to see a change."""
    first = path.read_text()
    assert not pid_alive(escapee), "the setsid child outlived the dispatcher"
    return first, path.read_text()


def test_setsid_child_is_killed_before_the_output_is_promoted(project: Project) -> None:
    pidfile = project.root / "escapee.pid"
    project.write("t.yaml", _escapee_task(project, pidfile))
    proc = project.run("t.yaml")
    assert proc.returncode == 0, proc.stderr
    escapee = int(pidfile.read_text())
    out_dir = project.root / ".aiwg/working"
    first, later = _output_settles(out_dir / "out.txt", escapee)
    assert first == later, "something kept writing into the promoted output"
    assert "done\n" in first  # (the escapee may write until it is killed, before promotion)
    assert not [p.name for p in out_dir.iterdir() if p.name.endswith(".partial")]


def test_setsid_child_with_a_cleared_environment_is_killed_at_run_end(
        project: Project) -> None:
    """Without the env marker, the dispatcher (a child subreaper) still finds it: the
    escapee is re-parented to it when the agent dies, and nothing else runs at run end."""
    pidfile = project.root / "escapee.pid"
    project.write("t.yaml", _escapee_task(project, pidfile, clear_env=True))
    proc = project.run("t.yaml")
    assert proc.returncode == 0, proc.stderr
    escapee = int(pidfile.read_text())
    first, later = _output_settles(project.root / ".aiwg/working/out.txt", escapee)
    assert first == later


def test_escapee_of_a_killed_dispatcher_is_killed_at_the_next_start(project: Project) -> None:
    pidfile = project.root / "escapee.pid"
    project.write("t.yaml", _escapee_task(project, pidfile, linger="sleep 600"))
    cli = subprocess.Popen([sys.executable, "-m", "parallel_dispatch", "-q", "t.yaml"],
                           cwd=project.root, env=cli_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: pidfile.exists() and pidfile.read_text().strip() != "", WAIT)
        escapee = int(pidfile.read_text())
    finally:
        cli.send_signal(signal.SIGKILL)
        cli.wait()
    try:
        assert pid_alive(escapee)  # outlived its dispatcher: nobody killed it yet
        project.write("other.yaml", """\
            tasks:
              - {id: a, agent: shell, prompt: "echo hi", output: a.txt}
        """)
        proc = project.run("other.yaml")
        assert proc.returncode == 0, proc.stderr
        assert wait_until(lambda: not pid_alive(escapee), 10)
    finally:
        if pid_alive(escapee):
            os.kill(escapee, signal.SIGKILL)


def test_no_agent_process_survives_a_timeout(project: Project) -> None:
    """The deadline path: the agent is cancelled, its escapee must die with it."""
    pidfile = project.root / "escapee.pid"
    project.write("t.yaml", _escapee_task(project, pidfile, linger="sleep 600",
                                             extra="\n            timeout: 1500"))
    proc = project.run("t.yaml")
    assert proc.returncode == 1, proc.stderr
    escapee = int(pidfile.read_text())
    assert not (project.root / ".aiwg/working/out.txt").exists()
    failed = project.root / ".aiwg/working/logs/leaky.failed.out"
    first, later = _output_settles(failed, escapee)
    assert first == later


_IN_PROCESS_RUN = """\
import json, os, sys, trio
from parallel_dispatch.api import run_spec
from parallel_dispatch.loader import load_spec

def zombie_children():
    out = []
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as fh:
            for pid in fh.read().split():
                try:
                    with open(f"/proc/{pid}/stat") as st:
                        if st.read().rsplit(")", 1)[1].split()[0] == "Z":
                            out.append(int(pid))
                except OSError:
                    pass
    return out

spec = load_spec(sys.argv[1], cwd=sys.argv[2])
result = trio.run(lambda: run_spec(spec))
print(json.dumps({"status": str(result.status), "zombies": zombie_children(),
                  "errors": [r.error for r in result.records]}))
"""


def test_in_process_run_kills_escapees_and_leaves_no_zombie(project: Project) -> None:
    """As a subreaper the dispatcher adopts its agents' orphans: it must also reap them.

    The run happens in a fresh interpreter, so every child it has is the run's: a zombie
    left by another test in this pytest worker cannot be mistaken for ours."""
    pidfile = project.root / "escapee.pid"
    project.write("t.yaml", _escapee_task(project, pidfile).replace(
        "echo done", "sleep 30 & echo done"))  # a group member still running at exit
    proc = subprocess.run([sys.executable, "-c", _IN_PROCESS_RUN, str(project.root / "t.yaml"),
                           str(project.root)], env=cli_env(), capture_output=True, text=True,
                          timeout=4 * WAIT)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.splitlines()[-1])
    assert seen["status"] == "succeeded", seen["errors"]
    assert not pid_alive(int(pidfile.read_text()))
    assert seen["zombies"] == []


# -- item 15: a run cancelled from outside still settles every task -------------------------
def _run_cancelled_after(project: Project, seconds: float) -> dict[str, Any]:
    """Run t.yaml in process, cancel it from outside after `seconds`, return its report."""
    spec = load_spec(project.root / "t.yaml", cwd=project.root)

    async def main() -> None:
        with trio.move_on_after(seconds):
            await run_spec(spec)

    trio.run(main)
    report: dict[str, Any] = json.loads(
        (project.root / ".aiwg/working/dispatch-report.json").read_text())
    return report


def test_cancelled_run_spec_reports_no_running_or_pending_task(project: Project) -> None:
    project.write("t.yaml", """\
        tasks:
          - {id: slow, agent: shell, prompt: "sleep 600", output: slow.txt}
          - {id: after, agent: shell, prompt: "echo hi", output: after.txt,
             dependencies: [slow]}
          - {id: quick, agent: shell, prompt: "echo hi", output: quick.txt}
    """)
    report = _run_cancelled_after(project, 3)
    statuses = {t["id"]: t["status"] for t in report["tasks"]}
    assert statuses == {"slow": "cancelled", "after": "skipped", "quick": "succeeded"}, statuses
    assert report["status"] != "running"


@pytest.mark.parametrize("where", ["waiting", "backoff"])
def test_cancel_while_queued_or_in_backoff_settles(project: Project, where: str) -> None:
    body = ("- {id: a, agent: shell, prompt: 'exit 3', output: a.txt, retries: 5}\n"
            if where == "backoff" else
            "- {id: a, agent: shell, prompt: 'sleep 600', output: a.txt}\n"
            "  - {id: b, agent: shell, prompt: 'sleep 600', output: b.txt}\n")
    project.write("t.yaml", "settings: {max_parallel: 1, retry_backoff: 600}\ntasks:\n  " + body)
    report = _run_cancelled_after(project, 2)
    assert {t["status"] for t in report["tasks"]} <= {"cancelled", "skipped", "failed"}, report
