"""`--executor ray`: the real CLI against the real two-node cluster of `ray_cluster`.

Agents are small bash scripts whose processes carry a marker unique to the test
(`exec -a MARK-agent`, a child `MARK-tool`), so survivors are found by command line
anywhere in the namespace, on either node.  Everything waits on events (a marker
appearing, the CLI exiting) with generous deadlines, never on sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from raycluster import RayCluster, survivors, wait_gone

pytestmark = pytest.mark.ray

CLI_DEADLINE = 180


def _project(tmp_path: Path, toml: str, tasks: str, name: str = "tasks.yaml") -> Path:
    root = tmp_path / "proj"
    (root / ".aiwg").mkdir(parents=True, exist_ok=True)
    (root / ".aiwg" / "dispatch.toml").write_text(toml)
    (root / name).write_text(tasks)
    (root / "notes.txt").write_text("a file of the project\n")
    return root


def _cli(root: Path, cluster: RayCluster | None, *args: str,
         name: str = "tasks.yaml") -> subprocess.Popen[str]:
    env = cluster.driver_env() if cluster is not None else dict(os.environ)
    argv = [sys.executable, "-m", "parallel_dispatch", name, *args]
    if cluster is not None:
        argv += ["--executor", f"ray:{cluster.address}"]
    return subprocess.Popen(argv, cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        out, err = proc.communicate(timeout=CLI_DEADLINE)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(
            f"the CLI did not finish in {CLI_DEADLINE}s:\n{err[-3000:]}") from None
    return proc.returncode, out + err


def _report(root: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        (root / ".aiwg" / "working" / "dispatch-report.json").read_text())
    return data


def _tasks(root: Path) -> dict[str, dict[str, Any]]:
    return {t["id"]: t for t in _report(root)["tasks"]}


def _wait_for(marker: str, count: int = 1, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while len(survivors(marker)) < count:
        assert time.monotonic() < deadline, f"{count} processes with {marker} never appeared"
        time.sleep(0.1)


def _sleeper(mark: str) -> str:
    """A bash prompt: an agent and its tool child that would sleep for 5 minutes."""
    return f"exec bash -c '(exec -a {mark}-tool sleep 300) & exec -a {mark}-agent sleep 300'"


SPREAD_TOML = '[executor]\nresources = { agent_slot = 1 }\n'

DAG = """\
name: dag on ray
tasks:
{fan}
  - id: join
    agent: shell
    output: join.md
    dependencies: [{deps}]
    prompt: |
      python3 -c 'import json,os;print(*json.loads(os.environ["DISPATCH_INPUTS"]).values())' \
        | xargs cat
      echo joined
"""


def _dag(n: int) -> str:
    fan = "\n".join(
        f"  - id: w{i}\n    agent: shell\n    output: w{i}.md\n"
        f"    prompt: 'sleep 1; echo \"worker {i}: $(cat notes.txt)\"'" for i in range(n))
    return DAG.format(fan=fan, deps=", ".join(f"w{i}" for i in range(n)))


def test_dag_spreads_over_both_nodes_with_the_same_outputs_as_locally(
        ray_cluster: RayCluster, tmp_path: Path) -> None:
    local = _project(tmp_path / "local", SPREAD_TOML, _dag(4))
    code, text = _finish(_cli(local, None))
    assert code == 0, text
    remote = _project(tmp_path / "ray", SPREAD_TOML, _dag(4))
    code, text = _finish(_cli(remote, ray_cluster))
    assert code == 0, text
    for name in ("w0.md", "w1.md", "w2.md", "w3.md", "join.md"):
        assert (remote / ".aiwg/working" / name).read_text() == \
            (local / ".aiwg/working" / name).read_text()
    assert "worker 3: a file of the project" in (remote / ".aiwg/working/join.md").read_text()
    tasks = _tasks(remote)
    assert {t["status"] for t in tasks.values()} == {"succeeded"}
    assert "nodes" not in _tasks(local)["w0"]  # local reports read as before
    used = {t["nodes"][0].split("(")[1].rstrip(")") for t in tasks.values()}
    # 4 one-second tasks of agent_slot 1 over 2 + 2 slots cannot all fit on one node.
    assert {ray_cluster.head_node_id[:8], ray_cluster.worker_node_id[:8]} <= used, tasks
    md = (remote / ".aiwg/working/dispatch-report.md").read_text()
    assert "## Nodes" in md and f"({ray_cluster.worker_node_id[:8]})" in md
    assert "section Node 127.0.0.1" in md  # the gantt groups by node


def test_working_dir_mode_runs_in_a_private_copy_and_ships_inputs_and_outputs(
        ray_cluster: RayCluster, tmp_path: Path) -> None:
    toml = SPREAD_TOML + 'workspace = "working_dir"\n'
    tasks = """\
