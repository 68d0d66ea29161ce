"""`parallel-dispatch agents`, `init` and `doctor`, run as real subprocesses."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest

from parallel_dispatch.cli.commands import starter_config
from preset_support import FAKE_BIN, AgentProject, make_agent_project
from support import Project


@pytest.fixture
def ap(project: Project, tmp_path: Path) -> AgentProject:
    return make_agent_project(project, tmp_path)


def only(tmp_path: Path, *tools: str) -> str:
    """A PATH holding just these fakes (plus the system, for python3)."""
    folder = tmp_path / "only-bin"
    folder.mkdir(exist_ok=True)
    for tool in tools:
        (folder / tool).symlink_to(FAKE_BIN / tool)
    return f"{folder}{os.pathsep}/usr/bin:/bin"


# --- agents -------------------------------------------------------------------------


def test_agents_lists_runner_model_and_file(ap: AgentProject) -> None:
    ap.define("security-architect", model="sonnet", description="Finds holes")
    ap.define("ops", folder=".opencode/agent", model="anthropic/claude-sonnet-4-5")
    (ap.root / ".claude/agents/broken.md").write_text("no frontmatter\n")
    ap.config("""
        [agents.ops]
        runner = "opencode"

        [agents.build]
        command = ["make"]
    """)
    proc = ap.run("agents")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert ["NAME", "RUNNER", "MODEL", "FILE"] in rows
    assert ["security-architect", "claude", "sonnet", ".claude/agents/security-architect.md"] \
        in rows
    assert ["ops", "opencode", "anthropic/claude-sonnet-4-5", ".opencode/agent/ops.md"] in rows
    assert ["build", "command", "-", "[agents.build]"] in rows
    assert ["shell", "command", "-", "built-in"] in rows
    assert "note: .claude/agents/broken.md: skipped: no frontmatter" in proc.stdout
    assert "broken  " not in proc.stdout and "error" not in proc.stdout
    assert "default runner: claude" in proc.stdout

    data = json.loads(ap.run("agents", "--json").stdout)
    by_name = {d["name"]: d for d in data}
    assert by_name["security-architect"]["description"] == "Finds holes"
    assert by_name["security-architect"]["runner"] == "claude"


def test_agents_shows_why_an_agent_does_not_resolve(project: Project, tmp_path: Path) -> None:
    ap = make_agent_project(project, tmp_path, path="/usr/bin:/bin")  # no agent CLI at all
    ap.define("reviewer", model="sonnet")
    ap.config('[agents.coder]\nrunner = "codex"\n')
    proc = ap.run("agents")
    assert proc.returncode == 0
    assert "! reviewer: agent 'reviewer' is defined in .claude/agents/reviewer.md but no runner" \
        in proc.stdout
    assert "default runner: none" in proc.stdout


# --- init ---------------------------------------------------------------------------


def test_init_writes_commented_config_and_example_then_refuses(ap: AgentProject) -> None:
    (ap.root / ".aiwg").rmdir()
    proc = ap.run("init")
    assert proc.returncode == 0, proc.stderr
    config = ap.root / ".aiwg/dispatch.toml"
    example = ap.root / ".aiwg/tasks/example.yaml"
    text = config.read_text()
    data = tomllib.loads(text)
    assert data == starter_config("claude", True)[1]
    assert data["defaults"]["runner"] == "claude"
    assert "# Runner for agents found only as definitions" in text
    assert "# [runners.openai]" in text and '# max_cost_usd = 5.0' in text
    assert ap.run("validate", str(example)).returncode == 0
    assert ap.run(str(example)).returncode == 0  # the shell-only example really runs
    assert (ap.root / ".aiwg/working/inventory.md").read_text().startswith("# Files")

    config.write_text("# mine\n")
    proc = ap.run("init")
    assert proc.returncode == 1
    assert "already exist" in proc.stderr and "--force" in proc.stderr
    assert config.read_text() == "# mine\n"
    assert ap.run("init", "--force").returncode == 0
    assert tomllib.loads(config.read_text()) == data


def test_init_example_uses_a_found_definition(ap: AgentProject) -> None:
    ap.define("security-architect", model="sonnet")
    assert ap.run("init").returncode == 0
    example = (ap.root / ".aiwg/tasks/example.yaml").read_text()
    assert "agent: security-architect   # .claude/agents/security-architect.md" in example
    proc = ap.run("plan", ".aiwg/tasks/example.yaml")
    assert proc.returncode == 0, proc.stderr
    assert "review [security-architect]" in proc.stdout
    assert ("$ claude -p --output-format stream-json --verbose --no-session-persistence "
            "--model sonnet") in proc.stdout


def test_init_picks_an_installed_cli(project: Project, tmp_path: Path) -> None:
    ap = make_agent_project(project, tmp_path, path=only(tmp_path, "gemini"))
    assert ap.run("init").returncode == 0
    data = tomllib.loads((ap.root / ".aiwg/dispatch.toml").read_text())
    assert data["defaults"]["runner"] == "gemini" and "gemini" in data["runners"]


def test_init_without_any_cli_says_so(project: Project, tmp_path: Path) -> None:
    ap = make_agent_project(project, tmp_path, path="/usr/bin:/bin")
    proc = ap.run("init")
    assert proc.returncode == 0
    assert "no agent CLI" in proc.stdout
    text = (ap.root / ".aiwg/dispatch.toml").read_text()
    assert "no agent CLI was found on PATH" in text
    assert tomllib.loads(text)["defaults"]["runner"] == "claude"


# --- doctor -------------------------------------------------------------------------


def test_doctor_shows_versions_and_resolving_agents(ap: AgentProject) -> None:
    ap.define("security-architect", model="sonnet")
    ap.config('[agents.coder]\nrunner = "codex"\n')
    proc = ap.run("doctor")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for line in ("✓ claude    2.1.266 (Claude Code)", "✓ codex     codex-cli 0.151.0",
                 "✓ gemini    0.24.0", "✓ opencode  1.15.13", "✓ llm       llm, version 0.27.1"):
        assert line in out
    assert f"{FAKE_BIN}/claude" in out
    assert "· openai    HTTP: base_url https://api.openai.com/v1, key $OPENAI_API_KEY not set" \
        in out
    assert "✓ security-architect  [claude sonnet]  .claude/agents/security-architect.md" in out
    assert "✓ coder  [codex]  [agents.coder]" in out
    assert "no problems found" in out
    assert all(c.get("version_query") for c in ap.calls())  # only --version was asked


def test_doctor_reports_missing_and_hanging_runners(project: Project, tmp_path: Path) -> None:
    ap = make_agent_project(project, tmp_path, path=only(tmp_path, "claude", "gemini"))
    ap.define("reviewer")
    ap.config('[agents.coder]\nrunner = "codex"\n\n[agents.writer]\nrunner = "gemini"\n')
    (ap.root / ".claude/agents/broken.md").write_text("---\nname: [x\n---\n")
    proc = ap.run("doctor", "--timeout", "1", FAKE_VERSION_MODE_GEMINI="hang")
    assert proc.returncode == 1
    out = proc.stdout
    assert "✗ codex     'codex' not found on PATH" in out
    assert "✗ gemini    `gemini --version` did not answer in 1s" in out
    assert "✗ coder  [codex]" in out and "runner codex: 'codex' not found on PATH" in out
    assert "✗ writer  [gemini]" in out
    assert "✓ reviewer  [claude]" in out
    assert "broken.md:2: error: invalid YAML frontmatter" in out
    assert "3 problems found" in out


def test_doctor_uses_a_configured_command(project: Project, tmp_path: Path) -> None:
    ap = make_agent_project(project, tmp_path, path=only(tmp_path))
    ap.config(f'[runners.llm]\ncommand = ["{FAKE_BIN / "llm"}"]\n')
    proc = ap.run("doctor")
    assert "✓ llm       llm, version 0.27.1" in proc.stdout
