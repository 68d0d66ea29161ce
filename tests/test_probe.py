"""probe.py: a process we may not signal is someone else's, and alive."""

from __future__ import annotations

import os
import subprocess

import pytest

from parallel_dispatch.probe import pid_alive


def test_a_running_child_is_alive_and_a_reaped_one_is_not() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        assert pid_alive(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert not pid_alive(proc.pid)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_another_users_process_is_alive() -> None:
    """As `nobody`, PID 1 (root's) answers EPERM: a daemon run by systemd as another user
    must still show as running in `parallel-dispatch status`."""
    pid = os.fork()
    if pid == 0:  # the child becomes nobody and reports through its exit code
        try:
            os.setgid(65534)
            os.setuid(65534)
            os._exit(0 if pid_alive(1) else 1)
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
