"""What the contract tests (and bench/provider_errors.py) share: the private project the
real clients run in, where the pinned clients are, the one-task file and reading logs.

Plain functions, no fixtures, so the benchmark can build the same projects outside
pytest; conftest.py turns them into fixtures.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from preset_support import AgentProject
from support import Project, cli_env

CLIENTS = Path(__file__).resolve().parent.parent / "clients"
CLIENT_BIN = CLIENTS / "node_modules" / ".bin"
VERSIONS = CLIENTS / "versions.txt"
SCRUB = ("ANTHROPIC_", "CLAUDE_", "OPENAI_", "CODEX_", "GEMINI_", "GOOGLE_", "OPENCODE",
         "LLM_", "FAKE_", "XDG_", "AWS_", "VERTEX")

BODY = 'You are a careful reviewer.\nQuote "this", a back\\slash, tab\there, ünï, 🚀.'
"""A definition body with what quoting could break: quotes, backslash, tab, non-ASCII."""
PROMPT = "Review the login flow"
GOOD_KEY = "sk-stub-good-key"
"""The key the OpenAI-style stubs' clients are given (they reject only on a "401" step)."""


def pinned() -> dict[str, str]:
    """Package name → pinned version, from versions.txt."""
    out: dict[str, str] = {}
    for line in VERSIONS.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and not line.startswith("#"):
            out[parts[1]] = parts[2]
    return out


def find_client(exe: str) -> Path | None:
    """The pinned client's executable, or None when it is not installed (llm lives in
    the venv beside this interpreter, the others in tests/clients)."""
    if exe == "llm":
        found = shutil.which("llm", path=str(Path(sys.executable).parent))
        return Path(found) if found else None
    path = CLIENT_BIN / exe
    return path if path.exists() else None


def client(exe: str) -> Path:
    """The pinned client's executable; fails the test with what to run when it is missing
    (a contract nobody checked is not a passing one, so no skip)."""
    path = find_client(exe)
    if path is None:
        pytest.fail(f"the real '{exe}' client is not installed: run "
                    "`bash tests/clients/install.sh` (CI does this in .ci/run)")
    return path


def new_project(base: Path) -> AgentProject:
    """A project under `base` whose PATH has the real clients and whose HOME and config
    dirs are private to it; no provider key or setting leaks in from the machine."""
    root = base / "project"
    (root / ".aiwg").mkdir(parents=True)
    home = base / "home"
    home.mkdir()
    env = {k: v for k, v in cli_env().items() if not k.startswith(SCRUB)}
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([str(CLIENT_BIN), venv_bin, env.get("PATH", "")])
    env["HOME"] = str(home)
    env["XDG_CONFIG_HOME"] = str(home / ".config")
    env["XDG_DATA_HOME"] = str(home / ".local" / "share")
    env["XDG_CACHE_HOME"] = str(home / ".cache")
    env["XDG_STATE_HOME"] = str(home / ".local" / "state")
    env["NO_COLOR"] = "1"
    tmp = base / "tmp"  # gemini writes an error report to os.tmpdir() per failure
    tmp.mkdir()
    env["TMPDIR"] = str(tmp)
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        env.pop(proxy, None)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return AgentProject(Project(root), home, env)


def one_task(ap: AgentProject, settings: str = "", agent: str = "reviewer",
             retries: int | None = None, timeout_ms: int | None = None,
             prompt: str = PROMPT) -> None:
    """Write t.yaml with one task `a` (output a.md); `settings` is a YAML flow mapping,
    braces included, e.g. `{timeout_per_task: 8000}` (milliseconds)."""
    lines = ["tasks:", "  - id: a", f"    agent: {agent}", f"    prompt: {json.dumps(prompt)}",
             "    output: a.md"]
    if retries is not None:
        lines.append(f"    retries: {retries}")
    if timeout_ms is not None:
        lines.append(f"    timeout: {timeout_ms}")
    if settings:
        lines.append(f"settings: {settings}")
    ap.tasks("\n".join(lines) + "\n")


def run_two_chained_tasks(ap: AgentProject) -> dict[str, Any]:
    """Tasks a then b (b depends on a) on agent `reviewer`, run to success; the report,
    for checking that tokens, cost and turns add up in both reports."""
    ap.tasks("""\
        tasks:
          - {id: a, agent: reviewer, prompt: "First", output: a.md}
          - {id: b, agent: reviewer, prompt: "Second", output: b.md, dependencies: [a]}
    """)
    proc = ap.run("t.yaml")
    assert proc.returncode == 0, proc.stderr
    return ap.report()


def run_two_tasks_with_a_bad_key(ap: AgentProject, runner: str,
                                  settings: str = "{max_parallel: 1}", a_fields: str = "",
                                  **env: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Issue 8's promise, checked the same way for every runner: tasks a and b on one
    runner whose key the stub rejects, the default 120 s timeout.  The run ends well under
    it (< 60 s); a is bad credentials after one attempt; b is not run ("credentials were
    rejected in task 'a'") and the report's notes say why.  Returns (a, b) for the
    runner's own checks."""
    ap.tasks(f"""\
        tasks:
          - {{id: a, agent: reviewer, prompt: "First", output: a.md{a_fields}}}
          - {{id: b, agent: reviewer, prompt: "Second", output: b.md}}
        settings: {settings}
    """)
    t0 = time.monotonic()
    proc = ap.run("t.yaml", **env)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1, proc.stderr
    assert elapsed < 60, elapsed
    a, b = ap.task("a"), ap.task("b")
    assert a["status"] == "provider_error" and a["cause"] == "auth", a
    assert a["attempts"] == 1
    assert b["status"] == "provider_error" and b["cause"] == "auth", b
    assert "credentials were rejected in task 'a'" in b["error"]
    assert any(f"Bad credentials for the {runner} runner" in n for n in ap.report()["notes"])
    return a, b


def log_of(task: dict[str, Any]) -> str:
    """A task's log (its report entry's `log_path`): argv header, the agent's output."""
    return Path(task["log_path"]).read_text(encoding="utf-8", errors="replace")


def json_events(log: str, kind: str | None = None,
                subtype: str | None = None) -> list[dict[str, Any]]:
    """The JSON events a client printed, as kept in a task log; `kind` / `subtype` keep
    only those with that `type` / `subtype`."""
    out = []
    for line in log.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                ev = json.loads(line)
                if (kind is None or ev.get("type") == kind) and \
                        (subtype is None or ev.get("subtype") == subtype):
                    out.append(ev)
    return out


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released): connection refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
