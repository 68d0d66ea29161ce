"""Every validation error: located (file:line:col, task), all at once, nothing written."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from parallel_dispatch import TaskFileError, load_spec
from support import Project


def errors_of(path: Path) -> list[str]:
    with pytest.raises(TaskFileError) as info:
        load_spec(path)
    return [d.format() for d in info.value.diagnostics]


def one_error(path: Path) -> str:
    errs = errors_of(path)
    assert len(errs) == 1, errs
    return errs[0]


GOOD_TASK = """\
  - id: a
    agent: shell
    prompt: "true"
    output: a.txt
"""


def test_examples_load_unchanged(project: Project) -> None:
    project.config()
    examples = Path(__file__).parent.parent / "examples"
    for name in ("architecture-review", "code-review-pipeline", "doc-generation"):
        target = project.root / f"{name}.yaml"
        target.write_bytes((examples / f"{name}.yaml").read_bytes())
        spec = load_spec(target)
        assert spec.name == name
    spec = load_spec(project.root / "architecture-review.yaml")
    assert [len(w) for w in spec.graph.waves()] == [3, 1]
    assert spec.settings.max_parallel == 3
    assert spec.settings.on_failure == "continue"
    assert spec.settings.output_dir == project.root / ".aiwg/working/reviews"


def test_bad_yaml_is_located(project: Project) -> None:
    f = project.write("t.yaml", "tasks:\n  - id: a\n    prompt: [unclosed\n")
    err = one_error(f)
    assert err.startswith(f"{f}:")
    assert "invalid YAML" in err
    assert ":4:" in err or ":3:" in err


def test_empty_file_and_empty_task_list(project: Project) -> None:
    assert "empty" in one_error(project.write("e.yaml", ""))
    err = one_error(project.write("t.yaml", "name: x\ntasks: []\n"))
    assert "the task list is empty" in err and ":2:8:" in err


def test_unknown_key_did_you_mean_with_position_and_task(project: Project) -> None:
    f = project.write("t.yaml", """\
        tasks:
          - id: a
            agent: shell
            prompt: "true"
            output: a.txt
            dependancies: []
    """)
    err = one_error(f)
    assert f"{f}:6:5: error: task 'a': unknown key 'dependancies'; did you mean 'dependencies'?" \
        in err


def test_all_errors_reported_at_once(project: Project) -> None:
    f = project.write("t.yaml", """\
        name: many
        tasks:
          - id: a
            agent: shell
            prompt: "true"
            output: same.txt
            dependencies: [bb]
          - id: a
            agent: shell
            prompt: 3
            output: same.txt
          - id: c
            agent: nobody
            prompt: "true"
            output: /etc/passwd
            timeout: 0
            dependencies: [c]
        settings:
          max_parallel: 0
          timeout_per_task: -5
          on_failure: explode
    """)
    errs = errors_of(f)
    text = "\n".join(errs)
    assert "duplicate id 'a' (first defined on line 3)" in text
    assert "unknown dependency 'bb'" in text
    assert "cannot depend on itself" in text
    assert "'prompt': input should be a valid string" in text
    assert "'timeout' must be > 0" in text
    assert "'settings.max_parallel' must be ≥ 1 (got 0)" in text
    assert "'settings.timeout_per_task' must be > 0" in text
    assert "'settings.on_failure' must be one of 'continue', 'stop' or 'retry'" in text
    # Output and agent checks run despite the schema errors above.
    assert "task 'a': output 'same.txt' is also the output of task 'a'" in text
    assert "output '/etc/passwd' is absolute" in text
    assert "unknown agent 'nobody'" in text
    assert len(errs) >= 11
    for e in errs:  # every message is located
        assert e.startswith(f"{f}:"), e
        assert e.split(":")[1].isdigit(), e


def test_unknown_dependency_did_you_mean(project: Project) -> None:
    f = project.write("t.yaml", GOOD_TASK.join(["tasks:\n", ""]) + """\
  - id: b
    agent: shell
    prompt: "true"
    output: b.txt
    dependencies: [security-reveiw]
  - id: security-review
    agent: shell
    prompt: "true"
    output: s.txt
