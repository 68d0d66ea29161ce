"""`parallel-dispatch mcp`: the engine as an MCP server on stdio, for coding assistants.

An assistant that fans agents out by hand has no timeouts, budget or report; this hands
the work to the engine instead.  Tools: `validate`, `plan`, `run` (returns a run id at
once), `status`, `wait`, `cancel`, `result`.  Resources: the reports of recent runs
(`dispatch://reports/<run id>`).  Built on the official `mcp` SDK (the `mcp` extra),
served on trio, which the SDK's anyio supports.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import trio
from pydantic import Field

from ..control import ControlServer, socket_dir
from ..errors import TaskFileError
from ..runners import RunnerSet
from .runs import (
    MAX_RESULT_BYTES,
    Runs,
    ToolInputError,
    errors_of,
    recent_reports,
    report_for,
)

INSTRUCTIONS = """\
parallel-dispatch runs a YAML file of AI-agent tasks as a dependency graph, with timeouts,
retries, budgets and a report. Call `validate` on a task file (a path in the project, or
its YAML as `text`), then `run` (it returns a run id at once), then `wait` (repeat until
state is "finished"), then `result` for the report. `cancel` stops a run or one task."""


def build_server(runs: Runs) -> Any:
    """The MCP server with its tools bound to `runs` (the SDK is imported here)."""
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    from .. import __version__

    server = MCPServer(name="parallel-dispatch", version=__version__,
                       instructions=INSTRUCTIONS, log_level="WARNING")

    def fail(exc: Exception) -> ToolError:
        if isinstance(exc, TaskFileError):
            return ToolError("invalid task file:\n" + "\n".join(errors_of(exc)))
        return ToolError(str(exc))

    # validate and plan load the file in the SDK's worker thread (sync tools run there);
    # the others touch runs and the nursery, so they are async: on the event loop.
    @server.tool()
    def validate(path: str | None = None, text: str | None = None) -> dict[str, Any]:
        """Check a task file (a path in the project, or YAML text); errors carry
        file:line and say what to do.  Runs nothing."""
        try:
            file = runs.task_file(path, text)
        except ToolInputError as exc:
            raise fail(exc) from None
        try:
            spec = runs.load(file)
        except TaskFileError as exc:
            return {"ok": False, "file": runs.display(file), "errors": errors_of(exc)}
        return {"ok": True, "file": runs.display(file), "tasks": len(spec.tasks),
                "waves": len(spec.graph.waves())}

    @server.tool()
    def plan(path: str | None = None, text: str | None = None) -> dict[str, Any]:
        """What a run would do: waves, each task's agent, output and command, the
        critical path.  Starts nothing."""
        try:
            file = runs.task_file(path, text)
            spec = runs.load(file)
        except (ToolInputError, TaskFileError) as exc:
            raise fail(exc) from None
        from ..runners import Job

        runner = RunnerSet()
        waves = [[{"id": spec.tasks[i].id, "agent": spec.tasks[i].agent,
                   "output": spec.tasks[i].output,
                   "command": runner.describe(Job(spec, i, 1, "plan"))} for i in wave]
                 for wave in spec.graph.waves()]
        weights = [1.0] * len(spec.tasks)
        path_ids = [spec.graph.ids[i] for i in spec.graph.critical_path(weights)]
        return {"file": runs.display(file), "waves": waves, "critical_path": path_ids,
                "settings": spec.settings.to_json()}

    @server.tool()
    async def run(path: str | None = None, text: str | None = None,
            max_parallel: Annotated[int, Field(ge=1, le=256)] | None = None,
            timeout_ms: Annotated[int, Field(ge=1)] | None = None,
            output: str | None = None,
            on_failure: Literal["continue", "stop", "retry"] | None = None) -> dict[str, Any]:
        """Start a run of a task file; returns its run id at once (then `wait`).  The
        options are the CLI's (--max-parallel, --timeout, --output, --on-failure)."""
        options = {"max_parallel": max_parallel, "timeout_ms": timeout_ms, "output": output,
                   "on_failure": on_failure}
        try:
            started = runs.start(runs.task_file(path, text), options)
        except (ToolInputError, TaskFileError) as exc:
            raise fail(exc) from None
        return {"run_id": started.run_id, "task_file": started.task_file,
                "tasks": len(started.spec.tasks)}

    @server.tool()
    async def status(run_id: str | None = None) -> dict[str, Any]:
        """One run's tasks and their status, or every run this server started."""
        try:
            if run_id is not None:
                return runs.status(runs.get(run_id))
        except ToolInputError as exc:
            raise fail(exc) from None
        return {"runs": [runs.status(r) for r in runs.by_id.values()]}

    @server.tool()
    async def wait(run_id: str, timeout_s: float = 120.0) -> dict[str, Any]:
        """Wait until the run finishes or `timeout_s` (at most 600) passes; returns its
        status (state "running" when it timed out: call again)."""
        try:
            return await runs.wait(runs.get(run_id), timeout_s)
        except ToolInputError as exc:
            raise fail(exc) from None

    @server.tool()
    async def cancel(run_id: str, task_id: str | None = None) -> dict[str, Any]:
        """Stop a run (every running agent is killed, the rest skipped), or one task."""
        try:
            return await runs.cancel(runs.get(run_id), task_id)
        except ToolInputError as exc:
            raise fail(exc) from None

    @server.tool()
    async def result(run_id: str, task_id: str | None = None,
               max_bytes: int = MAX_RESULT_BYTES) -> str:
        """The run's Markdown report, or one task's output (cut at `max_bytes`, at most
        1 MiB, saying so)."""
        try:
            return runs.result_text(runs.get(run_id), task_id, max_bytes)
        except ToolInputError as exc:
            raise fail(exc) from None

    @server.resource("dispatch://reports", mime_type="application/json")
    def reports() -> list[dict[str, str]]:
        """The newest reports under `.aiwg/working/`: run id and path."""
        out = []
        for p in recent_reports(runs.root):
            out.append({"report": str(p.with_suffix(".md").relative_to(runs.root)),
                        "uri": f"dispatch://reports/{_run_id(p)}"})
        return out

    @server.resource("dispatch://reports/{run_id}", mime_type="text/markdown")
    def report(run_id: str) -> str:
        """A run's Markdown report."""
        from mcp.server.mcpserver.exceptions import ResourceError

        path = report_for(runs.root, run_id)
        if path is None or not path.is_file():
            raise ResourceError(f"no report of run {run_id} under .aiwg/working/")
        return path.read_text(encoding="utf-8")

    return server


def _run_id(report_json: Path) -> str:
    import json

    try:
        return str(json.loads(report_json.read_text(encoding="utf-8")).get("run_id", ""))
    except (OSError, ValueError):
        return ""


async def serve(root: Path) -> None:
    """Serve on stdio until the client closes it; runs still going are then cancelled
    (their agents killed, partial reports written)."""
    runs = Runs(root)
    server = build_server(runs)
    control = ControlServer(runs, socket_dir(root) / f"mcp-{os.getpid()}.sock")
    await control.bind()  # outside the nursery: its error is not wrapped in a group
    async with trio.open_nursery() as nursery:
        runs.bind(nursery)
        nursery.start_soon(control.serve)
        try:
            await server.run_stdio_async()
        finally:
            with trio.CancelScope(shield=True):
                await control.close()
            nursery.cancel_scope.cancel()


def run_mcp(root: Path) -> int:
    """Entry point of `parallel-dispatch mcp`."""
    print(f"parallel-dispatch mcp: serving {root} on stdio", file=sys.stderr)
    trio.run(serve, root)
    return 0
