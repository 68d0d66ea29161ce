"""Parallelism, dependency order, no wave barrier, critical-path priority.

Overlap is measured from the agents' own start/end timestamps; assertions use
orderings and counts, never tight wall-clock margins.
"""

from __future__ import annotations

import json

from support import Project


def max_concurrency(spans: dict[str, tuple[float, float]]) -> int:
    points = sorted([(s, 1) for s, _ in spans.values()] + [(e, -1) for _, e in spans.values()],
                    key=lambda p: (p[0], p[1]))
    cur = best = 0
    for _, delta in points:
        cur += delta
        best = max(best, cur)
    return best


def test_parallelism_is_real_and_capped(project: Project) -> None:
    project.config()
    tasks = "\n".join(
        f"  - {{id: t{i}, agent: worker, prompt: 'sleep=1', output: t{i}.md}}" for i in range(7))
    project.write("t.yaml", f"tasks:\n{tasks}\nsettings:\n  max_parallel: 3\n")
    proc = project.run("t.yaml")
    assert proc.returncode == 0, proc.stderr
    spans = project.spans()
    assert len(spans) == 7
    peak = max_concurrency(spans)
    assert peak <= 3
    assert peak >= 2  # 1 s sleeps started together overlap even on a loaded machine
    report = project.report()
    assert report["summary"]["succeeded"] == 7
    # The scheduler's own view agrees: never more than 3 at once.
    own = {t["id"]: (t["start_s"], t["end_s"]) for t in report["tasks"]}
    assert max_concurrency(own) <= 3


def test_dependencies_start_after_their_prerequisites_end(project: Project) -> None:
    project.config()
    project.write("t.yaml", """\
        tasks:
          - {id: a, agent: w, prompt: 'sleep=0.3', output: a.md}
          - {id: b, agent: w, prompt: 'sleep=0.3', output: b.md}
          - {id: c, agent: w, prompt: 'x', output: c.md, dependencies: [a, b]}
          - {id: d, agent: w, prompt: 'x', output: d.md, dependencies: [c]}
        settings: {max_parallel: 4}
    """)
    assert project.run("t.yaml").returncode == 0
    s = project.spans()
    assert s["c"][0] >= max(s["a"][1], s["b"][1])
    assert s["d"][0] >= s["c"][1]
    waves = project.report()["waves"]
    assert [w["tasks"] for w in waves] == [["a", "b"], ["c"], ["d"]]


def test_no_barrier_between_waves(project: Project) -> None:
    """b depends only on the quick a; it must start while the slow c is still running.

    c finishes only once b has started (it waits for b's pidfile), so the run can
    only succeed if b did not wait for the whole first wave.
    """
    project.config()
    marker = project.root / "b.pid"
    project.write("t.yaml", f"""\
        tasks:
          - {{id: a, agent: w, prompt: 'x', output: a.md}}
          - {{id: c, agent: w, prompt: 'wait-for={marker}', output: c.md}}
          - {{id: b, agent: w, prompt: 'pidfile={marker}', output: b.md, dependencies: [a]}}
        settings: {{max_parallel: 2}}
    """)
    assert project.run("t.yaml").returncode == 0
    s = project.spans()
    assert s["b"][0] < s["c"][1]


def test_critical_path_goes_first(project: Project) -> None:
    """With one slot, the head of the longest chain starts before short side tasks."""
    project.config()
    project.write("t.yaml", """\
        tasks:
          - {id: side1, agent: w, prompt: x, output: s1.md}
          - {id: side2, agent: w, prompt: x, output: s2.md}
          - {id: chain1, agent: w, prompt: x, output: c1.md}
          - {id: chain2, agent: w, prompt: x, output: c2.md, dependencies: [chain1]}
          - {id: chain3, agent: w, prompt: x, output: c3.md, dependencies: [chain2]}
        settings: {max_parallel: 1}
    """)
    assert project.run("t.yaml").returncode == 0
    order = [e["task"] for e in project.events() if e["event"] == "start"]
    assert order[0] == "chain1"
    assert order.index("chain2") < order.index("side1")  # chain stays ahead of equal-weight side
    assert project.report()["critical_path"] == ["chain1", "chain2", "chain3"]


def test_recorded_durations_steer_priority(project: Project) -> None:
    """Durations kept from an earlier run make a long single task outrank a short chain."""
    project.config()
    project.write("t.yaml", """\
        tasks:
          - {id: short1, agent: w, prompt: x, output: s1.md}
          - {id: short2, agent: w, prompt: x, output: s2.md, dependencies: [short1]}
          - {id: long, agent: w, prompt: x, output: l.md}
        settings: {max_parallel: 1}
    """)
    project.write(".aiwg/working/.dispatch-state.toml", """\
        [tasks.short1]
        duration_s = 1.0
        [tasks.short2]
        duration_s = 1.0
        [tasks.long]
        duration_s = 30.0
    """)
    proc = project.run("plan", "t.yaml")
    assert proc.returncode == 0
    assert "Start order: long, short1, short2" in proc.stdout
    assert "Critical path: long" in proc.stdout
    # Without history, equal weights favour the two-task chain.
    (project.root / ".aiwg/working/.dispatch-state.toml").unlink()
    proc = project.run("plan", "t.yaml")
    assert "Start order: short1, short2, long" in proc.stdout  # ties go to file order


def test_durations_are_recorded_for_next_time(project: Project) -> None:
    project.config()
    project.write("t.yaml", "tasks:\n  - {id: a, agent: w, prompt: 'sleep=0.2', output: a.md}\n")
    assert project.run("t.yaml").returncode == 0
    import tomllib

    state = tomllib.loads((project.root / ".aiwg/working/.dispatch-state.toml").read_text())
    assert state["tasks"]["a"]["duration_s"] >= 0.2
    assert state["tasks"]["a"]["status"] == "succeeded"
    assert json.loads((project.root / ".aiwg/working/dispatch-report.json").read_text())[
        "tasks"][0]["duration_s"] >= 0.2