name: working dir
tasks:
  - id: first
    agent: shell
    output: first.md
    prompt: 'pwd > where.txt; echo "first saw: $(cat notes.txt)"; echo scribble > notes.txt'
  - id: second
    agent: shell
    output: second.md
    dependencies: [first]
    prompt: |
      cat "$(python3 -c 'import json,os;print(json.loads(os.environ["DISPATCH_INPUTS"])["first"])')"
      echo "second saw: $(cat notes.txt)"
      echo "project: $DISPATCH_PROJECT"
"""
    root = _project(tmp_path, toml, tasks)
    code, text = _finish(_cli(root, ray_cluster))
    assert code == 0, text
    second = (root / ".aiwg/working/second.md").read_text()
    assert "first saw: a file of the project" in second  # the dependency's output shipped
    assert "second saw: a file of the project" in second  # first's scribble stayed private
    assert f"project: {root}" not in second  # paths were rewritten to the node's copy
    assert (root / "notes.txt").read_text() == "a file of the project\n"
    assert not (root / "where.txt").exists()


def test_timeout_kills_the_remote_group(ray_cluster: RayCluster, tmp_path: Path) -> None:
    mark = f"PDT{uuid.uuid4().hex[:8]}"
    tasks = f"""\
name: timeout
settings: {{timeout_per_task: 3000}}
tasks:
  - id: slow
    agent: shell
    output: slow.md
    prompt: "{_sleeper(mark)}"
"""
    root = _project(tmp_path, SPREAD_TOML, tasks)
    code, text = _finish(_cli(root, ray_cluster))
    assert code == 1, text
    assert _tasks(root)["slow"]["status"] == "timeout"
    assert _tasks(root)["slow"]["nodes"], "a timed-out attempt still names its node"
    assert not wait_gone(mark), "the agent or its tool outlived the timeout"


def test_ctrl_c_cancels_every_remote_attempt(ray_cluster: RayCluster, tmp_path: Path) -> None:
    mark = f"PDC{uuid.uuid4().hex[:8]}"
    tasks = "name: ctrl-c\ntasks:\n" + "".join(
        f"  - id: s{i}\n    agent: shell\n    output: s{i}.md\n    prompt: \"{_sleeper(mark)}\"\n"
        for i in range(4))
    root = _project(tmp_path, SPREAD_TOML, tasks)
    proc = _cli(root, ray_cluster)
    try:
        _wait_for(f"{mark}-agent", 4)
        proc.send_signal(signal.SIGINT)
        code, text = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 130, text
    assert {t["status"] for t in _tasks(root).values()} == {"cancelled"}
    assert not wait_gone(mark), "an agent outlived Ctrl-C of the driver"


def test_a_killed_worker_is_retried_under_our_policy(ray_cluster: RayCluster,
                                                     tmp_path: Path) -> None:
    mark = f"PDW{uuid.uuid4().hex[:8]}"
    tasks = f"""\
name: worker killed
tasks:
  - id: k
    agent: shell
    output: k.md
    retries: 1
    prompt: |
      if [ "$DISPATCH_ATTEMPT" = 1 ]; then {_sleeper(mark)}; fi
      echo "attempt $DISPATCH_ATTEMPT ok"
"""
    toml = '[executor]\nresources = { agent_slot = 2 }\n'
    root = _project(tmp_path, toml, tasks)
    proc = _cli(root, ray_cluster)
    try:
        _wait_for(f"{mark}-agent")
        workers = [p for node in ("head", "worker") for p in ray_cluster.worker_pids(node)
                   if "parallel-dispatch k#1" in Path(f"/proc/{p}/cmdline").read_text()
                   .replace("\0", " ")]
        assert len(workers) == 1, workers
        os.kill(workers[0], signal.SIGKILL)
        code, text = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, text
    k = _tasks(root)["k"]
    assert (k["status"], k["attempts"]) == ("succeeded", 2)
    assert (root / ".aiwg/working/k.md").read_text() == "attempt 2 ok\n"
    log = (root / ".aiwg/working/logs/k.log").read_text()
    assert "WorkerCrashedError" in log
    assert not wait_gone(mark), "the agent outlived its Ray worker"


def test_a_lost_node_is_retried_on_the_other(ray_cluster: RayCluster,
                                            tmp_path: Path) -> None:
    """`pin` takes the head's `head_only` slot and all its agent slots; `k` (agent_slot 2 =
    a whole node), started only once `pin` runs (`ready` waits for that and needs no
    resources), must start on the second node, whose raylet dies under it; its retry
    runs on the head once `pin` is done."""
    mark = f"PDN{uuid.uuid4().hex[:8]}"
    toml = """\
