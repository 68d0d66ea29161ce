"""The real runner: an argv list from `.aiwg/dispatch.toml` run as a subprocess.

The prompt goes on stdin (or as the last argument), never through a shell,
unless the agent *is* the explicit `shell` agent.  stdout is the child's
file descriptor pointing straight at the staged output, stderr at the task log.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext as _nullcontext
from pathlib import Path
from typing import IO

import trio

from ..events import Activity
from ..inputs import compose_prompt, inputs_env
from ..orphans import AgentRegistry
from ..outputs import Staging, open_creating_dirs, staging_for
from ..process import KILL_GRACE_S, run_in_group
from .base import Job, Outcome

CHILD_ENV_DROP = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")
"""systemd hands these to the daemon alone; an agent must not ping the watchdog."""


class CommandRunner:
    """Runs configured agents as real processes, each in its own process group."""

    name = "command"

    def __init__(self, base_env: Mapping[str, str] | None = None,
                 grace: float = KILL_GRACE_S, registry: AgentRegistry | None = None) -> None:
        env = dict(os.environ if base_env is None else base_env)
        for key in CHILD_ENV_DROP:
            env.pop(key, None)
        self.base_env = env
        self.grace = grace
        self.registry = registry
        self._described: dict[tuple[tuple[str, ...], str], str] = {}

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

    def env(self, job: Job, output: Path) -> dict[str, str]:
        env = dict(self.base_env)
        env.update(job.agent.env)
        env.update({
            "DISPATCH_TASK_ID": job.task.id,
            "DISPATCH_AGENT": job.task.agent,
            "DISPATCH_OUTPUT": str(output),
            "DISPATCH_OUTPUT_DIR": str(job.spec.settings.output_dir),
            "DISPATCH_RUN_ID": job.run_id,
            "DISPATCH_INPUTS": inputs_env(job.input_paths()),
            "DISPATCH_ATTEMPT": str(job.attempt),
            "DISPATCH_PROJECT": str(job.spec.root),
            # The agent runs in the project root; Node and Bun tools (opencode) resolve
            # their project from $PWD, so it must not be the dispatcher's own folder.
            "PWD": str(job.spec.root),
        })
        return env

    def _registry_hooks(self, job: Job) -> dict[str, Callable[[int], None]]:
        reg = self.registry
        if reg is None:
            return {}
        return {"on_spawn": lambda pid: reg.add(pid, job.run_id), "on_reaped": reg.remove}

    def describe(self, job: Job) -> str:
        agent = job.agent
        key = (agent.command, agent.prompt_mode)
        constant = not agent.has_placeholders
        if constant and key in self._described:  # plans of 50,000 shell tasks
            return self._described[key]
        argv = self.argv(job, job.spec.output_text(job.index), "<prompt>")
        how = "prompt on stdin" if agent.prompt_mode == "stdin" else "prompt as last argument"
        text = f"{' '.join(argv)}  ({how})"
        if constant:
            self._described[key] = text
        return text

    async def run(self, job: Job) -> Outcome:
        staging = staging_for(job.spec, job.index, job.run_id, job.attempt)
        staging.create(agent_writes=job.agent.output_mode == "file")
        try:
            outcome = await self._run(job, staging)
        except BaseException:
            staging.discard()
            raise
        if outcome.ok:
            staging.promote()
        else:
            staging.discard()
        return outcome

    async def _run(self, job: Job, staging: Staging) -> Outcome:
        prompt = compose_prompt(job.spec, job.index)
        argv = self.argv(job, staging.target, prompt)
        stdin = b"" if job.agent.prompt_mode == "arg" else prompt.encode("utf-8")
        with open_creating_dirs(job.log_path, "wb" if job.attempt == 1 else "ab") as log:
            log.write(_header(job, argv).encode())
            log.flush()
            exe = shutil.which(argv[0], path=self.base_env.get("PATH"))
            if exe is None:
                msg = (f"command '{argv[0]}' not found on PATH (agent '{job.task.agent}', "
                       f"configured in {job.agent.source}); install it or fix 'command'")
                log.write(f"error: {msg}\n".encode())
                return Outcome(ok=False, error=msg, retryable=False)
            env = self.env(job, staging.target)
            # output = "file": the agent writes {output} itself; its stdout joins the log.
            to_file = job.agent.output_mode == "stdout"
            with staging.open_stdout() if to_file else _nullcontext(log) as out:
                try:
                    async with trio.open_nursery() as nursery:
                        if job.activity is not None and job.activity.idle_s is not None:
                            nursery.start_soon(_watch_growth, job.activity, out, log)
                        result = await run_in_group(
                            argv, cwd=str(job.spec.root), env=env,
                            stdin=stdin, stdout=out, stderr=log, grace=self.grace,
                            **self._registry_hooks(job))
                        nursery.cancel_scope.cancel()
                except OSError as exc:
                    msg = f"cannot start '{argv[0]}': {exc.strerror or exc}"
                    log.write(f"error: {msg}\n".encode())
                    return Outcome(ok=False, error=msg, retryable=False)
            log.write(f"=== exit code {result.returncode}\n".encode())
        if result.returncode != 0:
            return Outcome(ok=False, exit_code=result.returncode, pid=result.pid,
                           error=_exit_message(result.returncode))
        if job.agent.output_mode == "file" and not _wrote(staging):
            return Outcome(ok=False, exit_code=0, pid=result.pid, retryable=False,
                           error="agent exited 0 but did not write its output "
                                 "(output = \"file\" expects it at {output})")
        return Outcome(ok=True, exit_code=0, pid=result.pid)


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


def _header(job: Job, argv: list[str]) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    shown = [a if len(a) <= 200 else a[:200] + "…" for a in argv]
    return (f"=== {stamp} run {job.run_id} task {job.task.id} attempt {job.attempt}\n"
            f"=== argv: {shown}\n")


def _exit_message(code: int) -> str:
    if code < 0:
        import signal

        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"agent was killed by {name}"
    return f"agent exited with code {code}"


