"""Project subcommands: `agents` (what resolves), `init` (starter files), `doctor` (health).

They share one idea: show the user what a run *would* use, with the same resolver
the loader uses, so `agents` and `doctor` can never disagree with a real run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TextIO

import tomli_w

from ..atomic import write_text
from ..config import ProjectConfig, find_project_dir, load_config
from ..fmt import plural
from ..presets import CLI_PRESETS, RUNNER_NAMES
from ..resolve import AgentResolver, AgentRow
from ..runners.openai import DEFAULT_BASE_URL, DEFAULT_KEY_ENV
from ..runners.registry import Probe, probe

CONFIG_REL = Path(".aiwg") / "dispatch.toml"
EXAMPLE_REL = Path(".aiwg") / "tasks" / "example.yaml"


def project_config(config_path: str | None, cwd: Path | None = None) -> ProjectConfig:
    """The project around the current directory (see `find_project_root`), and its config."""
    root = find_project_dir(cwd or Path.cwd())
    return load_config(root, Path(config_path) if config_path else None)


def _rows_json(rows: list[AgentRow]) -> list[dict[str, Any]]:
    return [{"name": r.name, "runner": r.runner if r.spec else None, "model": r.model,
             "file": r.file, "description": (r.spec.definition.description
                                             if r.spec and r.spec.definition else None),
             "error": r.error, "notes": list(r.spec.notes) if r.spec else []}
            for r in rows]


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in rows]


# -- agents ------------------------------------------------------------------------
def agents_command(config_path: str | None, as_json: bool, out: TextIO = sys.stdout) -> int:
    """List every agent a task may name: its runner, model and file."""
    config = project_config(config_path)
    resolver = AgentResolver(config)
    rows = resolver.rows()
    if as_json:
        print(json.dumps(_rows_json(rows), indent=2), file=out)
        return 0
    table = [["NAME", "RUNNER", "MODEL", "FILE"]]
    table += [[r.name, r.runner, r.model or "-", r.file] for r in rows]
    for line in _table(table):
        print(line, file=out)
    for r in rows:
        if r.error:
            print(f"  ! {r.name}: {r.error}", file=out)
        for note in (r.spec.notes if r.spec else ()):
            print(f"  note: {r.name}: {note}", file=out)
    _print_discovery_problems(resolver, out)
    print(f"\ndefault runner: {_default_line(config, resolver)}", file=out)
    return 0


def _default_line(config: ProjectConfig, resolver: AgentResolver) -> str:
    runner = resolver.default_runner()
    if runner is None:
        return "none (set runner in [defaults], or install Claude Code)"
    return f"{runner} ({'[defaults] runner' if config.default_runner else 'found on PATH'})"


def _print_discovery_problems(resolver: AgentResolver, out: TextIO) -> int:
    d = resolver.discovery
    for err in d.errors:
        print(f"  ! {err.to_diagnostic().format()}", file=out)
    for s in d.shadowed:
        winner = d.get(s.name)
        where = resolver.rel(winner.path) if winner else "?"
        print(f"  note: {resolver.rel(s.path)} is shadowed by {where} (same name)", file=out)
    for skipped in d.skipped:  # templates and notes kept beside agents: not problems
        print(f"  note: {resolver.rel(skipped.path)}: {skipped.note()}", file=out)
    return len(d.errors)


# -- init ----------------------------------------------------------------------------
def _key(name: str, value: Any, comment: str = "") -> str:
    lines = [f"# {c}" if c else "#" for c in comment.splitlines()] if comment else []
    return "\n".join([*lines, tomli_w.dumps({name: value}).rstrip("\n")])


def starter_config(runner: str, found: bool) -> tuple[str, dict[str, Any]]:
    """The commented `.aiwg/dispatch.toml`, and the data it must parse back to."""
    defaults = {"runner": runner, "max_parallel": 4, "timeout_per_task": 600_000,
                "on_failure": "continue"}
    runner_opts: dict[str, Any] = {"args": []}
    detected = (f"`{runner}` was found on PATH" if found
                else "no agent CLI was found on PATH; install one or change this")
    parts = [
        "# parallel-dispatch project config.",
        "# Settings precedence, highest first: command-line flags, a task file's `settings:`,",
        "# [defaults] below, built-in defaults.  Paths are relative to the project root.",
        "",
        tomli_w.dumps({"defaults": {}}).rstrip("\n"),
        _key("runner", defaults["runner"],
             "Runner for agents found only as definitions (.claude/agents/<name>.md, ...):\n"
             "claude, codex, gemini, opencode, llm or openai.  " + detected + "."),
        _key("max_parallel", defaults["max_parallel"], "How many agents run at once."),
        _key("timeout_per_task", defaults["timeout_per_task"],
             "Per-task timeout in milliseconds (real agents need minutes)."),
        _key("on_failure", defaults["on_failure"],
             "continue: skip a failed task's dependents; stop: cancel the run; retry: retry."),
        "# Cost budget (USD): each start reserves its expected cost, and a task that would",
        "# pass the budget is skipped.  Also max_tokens, warn_cost_usd, estimate_cost_usd.",
        "# max_cost_usd = 5.0",
        "",
        "# Options shared by every agent a runner preset runs.",
        tomli_w.dumps({"runners": {runner: {}}}).rstrip("\n"),
        _key("args", runner_opts["args"],
             "Extra command-line arguments, e.g. [\"--max-turns\", \"20\"] for claude."),
        "# model = \"sonnet\"          # overrides the definitions' own `model:`",
        "# command = [\"npx\", \"-y\", \"@anthropic-ai/claude-code\"]   # replaces the executable",
        "",
        "# An OpenAI-compatible server (Ollama, vLLM, llama.cpp, LM Studio, OpenAI):",
        "# [runners.openai]",
        "# base_url = \"http://127.0.0.1:11434/v1\"",
        "# model = \"llama3.1\"",
        "# api_key_env = \"OPENAI_API_KEY\"   # the *name* of the variable holding the key",
        "",
        "# Prices for runners that report tokens but no cost (codex, gemini, llm, openai);",
        "# none ship built in.  USD per million tokens, and where the numbers come from:",
        "# [pricing.\"<model name, as in model = ...>\"]",
        "# input_per_mtok = 0.0          # copy each rate from the provider's price page",
        "# cached_input_per_mtok = 0.0",
        "# output_per_mtok = 0.0",
        "# source = \"<that page's URL, and the date you read it>\"",
        "",
        "# One agent, overriding its runner or model:",
        "# [agents.security-architect]",
        "# runner = \"codex\"",
        "# model = \"gpt-5.1-codex\"",
        "",
        "# A plain command agent: an argv list, prompt on stdin, stdout is the output:",
        "# [agents.summarize]",
        "# command = [\"python3\", \"scripts/summarize.py\", \"--task\", \"{task_id}\"]",
        "",
    ]
    data = {"defaults": defaults, "runners": {runner: runner_opts}}
    return "\n".join(parts), data


EXAMPLE_HEAD = """\
# An example dispatch.  See the plan first, then run it:
#   parallel-dispatch plan .aiwg/tasks/example.yaml
#   parallel-dispatch .aiwg/tasks/example.yaml
# Outputs and dispatch-report.md land in .aiwg/working/.
name: example
description: Gather facts with a shell step, then have an agent review them

