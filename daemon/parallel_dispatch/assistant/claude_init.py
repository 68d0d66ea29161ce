"""`parallel-dispatch init --claude`: wire the engine into a project's Claude Code.

Two files: the MCP server in `.mcp.json` (other servers there are kept), and
`.claude/commands/parallel-dispatch.md`, the seed's `/parallel-dispatch` command with the
same arguments, now telling the assistant to hand the work to the engine and summarise
its report instead of orchestrating subagents by hand.  Nothing is overwritten without
`--force`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TextIO

SERVER_NAME = "parallel-dispatch"
SERVER_ENTRY: dict[str, Any] = {"type": "stdio", "command": "parallel-dispatch",
                                "args": ["mcp"]}
COMMAND_PATH = Path(".claude/commands/parallel-dispatch.md")
TOOL = f"mcp__{SERVER_NAME}__"

_DESCRIPTION = ("Dispatch multiple agents in parallel with dependency-aware coordination "
                "(run by the parallel-dispatch engine)")
_ARGS = ("<task-file> [--max-parallel <n>] [--timeout <ms>] [--output <dir>] "
         "[--on-failure continue|stop|retry] [--dry-run]")
_TOOLS = ", ".join(f"{TOOL}{t}" for t in ("validate", "plan", "run", "status", "wait",
                                          "cancel", "result"))

COMMAND = f"""\
---
name: parallel-dispatch
description: {_DESCRIPTION}
args: {_ARGS}
allowed-tools: {_TOOLS}
---

# Parallel Dispatch

Run the task file `$ARGUMENTS` with the parallel-dispatch engine (MCP server
`{SERVER_NAME}`). Do not start subagents yourself: the engine runs the agents with
timeouts, retries, budgets and a report.

## Usage

```
/parallel-dispatch tasks.yaml
/parallel-dispatch review-tasks.yaml --max-parallel 4
/parallel-dispatch build-tasks.yaml --timeout 300000 --output .aiwg/working/build/
/parallel-dispatch tasks.yaml --dry-run
```

## Steps

1. Split the arguments: the first is the task file (a path in this project); the
   options map to the `run` tool's parameters: `--max-parallel N` → `max_parallel`,
   `--timeout MS` → `timeout_ms`, `--output DIR` → `output`, `--on-failure X` →
   `on_failure`.
2. Call `validate` with `path`. If it reports errors, show them (each names file:line)
   and stop: nothing runs until the file is fixed.
3. With `--dry-run`, call `plan` with `path` and show the waves, each task's agent and
   output, and the critical path. Stop there.
4. Otherwise call `run` with `path` and the options. It returns a `run_id` at once.
5. Call `wait` with the `run_id` (timeout_s 600) until its `state` is `finished`. While
   it runs you may call `status` to say which tasks are running, waiting for quota or
   done.
6. Call `result` with the `run_id` for the Markdown report. Summarise it for the user:
   the status, each task's outcome, failures with their reason and log tail, and where
   the outputs are. For one task's output call `result` with `task_id`.
7. If the user asks to stop, call `cancel` with the `run_id` (and a `task_id` to stop
   one task).
"""


def init_claude(root: Path, force: bool, out: TextIO, err: TextIO) -> int:
    """Write both files; 2 (nothing written) when one exists and differs, without
    `--force`."""
    mcp_path = root / ".mcp.json"
    command_path = root / COMMAND_PATH
    config: dict[str, Any] = {}
    if mcp_path.exists():
        try:
            config = json.loads(mcp_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            print(f"parallel-dispatch: error: {mcp_path}: cannot read it as JSON ({exc}); "
                  "fix or remove it", file=err)
            return 2
        if not isinstance(config, dict) or not isinstance(config.get("mcpServers", {}), dict):
            print(f"parallel-dispatch: error: {mcp_path}: expected an object with "
                  "\"mcpServers\"; fix or remove it", file=err)
            return 2
    servers = config.setdefault("mcpServers", {})
    conflicts = []
    if servers.get(SERVER_NAME, SERVER_ENTRY) != SERVER_ENTRY:
        conflicts.append(f"{mcp_path} already has a different \"{SERVER_NAME}\" server")
    if command_path.exists() and command_path.read_text(encoding="utf-8") != COMMAND:
        conflicts.append(f"{command_path} exists and differs")
    if conflicts and not force:
        for c in conflicts:
            print(f"parallel-dispatch: error: {c}; nothing written (--force replaces it)",
                  file=err)
        return 2
    servers[SERVER_NAME] = SERVER_ENTRY
    _write(mcp_path, json.dumps(config, indent=2) + "\n")
    _write(command_path, COMMAND)
    print(f"wrote {mcp_path.relative_to(root)} (MCP server \"{SERVER_NAME}\": "
          "parallel-dispatch mcp)", file=out)
    print(f"wrote {command_path.relative_to(root)} (/parallel-dispatch)", file=out)
    print("Claude Code asks once to approve the project's MCP server; then type "
          "/parallel-dispatch tasks.yaml", file=out)
    return 0


def _write(path: Path, text: str) -> None:
    from ..atomic import write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, text)
