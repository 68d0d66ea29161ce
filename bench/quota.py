"""Benchmark i: running against a provider's rate limit (issue 10 §4).

    python bench/quota.py [--tasks 200] [--only fixed16,fixed4,governor] [--reps 1]
                          [--scale 1] [--pd PATH | --head] [--keep] [--out bench/quota.json]

Issue 10 asks for 200 tasks against a limit of 4 concurrent / 60 requests per minute,
comparing a fixed `max_parallel 16` with retries (today's behaviour), a fixed
`max_parallel 4`, and the quota governor starting from 16, with the target "≥ 90 % of
the limit's throughput with 0 failed tasks and ≤ 5 % of requests rejected".

The provider is tests/stubs/openai_chat.py on 127.0.0.1 with a `Limiter`
(tests/stubs/limits.py): 4 requests in flight, 60 requests per minute and 100,000 tokens
per minute (each request costs the 1,234 tokens its reply reports, so the token limit
would bind only at 81 requests a minute: it binds less), continuous replenishment with a
burst of up to the limit, refused requests counted against the minute as OpenAI counts
them, and each admitted request answered after 2 s ± 20 % (seeded).  At 2 s a request,
4 in flight could do 120 a minute, so the per-minute limit is what binds once its burst is
spent, and the concurrency limit before that.

Each configuration runs the `openai` runner (the dispatcher's own HTTP client, one
request per task) through the installed `parallel-dispatch run` CLI as a child process,
on a fresh stub (a full bucket) and a fresh private project, with `--on-failure retry`
(3 retries, `retry_backoff` 1 s: the defaults) so that only concurrency control differs:

* `fixed16`: `--max-parallel 16` (today's behaviour);
* `fixed4`: `--max-parallel 4`, the provider's concurrency;
* `governor`: `--max-parallel 16` with the governor on.  It runs only when `run --help`
  offers `--fixed-parallel` (the switch that turns the governor off), which the two
  fixed configurations then pass; without it the governor does not exist yet and its row
  is skipped.

Recorded per configuration (definitions; the stub's own log is the source, not the
dispatcher's report, except for failed tasks):

* makespan: wall time of `parallel-dispatch run`, start-up and reports included;
* goodput: successful requests per minute ÷ the per-minute limit (60).  The bucket's
  burst lets the first minute carry more than 60 (a perfect client finishes the 200 in
  142 s: goodput 1.41), and a run that fails tasks ends early, so goodput alone flatters
  failing runs; hence also
* of the limit: successful requests ÷ those a perfect client (no overhead, mean delay,
  unlimited work; simulated against the same limits) completes in the same makespan:
  how much of what the limit allowed in that time was used;
* 429s received: requests the stub refused, in all, by limit, and as a share of all
  requests;
* tasks failed: tasks not `succeeded` in dispatch-report.json;
* tokens on failed attempts: tokens the provider charged against the per-minute token
  limit for requests that produced no reply (a request refused for concurrency has
  already been charged; one cut off mid-reply is charged in full).  None of it is billed
  money here, as every refusal comes before any model work; for an agent that fails
  after several turns those turns would be.

Prints a Markdown table to stdout, progress to stderr, and writes every raw number, the
load during each run, the machine and the commit to bench/quota.json.  `--scale 0.1`
shrinks the minute to 6 s (and the delay, retry backoff and concurrency retry-after with
it) for a quick check; its results go to a temporary file unless `--out` says otherwise,
because the recorded figures use the real 60-s window.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.dont_write_bytecode = True  # no __pycache__ in bench/ or tests/ from a benchmark run

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the stubs and project setup, reused as is

from contract.common import new_project  # noqa: E402
from preset_support import AgentProject  # noqa: E402
from run import Load, code_state, find_pd, machine, probe, say  # noqa: E402
from stubs.limits import Limiter, Limits  # noqa: E402
from stubs.openai_chat import COMPLETION_TOKENS, PROMPT_TOKENS, OpenAIChatStub  # noqa: E402

RESULTS = HERE / "quota.json"
TASKS = 200
CONCURRENCY, RPM, TPM = 4, 60, 100_000
DELAY_S, JITTER, SEED = 2.0, 0.2, 1
RETRY_BACKOFF_S = 1.0
TOKENS_PER_REQUEST = PROMPT_TOKENS + COMPLETION_TOKENS
MODEL = "stub-model"
KEY = "sk-stub-quota-bench"
LIMIT_S = 3600.0
"""A configuration still running after an hour is killed and recorded as such."""


@dataclass(frozen=True)
class Config:
    name: str
    max_parallel: int
    governor: bool
    what: str


CONFIGS = (
    Config("fixed16", 16, False, "fixed `max_parallel 16`, retries (today)"),
    Config("fixed4", 4, False, "fixed `max_parallel 4`, retries"),
    Config("governor", 16, True, "governor from `max_parallel 16`, retries"),
)


def limits(scale: float) -> Limits:
    return Limits(concurrency=CONCURRENCY, rpm=RPM, tpm=TPM, delay_s=DELAY_S * scale,
                  jitter=JITTER, seed=SEED, window_s=60.0 * scale,
                  concurrency_retry_after_s=1.0 * scale)


def has_fixed_parallel(cmd: list[str], pythonpath: str | None) -> bool:
    """Whether this dispatcher has the governor's off switch (and so the governor)."""
    env = {**os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {})}
    proc = subprocess.run([*cmd, "run", "--help"], capture_output=True, text=True,
                          env=env, check=False)
    return "--fixed-parallel" in proc.stdout


