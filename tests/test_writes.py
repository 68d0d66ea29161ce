"""`writes:` (issue 11 §2): tasks whose globs overlap never run at the same time.

The glob rules on their own, the scheduler on the mock clock (exact start times: other
slots keep filling), and real `shell` agents that write their own start and end times,
so the exclusion is measured by the agents, not by the dispatcher's bookkeeping.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from parallel_dispatch.writesets import clash, normalise, patterns_meet
from support import Project
from test_scheduler_events import Script, ScriptedRunner, Step, _run, _spec


@pytest.mark.parametrize(("a", "b", "meet"), [
    ("src/**", "src/app.py", True),
    ("src/", "src/pkg/deep/mod.py", True),
    ("**/*.py", "src/app.py", True),
    ("**", "anything/at/all", True),
    ("README.md", "README.md", True),
    ("README.md", "readme.md", False),
    ("*.py", "*.md", False),
    ("src/*.py", "docs/*.py", False),
    ("src/*.py", "src/pkg/mod.py", False),  # `*` stays inside one segment
    ("src/[ab].py", "src/c.py", False),
    ("src/[ab].py", "src/b.py", True),
    ("src/a*", "src/*b", True),  # might meet ("src/ab"): kept apart, the safe side
    ("src/a*x", "src/*b", False),  # tails x and b rule it out
    ("build/**/out", "build/out", True),  # `**` is zero or more segments
])
def test_globs_meet_when_some_path_could_match_both(a: str, b: str, meet: bool) -> None:
    assert patterns_meet(normalise(a), normalise(b)) is meet
    assert patterns_meet(normalise(b), normalise(a)) is meet


def test_clash_names_the_globs() -> None:
    assert clash(["docs/", "src/**/*.py"], ["tests/*", "src/app.py"]) == \
        ("src/**/*.py", "src/app.py")
    assert clash(["docs/"], ["src/"]) is None


def test_clashing_tasks_run_apart_and_the_others_fill_the_slots(tmp_path: Path) -> None:
    spec = _spec(tmp_path, """
        tasks:
          - {id: a, agent: c, prompt: p, output: a.md, writes: ["src/**"]}
          - {id: b, agent: c, prompt: p, output: b.md, writes: [src/app.py]}
          - {id: c, agent: c, prompt: p, output: c.md, writes: [docs/]}
          - {id: d, agent: c, prompt: p, output: d.md}
          - {id: e, agent: c, prompt: p, output: e.md, writes: [src/app.py, README.md]}
    """, "settings: {max_parallel: 5}\n")
    runner = ScriptedRunner({t: [Script([Step(10)])] for t in "abcde"})
    result = _run(spec, runner)
    assert all(r.status == "succeeded" for r in result.records)
    start = {t: s for t, _, s in runner.starts}
    assert start["c"] == start["d"] == 0.0  # no clash: they run at once with the first
    # a, b and e all write src/app.py: one at a time, in priority (file) order
    assert sorted(start[t] for t in "abe") == [0.0, 10.0, 20.0]
    assert start["a"] == 0.0


def test_plan_shows_which_tasks_are_kept_apart(project: Project) -> None:
    project.write("t.yaml", """
        tasks:
          - {id: fmt, agent: shell, prompt: 'true', output: fmt.md, writes: ["src/**/*.py"]}
          - {id: fix, agent: shell, prompt: 'true', output: fix.md, writes: [src/app.py]}
          - {id: doc, agent: shell, prompt: 'true', output: doc.md, writes: [docs/]}
    """)
    proc = project.run("plan", "t.yaml")
    assert proc.returncode == 0, proc.stderr
    assert "Never at the same time (their writes: overlap):\n  fmt ↔ fix  (src/**/*.py ∩ " \
        "src/app.py)" in proc.stdout
    assert "doc ↔" not in proc.stdout and "↔ doc" not in proc.stdout


@pytest.mark.parametrize("glob", ["/etc/passwd", "../elsewhere/*", "src/../../x", "~/x"])
def test_a_write_outside_the_project_is_refused_with_its_line(project: Project,
                                                              glob: str) -> None:
    project.write("t.yaml", f"""
        tasks:
          - id: a
            agent: shell
            prompt: 'true'
            output: a.md
            writes: ["{glob}"]
    """)
    proc = project.run("validate", "t.yaml")
    assert proc.returncode == 2
    assert "t.yaml:7" in proc.stderr and "must be relative to the project root" in proc.stderr


def test_real_agents_with_overlapping_writes_never_overlap_in_time(project: Project) -> None:
    """Each agent writes its own start and end time; clashing ones must not interleave."""
    stamp = "date +%s.%N > times/{id}.start; sleep 0.3; date +%s.%N > times/{id}.end"
    rows = "".join(
        f"  - {{id: {t}, agent: shell, prompt: '{stamp.format(id=t)}', output: {t}.md, "
        f"writes: [{w}]}}\n"
        for t, w in [("w1", "lib/core.py"), ("w2", '"lib/**"'), ("w3", "lib/core.py"),
                     ("w4", '"lib/*.py"')])
    (project.root / "times").mkdir()
    project.write("t.yaml", "tasks:\n" + rows + "settings: {max_parallel: 4}\n")
    proc = project.run("t.yaml")
    assert proc.returncode == 0, proc.stderr
    spans = sorted((float((project.root / f"times/{t}.start").read_text()),
                    float((project.root / f"times/{t}.end").read_text()))
                   for t in ("w1", "w2", "w3", "w4"))
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start, spans  # one after another: all four clash pairwise
