"""Outputs are atomic and streamed; inputs reach dependents; env and argv are exact."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from support import Project, cli_env

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_synthesis_sees_the_three_reviews(project: Project) -> None:
    """The reference's architecture review, unchanged, with a configured echo agent."""
    project.config()
    shutil.copy(EXAMPLES / "architecture-review.yaml", project.root / "tasks.yaml")
    proc = project.run("tasks.yaml")
    assert proc.returncode == 0, proc.stderr
    out = project.root / ".aiwg/working/reviews"
    final = (out / "final-review.md").read_text()
    assert final.startswith("# Output of documentation-synthesizer for synthesis")
    assert "Synthesize all reviews into final assessment" in final
    for dep, agent, path in [("security-review", "security-architect", "reviews/security.md"),
                             ("test-review", "test-architect", "reviews/testability.md"),
                             ("ops-review", "devops-engineer", "reviews/operations.md")]:
        assert f"### {dep} (agent: {agent})" in final
        assert f"Output: {out / path}" in final
        # the dependency's content itself, not just its path
        assert (out / path).read_text().strip().splitlines()[0] in final
    report = json.loads((out / "dispatch-report.json").read_text())
    assert report["summary"]["succeeded"] == 4
    assert [w["tasks"] for w in report["waves"]] == [
        ["security-review", "test-review", "ops-review"], ["synthesis"]]


def test_inputs_env_and_modes(project: Project) -> None:
    project.config()
    project.write("t.yaml", """\
        tasks:
          - {id: up, agent: w, prompt: "x", output: up.md}
          - {id: inl, agent: w, prompt: "x", output: inl.md, dependencies: [up]}
          - {id: pth, agent: w, prompt: "x", output: pth.md, dependencies: [up], inputs: paths}
          - {id: non, agent: w, prompt: "x", output: non.md, dependencies: [up], inputs: none}
          - id: env
            agent: shell
            prompt: 'printf "%s" "$DISPATCH_INPUTS"'
            output: env.json
            dependencies: [up]
    """)
    assert project.run("t.yaml").returncode == 0
    out = project.root / ".aiwg/working"
    up_line = "# Output of w for up"
    assert up_line in (out / "inl.md").read_text()
    pth = (out / "pth.md").read_text()
    assert f"Output: {out / 'up.md'}" in pth and up_line not in pth
    assert "Inputs from dependencies" not in (out / "non.md").read_text()
    assert json.loads((out / "env.json").read_text()) == {"up": str(out / "up.md")}


def test_inline_inputs_are_capped(project: Project) -> None:
    project.config()
    project.write("t.yaml", """\
        tasks:
          - {id: big, agent: w, prompt: "big=300000", output: big.txt}
          - {id: reader, agent: w, prompt: "x", output: r.md, dependencies: [big]}
    """)
    assert project.run("t.yaml").returncode == 0
    text = (project.root / ".aiwg/working/r.md").read_text()
    assert "truncated: showing the first 64 KiB of 300,000 bytes" in text
    assert len(text) < 80_000


PROBE = """\
import json, os, sys
env = {k: v for k, v in os.environ.items() if k.startswith("DISPATCH_") or k == "EXTRA"}
print(json.dumps({"argv": sys.argv[1:], "env": env, "cwd": os.getcwd()}))
"""


