"""`parallel-dispatch mcp` through the MCP SDK's own client over stdio: a real server
process, real runs of shell agents, real files.  And `init --claude`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

pytest.importorskip("mcp", reason="the `mcp` extra")
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

Session = Callable[[ClientSession], Awaitable[None]]

TASKS = """\
name: mcp run
tasks:
  - id: first
    agent: shell
    output: first.md
    prompt: 'echo "first says hi"'
  - id: second
    agent: shell
    output: second.md
    dependencies: [first]
    prompt: 'echo "second after first"'
"""


def _project(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    (root / ".aiwg").mkdir(parents=True)
    (root / "tasks.yaml").write_text(TASKS)
    return root


def _with_session(root: Path, body: Session) -> None:
    """Start `parallel-dispatch mcp ROOT`, initialize, run `body`, close (the server
    exits when its stdin closes)."""
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "parallel_dispatch", "mcp", str(root)],
        cwd=str(root), env=dict(os.environ))

    async def main() -> None:
        with trio.fail_after(120):
            async with stdio_client(params) as (read, write), \
                    ClientSession(read, write) as session:
                await session.initialize()
                await body(session)

    trio.run(main)


async def _call(session: ClientSession, tool: str, **args: Any) -> Any:
    result = await session.call_tool(tool, args)
    assert not result.is_error, result.content
    if result.structured_content is not None:
        data = result.structured_content
        return data.get("result", data) if set(data) == {"result"} else data
    return result.content[0].text  # type: ignore[union-attr]


async def _error(session: ClientSession, tool: str, **args: Any) -> str:
    result = await session.call_tool(tool, args)
    assert result.is_error, result
    return str(result.content[0].text)  # type: ignore[union-attr]


def test_tools_are_listed_with_their_inputs(tmp_path: Path) -> None:
    async def body(session: ClientSession) -> None:
        tools = {t.name: t for t in (await session.list_tools()).tools}
        assert set(tools) == {"validate", "plan", "run", "status", "wait", "cancel", "result"}
        props = tools["run"].input_schema["properties"]
        assert {"path", "text", "max_parallel", "timeout_ms", "output", "on_failure"} <= \
            set(props)

    _with_session(_project(tmp_path), body)


def test_run_wait_result_runs_the_task_file_for_real(tmp_path: Path) -> None:
    root = _project(tmp_path)

    async def body(session: ClientSession) -> None:
        checked = await _call(session, "validate", path="tasks.yaml")
        assert checked == {"ok": True, "file": "tasks.yaml", "tasks": 2, "waves": 2}
        started = await _call(session, "run", path="tasks.yaml", max_parallel=1)
        run_id = started["run_id"]
        assert started["tasks"] == 2
        done = await _call(session, "wait", run_id=run_id, timeout_s=60)
        assert done["state"] == "finished" and done["status"] == "succeeded", done
        assert [t["status"] for t in done["tasks"]] == ["succeeded", "succeeded"]
        report = await _call(session, "result", run_id=run_id)
        assert "# Dispatch Report" in report or "## Summary" in report, report[:300]
        assert "first" in report
        out = await _call(session, "result", run_id=run_id, task_id="second")
        assert out == "second after first\n"
        cut = await _call(session, "result", run_id=run_id, max_bytes=50)
        assert "[… cut at 50 of" in cut
        listing = await session.read_resource(f"dispatch://reports/{run_id}")
        assert "first" in listing.contents[0].text  # type: ignore[union-attr]

    _with_session(root, body)
    assert (root / ".aiwg/working/first.md").read_text() == "first says hi\n"
    report = json.loads((root / ".aiwg/working/dispatch-report.json").read_text())
    assert report["settings"]["max_parallel"] == 1


def test_invalid_files_and_paths_outside_the_project_are_refused(tmp_path: Path) -> None:
    root = _project(tmp_path)
    (tmp_path / "outside.yaml").write_text(TASKS)

    async def body(session: ClientSession) -> None:
        bad = await _call(session, "validate", text="name: x\ntasks:\n  - id: a\n")
        assert bad["ok"] is False and bad["file"].startswith(".aiwg/mcp/tasks/inline-")
        assert any(":3:" in e and "missing required key" in e for e in bad["errors"]), bad
        message = await _error(session, "run", path="../outside.yaml")
        assert "outside the project" in message
        message = await _error(session, "run", path="tasks.yaml", output="../elsewhere")
        assert "outside the project" in message
        message = await _error(session, "run", text="name: x\ntasks:\n  - id: a\n")
        assert "invalid task file" in message and ":3:" in message
        message = await _error(session, "wait", run_id="nope")
        assert "no run 'nope'" in message
        message = await _error(session, "validate")
        assert "exactly one of" in message

    _with_session(root, body)
    assert not (root / ".aiwg" / "working").exists()
    assert not (root / ".aiwg" / "tasks").exists()  # inline files stay out of the daemon's


def test_cancel_stops_a_running_run_and_kills_its_agents(tmp_path: Path) -> None:
    root = _project(tmp_path)
    mark = f"PDM{uuid.uuid4().hex[:8]}"
    (root / "slow.yaml").write_text(
        "name: slow\ntasks:\n  - id: s\n    agent: shell\n    output: s.md\n"
        f"    prompt: \"exec bash -c 'exec -a {mark} sleep 300'\"\n")

    async def body(session: ClientSession) -> None:
        run_id = (await _call(session, "run", path="slow.yaml"))["run_id"]
        with trio.fail_after(60):
            while (await _call(session, "status", run_id=run_id))["tasks"][0]["status"] \
                    != "running":
                await trio.sleep(0.05)
            # "running" comes before the spawn: wait for the agent itself, so the checks
            # below see a process that was there and is gone, not one that never was
            while not subprocess.run(["pgrep", "-f", mark], capture_output=True).stdout:
                await trio.sleep(0.05)
        assert await _call(session, "cancel", run_id=run_id) == {
            "run_id": run_id, "cancelled": "run"}
        assert not subprocess.run(["pgrep", "-f", mark], capture_output=True).stdout
        done = await _call(session, "wait", run_id=run_id, timeout_s=60)
        assert done["status"] == "interrupted"
        assert done["tasks"][0]["status"] == "cancelled"

    _with_session(root, body)
    alive = subprocess.run(["pgrep", "-f", mark], capture_output=True, text=True)
    assert alive.stdout == "", alive.stdout


def _init(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "parallel_dispatch", "init", "--claude",
                           *args], cwd=root, capture_output=True, text=True, check=False)


def test_init_claude_adds_the_server_and_the_command_without_clobbering(
        tmp_path: Path) -> None:
    root = _project(tmp_path)
    (root / ".mcp.json").write_text(json.dumps({"mcpServers": {"other": {"command": "x"}}}))
    proc = _init(root)
    assert proc.returncode == 0, proc.stderr
    servers = json.loads((root / ".mcp.json").read_text())["mcpServers"]
    assert servers["other"] == {"command": "x"}
    assert servers["parallel-dispatch"] == {"type": "stdio", "command": "parallel-dispatch",
                                            "args": ["mcp"]}
    command = (root / ".claude/commands/parallel-dispatch.md").read_text()
    assert "args: <task-file> [--max-parallel <n>] [--timeout <ms>] [--output <dir>]" in command
    assert "mcp__parallel-dispatch__run" in command and "--dry-run" in command
    assert _init(root).returncode == 0  # the same files again: nothing to refuse
    (root / ".claude/commands/parallel-dispatch.md").write_text("my own command\n")
    proc = _init(root)
    assert proc.returncode == 2 and "exists and differs" in proc.stderr
    assert (root / ".claude/commands/parallel-dispatch.md").read_text() == "my own command\n"
    assert _init(root, "--force").returncode == 0
    assert "mcp__parallel-dispatch__run" in \
        (root / ".claude/commands/parallel-dispatch.md").read_text()


def test_cancel_one_task_kills_it_and_skips_its_dependents(tmp_path: Path) -> None:
    root = _project(tmp_path)
    mark = f"PDT{uuid.uuid4().hex[:8]}"
    (root / "two.yaml").write_text(
        "name: two\ntasks:\n"
        "  - id: slow\n    agent: shell\n    output: slow.md\n"
        f"    prompt: \"exec bash -c 'exec -a {mark} sleep 300'\"\n"
        "  - id: after\n    agent: shell\n    output: after.md\n    dependencies: [slow]\n"
        "    prompt: 'echo never'\n"
        "  - id: other\n    agent: shell\n    output: other.md\n"
        "    prompt: 'until [ -e release ]; do sleep 0.05; done; echo other done'\n")

    async def body(session: ClientSession) -> None:
        run_id = (await _call(session, "run", path="two.yaml"))["run_id"]
        with trio.fail_after(60):
            while not subprocess.run(["pgrep", "-f", mark], capture_output=True).stdout:
                await trio.sleep(0.05)
        assert await _call(session, "cancel", run_id=run_id, task_id="slow") == {
            "run_id": run_id, "cancelled": "slow"}
        assert not subprocess.run(["pgrep", "-f", mark], capture_output=True).stdout
        (root / "release").write_text("")
        done = await _call(session, "wait", run_id=run_id, timeout_s=60)
        statuses = {t["id"]: t["status"] for t in done["tasks"]}
        assert statuses == {"slow": "cancelled", "after": "skipped", "other": "succeeded"}
        message = await _error(session, "cancel", run_id=run_id, task_id="slow")
        assert "already finished" in message

    _with_session(root, body)
    assert (root / ".aiwg/working/other.md").read_text() == "other done\n"


def test_runs_started_over_mcp_answer_the_control_socket(tmp_path: Path) -> None:
    """`parallel-dispatch cancel RUN-ID` and `status --json` reach a run the assistant
    started: the MCP server listens on `.aiwg/run/mcp-<pid>.sock`."""
    root = _project(tmp_path)
    mark = f"PDK{uuid.uuid4().hex[:8]}"
    (root / "slow.yaml").write_text(
        "name: slow\ntasks:\n  - id: s\n    agent: shell\n    output: s.md\n"
        f"    prompt: \"exec bash -c 'exec -a {mark} sleep 300'\"\n")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "parallel_dispatch", *args], cwd=root,
                              capture_output=True, text=True, check=False, timeout=60)

    async def body(session: ClientSession) -> None:
        run_id = (await _call(session, "run", path="slow.yaml"))["run_id"]
        with trio.fail_after(60):
            while not subprocess.run(["pgrep", "-f", mark], capture_output=True).stdout:
                await trio.sleep(0.05)
        status = await trio.to_thread.run_sync(cli, "status", "--json", str(root))
        live = json.loads(status.stdout)["runs"]
        assert any(r.get("run_id") == run_id for r in live), status.stdout
        cancelled = await trio.to_thread.run_sync(cli, "cancel", run_id, "s",
                                                  "--project", str(root))
        assert cancelled.returncode == 0, cancelled.stderr
        done = await _call(session, "wait", run_id=run_id, timeout_s=60)
        assert done["tasks"][0]["status"] == "cancelled"

    _with_session(root, body)
    assert not subprocess.run(["pgrep", "-f", mark], capture_output=True).stdout
    assert not list((root / ".aiwg" / "run").glob("mcp-*.sock"))  # removed on the way out
