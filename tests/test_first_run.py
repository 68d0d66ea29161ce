"""First-run friction (issue 8, Deliver §5, and the discovery bullet of §2), each case
through the real `parallel-dispatch` CLI run as a subprocess.

Every test here failed on the code before these fixes (checked by running them with
PYTHONPATH pointing at the previous commit's package).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from preset_support import AgentProject, make_agent_project
from support import Project, cli_env, pid_alive, wait_until
from warmcli import run_cli

AIWG = Path(__file__).parent / "fixtures" / "aiwg-agents"
"""Unmodified copies of AIWG's agent-template.md, openai-compat.md (no frontmatter) and
security-architect.md; where they come from is in its SOURCE file."""


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The real CLI in `cwd`, forked warm (warmcli.py)."""
    return run_cli(args, cwd, env or cli_env(), timeout)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture
def aiwg(tmp_path: Path) -> AgentProject:
    """A project whose `.claude/agents/` holds the AIWG files, with the fake claude on PATH."""
    root = tmp_path / "proj"
    (root / ".aiwg").mkdir(parents=True)
    folder = root / ".claude" / "agents"
    folder.mkdir(parents=True)
    for md in AIWG.glob("*.md"):
        shutil.copy(md, folder / md.name)
    return make_agent_project(Project(root), tmp_path)


# --- §2: templates and files without frontmatter are skipped, with a note -------------------


def test_agents_skips_aiwg_template_and_notes(aiwg: AgentProject) -> None:
    proc = aiwg.run("agents")
    assert proc.returncode == 0, proc.stderr
    names = [line.split("  ")[0] for line in proc.stdout.splitlines()[1:] if line[:1].isalnum()]
    assert "Security Architect" in names
    assert "<AGENT_NAME>" not in proc.stdout.split("\n  note:")[0]
    assert not any(n.startswith("<") for n in names)
    assert ("note: .claude/agents/agent-template.md: skipped: template "
            "(placeholder name '<AGENT_NAME>')") in proc.stdout
    assert ("note: .claude/agents/openai-compat.md: skipped: no frontmatter "
            "(not an agent definition)") in proc.stdout
    assert "error" not in proc.stdout

    listed = {row["name"] for row in json.loads(aiwg.run("agents", "--json").stdout)}
    assert listed == {"Security Architect", "shell"}


def test_doctor_notes_skipped_files_and_exits_0(aiwg: AgentProject) -> None:
    proc = aiwg.run("doctor")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "✓ Security Architect  [claude opus]  .claude/agents/security-architect.md" in out
    assert "skipped: template (placeholder name '<AGENT_NAME>')" in out
    assert "openai-compat.md: skipped: no frontmatter" in out
    assert "no problems found" in out
    assert "<AGENT_NAME>  [" not in out


def test_a_task_naming_a_skipped_file_says_why(aiwg: AgentProject) -> None:
    aiwg.tasks("tasks:\n  - {id: a, agent: openai-compat, prompt: x, output: a.md}\n")
    proc = aiwg.run("validate", "t.yaml")
    assert proc.returncode == 2
    assert "unknown agent 'openai-compat'" in proc.stderr
    assert "openai-compat.md is not an agent definition (skipped: no frontmatter" in proc.stderr


def test_a_broken_definition_is_still_a_problem(aiwg: AgentProject) -> None:
    """Skipping is for files that are not agents; a definition with bad YAML still counts."""
    write(aiwg.root / ".claude/agents/broken.md", "---\nname: [x\n---\nbody\n")
    proc = aiwg.run("doctor")
    assert proc.returncode == 1
    assert "broken.md:2: error: invalid YAML frontmatter" in proc.stdout
    assert "1 problem found" in proc.stdout


# --- §5: the project root ---------------------------------------------------------------------


