"""`RayExecutor`: each attempt's process runs on a node of a Ray cluster.

Only *where the process runs* moves: the driver (this process) keeps the scheduler,
prompts, staging, presets' parsing, retries, budgets, quota pools and the report.  An
attempt becomes one Ray task (a streaming generator, `remote.attempt` on the node) that
yields the agent's output in chunks; they are written into the same local files and
pipes a local process would have written, so the runners read them unchanged.

Ray's own habits are switched off where they would lie to the report or leak:

* engine retries are off (`max_retries=0`, which also means no OOM retries, and
  `retry_exceptions=False`): a lost worker or node is an `Exit.lost`, retried under the
  task's own policy, so attempts and costs stay true;
* cancellation (timeout, Ctrl-C, a budget stop) is `ray.cancel`, a wait of `grace` for
  the shepherd to kill the agent's group, then a forced cancel; the shepherd (shepherd.py)
  kills the group even when the worker dies first;
* no pid of a remote process ever reaches the local orphan registry.

Imported only when `--executor ray…` or `[executor] kind = "ray"` asks for it, because
`import ray` alone takes ~0.4 s and the extra is optional (`parallel-dispatch[ray]`).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import trio

from . import remote
from .config import ExecutorConfig, ProjectConfig
from .errors import Diagnostic, DispatchError
from .executor import ExecRequest, Exit

PULL_S = 0.5
"""How long one wait for the next chunk may block a thread (cancellation is seen after)."""
CONNECT_S = 10.0
"""How long the cluster's address may take to accept a connection."""
SETTLE_S = 5.0
"""Beyond the grace: how long a cancelled remote attempt may take to end."""

LOST = ("WorkerCrashedError", "NodeDiedError", "LocalRayletDiedError", "OutOfMemoryError",
        "ObjectLostError", "OwnerDiedError", "RaySystemError", "TaskCancelledError",
        "ActorDiedError", "ObjectFetchTimedOutError", "ReferenceCountingAssertionError")
"""Ray errors that mean the attempt's worker or node went away, not the agent failing."""


class ExecutorError(DispatchError):
    """The cluster cannot be used (unreachable, refused, no Ray installed)."""


def cluster_address(choice: str, config: ExecutorConfig, env: Mapping[str, str]) -> str:
    """`--executor ray` (config or RAY_ADDRESS, else `auto`), `ray:HOST:PORT`, or
    `ray://HOST:PORT` (Ray Client, refused by `connect`) as the address `ray.init`
    takes."""
    if choice.startswith("ray://"):
        return choice
    if choice.startswith("ray:"):
        return choice[len("ray:"):]
    return config.address or env.get("RAY_ADDRESS") or "auto"


