"""Test support: a temporary project with a real test agent, and process helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TESTS = Path(__file__).parent
AGENT = TESTS / "bin" / "test-agent"


@dataclass
class Project:
    root: Path
    cold: bool = False
    """Run the CLI as a fresh interpreter, not forked warm (see warmcli.py)."""

    @property
    def agent_log(self) -> Path:
        return self.root / "agent-log.jsonl"

    def write(self, rel: str, text: str) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
        return path

    def config(self, extra: str = "") -> Path:
        """Configure `[agents."*"]` as the echoing test agent, plus `extra` TOML."""
        body = textwrap.dedent(f"""
            [agents."*"]
            command = [{json.dumps(sys.executable)}, {json.dumps(str(AGENT))}, "--echo"]
            env = {{ AGENT_LOG = {json.dumps(str(self.agent_log))} }}
        """) + textwrap.dedent(extra)
        return self.write(".aiwg/dispatch.toml", body)

    def events(self) -> list[dict[str, object]]:
        if not self.agent_log.exists():
            return []
        return [json.loads(line) for line in self.agent_log.read_text().splitlines()]

    def spans(self) -> dict[str, tuple[float, float]]:
        """task id → (start, end) wall-clock seconds, from the agents' own log lines."""
        start: dict[str, float] = {}
        out: dict[str, tuple[float, float]] = {}
        for e in self.events():
            if e["event"] == "start":
                start[str(e["task"])] = float(e["t"])  # type: ignore[arg-type]
            elif e["event"] == "end":
                task = str(e["task"])
                out[task] = (start[task], float(e["t"]))  # type: ignore[arg-type]
        return out

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run the CLI in the project root: `python -m parallel_dispatch ARGS`, forked
        from a warm interpreter unless `cold` (warmcli.py)."""
        from warmcli import run_cli

        return run_cli(args, self.root, cli_env(), timeout, cold=self.cold)

    def report(self, output_dir: str = ".aiwg/working") -> dict[str, object]:
        return json.loads((self.root / output_dir / "dispatch-report.json").read_text())


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    return env


def pid_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie (init may be slow to reap in containers)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_until(pred: Callable[[], bool], timeout: float = 30.0, interval: float = 0.05) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def symlink_loops(root: Path) -> None:
    """`src/x/a.py` under two links back up the tree (`up -> ..`, `up2 -> ../..`): a
    `glob.glob('src/**/*.py', recursive=True)` that follows them never ends."""
    (root / "src/x").mkdir(parents=True)
    (root / "src/x/a.py").write_text("a = 1\n")
    (root / "src/x/up").symlink_to("..")
    (root / "src/x/up2").symlink_to("../..")
