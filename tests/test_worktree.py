"""`isolation: worktree`: real git repositories, real `shell` agents editing files.

Each isolated attempt runs in its own worktree of the run's base commit plus its
dependencies' patches; its changes become `changes/<id>.patch`; no worktree (folder or
`git worktree list` entry) outlives an attempt, whatever ended it, nor a dispatcher
killed outright once the next run has started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from support import Project, cli_env, pid_alive, wait_until

OUT = ".aiwg/working"


def git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false",
         *args], cwd=root, check=True, capture_output=True, text=True).stdout


def make_repo(root: Path, files: dict[str, bytes]) -> str:
    git(root, "init", "-q")
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    git(root, "add", "-A", ".")
    git(root, "reset", "-q", "--", ".aiwg")  # the dispatcher's own folder stays out
    git(root, "commit", "-q", "-m", "base")
    return git(root, "rev-parse", "HEAD").strip()


def worktrees_left(root: Path) -> list[str]:
    """Worktree folders and `git worktree list` entries other than the main one."""
    folder = root / ".aiwg" / "worktrees"
    dirs = ([str(p) for p in folder.rglob("*") if p.name not in (".gitignore",)]
            if folder.is_dir() else [])
    listed = [line for line in git(root, "worktree", "list", "--porcelain").splitlines()
              if line.startswith("worktree ")]
    return dirs + listed[1:]


def patch(project: Project, task: str) -> str:
    return (project.root / OUT / "changes" / f"{task}.patch").read_text()


def tasks_by_id(project: Project) -> dict[str, dict[str, object]]:
    return {t["id"]: t for t in project.report()["tasks"]}  # type: ignore[attr-defined,index]


def test_parallel_tasks_editing_one_file_each_keep_their_own_edit(project: Project) -> None:
    base = make_repo(project.root, {"f.txt": b"a\nb\nc\nd\ne\n"})
    marks = project.root / "marks"
    marks.mkdir()
    # Each agent edits the same file, then waits (bounded) to see the other one started:
    # both ran at once, in separate trees.
    wait = ("i=0; while [ ! -e {m}/{o} ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done;"
            " [ -e {m}/{o} ] && echo saw-{o}")
    project.write("t.yaml", f"""\
        settings: {{isolation: worktree, max_parallel: 2}}
        tasks:
          - id: x
            agent: shell
            prompt: "sed -i 's/^a$/A/' f.txt; touch {marks}/x; {wait.format(m=marks, o='y')}"
            output: x.md
          - id: y
            agent: shell
            prompt: "sed -i 's/^e$/E/' f.txt; touch {marks}/y; {wait.format(m=marks, o='x')}"
            output: y.md
    """)
    proc = project.run("t.yaml", "-q")
    assert proc.returncode == 0, proc.stderr
    assert (project.root / OUT / "x.md").read_text() == "saw-y\n"
    assert (project.root / OUT / "y.md").read_text() == "saw-x\n"
    x, y = patch(project, "x"), patch(project, "y")
    assert "-a\n+A\n" in x and "+E" not in x
    assert "-e\n+E\n" in y and "+A" not in y
    assert (project.root / "f.txt").read_text() == "a\nb\nc\nd\ne\n"  # the user's tree
    report = project.report()
    assert report["base_commit"] == base
    tasks = tasks_by_id(project)
    assert tasks["x"]["changes"] == {"patch": "changes/x.patch", "files": ["f.txt"],
                                     "added": 1, "removed": 1}
    md = (project.root / OUT / "dispatch-report.md").read_text()
    assert "## Changes" in md and "[changes/x.patch](changes/x.patch)" in md
    assert "+1 −1" in md
    # Both apply to the base, and together (they touch different lines).
    for name in ("x", "y"):
        git(project.root, "apply", "--check", str(project.root / OUT / "changes" /
                                                  f"{name}.patch"))
    assert worktrees_left(project.root) == []


def test_a_dependent_sees_its_dependencies_changes_and_keeps_only_its_own(
        project: Project) -> None:
    make_repo(project.root, {"f.txt": b"one\n"})
    project.config()  # `[agents."*"]`: the echoing test agent, which prints its prompt
    project.write("t.yaml", """\
        settings: {isolation: worktree}
        tasks:
          - {id: a, agent: shell, prompt: "echo two >> f.txt; echo new > new.txt", output: a.md}
          - {id: b, agent: shell, prompt: "cat f.txt new.txt; echo three >> f.txt",
             output: b.md, dependencies: [a]}
          - {id: c, agent: shell, prompt: "cat f.txt; git status --porcelain", output: c.md,
             dependencies: [b]}
          - {id: r, agent: echoer, prompt: "review", output: r.md, dependencies: [a],
             inputs: inline}
    """)
    proc = project.run("t.yaml", "-q")
    assert proc.returncode == 0, proc.stderr
    assert (project.root / OUT / "b.md").read_text() == "one\ntwo\nnew\n"
    # Transitive: c sees a's and b's changes, committed in its worktree (a clean status).
    assert (project.root / OUT / "c.md").read_text() == "one\ntwo\nthree\n"
    b = patch(project, "b")
    assert "+three" in b and "+two" not in b and "new.txt" not in b
    assert tasks_by_id(project)["c"]["changes"] == {"patch": None, "files": [], "added": 0,
                                                    "removed": 0}
    assert not (project.root / OUT / "changes" / "c.patch").exists()
    # `inputs: inline` shows the dependency's patch.
    review = (project.root / OUT / "r.md").read_text()
    assert "changes/a.patch" in review and "+new" in review
    assert "no changes" in (project.root / OUT / "dispatch-report.md").read_text()


def test_binary_deletion_mode_change_and_new_file_are_captured(project: Project,
                                                              tmp_path: Path) -> None:
    binary = bytes(range(256)) * 4
    base = make_repo(project.root, {"bin.dat": binary, "gone.txt": b"bye\n",
                                    "run.sh": b"#!/bin/sh\n", ".gitignore": b"*.log\n",
                                    "sub/keep.txt": b"k\n"})
    project.write("t.yaml", """\
        tasks:
          - id: w
            agent: shell
            isolation: worktree
            prompt: |
              printf '\\000\\001\\002\\377' > bin.dat
              rm gone.txt
              chmod +x run.sh
              echo hi > added.txt
              echo noise > ignored.log
            output: w.md
    """)
    proc = project.run("t.yaml", "-q")
    assert proc.returncode == 0, proc.stderr
    text = patch(project, "w")
    assert "GIT binary patch" in text
    assert "deleted file mode 100644" in text
    assert "old mode 100644\nnew mode 100755" in text
    assert "new file mode 100644" in text
    assert "ignored.log" not in text
    changes = tasks_by_id(project)["w"]["changes"]
    assert isinstance(changes, dict)
    assert sorted(changes["files"]) == ["added.txt", "bin.dat", "gone.txt", "run.sh"]
    # The patch recreates the attempt's tree exactly, on a fresh checkout of the base.
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(project.root), str(clone)], check=True)
    git(clone, "checkout", "-q", base)
    git(clone, "apply", "--binary", str(project.root / OUT / "changes" / "w.patch"))
    assert (clone / "bin.dat").read_bytes() == b"\0\1\2\377"
    assert not (clone / "gone.txt").exists()
    assert os.access(clone / "run.sh", os.X_OK)
    assert (clone / "added.txt").read_text() == "hi\n"
    assert worktrees_left(project.root) == []


def test_the_agent_runs_in_the_worktree_and_the_project_is_named(project: Project) -> None:
    make_repo(project.root, {"sub/f.txt": b"x\n"})
    sub = project.root / "sub"
    (sub / ".aiwg").mkdir()
    (sub / "t.yaml").write_text(
        "settings: {isolation: worktree}\n"
        "tasks:\n  - {id: p, agent: shell, output: p.md, prompt: "
        "'pwd; echo $PWD; echo $DISPATCH_PROJECT; ls'}\n")
    proc = project.run("sub/t.yaml", "-q")
    assert proc.returncode == 0, proc.stderr
    cwd, pwd, named, listing = (sub / OUT / "p.md").read_text().split("\n", 3)
    here = Path(cwd)
    assert here.parent.parent.parent == (sub / ".aiwg" / "worktrees").resolve()
    assert here.name == "sub" and pwd == cwd  # the project's place in the worktree
    assert Path(named) == sub.resolve()
    assert "f.txt" in listing


@pytest.mark.parametrize("prompt, status", [
    ("echo x >> f.txt", "succeeded"),
    ("echo x >> f.txt; exit 3", "failed"),
    ("echo x >> f.txt; exec sleep 120", "timeout"),
])
def test_no_worktree_remains_after_an_attempt(project: Project, prompt: str,
                                              status: str) -> None:
    make_repo(project.root, {"f.txt": b"f\n"})
    mark = project.root / "t-started"
    # `w`, in the shared tree, watches `t`'s worktree go while the run goes on: removed
    # when the attempt ends, not at the end of the run. It waits for both the folder and
    # git's record of it (on a busy machine one goes a moment before the other).
    watch = (f"i=0; while [ ! -e {mark} ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); "
             "done; i=0; while { ls -d .aiwg/worktrees/*/t >/dev/null 2>&1 || "
             "[ $(git worktree list --porcelain | grep -c ^worktree) -gt 1 ]; } && "
             "[ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done; "
             "git worktree list --porcelain | grep -c ^worktree")
    project.write("t.yaml", f"""\
        settings: {{isolation: worktree, max_parallel: 2}}
        tasks:
          - {{id: t, agent: shell, prompt: "touch {mark}; {prompt}", output: t.md,
              timeout: 1500}}
          - {{id: w, agent: shell, isolation: none, prompt: "{watch}", output: w.md}}
    """)
    project.run("t.yaml", "-q")
    tasks = tasks_by_id(project)
    assert tasks["t"]["status"] == status
    assert tasks["w"]["status"] == "succeeded"
    assert (project.root / OUT / "w.md").read_text() == "1\n"
    assert worktrees_left(project.root) == []
    assert (project.root / ".aiwg" / "worktrees" / ".gitignore").read_text() == "*\n"
    assert git(project.root, "status", "--porcelain", "f.txt") == ""
    if status != "succeeded":
        assert tasks["t"]["changes"] is None
        assert not (project.root / OUT / "changes" / "t.patch").exists()


def _start_blocking_run(project: Project) -> tuple[subprocess.Popen[bytes], Path]:
    make_repo(project.root, {"f.txt": b"f\n"})
    pidfile = project.root / "agent.pid"
    project.write("t.yaml", f"""\
        settings: {{isolation: worktree}}
        tasks:
          - {{id: h, agent: shell, output: h.md,
              prompt: 'echo x >> f.txt; echo $$ > {pidfile}; exec sleep 120'}}
    """)
    proc = subprocess.Popen([sys.executable, "-m", "parallel_dispatch", "t.yaml", "-q"],
                            cwd=project.root, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert wait_until(lambda: pidfile.exists() and pidfile.read_text().strip() != "", 60)
    assert worktrees_left(project.root) != []  # it is there while the agent runs
    return proc, pidfile


def test_ctrl_c_removes_the_worktree(project: Project) -> None:
    proc, pidfile = _start_blocking_run(project)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert not pid_alive(int(pidfile.read_text()))
    assert worktrees_left(project.root) == []
    assert tasks_by_id(project)["h"]["status"] == "cancelled"


def test_a_killed_dispatchers_worktrees_go_at_the_next_run(project: Project) -> None:
    proc, pidfile = _start_blocking_run(project)
    proc.kill()
    proc.communicate(timeout=60)
    left = worktrees_left(project.root)
    assert left, "SIGKILL gives the dispatcher no chance to clean up"
    project.write("next.yaml", "tasks:\n  - {id: n, agent: shell, prompt: 'true', "
                               "output: n.md}\n")
    proc2 = project.run("next.yaml", "-q")
    assert proc2.returncode == 0, proc2.stderr
    assert worktrees_left(project.root) == []
    assert wait_until(lambda: not pid_alive(int(pidfile.read_text())), 30)  # orphan reaped


def test_a_live_dispatchers_worktrees_stay(project: Project) -> None:
    proc, _ = _start_blocking_run(project)
    try:
        project.write("next.yaml", "tasks:\n  - {id: n, agent: shell, prompt: 'true', "
                                   "output: n.md}\n")
        proc2 = project.run("next.yaml", "-q", "--output", "other")
        assert proc2.returncode == 0, proc2.stderr
        assert worktrees_left(project.root) != []
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert worktrees_left(project.root) == []


@pytest.mark.parametrize("where, line", [
    ("settings: {isolation: worktree}\ntasks:\n  - {id: a, agent: shell, prompt: x, "
     "output: a.md}\n", 1),
    ("tasks:\n  - id: a\n    agent: shell\n    prompt: x\n    output: a.md\n"
     "    isolation: worktree\n", 6),
])
def test_isolation_outside_a_git_repository_is_a_validation_error(
        project: Project, where: str, line: int) -> None:
    (project.root / "t.yaml").write_text(where)
    proc = project.run("validate", "t.yaml")
    assert proc.returncode == 2
    assert f"t.yaml:{line}:" in proc.stderr
    assert "isolation: worktree needs a git repository" in proc.stderr
    assert "run `git init` or remove it" in proc.stderr


def test_a_repository_without_commits_is_a_clear_error(project: Project) -> None:
    git(project.root, "init", "-q")
    project.write("t.yaml", "settings: {isolation: worktree}\ntasks:\n"
                            "  - {id: a, agent: shell, prompt: 'true', output: a.md}\n")
    proc = project.run("t.yaml", "-q")
    assert proc.returncode == 2, proc.stderr
    assert "needs a commit to start from" in proc.stderr


def test_reports_without_isolation_have_no_changes_keys(project: Project) -> None:
    make_repo(project.root, {"f.txt": b"f\n"})
    project.write("t.yaml", "tasks:\n  - {id: a, agent: shell, prompt: 'true', "
                            "output: a.md}\n")
    assert project.run("t.yaml", "-q").returncode == 0
    report = project.report()
    assert "base_commit" not in report
    assert "changes" not in tasks_by_id(project)["a"]
    assert not (project.root / ".aiwg" / "worktrees").exists()