[agents.pinned]
command = ["bash", "-c"]
prompt = "arg"
resources = { agent_slot = 2, head_only = 1 }

[agents.whole]
command = ["bash", "-c"]
prompt = "arg"
resources = { agent_slot = 2 }
"""
    tasks = f"""\
name: node lost
tasks:
  - id: pin
    agent: pinned
    output: pin.md
    prompt: 'touch pin-runs; while [ ! -e go ]; do sleep 0.1; done; echo pinned'
  - id: ready
    agent: shell
    output: ready.md
    prompt: 'while [ ! -e pin-runs ]; do sleep 0.1; done'
  - id: k
    agent: whole
    output: k.md
    retries: 1
    dependencies: [ready]
    prompt: |
      if [ "$DISPATCH_ATTEMPT" = 1 ]; then {_sleeper(mark)}; fi
      echo "attempt $DISPATCH_ATTEMPT ok"
"""
    root = _project(tmp_path, toml, tasks)
    proc = _cli(root, ray_cluster)
    try:
        _wait_for(f"{mark}-agent")
        os.kill(ray_cluster.raylet_pid("worker"), signal.SIGKILL)
        assert not wait_gone(mark, within=60), "the agent outlived its node's raylet"
        (root / "go").write_text("")
        code, text = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        ray_cluster.restart_worker_node()
    assert code == 0, text
    k = _tasks(root)["k"]
    assert (k["status"], k["attempts"]) == ("succeeded", 2), k
    assert k["nodes"][0].endswith(f"({ray_cluster_old_worker(k)})")
    assert k["nodes"][1].endswith(f"({ray_cluster.head_node_id[:8]})")
    log = (root / ".aiwg/working/logs/k.log").read_text()
    assert "NodeDiedError" in log or "WorkerCrashedError" in log, log


def ray_cluster_old_worker(task: dict[str, Any]) -> str:
    """The first attempt's node id (the second node before its restart)."""
    return str(task["nodes"][0].split("(")[1].rstrip(")"))


def test_a_resource_no_node_has_is_an_error_before_anything_starts(
        ray_cluster: RayCluster, tmp_path: Path) -> None:
    toml = """\
[executor]
resources = { agent_slot = 1 }

[agents.gpu]
command = ["bash", "-c"]
prompt = "arg"
resources = { nope = 1 }
"""
    tasks = "name: infeasible\ntasks:\n  - id: g\n    agent: gpu\n    output: g.md\n" \
            "    prompt: 'echo never'\n"
    root = _project(tmp_path, toml, tasks)
    code, text = _finish(_cli(root, ray_cluster))
    assert code == 2, text
    assert ".aiwg/dispatch.toml:7:" in text, text
    assert "agent 'gpu' needs {agent_slot = 1, nope = 1}" in text
    assert "agent_slot=2" in text  # what the nodes do offer
    assert not (root / ".aiwg" / "working").exists()


def test_an_unreachable_cluster_is_a_clear_error(tmp_path: Path) -> None:
    root = _project(tmp_path, SPREAD_TOML,
                    "name: x\ntasks:\n  - id: a\n    agent: shell\n    output: a.md\n"
                    "    prompt: 'echo hi'\n")
    proc = subprocess.run(
        [sys.executable, "-m", "parallel_dispatch", "tasks.yaml", "--executor",
         "ray:127.0.0.1:9"], cwd=root, capture_output=True, text=True, timeout=CLI_DEADLINE)
    assert proc.returncode == 2, proc.stderr
    assert "cannot join the Ray cluster at 127.0.0.1:9" in proc.stderr
    assert "Traceback" not in proc.stderr


ISOLATED = """\
name: isolated on ray
settings:
  isolation: worktree
tasks:
  - id: edit
    agent: shell
    output: edit.txt
    prompt: |
      sed -i 's/a file/one file/' notes.txt
      printf 'new\\n' > added.txt
      git status --short
  - id: append
    agent: shell
    output: append.txt
    dependencies: [edit]
    prompt: |
      cat notes.txt
      echo 'appended by append' >> notes.txt
"""


def _git_project(root: Path) -> Path:
    run = lambda *a: subprocess.run(["git", *a], cwd=root, check=True,  # noqa: E731
                                    capture_output=True)
    run("init", "-q")
    (root / ".gitignore").write_text(".aiwg/\n")
    run("add", "-A")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "start")
    return root