def test_agent_environment_and_placeholders(project: Project) -> None:
    probe = project.write("probe.py", PROBE)
    project.config(f"""
        [agents.argy]
        command = ["{sys.executable}", "{probe}", "{{agent}}", "{{task_id}}", "{{output_dir}}",
                   "{{project}}", "{{unknown}}"]
        prompt = "arg"
        env = {{ EXTRA = "yes" }}
    """)
    project.write("t.yaml", """\
        tasks:
          - {id: first, agent: w, prompt: x, output: f.md}
          - {id: probe, agent: argy, prompt: "the prompt $(touch pwned)", output: p.json,
             dependencies: [first], inputs: none}
    """)
    assert project.run("t.yaml").returncode == 0
    out = project.root / ".aiwg/working"
    seen = json.loads((out / "p.json").read_text())
    assert seen["argv"] == ["argy", "probe", str(out), str(project.root), "{unknown}",
                            "the prompt $(touch pwned)"]
    env = seen["env"]
    assert env["DISPATCH_TASK_ID"] == "probe" and env["DISPATCH_AGENT"] == "argy"
    assert env["DISPATCH_OUTPUT_DIR"] == str(out)
    assert os.path.isabs(env["DISPATCH_OUTPUT"])
    assert json.loads(env["DISPATCH_INPUTS"]) == {"first": str(out / "f.md")}
    assert env["DISPATCH_RUN_ID"] == project.report()["run_id"]
    assert env["EXTRA"] == "yes"
    assert seen["cwd"] == str(project.root)
    assert not (project.root / "pwned").exists()  # no shell ever saw the prompt


def test_prompt_on_stdin_is_not_interpreted(project: Project) -> None:
    project.config()
    project.write("t.yaml", """\
        tasks:
          - {id: a, agent: w, prompt: "`touch pwned` $(touch pwned2); touch pwned3", output: a.md}
    """)
    assert project.run("t.yaml").returncode == 0
    assert "$(touch pwned2)" in (project.root / ".aiwg/working/a.md").read_text()
    assert not any((project.root / n).exists() for n in ("pwned", "pwned2", "pwned3"))


def test_output_appears_only_complete(project: Project) -> None:
    """Poll the output path while the agent writes slowly: never a partial file."""
    project.config()
    project.write("t.yaml", """\
        tasks:
          - {id: slow, agent: w, prompt: "slow-write padding padding padding", output: s.md}
    """)
    target = project.root / ".aiwg/working/s.md"
    seen: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            with contextlib.suppress(FileNotFoundError):
                seen.append(target.read_text())

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        assert project.run("t.yaml").returncode == 0
    finally:
        stop.set()
        watcher.join()
    final = target.read_text()
    assert final.endswith("slow-write padding padding padding")
    assert seen, "the reader never saw the output"
    assert all(s == final for s in seen), "a reader saw a partial output"


def test_failed_task_never_leaves_an_output(project: Project) -> None:
    project.config()
    project.write("t.yaml", """\
        tasks:
          - {id: a, agent: w, prompt: "exit=2", output: a.md}
    """)
    out = project.root / ".aiwg/working"
    assert project.run("t.yaml").returncode == 1
    assert not (out / "a.md").exists()
    assert "# Output of w for a" in (out / "logs/a.failed.out").read_text()
    assert not (out / ".dispatch").exists()  # staging cleaned up


def test_failed_rerun_keeps_the_last_good_output(project: Project) -> None:
    project.config()
    project.write("t.yaml", "tasks:\n  - {id: a, agent: w, prompt: 'v1', output: a.md}\n")
    assert project.run("t.yaml").returncode == 0
    out = project.root / ".aiwg/working/a.md"
    good = out.read_text()
    project.write("t.yaml", "tasks:\n  - {id: a, agent: w, prompt: 'exit=1', output: a.md}\n")
    assert project.run("t.yaml").returncode == 1
    assert out.read_text() == good


def test_directory_output_gets_stdout_file(project: Project) -> None:
    project.config("""
        [agents.writer]
        command = ["/bin/sh", "-c", "echo from-stdout; echo page > \\"$DISPATCH_OUTPUT/page.md\\""]
    """)
    shutil.copy(EXAMPLES / "doc-generation.yaml", project.root / "docs.yaml")
    project.write("t.yaml", """\
        tasks:
          - {id: api, agent: writer, prompt: x, output: api/}
    """)
    assert project.run("t.yaml").returncode == 0
    api = project.root / ".aiwg/working/api"
    assert (api / "page.md").read_text() == "page\n"
    assert (api / "output.md").read_text() == "from-stdout\n"
    # a second run replaces the directory as a whole
    assert project.run("t.yaml").returncode == 0
    assert sorted(p.name for p in api.iterdir()) == ["output.md", "page.md"]
    # the reference's doc-generation example runs unchanged
    assert project.run("docs.yaml").returncode == 0
    for d in ("api", "user-guide", "architecture"):
        assert "Generate" in (project.root / ".aiwg/working" / d / "output.md").read_text()


