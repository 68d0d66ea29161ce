"""Project root discovery, `.aiwg/dispatch.toml`, and settings precedence.

Precedence, highest first: CLI flag > task-file `settings` > `[defaults]` in
`.aiwg/dispatch.toml` > built-in defaults.  Relative paths are resolved against
the project root so the same task file behaves the same from any directory.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from .errors import ConfigError, Diagnostic
from .model import InputsMode, OnFailure, Settings

CONFIG_NAME = "dispatch.toml"

BUILTIN_DEFAULTS: dict[str, Any] = {
    "max_parallel": 4,
    "timeout_per_task": 120_000,
    "output_dir": ".aiwg/working/",
    "on_failure": "continue",
    "max_retries": 3,
    "retry_backoff": 1.0,
}


class AgentConfig(BaseModel):
    """How to run one agent: an argv list, never a shell string."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    command: Annotated[list[StrictStr], Field(min_length=1)]
    prompt: Literal["stdin", "arg"] = "stdin"
    output: Literal["stdout", "file"] = "stdout"
    env: dict[StrictStr, StrictStr] = Field(default_factory=dict)
    inputs: InputsMode | None = None


class ConfigFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    defaults: Settings = Field(default_factory=Settings)
    agents: dict[str, AgentConfig] = Field(default_factory=dict)


@dataclass(frozen=True)
class ProjectConfig:
    """The parsed project config; empty when the project has none."""

    root: Path
    path: Path | None = None
    defaults: Settings = field(default_factory=Settings)
    agents: dict[str, AgentConfig] = field(default_factory=dict)


@dataclass(frozen=True)
class ResolvedSettings:
    max_parallel: int
    timeout_per_task: int
    output_dir: Path
    output_dir_text: str
    on_failure: OnFailure
    max_retries: int
    retry_backoff: float

    def to_json(self) -> dict[str, Any]:
        return {
            "max_parallel": self.max_parallel,
            "timeout_per_task": self.timeout_per_task,
            "output_dir": str(self.output_dir),
            "on_failure": self.on_failure,
            "max_retries": self.max_retries,
            "retry_backoff": self.retry_backoff,
        }


def find_project_root(task_file: Path, cwd: Path | None = None) -> Path:
    """Nearest ancestor of the task file holding `.aiwg/`, else the current directory."""
    start = task_file.resolve().parent
    for candidate in (start, *start.parents):
        if (candidate / ".aiwg").is_dir():
            return candidate
    return (cwd or Path.cwd()).resolve()


def load_config(root: Path, path: Path | None = None) -> ProjectConfig:
    """Read `.aiwg/dispatch.toml` under `root` (or an explicit `path`)."""
    cfg_path = path or root / ".aiwg" / CONFIG_NAME
    if not cfg_path.is_file():
        if path is not None:
            raise ConfigError([Diagnostic(str(path), None, None, "config file not found")])
        return ProjectConfig(root=root)
    text = cfg_path.read_text(encoding="utf-8")
    display = _display(cfg_path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line, col = _toml_error_position(str(exc))
        raise ConfigError([Diagnostic(display, line, col, f"invalid TOML: {exc}")]) from None
    try:
        parsed = ConfigFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError([
            Diagnostic(display, _toml_line(text, err["loc"]), None,
                       f"{'.'.join(map(str, err['loc']))}: {err['msg']}")
            for err in exc.errors()
        ]) from None
    return ProjectConfig(root=root, path=cfg_path, defaults=parsed.defaults, agents=parsed.agents)


def resolve_settings(
    root: Path, file_settings: Settings, config: ProjectConfig, overrides: dict[str, Any]
) -> ResolvedSettings:
    """Merge the four layers of settings; `overrides` holds only flags the user gave."""
    merged = dict(BUILTIN_DEFAULTS)
    for layer in (config.defaults.model_dump(exclude_none=True),
                  file_settings.model_dump(exclude_none=True),
                  {k: v for k, v in overrides.items() if v is not None}):
        merged.update(layer)
    out_text = str(merged["output_dir"])
    out = Path(out_text).expanduser()
    if not out.is_absolute():
        out = root / out
    return ResolvedSettings(
        max_parallel=int(merged["max_parallel"]),
        timeout_per_task=int(merged["timeout_per_task"]),
        output_dir=Path(_normpath(out)),
        output_dir_text=out_text,
        on_failure=merged["on_failure"],
        max_retries=int(merged["max_retries"]),
        retry_backoff=float(merged["retry_backoff"]),
    )


def _normpath(p: Path) -> str:
    import os.path

    return os.path.normpath(str(p))


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _toml_error_position(message: str) -> tuple[int | None, int | None]:
    m = re.search(r"line (\d+), column (\d+)", message)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def _toml_line(text: str, loc: tuple[Any, ...]) -> int | None:
    """Best-effort line of a config key: TOML parsers keep no positions."""
    lines = text.splitlines()
    keys = [str(k) for k in loc]
    if len(keys) >= 2 and keys[0] in ("agents", "defaults"):
        section = keys[0] if keys[0] == "defaults" else f"agents.{keys[1]}"
        start = None
        for i, line in enumerate(lines):
            stripped = line.strip().replace('"', "")
            if stripped == f"[{section}]":
                start = i
                break
        if start is None:
            return None
        leaf = keys[2] if keys[0] == "agents" and len(keys) > 2 else keys[-1]
        for i in range(start + 1, len(lines)):
            if lines[i].lstrip().startswith("["):
                break
            if re.match(rf"\s*{re.escape(leaf)}\s*=", lines[i]):
                return i + 1
        return start + 1
    return None
