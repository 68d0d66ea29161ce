"""What environment an agent gets: the user's, minus the deny-list, plus its own `env`.

Real runs: the CLI starts command agents and a runner preset, each of which dumps
the environment it really received."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from parallel_dispatch.agent_env import (
    DENIED_NAMES,
    agent_environment,
    expand_references,
    is_denied,
    redact,
    secret_values,
)

TOKEN = "ghs_" + "T0kEn" * 8

ACTIONS_ENV = {
    "PATH": "/usr/bin:/bin",
    "HOME": "/home/runner",
    "CI": "true",
    "GITHUB_ACTIONS": "true",
    "GITHUB_REPOSITORY": "octo/widgets",
    "GITHUB_SHA": "0" * 40,
    "GITHUB_WORKSPACE": "/home/runner/work/widgets/widgets",
    "RUNNER_TEMP": "/home/runner/work/_temp",
    "ANTHROPIC_API_KEY": "sk-ant-agent-key",
    # everything below must not reach an agent
    "GITHUB_TOKEN": TOKEN,
    "GH_TOKEN": TOKEN,
    "INPUT_GITHUB-TOKEN": TOKEN,
    "INPUT_GITHUB_TOKEN": TOKEN,
    "INPUT_TASK-FILE": "tasks.yml",
    "ACTIONS_RUNTIME_TOKEN": "runtime-token-value",
    "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "oidc-request-token",
    "ACTIONS_ID_TOKEN_REQUEST_URL": "https://token.actions.example/",
    "ACTIONS_CACHE_URL": "https://cache.example/",
    "GITHUB_ENV": "/home/runner/work/_temp/_runner_file_commands/set_env_1",
    "GITHUB_OUTPUT": "/home/runner/work/_temp/_runner_file_commands/set_output_1",
    "GITHUB_PATH": "/home/runner/work/_temp/_runner_file_commands/add_path_1",
    "GITHUB_STATE": "/home/runner/work/_temp/_runner_file_commands/save_state_1",
    "GITHUB_STEP_SUMMARY": "/home/runner/work/_temp/_runner_file_commands/step_summary_1",
    "GITHUB_EVENT_PATH": "/home/runner/work/_temp/_github_workflow/event.json",
    "NOTIFY_SOCKET": "/run/systemd/notify",
    "WATCHDOG_USEC": "60000000",
    "WATCHDOG_PID": "1",
    "LISTEN_FDS": "1",
    "LISTEN_PID": "1",
    "LISTEN_FDNAMES": "x",
}
KEPT = ("PATH", "HOME", "CI", "GITHUB_ACTIONS", "GITHUB_REPOSITORY", "GITHUB_SHA",
        "GITHUB_WORKSPACE", "RUNNER_TEMP", "ANTHROPIC_API_KEY")


def test_the_deny_list_removes_tokens_runner_files_and_systemd_variables() -> None:
    env = agent_environment(ACTIONS_ENV)
    assert set(env) == set(KEPT)
    assert TOKEN not in json.dumps(env)
    for name in ACTIONS_ENV:
        assert is_denied(name) == (name not in KEPT), name
    assert {"GITHUB_TOKEN", "GITHUB_ENV", "GITHUB_OUTPUT", "NOTIFY_SOCKET"} <= DENIED_NAMES


def test_explicit_env_is_added_and_may_name_a_denied_variable() -> None:
    extra = {
        "GH_TOKEN": "${GITHUB_TOKEN}",          # passing the token on is possible, explicitly
        "MODE": "review",
        "BEARER": "Bearer ${GITHUB_TOKEN}!",
        "LITERAL": "$${GITHUB_TOKEN} and $HOME",  # $$ escapes; a bare $NAME is literal
        "NOT_SET": "${NO_SUCH_VARIABLE}",        # unset reference: the variable is left out
        "GITHUB_OUTPUT": "/tmp/mine",            # a literal value for a denied name is fine
    }
    env = agent_environment(ACTIONS_ENV, extra)
    assert env["GH_TOKEN"] == TOKEN and env["BEARER"] == f"Bearer {TOKEN}!"
    assert env["MODE"] == "review"
    assert env["LITERAL"] == "${GITHUB_TOKEN} and $HOME"
    assert "NOT_SET" not in env
    assert env["GITHUB_OUTPUT"] == "/tmp/mine"
    assert "GITHUB_TOKEN" not in env and "INPUT_GITHUB-TOKEN" not in env
    assert expand_references({"A": "${HOME}/x"}, ACTIONS_ENV) == {"A": "/home/runner/x"}


def test_secret_values_and_redaction() -> None:
    secrets = secret_values(ACTIONS_ENV, extra=["short", "another-secret-value"])
    assert TOKEN in secrets and "runtime-token-value" in secrets
    assert "oidc-request-token" in secrets and "another-secret-value" in secrets
    assert "short" not in secrets  # too short to redact without mangling ordinary text
    assert "tasks.yml" not in secrets and "sk-ant-agent-key" not in secrets
    text = f"token={TOKEN}\nagain {TOKEN}; runtime-token-value"
    assert redact(text, secrets) == "token=***\nagain ***; ***"
    assert redact("nothing here", secrets) == "nothing here"


# --- real runs: what a process really receives ---------------------------------


def _dump_env_config(dump: Path) -> str:
    """A command agent, the shell agent and a runner preset, each dumping its environment."""
    script = f'env -0 > {dump}/"$DISPATCH_TASK_ID".env; echo done'
    return f"""