""")
    err = one_error(f)
    assert "task 'b': unknown dependency 'security-reveiw'; did you mean 'security-review'?" in err
    assert ":10:20:" in err


def test_cycle_is_printed(project: Project) -> None:
    f = project.write("t.yaml", """\
        tasks:
          - {id: a, agent: shell, prompt: x, output: a, dependencies: [b]}
          - {id: b, agent: shell, prompt: x, output: b, dependencies: [c]}
          - {id: c, agent: shell, prompt: x, output: c, dependencies: [a]}
          - {id: d, agent: shell, prompt: x, output: d, dependencies: [a]}
    """)
    err = one_error(f)
    assert "dependency cycle: a → b → c → a" in err
    assert "task 'a'" in err


def test_two_separate_cycles_both_reported(project: Project) -> None:
    f = project.write("t.yaml", """\
        tasks:
          - {id: a, agent: shell, prompt: x, output: a, dependencies: [b]}
          - {id: b, agent: shell, prompt: x, output: b, dependencies: [a]}
          - {id: c, agent: shell, prompt: x, output: c, dependencies: [d]}
          - {id: d, agent: shell, prompt: x, output: d, dependencies: [c]}
    """)
    errs = errors_of(f)
    assert any("a → b → a" in e for e in errs)
    assert any("c → d → c" in e for e in errs)


@pytest.mark.parametrize("output, expect", [
    ("/tmp/x.md", "is absolute"),
    ("../x.md", "leaves the output dir through '..'"),
    ("sub/../../x.md", "leaves the output dir through '..'"),
    (".", "names the output dir itself"),
    ("dispatch-report.md", "reserved"),
])
def test_bad_outputs(project: Project, output: str, expect: str) -> None:
    f = project.write("t.yaml", f"""\
        tasks:
          - id: a
            agent: shell
            prompt: x
            output: "{output}"
    """)
    err = one_error(f)
    assert expect in err and "task 'a'" in err and ":5:" in err


def test_output_escaping_through_symlink(project: Project, tmp_path_factory: pytest.TempPathFactory
                                         ) -> None:
    outside = tmp_path_factory.mktemp("outside")
    out_dir = project.root / ".aiwg" / "working"
    out_dir.mkdir(parents=True)
    (out_dir / "link").symlink_to(outside)
    f = project.write("t.yaml", """\
        tasks:
          - {id: a, agent: shell, prompt: x, output: link/x.md}
    """)
    assert "leaves the output dir through a symlink" in one_error(f)


def test_duplicate_and_overlapping_outputs(project: Project) -> None:
    f = project.write("t.yaml", """\
        tasks:
          - {id: a, agent: shell, prompt: x, output: same.md}
          - {id: b, agent: shell, prompt: x, output: ./same.md}
          - {id: c, agent: shell, prompt: x, output: api/}
          - {id: d, agent: shell, prompt: x, output: api/index.md}
    """)
    errs = errors_of(f)
    assert any("task 'b': output './same.md' is also the output of task 'a'" in e for e in errs)
    assert any("task 'd'" in e and "inside the directory output 'api/' of task 'c'" in e
               for e in errs)


def test_wrong_types_and_bad_ids(project: Project) -> None:
    f = project.write("t.yaml", """\
        tasks:
          - id: "has space"
            agent: shell
            prompt: x
            output: a
            dependencies: notalist
            retries: -1
    """)
    text = "\n".join(errors_of(f))
    assert "'id' must use only letters" in text
    assert "'dependencies': input should be a valid list" in text
    assert "'retries' must be ≥ 0" in text


def test_unknown_agent_lists_configured_ones(project: Project) -> None:
    project.write(".aiwg/dispatch.toml", """\
        [agents.security-architect]
        command = ["my-agent"]
    """)
    f = project.write("t.yaml", """\
        tasks:
          - {id: a, agent: security-architec, prompt: x, output: a}
    """)
    err = one_error(f)
    assert "unknown agent 'security-architec'; did you mean 'security-architect'?" in err
    assert "known agents: security-architect, shell" in err


def test_shell_agent_refuses_appended_inputs(project: Project) -> None:
    f = project.write("t.yaml", """\
        tasks:
          - {id: a, agent: shell, prompt: x, output: a}
          - {id: b, agent: shell, prompt: x, output: b, dependencies: [a], inputs: inline}
    """)
    assert "DISPATCH_INPUTS" in one_error(f)


def test_unsafe_yaml_tags_refused(project: Project) -> None:
    f = project.write("t.yaml", """\
        tasks:
          - id: a
            agent: shell
            prompt: !!python/object/apply:os.system ["touch pwned"]
            output: a
    """)
    assert "unsupported YAML tag" in one_error(f)
    assert not (project.root / "pwned").exists()


def test_duplicate_yaml_keys_refused(project: Project) -> None:
    f = project.write("t.yaml", """\
        tasks:
          - id: a
            agent: shell
            prompt: x
            prompt: y
            output: a
    """)
    assert "duplicate key 'prompt'" in one_error(f)


def test_billion_laughs_refused_quickly(project: Project) -> None:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 10):
        prev = f"*a{i - 1}"
        lines.append(f"a{i}: &a{i} [{', '.join([prev] * 9)}]")
    lines.append("tasks: *a9")
    f = project.write("bomb.yaml", "\n".join(lines) + "\n")
    t0 = time.monotonic()
    err = one_error(f)
    assert "alias bomb" in err
    assert time.monotonic() - t0 < 60  # generous: the point is it ends, not how fast


def test_huge_file_refused_before_reading(project: Project) -> None:
    f = project.root / "huge.yaml"
    with open(f, "wb") as fh:
        fh.truncate(100 * 1024 * 1024)
    err = one_error(f)
    assert "100 MiB" in err and "limited to" in err


def test_invalid_config_is_located(project: Project) -> None:
    project.write(".aiwg/dispatch.toml", """\
        [defaults]
        max_paralel = 3

        [agents.x]
        command = "not-a-list"
    """)
    f = project.write("t.yaml", "tasks:\n" + GOOD_TASK)
    errs = errors_of(f)
    text = "\n".join(errs)
    assert "dispatch.toml:2: error: defaults.max_paralel" in text
    assert "dispatch.toml:5: error: agents.x.command" in text


def test_invalid_file_writes_nothing_and_exits_2(project: Project) -> None:
    project.write("t.yaml", """\
        tasks:
          - {id: a, agent: shell, prompt: "touch ran", output: a, dependencies: [zz]}
    """)
    proc = project.run("t.yaml")
    assert proc.returncode == 2
    assert "t.yaml:2:" in proc.stderr and "unknown dependency 'zz'" in proc.stderr
    assert "nothing was run" in proc.stderr
    assert not (project.root / ".aiwg" / "working").exists()
    assert not (project.root / "ran").exists()


def test_validate_command(project: Project) -> None:
    project.write("good.yaml", "tasks:\n" + GOOD_TASK)
    project.write("bad.yaml", "tasks: 3\n")
    proc = project.run("validate", "good.yaml", "bad.yaml")
    assert proc.returncode == 2
    assert "good.yaml: OK — 1 task in 1 wave" in proc.stdout
    assert "bad.yaml:1:8: error: 'tasks': input should be a valid list" in proc.stderr
    assert project.run("validate", "good.yaml").returncode == 0
