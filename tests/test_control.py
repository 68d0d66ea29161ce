"""The control socket (issue 13 §1): real CLI runs and a real daemon, real sockets.

Agents are shell tasks whose script carries a unique marker, so a test finds their
processes in /proc and can check that a cancel left none of their process group alive.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from parallel_dispatch import control
from parallel_dispatch.api import new_result
from parallel_dispatch.control import ControlError
from parallel_dispatch.quota import Governor
from parallel_dispatch.result import RunResult
from parallel_dispatch.scheduler import Refused, Scheduler
from support import Project, cli_env, wait_until
from test_quota import limited
from test_scheduler_events import Script, ScriptedRunner, Step, _rec, _spec

WAIT = 60.0
pytestmark = pytest.mark.fresh_cli  # process groups and sockets: real interpreters


def marker() -> str:
    return f"pdctl-{uuid.uuid4().hex[:12]}"


def marked_pids(mark: str) -> list[int]:
    """Processes whose argv holds `mark`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    if mark.encode() in fh.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                members.append(int(entry))
    return members


def pgid_of(pid: int) -> int:
    fields = _stat(pid)
    assert fields is not None, f"process {pid} is gone"
    return int(fields[2])


def _task(tid: str, script: str, deps: str) -> str:
    prompt = json.dumps(script)
    return f"  - {{id: {tid}, agent: shell, output: {tid}.txt{deps}, prompt: {prompt}}}\n"


def slow_task(tid: str, mark: str, *, deps: str = "", unless: Path | None = None) -> str:
    """A task that runs until killed (a shell plus a `sleep` child in its group); with
    `unless`, it succeeds at once when that file exists."""
    script = f": {mark}; sleep 600 & wait"
    if unless is not None:
        script = f"if [ -e {unless} ]; then echo fine; else {script}; fi"
    return _task(tid, script, deps)


def gated_task(tid: str, gate: Path, *, deps: str = "") -> str:
    """A task that ends once `gate` exists."""
    script = f"while [ ! -e {gate} ]; do sleep 0.05; done; echo {tid}"
    return _task(tid, script, deps)


def counted_task(tid: str, log: Path, *, deps: str = "") -> str:
    """A task that appends its id to `log` each time it runs."""
    script = f"echo {tid} >> {log}; echo {tid}"
    return _task(tid, script, deps)


class CliRun:
    """`parallel-dispatch run --control FILE` as a real process."""

    def __init__(self, project: Project, task_file: str, *args: str) -> None:
        self.project = project
        self.err = project.root / f"run-{time.monotonic_ns()}.err"
        with open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "parallel_dispatch", "run", "--control", task_file,
                 *args], cwd=project.root, stdout=subprocess.PIPE, stderr=err, text=True,
                env=cli_env())
        self.socket = project.root / ".aiwg" / "run" / f"run-{self.proc.pid}.sock"

    def tasks(self) -> dict[str, dict[str, Any]]:
        """Its run's tasks, asked on its socket (empty until it listens)."""
        if not self.socket.exists():
            return {}
        try:
            reply = control.request(self.socket, {"op": "list"})
        except ControlError:
            return {}
        return {t["id"]: t for r in reply["runs"] for t in r["tasks"]}

    def wait_status(self, task: str, *statuses: str) -> None:
        assert wait_until(lambda: self.tasks().get(task, {}).get("status") in statuses, WAIT), (
            f"{task} never {statuses}: {self.tasks().get(task)}\n{self.err.read_text()}")

    def finish(self) -> int:
        self.proc.wait(timeout=WAIT)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return self.proc.returncode


