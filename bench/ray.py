"""Benchmark k (issue 12): the Ray executor's per-task overhead and throughput.

    python bench/ray.py [--reps 3] [--json bench/ray.json]

1. Per-task overhead: 100 `shell` tasks of `true` at `--max-parallel 1` (a sequential
   round trip each), locally, then with `--executor ray:ADDR` (shared workspace), then with
   `workspace = "working_dir"` (a private copy of the project per attempt).
2. Throughput: 16 tasks of `sleep 2` at `--max-parallel 16` with `[executor] resources =
   { agent_slot = 1 }`, on a cluster of the head alone (`agent_slot` 2), then after a
   second node (`agent_slot` 2) joined; the report's `nodes` says where each ran.
   A last `working_dir` series uses a project of 1,000 files of 4 KiB (20 tasks): each
   attempt copies the project on the node.
3. One-off costs: `ray start` of the head and of the second node, and the CLI's start
   until it prints "executor: Ray cluster at ..." (start-up plus `ray.init`); and the
   start of a bare interpreter against one that imports the shepherd (every remote
   attempt starts one).

The CLI always runs as a child process, the way users run it.  The cluster is the `ray`
test group's (tests/ray/raycluster.py: 127.0.0.1, token auth, stopped by PID, never
`ray stop`), and everything runs in a private network + PID namespace whose only
interface is lo: run from a normal shell, the script re-executes itself under
`unshare --net --pid --fork --mount-proc` (root needed).  The whole run takes 3-4 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

sys.dont_write_bytecode = True

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests" / "ray"))

from raycluster import ClusterError, RayCluster, free_port, interfaces, unusable_reason  # noqa: E402

OVERHEAD_TASKS = 100
SLEEP_TASKS, SLEEP_S = 16, 2
BIG_FILES, BIG_TASKS = 1000, 20
"""`working_dir` with a project of 1,000 files of 4 KiB: each attempt copies it."""
CLI_DEADLINE = 300.0
TOML = "[executor]\nresources = { agent_slot = 1 }\n"
EXECUTOR_LINE = "executor: Ray cluster at"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- load ------------------------------------------------------------------------------

def _busy_s() -> float:
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:]]
    return (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / CLK_TCK


@dataclass
class Load:
    loadavg_1m: float
    busy_cores: float = 0.0
    """Average cores busy machine-wide while the block ran (the cluster, the CLI and
    everyone else: Ray's daemons are not our children, so they cannot be told apart)."""


@contextmanager
def probe() -> Iterator[Load]:
    load = Load(round(os.getloadavg()[0], 2))
    t0, b0 = time.perf_counter(), _busy_s()
    yield load
    wall = time.perf_counter() - t0
    load.busy_cores = round((_busy_s() - b0) / wall, 2) if wall > 0 else 0.0


# -- projects and runs -----------------------------------------------------------------

def task_file(name: str, prompt: str, n: int) -> str:
    lines = [f"name: {name}", "tasks:"]
    for i in range(n):
        lines += [f"  - id: t{i:03d}", "    agent: shell", f"    output: t{i:03d}.md",
                  f"    prompt: '{prompt}'"]
    return "\n".join(lines) + "\n"


@contextmanager
def project(tag: str, tasks: str, toml: str, files: int = 0) -> Iterator[Path]:
    """A temporary project; `files` extra files of 4 KiB in folders of 100."""
    root = Path(tempfile.mkdtemp(prefix=f"pd-bench-ray-{tag}-"))
    try:
        (root / ".aiwg").mkdir()
        (root / ".aiwg" / "dispatch.toml").write_text(toml)
        (root / "tasks.yaml").write_text(tasks)
        for i in range(files):
            path = root / "src" / f"d{i // 100:02d}" / f"f{i:04d}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{i:07d}\n" * 512)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Run:
    wall_s: float
    """Spawn to reap of the CLI."""
    report_s: float
    """The report's `total_time_s`: first task start to last task end."""
    connect_s: float | None
    """Spawn until the CLI printed the executor line (start-up + `ray.init` + checks)."""
    in_flight: int
    """Most attempts the dispatcher had started at once (report start_s/end_s): with Ray,
    an attempt may wait in Ray's queue for a node's `agent_slot`."""
    agents_peak: int | None
    """Most agents running at once, from the times each `sleep` agent wrote before and
    after its sleep (every node shares this machine's clock); None for other tasks."""
    agents_span_s: float | None
    """First agent start to last agent end, from the same times."""
    per_node: dict[str, int]
    """Attempts per node, from the report's `nodes` ("head"/"second" when known)."""
    load: Load = field(default_factory=lambda: Load(0.0))


