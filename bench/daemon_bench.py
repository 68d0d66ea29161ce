"""Benchmark d: the `parallel-dispatch watch` daemon (issue 4, section 10).

Black-box on purpose: the daemon runs as a subprocess on a temporary project,
task files are dropped into `PROJECT/.aiwg/tasks/` by atomic rename, and every
number comes from outside the process (`/proc`, timestamps written by the
agent itself), so the harness works with whatever implementation lands.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")
STAMP_CMD = "date +%s.%N"
"""The agent's first action; GNU date prints CLOCK_REALTIME with ns, like time.time()."""


@dataclass
class DaemonResult:
    available: bool
    note: str = ""
    ready_s: float | None = None
    ready_via: str = ""
    drops: int = 0
    missed: int = 0
    missed_drops: list[int] = field(default_factory=list)
    reaction_ms: list[float] = field(default_factory=list)
    reaction_p50_ms: float | None = None
    reaction_p95_ms: float | None = None
    stamp_cost_ms: float | None = None
    idle_window_s: float | None = None
    idle_cpu_pct: float | None = None
    idle_cpu_pct_by_thread: dict[str, float] = field(default_factory=dict)
    idle_wakeups_per_s: float | None = None
    idle_rss_mb_max: float | None = None
    idle_rss_mb_end: float | None = None
    shutdown_idle_s: float | None = None
    shutdown_idle_rc: int | None = None
    shutdown_busy_s: float | None = None
    shutdown_busy_rc: int | None = None
    agent_survived_shutdown: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def watch_available(pd: Path) -> bool:
    """True when `parallel-dispatch --help` lists a `watch` subcommand.

    `parallel-dispatch watch --help` cannot be used as the probe: before the
    daemon exists the bare form treats `watch` as a task file name.
    """
    try:
        out = subprocess.run([str(pd), "--help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return re.search(r"^\s+watch\b", out.stdout, re.MULTILINE) is not None


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: with 50 samples p95 is the 48th smallest, no interpolation."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _cpu_ticks(pid: int) -> int:
    """utime + stime of the whole process (all threads, incl. watchfiles' Rust thread)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])


def _threads(pid: int) -> dict[str, tuple[int, int]]:
    """Per thread "tid name": (CPU ticks, context switches), to see who burns idle CPU."""
    out: dict[str, tuple[int, int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "stat").read_text()
            status = (task / "status").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        name = text[text.index("(") + 1:text.rindex(")")]
        switches = sum(int(line.split()[1]) for line in status.splitlines()
                       if "ctxt_switches:" in line)
        out[f"{task.name} {name}"] = (int(fields[11]) + int(fields[12]), switches)
    return out


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _stamp_cost_ms(samples: int = 20) -> float:
    """Median time from asking for `/bin/sh -c 'date …'` to the stamp it prints.

    The reaction time measures up to that stamp, so this part of it is the
    agent's own startup, not the daemon's.
    """
    costs = []
    for _ in range(samples):
        t0 = time.time()
        out = subprocess.run(["/bin/sh", "-c", STAMP_CMD], capture_output=True, text=True)
        costs.append((float(out.stdout) - t0) * 1000)
    return statistics.median(costs)


def _task_file(name: str, prompt: str) -> str:
    return (f"name: {name}\ntasks:\n  - id: react\n    agent: shell\n"
            f"    prompt: '{prompt}'\n    output: {name}.txt\n")


def _drop(tasks_dir: Path, name: str, text: str) -> float:
    """Write a dotfile, then rename it into place; returns the instant it appeared."""
    tmp = tasks_dir / f".{name}.yaml.tmp"
    tmp.write_text(text)
    os.replace(tmp, tasks_dir / f"{name}.yaml")
    return time.time()


def _wait_file(path: Path, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = ""
        if text.strip():
            return text
        time.sleep(0.002)
    return None


class _Daemon:
    """One `parallel-dispatch watch PROJECT` process with a private NOTIFY_SOCKET."""

    def __init__(self, pd: Path, project: Path, log_dir: Path, tag: str) -> None:
        self.sock_path = log_dir / f"notify-{tag}.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.sock_path))
        env = dict(os.environ, NOTIFY_SOCKET=str(self.sock_path))
        self.t_spawn = time.perf_counter()
        self.log = open(log_dir / f"daemon-{tag}.log", "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([str(pd), "watch", str(project)], cwd=project, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 15.0, fallback_s: float = 2.0) -> tuple[float, str]:
        """Seconds until READY=1 (sd_notify); without it, assume ready after `fallback_s`."""
        deadline = time.perf_counter() + timeout
        self.sock.settimeout(0.1)
        while time.perf_counter() < deadline and self.proc.poll() is None:
            try:
                msg = self.sock.recv(4096)
            except TimeoutError:
                continue
            if b"READY=1" in msg.split(b"\n"):
                return time.perf_counter() - self.t_spawn, "sd_notify READY=1"
        if self.proc.poll() is not None:
            raise RuntimeError(f"daemon exited early with code {self.proc.returncode}")
        time.sleep(max(0.0, fallback_s - (time.perf_counter() - self.t_spawn)))
        return time.perf_counter() - self.t_spawn, f"no READY=1; assumed after {fallback_s:g} s"

    def sigterm(self, timeout: float = 15.0) -> tuple[float, int | None]:
        t0 = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.close()
            return timeout, None
        return time.perf_counter() - t0, rc

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.sock.close()
        self.log.close()


def _group_alive(pgid: int) -> bool:
    """Any live (non-zombie) process left in the process group `pgid`?"""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def run(pd: Path, *, drops: int = 50, idle_s: float = 60.0, keep: bool = False,
        log: Any = None) -> DaemonResult:
    """Reaction time, idle CPU and RSS, and SIGTERM shutdown (idle and with a running agent)."""
    say = log or (lambda msg: print(msg, file=sys.stderr))
    if not watch_available(pd):
        return DaemonResult(False, "not available yet: `parallel-dispatch watch` does not exist")
    res = DaemonResult(True)
    res.stamp_cost_ms = round(_stamp_cost_ms(), 2)
    tmp = Path(tempfile.mkdtemp(prefix="pd-bench-d-"))
    project = tmp / "project"
    tasks_dir = project / ".aiwg" / "tasks"
    tasks_dir.mkdir(parents=True)
    stamps = tmp / "stamps"
    stamps.mkdir()
    daemon = _Daemon(pd, project, tmp, "main")
    try:
        ready_s, res.ready_via = daemon.wait_ready()
        res.ready_s = round(ready_s, 3)
        say(f"  d: daemon ready after {res.ready_s:.2f} s ({res.ready_via}); {drops} drops")
        for k in range(drops):
            stamp = stamps / f"{k}"
            name = f"drop-{k:03d}"
            written = _drop(tasks_dir, name, _task_file(name, f"{STAMP_CMD} >> {stamp}"))
            text = _wait_file(stamp, timeout=5.0)
            res.drops += 1
            if text is None:
                res.missed += 1
                res.missed_drops.append(k)
                if res.missed >= 5 and res.missed == res.drops:
                    res.note = "no drop was picked up; gave up after 5"
                    break
                continue
            res.reaction_ms.append(round((float(text.split()[0]) - written) * 1000, 2))
            time.sleep(0.1)  # let the run finish: each drop must be a fresh event
        if res.reaction_ms:
            res.reaction_p50_ms = round(percentile(res.reaction_ms, 50), 1)
            res.reaction_p95_ms = round(percentile(res.reaction_ms, 95), 1)
        time.sleep(2.0)  # settle: reports written, runs finished
        say(f"  d: idle for {idle_s:g} s")
        pid = daemon.proc.pid
        t0, c0, th0 = time.perf_counter(), _cpu_ticks(pid), _threads(pid)
        rss = [_rss_mb(pid)]
        while time.perf_counter() - t0 < idle_s:
            time.sleep(min(1.0, idle_s - (time.perf_counter() - t0)))
            rss.append(_rss_mb(pid))
        window = time.perf_counter() - t0
        res.idle_window_s = round(window, 1)
        res.idle_cpu_pct = round((_cpu_ticks(pid) - c0) / CLK_TCK / window * 100, 3)
        th1 = _threads(pid)
        res.idle_cpu_pct_by_thread = {
            k: round((v[0] - th0[k][0]) / CLK_TCK / window * 100, 3)
            for k, v in th1.items() if k in th0}
        res.idle_wakeups_per_s = round(sum(
            v[1] - th0[k][1] for k, v in th1.items() if k in th0) / window, 1)
        res.idle_rss_mb_max = round(max(rss), 1)
        res.idle_rss_mb_end = round(rss[-1], 1)
        res.shutdown_idle_s, res.shutdown_idle_rc = daemon.sigterm()
        res.shutdown_idle_s = round(res.shutdown_idle_s, 3)
    finally:
        daemon.close()
    _busy_shutdown(pd, tmp, res, say)
    if not keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return res


def _busy_shutdown(pd: Path, tmp: Path, res: DaemonResult, say: Any) -> None:
    """SIGTERM while an agent (`sleep 30`) runs: the group must die, the daemon must exit."""
    project = tmp / "project-busy"
    tasks_dir = project / ".aiwg" / "tasks"
    tasks_dir.mkdir(parents=True)
    pid_file = tmp / "busy.pid"
    daemon = _Daemon(pd, project, tmp, "busy")
    try:
        daemon.wait_ready()
        time.sleep(0.5)  # step around the READY-before-watching race measured above
        _drop(tasks_dir, "busy", _task_file("busy", f"echo $$ > {pid_file}; sleep 30"))
        text = _wait_file(pid_file, timeout=5.0)
        if text is None:
            say("  d: busy shutdown skipped: the agent never started")
            return
        res.shutdown_busy_s, res.shutdown_busy_rc = daemon.sigterm()
        res.shutdown_busy_s = round(res.shutdown_busy_s, 3)
        agent = int(text.split()[0])
        time.sleep(0.05)
        res.agent_survived_shutdown = _group_alive(agent)
        if res.agent_survived_shutdown:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(agent, signal.SIGKILL)
    finally:
        daemon.close()
