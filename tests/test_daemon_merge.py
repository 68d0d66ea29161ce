"""`merge: branch` under the daemon (`parallel-dispatch watch`): a real git repository,
real `shell` agents in `isolation: worktree`, the daemon as a real subprocess.

The daemon runs task files through `api.run_spec`, as the CLI does, so the merge queue
runs after each run: every run makes its own branch `dispatch/<name>/<run id>`, and an
incremental re-run's branch still holds the changes of the tasks that were `cached`
(their patches are kept in the output folder).  The user's tree is never touched.
"""

from __future__ import annotations

from pathlib import Path

from support import Project
from test_daemon import Daemon, daemons, wait_report  # noqa: F401  (fixture)
from test_merge import git, make_repo, snapshot

TASKS = """\
name: refactor
settings: {isolation: worktree, merge: branch, max_parallel: 1}
tasks:
  - {id: up, agent: shell, prompt: "sed -i 's/^a$/A/' f.txt", output: up.md}
  - {id: new, agent: shell, prompt: "echo %s > g.txt", output: new.md}
  - {id: after, agent: shell, prompt: "grep -q '^A$' f.txt && echo done >> f.txt",
     output: after.md, dependencies: [up]}
"""


def tree_state(root: Path) -> tuple[object, ...]:
    """`test_merge.snapshot` without the daemon's own log file."""
    *head, files = snapshot(root)
    return (*head, {k: v for k, v in files.items() if not k.startswith("daemon-")})


def branch_log(root: Path, base: str, branch: str) -> list[str]:
    return git(root, "log", "--reverse", "--format=%s", f"{base}..{branch}").splitlines()


def test_the_daemon_makes_a_branch_per_run_and_cached_tasks_stay_on_it(
        project: Project, daemons: list[Daemon]) -> None:  # noqa: F811
    base = make_repo(project.root, {"f.txt": "a\nb\n"})
    (project.root / "f.txt").write_text("a\nb\nlocal edit\n")  # uncommitted, kept as is
    with open(project.root / ".git/info/exclude", "a") as exclude:
        exclude.write("daemon-*.log\n")
    d = Daemon(project)
    daemons.append(d)
    d.wait_log("watching")
    before = tree_state(project.root)
    project.write(".aiwg/tasks/refactor.yaml", TASKS % "one")
    first = wait_report(project, "refactor")
    assert first["status"] == "succeeded", first
    merge = first["merge"]
    assert isinstance(merge, dict)
    branch = merge["branch"]
    assert branch == f"dispatch/refactor/{first['run_id']}"
    assert branch_log(project.root, base, branch) == [
        "up (shell)", "new (shell)", "after (shell)"]
    assert git(project.root, "show", f"{branch}:f.txt") == "A\nb\ndone\n"
    assert git(project.root, "show", f"{branch}:g.txt") == "one\n"
    assert [c["task"] for c in merge["commits"]] == ["up", "new", "after"]
    assert f"branch `{branch}`" in (
        project.root / ".aiwg/working/refactor/dispatch-report.md").read_text()

    # Edit one task: it re-runs, the others are cached, and the new run's branch has all
    # three tasks' changes, the edited one's new version.
    project.write(".aiwg/tasks/refactor.yaml", TASKS % "two")
    second = wait_report(project, "refactor", after=str(first["run_id"]))
    assert second["status"] == "succeeded", second
    st = {t["id"]: t["status"] for t in second["tasks"]}  # type: ignore[index, union-attr]
    assert st == {"up": "cached", "new": "succeeded", "after": "cached"}
    merge2 = second["merge"]
    assert isinstance(merge2, dict)
    branch2 = merge2["branch"]
    assert branch2 == f"dispatch/refactor/{second['run_id']}" and branch2 != branch
    assert branch_log(project.root, base, branch2) == [
        "up (shell)", "new (shell)", "after (shell)"]
    assert git(project.root, "show", f"{branch2}:g.txt") == "two\n"
    assert git(project.root, "show", f"{branch2}:f.txt") == "A\nb\ndone\n"
    assert git(project.root, "rev-parse", f"{branch}:g.txt") != git(
        project.root, "rev-parse", f"{branch2}:g.txt")

    # The user's HEAD, index, status and files are as they were; no worktree is left.
    assert tree_state(project.root) == before
    assert len(git(project.root, "worktree", "list").splitlines()) == 1
    assert d.stop() == 0