def head_package(into: Path) -> str:
    """The package as committed at HEAD (`git archive`), for measuring today's code while
    the working tree holds changes; returns the PYTHONPATH to run it."""
    archive = subprocess.run(["git", "-C", str(HERE.parent), "archive", "HEAD",
                              "daemon/parallel_dispatch"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return str(into / "daemon")


def perfect_client(n: int, lim: Limits, tokens: int) -> list[float]:
    """When each of `n` requests of a perfect client against `lim` completes: it starts
    one whenever the concurrency and both buckets allow, with no overhead and the mean
    delay.  Event-stepped."""
    done: list[float] = []
    t = 0.0
    req = float(lim.rpm or 0)
    tok = float(lim.tpm or 0)
    r_rate = (lim.rpm or 0) / lim.window_s
    t_rate = (lim.tpm or 0) / lim.window_s
    ends: list[float] = []
    started = 0
    while started < n or ends:
        while (started < n and (lim.concurrency is None or len(ends) < lim.concurrency)
               and (lim.rpm is None or req >= 1 - 1e-9)
               and (lim.tpm is None or tok >= tokens - 1e-9)):
            started += 1
            req -= 1
            tok -= tokens
            heapq.heappush(ends, t + lim.delay_s)
        waits = [ends[0]] if ends else []
        if started < n and (lim.concurrency is None or len(ends) < lim.concurrency):
            # a bucket holds the next start back (the same tolerance as above)
            if lim.rpm is not None and req < 1 - 1e-9:
                waits.append(t + (1 - req) / r_rate)
            if lim.tpm is not None and tok < tokens - 1e-9:
                waits.append(t + (tokens - tok) / t_rate)
        nxt = min(waits)
        if lim.rpm is not None:
            req = min(float(lim.rpm), req + (nxt - t) * r_rate)
        if lim.tpm is not None:
            tok = min(float(lim.tpm), tok + (nxt - t) * t_rate)
        t = nxt
        while ends and ends[0] <= t + 1e-9:
            done.append(heapq.heappop(ends))
    return done


def served_by_perfect_client(seconds: float, lim: Limits, tokens: int) -> int:
    """How many requests a perfect client with unlimited work completes in `seconds`:
    the limit's throughput over that span, burst included."""
    per_s = (lim.rpm or 0) / lim.window_s + (lim.concurrency or 1) / max(lim.delay_s, 1e-3)
    n = int(seconds * per_s) + (lim.rpm or 0) + 10  # more than it could finish
    return sum(1 for t in perfect_client(n, lim, tokens) if t <= seconds)


@dataclass
class Bench:
    cmd: list[str]
    """The dispatcher's command line: the installed CLI, or this interpreter running the
    package at `pythonpath`."""
    pythonpath: str | None
    keep: bool
    scale: float
    n_tasks: int
    fixed_flag: bool

    @contextmanager
    def project(self, tag: str) -> Iterator[tuple[AgentProject, OpenAIChatStub, Limiter]]:
        base = Path(tempfile.mkdtemp(prefix=f"pd-bench-i-{tag}-"))
        try:
            with OpenAIChatStub.running() as stub:
                stub.limiter = Limiter(limits(self.scale))
                ap = new_project(base)
                ap.env["STUB_API_KEY"] = KEY
                if self.pythonpath:
                    ap.env["PYTHONPATH"] = self.pythonpath
                ap.define("assistant", "You are a terse assistant.")
                ap.config(f'[defaults]\nrunner = "openai"\nretry_backoff = '
                          f'{RETRY_BACKOFF_S * self.scale}\n\n[runners.openai]\n'
                          f'base_url = "{stub.base_url}"\nmodel = "{MODEL}"\n'
                          'api_key_env = "STUB_API_KEY"\n')
                rows = [f"  - {{id: t{i:03d}, agent: assistant, prompt: 'Task {i}: say hi', "
                        f"output: t{i:03d}.md}}" for i in range(self.n_tasks)]
                ap.tasks("tasks:\n" + "\n".join(rows) + "\n")
                yield ap, stub, stub.limiter
        finally:
            if self.keep:
                say(f"  kept {base}")
            else:
                shutil.rmtree(base, ignore_errors=True)

    def argv(self, config: Config) -> list[str]:
        argv = [*self.cmd, "run", "t.yaml", "--max-parallel", str(config.max_parallel),
                "--on-failure", "retry"]
        if self.fixed_flag and not config.governor:
            argv.append("--fixed-parallel")
        return argv

    def run(self, config: Config, rep: int) -> dict[str, Any]:
        with self.project(f"{config.name}{rep}") as (ap, _stub, limiter):
            argv = self.argv(config)
            with probe() as load:
                t0 = time.perf_counter()
                try:
                    proc = subprocess.run(argv, cwd=ap.root, env=ap.env, capture_output=True,
                                          text=True, timeout=LIMIT_S, check=False)
                    code: int | None = proc.returncode
                    stderr = proc.stderr
                except subprocess.TimeoutExpired:
                    code, stderr = None, ""
                wall = time.perf_counter() - t0
            stats = limiter.stats()
            log = list(limiter.log)
            report_path = ap.root / ".aiwg/working/dispatch-report.json"
            tasks = (json.loads(report_path.read_text())["tasks"]
                     if report_path.exists() else [])
        statuses: dict[str, int] = {}
        for t in tasks:
            statuses[t["status"]] = statuses.get(t["status"], 0) + 1
        failed = [t for t in tasks if t["status"] != "succeeded"]
        lim = limits(self.scale)
        wasted = sum(e.charged for e in log if not e.served)
        return {
            "argv": argv[1:], "exit_code": code, "makespan_s": round(wall, 2),
            "stub": stats,
            "stub_span_s": round(max((e.t_end or e.t) for e in log) - log[0].t, 2)
            if log else None,
            "goodput": round(stats["served"] / (wall / lim.window_s) / RPM, 3),
            "perfect_client_served": served_by_perfect_client(wall, lim, TOKENS_PER_REQUEST),
            "rejected_share": round(stats["rejected"] / stats["requests"], 3)
            if stats["requests"] else None,
            "tasks": len(tasks), "statuses": statuses, "tasks_failed": len(failed),
            "failed_errors": sorted({(t.get("error") or "")[:160] for t in failed})[:5],
            "attempts": sum(int(t.get("attempts") or 0) for t in tasks),
            "tokens_on_failed_attempts": wasted,
            "billed_tokens_of_failed_tasks": sum(
                int(t.get("input_tokens") or 0) + int(t.get("output_tokens") or 0)
                for t in failed),
            "stderr_tail": stderr[-1500:], "load": as_dict(load),
        }


def as_dict(load: Load) -> dict[str, float]:
    return {"loadavg_1m": load.loadavg_1m, "other_cores": load.other_cores}


def markdown(res: dict[str, Any]) -> str:
    lim = res["limits"]
    window = lim["window_s"]
    lines = [f"{res['tasks']} one-request tasks of the `openai` runner against "
             f"{lim['concurrency']} concurrent / {lim['rpm']} requests / {lim['tpm']:,} tokens "
             f"per {window:g} s, {lim['delay_s']:g} s ± {lim['jitter']:.0%} a request; "
             f"perfect client: {res['ideal_makespan_s']:.1f} s "
             f"(goodput {res['ideal_goodput']:.2f}).", "",
             "| configuration | makespan | goodput | of the limit | succeeded requests | 429s "
             "received (share; by limit) | tasks failed | tokens on failed attempts | "
             "most in flight |",
             "|---|---|---|---|---|---|---|---|---|"]
    for config in CONFIGS:
        runs = res["runs"].get(config.name)
        if runs is None:
            continue
        if not runs:
            lines.append(f"| {config.what} | {res['skipped'].get(config.name, 'not run')} "
                         "| | | | | | | |")
            continue
        for r in runs:
            s = r["stub"]
            by = ", ".join(f"{k} {v}" for k, v in sorted(s["rejected_by_reason"].items()))
            of_limit = s["served"] / max(1, r["perfect_client_served"])
            lines.append(
                f"| {config.what} | {r['makespan_s']:.1f} s | {r['goodput']:.2f} | "
                f"{of_limit:.0%} | {s['served']} | {s['rejected']} "
                f"({r['rejected_share']:.0%}; {by or '–'}) | {r['tasks_failed']} | "
                f"{r['tokens_on_failed_attempts']:,} | {s['max_in_flight']} |")
    loads = [r["load"] for runs in res["runs"].values() for r in runs]
    if loads:
        avg = [x["loadavg_1m"] for x in loads]
        others = [x["other_cores"] for x in loads]
        lines += ["", f"Load: 1-minute load average {min(avg):.2f}–{max(avg):.2f} at the "
                  f"starts; other processes used {sum(others) / len(others):.2f} cores on "
                  f"average (max {max(others):.2f}) of {os.cpu_count()}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [c.name for c in CONFIGS]
    ap.add_argument("--tasks", type=int, default=TASKS, help=f"tasks per run (default {TASKS})")
    ap.add_argument("--only", default=",".join(names),
                    help=f"comma-separated subset of {','.join(names)}")
    ap.add_argument("--reps", type=int, default=1, help="runs per configuration (default 1)")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="shrink the 60-s window (and delay, backoff) by this factor for a "
                         "quick check, e.g. 0.1; recorded figures use 1")
    ap.add_argument("--pd", type=Path, default=None, help="parallel-dispatch executable")
    ap.add_argument("--head", action="store_true",
                    help="measure the package as committed at HEAD (git archive), not the "
                         "working tree")
    ap.add_argument("--keep", action="store_true", help="keep the temporary projects")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"where to write the JSON (default {RESULTS.relative_to(HERE.parent)}"
                         ", or a temporary file with --scale)")
    args = ap.parse_args(argv)
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    if not set(only) <= set(names):
        ap.error(f"unknown configuration(s): {', '.join(sorted(set(only) - set(names)))}; "
                 f"choose from {', '.join(names)}")
    if args.tasks < 1 or args.reps < 1 or not 0 < args.scale <= 1:
        ap.error("--tasks and --reps must be at least 1, --scale in (0, 1]")
    out = args.out or (RESULTS if args.scale == 1 else
                       Path(tempfile.gettempdir()) / f"quota-scale{args.scale:g}.json")
    if args.head and args.pd:
        ap.error("--head and --pd exclude each other")
    head_dir = Path(tempfile.mkdtemp(prefix="pd-bench-i-head-")) if args.head else None
    pythonpath = head_package(head_dir) if head_dir else None
    cmd = [sys.executable, "-m", "parallel_dispatch"] if args.head else \
        [str(args.pd or find_pd())]
    fixed_flag = has_fixed_parallel(cmd, pythonpath)
    bench = Bench(cmd, pythonpath, args.keep, args.scale, args.tasks, fixed_flag)
    code = code_state()
    if args.head:  # the working tree's changes were not measured
        code = {**code, "uncommitted": [], "measured": "git archive HEAD"}
    lim = limits(args.scale)
    ideal = max(perfect_client(args.tasks, lim, TOKENS_PER_REQUEST))
    chosen = [c for c in CONFIGS if c.name in only]
    results: dict[str, Any] = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "tasks": args.tasks,
        "reps": args.reps, "scale": args.scale, "pd": " ".join(cmd), "code": code,
        "machine": machine(), "limits": asdict(lim),
        "tokens_per_request": TOKENS_PER_REQUEST, "retry_backoff_s": RETRY_BACKOFF_S
        * args.scale, "has_fixed_parallel": fixed_flag,
        "ideal_makespan_s": round(ideal, 2),
        "ideal_goodput": round(args.tasks / (ideal / lim.window_s) / RPM, 3),
        "loadavg_start": os.getloadavg(), "runs": {c.name: [] for c in chosen},
        "skipped": {}}
    say(f"machine: {results['machine']}")
    say(f"perfect client: {ideal:.1f} s; --fixed-parallel "
        f"{'present' if fixed_flag else 'absent: no governor to measure'}")
    t_start = time.perf_counter()
    for rep in range(args.reps):
        for config in chosen:
            if config.governor and not fixed_flag:
                results["skipped"][config.name] = ("not run: this dispatcher has no "
                                                   "`--fixed-parallel`, so no governor")
                continue
            say(f"rep {rep + 1}/{args.reps} {config.name}: {' '.join(bench.argv(config)[1:])}")
            run = bench.run(config, rep)
            say(f"  {run['makespan_s']:.1f} s, goodput {run['goodput']:.2f}, "
                f"429s {run['stub']['rejected']}, failed {run['tasks_failed']}")
            results["runs"][config.name].append(run)
            out.write_text(json.dumps(results, indent=2) + "\n")  # partial results survive
    if head_dir is not None:
        shutil.rmtree(head_dir, ignore_errors=True)
    results["loadavg_end"] = os.getloadavg()
    results["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    print(f"\n{results['elapsed_s']} s in all; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