[agents.dumper]
command = ["/bin/sh", "-c", {json.dumps(script)}]
prompt = "arg"
env = {{ GH_TOKEN = "${{GITHUB_TOKEN}}", MODE = "review" }}

[agents.preset-dumper]
runner = "claude"
command = ["/bin/sh", "-c", {json.dumps(script)}]
"""


TASKS = """\
name: envcheck
description: every kind of agent dumps its environment
tasks:
  - id: command
    agent: dumper
    prompt: go
    output: command.txt
  - id: shell
    agent: shell
    prompt: 'env -0 > {dump}/shell.env'
    output: shell.txt
  - id: preset
    agent: preset-dumper
    prompt: go
    output: preset.txt
settings:
  output_dir: out/
"""


def _read_env(path: Path) -> dict[str, str]:
    pairs = [p.split("=", 1) for p in path.read_bytes().decode().split("\0") if "=" in p]
    return {k: v for k, v in pairs}


def test_every_runner_starts_its_agent_with_the_filtered_environment(tmp_path: Path) -> None:
    dump = tmp_path / "dump"
    dump.mkdir()
    (tmp_path / ".aiwg").mkdir()
    (tmp_path / ".aiwg" / "dispatch.toml").write_text(_dump_env_config(dump))
    (tmp_path / "tasks.yaml").write_text(TASKS.format(dump=dump))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GITHUB_", "INPUT_"))}
    env.update({k: v for k, v in ACTIONS_ENV.items() if k not in ("PATH", "HOME")})
    proc = subprocess.run([sys.executable, "-m", "parallel_dispatch", "run", "tasks.yaml"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert (dump / "command.env").exists(), proc.stdout + proc.stderr
    seen = {name: _read_env(dump / f"{name}.env") for name in ("command", "shell", "preset")}
    for name, agent_env in seen.items():
        leaked = sorted(k for k in agent_env if is_denied(k) and k != "GH_TOKEN")
        assert leaked == [], f"{name} agent received {leaked}"
        assert agent_env["GITHUB_REPOSITORY"] == "octo/widgets"  # harmless context stays
        assert agent_env["DISPATCH_TASK_ID"] == name
    # only the agent that asked for the token by name got it, under the name it chose
    assert seen["command"]["GH_TOKEN"] == TOKEN and seen["command"]["MODE"] == "review"
    assert "GH_TOKEN" not in seen["shell"] and "GH_TOKEN" not in seen["preset"]
    for name in ("shell", "preset"):
        assert TOKEN not in "\0".join(f"{k}={v}" for k, v in seen[name].items())


@pytest.mark.parametrize("name", sorted(DENIED_NAMES))
def test_every_denied_name_is_documented(name: str) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert f"`{name}`" in readme


def test_api_key_env_naming_a_withheld_variable_is_explicit(tmp_path: Path) -> None:
    """`api_key_env = "GITHUB_TOKEN"` (GitHub Models through the openai runner) works;
    other agents of the same run still do not see the token."""
    from parallel_dispatch.loader import load_spec
    from parallel_dispatch.runners import RunnerSet
    from parallel_dispatch.runners.base import Job

    (tmp_path / ".aiwg").mkdir()
    (tmp_path / ".aiwg" / "dispatch.toml").write_text(
        '[agents.models]\nrunner = "openai"\nmodel = "openai/gpt-4.1"\n'
        'base_url = "http://127.0.0.1:9/inference"\napi_key_env = "GITHUB_TOKEN"\n')
    (tmp_path / "t.yaml").write_text(
        "name: t\ndescription: d\ntasks:\n"
        "  - {id: a, agent: models, prompt: p, output: a.md}\n"
        "  - {id: b, agent: shell, prompt: 'true', output: b.txt}\n")
    spec = load_spec(tmp_path / "t.yaml")
    runners = RunnerSet(base_env=ACTIONS_ENV)
    jobs = [Job(spec=spec, index=i, attempt=1, run_id="r") for i in (0, 1)]
    envs = [runners.runner_for(job).env(job, tmp_path / "out") for job in jobs]
    assert envs[0]["GITHUB_TOKEN"] == TOKEN
    assert "GITHUB_TOKEN" not in envs[1] and TOKEN not in envs[1].values()
