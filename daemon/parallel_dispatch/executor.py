"""Where an attempt's process runs: the seam between the runners and the machine.

Runners decide *what* runs (argv, environment, prompt on stdin, where its output goes)
and read what came back; an `Executor` only starts the process and waits for it.
`LocalExecutor` is `process.run_in_group` on this machine.  `RayExecutor`
(ray_executor.py, imported only when `--executor ray…` asks for it) runs the same request
on a Ray cluster node and streams the process's output back into the same local files,
so the runners, staging, presets' parsing, retries, budgets and the report never know
the difference.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Protocol

from .agents import AgentSpec
from .config import ProjectConfig
from .errors import Diagnostic
from .process import KILL_GRACE_S, Exit, run_in_group

__all__ = ["ExecRequest", "Executor", "Exit", "LocalExecutor", "make_executor"]


@dataclass(frozen=True)
class ExecRequest:
    """One agent process to start, described without reference to a machine."""

    argv: Sequence[str]
    cwd: str
    env: Mapping[str, str]
    stdin: bytes = b""
    grace: float = KILL_GRACE_S
    root: str = ""
    """The project root on this machine: a remote workspace maps paths under it."""
    deadline_s: float | None = None
    """The attempt's own time limit (its timeout): a remote backstop adds `grace` and
    kills the agent even when nobody is left to cancel it."""
    resources: Mapping[str, float] = field(default_factory=dict)
    """What a node must offer to run it (Ray custom resources); ignored locally."""
    sends: Sequence[str] = ()
    """Files and folders outside the project's shipped copy that the agent reads
    (dependency outputs, its staging folder): a remote workspace ships them first."""
    returns: Sequence[str] = ()
    """Folders the agent writes (its staging folder): a remote workspace brings them back."""
    tree: str | None = None
    """A git worktree the agent works in (`isolation: worktree`): a remote workspace ships
    its files and brings the agent's changes back as a patch applied here."""
    label: str = ""
    """Task and attempt, for names on the remote side (`review#2`)."""
    on_node: Callable[[str], None] | None = field(default=None, compare=False)
    """Told which node runs it, as soon as the remote side says (a timed-out attempt
    returns no outcome, yet its report names the node)."""


class Executor(Protocol):
    """Starts one agent process somewhere and waits for it; kills it when cancelled.

    Output goes to `stdout`/`stderr` (files or fds on this machine) as it is produced.
    When cancelled, the process group gets SIGTERM, then SIGKILL after `grace`, and the
    call returns or raises only once nothing of the attempt is left running.
    """

    name: str
    local: bool
    """Whether the process runs on this machine (commands are then looked up on PATH
    here, and pids join the orphan registry)."""

    async def run(self, req: ExecRequest, *, stdout: IO[bytes] | int,
                  stderr: IO[bytes] | int,
                  on_spawn: Callable[[int], None] | None = None,
                  on_reaped: Callable[[int], None] | None = None) -> Exit: ...

    def connect(self) -> None:
        """Get ready before the first run (join a cluster); blocking."""

    def check(self, config: ProjectConfig, agents: Mapping[str, Mapping[str, float]]
              ) -> list[Diagnostic]:
        """Errors that would otherwise appear only when a task starts (or never: a
        resource no node has), for the agents `{name: resources}` a run uses."""
        ...

    def close(self) -> None: ...


class LocalExecutor:
    """Today's behaviour: the agent is a process group on this machine."""

    name = "local"
    local = True

    async def run(self, req: ExecRequest, *, stdout: IO[bytes] | int,
                  stderr: IO[bytes] | int,
                  on_spawn: Callable[[int], None] | None = None,
                  on_reaped: Callable[[int], None] | None = None) -> Exit:
        return await run_in_group(req.argv, cwd=req.cwd, env=req.env, stdin=req.stdin,
                                  stdout=stdout, stderr=stderr, grace=req.grace,
                                  on_spawn=on_spawn, on_reaped=on_reaped)

    def connect(self) -> None:
        pass

    def check(self, config: ProjectConfig, agents: Mapping[str, Mapping[str, float]]
              ) -> list[Diagnostic]:
        return []

    def close(self) -> None:
        pass


EXECUTOR_CHOICES = "local, ray or ray:HOST:PORT"


def valid_choice(text: str) -> bool:
    """Whether `--executor TEXT` names an executor (a host and port where one is given).
    `ray://` passes, so that connecting can say why Ray Client is not supported."""
    if text in ("local", "ray"):
        return True
    for prefix in ("ray://", "ray:"):
        if text.startswith(prefix):
            host, sep, port = text[len(prefix):].rpartition(":")
            return bool(host and sep and port.isdigit() and 0 < int(port) < 65536)
    return False


def make_executor(choice: str | None, config: ProjectConfig,
                  env: Mapping[str, str]) -> Executor:
    """The executor `--executor` (else `[executor] kind`) names; Ray is imported only
    here, only when asked for.  Not connected yet."""
    kind = choice or config.executor.kind
    if kind == "local":
        return LocalExecutor()
    from .ray_executor import RayExecutor, cluster_address

    return RayExecutor(cluster_address(kind, config.executor, env), config.executor,
                       config.root)


def agents_used(agents: Sequence[AgentSpec]) -> dict[str, Mapping[str, float]]:
    """`{agent: resources}` of the agents whose processes an executor starts (the
    `openai` runner is an HTTP request from the driver itself)."""
    return {a.name: a.resources for a in agents if a.runner != "openai"}
