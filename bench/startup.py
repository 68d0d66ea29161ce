"""Start-up time of the CLI against a bare interpreter, measured in the same run.

    python bench/startup.py                  # 30 rounds, prints a Markdown table
    python bench/startup.py -n 50 --json /tmp/startup.json
    python bench/startup.py --pythonpath /tmp/old/daemon   # another tree of the package
    python bench/startup.py --compare /tmp/old/daemon      # ours and that tree, interleaved

Each round runs every command once, in turn, so a change in the machine's load
reaches all of them alike; the table gives the median and minimum wall time and the
median CPU time (user + system of the child, from `wait4`) of each command over the
rounds.  On a busy machine the minimum and the CPU time are the steadier numbers.
`--compare DIR` adds the package's commands once more with `PYTHONPATH=DIR` (an older
tree, e.g. from `git archive`), in the same rounds, so before and after share the load.

The interpreter baselines are `python -c pass` (the same interpreter, `site` and the
venv's `.pth` files: what the console script pays before it imports anything of ours)
and `python -S -c pass` (no `site`: the floor).  `import pydantic` and `import trio`
are printed as references: what `validate` and `run` cannot avoid.

Bytecode: by default every command runs with `PYTHONDONTWRITEBYTECODE` unset and
`PYTHONPYCACHEPREFIX` pointing at a fresh temporary folder, warmed by one untimed
round, so every module loads from a `.pyc` as it does after `pip install` (which
compiles them), whatever the environment says.  `--as-is` keeps the caller's
environment instead (here `PYTHONDONTWRITEBYTECODE=1` is set, and the package, an
editable install, is then compiled from source at every start).

Not a test: timings belong here, never in `tests/`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TASK_FILE = ROOT / "examples" / "build-pipeline.yaml"


@dataclass
class Command:
    label: str
    argv: list[str]
    reference: bool = False
    """Not ours: a baseline or an import the command cannot avoid."""
    pythonpath: str | None = None
    """Run against this tree of the package (`--compare`) instead of the installed one."""
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def commands(python: str, script: str, task_file: Path) -> list[Command]:
    return [
        Command("`python -c pass`", [python, "-c", "pass"], reference=True),
        Command("`python -S -c pass`", [python, "-S", "-c", "pass"], reference=True),
        Command("`python -c 'import pydantic'`", [python, "-c", "import pydantic"],
                reference=True),
        Command("`python -c 'import trio'`", [python, "-c", "import trio"], reference=True),
        Command("`parallel-dispatch --version`", [script, "--version"]),
        Command("`python -m parallel_dispatch --version`",
                [python, "-m", "parallel_dispatch", "--version"]),
        Command(f"`parallel-dispatch validate {task_file.name}`",
                [script, "validate", str(task_file)]),
        Command(f"`python -m parallel_dispatch validate {task_file.name}`",
                [python, "-m", "parallel_dispatch", "validate", str(task_file)]),
    ]


def run_once(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """Wall and CPU seconds of one run; raises if the command fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stderr.close()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}:\n{err.decode()}")
    return wall, usage.ru_utime + usage.ru_stime


def environment(as_is: bool, pythonpath: str | None, cache: str) -> dict[str, str]:
    env = dict(os.environ)
    if not as_is:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = cache
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


def table(cmds: list[Command]) -> str:
    base = statistics.median(cmds[0].wall)
    lines = ["| command | median wall | min wall | median CPU | median − `python -c pass` |",
             "|---|---|---|---|---|"]
    for c in cmds:
        med = statistics.median(c.wall)
        extra = "—" if c is cmds[0] else f"{(med - base) * 1000:+.0f} ms"
        lines.append(f"| {c.label} | {med * 1000:.0f} ms | {min(c.wall) * 1000:.0f} ms | "
                     f"{statistics.median(c.cpu) * 1000:.0f} ms | {extra} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--rounds", type=int, default=30, help="timed rounds (default 30)")
    ap.add_argument("--python", default=sys.executable, help="interpreter (default: this one)")
    ap.add_argument("--pd", help="the console script (default: next to --python)")
    ap.add_argument("--task-file", type=Path, default=DEFAULT_TASK_FILE,
                    help=f"file to validate (default {DEFAULT_TASK_FILE.relative_to(ROOT)})")
    ap.add_argument("--pythonpath", help="PYTHONPATH for every command (another tree)")
    ap.add_argument("--compare", metavar="DIR",
                    help="also run the package's commands with PYTHONPATH=DIR, interleaved")
    ap.add_argument("--as-is", action="store_true",
                    help="keep the environment's bytecode settings (see the module docstring)")
    ap.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = ap.parse_args()

    script = args.pd or str(Path(args.python).parent / "parallel-dispatch")
    with tempfile.TemporaryDirectory(prefix="pd-startup-") as tmp:
        cwd = Path(tmp)
        # A copy in a folder of its own: no project config around it, whatever the tree has.
        task_file = cwd / args.task_file.name
        task_file.write_bytes(args.task_file.read_bytes())
        cmds = commands(args.python, script, task_file)
        if args.compare:
            cmds += [Command(f"{c.label} ({Path(args.compare).name} tree)", c.argv,
                             pythonpath=args.compare)
                     for c in cmds if not c.reference]
        env = environment(args.as_is, args.pythonpath, str(cwd / "pycache"))
        envs = {id(c): environment(args.as_is, c.pythonpath, str(cwd / "pycache"))
                if c.pythonpath else env for c in cmds}
        load_before = os.getloadavg()
        for c in cmds:  # warm-up: fills the bytecode cache and the page cache
            run_once(c.argv, envs[id(c)], cwd)
        for i in range(args.rounds):
            for c in cmds:
                wall, cpu = run_once(c.argv, envs[id(c)], cwd)
                c.wall.append(wall)
                c.cpu.append(cpu)
            print(f"round {i + 1}/{args.rounds}", file=sys.stderr, end="\r")
        load_after = os.getloadavg()
    print(file=sys.stderr)
    print(f"{args.rounds} rounds; Python {platform.python_version()}; {os.cpu_count()} CPUs; "
          f"load average {load_before[0]:.2f} → {load_after[0]:.2f}; "
          f"bytecode: {'as the environment has it' if args.as_is else 'cached (.pyc)'}"
          + (f"; PYTHONPATH={args.pythonpath}" if args.pythonpath else "")
          + (f"; compared with {args.compare}" if args.compare else ""))
    print()
    print(table(cmds))
    if args.json:
        args.json.write_text(json.dumps({
            "rounds": args.rounds, "python": platform.python_version(),
            "load": [load_before, load_after], "as_is": args.as_is,
            "pythonpath": args.pythonpath, "compare": args.compare,
            "commands": [asdict(c) for c in cmds],
        }, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
