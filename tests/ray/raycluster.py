"""A real two-node Ray cluster on loopback for the `ray` test group (issue 12; design notes:
docs/design/ray-executor.md §3, §4, §7).

This module never imports `ray`: the pytest process must not become a Ray driver (a
driver's `ray.init` starts threads and, outside a namespace, probes 8.8.8.8). Everything
that talks to the cluster runs as a subprocess (`raydriver.py`) with the token in its
environment.

Why a separate module and no `tests/ray/__init__.py`: with an `__init__.py` pytest's
default import mode names this folder's package `ray` and puts `tests/` on `sys.path`,
so `import ray` anywhere in the session finds the tests instead of Ray.

Cleanup is by recorded PID, never `ray stop` (it kills every Ray process on the machine,
whoever started it). The PID namespace that `tests/ray/run` makes is the backstop.
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "raydriver.py"
RUN_HINT = "run through tests/ray/run (unshare -n)"
START_DEADLINE = 60.0
"""Seconds for the nodes to show up alive; a start is 3-10 s on this 2-core machine."""
TERM_GRACE = 5.0
"""Seconds between SIGTERM and SIGKILL at teardown (design §3.2: SIGTERM alone left 6 of
13 processes alive after 5 s)."""
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
"""The GCS declares a silent node dead after ~3 s instead of 3 s x 5: a killed raylet's
node is gone before a test's retry or `restart_worker_node` looks (the default made a
restart take 12-15 s). A check fails only after health_check_timeout_ms (default kept),
so a slow but live node on this busy machine is not declared dead."""
RAY_AGENTS = frozenset({"ray::DashboardAgent", "ray::RuntimeEnvAgent"})
"""Children of a raylet that are not task workers."""

Node = Literal["head", "worker"]


# -- the host ---------------------------------------------------------------------------

def interfaces() -> list[str]:
    """Network interfaces of *this process's* network namespace.

    Not `/sys/class/net`: sysfs shows the namespace of whoever mounted it, so inside
    `unshare --net` it still lists the host's eth0. `/proc/self/net/dev` is per reader."""
    lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    return sorted(line.split(":", 1)[0].strip() for line in lines)


def ray_installed() -> bool:
    """`ray` is an installed regular package (not a namespace package made of some folder
    named `ray` on sys.path, such as this one)."""
    spec = importlib.util.find_spec("ray")
    return spec is not None and spec.origin is not None


def unusable_reason() -> str | None:
    """Why the cluster must not start here, or None. Never on a routable interface."""
    if not ray_installed():
        return "ray is not installed (pip install -e '.[ray]')"
    nics = interfaces()
    if nics != ["lo"]:
        return f"{RUN_HINT}: this network namespace has {', '.join(nics)}, not only lo"
    return None


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    start: int
    """Start time in clock ticks since boot: with the pid, it names one process even if
    the pid is reused."""
    state: str
    cmdline: str
    """argv joined by spaces ('' for zombies and kernel threads)."""


def _proc(pid: int) -> Proc | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # after "pid (comm)", which may hold spaces
    cmdline = raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    return Proc(pid, int(fields[1]), int(fields[19]), fields[0], cmdline)


def processes() -> dict[int, Proc]:
    """Every process this PID namespace shows, by pid."""
    out: dict[int, Proc] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (p := _proc(int(entry))) is not None:
            out[p.pid] = p
    return out


def _alive(pid: int, start: int) -> bool:
    p = _proc(pid)
    return p is not None and p.start == start and p.state not in ("Z", "X")


def _environ_has(pid: int, entry: bytes) -> bool:
    try:
        return entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def descendants(roots: set[int], table: dict[int, Proc]) -> set[int]:
    children: dict[int, list[int]] = {}
    for p in table.values():
        children.setdefault(p.ppid, []).append(p.pid)
    seen, todo = set(roots), list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def survivors(marker: str) -> list[int]:
    """PIDs whose command line contains `marker` (ours excluded). Zombies have an empty
    command line, so a dead but unreaped agent does not count. Under tests/ray/run this
    sees the PID namespace, which holds every node, worker and agent of the test."""
    me = os.getpid()
    return sorted(p.pid for p in processes().values()
                  if marker in p.cmdline and p.pid != me and p.state not in ("Z", "X"))