def _attempt_on_node(req: dict[str, Any], blob: bytes | None, workspace: str,
                     forward_env: list[str]) -> Iterator[tuple[Any, ...]]:
    """The Ray task: say where it runs, then run `remote.attempt` there."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    yield ("node", node_id, ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
    env = dict(req["env"])
    env.update({k: os.environ[k] for k in forward_env if k in os.environ})
    yield from remote.attempt({**req, "env": env}, blob, workspace)


class RayExecutor:
    """Runs attempts on a Ray cluster; `connect` first (blocking, ~0.6 s)."""

    name = "ray"
    local = False

    def __init__(self, address: str, config: ExecutorConfig, root: Path) -> None:
        self.address = address
        self.config = config
        self.root = root
        self._task: Any = None

    # -- the connection ------------------------------------------------------------
    def connect(self) -> None:
        """Join the cluster as a driver (ExecutorError with what to do, if it can't)."""
        if self.address.startswith("ray://"):
            raise ExecutorError(
                f"{self.address}: Ray Client (ray://) is not supported: through it a Ray "
                "task cannot stream (Ray 2.60 returns a plain ClientObjectRef for a "
                "streaming generator), and an agent's output must stream back as it comes; "
                "connect to the head's GCS address instead, --executor ray:HOST:6379 "
                "(the driver must then reach the cluster's nodes: run it on a node or in "
                "the cluster's network)")
        try:
            import ray
        except ImportError:
            raise ExecutorError("the Ray executor needs Ray: pip install "
                                "'parallel-dispatch[ray]' (on the driver and every node)"
                                ) from None
        self._reachable()
        runtime_env: dict[str, Any] = {}
        if self.config.workspace == "working_dir":
            runtime_env = {"working_dir": str(self.root),
                           "excludes": [*DEFAULT_EXCLUDES, *self.config.excludes]}
        try:
            ray.init(address=self.address, runtime_env=runtime_env or None,
                     namespace="parallel-dispatch", logging_level=logging.ERROR,
                     log_to_driver=False)
        except Exception as exc:  # ConnectionError, AuthenticationError, RuntimeError...
            raise ExecutorError(
                f"cannot join the Ray cluster at {self.address}: "
                f"{type(exc).__name__}: {_first_line(exc)}; is it running (`ray start "
                "--head`), and does RAY_AUTH_MODE/RAY_AUTH_TOKEN match the cluster's?"
            ) from None
        self._task = ray.remote(_attempt_on_node)

    def _reachable(self) -> None:
        """Fail in seconds, not minutes: `ray.init` retries an address that refuses
        connections for about a minute before it gives up."""
        import socket

        address = self.address.removeprefix("ray://")
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit():
            return  # "auto": Ray finds the local cluster itself
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_S):
                pass
        except OSError as exc:
            raise ExecutorError(
                f"cannot join the Ray cluster at {self.address}: nothing answers there "
                f"({exc.strerror or exc}); start it (`ray start --head --port={port}`) "
                "or fix --executor / [executor] address") from None

    def close(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()

    def nodes(self) -> list[dict[str, Any]]:
        """Alive nodes: `{"id", "address", "resources"}`."""
        import ray

        return [{"id": n["NodeID"], "address": n["NodeManagerAddress"],
                 "resources": dict(n.get("Resources") or {})}
                for n in ray.nodes() if n.get("Alive")]  # type: ignore[no-untyped-call]

    def check(self, config: ProjectConfig, agents: Mapping[str, Mapping[str, float]]
              ) -> list[Diagnostic]:
        """Every agent's resources must fit one alive node, or its tasks would wait
        forever (Ray does not fail them): an error naming the config line instead."""
        nodes = self.nodes()
        out = []
        for name, own in sorted(agents.items()):
            need = {**self.config.resources, **own}
            if not need or any(all(n["resources"].get(k, 0) >= v for k, v in need.items())
                               for n in nodes):
                continue
            offered = "; ".join(
                f"{n['address']} ({n['id'][:8]}): " + ", ".join(
                    f"{k}={v:g}" for k, v in sorted(n["resources"].items())
                    if not k.startswith("node:") and "memory" not in k)
                for n in nodes) or "no alive nodes"
            key = (f"agents.{name}.resources" if f"agents.{name}.resources" in config.lines
                   else "executor.resources")
            wanted = ", ".join(f"{k} = {v:g}" for k, v in sorted(need.items()))
            out.append(Diagnostic(
                str(config.path or ".aiwg/dispatch.toml"), config.lines.get(key), None,
                f"agent '{name}' needs {{{wanted}}} of a Ray node, and no node of the "
                f"cluster at {self.address} has that (nodes: {offered}); start a node "
                "with it (`ray start --resources=...`) or change the agent's resources"))
        return out

    # -- one attempt -----------------------------------------------------------------
    async def run(self, req: ExecRequest, *, stdout: IO[bytes] | int,
                  stderr: IO[bytes] | int,
                  on_spawn: Callable[[int], None] | None = None,
                  on_reaped: Callable[[int], None] | None = None) -> Exit:
        """Run `req` on a node; `on_spawn`/`on_reaped` are not called (no local pid)."""
        shipping = self.config.workspace == "working_dir"
        blob = await trio.to_thread.run_sync(remote.pack, list(req.sends), req.tree) \
            if shipping else None
        payload = {"argv": list(req.argv), "cwd": req.cwd, "env": dict(req.env),
                   "stdin": req.stdin, "grace": req.grace, "deadline_s": req.deadline_s,
                   "root": req.root, "sends": list(req.sends),
                   "returns": list(req.returns), "tree": req.tree, "label": req.label}
        gen = self._task.options(
            num_cpus=0, resources={**self.config.resources, **req.resources},
            max_retries=0, retry_exceptions=False, name=f"parallel-dispatch {req.label}",
            _generator_backpressure_num_objects=16,
        ).remote(payload, blob, self.config.workspace, list(self.config.forward_env))
        fds = {"out": _fileno(stdout), "err": _fileno(stderr)}
        node: str | None = None
        try:
            while True:
                item = await trio.to_thread.run_sync(_pull, gen, abandon_on_cancel=True)
                if item is None:
                    continue
                kind = item[0]
                if kind in fds:
                    await trio.to_thread.run_sync(_write_all, fds[kind], item[1])
                elif kind == "node":
                    node = f"{item[2]} ({item[1][:8]})"
                    if req.on_node is not None:
                        req.on_node(node)
                elif kind == "exit":
                    return await self._finish(req, item[1], node)
                elif kind == "error":
                    return _failure(item[1], node, req)
                else:  # "end" before "exit": the task returned without a status
                    return Exit(-1, -1, node=node,
                                lost="the Ray task ended without the agent's exit status")
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_cancel, gen, req.grace)
            raise

    async def _finish(self, req: ExecRequest, status: dict[str, Any],
                      node: str | None) -> Exit:
        if "spawn_error" in status:
            code, text = status["spawn_error"]
            raise OSError(code or errno.EIO, f"{text} (on Ray node {node})", req.argv[0])
        if status.get("returns"):
            await trio.to_thread.run_sync(remote.unpack_returns, status["returns"],
                                          list(req.returns))
        if status.get("patch") and req.tree is not None:
            await _apply(Path(req.tree), status["patch"])
        cause = status.get("cause")
        if cause in ("deadline", "lost"):
            why = ("the node's backstop deadline stopped the agent" if cause == "deadline"
                   else "the shepherd on the node ended without the agent's exit status")
            return Exit(-1, -1, node=node, lost=why)
        return Exit(int(status["code"]), -1, list(status.get("survivors") or []), node=node)


