"""examples/parallel-refactor.yaml runs unchanged, offline, on a clone of this repository,
leaves the clone's tree as it was, and (with its `merge: branch` line switched on) joins
the patches as one commit per task in dependency order."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from support import cli_env
from warmcli import run_cli

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = "examples/parallel-refactor.yaml"


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    dest = tmp_path / "repo"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(dest)],
                   check=True)
    _git(dest, "config", "user.email", "dev@example.com")
    _git(dest, "config", "user.name", "Dev")
    return dest


def _report(clone: Path) -> dict[str, object]:
    path = clone / ".aiwg/working/parallel-refactor/dispatch-report.json"
    data: dict[str, object] = json.loads(path.read_text())
    return data


def test_the_example_runs_in_worktrees_and_keeps_patches(clone: Path) -> None:
    head, status = _git(clone, "rev-parse", "HEAD"), _git(clone, "status", "--porcelain")
    proc = run_cli(["run", EXAMPLE, "-q"], clone, cli_env(), 300)
    assert proc.returncode == 0, proc.stderr
    tasks = {t["id"]: t for t in _report(clone)["tasks"]}  # type: ignore[attr-defined]
    assert all(t["status"] == "succeeded" for t in tasks.values())
    changes = clone / ".aiwg/working/parallel-refactor/changes"
    assert "README.md" in tasks["version-note"]["changes"]["files"]
    assert (changes / "version-note.patch").is_file()
    # The dependent saw its dependencies' commit and added only its own file.
    assert tasks["changelog"]["changes"]["files"] == ["DISPATCH-CHANGES.md"]
    # The clone's own tree and HEAD are as they were; no worktree is left.
    assert _git(clone, "rev-parse", "HEAD") == head
    assert _git(clone, "status", "--porcelain") == status
    assert _git(clone, "worktree", "list").count("\n") == 1


def test_with_merge_branch_each_task_becomes_one_commit_in_dependency_order(
        clone: Path) -> None:
    example = clone / EXAMPLE
    example.write_text(example.read_text().replace("  # merge: branch", "  merge: branch"))
    proc = run_cli(["run", EXAMPLE, "-q"], clone, cli_env(), 300)
    assert proc.returncode == 0, proc.stderr
    merge = _report(clone)["merge"]
    assert isinstance(merge, dict)
    branch = merge["branch"]
    assert branch.startswith("dispatch/parallel-refactor/")
    subjects = _git(clone, "log", "--format=%s", f"HEAD..{branch}").splitlines()[::-1]
    with_patch = [c["task"] for c in merge["commits"]]
    assert [s.split(" ")[0] for s in subjects] == with_patch
    assert with_patch.index("changelog") > with_patch.index("spelling")
    assert "changelog (shell)" in subjects
