"""`--resume`: reuse unchanged successes; run failed, skipped and changed tasks."""

from __future__ import annotations

from support import Project

FILE = """\
tasks:
  - {id: a, agent: w, prompt: "x", output: a.md}
  - {id: b, agent: w, prompt: "%s", output: b.md, dependencies: [a]}
  - {id: c, agent: w, prompt: "x", output: c.md, dependencies: [b]}
  - {id: d, agent: w, prompt: "x", output: d.md}
  - {id: e, agent: w, prompt: "%s", output: e.md, dependencies: [d]}
"""


def started(project: Project) -> list[str]:
    tasks = [str(e["task"]) for e in project.events() if e["event"] == "start"]
    project.agent_log.unlink(missing_ok=True)
    return sorted(tasks)


def statuses(project: Project) -> dict[str, str]:
    return {t["id"]: t["status"] for t in project.report()["tasks"]}  # type: ignore[index]


def test_resume_after_failure_runs_only_failed_skipped_and_changed(project: Project) -> None:
    project.config()
    project.write("t.yaml", FILE % ("exit=1", "x"))
    assert project.run("t.yaml").returncode == 1
    assert started(project) == ["a", "b", "d", "e"]
    assert statuses(project)["c"] == "skipped"

    # Without --resume everything runs again (an agent may read files it was never told about).
    assert project.run("t.yaml").returncode == 1
    assert started(project) == ["a", "b", "d", "e"]

    # Fix b and change e's prompt: --resume runs b (failed), c (skipped), e (changed).
    project.write("t.yaml", FILE % ("fixed", "changed"))
    proc = project.run("t.yaml", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert started(project) == ["b", "c", "e"]
    st = statuses(project)
    assert st == {"a": "cached", "b": "succeeded", "c": "succeeded", "d": "cached",
                  "e": "succeeded"}
    md = (project.root / ".aiwg/working/dispatch-report.md").read_text()
    assert "- **Cached**: 2" in md and "| a | w |" in md and "≡ cached" in md

    # Nothing changed: everything is reused.
    assert project.run("t.yaml", "--resume").returncode == 0
    assert started(project) == []

    # An upstream output that changes content re-runs its dependents (hash chain).
    project.write("t.yaml", FILE.replace('id: a, agent: w, prompt: "x"', 'id: a, agent: w, '
                                         'prompt: "y"') % ("fixed", "changed"))
    assert project.run("t.yaml", "--resume").returncode == 0
    assert started(project) == ["a", "b", "c"]


def test_resume_reruns_a_task_whose_output_was_deleted_or_edited(project: Project) -> None:
    project.config()
    project.write("t.yaml", FILE % ("x", "x"))
    assert project.run("t.yaml").returncode == 0
    started(project)
    (project.root / ".aiwg/working/d.md").unlink()
    (project.root / ".aiwg/working/a.md").write_text("hand edited\n")
    assert project.run("t.yaml", "--resume").returncode == 0
    # a was edited by hand: it re-runs; its new output equals the old one, so b's
    # fingerprint is unchanged and b, c stay cached. d was deleted: d re-runs.
    assert started(project) == ["a", "d"]


def test_files_globs_join_the_fingerprint(project: Project) -> None:
    project.config()
    doc = project.write("docs/sad.md", "v1\n")
    project.write("t.yaml", """\
        tasks:
          - {id: review, agent: w, prompt: x, output: r.md, files: ["docs/*.md"]}
          - {id: other, agent: w, prompt: x, output: o.md}
    """)
    assert project.run("t.yaml").returncode == 0
    started(project)
    assert project.run("t.yaml", "--resume").returncode == 0
    assert started(project) == []
    doc.write_text("v2\n")
    assert project.run("t.yaml", "--resume").returncode == 0
    assert started(project) == ["review"]
