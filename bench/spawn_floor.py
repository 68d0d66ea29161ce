"""How fast can anything spawn 1,000 trivial processes here: the floor under benchmark b.

Benchmark b compares `parallel-dispatch` on 1,000 `shell` tasks (`prompt: "true"`,
4 slots) with `make -j4`.  This script puts the programs between the two, each one
a fresh process timed end to end like b, 4 at a time, `/bin/sh -c true` each:

* `make -j4` running `true` (b's yardstick) and `/bin/sh -c true`;
* `python-spawn`: plain Python, `os.posix_spawn` and `os.wait`, nothing else;
* `trio-run_process`: trio's `run_process` in 4 tasks, nothing else: what the
  dispatcher's process layer starts from;
* `trio-spawn-on-loop`: trio with `os.posix_spawn` on the event-loop thread and a pidfd
  wait, the cheapest spawn a trio program can do;
* `parallel-dispatch`: b itself (log, staged output, journal, report per task).

Runs are interleaved (`--reps` rounds of all variants) and the medians reported, with
the load seen.  `python bench/spawn_floor.py [--reps 5] [--tmpdir /dev/shm]`; writes
`bench/spawn_floor.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

N = 1000
SLOTS = 4
HERE = Path(__file__).resolve().parent

PY_SPAWN = f"""
import os
left, running = {N}, set()
while left or running:
    while left and len(running) < {SLOTS}:
        running.add(os.posix_spawn("/bin/sh", ["/bin/sh", "-c", "true"], os.environ))
        left -= 1
    pid, _ = os.wait()
    running.discard(pid)
"""

TRIO_RUN_PROCESS = f"""
import trio
async def worker(n):
    for _ in range(n):
        await trio.run_process(["/bin/sh", "-c", "true"])
async def main():
    async with trio.open_nursery() as nursery:
        for _ in range({SLOTS}):
            nursery.start_soon(worker, {N // SLOTS})
trio.run(main)
"""

TRIO_SPAWN_ON_LOOP = f"""
import os, trio
async def worker(n):
    for _ in range(n):
        pid = os.posix_spawn("/bin/sh", ["/bin/sh", "-c", "true"], os.environ, setpgroup=0)
        fd = os.pidfd_open(pid)
        try:
            await trio.lowlevel.wait_readable(fd)
        finally:
            os.close(fd)
        os.waitpid(pid, 0)
async def main():
    async with trio.open_nursery() as nursery:
        for _ in range({SLOTS}):
            nursery.start_soon(worker, {N // SLOTS})
trio.run(main)
"""


def makefile(recipe: str) -> str:
    names = " ".join(f"t{i}" for i in range(N))
    rules = "".join(f"t{i}:\n\t@{recipe}\n" for i in range(N))
    return f"all: {names}\n.PHONY: all {names}\n{rules}"


def tasks_yaml() -> str:
    task = '  - id: t{0}\n    agent: shell\n    prompt: "true"\n    output: out/t{0}.txt\n'
    body = "".join(task.format(i) for i in range(N))
    return f"tasks:\n{body}"


def timed(argv: list[str], cwd: Path) -> tuple[float, float]:
    """Wall and CPU (user + sys of the process and everything it reaped) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    subprocess.run(argv, cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def busy_cores(seconds: float = 0.5) -> float:
    """Cores in use by anything, over `seconds` (from /proc/stat)."""
    def jiffies() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(fields) - fields[3] - fields[4], sum(fields)
    b0, t0 = jiffies()
    time.sleep(seconds)
    b1, t1 = jiffies()
    return (b1 - b0) / max(1, t1 - t0) * (os.cpu_count() or 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tmpdir", type=Path, default=None)
    ap.add_argument("--pd", default=shutil.which("parallel-dispatch") or "parallel-dispatch")
    ap.add_argument("--out", type=Path, default=HERE / "spawn_floor.json")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="pd-floor-", dir=args.tmpdir))
    try:
        (root / "true.mk").write_text(makefile("true"))
        (root / "sh.mk").write_text(makefile("/bin/sh -c true"))
        py = sys.executable
        variants: dict[str, list[str]] = {
            "make -j4 (true)": ["make", "-s", f"-j{SLOTS}", "-f", "true.mk"],
            "make -j4 (/bin/sh -c true)": ["make", "-s", f"-j{SLOTS}", "-f", "sh.mk"],
            "python-spawn": [py, "-c", PY_SPAWN],
            "trio-run_process": [py, "-c", TRIO_RUN_PROCESS],
            "trio-spawn-on-loop": [py, "-c", TRIO_SPAWN_ON_LOOP],
            "parallel-dispatch": [args.pd, "tasks.yaml", "--max-parallel", str(SLOTS)],
        }
        runs: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
        loads: list[float] = []
        for rep in range(args.reps):
            for name, argv in variants.items():
                if name == "parallel-dispatch":
                    project = root / f"pd-{rep}"
                    (project / ".aiwg").mkdir(parents=True)
                    (project / "tasks.yaml").write_text(tasks_yaml())
                    cwd = project
                else:
                    cwd = root
                loads.append(busy_cores(0.3))
                runs[name].append(timed(argv, cwd))
                print(f"rep {rep + 1} {name}: {runs[name][-1][0]:.3f} s", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    make = statistics.median(w for w, _ in runs["make -j4 (true)"])
    result = {
        "n": N, "slots": SLOTS, "reps": args.reps, "tmpdir": str(args.tmpdir or "default"),
        "busy_cores_before_runs": {"min": round(min(loads), 2), "max": round(max(loads), 2)},
        "variants": {
            name: {"wall_median_s": round(statistics.median(w for w, _ in r), 3),
                   "wall_min_s": round(min(w for w, _ in r), 3),
                   "cpu_median_s": round(statistics.median(c for _, c in r), 3),
                   "x_make": round(statistics.median(w for w, _ in r) / make, 2)}
            for name, r in runs.items()},
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, v in result["variants"].items():
        print(f"{name:28} {v['wall_median_s']:6.3f} s  {v['x_make']:4.2f}x make  "
              f"CPU {v['cpu_median_s']:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