tasks:
  - id: inventory
    agent: shell   # built-in: the prompt is a /bin/sh script; its stdout is the output
    prompt: |
      echo "# Files"
      (git ls-files 2>/dev/null || find . -type f -not -path './.*') | head -n 200
    output: inventory.md
"""

EXAMPLE_AGENT_TASK = """\
  - id: review
    agent: {agent}   # {where}, run by the default runner
    prompt: |
      Using the file inventory below, name the three parts of this project that most
      need a review, and say why in a few sentences each.
    output: review.md
    dependencies: [inventory]
"""

EXAMPLE_NO_AGENT = """\
  # Add an agent definition (e.g. .claude/agents/reviewer.md: YAML frontmatter with
  # name/description/model/tools, then the system prompt) and uncomment:
  # - id: review
  #   agent: reviewer
  #   prompt: |
  #     Using the file inventory below, name the three parts of this project that
  #     most need a review, and say why.
  #   output: review.md
  #   dependencies: [inventory]
"""

EXAMPLE_TAIL = """\

settings:
  max_parallel: 2
"""


def starter_tasks(agent: str | None, where: str = "") -> str:
    middle = (EXAMPLE_AGENT_TASK.format(agent=agent, where=where) if agent
              else EXAMPLE_NO_AGENT)
    return EXAMPLE_HEAD + "\n" + middle + EXAMPLE_TAIL


def detect_runner(path_env: str | None = None) -> tuple[str, bool]:
    """claude if on PATH, else the first CLI preset that is, else claude (not found)."""
    for name in CLI_PRESETS:
        if shutil.which(name, path=path_env):
            return name, True
    return "claude", False


def init_command(force: bool, cwd: Path | None = None, out: TextIO = sys.stdout,
                 err: TextIO = sys.stderr) -> int:
    """Write the starter config and example task file; never overwrite without --force."""
    root = (cwd or Path.cwd()).resolve()
    targets = [root / CONFIG_REL, root / EXAMPLE_REL]
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        names = ", ".join(str(p.relative_to(root)) for p in existing)
        verb = "exists" if len(existing) == 1 else "exist"
        print(f"parallel-dispatch: init: {names} already {verb}; nothing was written "
              "(use --force to overwrite)", file=err)
        return 1
    runner, found = detect_runner()
    text, data = starter_config(runner, found)
    if tomllib.loads(text) != data:  # the comments were woven into tomli-w's output
        raise RuntimeError("internal error: the starter config does not parse back to its data")
    discovery = AgentResolver(ProjectConfig(root=root)).discovery
    first = next(iter(discovery.agents.values()), None)
    where = str(first.path.relative_to(root)) if first and first.path.is_relative_to(root) \
        else (str(first.path) if first else "")
    write_text(targets[0], text)
    write_text(targets[1], starter_tasks(first.name if first else None, where))
    for p in targets:
        print(f"wrote {p.relative_to(root)}", file=out)
    if not found:
        print("note: no agent CLI (claude, codex, gemini, opencode, llm) is on PATH; "
              "`parallel-dispatch doctor` checks again once one is installed", file=out)
    print("next: parallel-dispatch plan .aiwg/tasks/example.yaml", file=out)
    return 0


# -- doctor ---------------------------------------------------------------------------
def doctor_command(config_path: str | None, timeout: float = 10.0,
                   out: TextIO = sys.stdout) -> int:
    """Runners available (with versions), agents that resolve, and what is wrong."""
    config = project_config(config_path)
    resolver = AgentResolver(config)
    problems = 0
    print(f"project: {config.root}", file=out)
    print(f"config:  {config.path or '(none: built-in defaults)'}", file=out)
    probes = _probe_all(config, timeout)
    print("\nRunners:", file=out)
    for name in RUNNER_NAMES:
        if name == "openai":
            print(f"  · openai    HTTP: {_openai_line(config)}", file=out)
            continue
        p = probes[name]
        mark = "✓" if p.version else "✗"
        print(f"  {mark} {name:<9} {p.version or p.problem}"
              f"{'  ' + p.path if p.path and p.version else ''}", file=out)
    print("\nExtras:", file=out)
    for line in _extras_lines():
        print(f"  {line}", file=out)
    print(f"\ndefault runner: {_default_line(config, resolver)}", file=out)
    print("\nAgents:", file=out)
    rows = resolver.rows()
    for r in rows:
        issue = r.error or _runner_issue(r, probes, config)
        if issue:
            problems += 1
        mark = "✗" if issue else "✓"
        print(f"  {mark} {r.name}  [{r.runner}{' ' + r.model if r.model else ''}]  {r.file}",
              file=out)
        if issue:
            print(f"      {issue}", file=out)
        for note in (r.spec.notes if r.spec else ()):
            print(f"      note: {note}", file=out)
    problems += _print_discovery_problems(resolver, out)
    print(f"\n{'no problems found' if not problems else plural(problems, 'problem') + ' found'}",
          file=out)
    return 0 if not problems else 1


EXTRA_MODULES = {"daemon": ("watch", ("watchfiles",)),
                 "action": ("action", ("github", "requests")),
                 "mcp": ("mcp", ("mcp",)),
                 "ray": ("run --executor ray", ("ray",))}
"""Each optional extra: the command that needs it and the modules it installs."""


def _extras_lines() -> list[str]:
    """Which extras are installed; a missing one is not a problem, only its command fails."""
    lines = []
    for extra, (command, modules) in EXTRA_MODULES.items():
        missing = [m for m in modules if not _importable(m)]
        if missing:
            lines.append(f"· {extra:<9} not installed, so `parallel-dispatch {command}` is "
                         f"unavailable: pip install 'parallel-dispatch[{extra}]'")
        else:
            lines.append(f"✓ {extra:<9} `parallel-dispatch {command}`")
    return lines


def _importable(module: str) -> bool:
    """Found on the path, without importing it (PyGithub alone costs ~0.2 s)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _probe_all(config: ProjectConfig, timeout: float) -> dict[str, Probe]:
    """Probe every CLI preset at once, so one hanging `--version` costs `timeout` in all."""
    path_env = os.environ.get("PATH", "")

    def one(name: str) -> Probe:
        rc = config.runners.get(name)
        return probe(name, path_env, timeout, prefix=rc.command if rc else None)

    with ThreadPoolExecutor(max_workers=len(CLI_PRESETS)) as pool:
        results: list[Probe] = list(pool.map(one, CLI_PRESETS))
    return {p.runner: p for p in results}


def _openai_line(config: ProjectConfig) -> str:
    rc = config.runners.get("openai")
    base = (rc.base_url if rc else None) or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
    key = (rc.api_key_env if rc else None) or DEFAULT_KEY_ENV
    state = "set" if os.environ.get(key) else "not set"
    return f"base_url {base}, key ${key} {state} (no request is made)"


def _runner_issue(row: AgentRow, probes: dict[str, Probe],
                  config: ProjectConfig) -> str | None:
    spec = row.spec
    if spec is None:
        return None
    if spec.runner is None:
        exe = spec.command[0] if spec.command else None
        if exe and not shutil.which(exe):
            return f"'{exe}' (command of {spec.source}) not found on PATH"
        return None
    if spec.runner == "openai":
        if spec.api_key_env and not (spec.env.get(spec.api_key_env)
                                     or os.environ.get(spec.api_key_env)):
            return f"${spec.api_key_env} is not set (api_key_env)"
        return None
    if spec.command:
        exe = spec.command[0]
        return None if shutil.which(exe) else f"'{exe}' (command of {spec.source}) not on PATH"
    p = probes[spec.runner]
    return None if p.version else f"runner {spec.runner}: {p.problem}"

