"""Which runner runs which task: a `Runner` that routes each job by its agent's preset.

The scheduler is given one runner; a run mixes command agents, `shell` and agents
run by presets, so `RunnerSet` picks per job (`job.agent.runner`, None meaning the
plain command runner).  Presets are created on first use and share one base
environment, so `DryRunRunner(RunnerSet())` shows each preset's real argv.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from ..executor import Executor, LocalExecutor
from ..orphans import AgentRegistry
from ..presets import PRESETS, RUNNER_NAMES
from ..process import KILL_GRACE_S
from .attempt import AttemptRunner
from .base import Job, Outcome
from .claude import ClaudeRunner
from .codex import CodexRunner
from .command import CommandRunner
from .gemini import GeminiRunner
from .llm import LlmRunner
from .openai import OpenAIRunner
from .opencode import OpencodeRunner

RUNNERS: dict[str, type[AttemptRunner]] = {cls.name: cls for cls in (
    ClaudeRunner, CodexRunner, GeminiRunner, OpencodeRunner, LlmRunner, OpenAIRunner)}
"""Which class runs each preset of presets.RUNNER_NAMES (the one list of them)."""
if tuple(RUNNERS) != RUNNER_NAMES:
    raise AssertionError("runners.registry.RUNNERS must cover presets.RUNNER_NAMES, in order")


class RunnerSet:
    """Routes each job to the command runner or to its agent's preset."""

    name = "auto"

    def __init__(self, base_env: Mapping[str, str] | None = None,
                 grace: float = KILL_GRACE_S, registry: AgentRegistry | None = None,
                 executor: Executor | None = None) -> None:
        self.executor: Executor = executor or LocalExecutor()
        self.command = CommandRunner(base_env, grace, registry=registry,
                                     executor=self.executor)
        self._env = self.command.base_env
        self._grace = grace
        self._registry = registry
        self._presets: dict[str, AttemptRunner] = {}
        self.checker = self.command.checker  # one schema-check worker for all runners

    async def close_checks(self) -> None:
        """Stops the schema-check worker; the next check starts a new one."""
        await self.checker.aclose()

    def runner_for(self, job: Job) -> AttemptRunner:
        name = job.agent.runner
        if name is None:
            return self.command
        runner = self._presets.get(name)
        if runner is None:
            runner = self._presets[name] = RUNNERS[name](
                self._env, self._grace, registry=self._registry, executor=self.executor)
            runner.checker = self.checker
        return runner

    def describe(self, job: Job) -> str:
        return self.runner_for(job).describe(job)

    async def run(self, job: Job) -> Outcome:
        return await self.runner_for(job).run(job)


@dataclass(frozen=True)
class Probe:
    """What `doctor` found out about one CLI."""

    runner: str
    path: str | None
    version: str | None
    problem: str | None = None


def probe(runner: str, path_env: str | None = None, timeout: float = 10.0,
          prefix: list[str] | None = None) -> Probe:
    """Find a preset's executable and ask it for `--version` (stdin closed, time-limited).

    `prefix` is a configured replacement executable (`[runners.X] command`).
    """
    import shutil

    preset = PRESETS[runner]
    exe = prefix[0] if prefix else preset.executable
    if not exe:
        return Probe(runner, None, None, "no executable (HTTP runner)")
    path = shutil.which(exe, path=path_env)
    if path is None:
        return Probe(runner, None, None, f"'{exe}' not found on PATH")
    argv = [path, *(prefix[1:] if prefix else []), *preset.version_args]
    shown = " ".join([exe, *argv[1:]])
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return Probe(runner, path, None, f"`{shown}` did not answer in {timeout:g}s")
    except OSError as exc:
        return Probe(runner, path, None, f"cannot run {path}: {exc.strerror or exc}")
    text = (proc.stdout.strip() or proc.stderr.strip()).splitlines()
    if proc.returncode != 0:
        first = text[0] if text else ""
        return Probe(runner, path, None,
                     f"`{shown}` exited with code {proc.returncode} {first}".strip())
    return Probe(runner, path, text[0] if text else "(no version printed)")
