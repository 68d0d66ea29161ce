"""The runner presets as validation sees them: names, executables, model families.

The one list of presets.  Validation (config.py's `RunnerName`, resolve.py's choice of
a definition's model) and `doctor` need only these facts, so they live here, free of
imports: loading a task file must not import the runners, which bring processes,
pipes, HTTP and trio with them.  `runners/registry.py` maps each name to the class
that runs it, and checks at import that it covers exactly this list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

RunnerName = Literal["claude", "codex", "gemini", "opencode", "llm", "openai"]
"""The `runner` values a config may name, in the order `doctor` and messages list them."""
RUNNER_NAMES: tuple[RunnerName, ...] = get_args(RunnerName)

ModelFamily = Literal["claude-alias", "gemini-alias", "provider", "claude", "gemini", "other"]

CLAUDE_ALIASES = frozenset({"sonnet", "opus", "haiku", "opusplan", "default"})
GEMINI_ALIASES = frozenset({"auto", "pro", "flash", "flash-lite"})


@dataclass(frozen=True)
class Preset:
    """What is known about a preset without running it."""

    name: RunnerName
    executable: str | None
    """The CLI it runs (None: the HTTP runner, which starts no process)."""
    model_families: frozenset[ModelFamily]
    """Which definitions' `model:` values it is handed (see `model_family`)."""
    version_args: tuple[str, ...] = ("--version",)
    """How `doctor` asks the executable for its version."""

    @property
    def is_cli(self) -> bool:
        return self.executable is not None


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("claude", "claude", frozenset({"claude-alias", "claude", "provider", "other"})),
    Preset("codex", "codex", frozenset({"other"})),
    Preset("gemini", "gemini", frozenset({"gemini", "gemini-alias"})),
    Preset("opencode", "opencode", frozenset({"provider"})),
    Preset("llm", "llm", frozenset({"claude", "gemini", "other"})),
    Preset("openai", None, frozenset({"other", "provider"}), version_args=()),
)}
if tuple(PRESETS) != RUNNER_NAMES:  # pragma: no cover - a table edited without the Literal
    raise AssertionError("presets.PRESETS must list exactly RunnerName, in its order")

CLI_PRESETS: tuple[RunnerName, ...] = tuple(p.name for p in PRESETS.values() if p.is_cli)
"""Presets that run a local executable (the default runner is picked among these)."""


def model_family(model: str) -> ModelFamily:
    """Which tool a model name is meant for, so a Claude definition's `model: sonnet` is
    not handed to codex or gemini (they would fail on it)."""
    m = model.strip().lower()
    if m in CLAUDE_ALIASES:
        return "claude-alias"
    if m in GEMINI_ALIASES:
        return "gemini-alias"
    if "/" in m:
        return "provider"
    if m.startswith("claude"):
        return "claude"
    if m.startswith("gemini"):
        return "gemini"
    return "other"


def accepts_model(runner: str, model: str) -> bool:
    """Whether a definition's frontmatter `model` means something to `runner`."""
    return model_family(model) in PRESETS[runner].model_families
