"""Human-readable execution plan, for `plan` and `--dry-run`."""

from __future__ import annotations

from ..fmt import fmt_duration, plural
from ..result import RunResult
from ..runners.base import Job, Runner
from ..spec import DispatchSpec


def render_plan(spec: DispatchSpec, result: RunResult, runner: Runner) -> str:
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
    for n, members in enumerate(waves, start=1):
        lines.append(f"Wave {n}:")
        for i in members:
            t = spec.tasks[i]
            deps = f"  (after {', '.join(t.dependencies)})" if t.dependencies else ""
            lines.append(f"  {t.id} [{t.agent}] → {t.output}{deps}")
            job = Job(spec, i, 1, result.run_id)
            lines.append(f"      $ {runner.describe(job)}")
            extra = []
            if t.timeout:
                extra.append(f"timeout {fmt_duration(t.timeout / 1000)}")
            attempts = spec.max_attempts(i)
            if attempts > 1:
                extra.append(f"up to {attempts} attempts")
            if t.dependencies:
                extra.append(f"inputs {spec.inputs_mode(i)}")
            if extra:
                lines.append(f"      ({', '.join(extra)})")
        lines.append("")
    lines.append(f"Start order: {', '.join(result.plan_lines)}")
    lines.append(f"Critical path: {' → '.join(result.critical_path)}")
    return "\n".join(lines)
