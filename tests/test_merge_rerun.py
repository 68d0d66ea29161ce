"""A conflicting task with retries left is re-run once on top of the merged changes
(issue 11 §3, merge.py's `_rerun_conflicts`): real git repositories, real `shell`
agents in `isolation: worktree`, the real CLI.

Two tasks append a different line after the same last line of `f.txt`, so the second
one's patch cannot apply after the first is merged.  Each agent records its own argv
(`/proc/$$/cmdline`: the built-in shell agent gets its prompt as `sh -c`'s script) under
the project's ignored `.aiwg/`, outside its worktree, so the test reads the prompt each
attempt really got.  The scripts are idempotent (`grep -q mine f.txt || echo mine >>
f.txt`), as the re-run must be: it starts from files that may already hold other lines.
"""

from __future__ import annotations

from pathlib import Path

from support import Project
from test_merge import OUT, git, make_repo, merge_report, statuses

NOTE = "Your previous changes did not apply on top of the other tasks' merged changes"


def appender(word: str) -> str:
    """A shell prompt that records its argv, then adds `word` to f.txt unless it is there."""
    return (f"{{ tr '\\\\0' '\\\\n' < /proc/$$/cmdline; echo '=== end'; }} "
            f">> $DISPATCH_PROJECT/.aiwg/argv-{word}; "
            f"grep -q '^{word}$' f.txt || echo {word} >> f.txt")


def task_file(mode: str, retries: int, extra: str = "") -> str:
    return f"""\
        settings: {{isolation: worktree, merge: {mode}, max_parallel: 1}}
        tasks:
          - {{id: a, agent: shell, prompt: "{appender('A')}", output: a.md}}
          - {{id: b, agent: shell, prompt: "{appender('B')}", output: b.md,
             retries: {retries}{extra}}}
    """


def prompts(root: Path, word: str) -> list[str]:
    """The script (`sh -c`'s argument) of each attempt of the task, in order."""
    text = (root / ".aiwg" / f"argv-{word}").read_text()
    attempts = [chunk.strip("\n").split("\n") for chunk in text.split("=== end\n") if chunk]
    return ["\n".join(argv[2:]) for argv in attempts]


def tasks(project: Project) -> dict[str, dict[str, object]]:
    return {t["id"]: t for t in project.report()["tasks"]}  # type: ignore[index,union-attr]


def test_a_conflicting_task_is_re_run_on_the_merged_branch_and_merges(
        project: Project) -> None:
    base = make_repo(project.root, {"f.txt": "base\n"})
    project.write("t.yaml", task_file("branch", retries=1))
    proc = project.run("t.yaml")
    assert proc.returncode == 0, proc.stderr
    merge = merge_report(project)
    branch = merge["branch"]
    assert merge["conflicts"] == []
    assert [c["task"] for c in merge["commits"]] == ["a", "b"]
    rerun, = merge["reruns"]
    assert (rerun["task"], rerun["attempt"], rerun["files"], rerun["result"]) == (
        "b", 2, ["f.txt"], "merged")
    assert rerun["start"] == merge["commits"][0]["sha"]  # on top of a's commit
    log = git(project.root, "log", "--reverse", "--format=%s", f"{base}..{branch}")
    assert log.splitlines() == ["a (shell)", "b (shell)"]
    assert git(project.root, "show", f"{branch}:f.txt") == "base\nA\nB\n"
    info = tasks(project)
    assert statuses(project) == {"a": "succeeded", "b": "succeeded"}
    assert info["b"]["attempts"] == 2 and info["b"]["reason"] == "re-run after a merge conflict"
    assert info["a"]["attempts"] == 1
    # The patch kept is the re-run's, made on top of a's change.
    patch = (project.root / OUT / "changes" / "b.patch").read_text()
    assert "+B" in patch and " A" in patch
    # The first attempt's prompt is the task's; the re-run's names the file and quotes git.
    first, second = prompts(project.root, "B")
    assert NOTE not in first
    assert NOTE in second and "conflicting files: f.txt" in second
    assert "Redo your change on top of the current files." in second
    assert "# git said:" in second  # a comment: the shell agent's prompt is a script
    assert second.startswith(first)
    assert len(prompts(project.root, "A")) == 1
    logtext = (project.root / OUT / "logs" / "b.log").read_text()
    assert "re-run after a merge conflict in f.txt: attempt 2" in logtext
    assert "b is re-run on top of the merged changes (attempt 2)" in proc.stderr
    # Every worktree is gone, the re-run's included.
    assert len(git(project.root, "worktree", "list").splitlines()) == 1


def test_without_retries_left_the_task_stays_a_conflict(project: Project) -> None:
    make_repo(project.root, {"f.txt": "base\n"})
    project.write("t.yaml", task_file("branch", retries=0))
    proc = project.run("t.yaml")
    assert proc.returncode == 1, proc.stderr
    merge = merge_report(project)
    assert [(c["task"], c["files"]) for c in merge["conflicts"]] == [("b", ["f.txt"])]
    assert "reruns" not in merge
    assert statuses(project) == {"a": "succeeded", "b": "conflict"}
    assert tasks(project)["b"]["attempts"] == 1
    assert len(prompts(project.root, "B")) == 1
    assert git(project.root, "show", f"{merge['branch']}:f.txt") == "base\nA\n"


def test_apply_mode_re_runs_too_and_the_working_tree_gets_both_changes(
        project: Project) -> None:
    make_repo(project.root, {"f.txt": "base\n"})
    project.write("t.yaml", task_file("apply", retries=2))
    proc = project.run("t.yaml")
    assert proc.returncode == 0, proc.stderr
    merge = merge_report(project)
    assert merge["applied"] == ["a", "b"] and merge["conflicts"] == []
    assert [r["result"] for r in merge["reruns"]] == ["merged"]
    assert (project.root / "f.txt").read_text() == "base\nA\nB\n"
    assert tasks(project)["b"]["attempts"] == 2  # one re-run only, though 2 retries are left


def test_a_re_run_that_times_out_stays_a_conflict_and_leaves_no_worktree(
        project: Project) -> None:
    make_repo(project.root, {"f.txt": "base\n"})
    # The re-run (and only it: its prompt holds the note) hangs past the task's timeout.
    hang = ", timeout: 4000"
    text = task_file("branch", retries=1, extra=hang).replace(
        "grep -q '^B$' f.txt",
        "if grep -q 'Merge[ ]conflict' /proc/$$/cmdline; then sleep 60 & wait; fi; "
        "grep -q '^B$' f.txt")
    project.write("t.yaml", text)
    proc = project.run("t.yaml")
    assert proc.returncode == 1, proc.stderr
    merge = merge_report(project)
    assert [(r["task"], r["result"]) for r in merge["reruns"]] == [("b", "timeout")]
    conflict, = merge["conflicts"]
    assert conflict["task"] == "b" and "timed out after 4s" in conflict["reason"]
    info = tasks(project)
    assert info["b"]["status"] == "conflict" and info["b"]["attempts"] == 2
    assert git(project.root, "show", f"{merge['branch']}:f.txt") == "base\nA\n"
    assert len(git(project.root, "worktree", "list").splitlines()) == 1
