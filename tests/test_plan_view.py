"""`plan` prints without a scheduler exactly what a dry run through the scheduler prints.

`plan_text` computes the start order with `Plan.instant_order()`; `run --dry-run` runs
the scheduler with `DryRunRunner`.  Both are compared on random DAGs (dependencies on
earlier and on later tasks, so both of graph.py's topological paths), with recorded
durations in the output dir's state (they set the priorities), retries and timeouts.
"""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path

import pytest
import trio

from parallel_dispatch.api import run_spec
from parallel_dispatch.cli.plan_view import plan_text, render_plan
from parallel_dispatch.graph import Graph, find_cycles, topological_order
from parallel_dispatch.loader import load_spec
from parallel_dispatch.runners import RunnerSet
from parallel_dispatch.state import STATE_FILE


def _task_file(rng: random.Random, n: int, forward: bool) -> str:
    """`n` shell tasks with 0-3 dependencies; `forward`: also on later tasks (no cycles:
    the edges follow a shuffled order)."""
    rank = list(range(n))
    if forward:
        rng.shuffle(rank)
    lines = ["name: eq", "settings:", "  max_parallel: 3", "tasks:"]
    for i in range(n):
        before = [j for j in range(n) if rank[j] < rank[i]]
        deps = rng.sample(before, min(len(before), rng.randint(0, 3)))
        lines += [f"  - id: t{i}", "    agent: shell", f"    prompt: echo {i}",
                  f"    output: out/t{i}.txt"]
        if deps:
            lines.append(f"    dependencies: [{', '.join(f't{j}' for j in deps)}]")
        if rng.random() < 0.1:
            lines.append(f"    retries: {rng.randint(1, 3)}")
        if rng.random() < 0.1:
            lines.append(f"    timeout: {rng.randint(1, 9) * 1000}")
    return "\n".join(lines) + "\n"


def _dry_run_text(path: Path, run_id: str) -> tuple[str, str]:
    spec = load_spec(path)
    real = RunnerSet()
    result = trio.run(partial(run_spec, spec, runner=real, dry_run=True, run_id=run_id))
    return render_plan(spec, result, real), plan_text(spec, RunnerSet(), run_id)


@pytest.mark.parametrize("seed", range(12))
def test_plan_prints_what_the_dry_run_prints(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    (tmp_path / ".aiwg").mkdir()
    n = rng.randint(1, 60)
    task = tmp_path / "tasks.yaml"
    task.write_text(_task_file(rng, n, forward=seed % 2 == 1))
    if seed % 3:  # recorded durations (for some tasks) change the priorities
        state = tmp_path / ".aiwg" / "working" / STATE_FILE
        state.parent.mkdir(parents=True)
        state.write_text("".join(f'[tasks.t{i}]\nduration_s = {rng.choice([0.5, 2, 30])}\n'
                                 for i in rng.sample(range(n), n // 2)))
    dry, planned = _dry_run_text(task, "20260101T000000Z-abcdef")
    assert planned == dry
    assert "Start order: t" in planned
    assert not (tmp_path / ".aiwg" / "working" / "out").exists()


def test_recorded_durations_reorder_the_plan(tmp_path: Path) -> None:
    """The comparison above can fail: the state's durations do move tasks."""
    (tmp_path / ".aiwg").mkdir()
    task = tmp_path / "tasks.yaml"
    task.write_text("tasks:\n" + "".join(
        f"  - {{id: {t}, agent: shell, prompt: echo, output: {t}.txt}}\n" for t in "abc"))
    before = plan_text(load_spec(task), RunnerSet(), "r")
    assert "Start order: a, b, c" in before
    state = tmp_path / ".aiwg" / "working" / STATE_FILE
    state.parent.mkdir(parents=True)
    state.write_text("[tasks.a]\nduration_s = 1.0\n[tasks.c]\nduration_s = 60.0\n")
    dry, after = _dry_run_text(task, "r")
    assert after == dry
    assert "Start order: c, b, a" in after  # b: unknown, so the mean of a's and c's


def _kahn(deps: list[list[int]]) -> list[int]:
    """Reference: Kahn's algorithm, smallest ready index first, without shortcuts."""
    import heapq

    children: list[list[int]] = [[] for _ in deps]
    for i, ds in enumerate(deps):
        for d in ds:
            children[d].append(i)
    missing = [len(d) for d in deps]
    ready = [i for i, m in enumerate(missing) if m == 0]
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for c in children[i]:
            missing[c] -= 1
            if missing[c] == 0:
                heapq.heappush(ready, c)
    return order


@pytest.mark.parametrize("seed", range(20))
def test_topological_order_is_kahns_with_and_without_the_file_order_shortcut(
        seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 40)
    rank = list(range(n))
    if seed % 2:
        rng.shuffle(rank)  # some dependencies on later tasks: the shortcut does not apply
    deps = [rng.sample([j for j in range(n) if rank[j] < rank[i]],
                       min(rank[i], rng.randint(0, 3))) for i in range(n)]
    graph = Graph.build([f"t{i}" for i in range(n)], deps)
    assert list(graph.order) == _kahn(deps)
    assert find_cycles(deps) == []
    if seed % 2 == 0:
        assert list(graph.order) == list(range(n))


def test_a_cycle_through_a_later_task_is_still_found() -> None:
    deps: list[list[int]] = [[], [2], [1]]
    assert find_cycles(deps) == [[1, 2, 1]]
    assert len(topological_order(deps, [[], [2], [1]])) == 1
