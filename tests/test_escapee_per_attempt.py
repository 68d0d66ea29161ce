"""An escaped agent process is found when its own attempt ends, not only at run end.

`process.sweep_attempt` looks for escapees among the children the kernel re-parents to
the dispatcher (`process._adopted`).  If it missed one, the run-end sweep would still
kill it, so only a task that runs *after* the leaky one, while the escapee would still
be writing into the promoted output, can tell the two apart.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import Project, pid_alive

pytestmark = pytest.mark.fresh_cli  # escapees: a real interpreter


@pytest.fixture
def pidfile(project: Project) -> Iterator[Path]:
    path = project.root / "escapee.pid"
    yield path
    with contextlib.suppress(ValueError, OSError):  # whatever happened: no escapee left
        os.kill(int(path.read_text()), signal.SIGKILL)


def test_escapee_is_killed_before_a_dependent_task_runs(project: Project, pidfile: Path) -> None:
    out = project.root / ".aiwg/working/out.txt"
    project.write("t.yaml", f"""\
        tasks:
          - id: leaky
            agent: shell
            output: out.txt
            prompt: |
              setsid sh -c 'echo $$ > {pidfile}; while :; do echo leak; sleep 0.02; done' &
              while [ ! -s {pidfile} ]; do sleep 0.01; done
              echo done
          - id: check
            agent: shell
            output: check.txt
            dependencies: [leaky]
            prompt: |
              before=$(wc -c < {out}); sleep 0.5; after=$(wc -c < {out})
              echo "$before $after"; [ "$before" = "$after" ]
    """)
    proc = project.run("t.yaml")
    assert proc.returncode == 0, (proc.stderr, project.report())
    assert not pid_alive(int(pidfile.read_text()))
