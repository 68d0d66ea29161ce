"""Contract: the real Claude Code (pinned) drives the engine through `/parallel-dispatch`
and the MCP server that `init --claude` wires in, against the Anthropic stub.

The stub plays the model: on the turn whose tools include the engine's, it calls
`run`, then `wait` with the run id the engine returned, then `result`, then answers.
The test checks that the engine really ran the task file (its outputs exist), and that
each tool's answer reached the model in the next request: the report included.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from contract.clients import CLAUDE_MODEL
from contract.common import client
from stubs.anthropic import AnthropicStub, _tool_result
from stubs.anthropic import env as anthropic_env
from stubs.base import Reply, Request

pytest.importorskip("mcp", reason="the `mcp` extra")

TOOL = "mcp__parallel-dispatch__"
TASKS = """\
name: from claude
tasks:
  - id: scan
    agent: shell
    output: scan.md
    prompt: 'echo "scanned by the engine"'
  - id: sum
    agent: shell
    output: sum.md
    dependencies: [scan]
    prompt: 'echo "summed after scan"'
"""


class EngineCaller(AnthropicStub):
    """A model that hands the task file to the engine: run → wait → result → answer."""

    def __init__(self) -> None:
        super().__init__(text="Done.")
        self.results: dict[str, str] = {}

    def _respond(self, req: Request, reply: Reply) -> None:
        if not self.accepts(req) or f"{TOOL}run" not in self.tool_names(req):
            super()._respond(req, reply)  # side requests (titles, summaries...)
            return
        last = _last_tool(req)
        result = _tool_result(req)
        if last is not None and result is not None:
            self.results[last] = result
        if last is None:
            self._call(req, reply, "run", {"path": "tasks.yaml", "max_parallel": 2})
        elif last == "run":
            run_id = json.loads(result or "{}")["run_id"]
            self._call(req, reply, "wait", {"run_id": run_id, "timeout_s": 120})
        elif last == "wait":
            run_id = json.loads(result or "{}")["run_id"]
            self._call(req, reply, "result", {"run_id": run_id})
        else:
            self._answer(req, reply, [{"type": "text", "text": "The run succeeded."}],
                         "end_turn")

    def _call(self, req: Request, reply: Reply, tool: str, args: dict[str, Any]) -> None:
        block = {"type": "tool_use", "id": f"toolu_pd{next(self._ids):06d}",
                 "name": f"{TOOL}{tool}", "input": args}
        self._answer(req, reply, [block], "tool_use")


def _last_tool(req: Request) -> str | None:
    """The engine tool the model called in its last turn, if any."""
    messages = req.body.get("messages") if isinstance(req.body, dict) else None
    for message in reversed(messages or []):
        if isinstance(message, dict) and message.get("role") == "assistant":
            for block in message.get("content") or []:
                if isinstance(block, dict) and block.get("type") == "tool_use":
                    name = str(block.get("name", ""))
                    return name.removeprefix(TOOL) if name.startswith(TOOL) else None
            return None
    return None


def test_claude_code_runs_a_task_file_through_the_engine(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    home = tmp_path / "home"
    for d in (root / ".aiwg", home):
        d.mkdir(parents=True)
    (root / "tasks.yaml").write_text(TASKS)
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    bin_dir = str(Path(sys.executable).parent)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(home),
           "LANG": "C.UTF-8"}
    init = subprocess.run([sys.executable, "-m", "parallel_dispatch", "init", "--claude"],
                          cwd=root, env=env, capture_output=True, text=True, check=False)
    assert init.returncode == 0, init.stderr
    with EngineCaller.running() as stub:
        env.update(anthropic_env(stub))
        # MCP tools are offered directly, not behind ToolSearch (claude 2.x defers them by
        # default; a real model would search for them first, the stub does not).
        env["ENABLE_TOOL_SEARCH"] = "false"
        tools = " ".join(f"{TOOL}{t}" for t in ("validate", "run", "wait", "result"))
        proc = subprocess.run(
            [str(client("claude")), "-p", "/parallel-dispatch tasks.yaml",
             "--mcp-config", ".mcp.json", "--strict-mcp-config", "--allowedTools", tools,
             "--output-format", "json", "--model", CLAUDE_MODEL],
            cwd=root, env=env, capture_output=True, text=True, timeout=240, check=False)
        calls = stub.messages()
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    answer = json.loads(proc.stdout)
    assert answer["result"] == "The run succeeded.", answer
    # The engine ran the file for real:
    assert (root / ".aiwg/working/scan.md").read_text() == "scanned by the engine\n"
    assert (root / ".aiwg/working/sum.md").read_text() == "summed after scan\n"
    # The slash command written by `init --claude` reached the model:
    first = next(c for c in calls if f"{TOOL}run" in stub.tool_names(c))
    assert "Do not start subagents yourself" in json.dumps(first.body)
    # Each tool's answer reached the model in the next request, the report last:
    assert set(stub.results) == {"run", "wait", "result"}, stub.results
    waited = json.loads(stub.results["wait"])
    assert waited["state"] == "finished" and waited["status"] == "succeeded"
    assert "scan" in stub.results["result"] and "Critical path" in stub.results["result"]