def test_isolated_tasks_work_in_a_node_copy_of_their_worktree(
        ray_cluster: RayCluster, tmp_path: Path) -> None:
    """`working_dir` mode: the node gets the worktree's files (base commit plus the
    dependencies' patches), and the agent's changes come back as the same patch a local
    run makes."""
    local = _git_project(_project(tmp_path / "local", SPREAD_TOML, ISOLATED))
    code, text = _finish(_cli(local, None))
    assert code == 0, text
    toml = SPREAD_TOML + 'workspace = "working_dir"\n'
    remote = _git_project(_project(tmp_path / "ray", toml, ISOLATED))
    code, text = _finish(_cli(remote, ray_cluster))
    assert code == 0, text
    changes = Path(".aiwg/working/changes")
    for name in ("edit.patch", "append.patch"):
        assert (remote / changes / name).read_text() == (local / changes / name).read_text()
    assert "+one file of the project" in (remote / changes / "edit.patch").read_text()
    # `append` ran on top of edit's change, in its own copy:
    assert (remote / ".aiwg/working/append.txt").read_text() == "one file of the project\n"
    assert (remote / "notes.txt").read_text() == "a file of the project\n"  # merge: none


def test_a_workspace_path_maps_the_project_root_on_the_nodes(
        ray_cluster: RayCluster, tmp_path: Path) -> None:
    """`workspace = "/mnt/repo"`: nodes have the project at another path (a mount of the
    same storage; here a symlink to it), and the driver's paths are rewritten to it."""
    mount = tmp_path / "mnt-repo"
    toml = SPREAD_TOML + f'workspace = "{mount}"\n'
    tasks = ("name: mapped\ntasks:\n  - id: a\n    agent: shell\n    output: a.md\n"
             "    prompt: 'echo \"cwd=$(pwd) project=$DISPATCH_PROJECT\"; cat notes.txt'\n")
    root = _project(tmp_path, toml, tasks)
    mount.symlink_to(root)
    code, text = _finish(_cli(root, ray_cluster))
    assert code == 0, text
    assert (root / ".aiwg/working/a.md").read_text() == \
        f"cwd={mount} project={mount}\na file of the project\n"


def test_the_daemon_runs_task_files_on_the_cluster(ray_cluster: RayCluster,
                                                   tmp_path: Path) -> None:
    root = _project(tmp_path, SPREAD_TOML, "name: unused\ntasks: []\n")
    (root / ".aiwg" / "tasks").mkdir()
    (root / ".aiwg" / "tasks" / "hello.yaml").write_text(
        "name: hello\ntasks:\n  - id: hi\n    agent: shell\n    output: hi.md\n"
        "    prompt: 'echo hello from a node'\n")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "parallel_dispatch", "watch", str(root), "--executor",
         f"ray:{ray_cluster.address}"], env=ray_cluster.driver_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    report = root / ".aiwg/working/hello/dispatch-report.json"
    try:
        deadline = time.monotonic() + CLI_DEADLINE
        while not report.exists():
            assert daemon.poll() is None, daemon.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the daemon never wrote the report"
            time.sleep(0.1)
    finally:
        daemon.terminate()
        try:
            _, err = daemon.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            _, err = daemon.communicate()
    assert "agents run on the Ray cluster at" in err, err[-3000:]
    task = json.loads(report.read_text())["tasks"][0]
    assert task["status"] == "succeeded" and task["nodes"], task
    assert (root / ".aiwg/working/hello/hi.md").read_text() == "hello from a node\n"


def test_time_queued_in_the_cluster_counts_against_no_timeout(
        ray_cluster: RayCluster, tmp_path: Path) -> None:
    """Three tasks that each take a whole node (agent_slot 2) on two nodes: the third
    waits in Ray's queue until one is free.  Its timeout and its times start when it
    starts on a node, not when the dispatcher handed it over."""
    toml = '[executor]\nresources = { agent_slot = 2 }\n'
    tasks = "name: queued\nsettings: {timeout_per_task: 10000}\ntasks:\n" + "".join(
        f"  - id: q{i}\n    agent: shell\n    output: q{i}.md\n    prompt: 'sleep 6; echo {i}'\n"
        for i in range(3))
    root = _project(tmp_path, toml, tasks)
    code, text = _finish(_cli(root, ray_cluster))
    assert code == 0, text  # queued ~6 s, then 6 s of its own: past 10 s if the queue counted
    durations = sorted(t["duration_s"] for t in _tasks(root).values())
    assert durations[-1] < 10.0, durations  # 4 s spare for a busy machine
    starts = sorted(t["start_s"] for t in _tasks(root).values())
    assert starts[-1] >= 5.5, starts  # after the first two had held both nodes ~6 s
