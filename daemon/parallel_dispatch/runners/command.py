"""The real runner: an argv list from `.aiwg/dispatch.toml` run as a subprocess.

The prompt goes on stdin (or as the last argument), never through a shell,
unless the agent *is* the explicit `shell` agent.  stdout is the child's
file descriptor pointing straight at the staged output, stderr at the task log.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext as _nullcontext
from pathlib import Path
from typing import IO

import trio

from ..agent_env import agent_environment, expand_references
from ..events import Activity
from ..fmt import plural
from ..inputs import compose_prompt, inputs_env
from ..model import MAX_ARG_BYTES
from ..orphans import AgentRegistry
from ..outputs import Staging, open_creating_dirs, staging_for
from ..process import KILL_GRACE_S, run_in_group
from .base import Job, Outcome


class CommandRunner:
    """Runs configured agents as real processes, each in its own process group."""

    name = "command"

    def __init__(self, base_env: Mapping[str, str] | None = None,
                 grace: float = KILL_GRACE_S, registry: AgentRegistry | None = None) -> None:
        self.base_env = dict(os.environ if base_env is None else base_env)
        """The user's environment as given, deny-list included: presets share it, and
        `${NAME}` in an agent's `env` refers to it. Agents get `env()`, never this."""
        self._inherited = agent_environment(self.base_env)
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
        """What the agent runs with (README, "What an agent's environment holds"): the
        user's environment minus the deny-list (`agent_env.py`), the agent's `env`, then
        the DISPATCH_* variables."""
        agent = job.agent
        env = dict(self._inherited)
        env.update(expand_references(agent.env, self.base_env))
        key = agent.api_key_env  # naming the key's variable is as explicit as `env`
        if key and key not in agent.env and key in self.base_env:
            env[key] = self.base_env[key]
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
        try:
            staging.create(agent_writes=job.agent.output_mode == "file")
            outcome = await self._run(job, staging)
            if outcome.ok:
                staging.promote()
        except OSError as exc:  # the output dir filled up, went read-only, ran out of fds
            outcome = Outcome(ok=False, error=io_error_message(exc, job),
                              retryable=is_transient(exc))
        except BaseException:
            staging.discard()
            raise
        if not outcome.ok:
            note = staging.discard()
            if note:
                outcome.error = f"{outcome.error}; {note}" if outcome.error else note
        return outcome

    async def _run(self, job: Job, staging: Staging) -> Outcome:
        prompt = compose_prompt(job.spec, job.index)
        argv = self.argv(job, staging.target, prompt)
        stdin = b"" if job.agent.prompt_mode == "arg" else prompt.encode("utf-8")
        if _is_builtin_shell(job) and len(prompt.encode()) > MAX_ARG_BYTES:
            # Linux refuses one argument of 128 KiB or more (E2BIG): run it from a file.
            script = staging.root / "script.sh"
            script.parent.mkdir(parents=True, exist_ok=True)
            script.write_text(prompt, encoding="utf-8")
            argv = [argv[0], str(script)]
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
                failed: OSError | None = None
                async with trio.open_nursery() as nursery:
                    if job.activity is not None and job.activity.idle_s is not None:
                        nursery.start_soon(_watch_growth, job.activity, out, log)
                    try:  # inside the nursery, or the error reaches us wrapped in a group
                        result = await run_in_group(
                            argv, cwd=str(job.spec.root), env=env,
                            stdin=stdin, stdout=out, stderr=log, grace=self.grace,
                            **self._registry_hooks(job))
                    except OSError as exc:
                        failed = exc
                    nursery.cancel_scope.cancel()
                if failed is not None:
                    msg = f"cannot start '{argv[0]}': {io_error_message(failed, job)}"
                    log.write(f"error: {msg}\n".encode())
                    return Outcome(ok=False, error=msg, retryable=is_transient(failed))
            log.write(f"=== exit code {result.returncode}\n".encode())
        if result.survivors:  # they may still write: this output must not be promoted
            return Outcome(ok=False, exit_code=result.returncode, pid=result.pid,
                           retryable=False, error=_survivors_message(result.survivors))
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


def _is_builtin_shell(job: Job) -> bool:
    agent = job.agent
    return agent.source == "built-in" and agent.command == ("/bin/sh", "-c")


def is_transient(exc: OSError) -> bool:
    """Out of file descriptors or processes: the same attempt may work a moment later."""
    return exc.errno in (errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM)


def io_error_message(exc: OSError, job: Job) -> str:
    """An OSError as a user reads it: what failed, and what to do."""
    where = f" ({exc.filename})" if exc.filename else ""
    text = f"{exc.strerror or exc}{where}"
    if exc.errno == errno.E2BIG:
        return (f"{text}: the command line is too long (one argument is limited to 128 KiB); "
                f"set prompt = \"stdin\" for agent '{job.task.agent}' ({job.agent.source})")
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return (f"{text}: out of file descriptors (ulimit -n is {soft}); raise it or lower "
                "max_parallel")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{text}: the disk holding the output dir is full; free some space"
    if exc.errno == errno.EROFS:
        return f"{text}: the output dir is on a read-only file system; choose another"
    return text


def _survivors_message(pids: list[int]) -> str:
    shown = ", ".join(map(str, pids[:10]))
    return (f"{plural(len(pids), 'process', 'processes')} the agent started could not be "
            f"killed (pids {shown}; "
            "stuck in the kernel?); the output was not promoted, since they could still "
            "write to it")


def _exit_message(code: int) -> str:
    if code < 0:
        import signal

        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"agent was killed by {name}"
    return f"agent exited with code {code}"


