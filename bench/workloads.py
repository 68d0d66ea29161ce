"""Seeded workloads for the benchmarks, and the arithmetic that judges them.

Everything here is pure Python with no dependency on parallel_dispatch, so the
lower bounds and simulated schedules are computed independently of the code
under test.  Task files and Makefiles are written as plain text (not through a
YAML library) so that generating 50,000 tasks takes well under a second.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Dag:
    """Tasks 0..n-1 in topological (file) order; `deps[i]` only names earlier tasks."""

    durations: tuple[float, ...]
    deps: tuple[tuple[int, ...], ...]
    children: tuple[tuple[int, ...], ...] = field(repr=False)

    @classmethod
    def from_edges(cls, durations: Sequence[float], deps: Sequence[Sequence[int]]) -> Dag:
        children: list[list[int]] = [[] for _ in durations]
        for i, ds in enumerate(deps):
            for d in ds:
                children[d].append(i)
        return cls(tuple(durations), tuple(tuple(d) for d in deps),
                   tuple(tuple(c) for c in children))

    def __len__(self) -> int:
        return len(self.durations)

    @staticmethod
    def task_id(i: int) -> str:
        return f"t{i:05d}"


def random_dag(n: int, seed: int, *, window: int | None, max_deps: int = 3,
               dmin: float = 0.05, dmax: float = 0.6) -> Dag:
    """Each task depends on 0..max_deps tasks among the `window` before it.

    A window (rather than any earlier task) gives long dependency chains, so the
    critical path is comparable to total work / slots: the regime where the
    order in which ready tasks start actually matters.  Durations are rounded to
    milliseconds so `sleep` gets exactly what the lower bound assumes.
    """
    rng = random.Random(seed)
    durations = [round(rng.uniform(dmin, dmax), 3) for _ in range(n)]
    deps: list[list[int]] = []
    for i in range(n):
        lo = 0 if window is None else max(0, i - window)
        k = min(rng.randint(0, max_deps), i - lo)
        deps.append(sorted(rng.sample(range(lo, i), k)) if k else [])
    return Dag.from_edges(durations, deps)


def levels(dag: Dag) -> list[int]:
    """0-based wave of each task (longest chain of dependencies above it)."""
    level = [0] * len(dag)
    for i, ds in enumerate(dag.deps):
        if ds:
            level[i] = 1 + max(level[d] for d in ds)
    return level


def waves(dag: Dag) -> list[list[int]]:
    level = levels(dag)
    out: list[list[int]] = [[] for _ in range(max(level, default=-1) + 1)]
    for i, lv in enumerate(level):
        out[lv].append(i)
    return out


def remaining_path(dag: Dag, weight: Sequence[float]) -> list[float]:
    """Weight of each task plus its heaviest chain of dependents."""
    rest = [0.0] * len(dag)
    for i in reversed(range(len(dag))):
        rest[i] = weight[i] + max((rest[c] for c in dag.children[i]), default=0.0)
    return rest


def critical_path_s(dag: Dag) -> float:
    finish = [0.0] * len(dag)
    for i, ds in enumerate(dag.deps):
        finish[i] = dag.durations[i] + max((finish[d] for d in ds), default=0.0)
    return max(finish, default=0.0)


def lower_bound_s(dag: Dag, slots: int) -> tuple[float, float, float]:
    """(bound, critical path, total work / slots): no schedule can beat the bound."""
    cp = critical_path_s(dag)
    per_slot = sum(dag.durations) / slots
    return max(cp, per_slot), cp, per_slot


def simulate_list_schedule(dag: Dag, slots: int, weight: Sequence[float],
                           overhead_s: float = 0.0) -> float:
    """Makespan of greedy list scheduling, longest-remaining-path first, ties by index.

    This mirrors the dispatcher's policy (no barrier, `Plan` priority) with zero
    scheduling cost, so measured − simulated isolates the implementation's
    overhead from the policy's own distance to the lower bound.
    """
    prio = remaining_path(dag, weight)
    missing = [len(d) for d in dag.deps]
    ready = [(-prio[i], i) for i in range(len(dag)) if missing[i] == 0]
    heapq.heapify(ready)
    running: list[tuple[float, int]] = []
    now, free = 0.0, slots
    while ready or running:
        while free and ready:
            _, i = heapq.heappop(ready)
            heapq.heappush(running, (now + dag.durations[i] + overhead_s, i))
            free -= 1
        now, i = heapq.heappop(running)
        free += 1
        for c in dag.children[i]:
            missing[c] -= 1
            if missing[c] == 0:
                heapq.heappush(ready, (-prio[c], c))
    return now


def simulate_waves(dag: Dag, slots: int, overhead_s: float = 0.0) -> float:
    """Makespan with a barrier after every wave (file order within a wave)."""
    total = 0.0
    for wave in waves(dag):
        finish = [0.0] * min(slots, len(wave))
        for i in wave:
            t = heapq.heappop(finish) if len(finish) == slots else 0.0
            heapq.heappush(finish, t + dag.durations[i] + overhead_s)
        total += max(finish)
    return total


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def task_file(dag: Dag, prompt: Callable[[int], str], *, name: str,
              max_parallel: int) -> str:
    """A task file in the reference format, agent `shell`, one output per task."""
    lines = [f"name: {name}", "description: generated by bench/run.py", "tasks:"]
    for i in range(len(dag)):
        tid = Dag.task_id(i)
        lines += [f"  - id: {tid}", "    agent: shell", f"    prompt: {_quote(prompt(i))}",
                  f"    output: out/{tid}.txt"]
        if dag.deps[i]:
            lines.append("    dependencies: [" + ", ".join(Dag.task_id(d) for d in dag.deps[i])
                         + "]")
    lines += ["settings:", f"  max_parallel: {max_parallel}"]
    return "\n".join(lines) + "\n"


def makefile(dag: Dag, recipe: Callable[[int], str], *, stamps: bool) -> str:
    """The same DAG for GNU make: prerequisites are the dependencies.

    With `stamps`, each target is a file the recipe touches (so make's view of
    "done" matches a task's output); otherwise targets are phony.
    """
    def target(i: int) -> str:
        return f"s/{Dag.task_id(i)}" if stamps else Dag.task_id(i)

    names = [target(i) for i in range(len(dag))]
    lines = ["all: " + " ".join(names)]
    lines.append(".PHONY: all" + ("" if stamps else " " + " ".join(names)))
    for i in range(len(dag)):
        lines.append(f"{names[i]}: " + " ".join(target(d) for d in dag.deps[i]))
        lines.append("\t@" + recipe(i))
    return "\n".join(lines) + "\n"
