"""Contract tests: the real agent CLIs, at the versions pinned in tests/clients/versions.txt,
run by `parallel-dispatch` end to end against local protocol stubs (tests/stubs/).

The clients must be installed (`bash tests/clients/install.sh`; `.ci/run` does it).  A
missing client fails these tests instead of skipping them: a contract nobody checked is
not a passing one.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from preset_support import AgentProject
from support import Project, cli_env

CLIENTS = Path(__file__).resolve().parent.parent / "clients"
CLIENT_BIN = CLIENTS / "node_modules" / ".bin"
VERSIONS = CLIENTS / "versions.txt"
SCRUB = ("ANTHROPIC_", "CLAUDE_", "OPENAI_", "CODEX_", "GEMINI_", "GOOGLE_", "OPENCODE",
         "LLM_", "FAKE_", "XDG_", "AWS_", "VERTEX")


def pinned() -> dict[str, str]:
    """Package name → pinned version, from versions.txt."""
    out: dict[str, str] = {}
    for line in VERSIONS.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and not line.startswith("#"):
            out[parts[1]] = parts[2]
    return out


def client(exe: str) -> Path:
    """The pinned client's executable; fails with what to run when it is missing."""
    if exe == "llm":
        found = shutil.which("llm", path=str(Path(sys.executable).parent))
        path = Path(found) if found else None
    else:
        path = CLIENT_BIN / exe
    if path is None or not path.exists():
        pytest.fail(f"the real '{exe}' client is not installed: run "
                    "`bash tests/clients/install.sh` (CI does this in .ci/run)")
    return path


@pytest.fixture
def contract_project(tmp_path: Path) -> Iterator[AgentProject]:
    """A project whose PATH has the real clients and whose HOME and config dirs are
    private to the test; no provider key or setting leaks in from the machine."""
    root = tmp_path / "project"
    (root / ".aiwg").mkdir(parents=True)
    home = tmp_path / "home"
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
    tmp = tmp_path / "tmp"  # gemini writes an error report to os.tmpdir() per failure
    tmp.mkdir()
    env["TMPDIR"] = str(tmp)
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        env.pop(proxy, None)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    yield AgentProject(Project(root), home, env)
