"""Support for runner-preset tests: fake agent CLIs first on PATH, a private HOME, records."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support import Project, cli_env
from warmcli import run_cli

FAKE_BIN = Path(__file__).parent / "fakes" / "bin"
SCRUB = ("FAKE_", "GEMINI_", "OPENAI_", "ANTHROPIC_", "CODEX_")


@dataclass
class AgentProject:
    """A project whose agent CLIs are the fakes; `run` runs the real CLI as a subprocess."""

    project: Project
    home: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.project.root

    @property
    def record(self) -> Path:
        return self.root / "calls.jsonl"

    def define(self, name: str, body: str = "You are a careful reviewer.",
               folder: str = ".claude/agents", **front: Any) -> Path:
        """Write an agent definition (frontmatter + body)."""
        lines = ["---", f"name: {name}"]
        lines += [f"{k}: {v}" for k, v in front.items()]
        lines += ["---", body, ""]
        path = self.root / folder / f"{name}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines), encoding="utf-8")
        return path

    def config(self, text: str) -> Path:
        return self.project.write(".aiwg/dispatch.toml", text)

    def tasks(self, text: str, name: str = "t.yaml") -> Path:
        return self.project.write(name, text)

    def run(self, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
        """The CLI with this project's environment plus `env`, forked warm unless the
        project is `cold` (warmcli.py)."""
        return run_cli(args, self.root, {**self.env, **env}, timeout, cold=self.project.cold)

    def calls(self, tool: str | None = None) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        calls = [json.loads(line) for line in self.record.read_text().splitlines()]
        return [c for c in calls if tool is None or c["tool"] == tool]

    def call_for(self, task_prompt_start: str) -> dict[str, Any]:
        """The one recorded call whose prompt starts with `task_prompt_start`."""
        found = [c for c in self.calls() if c.get("prompt", "").startswith(task_prompt_start)]
        assert len(found) == 1, (task_prompt_start, [c.get("prompt") for c in self.calls()])
        return found[0]

    def report(self) -> dict[str, Any]:
        return self.project.report()

    def report_md(self) -> str:
        return (self.root / ".aiwg/working/dispatch-report.md").read_text()

    def output(self, rel: str) -> str:
        return (self.root / ".aiwg/working" / rel).read_text()

    def task(self, task_id: str) -> dict[str, Any]:
        return next(t for t in self.report()["tasks"] if t["id"] == task_id)  # type: ignore[union-attr]


def make_agent_project(project: Project, tmp_path: Path, path: str | None = None) -> AgentProject:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in cli_env().items() if not k.startswith(SCRUB)}
    env["PATH"] = path if path is not None else f"{FAKE_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["HOME"] = str(home)
    env["FAKE_RECORD"] = str(project.root / "calls.jsonl")
    return AgentProject(project, home, env)


def dedent(text: str) -> str:
    return textwrap.dedent(text)
