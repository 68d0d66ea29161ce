"""Project root discovery, `.aiwg/dispatch.toml`, and settings precedence.

Precedence, highest first: CLI flag > task-file `settings` > `[defaults]` in
`.aiwg/dispatch.toml` > built-in defaults.  Relative paths are resolved against
the project root so the same task file behaves the same from any directory.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from .errors import ConfigError, Diagnostic
from .model import MAX_PARALLEL, InputsMode, Isolation, MergeMode, OnFailure, Settings
from .presets import RunnerName
from .pricing import Price
from .probe import exists

CONFIG_NAME = "dispatch.toml"

BUILTIN_DEFAULTS: dict[str, Any] = {
    "max_parallel": 4,
    "timeout_per_task": 120_000,
    "output_dir": ".aiwg/working/",
    "on_failure": "continue",
    "max_retries": 3,
    "retry_backoff": 1.0,
    "max_quota_wait": 3_600_000,
    "adaptive_parallel": True,
}


def _no_nul(arg: str) -> str:
    if "\x00" in arg:
        raise ValueError("a command-line argument cannot hold a NUL byte (no program could "
                         "receive it); remove it")
    return arg


_Arg = Annotated[StrictStr, AfterValidator(_no_nul)]
"""One argv item: the kernel ends each at its first NUL, so one could only fail the run."""
_Amount = Annotated[float, Field(gt=0, allow_inf_nan=False)]
"""How much of a Ray resource: a finite number above 0."""


class RunnerConfig(BaseModel):
    """Options for a runner preset; `[runners.<name>]`, overridden per agent.

    `command` replaces the preset's executable (e.g. `["npx", "-y", "@openai/codex"]`);
    `args` are extra CLI arguments; `base_url`, `api_key_env` and `read_timeout` are
    for the `openai` runner.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    command: Annotated[list[_Arg], Field(min_length=1)] | None = None
    model: Annotated[StrictStr, Field(min_length=1)] | None = None
    args: list[_Arg] = Field(default_factory=list)
    env: dict[StrictStr, StrictStr] = Field(default_factory=dict)
    base_url: Annotated[StrictStr, Field(min_length=1)] | None = None
    api_key_env: Annotated[StrictStr, Field(min_length=1)] | None = None
    read_timeout: Annotated[float, Field(gt=0)] | None = None
    max_parallel: Annotated[StrictInt, Field(ge=1, le=MAX_PARALLEL)] | None = None
    """`[runners.R]`: the runner's pool (adaptive); `[agents.X]`: a fixed cap per agent."""
    shared_state: StrictBool | None = None
    """True: the client uses the user's own state dir (runners/client_state.py), not a
    private copy per attempt."""
    resources: dict[Annotated[StrictStr, Field(min_length=1)], _Amount] = Field(
        default_factory=dict)
    """What a Ray node must offer to run this agent (`{claude_cli = 1}`); ignored locally."""


class AgentConfig(RunnerConfig):
    """How to run one agent: an argv list (never a shell string), or a runner preset.

    Without `runner`, `command` is the whole argv of a command agent.  With `runner`
    (or with neither, meaning the default runner) the agent is run by that preset and
    `command` only replaces the preset's executable.
    """

    runner: RunnerName | None = None
    prompt: Literal["stdin", "arg"] = "stdin"
    output: Literal["stdout", "file"] = "stdout"
    inputs: InputsMode | None = None

    @property
    def is_command(self) -> bool:
        """A plain command agent, as before runner presets existed."""
        return self.runner is None and self.command is not None

    @model_validator(mode="after")
    def _preset_keys_fit(self) -> AgentConfig:
        if self.is_command:
            preset_only = {"model", "args", "base_url", "api_key_env", "read_timeout",
                           "shared_state"}
            given = sorted(preset_only & self.model_fields_set)
            if given:
                raise ValueError(f"only runner presets use {', '.join(given)}; "
                                 "set runner = \"claude\" (or another preset) or remove them")
        else:
            given = sorted({"prompt", "output"} & self.model_fields_set)
            if given:
                raise ValueError(f"only command agents use {', '.join(given)}; a runner "
                                 "preset decides how the prompt and the result travel")
        return self


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _env_name(name: str) -> str:
    if not _ENV_NAME.fullmatch(name):
        raise ValueError(f"'{name}' is not an environment variable name")
    return name