DEFAULT_EXCLUDES = (".git", ".aiwg/working/", ".aiwg/worktrees/", ".aiwg/run/", ".venv/",
                    "node_modules/", "__pycache__/")
"""Never uploaded with `working_dir`: outputs, worktrees and environments are big and
the driver ships what an attempt needs of them itself."""


def _pull(gen: Any) -> tuple[Any, ...] | None:
    """The next item of the attempt's stream: None when nothing came within `PULL_S`,
    `("end",)` when it ended, `("error", exc)` when Ray raised."""
    import ray

    try:
        ref = gen._next_sync(timeout_s=PULL_S)
        if ref.is_nil():
            return None
        item: tuple[Any, ...] = ray.get(ref)
        return item
    except StopIteration:
        return ("end",)
    except ray.exceptions.RayError as exc:
        return ("error", exc)


def _cancel(gen: Any, grace: float) -> None:
    """Ask nicely (the worker closes the shepherd's `life` pipe: SIGTERM, grace,
    SIGKILL), then force (the worker dies; the shepherd still kills the group)."""
    import ray

    for force, wait in ((False, grace + SETTLE_S), (True, SETTLE_S)):
        try:
            ray.cancel(gen, force=force)
        except Exception:  # already finished, or the node is gone
            return
        ready, _ = ray.wait([gen.completed()], timeout=wait)
        if ready:
            return


def _failure(exc: BaseException, node: str | None, req: ExecRequest) -> Exit:
    """A Ray error as an attempt's end: lost workers and nodes are retried by policy;
    anything else could not start the agent on the node."""
    cause = getattr(exc, "cause", None) or exc
    names = {type(exc).__name__, type(cause).__name__}
    if names & set(LOST):
        name = next(n for n in (type(cause).__name__, type(exc).__name__) if n in LOST)
        return Exit(-1, -1, node=node, lost=f"Ray {name} on node {node or '(unknown)'}: "
                                             f"{_first_line(cause)}")
    if "RuntimeEnvSetupError" in names:
        raise OSError(errno.EIO, "Ray could not set up the project's working_dir on the node "
                                 f"(is it over 512 MiB? add [executor] excludes): "
                                 f"{_first_line(cause)}", req.argv[0])
    raise OSError(errno.EIO, f"on Ray node {node}: {type(cause).__name__}: "
                             f"{_first_line(cause)}", req.argv[0])


async def _apply(tree: Path, patch: bytes) -> None:
    """The node's changes to the worktree, applied to the driver's worktree."""
    import tempfile

    from .worktree import git

    with tempfile.NamedTemporaryFile(suffix=".patch", dir=tree.parent) as fh:
        fh.write(patch)
        fh.flush()
        await git(["apply", "--binary", "--whitespace=nowarn", fh.name], tree)


def _fileno(target: IO[bytes] | int) -> int:
    return target if isinstance(target, int) else target.fileno()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1][:300] if text else type(exc).__name__
