"""The merge queue (`merge: branch | apply`): real git repositories, real `shell` agents
in `isolation: worktree`, real patches, the real CLI.

`branch` makes one commit per task, in topological order, on `dispatch/<name>/<run id>`
without touching the user's tree or index; a patch that does not apply makes its task
`conflict` (the file named) while the others still merge; a failing `verify` reverts its
task's commit (`merge_failed`); `apply` patches the working tree, and a patch that does
not apply there leaves the tree as it was.

The merge order does not depend on when tasks finish, so these run one task at a time
(`max_parallel: 1`): parallel isolated attempts are test_worktree.py's subject.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from parallel_dispatch.merge import branch_name, conflicting_files
from support import Project

OUT = ".aiwg/working"


def git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false",
         *args], cwd=root, check=True, capture_output=True, text=True).stdout


def make_repo(root: Path, files: dict[str, str]) -> str:
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.name", "Tess Ter")
    git(root, "config", "user.email", "tess@example.com")
    (root / ".git" / "info" / "exclude").write_text(".aiwg/\n")  # the dispatcher's folder
    for rel, text in files.items():
        (root / rel).write_text(text)
    git(root, "add", "-A", ".")
    git(root, "commit", "-q", "-m", "base")
    return git(root, "rev-parse", "HEAD").strip()


def snapshot(root: Path) -> tuple[str, str, str, str, dict[str, bytes]]:
    """HEAD, the current branch, the index's entries, status, and every file's bytes."""
    files = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
             if p.is_file() and ".git" not in p.parts and ".aiwg" not in p.parts}
    return (git(root, "rev-parse", "HEAD"), git(root, "symbolic-ref", "HEAD"),
            git(root, "ls-files", "--stage", "--debug"),
            git(root, "--no-optional-locks", "status", "--porcelain"), files)


def merge_report(project: Project) -> dict[str, object]:
    return project.report()["merge"]  # type: ignore[index,return-value]


def statuses(project: Project) -> dict[str, str]:
    return {t["id"]: t["status"] for t in project.report()["tasks"]}  # type: ignore


FIVE_LINES = "a\nb\nc\nd\ne\n"


def test_branch_mode_commits_each_task_in_topological_order_and_leaves_the_tree_alone(
        project: Project) -> None:
    base = make_repo(project.root, {"f.txt": FIVE_LINES})
    (project.root / "f.txt").write_text(FIVE_LINES + "local edit\n")  # uncommitted
    # File order c, a, b with b depending on c: the queue merges c, a (file order among
    # the ready), then b, which builds on c's change.
    project.write("t.yaml", """\
        name: "Big refactor: part 1"
        settings: {isolation: worktree, merge: branch, max_parallel: 1}
        tasks:
          - {id: c, agent: shell, prompt: "sed -i 's/^a$/A/' f.txt", output: c.md}
          - {id: a, agent: shell, prompt: "echo new > g.txt", output: a.md}
          - {id: b, agent: shell, prompt: "grep -q '^A$' f.txt && sed -i 's/^e$/E/' f.txt",
             output: b.md, dependencies: [c]}
          - {id: n, agent: shell, prompt: "echo nothing changed", output: n.md}
    """)
    before = snapshot(project.root)
    proc = project.run("t.yaml")
    assert proc.returncode == 0, proc.stderr
    report = project.report()
    merge = merge_report(project)
    branch = f"dispatch/Big-refactor-part-1/{report['run_id']}"
    assert merge["mode"] == "branch" and merge["branch"] == branch
    assert merge["conflicts"] == [] and merge["base"] == base
    log = git(project.root, "log", "--reverse", "--format=%H|%s|%an <%ae>|%cn",
              f"{base}..{branch}").splitlines()
    assert [line.split("|")[1] for line in log] == ["c (shell)", "a (shell)", "b (shell)"]
    assert all(line.endswith("|Tess Ter <tess@example.com>|Tess Ter") for line in log)
    assert [c["sha"] for c in merge["commits"]] == [line.split("|")[0] for line in log]
    assert [c["task"] for c in merge["commits"]] == ["c", "a", "b"]
    assert git(project.root, "show", f"{branch}:f.txt") == "A\nb\nc\nd\nE\n"
    assert git(project.root, "show", f"{branch}:g.txt") == "new\n"
    assert git(project.root, "rev-parse", f"{branch}~3").strip() == base
    # The user's HEAD, branch, index, status and files are exactly as before.
    assert snapshot(project.root) == before
    assert "## Merge" in (project.root / OUT / "dispatch-report.md").read_text()
    assert f"c merged as {merge['commits'][0]['sha'][:12]}" in proc.stderr
    # The scratch worktree is gone, folder and git's record.
    assert not (project.root / ".aiwg" / "worktrees" / report["run_id"]).exists()
    assert len(git(project.root, "worktree", "list").splitlines()) == 1


def test_an_overlapping_edit_is_a_conflict_naming_the_file_and_the_others_still_merge(
        project: Project) -> None:
    base = make_repo(project.root, {"f.txt": FIVE_LINES, "h.txt": "h\n"})
    project.write("t.yaml", """\
        settings: {isolation: worktree, merge: branch, max_parallel: 1}
        tasks:
          - {id: x, agent: shell, prompt: "sed -i 's/^c$/X/' f.txt", output: x.md}
          - {id: y, agent: shell, prompt: "sed -i 's/^c$/Y/' f.txt", output: y.md}
          - {id: z, agent: shell, prompt: "echo z >> h.txt", output: z.md}
          - {id: w, agent: shell, prompt: "echo w > w.txt", output: w.md, dependencies: [y]}
    """)
    proc = project.run("t.yaml")
    assert proc.returncode == 1, proc.stderr
    merge = merge_report(project)
    assert [c["task"] for c in merge["commits"]] == ["x", "z"]
    conflicts = {c["task"]: c for c in merge["conflicts"]}
    assert conflicts["y"]["files"] == ["f.txt"]
    assert conflicts["w"]["files"] == []  # builds on y, so it is not merged either
    assert "'y'" in conflicts["w"]["reason"]
    assert statuses(project) == {"x": "succeeded", "y": "conflict", "z": "succeeded",
                                 "w": "conflict"}
    report = project.report()
    assert report["summary"]["conflicts"] == 2 and report["status"] == "failed"
    y = next(t for t in report["tasks"] if t["id"] == "y")
    assert "f.txt" in y["reason"]
    assert git(project.root, "show", f"{merge['branch']}:f.txt") == "a\nb\nX\nd\ne\n"
    assert git(project.root, "rev-list", "--count", f"{base}..{merge['branch']}").strip() == "2"
    assert "conflict" in proc.stderr and "2 conflicts" in proc.stderr
    md = (project.root / OUT / "dispatch-report.md").read_text()
    assert "| y | ⇆ conflict: `f.txt` |" in md
    # The state records the conflict, so --resume runs the task again.
    state = (project.root / OUT / ".dispatch-state.toml").read_text()
    assert 'status = "conflict"' in state and "conflict = 2" in state


def test_on_failure_stop_merges_nothing_after_a_conflict(project: Project) -> None:
    make_repo(project.root, {"f.txt": FIVE_LINES})
    project.write("t.yaml", """\
        settings: {isolation: worktree, merge: branch, on_failure: stop, max_parallel: 1}
        tasks:
          - {id: x, agent: shell, prompt: "sed -i 's/^c$/X/' f.txt", output: x.md}
          - {id: y, agent: shell, prompt: "sed -i 's/^c$/Y/' f.txt", output: y.md}
          - {id: z, agent: shell, prompt: "echo z > z.txt", output: z.md}
    """)
    proc = project.run("t.yaml")
    assert proc.returncode == 1, proc.stderr
    merge = merge_report(project)
    assert [c["task"] for c in merge["commits"]] == ["x"]
    assert "z" in merge["stopped"]
    assert statuses(project) == {"x": "succeeded", "y": "conflict", "z": "succeeded"}


def test_a_failing_verify_reverts_that_task_and_marks_it_merge_failed(
        project: Project) -> None:
    base = make_repo(project.root, {"f.txt": FIVE_LINES})
    project.write("t.yaml", """\
        settings:
          max_parallel: 1
          isolation: worktree
          merge: branch
          verify: {shell: "if [ -e bad.txt ]; then echo found bad.txt; exit 3; fi"}
        tasks:
          - {id: good, agent: shell, prompt: "echo ok > ok.txt", output: g.md}
          - {id: bad, agent: shell, prompt: "echo oops > bad.txt", output: b.md}
          - {id: later, agent: shell, prompt: "sed -i 's/^a$/A/' f.txt", output: l.md}
    """)
    proc = project.run("t.yaml")
    assert proc.returncode == 1, proc.stderr
    merge = merge_report(project)
    assert [c["task"] for c in merge["commits"]] == ["good", "later"]
    failed = merge["verify"]["failed"]
    assert [(f["task"], f["exit_code"], f["timed_out"]) for f in failed] == [("bad", 3, False)]
    assert failed[0]["tail"] == ["found bad.txt"]
    tasks = {t["id"]: t for t in project.report()["tasks"]}
    assert tasks["bad"]["status"] == "merge_failed"
    assert "exit code 3" in tasks["bad"]["reason"] and "found bad.txt" in tasks["bad"]["reason"]
    assert "found bad.txt" in tasks["bad"]["log_tail"]
    branch = merge["branch"]
    files = git(project.root, "ls-tree", "--name-only", branch).split()
    assert "bad.txt" not in files and "ok.txt" in files
    assert git(project.root, "rev-list", "--count", f"{base}..{branch}").strip() == "2"


def test_verify_is_an_argv_and_is_killed_at_its_timeout(project: Project) -> None:
    make_repo(project.root, {"f.txt": FIVE_LINES})
    project.write("t.yaml", """\
        settings:
          max_parallel: 1
          isolation: worktree
          merge: branch
          verify: [sh, -c, "echo started; sleep 60 & wait"]
          verify_timeout: 1000
        tasks:
          - {id: a, agent: shell, prompt: "echo a > a.txt", output: a.md}
    """)
    proc = project.run("t.yaml")
    assert proc.returncode == 1, proc.stderr
    merge = merge_report(project)
    assert merge["commits"] == [] and merge["branch"] is None
    assert [(f["task"], f["timed_out"]) for f in merge["verify"]["failed"]] == [("a", True)]
    assert statuses(project) == {"a": "merge_failed"}


def test_apply_mode_patches_the_working_tree_and_a_conflict_leaves_it_as_it_was(
        project: Project) -> None:
    make_repo(project.root, {"f.txt": FIVE_LINES, "u.txt": "1\n2\n3\n"})
    (project.root / "u.txt").write_text("1\nUSER\n3\n")  # the user's own uncommitted edit
    project.write("t.yaml", """\
        settings: {isolation: worktree, merge: apply, max_parallel: 1}
        tasks:
          - {id: e, agent: shell, prompt: "sed -i 's/^c$/C/' f.txt", output: e.md}
          - {id: n, agent: shell, prompt: "echo new > n.txt", output: n.md}
          - {id: u, agent: shell, prompt: "sed -i 's/^2$/TWO/' u.txt", output: u.md}
    """)
    index_before = git(project.root, "ls-files", "--stage")
    proc = project.run("t.yaml")
    assert proc.returncode == 1, proc.stderr
    merge = merge_report(project)
    assert merge["applied"] == ["e", "n"] and merge["branch"] is None
    assert [(c["task"], c["files"]) for c in merge["conflicts"]] == [("u", ["u.txt"])]
    assert (project.root / "f.txt").read_text() == "a\nb\nC\nd\ne\n"
    assert (project.root / "n.txt").read_text() == "new\n"
    assert (project.root / "u.txt").read_text() == "1\nUSER\n3\n"
    assert git(project.root, "ls-files", "--stage") == index_before  # the index untouched
    assert git(project.root, "branch", "--list", "dispatch/*") == ""
    assert statuses(project)["u"] == "conflict"


def test_merge_settings_are_validated_with_the_line(project: Project) -> None:
    project.write("t.yaml", """\
        settings:
          merge: branches
          verify: make test
        tasks:
          - {id: a, agent: shell, prompt: "true", output: a.md}
    """)
    proc = project.run("validate", "t.yaml")
    assert proc.returncode == 2
    assert "t.yaml:2" in proc.stderr and "branches" in proc.stderr
    assert "t.yaml:3" in proc.stderr and "{shell: 'make test'}" in proc.stderr


def test_branch_names_are_valid_refs() -> None:
    assert branch_name("Big refactor: part 1", "R") == "dispatch/Big-refactor-part-1/R"
    assert branch_name("../x..y.lock", "R") == "dispatch/x.y/R"
    assert branch_name("~^:?*[", "R") == "dispatch/dispatch/R"
    for name in ("Big refactor: part 1", "../x..y.lock", "~^:?*[", "a/b", ".hidden-"):
        subprocess.run(["git", "check-ref-format", "--branch", branch_name(name, "20261129T1")],
                       check=True, capture_output=True)


def test_conflicting_files_are_read_from_gits_messages() -> None:
    out = ("error: patch failed: src/a.py:12\nerror: src/a.py: patch does not apply\n"
           "Applied patch to 'lib/b.c' with conflicts.\nU lib/b.c\n"
           "error: new.txt: already exists in working directory\n")
    assert conflicting_files(out) == ["src/a.py", "lib/b.c", "new.txt"]
