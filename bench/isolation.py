"""Cost of `isolation: worktree` per task: worktree create + capture + remove.

Measures `worktree.create` (at the base, and with one dependency patch applied and
committed), a one-line edit's `worktree.capture`, and `worktree.remove`, on this
repository and on a generated repository of 10,000 files.  Each is the median of
`--repeat` runs, wall clock (time.perf_counter); the machine is whatever runs it.

    python bench/isolation.py [--repeat 7] [--json bench/isolation.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from parallel_dispatch import worktree

REPO = Path(__file__).resolve().parent.parent


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=b", "-c", "user.email=b@b",
                    "-c", "commit.gpgsign=false", *args], cwd=root, check=True,
                   capture_output=True)


def make_repo(root: Path, files: int) -> None:
    _git(root, "init", "-q")
    for i in range(files):  # 100 folders of 100 files, ~1 KiB each
        path = root / f"d{i // 100:03d}" / f"f{i:05d}.py"
        path.parent.mkdir(exist_ok=True)
        path.write_text("".join(f"line {j} of file {i}\n" for j in range(50)))
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "base")


async def one(root: Path, run: str, dep: Path | None) -> dict[str, float]:
    base = await worktree.base_commit(root)
    t0 = time.perf_counter()
    tree = await worktree.create(root, run, "t", base, [("dep", dep)] if dep else [])
    t1 = time.perf_counter()
    target = sorted(p for p in tree.workdir.rglob("*.py") if ".git" not in p.parts)[0]
    target.write_text(target.read_text() + "# edited\n")
    changes = await worktree.capture(tree)
    t2 = time.perf_counter()
    await worktree.remove(root, tree.path)
    t3 = time.perf_counter()
    assert changes is not None
    if dep is None:  # the next measurement's dependency patch
        (root.parent / "dep.patch").write_bytes(changes.patch)
    return {"create": t1 - t0, "capture": t2 - t1, "remove": t3 - t2, "total": t3 - t0}


async def measure(root: Path, repeat: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for label, with_dep in (("no dependency", False), ("one dependency patch", True)):
        runs = []
        for k in range(repeat):
            dep = root.parent / "dep.patch" if with_dep else None
            runs.append(await one(root, f"bench-{label[:2]}-{k}", dep))
            await worktree.finish_run(root, f"bench-{label[:2]}-{k}")
        out[label] = {key: round(statistics.median(r[key] for r in runs), 4)
                      for key in runs[0]}
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # This repository: a clone of HEAD, so the user's tree and its worktrees stay out.
        clone = Path(tmp) / "this" / "repo"
        clone.parent.mkdir()
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        files = len(subprocess.run(["git", "ls-files"], cwd=clone, check=True,
                                   capture_output=True, text=True).stdout.splitlines())
        results[f"this repository ({files} files)"] = trio.run(measure, clone, args.repeat)
        big = Path(tmp) / "big" / "repo"
        big.mkdir(parents=True)
        make_repo(big, 10_000)
        results["10,000 files"] = trio.run(measure, big, args.repeat)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