class ExecutorConfig(BaseModel):
    """`[executor]`: where agent processes run (executor.py); README "Running on a Ray
    cluster"."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["local", "ray"] = "local"
    address: Annotated[StrictStr, Field(min_length=1)] | None = None
    """The cluster: `HOST:PORT` (its GCS), `ray://HOST:PORT` (Ray Client) or `auto`."""
    workspace: Annotated[StrictStr, Field(min_length=1)] = "shared"
    """`shared` (nodes see the project at the driver's path), an absolute path where every
    node has the project, or `working_dir` (uploaded once per run, copied per attempt)."""
    excludes: list[StrictStr] = Field(default_factory=list)
    """Gitignore-style patterns left out of the `working_dir` upload."""
    forward_env: list[Annotated[StrictStr, AfterValidator(_env_name)]] = Field(
        default_factory=list)
    """Variables of the *worker's* environment an agent gets there (keys provisioned on
    the cluster); the driver's environment is never forwarded wholesale."""
    resources: dict[Annotated[StrictStr, Field(min_length=1)], _Amount] = Field(
        default_factory=dict)
    """What every attempt asks of a node (`{agent_slot = 1}`), under the agent's own."""

    @model_validator(mode="after")
    def _workspace_known(self) -> ExecutorConfig:
        if self.workspace not in ("shared", "working_dir") and \
                not self.workspace.startswith("/"):
            raise ValueError("workspace must be \"shared\", \"working_dir\" or an absolute "
                             "path where every node has the project")
        return self


NotifyEvent = Literal["run_finished", "task_failed", "quota_wait", "task_stalled"]
NOTIFY_EVENTS: tuple[NotifyEvent, ...] = ("run_finished", "task_failed", "quota_wait",
                                          "task_stalled")