def test_output_mode_file(project: Project) -> None:
    project.config("""
        [agents.filer]
        command = ["/bin/sh", "-c", "echo noise; echo content > \\"$1\\"", "sh", "{output}"]
        output = "file"

        [agents.lazy]
        command = ["/bin/true"]
        output = "file"
    """)
    project.write("t.yaml", """\
        tasks:
          - {id: a, agent: filer, prompt: x, output: a.md}
          - {id: b, agent: lazy, prompt: x, output: b.md}
    """)
    assert project.run("t.yaml").returncode == 1
    out = project.root / ".aiwg/working"
    assert (out / "a.md").read_text() == "content\n"
    assert "noise" in (out / "logs/a.log").read_text()
    t = {x["id"]: x for x in project.report()["tasks"]}
    assert "did not write its output" in t["b"]["error"]


def test_missing_command_is_a_clear_task_error(project: Project) -> None:
    project.config("""
        [agents.ghost]
        command = ["definitely-not-installed-agent", "--x"]
    """)
    project.write("t.yaml", "tasks:\n  - {id: a, agent: ghost, prompt: x, output: a.md}\n")
    assert project.run("t.yaml").returncode == 1
    err = project.report()["tasks"][0]["error"]
    assert "command 'definitely-not-installed-agent' not found on PATH" in err
    assert "[agents.ghost]" in err


_PEAK_RSS = """\
import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(child.pid, 0)
print(usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_big_output_is_streamed_not_buffered(project: Project) -> None:
    """400 MB of agent output must not grow the dispatcher's memory."""
    project.write("t.yaml", """\
        tasks:
          - id: big
            agent: shell
            prompt: "head -c 400000000 /dev/zero"
            output: big.bin
    """)
    # Measured from a fresh interpreter: a child's ru_maxrss starts at the memory of the
    # process that forked it (Linux keeps the high-water mark across exec), and a pytest
    # worker can hold 300 MB by the time this test runs.
    proc = subprocess.run([sys.executable, "-c", _PEAK_RSS, sys.executable, "-m",
                           "parallel_dispatch", "t.yaml", "-q"],
                          cwd=project.root, env=cli_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (project.root / ".aiwg/working/big.bin").stat().st_size == 400_000_000
    max_rss_mb = int(proc.stdout.split()[-1]) / 1024  # Linux reports KiB
    assert max_rss_mb < 200, f"dispatcher peaked at {max_rss_mb:.0f} MB"


def test_inlined_inputs_cannot_break_out_of_their_fence(project: Project) -> None:
    project.config("""
        [agents.ticks]
        command = ["/bin/sh", "-c", "printf 'a\\\\n````\\\\nb\\\\n'"]
    """)
    project.write("t.yaml", """\
        tasks:
          - {id: up, agent: ticks, prompt: x, output: up.md}
          - {id: down, agent: w, prompt: x, output: down.md, dependencies: [up]}
    """)
    assert project.run("t.yaml").returncode == 0
    assert "````" in (project.root / ".aiwg/working/up.md").read_text()
    down = (project.root / ".aiwg/working/down.md").read_text()
    assert "`````\na\n````\nb\n\n`````" in down


def test_a_huge_failed_output_is_kept_cut_to_16_mib(project: Project) -> None:
    """A failed attempt's partial output is for debugging; it must not hold the disk."""
    project.write("t.yaml", """\
        tasks:
          - {id: big, agent: shell, prompt: "head -c 20000000 /dev/zero; exit 3", output: b.bin}
    """)
    assert project.run("t.yaml").returncode == 1
    kept = project.root / ".aiwg/working/logs/big.failed.out"
    assert kept.stat().st_size == 16 * 2**20
    task = project.report()["tasks"][0]  # type: ignore[index]
    assert "cut to its first 16 MiB" in task["error"]
