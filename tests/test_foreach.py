"""`foreach:` fan-out over files, listed items and another task's output, with real
shell agents, through the CLI (and the daemon for one added file)."""

from __future__ import annotations

import json
from pathlib import Path

from support import Project, symlink_loops
from test_daemon import Daemon, daemons, wait_report  # noqa: F401  (the fixture)

ROOT = Path(__file__).resolve().parent.parent
INPUTS = ("python3 -c 'import json,os,sys; [sys.stdout.write(open(p).read()) "
          "for p in json.loads(os.environ[\"DISPATCH_INPUTS\"]).values()]'")
"""A shell prompt that prints its dependencies' outputs, in the order it was given them."""

FILES = f"""\
tasks:
  - id: review
    agent: shell
    foreach: {{files: ["src/**/*.py"], exclude: ["src/skip_*.py"]}}
    prompt: "echo reviewed {{path}} as {{stem}}: $(head -1 {{path}})"
    output: reviews/{{stem}}.md
  - id: summary
    agent: shell
    prompt: "{INPUTS.replace('"', chr(92) + '"')}"
    output: summary.md
    dependencies: [review]
"""


def statuses(project: Project, output_dir: str = ".aiwg/working") -> dict[str, str]:
    return {t["id"]: t["status"] for t in project.report(output_dir)["tasks"]}  # type: ignore[index]


def sources(project: Project, *names: str) -> None:
    for name in names:
        project.write(f"src/{name}", f"# {name}\n")


def test_files_fan_out_with_placeholders_and_a_dependent_gets_every_output(
        project: Project) -> None:
    project.config()
    sources(project, "b.py", "a.py", "pkg/c.py", "skip_me.py")
    project.write("t.yaml", FILES)
    proc = project.run("t.yaml")
    assert proc.returncode == 0, proc.stderr
    out = project.root / ".aiwg/working"
    assert (out / "reviews/a.md").read_text() == "reviewed src/a.py as a: # a.py\n"
    assert (out / "reviews/c.md").read_text() == "reviewed src/pkg/c.py as c: # pkg/c.py\n"
    assert not (out / "reviews/skip_me.md").exists()
    # The dependent waited for all of them and got their outputs in item (sorted) order.
    assert (out / "summary.md").read_text().splitlines() == [
        "reviewed src/a.py as a: # a.py", "reviewed src/b.py as b: # b.py",
        "reviewed src/pkg/c.py as c: # pkg/c.py"]
    report = project.report()
    assert report["foreach"] == {"review": ["review[src:a.py]", "review[src:b.py]",
                                            "review[src:pkg:c.py]"]}
    md = (out / "dispatch-report.md").read_text()
    assert "| **review** (foreach, 3) | shell | | 3 ✓ |" in md

    plan = project.run("plan", "t.yaml")
    assert plan.returncode == 0, plan.stderr
    assert "  review: foreach, 3 tasks:\n  review[src:a.py] [shell] → reviews/a.md" in plan.stdout
    assert "summary [shell] → summary.md  (after review (3 tasks))" in plan.stdout