def wait_gone(marker: str, within: float = 30) -> list[int]:
    """Poll until no process carries `marker`; the survivors when `within` s run out
    (empty: all gone). Use as `assert not wait_gone(m), ...`."""
    deadline = time.monotonic() + within
    while (left := survivors(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _decode(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as /proc/net/{tcp,udp}[6] prints it: 32-bit words in host (little-endian)
    order."""
    raw = bytes.fromhex(hex_addr)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(words)


def is_loopback(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


def bound_sockets(tables: dict[str, str]) -> list[tuple[str, str, int]]:
    """(table, address, port) of every listening TCP socket and every bound UDP socket in
    `tables` ({"tcp": text of /proc/net/tcp, ...}), so a snapshot taken inside a Ray task
    can be checked here."""
    out = []
    for name, text in tables.items():
        for line in text.splitlines()[1:]:
            cols = line.split()
            hex_addr, hex_port = cols[1].split(":")
            listening = cols[3] == "0A" if name.startswith("tcp") else int(hex_port, 16) != 0
            if listening:
                out.append((name, str(_decode(hex_addr)), int(hex_port, 16)))
    return out


def net_tables() -> dict[str, str]:
    return {n: Path(f"/proc/net/{n}").read_text() for n in ("tcp", "tcp6", "udp", "udp6")}


# -- the cluster ------------------------------------------------------------------------

class ClusterError(RuntimeError):
    """The test cluster did not start; the message says which step and where its log is."""


def _ray_exe() -> str:
    beside = Path(sys.executable).parent / "ray"
    found = str(beside) if beside.is_file() else shutil.which("ray")
    if not found:
        raise ClusterError(f"no `ray` command beside {sys.executable} or on PATH")
    return found


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class RayCluster:
    """Head + one worker node on 127.0.0.1, token auth on; see `start_cluster`."""

    address: str
    env: dict[str, str]
    """RAY_AUTH_MODE and RAY_AUTH_TOKEN: add them to a driver's (the CLI's) environment."""
    root: Path
    head_temp: Path
    worker_temp: Path
    head_node_id: str = ""
    worker_node_id: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds: head_start, worker_start, nodes_alive, stop (measured, for the report)."""
    _recorded: set[tuple[int, int]] = field(default_factory=set, repr=False)

    # -- for tests

    def driver_env(self, **extra: str) -> dict[str, str]:
        """This process's environment plus the token (and `extra`), for a driver."""
        return {**os.environ, **self.env, **extra}

    def raylet_pid(self, node: Node = "worker") -> int:
        temp = f"{self.temp(node)}/"
        found = [p.pid for p in processes().values()
                 if p.cmdline.split(" ", 1)[0].endswith("/raylet") and temp in p.cmdline
                 and p.state not in ("Z", "X")]
        if len(found) != 1:
            raise ClusterError(f"expected one raylet under {temp}, found pids {found}")
        self.record()
        return found[0]

    def worker_pids(self, node: Node = "worker") -> list[int]:
        """Ray worker processes (`ray::IDLE`, `ray::<function>`) of `node`: the raylet's
        children, minus its agents."""
        raylet = self.raylet_pid(node)
        return sorted(p.pid for p in processes().values()
                      if p.ppid == raylet and p.cmdline.startswith("ray::")
                      and p.cmdline.split(" ", 1)[0] not in RAY_AGENTS)

    def temp(self, node: Node) -> Path:
        return self.head_temp if node == "head" else self.worker_temp

    def nodes(self, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """`ray.nodes()`, from a short-lived driver subprocess."""
        proc = driver("nodes", self.address, env=env or self.driver_env(), timeout=60)
        if proc.returncode != 0:
            raise ClusterError(f"`raydriver.py nodes` exited {proc.returncode}:\n"
                               f"{proc.stderr[-2000:]}")
        nodes: list[dict[str, Any]] = driver_result(proc.stdout)
        return nodes

    def restart_worker_node(self) -> None:
        """Start the second node again (after a test killed its raylet): stop what is left
        of the old one, `ray start --address` with the same temp dir, wait until the head
        and a new node are the only alive ones."""
        old = self.worker_node_id
        self.record()
        temp = f"{self.worker_temp}/"
        table = processes()
        leftovers = descendants({p.pid for p in table.values() if temp in p.cmdline}, table)
        _terminate({(pid, table[pid].start) for pid in leftovers if pid in table})
        self._start_worker()
        self._wait_for_nodes(exclude=old)

    # -- lifecycle

    def record(self) -> None:
        """Remember every process of this cluster: its command line names our temp root,
        or its environment holds our token (a worker re-parented after its raylet died
        still does), plus their descendants."""
        me = os.getpid()
        root = f"{self.root}/"
        token = f"RAY_AUTH_TOKEN={self.env['RAY_AUTH_TOKEN']}".encode()
        table = processes()
        ours = {p.pid for p in table.values()
                if p.pid != me and (root in p.cmdline or _environ_has(p.pid, token))}
        self._recorded |= {(pid, table[pid].start) for pid in descendants(ours, table)
                           if pid != me and pid in table}

    def _ray_start(self, args: list[str], log: Path) -> None:
        with log.open("ab") as out:
            # Output to a file, not a pipe: `ray start` daemonises, and its daemons would
            # hold a pipe open long after the command returned.
            proc = subprocess.run([_ray_exe(), "start", *args], stdout=out,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  env={**self.driver_env(), **FAST_NODE_DEATH},
                                  timeout=120, check=False)
        self.record()
        if proc.returncode != 0:
            raise ClusterError(f"`ray start {' '.join(args)}` exited {proc.returncode}; "
                               f"{log}:\n{_tail(log)}")

    def _start_head(self) -> None:
        t0 = time.monotonic()
        self._ray_start(["--head", "--node-ip-address=127.0.0.1",
                         f"--port={self.address.rpartition(':')[2]}",
                         f"--temp-dir={self.head_temp}", "--include-dashboard=false",
                         "--disable-usage-stats", "--num-cpus=1",
                         '--resources={"agent_slot": 2, "head_only": 1}'],
                        self.root / "head-start.log")
        self.timings["head_start"] = time.monotonic() - t0

    def _start_worker(self) -> None:
        t0 = time.monotonic()
        self._ray_start([f"--address={self.address}", "--node-ip-address=127.0.0.1",
                         f"--temp-dir={self.worker_temp}", "--disable-usage-stats",
                         "--num-cpus=1", '--resources={"agent_slot": 2}'],
                        self.root / "worker-start.log")
        self.timings["worker_start"] = time.monotonic() - t0

    def _wait_for_nodes(self, exclude: str = "") -> None:
        """Until exactly two nodes are alive, the head (it has `head_only`) and another
        that is not `exclude` (a node killed before a restart)."""
        t0 = time.monotonic()
        deadline = t0 + START_DEADLINE
        seen: list[dict[str, Any]] = []
        error = ""
        while True:
            try:
                seen = [n for n in self.nodes() if n["Alive"]]
            except ClusterError as e:
                error = f"; last driver error: {e}"
            else:
                heads = [n["NodeID"] for n in seen if "head_only" in n["Resources"]]
                others = [n["NodeID"] for n in seen if "head_only" not in n["Resources"]]
                if len(heads) == 1 and len(others) == 1 and others[0] != exclude:
                    self.head_node_id, self.worker_node_id = heads[0], others[0]
                    self.timings["nodes_alive"] = time.monotonic() - t0
                    return
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"two alive nodes not seen within {START_DEADLINE:.0f} s "
                    f"(last alive: {[(n['NodeID'][:8], n['Resources']) for n in seen]}); "
                    f"logs under {self.root}{error}")
            time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM everything recorded, SIGKILL what is left after TERM_GRACE, remove the
        temp dirs."""
        t0 = time.monotonic()
        try:
            self.record()
            _terminate(self._recorded)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self.timings["stop"] = time.monotonic() - t0


def _terminate(procs: set[tuple[int, int]]) -> None:
    """SIGTERM, wait up to TERM_GRACE, SIGKILL, then wait for the kills to land (and reap
    the ones that are our own children, e.g. when pytest is a namespace's PID 1)."""
    def signal_all(sig: signal.Signals) -> None:
        for pid, start in procs:
            if _alive(pid, start):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)

    def wait(within: float) -> bool:
        deadline = time.monotonic() + within
        while True:
            for pid, _ in procs:
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(pid, os.WNOHANG)
            if not any(_alive(pid, start) for pid, start in procs):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    signal_all(signal.SIGTERM)
    if not wait(TERM_GRACE):
        signal_all(signal.SIGKILL)
        wait(TERM_GRACE)


def driver(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """`python raydriver.py ARGS`: a Ray driver in its own interpreter."""
    return subprocess.run([sys.executable, str(DRIVER), *args], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL)


def driver_result(stdout: str) -> Any:
    """The JSON after raydriver.py's RESULT marker (Ray writes its own lines to stdout)."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if len(lines) != 1:
        raise ClusterError(f"no single RESULT line in the driver's output:\n{stdout[-2000:]}")
    return json.loads(lines[0].removeprefix("RESULT "))


@contextlib.contextmanager
def start_cluster() -> Iterator[RayCluster]:
    """A head and a second node, stopped by PID on exit, also when starting fails."""
    root = Path(tempfile.mkdtemp(prefix="pdray-", dir="/tmp"))  # short: socket paths ≤ 107
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    cluster = RayCluster(address=f"127.0.0.1:{free_port()}", env=env, root=root,
                         head_temp=root / "h", worker_temp=root / "w")
    try:
        cluster._start_head()
        cluster._start_worker()
        cluster._wait_for_nodes()
        yield cluster
    finally:
        cluster.stop()