@pytest.mark.parametrize("marker", [".claude", ".git"])
def test_validate_from_a_subfolder_finds_the_project(tmp_path: Path, marker: str) -> None:
    root = tmp_path / "repo"
    (root / marker).mkdir(parents=True)
    write(root / ".claude/agents/reviewer.md", "---\nname: reviewer\n---\nReview.\n")
    write(root / "tasks.yaml", """\
        tasks:
          - {id: r, agent: reviewer, prompt: x, output: r.md}
          - {id: s, agent: shell, prompt: 'echo hi', output: s.txt}
    """)
    sub = root / "src" / "deep"
    sub.mkdir(parents=True)
    env = make_agent_project(Project(root), tmp_path).env  # the fake claude on PATH
    proc = cli("validate", "../../tasks.yaml", cwd=sub, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "2 tasks in 1 wave" in proc.stdout
    plan = cli("plan", "../../tasks.yaml", cwd=sub, env=env)
    assert f"project root: {root}\n" in plan.stdout
    assert f"output dir:   {root}/.aiwg/working\n" in plan.stdout
    assert not (sub / ".aiwg").exists()


def test_aiwg_beats_a_nearer_git(tmp_path: Path) -> None:
    mono = tmp_path / "mono"
    (mono / ".aiwg").mkdir(parents=True)
    (mono / "pkg" / ".git").mkdir(parents=True)
    write(mono / "pkg/t.yaml", "tasks:\n  - {id: a, agent: shell, prompt: 'echo hi', output: a}\n")
    proc = cli("t.yaml", "-q", cwd=mono / "pkg")
    assert proc.returncode == 0, proc.stderr
    assert (mono / ".aiwg/working/a").read_text() == "hi\n"


def test_home_folders_do_not_make_home_the_project(tmp_path: Path) -> None:
    """`~/.claude/` is Claude Code's user folder, `~/.aiwg/` AIWG's user data, `~/.git` a
    dotfiles repository: none of them is a project marker."""
    home = tmp_path / "home"
    for folder in (".claude/agents", ".aiwg/global-learning", ".git"):
        (home / folder).mkdir(parents=True)
    work = home / "notes"
    write(work / "t.yaml", "tasks:\n  - {id: a, agent: shell, prompt: 'echo hi', output: a}\n")
    env = {**cli_env(), "HOME": str(home)}
    proc = cli("t.yaml", "-q", cwd=work, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (work / ".aiwg/working/a").is_file() and not (home / ".aiwg/working").exists()


def test_watch_without_a_project_dir_serves_the_project_around_cwd(project: Project) -> None:
    project.write(".aiwg/tasks/s.yaml", "tasks:\n  - {id: a, agent: shell, prompt: 'echo a', "
                                        "output: a.txt}\n")
    sub = project.root / "src"
    sub.mkdir()
    with open(project.root / "daemon.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "parallel_dispatch", "watch"], cwd=sub,
                                env=cli_env(), stdout=subprocess.DEVNULL, stderr=log)
    try:
        done = project.root / ".aiwg/working/s/a.txt"
        assert wait_until(done.exists, 60), (project.root / "daemon.log").read_text()
        assert not (sub / ".aiwg").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


# --- §5: the unknown-agent error ------------------------------------------------------------


def test_unknown_agent_points_to_examples_and_init(tmp_path: Path) -> None:
    write(tmp_path / "t.yaml", "tasks:\n  - {id: a, agent: security-architect, prompt: x, "
                               "output: a.md}\n")
    proc = cli("validate", "t.yaml", cwd=tmp_path)
    assert proc.returncode == 2
    assert "unknown agent 'security-architect'" in proc.stderr
    assert "examples/claude-agents/" in proc.stderr
    assert "`parallel-dispatch init`" in proc.stderr


# --- §5: status finds the CLI's runs -----------------------------------------------------------


def test_status_finds_runs_made_with_the_cli(project: Project) -> None:
    project.write(".aiwg/tasks/s.yaml", "tasks:\n  - {id: a, agent: shell, prompt: 'echo a', "
                                        "output: a.txt}\n")
    assert project.run(".aiwg/tasks/s.yaml", "-q").returncode == 0
    out = project.run("status").stdout
    block = out.split("s  (.aiwg/tasks/s.yaml)")[1]
    assert "last run: succeeded at" in block and "(1 succeeded)" in block
    assert "output: .aiwg/working\n" in block + "\n"

    sub = project.root / "src"
    sub.mkdir()
    project.write("tasks.yaml", """\
        tasks:
          - {id: b, agent: shell, prompt: 'echo b', output: b.txt}
          - {id: c, agent: shell, prompt: 'exit 3', output: c.txt}
    """)
    assert cli("../tasks.yaml", "-q", cwd=sub).returncode == 1
    out = cli("status", cwd=sub).stdout  # no PROJECT_DIR: the project around src/
    assert "Other task files (run from the command line):\n\ntasks.yaml\n" in out
    assert re.search(r"tasks\.yaml\n  last run: failed at \S+ \(1 succeeded, 1 failed\) — run ",
                     out), out


def test_status_shows_a_cli_run_in_progress_and_one_that_was_killed(project: Project) -> None:
    pidfile = project.root / "agent.pid"
    project.write("long.yaml", f"""\
        tasks:
          - {{id: quick, agent: shell, prompt: 'echo q', output: q.txt}}
          - {{id: slow, agent: shell, prompt: 'echo $$ > {pidfile}; exec sleep 120', output: s.txt}}
    """)
    proc = subprocess.Popen([sys.executable, "-m", "parallel_dispatch", "long.yaml", "-q"],
                            cwd=project.root, env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: pidfile.exists() and pidfile.read_text().strip() != "", 60)
        assert wait_until(lambda: (project.root / ".aiwg/working/q.txt").exists(), 60)
        out = project.run("status").stdout
        assert f"long.yaml\n  running now (pid {proc.pid}, started " in out, out
        assert "1 task finished so far" in out
        proc.kill()  # kill -9: the dispatcher cannot record anything
        proc.wait(timeout=30)
        out = project.run("status").stdout
        assert "last run: did not finish — started" in out
        assert f"its dispatcher (pid {proc.pid}) is gone" in out
    finally:
        proc.kill()
        agent = int(pidfile.read_text()) if pidfile.exists() else None
        if agent is not None and pid_alive(agent):
            os.killpg(agent, signal.SIGKILL)  # its own group: the dispatcher made it so


# --- §5: output that ends early, plurals, help, quotes, efficiency -------------------------------


def _big_file(root: Path, n: int = 3000) -> Path:
    lines = ["tasks:"] + [f"  - {{id: t{i}, agent: shell, prompt: 'echo {i}', output: o{i}.txt}}"
                          for i in range(n)]
    return write(root / "big.yaml", "\n".join(lines) + "\n")


@pytest.mark.parametrize("args", [["plan", "big.yaml"], ["big.yaml", "--dry-run"],
                                  ["validate", ".aiwg/tasks/*.yaml"], ["status"], ["agents"]])
def test_output_into_head_ends_quietly(project: Project, args: list[str]) -> None:
    _big_file(project.root)
    long = "x" * 150  # so that `status` and `agents` print well over a pipe's 64 KiB
    for i in range(400):
        if args[0] in ("status", "validate"):
            project.write(f".aiwg/tasks/f{i:03}-{long}.yaml", "tasks:\n  - {id: a, "
                          "agent: shell, prompt: x, output: a}\n")
        if args == ["agents"]:
            project.write(f".claude/agents/a{i:03}-{long}.md", "---\ndescription: d\n---\nb\n")
    cmd = " ".join([f"'{sys.executable}'", "-m", "parallel_dispatch", *args])
    proc = subprocess.run(["bash", "-c", f"{cmd} 2>err.txt | head -n 2; "
                                         "echo ${PIPESTATUS[0]} > rc.txt"],
                          cwd=project.root, env=cli_env(), capture_output=True, text=True,
                          timeout=300, check=False)
    assert len(proc.stdout.splitlines()) == 2
    err = (project.root / "err.txt").read_text()
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert (project.root / "rc.txt").read_text().strip() == "0"


def test_a_run_whose_progress_reader_goes_away_still_finishes(project: Project) -> None:
    tasks = ["tasks:", "  - {id: first, agent: shell, prompt: 'sleep 1; echo f', output: f.txt}"]
    tasks += [f"  - {{id: t{i}, agent: shell, prompt: 'echo {i}', output: o{i}.txt, "
              f"dependencies: [first]}}" for i in range(30)]
    project.write("t.yaml", "\n".join(tasks) + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "parallel_dispatch", "t.yaml"],
                            cwd=project.root, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None and proc.stdout is not None
    assert proc.stderr.readline().startswith("[")  # the first progress line, then hang up
    proc.stderr.close()
    out = proc.stdout.read()
    assert proc.wait(timeout=120) == 0
    assert "report: " in out
    report = project.report()
    assert report["summary"]["succeeded"] == 31  # type: ignore[index]
    assert (project.root / ".aiwg/working/o29.txt").read_text() == "29\n"


def test_counts_read_as_english(project: Project) -> None:
    project.write("one.yaml", "tasks:\n  - {id: a, agent: shell, prompt: x, output: a}\n")
    project.write("two.yaml", """\
        tasks:
          - {id: a, agent: shell, prompt: x, output: a}
          - {id: b, agent: shell, prompt: x, output: b, dependencies: [a]}
    """)
    proc = project.run("validate", "one.yaml", "two.yaml")
    assert "one.yaml: OK — 1 task in 1 wave\n" in proc.stdout
    assert "two.yaml: OK — 2 tasks in 2 waves\n" in proc.stdout
    assert "  1 task in 1 wave · max_parallel" in project.run("plan", "one.yaml").stdout
    project.write(".aiwg/tasks/bad.yaml", "tasks:\n  - {id: a, agent: shell, prompt: x}\n")
    assert "invalid: 1 error, first: " in project.run("status").stdout


def _help_entries(text: str) -> list[tuple[str, bool]]:
    """(option, has help) for each argument of an argparse --help text."""
    entries: list[tuple[str, bool]] = []
    lines = text.splitlines()
    in_args = False
    for i, line in enumerate(lines):
        if line.endswith(":") and not line.startswith(" "):
            in_args = line in ("options:", "positional arguments:", "optional arguments:")
            continue
        if not in_args or not line.startswith("  ") or line.startswith("   "):
            continue
        name, _, rest = line.strip().partition("  ")
        follows = i + 1 < len(lines) and lines[i + 1].startswith("    ") and \
            not lines[i + 1].strip().startswith("-")
        entries.append((name, bool(rest.strip()) or follows))
    return entries


def test_every_option_has_help_text(tmp_path: Path) -> None:
    top = cli("--help", cwd=tmp_path).stdout
    commands = re.search(r"\{([a-z,]+)\}", top)
    assert commands is not None
    assert _help_entries(top) and all(ok for _opt, ok in _help_entries(top))
    names = [c for c in commands.group(1).split(",") if c != "action"]  # action: action.py
    assert {"run", "validate", "plan", "status", "watch", "agents", "doctor"} <= set(names)
    missing = []
    for name in names:
        proc = cli(name, "--help", cwd=tmp_path)
        assert proc.returncode == 0, (name, proc.stderr)
        assert proc.stdout.startswith(f"usage: parallel-dispatch {name} "), proc.stdout
        entries = _help_entries(proc.stdout)
        assert entries, name
        missing += [f"{name} {opt}" for opt, ok in entries if not ok]
    assert not missing, missing


@pytest.mark.parametrize("text, where, quote", [
    # block style, the file ends inside the string
    ("tasks:\n  - id: a\n    agent: shell\n    prompt: \"echo hi\n    output: a.md\n"
     "  - id: b\n    agent: shell\n    prompt: x\n    output: b.md\n", ":4:13:", '"'),
    # flow style, the file ends inside the string
    ("tasks:\n  - {id: a, agent: shell, prompt: 'echo hi, output: a.md}\n"
     "  - {id: b, agent: shell, prompt: x, output: b.md}\n", ":2:35:", "'"),
    # a later quote closes it by accident, and the next line no longer parses
    ("tasks:\n  - id: a\n    agent: shell\n    prompt: \"echo hi\n    output: a.md\n"
     "  - id: b\n    agent: \"shell\"\n    output: b.md\n", ":4:13:", '"'),
    ("tasks:\n  - {id: a, agent: shell, prompt: 'echo hi, output: a.md}\n"
     "  - {id: b, agent: shell, prompt: 'x', output: b.md}\n", ":2:35:", "'"),
])
def test_unclosed_quote_is_reported_where_it_opens(project: Project, text: str, where: str,
                                                   quote: str) -> None:
    (project.root / "t.yaml").write_text(text)
    proc = project.run("validate", "t.yaml")
    assert proc.returncode == 2
    first = proc.stderr.splitlines()[0]
    assert first.startswith(f"t.yaml{where} error: invalid YAML: this {quote} quote is never "
                            "closed"), first
    assert f"add the closing {quote}" in first


def test_interrupted_run_claims_no_efficiency(project: Project) -> None:
    pids = [project.root / f"p{i}.pid" for i in range(2)]
    project.write("t.yaml", f"""\
        tasks:
          - {{id: h0, agent: shell, prompt: 'echo $$ > {pids[0]}; exec sleep 120', output: a}}
          - {{id: h1, agent: shell, prompt: 'echo $$ > {pids[1]}; exec sleep 120', output: b}}
        settings: {{max_parallel: 2}}
    """)
    proc = subprocess.Popen([sys.executable, "-m", "parallel_dispatch", "t.yaml", "-q"],
                            cwd=project.root, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert wait_until(lambda: all(p.exists() and p.read_text().strip() for p in pids), 60)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    report = project.report()
    assert report["status"] == "interrupted"
    assert report["summary"]["parallel_efficiency"] is None  # type: ignore[index]
    md = (project.root / ".aiwg/working/dispatch-report.md").read_text()
    assert "- **Parallel Efficiency**: – (run interrupted: not measured)\n" in md