def test_resume_runs_exactly_the_added_and_the_edited_files_task(project: Project) -> None:
    project.config()
    sources(project, "a.py", "b.py")
    project.write("t.yaml", FILES)
    assert project.run("t.yaml").returncode == 0
    sources(project, "new.py")
    proc = project.run("t.yaml", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert statuses(project) == {"review[src:a.py]": "cached", "review[src:b.py]": "cached",
                                 "review[src:new.py]": "succeeded", "summary": "succeeded"}
    (project.root / "src/b.py").write_text("# b, edited\n")
    assert project.run("t.yaml", "--resume").returncode == 0
    assert statuses(project) == {"review[src:a.py]": "cached", "review[src:b.py]": "succeeded",
                                 "review[src:new.py]": "cached", "summary": "succeeded"}
    assert "# b, edited" in (project.root / ".aiwg/working/summary.md").read_text()


def test_items_strings_and_mappings(project: Project) -> None:
    project.config()
    project.write("t.yaml", """\
        tasks:
          - id: greet
            agent: shell
            foreach:
              items: [{key: fr, word: bonjour, n: 2}, {key: de, word: hallo, n: 3}]
            prompt: "echo {item.word} {item.n} {item}"
            output: "greet-{item.key}.txt"
          - id: plain
            agent: shell
            foreach: {items: [red, green]}
            prompt: "echo colour {item}"
            output: "colour-{item}.txt"
    """)
    proc = project.run("t.yaml")
    assert proc.returncode == 0, proc.stderr
    out = project.root / ".aiwg/working"
    assert (out / "greet-fr.txt").read_text() == "bonjour 2 {key: fr, n: 2, word: bonjour}\n"
    assert (out / "colour-green.txt").read_text() == "colour green\n"
    assert sorted(statuses(project)) == ["greet[de]", "greet[fr]", "plain[0]", "plain[1]"]


def test_from_expands_the_sources_json_array_when_it_finishes(project: Project) -> None:
    project.config()
    project.write("t.yaml", f"""\
        tasks:
          - id: list
            agent: shell
            prompt: |
              echo '[{{"key": "x", "v": "one"}}, {{"key": "y", "v": "two"}}]'
            output: list.json
          - id: each
            agent: shell
            foreach: {{from: list}}
            prompt: "echo got {{item.v}}"
            output: "each/{{item.key}}.txt"
          - id: join
            agent: shell
            prompt: "{INPUTS.replace('"', chr(92) + '"')}"
            output: join.md
            dependencies: [each]
    """)
    plan = project.run("plan", "t.yaml")
    assert "each: foreach over the items of 'list'" in plan.stdout
    proc = project.run("t.yaml")
    assert proc.returncode == 0, proc.stderr
    out = project.root / ".aiwg/working"
    assert (out / "join.md").read_text() == "got one\ngot two\n"
    assert statuses(project) == {"list": "succeeded", "each": "succeeded",
                                 "each[x]": "succeeded", "each[y]": "succeeded",
                                 "join": "succeeded"}
    assert project.report()["foreach"] == {"each": ["each[x]", "each[y]"]}
    proc = project.run("t.yaml", "--resume")  # the source's output is reused: so are theirs
    assert proc.returncode == 0, proc.stderr
    assert set(statuses(project).values()) == {"cached"}

    # A source whose output is not a JSON array fails the fan-out, and skips its dependents.
    project.write("t.yaml", (project.root / "t.yaml").read_text().replace(
        """echo '[{"key": "x", "v": "one"}, {"key": "y", "v": "two"}]'""", "echo nope"))
    proc = project.run("t.yaml")
    assert proc.returncode == 1
    tasks = {t["id"]: t for t in project.report()["tasks"]}  # type: ignore[union-attr]
    assert tasks["each"]["status"] == "failed"
    assert "is not JSON" in tasks["each"]["error"]
    assert tasks["join"]["status"] == "skipped"


def test_from_over_max_items_fails_the_fan_out(project: Project) -> None:
    project.config()
    project.write("t.yaml", """\
        tasks:
          - {id: list, agent: shell, prompt: "echo '[1, 2, 3]'", output: list.json}
          - id: each
            agent: shell
            foreach: {from: list, max_items: 2}
            prompt: "echo {item}"
            output: "each-{item}.txt"
    """)
    assert project.run("t.yaml").returncode == 1
    each = next(t for t in project.report()["tasks"] if t["id"] == "each")  # type: ignore[union-attr]
    assert each["status"] == "failed" and "more than max_items (2)" in each["error"]


def test_validation_errors_name_the_foreach_tasks_line(project: Project) -> None:
    project.config()
    sources(project, "a.py", "b.py", "c.py")
    project.write("t.yaml", """\
        tasks:
          - id: collide
            agent: shell
            foreach: {files: ["src/*.py"]}
            prompt: "echo {path}"
            output: same.md
          - id: many
            agent: shell
            foreach: {files: ["src/*.py"], max_items: 2}
            prompt: "echo {path}"
            output: "m/{stem}.md"
          - id: nofield
            agent: shell
            foreach: {items: [a]}
            prompt: "echo {item.name}"
            output: "n-{item}.md"
          - id: notfile
            agent: shell
            foreach: {items: [a]}
            prompt: "echo x"
            output: "x-{stem}.md"
    """)
    proc = project.run("validate", "t.yaml")
    assert proc.returncode == 2
    err = proc.stderr
    assert ("t.yaml:6:13: error: task 'collide': output 'same.md' of 'collide[src:b.py]' is "
            "also the output of 'collide[src:a.py]'") in err
    assert "t.yaml:9:14: error: task 'many': foreach gives 3 items, more than max_items (2)" in err
    assert "t.yaml:15:13: error: task 'nofield': {item.name}: item '0' has no field 'name'" in err
    assert "t.yaml:21:13: error: task 'notfile': {stem} names a file" in err

    project.write("u.yaml", """\
        tasks:
          - id: both
            agent: shell
            foreach: {files: ["src/*.py"], items: [a]}
            prompt: x
            output: y.md
    """)
    proc = project.run("validate", "u.yaml")
    assert proc.returncode == 2
    assert "u.yaml:4:14: error: task 'both': 'foreach': give exactly one of files:" in proc.stderr


def test_schema_covers_foreach(project: Project) -> None:
    proc = project.run("schema")
    schema = json.loads(proc.stdout)
    fe = schema["$defs"]["Foreach"]
    assert set(fe["properties"]) == {"files", "exclude", "items", "from", "max_items"}
    assert fe["oneOf"] == [{"required": ["files"]}, {"required": ["items"]},
                           {"required": ["from"]}]
    assert "foreach" in schema["$defs"]["Task"]["properties"]


def test_daemon_runs_one_new_task_for_one_added_file(project: Project,
                                                     daemons: list[Daemon]) -> None:  # noqa: F811
    project.config()
    sources(project, "a.py", "b.py")
    project.write(".aiwg/tasks/rev.yaml", """\
        tasks:
          - id: review
            agent: shell
            foreach: {files: ["src/*.py"]}
            prompt: "echo reviewed {path}"
            output: "reviews/{stem}.md"
    """)
    d = Daemon(project)
    daemons.append(d)
    r1 = wait_report(project, "rev")
    assert {t["id"]: t["status"] for t in r1["tasks"]} == {  # type: ignore[union-attr]
        "review[src:a.py]": "succeeded", "review[src:b.py]": "succeeded"}
    d.wait_log("watching")
    sources(project, "c.py")
    r2 = wait_report(project, "rev", after=str(r1["run_id"]))
    assert {t["id"]: t["status"] for t in r2["tasks"]} == {  # type: ignore[union-attr]
        "review[src:a.py]": "cached", "review[src:b.py]": "cached",
        "review[src:c.py]": "succeeded"}
    out = project.root / ".aiwg/working/rev/reviews/c.md"
    assert out.read_text() == "reviewed src/c.py\n"


def test_example_reviews_each_module_offline(tmp_path: Path) -> None:
    """examples/review-each-module.yaml, unchanged, on this repository: one schema-checked
    review per module, and a summary of them all."""
    out = tmp_path / "out"
    proc = Project(ROOT).run("examples/review-each-module.yaml", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    modules = sorted(p.name for p in (ROOT / "daemon/parallel_dispatch").glob("*.py")
                     if p.name != "__main__.py")
    report = json.loads((out / "dispatch-report.json").read_text())
    reviews = report["foreach"]["review"]
    assert [r.rsplit(":", 1)[1][:-1] for r in reviews] == modules
    assert all(t["schema"]["ok"] for t in report["tasks"] if t["id"] in reviews)
    api = json.loads((out / "reviews/api.json").read_text())
    assert api["module"] == "daemon/parallel_dispatch/api.py"
    total = sum(len(json.loads((out / f"reviews/{m[:-3]}.json").read_text())["findings"])
                for m in modules)
    summary = (out / "summary.md").read_text()
    assert summary.startswith(f"# {total} findings in {len(modules)} modules\n")


def test_plan_and_report_collapse_a_fan_out_beyond_20(project: Project) -> None:
    """README: the first 20 tasks of a fan-out, then how many more (plan and report)."""
    project.config()
    items = ", ".join(f"i{n:02d}" for n in range(25))
    project.write("t.yaml", f"""\
        tasks:
          - id: many
            agent: shell
            foreach: {{items: [{items}]}}
            prompt: "echo {{item}}"
            output: "m-{{item}}.txt"
    """)
    plan = project.run("plan", "t.yaml")
    assert plan.returncode == 0, plan.stderr
    assert "  many: foreach, 25 tasks:\n" in plan.stdout
    assert "many[19] [shell]" in plan.stdout and "many[20] [shell]" not in plan.stdout
    assert "  … and 5 more tasks of many\n" in plan.stdout
    assert project.run("t.yaml").returncode == 0
    md = (project.root / ".aiwg/working/dispatch-report.md").read_text()
    assert "| **many** (foreach, 25) | shell | | 25 ✓ |" in md
    assert "| many[19] | shell |" in md and "| many[20] | shell |" not in md
    assert "| … 5 more of many (dispatch-report.json) |" in md
    assert "| 1 | many (25 tasks) |" in md  # the waves table: one entry for the fan-out
    chart = md.split("```mermaid", 1)[1]
    assert "many[19] :" in chart and "many[20] :" not in chart
    assert "many … 5 more :done," in chart  # one bar for the rest
    assert len(project.report()["foreach"]["many"]) == 25  # type: ignore[index]


def test_a_symlink_loop_under_a_double_star_glob_is_not_followed(project: Project) -> None:
    """`glob` follows symlinked folders, so two links back up the tree made `src/**/*.py`
    run for ever (validation never ended); they are not followed now, and a symlinked
    file still matches."""
    symlink_loops(project.root)
    (project.root / "src/b.py").symlink_to("x/a.py")
    (project.root / "src/.hidden.py").write_text("")
    project.write("t.yaml", """\
        tasks:
          - id: r
            agent: shell
            foreach:
              files: ["src/**/*.py"]
            prompt: "echo {path}"
            output: "r/{stem}.txt"
    """)
    proc = project.run("plan", "t.yaml", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "r[src:x:a.py]" in proc.stdout and "r[src:b.py]" in proc.stdout
    assert "up" not in proc.stdout and "hidden" not in proc.stdout
