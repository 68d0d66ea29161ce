"""What every real runner does around one attempt, whatever starts the work.

ninja's `CommandRunner` is a small interface with sibling implementations; so is ours
(`Runner` in base.py).  The real ones — `CommandRunner` (an argv from the config),
`PresetRunner` (a coding-agent CLI) and `OpenAIRunner` (an HTTP request) — share what
this base owns, so each of them only says how it makes the agent work:

* staging: the output is written under a staging name, promoted (renamed into place)
  only when the attempt succeeded, otherwise discarded or kept in logs/ for reading;
* the task log: opened per attempt (truncated by the first), with a header naming the
  run, task, attempt and what was started;
* the agent's environment (`agent_env.py`, README "What an agent's environment holds");
* the registry of started agents (`orphans.py`), so a killed dispatcher's agents are
  found at the next start;
* the messages for an exit code, a signal, unkillable survivors and OSErrors.

A subclass implements `attempt(job, staging)` and `describe(job)`.  Cancellation:
`run` discards the staging area and re-raises; `attempt` must kill what it started
(process.run_in_group and httpx both do when cancelled).
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, ClassVar

from ..agent_env import agent_environment, expand_references
from ..executor import ExecRequest, Executor, Exit, LocalExecutor
from ..fmt import plural
from ..inputs import compose_prompt, inputs_env
from ..orphans import AgentRegistry
from ..output_schema import MISMATCH, SCHEMA_FILE, SchemaUnusable, prompt_note
from ..outputs import Staging, open_creating_dirs, staging_for
from ..process import KILL_GRACE_S
from ..schema_check import SchemaChecker, SchemaCheckTimeout
from .base import Job, Outcome


class AttemptRunner:
    """Base of the real runners: staging, the log, the environment, the registry."""

    name: ClassVar[str] = "attempt"
    native_schema: ClassVar[bool] = False
    """Whether the client itself constrains the answer to `output_schema` (claude, codex,
    llm, openai); otherwise the schema goes into the prompt and the answer is read
    leniently (output_schema.py)."""

    def __init__(self, base_env: Mapping[str, str] | None = None,
                 grace: float = KILL_GRACE_S, registry: AgentRegistry | None = None,
                 executor: Executor | None = None) -> None:
        self.base_env = dict(os.environ if base_env is None else base_env)
        """The user's environment as given, deny-list included: runners share it, and
        `${NAME}` in an agent's `env` refers to it. Agents get `env()`, never this."""
        self._inherited = agent_environment(self.base_env)
        self.grace = grace
        self.registry = registry
        self.executor: Executor = executor or LocalExecutor()
        """Where agent processes run (executor.py): this machine, or a Ray cluster."""
        self._schema_errors: dict[tuple[str, str], list[str]] = {}
        self.checker = SchemaChecker()
        """Where answers are checked against `output_schema`; a `RunnerSet` shares one."""
        """(run id, task id) → why the last attempt's answer did not match its schema,
        for the next attempt's prompt."""

    @property
    def error_prefix(self) -> str:
        """Put before every error this runner reports: which runner failed."""
        return f"{self.name} runner: "

    # -- to implement --------------------------------------------------------------
    def describe(self, job: Job) -> str:
        """One line saying what `run` would do (for plans and progress)."""
        raise NotImplementedError

    async def attempt(self, job: Job, staging: Staging) -> Outcome:
        """Make the agent write its output into `staging`; say how it went."""
        raise NotImplementedError

    # -- the attempt ---------------------------------------------------------------
    async def run(self, job: Job) -> Outcome:
        staging = staging_for(job.spec, job.index, job.run_id, job.attempt)
        schema = job.task.output_schema
        try:
            staging.create(agent_writes=job.agent.output_mode == "file")
            if isinstance(schema, dict):
                write_schema_file(staging, schema)
            outcome = await self.attempt(job, staging)
            if outcome.ok and isinstance(schema, dict):
                await self._check_answer(job, staging, schema, outcome)
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

    def schema_native(self, job: Job) -> bool:
        """Whether this job's client is given `output_schema` itself (`native_schema`)."""
        return self.native_schema

    def prompt(self, job: Job) -> str:
        """The task's prompt with its dependencies' outputs and, with `output_schema`, what
        the agent must know about the answer's format (and why its last one failed)."""
        prompt = compose_prompt(job.spec, job.index)
        schema = job.task.output_schema
        if not isinstance(schema, dict):
            return prompt
        key = (job.run_id, job.task.id)
        if job.attempt == 1:  # a new task run: nothing of an earlier one applies
            self._schema_errors.pop(key, None)
        previous = self._schema_errors.get(key, [])
        return prompt + prompt_note(schema, self.schema_native(job), previous)

    async def _check_answer(self, job: Job, staging: Staging, schema: dict[str, Any],
                            outcome: Outcome) -> None:
        """Validate the staged answer in the checker's process (`schema_check.py`): it is
        rewritten as canonical JSON, or `outcome` fails (retryable unless the schema
        cannot be applied or the check outran its deadline) and keeps why for the
        retry's prompt."""
        key = (job.run_id, job.task.id)
        try:
            errors = await self.checker.check(staging.target, schema,
                                              lenient=not self.schema_native(job))
        except (SchemaUnusable, SchemaCheckTimeout) as exc:
            errors, outcome.retryable = [str(exc)], False
        if not errors:
            self._schema_errors.pop(key, None)
            return
        self._schema_errors[key] = errors
        outcome.ok = False
        outcome.error = f"{self.error_prefix}{MISMATCH}: {'; '.join(errors)}"
        try:
            with open_creating_dirs(job.log_path, "ab") as log:
                log_error(log, outcome.error)
        except OSError:
            pass  # the error still reaches the report

    def env(self, job: Job, output: os.PathLike[str] | str) -> dict[str, str]:
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
            # The agent runs in the project root (or its worktree); Node and Bun tools
            # (opencode) resolve their project from $PWD, so it must not be the
            # dispatcher's own folder.
            "PWD": str(job.workdir or job.spec.root),
        })
        if isinstance(job.task.output_schema, dict):
            env["DISPATCH_OUTPUT_SCHEMA"] = str(schema_path(job))
        return env

    # -- helpers for `attempt` -------------------------------------------------------
    def open_log(self, job: Job, started: Sequence[str] | str) -> IO[bytes]:
        """The task's log for this attempt (the first attempt starts it afresh), its
        header already written: `started` is what runs (an argv, or a request line)."""
        log = open_creating_dirs(job.log_path, "wb" if job.attempt == 1 else "ab")
        try:
            log.write(header(job, started).encode())
            log.flush()
        except BaseException:
            log.close()
            raise
        return log

    def failed(self, log: IO[bytes] | None, message: str, *, retryable: bool = True,
               exit_code: int | None = None, pid: int | None = None) -> Outcome:
        """A failed attempt whose error (with this runner's prefix) also ends its log."""
        error = f"{self.error_prefix}{message}"
        if log is not None:
            log_error(log, error)
        return Outcome(ok=False, error=error, retryable=retryable, exit_code=exit_code,
                       pid=pid)

    def request(self, job: Job, staging: Staging, argv: Sequence[str],
                env: Mapping[str, str], stdin: bytes) -> ExecRequest:
        """The process to start for this attempt, with what a remote workspace must ship
        (dependency outputs, the staging folder, the worktree) and bring back."""
        timeout = job.spec.timeout_s(job.index)
        return ExecRequest(
            argv=argv, cwd=str(job.workdir or job.spec.root), env=env, stdin=stdin,
            grace=self.grace, root=str(job.spec.root), deadline_s=timeout,
            resources=job.agent.resources,
            sends=(*map(str, job.input_paths().values()), str(staging.root)),
            returns=(str(staging.root),),
            tree=str(job.workdir) if job.workdir is not None else None,
            label=f"{job.task.id}#{job.attempt}", on_node=_node_setter(job))

    def lost(self, log: IO[bytes], result: Exit) -> Outcome:
        """The remote worker or node died mid-attempt: retried under the task's policy,
        as a provider-side failure (the agent itself did nothing wrong)."""
        error = f"{self.error_prefix}{result.lost}"
        log_error(log, error)
        return Outcome(ok=False, error=error, retryable=True, cause="worker_lost",
                       node=result.node)

    def hooks(self, job: Job, on_spawn: Callable[[int], None] | None = None
              ) -> dict[str, Callable[[int], None]]:
        """`Executor.run` hooks: the orphan registry only holds pids of this machine, and
        a remote executor calls none (it has no local pid)."""
        return self.registry_hooks(job, on_spawn) if self.executor.local else {}

    def registry_hooks(self, job: Job,
                       on_spawn: Callable[[int], None] | None = None
                       ) -> dict[str, Callable[[int], None]]:
        """`run_in_group` hooks: the agent's pid joins the registry while it lives
        (after `on_spawn`, the caller's own step)."""
        reg = self.registry
        if reg is None:
            return {} if on_spawn is None else {"on_spawn": on_spawn}

        def spawned(pid: int) -> None:
            if on_spawn is not None:
                on_spawn(pid)
            reg.add(pid, job.run_id)

        return {"on_spawn": spawned, "on_reaped": reg.remove}