def stop(proc: subprocess.Popen[str], sig: signal.Signals) -> None:
    """Ends a dispatcher a test started: `sig`, then SIGKILL if it does not go in time."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def runs() -> Iterator[list[CliRun]]:
    started: list[CliRun] = []
    yield started
    for r in started:
        stop(r.proc, signal.SIGINT)
        if r.proc.stdout is not None:
            r.proc.stdout.close()


def cli(project: Project, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "parallel_dispatch", *args], cwd=project.root,
                          capture_output=True, text=True, env=cli_env(), timeout=WAIT * 2)


def test_cancel_one_running_task(project: Project, runs: list[CliRun]) -> None:
    mark, gate = marker(), project.root / "gate"
    project.write("t.yaml", "tasks:\n" + slow_task("slow", mark)
                  + counted_task("after", project.root / "after.log", deps=", dependencies: [slow]")
                  + gated_task("other", gate))
    run = CliRun(project, "t.yaml")
    runs.append(run)
    run.wait_status("slow", "running")
    run.wait_status("other", "running")
    assert wait_until(lambda: bool(marked_pids(mark)), WAIT)
    group = pgid_of(marked_pids(mark)[0])
    assert len(group_members(group)) >= 2  # the shell and its sleep

    done = cli(project, "cancel", "t.yaml", "slow")
    assert done.returncode == 0, done.stderr
    assert "slow" in done.stdout and "cancelled" in done.stdout
    assert "skipped, as they depend on it: after" in done.stdout
    # The reply comes once the task is settled: its whole process group is gone.
    assert wait_until(lambda: not group_members(group), WAIT), group_members(group)
    tasks = run.tasks()
    assert tasks["slow"]["status"] == "cancelled"
    assert tasks["slow"]["reason"].startswith("cancelled by parallel-dispatch cancel (pid ")
    assert tasks["after"]["status"] == "skipped"
    assert tasks["other"]["status"] == "running"  # unaffected

    again = cli(project, "cancel", "t.yaml", "slow")
    assert again.returncode == 1
    assert "task 'slow' already finished (cancelled)" in again.stderr

    gate.touch()
    assert run.finish() == 1  # a task did not succeed
    report = project.report()
    st = {t["id"]: t for t in report["tasks"]}  # type: ignore[union-attr]
    assert report["status"] == "failed"
    assert st["slow"]["status"] == "cancelled"
    assert st["slow"]["reason"] == tasks["slow"]["reason"]
    assert st["after"]["status"] == "skipped"
    assert st["after"]["reason"] == "dependency 'slow' was cancelled"
    assert st["other"]["status"] == "succeeded"
    assert not (project.root / "after.log").exists()  # never started
    md = (project.root / ".aiwg/working/dispatch-report.md").read_text()
    assert "### slow — cancelled" in md and tasks["slow"]["reason"] in md
    assert not marked_pids(mark)


def test_cancel_a_waiting_task_and_a_whole_run(project: Project, runs: list[CliRun]) -> None:
    mark, gate = marker(), project.root / "gate"
    project.write("t.yaml", "tasks:\n" + slow_task("a", mark) + slow_task("b", mark)
                  + gated_task("queued", gate, deps=", dependencies: [a]")
                  + slow_task("c", mark))
    run = CliRun(project, "t.yaml", "--max-parallel", "2")
    runs.append(run)
    run.wait_status("a", "running")
    run.wait_status("b", "running")

    # `c` waits for a slot: cancelled where it is, it never starts.
    reply = control.cancel(project.root, "t.yaml", "c", by="the test")
    assert reply["status"] == "cancelled" and reply["reason"] == "cancelled by the test"
    assert run.tasks()["c"]["attempts"] == 0
    # "running" is said as the attempt starts; its shell may not have exec'd yet on a busy box
    assert wait_until(lambda: len({pgid_of(p) for p in marked_pids(mark)}) == 2, WAIT)
    groups = {pgid_of(p) for p in marked_pids(mark)}

    run_id = reply["run_id"]
    done = cli(project, "cancel", run_id)  # by run id this time
    assert done.returncode == 0, done.stderr
    assert f"run {run_id} cancelled" in done.stdout
    assert wait_until(lambda: not any(group_members(g) for g in groups), WAIT)
    assert run.finish() == 130
    st = {t["id"]: t for t in project.report()["tasks"]}  # type: ignore[union-attr]
    assert st["a"]["status"] == st["b"]["status"] == "cancelled"
    assert st["a"]["error"].startswith("cancelled: the run was cancelled by parallel-dispatch")
    assert st["queued"]["status"] == "skipped"
    assert st["c"]["status"] == "cancelled" and st["c"]["reason"] == "cancelled by the test"
    assert project.report()["status"] == "interrupted"
    assert not (project.root / ".aiwg/run" / run.socket.name).exists()  # removed on exit


def test_rerun_a_finished_task_in_a_live_run(project: Project, runs: list[CliRun]) -> None:
    log, gate = project.root / "runs.log", project.root / "gate"
    project.write("t.yaml", "tasks:\n" + counted_task("first", log)
                  + counted_task("second", log, deps=", dependencies: [first]")
                  + gated_task("gate", gate))
    run = CliRun(project, "t.yaml")
    runs.append(run)
    run.wait_status("second", "succeeded")

    with pytest.raises(ControlError, match="task 'gate' has not finished") as info:
        control.rerun(project.root, "t.yaml", "gate")
    assert info.value.kind == "refused"
    reply = control.rerun(project.root, "t.yaml", "first")
    assert reply["reopened"] == ["first", "second"] and reply["new_run"] is False
    assert wait_until(lambda: log.read_text().split() == ["first", "second"] * 2, WAIT), (
        log.read_text())
    run.wait_status("second", "succeeded")
    gate.touch()
    assert run.finish() == 0
    st = {t["id"]: t["status"] for t in project.report()["tasks"]}  # type: ignore[union-attr]
    assert st == {"first": "succeeded", "second": "succeeded", "gate": "succeeded"}


def test_the_socket_is_private_and_survives_bad_requests(project: Project,
                                                         runs: list[CliRun]) -> None:
    gate = project.root / "gate"
    project.write("t.yaml", "tasks:\n" + gated_task("waits", gate))
    run = CliRun(project, "t.yaml")
    runs.append(run)
    run.wait_status("waits", "running")
    assert stat.S_IMODE(os.stat(run.socket).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(run.socket.parent).st_mode) == 0o700

    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(WAIT)
        s.connect(str(run.socket))
        f = s.makefile("rwb")

        def ask(raw: bytes) -> dict[str, Any]:
            f.write(raw)
            f.flush()
            reply: dict[str, Any] = json.loads(f.readline())
            return reply

        garbage = ask(b"this is not json\n")
        assert garbage["ok"] is False and garbage["kind"] == "bad_request"
        assert garbage["error"].startswith("not JSON: ")
        assert ask(b"[1, 2]\n")["error"].startswith("a request is a JSON object")
        bad_op = ask(b'{"op": "lsit"}\n')
        assert bad_op["ok"] is False and "did you mean 'list'?" in bad_op["error"]
        unknown = ask(b'{"op": "cancel_task", "run": "t.yaml", "task": "wait"}\n')
        assert unknown["kind"] == "unknown" and "did you mean 'waits'?" in unknown["error"]
        assert ask(b'{"op": "list"}\n')["ok"] is True  # the same connection still serves
        huge = ask(b"x" * (control.MAX_REQUEST_BYTES + 10))
        assert huge["ok"] is False and "longer than" in huge["error"]
        assert f.readline() == b""  # that connection is closed
    # ... and the server keeps serving new ones.
    assert control.request(run.socket, {"op": "list"})["ok"] is True
    gate.touch()
    assert run.finish() == 0


def test_status_json_and_errors_without_a_dispatcher(project: Project,
                                                     runs: list[CliRun]) -> None:
    (project.root / ".aiwg/run").mkdir(mode=0o700)
    stale = project.root / ".aiwg/run/run-999999.sock"
    with socket.socket(socket.AF_UNIX) as s:  # a socket nobody listens on any more
        s.bind(str(stale))
    nobody = cli(project, "cancel", "t.yaml", "x")
    assert nobody.returncode == 2
    assert "no dispatcher is running for" in nobody.stderr
    assert not stale.exists()  # cleaned up by whoever found it

    gate = project.root / "gate"
    project.write("t.yaml", "tasks:\n" + gated_task("waits", gate))
    run = CliRun(project, "t.yaml")
    runs.append(run)
    run.wait_status("waits", "running")
    live = json.loads(cli(project, "status", "--json").stdout)
    assert live["live"] is True
    [now] = live["runs"]
    assert now["file"] == str(project.root / "t.yaml") and now["status"] == "running"
    assert now["dispatcher"]["kind"] == "run" and now["dispatcher"]["pid"] == run.proc.pid
    assert [(t["id"], t["status"]) for t in now["tasks"]] == [("waits", "running")]
    wrong = cli(project, "cancel", "nope.yaml")
    assert wrong.returncode == 2 and "no run 'nope.yaml'" in wrong.stderr
    gate.touch()
    assert run.finish() == 0

    after = json.loads(cli(project, "status", "--json").stdout)
    assert after["live"] is False and after["runs"] == []
    [last] = after["last_runs"]
    assert last["run_id"] == now["run_id"] and last["status"] == "succeeded"
    assert last["counts"] == {"succeeded": 1}


class Daemon:
    def __init__(self, project: Project) -> None:
        self.log = project.root / f"daemon-{time.monotonic_ns()}.log"
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "parallel_dispatch", "watch", str(project.root)],
                stdout=subprocess.DEVNULL, stderr=err, env=cli_env())

    def wait_log(self, needle: str, count: int = 1) -> None:
        assert wait_until(lambda: self.log.read_text().count(needle) >= count, WAIT), (
            f"never saw {needle!r} x{count}:\n{self.log.read_text()}")


@pytest.fixture
def daemon(project: Project) -> Iterator[Daemon]:
    d = Daemon(project)
    yield d
    stop(d.proc, signal.SIGTERM)


def test_daemon_cancel_then_rerun_after_the_run_ended(project: Project, daemon: Daemon) -> None:
    mark, log, go = marker(), project.root / "runs.log", project.root / "go"
    daemon.wait_log("watching")
    sock = project.root / ".aiwg/run/daemon.sock"
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    project.write(".aiwg/tasks/pipe.yaml", "tasks:\n" + counted_task("a", log)
                  + slow_task("slow", mark, unless=go)
                  + counted_task("b", log, deps=", dependencies: [slow]"))
    assert wait_until(lambda: bool(marked_pids(mark)), WAIT)
    group = pgid_of(marked_pids(mark)[0])

    done = cli(project, "cancel", "pipe", "slow")  # the daemon's name for the file
    assert done.returncode == 0, done.stderr
    assert wait_until(lambda: not group_members(group), WAIT)
    daemon.wait_log("settled; idle until it changes")
    report = json.loads((project.root / ".aiwg/working/pipe/dispatch-report.json").read_text())
    st = {t["id"]: t for t in report["tasks"]}
    assert (st["a"]["status"], st["slow"]["status"], st["b"]["status"]) == (
        "succeeded", "cancelled", "skipped")
    assert log.read_text().split() == ["a"]

    # The run has ended: a re-run of `a` is a new run of the file with `a` forced past
    # the cache (unchanged, it would be `cached`); `slow` now succeeds, then `b` runs.
    go.touch()
    reply = control.rerun(project.root, "pipe", "a", by="the test")
    assert reply["new_run"] is True and reply["task"] == "a"
    daemon.wait_log("settled; idle until it changes", 2)
    report2 = json.loads((project.root / ".aiwg/working/pipe/dispatch-report.json").read_text())
    assert report2["run_id"] != report["run_id"]
    st2 = {t["id"]: t["status"] for t in report2["tasks"]}
    assert st2 == {"a": "succeeded", "slow": "succeeded", "b": "succeeded"}
    assert sorted(log.read_text().split()) == ["a", "a", "b"]

    listed = control.list_runs(project.root)
    assert [(r["name"], r["live"], r["status"]) for r in listed] == [
        ("pipe", False, "succeeded")]
    with pytest.raises(ControlError, match="already finished") as info:
        control.cancel(project.root, "pipe", "b")
    assert info.value.kind == "refused"


def test_cancel_a_task_waiting_to_be_retried(project: Project, runs: list[CliRun]) -> None:
    """A retry an hour away: cancelled, it ends now and the run does not wait for it."""
    gate, log = project.root / "gate", project.root / "runs.log"
    project.write("t.yaml", "settings: {on_failure: retry, retry_backoff: 3600}\ntasks:\n"
                  + _task("flaky", f"echo flaky >> {log}; exit 3", "")
                  + gated_task("waits", gate))
    run = CliRun(project, "t.yaml")
    runs.append(run)
    assert wait_until(lambda: run.tasks().get("flaky", {}).get("retrying") is True, WAIT)
    assert run.tasks()["flaky"]["status"] == "failed"

    reply = control.cancel(project.root, "t.yaml", "flaky", by="the test")
    assert reply["status"] == "cancelled"
    gate.touch()
    assert run.finish() == 1
    st = {t["id"]: t for t in project.report()["tasks"]}  # type: ignore[union-attr]
    assert st["flaky"]["status"] == "cancelled" and st["flaky"]["attempts"] == 1
    assert st["flaky"]["reason"] == "cancelled by the test"
    assert log.read_text().split() == ["flaky"]


def test_a_socket_path_too_long_for_sun_path(project: Project, runs: list[CliRun]) -> None:
    """sun_path holds 108 bytes; a deep project still gets its socket (bound and reached
    through /proc/self/fd)."""
    deep = Project(project.root / ("d" * 90), cold=True)
    (deep.root / ".aiwg").mkdir(parents=True)
    gate = deep.root / "gate"
    deep.write("t.yaml", "tasks:\n" + gated_task("waits", gate))
    run = CliRun(deep, "t.yaml")
    runs.append(run)
    assert len(os.fsencode(run.socket)) > 108
    run.wait_status("waits", "running")
    [listed] = control.list_runs(deep.root)
    assert listed["status"] == "running" and listed["dispatcher"]["socket"] == str(run.socket)
    gate.touch()
    assert run.finish() == 0


# -- the scheduler's side, on trio's MockClock (hours of waiting take milliseconds) ----------


def _controlled(spec: object, runner: ScriptedRunner, at: float,
                act: Any) -> tuple[RunResult, Any]:
    """Run `spec`; at mock time `at`, `act(scheduler)`; its return value comes back too."""
    result = new_result(spec)  # type: ignore[arg-type]
    sched = Scheduler(spec, runner, result, governor=Governor(stagger_s=0.0))  # type: ignore[arg-type]
    seen: list[Any] = []

    async def main() -> RunResult:
        async with trio.open_nursery() as nursery:
            async def later() -> None:
                await trio.sleep(at)
                seen.append(act(sched))
            nursery.start_soon(later)
            out = await sched.run()
            nursery.cancel_scope.cancel()
            return out

    out = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return out, seen[0] if seen else None


def test_cancel_a_task_waiting_for_quota_ends_it_now(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "tasks:\n  - {id: t0, agent: c, prompt: p, output: t0.md}\n")
    runner = ScriptedRunner({"t0": [limited(1, 300.0), Script()]})
    result, _ = _controlled(spec, runner, 10.0, lambda s: s.cancel_task(0, "cancelled by me"))
    t0 = _rec(result, "t0")
    assert (t0.status, t0.reason, t0.error) == ("cancelled", "cancelled by me", None)
    assert t0.quota_wait_s == pytest.approx(9.0)  # from the refusal at 1 s to the cancel
    assert result.wall_s == pytest.approx(10.0)  # not the 300 s the pool was paused for
    assert not result.interrupted and runner.started == ["t0"]


def test_cancel_a_task_not_started_and_on_failure_stop(tmp_path: Path) -> None:
    chain = """\
        tasks:
          - {id: a, agent: c, prompt: p, output: a.md}
          - {id: b, agent: c, prompt: p, output: b.md, dependencies: [a]}
          - {id: c, agent: c, prompt: p, output: c.md, dependencies: [b]}
          - {id: d, agent: c, prompt: p, output: d.md}
    """
    runner = ScriptedRunner({"a": [Script([Step(20)])], "d": [Script([Step(40)])]})
    spec = _spec(tmp_path, chain)
    result, _ = _controlled(spec, runner, 5.0, lambda s: s.cancel_task(1, "cancelled by me"))
    st = {r.id: (r.status, r.reason) for r in result.records}
    assert st == {"a": ("succeeded", None), "b": ("cancelled", "cancelled by me"),
                  "c": ("skipped", "dependency 'b' was cancelled"), "d": ("succeeded", None)}
    assert sorted(runner.started) == ["a", "d"]

    stop = _spec(tmp_path, chain, settings="settings: {on_failure: stop}\n")
    runner = ScriptedRunner({"a": [Script([Step(20)])], "d": [Script([Step(40)])]})
    result, _ = _controlled(stop, runner, 5.0, lambda s: s.cancel_task(0, "cancelled by me"))
    st = {r.id: (r.status, r.reason) for r in result.records}
    assert st["a"] == ("cancelled", "cancelled by me")
    assert st["d"][0] == "cancelled"  # the policy stopped the run: d was cut off
    assert st["b"][0] == st["c"][0] == "skipped"
    assert result.wall_s == pytest.approx(5.0)


def test_refusals(tmp_path: Path) -> None:
    spec = _spec(tmp_path, """\
        tasks:
          - {id: a, agent: c, prompt: p, output: a.md}
          - {id: b, agent: c, prompt: p, output: b.md, dependencies: [a]}
    """)

    def both(s: Scheduler) -> list[str]:
        errors = []
        for act in (lambda: s.rerun_task(0), lambda: s.cancel_task(0, "x")):
            try:
                act()
            except Refused as exc:
                errors.append(str(exc))
        return errors

    runner = ScriptedRunner({"a": [Script([Step(1)])], "b": [Script([Step(30)])]})
    _, errors = _controlled(spec, runner, 10.0, both)
    assert errors == ["task 'a' has dependents that have not finished (b); cancel them or wait",
                      "task 'a' already finished (succeeded)"]
