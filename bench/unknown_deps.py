"""Issue 9 §7: validation time with many unknown dependencies, and the daemon's
watchdog while it validates such a file.

    python bench/unknown_deps.py [--counts 1000,4000] [--reps 3] [--daemon]

Two shapes per count N (N tasks, one unknown dependency each): `typo` (ids
`task-00042`, dependency `tsak-00042`: every suggestion lookup has close
candidates, the worst case for difflib) and `unrelated` (dependency
`missing-42`).  `validate` runs as a subprocess; the time is its wall clock.
With `--daemon`, a `parallel-dispatch watch` with `WATCHDOG_USEC=1000000`
(a ping every 0.5 s) is given the typo file of the largest N; the result is
the longest gap between two `WATCHDOG=1` messages from the drop until its
error report appears.  Run it against another checkout with
`PYTHONPATH=/path/to/other/daemon`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def task_file(n: int, shape: str) -> str:
    lines = ["tasks:"]
    for i in range(n):
        dep = f"tsak-{i:05d}" if shape == "typo" else f"missing-{i}"
        lines.append(f"  - {{id: task-{i:05d}, agent: shell, prompt: x, output: o{i}.md, "
                     f"dependencies: [{dep}]}}")
    return "\n".join(lines) + "\n"


def time_validate(pd: list[str], path: Path, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.monotonic()
        proc = subprocess.run([*pd, "validate", str(path)], capture_output=True, text=True)
        out.append(time.monotonic() - t0)
        assert proc.returncode == 2, proc.stderr[-500:]
    return out


def watchdog_gap(pd: list[str], root: Path, text: str) -> dict[str, float]:
    (root / ".aiwg" / "tasks").mkdir(parents=True)
    addr = str(root / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(addr)
    sock.settimeout(0.1)
    env = dict(os.environ, NOTIFY_SOCKET=addr, WATCHDOG_USEC="1000000")
    proc = subprocess.Popen([*pd, "watch", str(root)], env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if b"READY=1" in sock.recv(4096):
                    break
            except TimeoutError:
                pass
        report = root / ".aiwg/working/big/dispatch-report.json"
        tmp = root / ".aiwg/tasks/.big.yaml.tmp"
        tmp.write_text(text)
        t0 = time.monotonic()
        os.replace(tmp, root / ".aiwg/tasks/big.yaml")
        pings = [t0]
        while not report.exists():
            try:
                if b"WATCHDOG=1" in sock.recv(4096):
                    pings.append(time.monotonic())
            except TimeoutError:
                pass
            if time.monotonic() - t0 > 900:
                raise TimeoutError("no error report after 900 s")
        done = time.monotonic()
        pings.append(done)
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        return {"drop_to_report_s": done - t0, "max_watchdog_gap_s": max(gaps)}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        sock.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", default="1000,4000")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--daemon", action="store_true")
    args = ap.parse_args()
    pd = [sys.executable, "-m", "parallel_dispatch"]
    counts = [int(c) for c in args.counts.split(",")]
    results: dict[str, object] = {}
    tmp = Path(tempfile.mkdtemp(prefix="pd-unknown-deps-"))
    try:
        (tmp / ".aiwg").mkdir()
        for n in counts:
            for shape in ("typo", "unrelated"):
                path = tmp / f"{shape}-{n}.yaml"
                path.write_text(task_file(n, shape))
                times = time_validate(pd, path, args.reps)
                results[f"validate {shape} {n}"] = {"median_s": statistics.median(times),
                                                    "runs_s": times}
                print(f"validate, {n} unknown deps ({shape}): median "
                      f"{statistics.median(times):.2f} s of {times}", file=sys.stderr)
        if args.daemon:
            n = max(counts)
            gap = watchdog_gap(pd, tmp / "daemon", task_file(n, "typo"))
            results[f"daemon {n}"] = gap
            print(f"daemon, {n} unknown deps: {gap}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
