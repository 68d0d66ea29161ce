"""`agent: X` → the `AgentSpec` that runs it: config, agent definitions, runner presets.

Lookup order, first match wins:

1. `[agents.X]` in `.aiwg/dispatch.toml` (exact name, then folded name for presets).
   With `command` and no `runner` it is a command agent, as always; otherwise it is run
   by `runner` (or the default runner) with X's definition, if there is one.
2. The built-in `shell` agent.
3. `[agents."*"]` with a `command`: every other name runs that command (as before).
4. An agent definition named X (agentdefs.py: `.aiwg/agents/`, `.claude/agents/`, ...),
   run by `[agents."*"]`'s runner, else `[defaults] runner`, else `claude` when it is
   on PATH.

Anything else is a validation error with a did-you-mean.  Runner options merge
`[runners.R]` under the agent's own keys; the model is the configured one, else the
definition's when it suits the runner (a Claude `model: sonnet` means nothing to codex).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import agentdefs
from .agentdefs import AgentDefinition, Discovery, fold
from .agents import FALLBACK, SHELL_AGENT, AgentSpec, resolve_agent
from .config import AgentConfig, ProjectConfig, RunnerConfig
from .presets import RUNNER_NAMES, RunnerName, accepts_model

DEFAULT_CLI: RunnerName = "claude"


class ResolveError(Exception):
    """Why a name does not resolve; the message is the validation error."""


@dataclass(frozen=True)
class AgentRow:
    """One line of `parallel-dispatch agents`."""

    name: str
    runner: str
    model: str | None
    file: str
    spec: AgentSpec | None
    error: str | None = None


class AgentResolver:
    """Resolves names for one project; scans definitions once, and only when needed."""

    def __init__(self, config: ProjectConfig, home: Path | None = None,
                 path_env: str | None = None) -> None:
        self.config = config
        self.home = home
        self.path_env = path_env if path_env is not None else os.environ.get("PATH", "")
        self._discovery: Discovery | None = None
        self._default: tuple[RunnerName | None] | None = None
        self._cache: dict[str, AgentSpec | ResolveError] = {}

    @property
    def discovery(self) -> Discovery:
        if self._discovery is None:
            self._discovery = agentdefs.scan(self.config.root, self.home)
        return self._discovery

    def default_runner(self) -> RunnerName | None:
        """`[defaults] runner`, else `claude` when it is on PATH, else None."""
        if self._default is None:
            chosen = self.config.default_runner
            if chosen is None and shutil.which(DEFAULT_CLI, path=self.path_env):
                chosen = DEFAULT_CLI
            self._default = (chosen,)
        return self._default[0]

    def resolve(self, name: str) -> AgentSpec:
        """The spec for `name`; raises ResolveError with the message to show."""
        hit = self._cache.get(name)
        if hit is None:
            try:
                hit = self._resolve(name)
            except ResolveError as exc:
                hit = exc
            self._cache[name] = hit
        if isinstance(hit, ResolveError):
            raise hit
        return hit

    def _configured(self, name: str) -> tuple[str, AgentConfig] | None:
        agents = self.config.agents
        if name in agents and name != FALLBACK:
            return name, agents[name]
        key = fold(name)
        for other, cfg in agents.items():
            if other != FALLBACK and not cfg.is_command and fold(other) == key:
                return other, cfg
        return None

    def _resolve(self, name: str) -> AgentSpec:
        found = self._configured(name)
        if found is not None:
            key, cfg = found
            if cfg.is_command:
                spec = resolve_agent(name, self.config)
                assert spec is not None
                return spec
            runner = cfg.runner or self.default_runner()
            source = f"[agents.{key}]"
            if runner is None:
                raise ResolveError(
                    f"agent '{name}' ({source}) has neither 'command' nor 'runner', and there is "
                    f"no default runner: {self._no_runner_fix()}")
            return self._preset(name, runner, cfg, self.discovery.get(name), source)
        if name == SHELL_AGENT:
            return resolve_agent(name, self.config) or _never()
        star = self.config.agents.get(FALLBACK)
        if star is not None and star.is_command:
            return resolve_agent(name, self.config) or _never()
        definition = self.discovery.get(name)
        if definition is None:
            raise ResolveError(self.unknown(name))
        if star is not None:
            runner, source = star.runner or self.default_runner(), '[agents."*"]'
        else:
            runner, source = self.default_runner(), self.rel(definition.path)
        if runner is None:
            raise ResolveError(
                f"agent '{name}' is defined in {self.rel(definition.path)} but no runner is "
                f"configured: {self._no_runner_fix()}")
        return self._preset(name, runner, star, definition, source)

    def _preset(self, name: str, runner: RunnerName, cfg: AgentConfig | None,
                definition: AgentDefinition | None, source: str) -> AgentSpec:
        base = self.config.runners.get(runner) or RunnerConfig()
        own = cfg or AgentConfig(runner=runner)
        notes: list[str] = []
        model = own.model or base.model
        if model is None and definition is not None and definition.model:
            if accepts_model(runner, definition.model):
                model = definition.model
            else:
                notes.append(f"model '{definition.model}' of {definition.path.name} is not "
                             f"a model for the {runner} runner and was not passed on")
        if runner == "openai" and model is None:
            raise ResolveError(
                f"agent '{name}' runs on the openai runner, which needs a model: set "
                f"model = \"...\" in [runners.openai] or [agents.{name}] of {self._where()}")
        return AgentSpec(
            name=name,
            command=tuple(own.command or base.command or ()),
            env={**base.env, **own.env},
            inputs=own.inputs or "inline",
            source=source,
            runner=runner,
            definition=definition,
            model=model,
            args=(*base.args, *own.args),
            base_url=own.base_url or base.base_url,
            api_key_env=own.api_key_env or base.api_key_env,
            read_timeout=own.read_timeout or base.read_timeout,
            notes=tuple(notes),
            max_parallel=own.max_parallel if cfg is not None else None,
            runner_max_parallel=base.max_parallel,
            shared_state=bool(base.shared_state if own.shared_state is None
                              else own.shared_state),
            resources={**base.resources, **own.resources},
        )

    # -- messages -------------------------------------------------------------
    def known(self) -> list[str]:
        names = {n for n in self.config.agents if n != FALLBACK} | {SHELL_AGENT}
        return sorted({*names, *self.discovery.names()}, key=fold)

    def unknown(self, name: str) -> str:
        configured = [n for n in self.config.agents if n != FALLBACK] + [SHELL_AGENT]
        message = self.discovery.unknown_message(name, configured)
        # A first run usually fails here: say where ready-made definitions are, and how
        # to get a starter config, not only what is missing.
        return (f"{message}; add an agent definition (.claude/agents/{name}.md; "
                f"parallel-dispatch's examples/claude-agents/ has some to copy) or configure "
                f"[agents.{name}] or [agents.\"*\"] in {self._where()} "
                f"(`parallel-dispatch init` writes a starter one)")

    def _no_runner_fix(self) -> str:
        return (f"set runner = \"claude\" (or one of {', '.join(RUNNER_NAMES[1:])}) in "
                f"[defaults] of {self._where()}, or install Claude Code so `claude` is on PATH")

    def _where(self) -> str:
        return str(self.config.path or (self.config.root / ".aiwg" / "dispatch.toml"))

    def rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.config.root))
        except ValueError:
            return str(path)

    # -- listing --------------------------------------------------------------
    def rows(self) -> list[AgentRow]:
        """Every agent a task may name: configured ones, definitions, and `shell`."""
        names: dict[str, str] = {}
        for n in self.config.agents:
            if n != FALLBACK:
                names.setdefault(fold(n), n)
        for d in self.discovery.agents.values():
            names.setdefault(d.key, d.name)
        names.setdefault(SHELL_AGENT, SHELL_AGENT)
        rows = []
        for name in sorted(names.values(), key=fold):
            try:
                spec = self.resolve(name)
            except ResolveError as exc:
                known = self.discovery.get(name)
                rows.append(AgentRow(name, "-", known.model if known else None,
                                     self.rel(known.path) if known else "-", None, str(exc)))
                continue
            file = (self.rel(spec.definition.path) if spec.definition is not None
                    else spec.source)
            rows.append(AgentRow(name, spec.runner or "command", spec.model, file, spec))
        return rows


def _never() -> AgentSpec:
    raise AssertionError("shell and command fallbacks always resolve")
