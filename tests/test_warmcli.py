"""The warm CLI (warmcli.py) gives what a cold `python -m parallel_dispatch` gives.

Most tests run the CLI forked from a warm interpreter; these run the same commands
both ways and compare exit codes and output, and check that the fork is really taken
(else the suite pays cold starts without noticing) and really avoided where a
cold start is needed.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from support import Project, cli_env
from warmcli import cold_requested, run_cli

PARENT_OF_DISPATCHER = 'ps -o ppid= -p "$PPID" | tr -d " "'
"""A shell agent's command printing the pid of the process that started the CLI."""


def warm(*args: str, project: Project, env: dict[str, str] | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run_cli(args, project.root, env or cli_env(), timeout)


def cold(*args: str, project: Project, env: dict[str, str] | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run_cli(args, project.root, env or cli_env(), timeout, cold=True)


def stable(text: str, root: Path) -> str:
    """Output without what differs between two runs: paths, times, run ids."""
    text = text.replace(str(root), "<root>")
    return re.sub(r"\[\s*[\d.]+s\]|\d+\.\d+s|\d{8}T\d{6}Z-[0-9a-f]+", "<t>", text)


CASES = {
    "valid": ("validate", "t.yaml"),
    "invalid": ("validate", "bad.yaml"),
    "run": ("t.yaml", "-q"),
    "failing run": ("fails.yaml",),
    "plan": ("plan", "t.yaml"),
    "usage error": ("--no-such-option",),
}


@pytest.mark.parametrize("case", CASES)
def test_warm_and_cold_runs_agree(tmp_path: Path, case: str) -> None:
    results = []
    for runner in (warm, cold):
        project = Project(tmp_path / runner.__name__)
        project.write("t.yaml", """\
            tasks:
              - {id: a, agent: shell, prompt: "echo hi; echo warn >&2", output: a.md}
              - {id: b, agent: shell, prompt: "cat $DISPATCH_INPUTS", output: b.md,
                 dependencies: [a]}
        """)
        project.write("bad.yaml", """\
            tasks:
              - {id: a, agent: shell, prompt: "x", output: a.md, dependencies: [nope]}
              - {id: a, agent: shell, prompt: "y", output: /abs.md}
        """)
        project.write("fails.yaml", """\
            tasks:
              - {id: a, agent: shell, prompt: "echo out; exit 3", output: a.md}
        """)
        proc = runner(*CASES[case], project=project)
        results.append((proc.returncode, stable(proc.stdout, project.root),
                        stable(proc.stderr, project.root)))
    assert results[0] == results[1]
    assert "Traceback" not in results[0][2]


def test_a_signal_is_a_negative_return_code_and_a_timeout_raises(project: Project) -> None:
    """What subprocess.run gives: -9 for a CLI killed by SIGKILL (here by its own agent),
    TimeoutExpired when it outlives `timeout`."""
    project.write("kill.yaml", """\
        tasks:
          - {id: a, agent: shell, prompt: "kill -9 $PPID", output: a.md}
    """)
    for runner in (warm, cold):
        assert runner("kill.yaml", "-q", project=project).returncode == -9
    pidfile = project.root / "sleeper.pid"
    project.write("slow.yaml", f"""\
        tasks:
          - {{id: a, agent: shell, prompt: "echo $$ > {pidfile}; exec sleep 60", output: a.md}}
    """)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            warm("slow.yaml", "-q", project=project, timeout=3)
    finally:  # the killed dispatcher's agent is left over, as after a cold start
        with contextlib.suppress(ValueError, OSError):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


def test_the_fork_is_taken_and_a_startup_variable_avoids_it(project: Project) -> None:
    project.write("t.yaml", f"""\
        tasks:
          - {{id: a, agent: shell, prompt: '{PARENT_OF_DISPATCHER}', output: a.md}}
    """)
    out = project.root / ".aiwg/working/a.md"

    def parent(env: dict[str, str]) -> int:
        assert warm("t.yaml", "-q", project=project, env=env).returncode == 0
        return int(out.read_text())

    me = os.getpid()
    if not cold_requested():
        assert parent(cli_env()) != me  # forked by this process's server
    assert parent({**cli_env(), "PYTHONWARNINGS": "error::DeprecationWarning"}) == me
    assert parent({**cli_env(), "LC_ALL": "C"}) == me
