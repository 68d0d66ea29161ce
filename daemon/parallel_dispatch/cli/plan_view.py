"""Human-readable execution plan, for `plan` and `--dry-run`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..fanout import COLLAPSE_AFTER
from ..fmt import fmt_duration, plural
from ..plan import Plan, expected_durations
from ..result import RunResult
from ..runners.base import Job, Runner
from ..spec import DispatchSpec
from ..state import State
from ..writesets import clashes


def render_plan(spec: DispatchSpec, result: RunResult, runner: Runner) -> str:
    """The plan of a dry run through the scheduler (`run --dry-run`)."""
    return _render(spec, result.plan_lines, result.critical_path, runner, result.run_id)


def plan_text(spec: DispatchSpec, runner: Runner, run_id: str) -> str:
    """What `run --dry-run` prints, without running the scheduler: for `plan`.

    A dry run's every task succeeds the moment it starts, so its start order is
    `Plan.instant_order()` over the same weights (the durations recorded in the
    output dir's state), and nothing else about the run shows in the plan.
    """
    durations = State.load(spec.settings.output_dir).durations()
    graph = spec.graph
    weights = expected_durations(graph.ids, durations)
    rest = graph.remaining_path(weights)
    ids = graph.ids
    order = [ids[i] for i in Plan(graph, rest).instant_order()]
    critical = [ids[i] for i in graph.critical_path(weights, rest)]
    return _render(spec, order, critical, runner, run_id)


def _render(spec: DispatchSpec, order: Sequence[str], critical: Sequence[str],
            runner: Runner, run_id: str) -> str:
    s = spec.settings
    waves = spec.graph.waves()
    lines = [
        f"Plan for '{spec.name}' ({spec.display}) — nothing will be run or written",
        f"  {plural(len(spec.tasks), 'task')} in {plural(len(waves), 'wave')} · "
        f"max_parallel {s.max_parallel} · "
        f"timeout {fmt_duration(s.timeout_per_task / 1000)} · on_failure {s.on_failure}",
        f"  project root: {spec.root}",
        f"  output dir:   {s.output_dir}",
        "",
    ]
    tasks, describe = spec.tasks, runner.describe
    owner = {m: g for g, ms in spec.foreach.items() for m in ms}
    seen: dict[str, int] = {}
    for n, members in enumerate(waves, start=1):
        lines.append(f"Wave {n}:")
        for i in members:  # (one string per task: 50,000 of them)
            t = tasks[i]
            if owner and _fanned(t.id, owner, spec.foreach, seen, lines):
                continue
            if t.foreach is not None and t.foreach.from_ is not None:
                lines.append(f"  {t.id}: foreach over the items of '{t.foreach.from_}' "
                             "(a JSON array), expanded when it finishes:")
            desc = describe(Job(spec, i, 1, run_id))
            attempts = spec.max_attempts(i)
            if not (t.dependencies or t.timeout or attempts > 1):
                lines.append(f"  {t.id} [{t.agent}] → {t.output}\n      $ {desc}")
                continue
            extra = []
            if t.timeout:
                extra.append(f"timeout {fmt_duration(t.timeout / 1000)}")
            if attempts > 1:
                extra.append(f"up to {attempts} attempts")
            deps = ""
            if t.dependencies:
                extra.append(f"inputs {spec.inputs_mode(i)}")
                deps = f"  (after {', '.join(_deps_text(t.dependencies, owner, spec.foreach))})"
            lines.append(f"  {t.id} [{t.agent}] → {t.output}{deps}\n      $ {desc}\n"
                         f"      ({', '.join(extra)})")
        lines.append("")
    lines.append(f"Start order: {', '.join(_collapsed_order(order, owner))}")
    lines.append(f"Critical path: {' → '.join(critical)}")
    lines += _exclusions(spec)
    return "\n".join(lines)


def _fanned(tid: str, owner: dict[str, str], groups: Mapping[str, Sequence[str]],
            seen: dict[str, int], lines: list[str]) -> bool:
    """Under a fan-out's header, its first tasks (True: the task is collapsed)."""
    g = owner.get(tid)
    if g is None:
        return False
    n = seen[g] = seen.get(g, 0) + 1
    total = len(groups[g])
    if n == 1:
        lines.append(f"  {g}: foreach, {plural(total, 'task')}:")
    if n == COLLAPSE_AFTER + 1:
        lines.append(f"  … and {total - COLLAPSE_AFTER:,} more tasks of {g}")
    return n > COLLAPSE_AFTER


def _deps_text(deps: Sequence[str], owner: dict[str, str],
               groups: Mapping[str, Sequence[str]]) -> list[str]:
    """Dependencies, a whole fan-out as its id and size."""
    out: list[str] = []
    for d in deps:
        g = owner.get(d)
        if g is None:
            out.append(d)
        elif d == groups[g][0]:  # (the others are in it)
            out.append(f"{g} ({plural(len(groups[g]), 'task')})")
    return out


def _collapsed_order(order: Sequence[str], owner: dict[str, str]) -> list[str]:
    """Each fan-out's first tasks, then a count of the rest."""
    total: dict[str, int] = {}
    for tid in order:
        g = owner.get(tid)
        if g is not None:
            total[g] = total.get(g, 0) + 1
    counts: dict[str, int] = {}
    out: list[str] = []
    for tid in order:
        g = owner.get(tid)
        if g is None:
            out.append(tid)
            continue
        n = counts[g] = counts.get(g, 0) + 1
        if n <= COLLAPSE_AFTER:
            out.append(tid)
        elif n == COLLAPSE_AFTER + 1:
            out.append(f"… {total[g] - COLLAPSE_AFTER:,} more of {g}")
    return out


def _exclusions(spec: DispatchSpec) -> list[str]:
    """Pairs of tasks whose `writes:` clash: the run never has both going at once."""
    writes = [[] if spec.isolation(i) == "worktree" else t.writes
              for i, t in enumerate(spec.tasks)]
    if not any(writes):
        return []
    pairs = clashes(writes)
    if not pairs:
        return ["Writes: no two tasks' writes: overlap; nothing is kept apart"]
    ids = spec.graph.ids
    return ["Never at the same time (their writes: overlap):",
            *(f"  {ids[i]} ↔ {ids[j]}  ({a} ∩ {b})" for (i, j), (a, b) in pairs.items())]
