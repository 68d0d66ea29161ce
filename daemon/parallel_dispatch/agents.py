"""Resolving a task's `agent:` to the argv that runs it.

Lookup order: `[agents.<name>]` in `.aiwg/dispatch.toml`, the built-in
`shell` agent, then the `[agents."*"]` fallback.  Anything else is a
validation error, caught before a single process starts.  `resolve.py` adds
agent definitions (`.claude/agents/*.md`, ...) run by runner presets on top.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from .agentdefs import AgentDefinition
from .config import AgentConfig, ProjectConfig
from .model import InputsMode

SHELL_AGENT = "shell"
FALLBACK = "*"
PLACEHOLDERS = ("agent", "task_id", "output", "output_dir", "project")
_PLACEHOLDER_RE = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")


@dataclass(frozen=True)
class AgentSpec:
    """Everything a runner needs to start one agent; placeholders still unexpanded."""

    name: str
    command: tuple[str, ...]
    prompt_mode: str = "stdin"
    output_mode: str = "stdout"
    env: Mapping[str, str] = field(default_factory=dict)
    inputs: InputsMode = "inline"
    source: str = "config"
    runner: str | None = None
    """Runner preset (`claude`, `codex`, ...); None for a plain command agent."""
    definition: AgentDefinition | None = None
    """The agent's Markdown definition: its body is the system prompt."""
    model: str | None = None
    """The model the preset passes on (config first, then the definition's, if it fits)."""
    args: tuple[str, ...] = ()
    base_url: str | None = None
    api_key_env: str | None = None
    read_timeout: float | None = None
    notes: tuple[str, ...] = ()
    """Things the user should know about this resolution (e.g. an ignored model)."""
    max_parallel: int | None = None
    """`[agents.X] max_parallel`: a fixed pool of this agent's tasks."""
    runner_max_parallel: int | None = None
    """`[runners.R] max_parallel`: the limit the runner's adaptive pool starts from."""
    shared_state: bool = False
    """`shared_state = true`: no private copy of the client's state per attempt."""
    resources: Mapping[str, float] = field(default_factory=dict)
    """`[agents.X] resources`: what a Ray node must offer to run this agent."""

    @property
    def system_prompt(self) -> str:
        return self.definition.system_prompt if self.definition is not None else ""

    @property
    def has_placeholders(self) -> bool:
        """Whether the argv differs between tasks (then `describe` can't be cached)."""
        return any(_PLACEHOLDER_RE.search(arg) for arg in self.command)

    def argv(self, values: Mapping[str, str]) -> list[str]:
        """Expand `{agent}`-style placeholders; other braces are left alone."""
        return [_PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], arg) for arg in self.command]


BUILTIN_SHELL = AgentSpec(
    name=SHELL_AGENT,
    command=("/bin/sh", "-c"),
    prompt_mode="arg",
    output_mode="stdout",
    inputs="none",
    source="built-in",
)


def _from_config(name: str, cfg: AgentConfig, source: str) -> AgentSpec:
    return AgentSpec(
        name=name,
        command=tuple(cfg.command or ()),
        prompt_mode=cfg.prompt,
        output_mode=cfg.output,
        env=dict(cfg.env),
        inputs=cfg.inputs or "inline",
        source=source,
        max_parallel=cfg.max_parallel,
        resources=dict(cfg.resources),
    )


def resolve_agent(name: str, config: ProjectConfig) -> AgentSpec | None:
    """The command-agent spec for `name`, or None when no command configures it.

    Agents configured with a runner preset (or found only as definitions) are
    resolved by `resolve.AgentResolver`, which falls back to this function.
    """
    if name in config.agents and name != FALLBACK:
        cfg = config.agents[name]
        return _from_config(name, cfg, f"[agents.{name}]") if cfg.is_command else None
    if name == SHELL_AGENT:
        return BUILTIN_SHELL
    if FALLBACK in config.agents and config.agents[FALLBACK].is_command:
        return _from_config(name, config.agents[FALLBACK], '[agents."*"]')
    return None


def known_agents(config: ProjectConfig) -> list[str]:
    """Names a task may use, for error messages and did-you-mean."""
    return sorted({*(n for n in config.agents if n != FALLBACK), SHELL_AGENT})