def _webhook_url(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("webhook must be an http:// or https:// URL with a host")
    if _UNSAFE.search(url) or any(ch.isspace() for ch in url):
        raise ValueError("webhook must not hold spaces or control characters")
    return url


class NotifyConfig(BaseModel):
    """`[notify]`: who is told when a run finishes, a task fails or stalls, or a pool
    waits for quota (notify.py delivers; README "Notifications")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    webhook: Annotated[StrictStr, AfterValidator(_webhook_url)] | None = None
    format: Literal["json", "slack"] = "json"
    """The webhook's body: the event object, or Slack's `{"text": ...}`."""
    command: Annotated[list[_Arg], Field(min_length=1)] | None = None
    """An argv (never a shell string): the event object on stdin, `DISPATCH_EVENT*` vars."""
    events: Annotated[list[NotifyEvent], Field(min_length=1)] = Field(
        default_factory=lambda: list(NOTIFY_EVENTS))
    timeout: Annotated[StrictFloat, Field(gt=0, le=300)] = 10.0
    """Seconds one try may take (a POST, or the command until it is killed)."""
    retries: Annotated[StrictInt, Field(ge=0, le=10)] = 2
    """Tries after the first, 1 s, 2 s, 4 s... apart."""

    @model_validator(mode="after")
    def _has_target(self) -> NotifyConfig:
        if self.webhook is None and self.command is None:
            raise ValueError("set webhook = \"https://...\" or command = [...] (or both), "
                             "or remove [notify]")
        if self.webhook is None and "format" in self.model_fields_set:
            raise ValueError("format applies to the webhook only; set webhook or remove "
                             "format")
        return self


class ConfigDefaults(Settings):
    """`[defaults]`: task-file settings, plus the runner for agents found only as definitions."""

    runner: RunnerName | None = None


_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b\u200e\u200f\u2028-\u202e"
                     "\u2060\u2066-\u2069\ufeff]")
"""Control, invisible and direction-changing characters (loader.py's `_CONTROL`): a
name holding one prints as another, or drives the terminal, in every message."""


def _printable_name(name: str) -> str:
    if _UNSAFE.search(name):
        raise ValueError("an agent name must not hold control or invisible characters "
                         "(no task could name it); rename the agent")
    return name


class ConfigFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    defaults: ConfigDefaults = Field(default_factory=ConfigDefaults)
    agents: dict[Annotated[str, AfterValidator(_printable_name)], AgentConfig] = Field(
        default_factory=dict)
    runners: dict[RunnerName, RunnerConfig] = Field(default_factory=dict)
    pricing: dict[Annotated[str, Field(min_length=1)], Price] = Field(default_factory=dict)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    notify: NotifyConfig | None = None


@dataclass(frozen=True)
class ProjectConfig:
    """The parsed project config; empty when the project has none."""

    root: Path
    path: Path | None = None
    defaults: Settings = field(default_factory=Settings)
    agents: dict[str, AgentConfig] = field(default_factory=dict)
    runners: Mapping[str, RunnerConfig] = field(default_factory=dict)
    pricing: Mapping[str, Price] = field(default_factory=dict)
    """`[pricing."model"]`: prices for runners that report tokens but no cost."""
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    notify: NotifyConfig | None = None
    """`[notify]`; None when the project has none."""
    lines: Mapping[str, int] = field(default_factory=dict)
    """Lines of the tables errors found only at run time point to (`agents.X.resources`,
    `runners.R.resources`, `executor.resources`)."""

    @property
    def default_runner(self) -> RunnerName | None:
        """`[defaults] runner`, if the project sets one."""
        return getattr(self.defaults, "runner", None)


@dataclass(frozen=True)
class ResolvedSettings:
    max_parallel: int
    timeout_per_task: int
    output_dir: Path
    on_failure: OnFailure
    max_retries: int
    retry_backoff: float
    max_cost_usd: float | None = None
    """Budget: no task starts once the run's reported cost reaches it."""
    idle_timeout: int | None = None
    """Milliseconds of agent silence before it is killed as stalled (None: off)."""
    max_quota_wait: int = 3_600_000
    """Milliseconds a task may wait in all for rate or usage limits to reset."""
    adaptive_parallel: bool = True
    """Runner pools adapt to rate limits (False: `--fixed-parallel`)."""
    max_tokens: int | None = None
    """Token budget of the run (input + output), reserved before each start like the cost."""
    warn_cost_usd: float | None = None
    estimate_cost_usd: float | None = None
    """What an attempt with no recorded cost reserves (budget.py)."""
    estimate_tokens: int | None = None
    isolation: Isolation = "none"
    """Every task's default `isolation` (a task's own wins)."""
    merge: MergeMode = "none"
    """What happens to the isolated tasks' patches after the run (merge.py)."""
    verify: tuple[str, ...] | str | None = None
    """Run after each merged task: an argv, or (a str) a command line for /bin/sh -c."""
    verify_timeout: int = 600_000

    def to_json(self) -> dict[str, Any]:
        # The budget keys added with issue 10 appear only when set: reports of runs
        # without them read byte for byte as before (tests/golden).
        extra: dict[str, Any] = {k: v for k, v in (
            ("max_tokens", self.max_tokens), ("warn_cost_usd", self.warn_cost_usd),
            ("estimate_cost_usd", self.estimate_cost_usd),
            ("estimate_tokens", self.estimate_tokens)) if v is not None}
        if self.max_quota_wait != BUILTIN_DEFAULTS["max_quota_wait"]:
            extra["max_quota_wait"] = self.max_quota_wait
        if not self.adaptive_parallel:
            extra["adaptive_parallel"] = False
        if self.isolation != "none":
            extra["isolation"] = self.isolation
        if self.merge != "none":
            extra["merge"] = self.merge
        if self.verify is not None:
            extra["verify"] = ({"shell": self.verify} if isinstance(self.verify, str)
                               else list(self.verify))
            extra["verify_timeout"] = self.verify_timeout
        return {
            "max_parallel": self.max_parallel,
            "timeout_per_task": self.timeout_per_task,
            "output_dir": str(self.output_dir),
            "on_failure": self.on_failure,
            "max_retries": self.max_retries,
            "retry_backoff": self.retry_backoff,
            "max_cost_usd": self.max_cost_usd,
            "idle_timeout": self.idle_timeout,
            **extra,
        }


def git_toplevel(root: Path) -> Path | None:
    """The working tree `root` lies in (the nearest folder up with a `.git`), or None.

    A file walk, not `git rev-parse`: validation must not start processes."""
    here = root.resolve()
    for folder in (here, *here.parents):
        if (folder / ".git").exists():
            return folder
    return None


def find_project_root(task_file: Path, cwd: Path | None = None) -> Path:
    """The project a task file belongs to, walking up from the file's folder.

    The nearest ancestor holding `.aiwg/` wins; without one, the nearest holding
    `.claude/` or `.git` (so `validate ../tasks.yaml` from a subfolder still finds the
    project's `.claude/agents/`); else the current directory.  The home folder is not
    a project for holding `~/.claude/` (Claude Code's user settings), `~/.aiwg/` (AIWG's
    user data) or `~/.git` (a dotfiles repository), only for `~/.aiwg/dispatch.toml`:
    otherwise every stray task file under home would write to `~/.aiwg/working/`.
    """
    start = task_file.resolve().parent
    chain = (start, *start.parents)
    home = _home()
    for candidate in chain:
        if _is_dir(candidate / ".aiwg") and (
                candidate != home or exists(candidate / ".aiwg" / CONFIG_NAME)):
            return candidate
    for candidate in chain:
        if candidate != home and (exists(candidate / ".git")
                                  or _is_dir(candidate / ".claude")):
            return candidate
    return (cwd or Path.cwd()).resolve()



def _is_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(path.stat().st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True


def find_project_dir(start: Path) -> Path:
    """The project around a folder (`agents`, `doctor`, `status`, `watch` without one)."""
    start = start.resolve()
    return find_project_root(start / "_", start)


def _home() -> Path | None:
    home = os.environ.get("HOME")
    try:
        return Path(home).resolve() if home else Path.home().resolve()
    except (OSError, RuntimeError):
        return None


def load_config(root: Path, path: Path | None = None) -> ProjectConfig:
    """Read `.aiwg/dispatch.toml` under `root` (or an explicit `path`)."""
    cfg_path = path or root / ".aiwg" / CONFIG_NAME
    text = _read_config(cfg_path, explicit=path is not None)
    if text is None:
        return ProjectConfig(root=root)
    display = _display(cfg_path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line, col = _toml_error_position(str(exc), text)
        raise ConfigError([Diagnostic(display, line, col, f"invalid TOML: {exc}")]) from None
    except RecursionError:  # tomllib recurses once per nested array or inline table
        raise ConfigError([Diagnostic(
            display, _deepest_line(text), None,
            "arrays or inline tables are nested too deeply to read; a dispatch config "
            "needs only a few levels")]) from None
    except ValueError:  # an integer past Python's 4,300-digit conversion limit
        long = re.search(r"\d[\d_]{4300}", text)
        raise ConfigError([Diagnostic(
            display, text.count("\n", 0, long.start()) + 1 if long else None, None,
            "a number has more than 4,300 digits; no setting needs one that large")]) from None
    try:
        parsed = ConfigFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError([
            Diagnostic(display, _toml_line(text, err["loc"]), None,
                       f"{_loc_text(err['loc'])}: {err['msg']}")
            for err in exc.errors()
        ]) from None
    return ProjectConfig(root=root, path=cfg_path, defaults=parsed.defaults, agents=parsed.agents,
                         runners={name: runner for name, runner in parsed.runners.items()},
                         pricing=parsed.pricing, executor=parsed.executor, notify=parsed.notify,
                         lines=_resource_lines(text, parsed))


def _resource_lines(text: str, parsed: ConfigFile) -> dict[str, int]:
    """Where each `resources` table is, for errors the cluster finds later."""
    where: list[tuple[str, ...]] = [("executor", "resources")] if parsed.executor.resources \
        else []
    where += [("agents", n, "resources") for n, a in parsed.agents.items() if a.resources]
    where += [("runners", n, "resources") for n, r in parsed.runners.items() if r.resources]
    out = {}
    for loc in where:
        line = _toml_line(text, loc)
        if line is not None:
            out[".".join(loc)] = line
    return out


MAX_CONFIG_BYTES = 1 << 20
"""A config is a few hundred bytes; more than this is a mistake (or `/dev/zero`)."""


def _read_config(cfg_path: Path, *, explicit: bool) -> str | None:
    """The config's text; None when the project has none (only the default path may lack it).

    Every way the file can be unusable is a `ConfigError` that names it and says what
    to do, never a traceback: the CLI exits 2 and the daemon keeps its old config.
    """
    display = _display(cfg_path)

    def fail(message: str) -> ConfigError:
        return ConfigError([Diagnostic(display, None, None, message)])

    try:
        st = cfg_path.stat()
    except FileNotFoundError:
        if cfg_path.is_symlink():
            raise fail(f"a symlink to {os.readlink(cfg_path)}, which does not exist; "
                       "point it at a TOML file or remove it") from None
        if explicit:
            raise fail("config file not found") from None
        return None
    except OSError as exc:
        raise fail(f"cannot read it: {exc.strerror or exc}; make it (and the folders above "
                   "it) readable by this user, or remove it") from None
    if stat.S_ISDIR(st.st_mode):
        raise fail("is a directory, not a TOML file; remove it or replace it with a file")
    if not stat.S_ISREG(st.st_mode):
        raise fail("is not a regular file (a device, pipe or socket); replace it with a "
                   "TOML file")
    try:
        with open(cfg_path, "rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise fail(f"cannot read it: {exc.strerror or exc}; make it readable by this "
                   "user (e.g. chmod a+r), or remove it") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise fail(f"larger than {MAX_CONFIG_BYTES >> 20} MiB; a dispatch config is a few "
                   "lines of TOML — is this the right file?")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError([Diagnostic(
            display, line, col,
            f"not valid UTF-8 (byte 0x{data[exc.start]:02x}); TOML files must be UTF-8: "
            "re-save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)")]) from None


def _deepest_line(text: str, limit: int = 64) -> int | None:
    """The line where brackets first nest deeper than `limit` (strings skipped roughly)."""
    depth, line, quote = 0, 1, ""
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\n":
            line += 1
            if quote in ('"', "'"):
                quote = ""
        elif quote:
            if ch == "\\" and quote == '"':
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            end = text.find("\n", i)
            i = len(text) if end < 0 else end
            continue
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return line
        elif ch in "]}":
            depth = max(0, depth - 1)
        i += 1
    return None


def resolve_settings(
    root: Path, file_settings: Settings, config: ProjectConfig, overrides: dict[str, Any],
    default_subdir: str | None = None,
) -> ResolvedSettings:
    """Merge the four layers of settings; `overrides` holds only flags the user gave.

    `default_subdir` (the daemon's per-file directory) is appended to the output
    dir only when it comes from a default, never when the file or a flag set it.
    """
    merged = dict(BUILTIN_DEFAULTS)
    for layer in (config.defaults.model_dump(exclude_none=True),
                  file_settings.model_dump(exclude_none=True),
                  {k: v for k, v in overrides.items() if v is not None}):
        merged.update(layer)
    out_text = str(merged["output_dir"])
    if default_subdir and file_settings.output_dir is None and not overrides.get("output_dir"):
        out_text = f"{out_text.rstrip('/')}/{default_subdir}/"
    out = Path(os.path.expanduser(out_text))  # (Path.expanduser raises for `~nobody`)
    if not out.is_absolute():
        out = root / out
    return ResolvedSettings(
        max_parallel=int(merged["max_parallel"]),
        timeout_per_task=int(merged["timeout_per_task"]),
        output_dir=Path(_normpath(out)),
        on_failure=merged["on_failure"],
        max_retries=int(merged["max_retries"]),
        retry_backoff=float(merged["retry_backoff"]),
        max_cost_usd=(float(merged["max_cost_usd"])
                      if merged.get("max_cost_usd") is not None else None),
        idle_timeout=(int(merged["idle_timeout"])
                      if merged.get("idle_timeout") is not None else None),
        max_quota_wait=int(merged["max_quota_wait"]),
        adaptive_parallel=bool(merged["adaptive_parallel"]),
        max_tokens=merged.get("max_tokens"),
        warn_cost_usd=(float(merged["warn_cost_usd"])
                       if merged.get("warn_cost_usd") is not None else None),
        estimate_cost_usd=(float(merged["estimate_cost_usd"])
                           if merged.get("estimate_cost_usd") is not None else None),
        estimate_tokens=merged.get("estimate_tokens"),
        isolation=merged.get("isolation", "none"),
        merge=merged.get("merge", "none"),
        verify=_verify(merged.get("verify")),
        verify_timeout=int(merged.get("verify_timeout", 600_000)),
    )


def _verify(value: Any) -> tuple[str, ...] | str | None:
    """`verify` as validated (a list, or `{shell: ...}` dumped to a dict) made immutable."""
    if isinstance(value, dict):
        return str(value["shell"])
    return tuple(value) if value is not None else None


def _normpath(p: Path) -> str:
    return os.path.normpath(str(p))


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _loc_text(loc: tuple[Any, ...]) -> str:
    """`agents.x.command`, with a key holding a control character shown escaped."""
    return ".".join(repr(p) if _UNSAFE.search(str(p)) else str(p)
                    for p in loc if p != "[key]")


def _toml_error_position(message: str, text: str) -> tuple[int | None, int | None]:
    m = re.search(r"line (\d+), column (\d+)", message)
    if m:
        return int(m.group(1)), int(m.group(2))
    if "at end of document" in message:  # the file's last line, just after its end
        lines = text.removesuffix("\n").split("\n")  # (tomllib counts lines by "\n")
        return len(lines), len(lines[-1].rstrip("\r")) + 1
    return None, None


def _toml_line(text: str, loc: tuple[Any, ...]) -> int | None:
    """Best-effort line of a config key: TOML parsers keep no positions."""
    lines = text.splitlines()
    keys = [str(k) for k in loc]
    if not keys:
        return None
    flat = keys[0] in ("defaults", "executor", "notify")  # one table, not one per name
    if len(keys) == 1 or keys[0] not in ("agents", "defaults", "runners", "pricing",
                                         "executor", "notify"):
        return _top_level_line(lines, keys[0])
    section = keys[0] if flat else f"{keys[0]}.{keys[1]}"
    start = None
    for i, line in enumerate(lines):
        stripped = line.strip().replace('"', "")
        if stripped == f"[{section}]":
            start = i
            break
    if start is None:  # an inline table, or dotted keys: the section's own line
        return _top_level_line(lines, keys[0])
    leaf = keys[1] if flat else keys[2] if len(keys) > 2 else keys[-1]
    for i in range(start + 1, len(lines)):
        if lines[i].lstrip().startswith("["):
            break
        if re.match(rf"\s*{re.escape(leaf)}\s*=", lines[i]):
            return i + 1
    return start + 1


def _top_level_line(lines: list[str], key: str) -> int | None:
    """The line of a top-level `key`: its table header, else its assignment before any."""
    k = rf"""["']?{re.escape(key)}["']?"""
    header = re.compile(rf"\s*\[\[?\s*{k}\s*[.\]]")
    assignment = re.compile(rf"\s*{k}\s*[.=]")
    in_table = False
    for i, line in enumerate(lines):
        if header.match(line):
            return i + 1
        if not in_table and assignment.match(line):
            return i + 1
        in_table = in_table or line.lstrip().startswith("[")
    in_table = False  # a key written with escapes ("\u001b"): read each line's own key
    for i, line in enumerate(lines):
        is_header = line.lstrip().startswith("[")
        if is_header or not in_table:
            try:
                first = next(iter(tomllib.loads(line)), None)
            except ValueError:  # (TOMLDecodeError too) a line that is not whole alone
                first = None
            if first == key:
                return i + 1
        in_table = in_table or is_header
    return None