def peak_concurrency(spans: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    # at the same instant an end (-1) sorts before a start
    now = best = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def run_cli(root: Path, max_parallel: int, cluster: RayCluster | None,
            names: dict[str, str]) -> Run:
    argv = [sys.executable, "-m", "parallel_dispatch", "tasks.yaml",
            "--max-parallel", str(max_parallel)]
    env = dict(os.environ)
    if cluster is not None:
        argv += ["--executor", f"ray:{cluster.address}"]
        env = cluster.driver_env()
    with probe() as load:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=root, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        connect: float | None = None
        err: list[str] = []
        for line in proc.stderr:  # stdout is the progress; the executor line is stderr
            if connect is None and line.startswith(EXECUTOR_LINE):
                connect = time.perf_counter() - t0
            err.append(line)
        code = proc.wait(timeout=CLI_DEADLINE)
        wall = time.perf_counter() - t0
    report = json.loads((root / ".aiwg/working/dispatch-report.json").read_text())
    if code != 0 or report["status"] != "succeeded":
        raise RuntimeError(f"{' '.join(argv)} exited {code} ({report['status']}):\n"
                           + "".join(err)[-3000:])
    agents: list[tuple[float, float]] = []
    for t in report["tasks"]:
        stamps = Path(t["output_path"]).read_text().split()
        if len(stamps) == 2:
            agents.append((float(stamps[0]), float(stamps[1])))
    nodes: Counter[str] = Counter()
    for t in report["tasks"]:
        for node in t.get("nodes", []):
            short = node.rpartition("(")[2].rstrip(")")
            nodes[names.get(short, short)] += 1
    return Run(round(wall, 3), report["summary"]["total_time_s"],
               None if connect is None else round(connect, 3),
               peak_concurrency([(t["start_s"], t["end_s"]) for t in report["tasks"]]),
               peak_concurrency(agents) if agents else None,
               round(max(b for _, b in agents) - min(a for a, _ in agents), 3)
               if agents else None,
               dict(sorted(nodes.items())), load)


def series(tag: str, tasks: str, toml: str, max_parallel: int, cluster: RayCluster | None,
           names: dict[str, str], reps: int, files: int = 0) -> list[Run]:
    runs = []
    for k in range(reps):
        with project(tag, tasks, toml, files) as root:
            run = run_cli(root, max_parallel, cluster, names)
        say(f"  {tag} #{k + 1}: wall {run.wall_s:.2f} s, report {run.report_s:.2f} s, "
            f"connect {run.connect_s} s, in flight {run.in_flight}, agents at once "
            f"{run.agents_peak} over {run.agents_span_s} s, nodes {run.per_node}, "
            f"load {run.load.loadavg_1m} ({run.load.busy_cores} cores busy)")
        runs.append(run)
    return runs


def spawn_s(code: str, n: int = 5) -> list[float]:
    """Wall seconds of `python -c CODE`, `n` times: the shepherd that every remote attempt
    starts is a fresh interpreter that imports trio and `process`."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        out.append(round(time.perf_counter() - t0, 3))
    return out


def median(runs: list[Run], key: str) -> float:
    values = [getattr(r, key) for r in runs]
    return round(float(statistics.median(v for v in values if v is not None)), 3)


# -- the cluster -----------------------------------------------------------------------

def wait_alive(cluster: RayCluster, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 60
    last: ClusterError | None = None
    while True:
        try:
            alive = [n for n in cluster.nodes() if n["Alive"]]
        except ClusterError as exc:
            alive, last = [], exc
        else:
            if len(alive) == count:
                return alive
            last = None
        if time.monotonic() > deadline:
            raise RuntimeError(f"{count} alive nodes not seen within 60 s: {alive}; {last}")
        time.sleep(0.5)


def machine() -> dict[str, Any]:
    head = subprocess.run(["git", "log", "-1", "--format=%h %s"], cwd=REPO,
                          capture_output=True, text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "daemon"], cwd=REPO,
                           capture_output=True, text=True, check=False).stdout.splitlines()
    return {"nproc": os.cpu_count(), "python": platform.python_version(),
            "ray": version("ray"), "platform": platform.platform(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "commit": head, "uncommitted_package_files": dirty,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def bench(reps: int) -> dict[str, Any]:
    out: dict[str, Any] = {"machine": machine(), "reps": reps}
    trivial = task_file("overhead", "true", OVERHEAD_TASKS)
    sleeps = task_file("throughput", f"date +%s.%N; sleep {SLEEP_S}; date +%s.%N",
                       SLEEP_TASKS)
    out["spawn_s"] = {code: spawn_s(code) for code in
                      ("pass", "import parallel_dispatch.shepherd, parallel_dispatch.process")}
    say(f"local: {OVERHEAD_TASKS} x true, max_parallel 1")
    out["overhead_local"] = series("local", trivial, TOML, 1, None, {}, reps)

    root = Path(tempfile.mkdtemp(prefix="pdray-", dir="/tmp"))  # short: socket paths
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(32).hex()}
    cluster = RayCluster(address=f"127.0.0.1:{free_port()}", env=env, root=root,
                         head_temp=root / "h", worker_temp=root / "w")
    try:
        say("ray start --head (agent_slot 2)")
        cluster._start_head()
        t0 = time.monotonic()
        head = wait_alive(cluster, 1)[0]
        cluster.timings["head_alive"] = time.monotonic() - t0
        names = {head["NodeID"][:8]: "head"}
        say(f"one node: {SLEEP_TASKS} x sleep {SLEEP_S}, max_parallel {SLEEP_TASKS}")
        out["throughput_one_node"] = series("one-node", sleeps, TOML, SLEEP_TASKS, cluster,
                                            names, reps)

        say("ray start --address (second node, agent_slot 2)")
        cluster._start_worker()
        cluster._wait_for_nodes()
        names[cluster.worker_node_id[:8]] = "second"
        say(f"two nodes: {SLEEP_TASKS} x sleep {SLEEP_S}, max_parallel {SLEEP_TASKS}")
        out["throughput_two_nodes"] = series("two-nodes", sleeps, TOML, SLEEP_TASKS,
                                             cluster, names, reps)

        say(f"ray, shared workspace: {OVERHEAD_TASKS} x true, max_parallel 1")
        out["overhead_ray_shared"] = series("ray-shared", trivial, TOML, 1, cluster, names,
                                            reps)
        say(f"ray, working_dir: {OVERHEAD_TASKS} x true, max_parallel 1")
        out["overhead_ray_working_dir"] = series(
            "ray-wd", trivial, TOML + 'workspace = "working_dir"\n', 1, cluster, names, reps)
        say(f"ray, working_dir, {BIG_FILES} files: {BIG_TASKS} x true, max_parallel 1")
        out["overhead_ray_working_dir_big"] = series(
            "ray-wd-big", task_file("overhead", "true", BIG_TASKS),
            TOML + 'workspace = "working_dir"\n', 1, cluster, names, reps, BIG_FILES)
    finally:
        cluster.stop()
        out["cluster_s"] = {k: round(v, 3) for k, v in cluster.timings.items()}
        out["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return out


def table(res: dict[str, Any]) -> str:
    def runs(key: str) -> list[Run]:
        return [r if isinstance(r, Run) else Run(**r) for r in res[key]]

    def raw(rs: list[Run]) -> str:
        return ", ".join(f"{r.wall_s:.2f}" for r in rs)

    rows = ["| case | tasks | wall (median) | per task: wall / n | per task: report makespan "
            "/ n | CLI start to executor line | walls (s) |", "|---|---|---|---|---|---|---|"]
    for key, label, n in (
            ("overhead_local", "local", OVERHEAD_TASKS),
            ("overhead_ray_shared", "Ray, shared workspace", OVERHEAD_TASKS),
            ("overhead_ray_working_dir", "Ray, `working_dir` (project: 2 files)",
             OVERHEAD_TASKS),
            ("overhead_ray_working_dir_big",
             f"Ray, `working_dir` (project: {BIG_FILES:,} files, 4 MiB)", BIG_TASKS)):
        rs = runs(key)
        wall, rep = median(rs, "wall_s"), median(rs, "report_s")
        conn = median(rs, "connect_s") if rs[0].connect_s is not None else None
        rows.append(f"| {label} | {n} | {wall:.2f} s | {wall / n * 1000:.1f} ms | "
                    f"{rep / n * 1000:.1f} ms | {'—' if conn is None else f'{conn:.2f} s'} | "
                    f"{raw(rs)} |")
    rows += ["", "| cluster | wall (median) | report makespan (median) | agents at once "
             "(max) | first agent start to last end (median) | tasks per node, each run "
             "| walls (s) |", "|---|---|---|---|---|---|---|"]
    for key, label in (("throughput_one_node", "head alone, agent_slot 2"),
                       ("throughput_two_nodes", "head + second node, agent_slot 2 each")):
        rs = runs(key)
        nodes = "; ".join(", ".join(f"{n} {c}" for n, c in r.per_node.items()) for r in rs)
        rows.append(f"| {label} | {median(rs, 'wall_s'):.2f} s | "
                    f"{median(rs, 'report_s'):.2f} s | "
                    f"{max(r.agents_peak or 0 for r in rs)} | "
                    f"{median(rs, 'agents_span_s'):.2f} s | {nodes} | {raw(rs)} |")
    rows += ["", "python -c (median of 5): " + ", ".join(
        f"`{code}` {statistics.median(v):.3f} s" for code, v in res["spawn_s"].items())]
    rows += ["", "one-off (s): " + ", ".join(f"{k} {v:.2f}"
                                               for k, v in res["cluster_s"].items())]
    return "\n".join(rows)


def enter_namespace(argv: list[str]) -> int:
    """Run this script again inside a fresh network + PID namespace with only lo up; bash
    stays its PID 1 to reap what Ray daemonises, and the kernel kills the rest with it."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        say("bench/ray.py: needs `unshare` and `ip` (util-linux, iproute2), run as root")
        return 1
    script = 'ip link set lo up || exit 1; "$0" "$@"; exit $?'
    return subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", "bash",
                           "-c", script, sys.executable, str(Path(__file__).resolve()),
                           *argv], check=False).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write every raw number here")
    args = parser.parse_args()
    if interfaces() != ["lo"]:
        return enter_namespace(sys.argv[1:])
    reason = unusable_reason()
    if reason:
        say(f"bench/ray.py: {reason}")
        return 1
    t0 = time.monotonic()
    res = bench(args.reps)
    res["total_s"] = round(time.monotonic() - t0, 1)
    res = json.loads(json.dumps(res, default=asdict))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    print(table(res))
    say(f"done in {res['total_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
