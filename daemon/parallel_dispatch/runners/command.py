"""The command runner: an argv list from `.aiwg/dispatch.toml` run as a subprocess.

The prompt goes on stdin (or as the last argument), never through a shell,
unless the agent *is* the explicit `shell` agent.  stdout is the child's
file descriptor pointing straight at the staged output, stderr at the task log.
Staging, the log header, the environment and the messages are `AttemptRunner`'s.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from contextlib import nullcontext as _nullcontext
from pathlib import Path
from typing import IO

import trio

from ..events import Activity
from ..executor import Executor
from ..inputs import compose_prompt
from ..model import MAX_ARG_BYTES
from ..orphans import AgentRegistry
from ..outputs import Staging
from ..process import KILL_GRACE_S
from .attempt import AttemptRunner, exit_message, io_error_message, is_transient, survivors_message
from .base import Job, Outcome


class CommandRunner(AttemptRunner):
    """Runs configured agents as real processes, each in its own process group."""

    name = "command"

    @property
    def error_prefix(self) -> str:
        return ""  # the command is the user's own: its errors need no runner named

    def __init__(self, base_env: Mapping[str, str] | None = None,
                 grace: float = KILL_GRACE_S, registry: AgentRegistry | None = None,
                 executor: Executor | None = None) -> None:
        super().__init__(base_env, grace, registry, executor)
        self._described: dict[tuple[tuple[str, ...], str], str] = {}
        self._on_path: set[str] = set()

    def _found(self, command: str) -> bool:
        """Whether `command` is on PATH.  A hit is remembered: one lookup per command, not
        per task (one that vanishes later fails to start, with the OS error named)."""
        if command in self._on_path or not self.executor.local:
            return True  # a remote node looks it up on its own PATH
        if shutil.which(command, path=self.base_env.get("PATH")) is None:
            return False
        self._on_path.add(command)
        return True

    def argv(self, job: Job, output: Path | str, prompt: str) -> list[str]:
        values = {
            "agent": job.task.agent,
            "task_id": job.task.id,
            "output": str(output),
            "output_dir": str(job.spec.settings.output_dir),
            "project": str(job.spec.root),
        }
        argv = job.agent.argv(values)
        if job.agent.prompt_mode == "arg":
            argv.append(prompt)
        return argv

    def describe(self, job: Job) -> str:
        agent = job.agent
        key = (agent.command, agent.prompt_mode)
        cached = self._described.get(key)  # only constant commands are stored
        if cached is not None:  # plans of 50,000 shell tasks
            return cached
        constant = not agent.has_placeholders
        argv = self.argv(job, job.spec.output_text(job.index), "<prompt>")
        how = "prompt on stdin" if agent.prompt_mode == "stdin" else "prompt as last argument"
        text = f"{' '.join(argv)}  ({how})"
        if constant:
            self._described[key] = text
        return text

    async def attempt(self, job: Job, staging: Staging) -> Outcome:
        # The built-in shell agent's prompt is a script: nothing is appended to it (a
        # schema reaches it as $DISPATCH_OUTPUT_SCHEMA).
        prompt = (compose_prompt(job.spec, job.index) if _is_builtin_shell(job)
                  else self.prompt(job))
        argv = self.argv(job, staging.target, prompt)
        stdin = b"" if job.agent.prompt_mode == "arg" else prompt.encode("utf-8")
        if _is_builtin_shell(job) and len(prompt.encode()) > MAX_ARG_BYTES:
            # Linux refuses one argument of 128 KiB or more (E2BIG): run it from a file.
            script = staging.root / "script.sh"
            script.parent.mkdir(parents=True, exist_ok=True)
            script.write_text(prompt, encoding="utf-8")
            argv = [argv[0], str(script)]
        with self.open_log(job, argv) as log:
            if not self._found(argv[0]):
                return self.failed(log, f"command '{argv[0]}' not found on PATH (agent "
                                        f"'{job.task.agent}', configured in "
                                        f"{job.agent.source}); install it or fix 'command'",
                                   retryable=False)
            env = self.env(job, staging.target)
            # output = "file": the agent writes {output} itself; its stdout joins the log.
            to_file = job.agent.output_mode == "stdout"
            with staging.open_stdout() if to_file else _nullcontext(log) as out:
                failed: OSError | None = None
                async with trio.open_nursery() as nursery:
                    if job.activity is not None and job.activity.idle_s is not None:
                        nursery.start_soon(_watch_growth, job.activity, out, log)
                    try:  # inside the nursery, or the error reaches us wrapped in a group
                        result = await self.executor.run(
                            self.request(job, staging, argv, env, stdin),
                            stdout=out, stderr=log, **self.hooks(job))
                    except OSError as exc:
                        failed = exc
                    nursery.cancel_scope.cancel()
                if failed is not None:
                    return self.failed(log, f"cannot start '{argv[0]}': "
                                            f"{io_error_message(failed, job)}",
                                       retryable=is_transient(failed))
            if result.lost is not None:
                return self.lost(log, result)
            log.write(f"=== exit code {result.returncode}\n".encode())
        node = result.node
        if result.survivors:  # they may still write: this output must not be promoted
            return Outcome(ok=False, exit_code=result.returncode, pid=result.pid, node=node,
                           retryable=False, error=survivors_message(result.survivors))
        if result.returncode != 0:
            return Outcome(ok=False, exit_code=result.returncode, pid=result.pid, node=node,
                           error=exit_message(result.returncode))
        if job.agent.output_mode == "file" and not _wrote(staging):
            return Outcome(ok=False, exit_code=0, pid=result.pid, node=node, retryable=False,
                           error="agent exited 0 but did not write its output "
                                 "(output = \"file\" expects it at {output})")
        return Outcome(ok=True, exit_code=0, pid=result.pid, node=node)


async def _watch_growth(activity: Activity, *files: IO[bytes]) -> None:
    """A command agent's output goes straight to files, so its liveness for
    `idle_timeout` is their growth, checked a few times per idle period."""
    idle = activity.idle_s or 1.0
    interval = min(1.0, idle / 4)
    sizes = [os.fstat(f.fileno()).st_size for f in files]
    while True:
        await trio.sleep(interval)
        now = [os.fstat(f.fileno()).st_size for f in files]
        if now != sizes:
            sizes = now
            activity.saw_output()


def _wrote(staging: Staging) -> bool:
    if staging.is_directory:
        return any(p for p in staging.target.iterdir() if p != staging.stdout) or (
            staging.stdout.exists() and staging.stdout.stat().st_size > 0)
    return staging.target.exists() and staging.target.stat().st_size > 0


def _is_builtin_shell(job: Job) -> bool:
    agent = job.agent
    return agent.source == "built-in" and agent.command == ("/bin/sh", "-c")
