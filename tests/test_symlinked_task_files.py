"""Issue 9, item 3: a symlinked task file must not make us read (and quote back in an
error) a file outside the project, such as /etc/shadow to a daemon running as root."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from parallel_dispatch.config import ProjectConfig
from parallel_dispatch.errors import TaskFileError
from parallel_dispatch.loader import load_spec
from support import cli_env
from warmcli import run_cli

SECRET = "topsecret: value-of-the-secret\nroot: hash-of-root\n"
VALID = """\
name: ok
description: one task
tasks:
  - id: a
    agent: shell
    prompt: "true"
    output: a.txt
"""


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    """A project, and a folder outside it holding a "secret" that is valid YAML."""
    project, outside = tmp_path / "project", tmp_path / "outside"
    (project / ".aiwg" / "tasks").mkdir(parents=True)
    outside.mkdir()
    (outside / "shadow").write_text(SECRET)
    (outside / "tasks.yaml").write_text(VALID)
    return project, outside


def validate(project: Path, rel: str) -> subprocess.CompletedProcess[str]:
    return run_cli(["validate", rel], project, cli_env(), timeout=60)


def test_a_link_out_of_the_project_is_refused_unread(layout: tuple[Path, Path]) -> None:
    project, outside = layout
    (project / ".aiwg" / "tasks" / "evil.yaml").symlink_to(outside / "shadow")
    run = validate(project, ".aiwg/tasks/evil.yaml")
    assert run.returncode == 2, run.stdout + run.stderr
    assert "symlink" in run.stderr and str(outside / "shadow") in run.stderr
    assert "topsecret" not in run.stdout + run.stderr
    assert "hash-of-root" not in run.stdout + run.stderr
    assert "Traceback" not in run.stderr


def test_a_linked_folder_inside_the_project_cannot_lead_out_either(
    layout: tuple[Path, Path]
) -> None:
    project, outside = layout
    (project / ".aiwg" / "tasks" / "shared").symlink_to(outside, target_is_directory=True)
    run = validate(project, ".aiwg/tasks/shared/shadow")
    assert run.returncode == 2 and "topsecret" not in run.stdout + run.stderr
    assert "symlink" in run.stderr


def test_the_daemons_loader_refuses_it_too(layout: tuple[Path, Path]) -> None:
    """The daemon passes its project's config: the project root is the boundary."""
    project, outside = layout
    link = project / ".aiwg" / "tasks" / "evil.yaml"
    link.symlink_to(outside / "shadow")
    with pytest.raises(TaskFileError) as caught:
        load_spec(link, config=ProjectConfig(root=project.resolve()))
    assert "topsecret" not in str(caught.value) and "symlink" in str(caught.value)
    # and a tasks folder outside the project is a boundary when named
    other = outside / "tasks-dir"
    other.mkdir()
    (other / "evil.yaml").symlink_to(outside / "shadow")
    with pytest.raises(TaskFileError, match="symlink"):
        load_spec(other / "evil.yaml", config=ProjectConfig(root=project.resolve()),
                  confine_to=[other])


def test_links_that_stay_inside_are_followed(layout: tuple[Path, Path]) -> None:
    project, outside = layout
    (project / "v2.yaml").write_text(VALID)
    (project / ".aiwg" / "tasks" / "current.yaml").symlink_to(project / "v2.yaml")
    assert validate(project, ".aiwg/tasks/current.yaml").returncode == 0
    # a plain file outside the project is the user's choice, as before
    assert validate(project, str(outside / "tasks.yaml")).returncode == 0


def test_folders_linked_above_the_project_do_not_matter(tmp_path: Path) -> None:
    """`/home` → `/var/home` (Fedora Atomic), `/tmp` → `/private/tmp` (macOS)."""
    real = tmp_path / "var-home" / "project"
    (real / ".aiwg").mkdir(parents=True)
    (real / "tasks.yaml").write_text(VALID)
    (tmp_path / "home").symlink_to(tmp_path / "var-home", target_is_directory=True)
    linked = tmp_path / "home" / "project"
    assert validate(linked, "tasks.yaml").returncode == 0
    assert validate(tmp_path, str(linked / "tasks.yaml")).returncode == 0