def schema_path(job: Job) -> Path:
    """Where this attempt's `output_schema` is as a file (in its staging folder)."""
    return staging_for(job.spec, job.index, job.run_id, job.attempt).root / SCHEMA_FILE


def write_schema_file(staging: Staging, schema: dict[str, object]) -> None:
    """The schema as a file for clients that take one (codex) and for
    `$DISPATCH_OUTPUT_SCHEMA`."""
    staging.root.mkdir(parents=True, exist_ok=True)
    (staging.root / SCHEMA_FILE).write_text(json.dumps(schema, indent=2),
                                            encoding="utf-8")


def _node_setter(job: Job) -> Callable[[str], None] | None:
    return job.activity.ran_on if job.activity is not None else None


def log_error(log: IO[bytes], error: str) -> None:
    log.write(f"error: {error}\n".encode())
    log.flush()


def header(job: Job, started: Sequence[str] | str) -> str:
    """Which run, task and attempt the lines below belong to, and what was started:
    an argv (each argument cut at 200 characters) or, for HTTP, the request."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if isinstance(started, str):
        what = f"request: {started}"
    else:
        what = f"argv: {[a if len(a) <= 200 else a[:200] + '…' for a in started]}"
    return f"=== {stamp} run {job.run_id} task {job.task.id} attempt {job.attempt}\n=== {what}\n"


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


def survivors_message(pids: list[int]) -> str:
    shown = ", ".join(map(str, pids[:10]))
    return (f"{plural(len(pids), 'process', 'processes')} the agent started could not be "
            f"killed (pids {shown}; "
            "stuck in the kernel?); the output was not promoted, since they could still "
            "write to it")


def exit_message(code: int) -> str:
    if code < 0:
        import signal

        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"agent was killed by {name}"
    return f"agent exited with code {code}"
