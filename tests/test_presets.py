"""Runner presets end to end: the real CLI runs the fake agent CLIs (tests/fakes/bin).

Each test asserts what the tool received (argv, stdin, env, system prompt), what the
task's output holds (only the result text), and what both reports say.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest

from preset_support import FAKE_BIN, AgentProject, make_agent_project
from support import Project, pid_alive, wait_until

BODY = 'You are a careful reviewer.\nQuote "this", a back\\slash, tab\there, ünï, 🚀.'
PROMPT = "Review the login flow"
RESULT = f"RESULT: {PROMPT}\n"


@pytest.fixture
def ap(project: Project, tmp_path: Path) -> AgentProject:
    return make_agent_project(project, tmp_path)


def one_task(ap: AgentProject, agent: str = "reviewer", prompt: str = PROMPT) -> None:
    ap.tasks(f"""\
        tasks:
          - id: a
            agent: {agent}
            prompt: "{prompt}"
            output: a.md
    """)


# --- argv, system prompt, output -----------------------------------------------------


def test_agent_config_overrides_runner_model_and_adds_args(ap: AgentProject) -> None:
    ap.define("reviewer", BODY, model="sonnet")
    ap.config("""
        [runners.claude]
        args = ["--max-turns", "5"]

        [agents.reviewer]
        model = "opus"
        args = ["--no-session-persistence"]
    """)
    one_task(ap)
    assert ap.run("t.yaml").returncode == 0
    argv = ap.calls("claude")[0]["argv"]
    assert argv[argv.index("--model") + 1] == "opus"
    assert argv[-3:] == ["--max-turns", "5", "--no-session-persistence"]


def test_names_fold_and_prompt_travels_on_stdin_only(ap: AgentProject) -> None:
    ap.define("security-architect", BODY)
    evil = "$(touch pwned); `id` && rm -rf / ; 'quoted' \"double\""
    ap.tasks(f"""\
        tasks:
          - id: a
            agent: Security Architect
            prompt: {json.dumps(evil)}
            output: a.md
    """)
    assert ap.run("t.yaml").returncode == 0
    call = ap.calls("claude")[0]
    assert call["stdin"] == evil
    assert evil not in call["argv"]
    assert not (ap.root / "pwned").exists()


def test_dependents_get_inputs_and_directory_outputs_get_output_md(ap: AgentProject) -> None:
    ap.define("reviewer", BODY)
    ap.tasks("""\
        tasks:
          - {id: a, agent: reviewer, prompt: "First", output: a.md}
          - {id: b, agent: reviewer, prompt: "Second", output: b/, dependencies: [a]}
    """)
    assert ap.run("t.yaml").returncode == 0
    second = ap.call_for("Second")
    assert "### a (agent: reviewer)" in second["stdin"]
    assert "RESULT: First" in second["stdin"]
    assert ap.output("b/output.md") == "RESULT: Second\n"


def test_plan_shows_preset_argv_without_running(ap: AgentProject) -> None:
    ap.define("reviewer", BODY, model="sonnet", tools="Read")
    ap.config('[agents.other]\nrunner = "codex"\n')
    ap.tasks("""\
        tasks:
          - {id: a, agent: reviewer, prompt: x, output: a.md}
          - {id: b, agent: other, prompt: y, output: b.md}
    """)
    proc = ap.run("plan", "t.yaml")
    assert proc.returncode == 0, proc.stderr
    assert ("$ claude -p --output-format stream-json --verbose --no-session-persistence "
            "--model sonnet --append-system-prompt '<system prompt: .claude/agents/reviewer.md>' "
            "--tools=Read --allowedTools=Read  (prompt on stdin; runner claude)") in proc.stdout
    assert "$ codex exec --json --skip-git-repo-check" in proc.stdout
    assert "runner claude" in proc.stdout and "runner codex" in proc.stdout
    assert ap.calls() == []


# --- costs and budget ------------------------------------------------------------------


def test_costs_and_tokens_add_up_in_both_reports(ap: AgentProject) -> None:
    ap.define("reviewer", BODY)
    ap.define("coder", BODY)
    ap.config('[agents.coder]\nrunner = "codex"\n')
    ap.tasks("""\
        tasks:
          - {id: a, agent: reviewer, output: a.md,
             prompt: "[fake cost=0.25 input_tokens=100 output_tokens=10 turns=2] A"}
          - {id: b, agent: reviewer, output: b.md,
             prompt: "[fake cost=0.5 input_tokens=200 output_tokens=20 turns=3] B"}
          - {id: c, agent: coder, output: c.md,
             prompt: "[fake input_tokens=1000 output_tokens=5] C"}
          - {id: d, agent: shell, output: d.md, prompt: "echo plain"}
    """)
    assert ap.run("t.yaml").returncode == 0
    data = ap.report()
    s = data["summary"]
    assert s["cost_usd"] == pytest.approx(0.75)
    assert (s["input_tokens"], s["output_tokens"], s["turns"]) == (1300, 35, 6)
    tasks = {t["id"]: t for t in data["tasks"]}
    assert tasks["a"]["cost_usd"] == pytest.approx(0.25) and tasks["a"]["turns"] == 2
    assert tasks["c"]["cost_usd"] is None and tasks["c"]["input_tokens"] == 1000
    assert all(tasks["d"][k] is None for k in ("cost_usd", "input_tokens", "turns"))
    md = ap.report_md()
    assert "## Cost and tokens" in md
    assert "| a | $0.2500 | 100 | 10 | 2 |" in md
    assert "| c | tokens only | 1,000 | 5 | 1 |" in md  # codex: no cost, and no price set
    assert tasks["c"]["cost_source"] == "tokens only" and s["tokens_only_tasks"] == ["c"]
    assert "| **Total** | **$0.7500** | **1,300** | **35** | **6** |" in md
    assert "| d |" not in md.split("## Cost and tokens")[1].split("##")[0]


def test_no_cost_section_when_no_runner_reports(project: Project) -> None:
    project.config()
    project.write("t.yaml", "tasks:\n  - {id: a, agent: x, prompt: hi, output: a.md}\n")
    assert project.run("t.yaml").returncode == 0
    md = (project.root / ".aiwg/working/dispatch-report.md").read_text()
    assert "Cost and tokens" not in md
    assert project.report()["summary"]["cost_usd"] is None  # type: ignore[index]


def test_budget_stops_new_tasks_and_running_ones_finish(ap: AgentProject) -> None:
    ap.define("reviewer", BODY)
    ap.tasks("""\
        tasks:
          - {id: a, agent: reviewer, output: a.md, prompt: "[fake cost=0.5] A"}
          - {id: b, agent: reviewer, output: b.md, prompt: "[fake cost=0.5] B"}
          - {id: c, agent: reviewer, output: c.md, prompt: "[fake cost=0.5] C"}
          - {id: d, agent: reviewer, output: d.md, prompt: "[fake cost=0.5] D",
             dependencies: [c]}
        settings:
          max_parallel: 1
          estimate_cost_usd: 0.3
    """)
    proc = ap.run("t.yaml", "--max-cost", "0.9")
    assert proc.returncode == 1
    data = ap.report()
    status = {t["id"]: t["status"] for t in data["tasks"]}
    ran = sorted(t for t, st in status.items() if st == "succeeded")
    # One at a time, each expected to cost 0.3: 0 + 0.3 fits, 0.5 + 0.3 fits, then 1.0 ≥ 0.9.
    assert len(ran) == 2 and "d" not in ran
    for t in {"a", "b", "c", "d"} - set(ran):
        assert status[t] == "skipped" and "budget reached" in ap.task(t)["reason"]
    assert data["settings"]["max_cost_usd"] == 0.9
    assert data["summary"]["cost_usd"] == pytest.approx(1.0)
    assert len(data["notes"]) == 1 and "$1.0000 spent of max_cost_usd $0.9" in data["notes"][0]
    md = ap.report_md()
    assert "> **Note:** Budget reached: $1.0000 spent of max_cost_usd $0.9" in md
    assert md.index("> **Note:**") < md.index("## Execution Timeline")
    assert len(ap.calls("claude")) == 2


def test_budget_from_task_file_settings_and_parallel_tasks_finish(ap: AgentProject) -> None:
    ap.define("reviewer", BODY)
    ap.tasks("""\
        tasks:
          - {id: a, agent: reviewer, output: a.md, prompt: "[fake cost=1 delay=0.3] A"}
          - {id: b, agent: reviewer, output: b.md, prompt: "[fake cost=1 delay=0.3] B"}
          - {id: c, agent: reviewer, output: c.md, prompt: "C", dependencies: [a, b]}
        settings:
          max_parallel: 2
          max_cost_usd: 0.5
          estimate_cost_usd: 0.25
    """)
    ap.run("t.yaml")
    status = {t["id"]: t["status"] for t in ap.report()["tasks"]}
    assert status == {"a": "succeeded", "b": "succeeded", "c": "skipped"}


# --- errors ---------------------------------------------------------------------------


def test_cli_not_on_path_names_runner_and_fix(project: Project, tmp_path: Path) -> None:
    only_claude = tmp_path / "bin"
    only_claude.mkdir()
    (only_claude / "claude").symlink_to(FAKE_BIN / "claude")
    ap = make_agent_project(project, tmp_path, path=f"{only_claude}{os.pathsep}/usr/bin:/bin")
    ap.define("reviewer", BODY)
    ap.config('[agents.coder]\nrunner = "gemini"\n')
    ap.tasks("""\
        tasks:
          - {id: a, agent: coder, output: a.md, prompt: A}
          - {id: b, agent: reviewer, output: b.md, prompt: B}
    """)
    assert ap.run("t.yaml").returncode == 1
    a = ap.task("a")
    assert a["status"] == "failed"
    assert a["error"].startswith("gemini runner: 'gemini' not found on PATH")
    assert "npm install -g @google/gemini-cli" in a["error"]
    assert ap.task("b")["status"] == "succeeded"


def test_hanging_cli_times_out_and_its_process_dies(ap: AgentProject) -> None:
    ap.define("reviewer", BODY)
    ap.tasks("""\
        tasks:
          - {id: a, agent: reviewer, output: a.md, prompt: "[fake mode=hang_hard] A",
             timeout: 1000}
          - {id: b, agent: reviewer, output: b.md, prompt: "B"}
    """)
    assert ap.run("t.yaml").returncode == 1
    assert ap.task("a")["status"] == "timeout"
    assert ap.task("b")["status"] == "succeeded"
    pid = ap.call_for("[fake mode=hang_hard]")["pid"]
    assert wait_until(lambda: not pid_alive(pid), timeout=10)


# --- resolution and validation -------------------------------------------------------


def test_unknown_agent_lists_definitions_with_did_you_mean(ap: AgentProject) -> None:
    ap.define("security-architect", BODY)
    ap.define("test-architect", BODY, folder=".aiwg/agents")
    one_task(ap, agent="securty-architect")
    proc = ap.run("validate", "t.yaml")
    assert proc.returncode == 2
    assert "unknown agent 'securty-architect'; did you mean 'security-architect'?" in proc.stderr
    assert "known agents: security-architect, shell, test-architect" in proc.stderr
    assert ap.calls() == []


def test_definition_without_any_runner_says_how_to_pick_one(
        project: Project, tmp_path: Path) -> None:
    ap = make_agent_project(project, tmp_path, path="/usr/bin:/bin")  # no claude on PATH
    ap.define("reviewer", BODY)
    one_task(ap)
    proc = ap.run("validate", "t.yaml")
    assert proc.returncode == 2
    assert "agent 'reviewer' is defined in .claude/agents/reviewer.md but no runner" in proc.stderr
    assert '[defaults]' in proc.stderr and 'runner = "claude"' in proc.stderr


def test_home_definitions_resolve_and_project_ones_win(ap: AgentProject) -> None:
    ap.define("reviewer", "home body", folder=str(ap.home / ".claude/agents"))
    ap.define("helper", "home helper", folder=str(ap.home / ".claude/agents"))
    ap.define("reviewer", "project body")
    ap.tasks("""\
        tasks:
          - {id: a, agent: reviewer, output: a.md, prompt: A}
          - {id: b, agent: helper, output: b.md, prompt: B}
    """)
    assert ap.run("t.yaml").returncode == 0
    assert "project body" in ap.call_for("A")["argv"]
    assert "home helper" in ap.call_for("B")["argv"]


def test_star_runner_requires_a_definition(ap: AgentProject) -> None:
    ap.define("reviewer", BODY)
    ap.config('[agents."*"]\nrunner = "llm"\nmodel = "m1"\n')
    ap.tasks("""\
        tasks:
          - {id: a, agent: reviewer, output: a.md, prompt: A}
          - {id: b, agent: nobody, output: b.md, prompt: B}
    """)
    proc = ap.run("validate", "t.yaml")
    assert proc.returncode == 2
    assert "unknown agent 'nobody'" in proc.stderr and "'reviewer'" not in proc.stderr


@pytest.mark.parametrize(("toml", "needle"), [
    ('[agents.x]\nrunner = "claud"\n', "agents.x.runner"),
    ('[agents.x]\ncommand = ["a"]\nmodel = "m"\n', "only runner presets use model"),
    ('[agents.x]\nrunner = "claude"\nprompt = "arg"\n', "only command agents use prompt"),
    ('[runners.nope]\nmodel = "m"\n', "runners.nope"),
    ('[defaults]\nrunner = "gpt"\n', "defaults.runner"),
    ('[defaults]\nmax_cost_usd = 0\n', "defaults.max_cost_usd"),
])
def test_config_mistakes_are_validation_errors(ap: AgentProject, toml: str, needle: str) -> None:
    ap.config(toml)
    one_task(ap, agent="shell", prompt="echo hi")
    proc = ap.run("validate", "t.yaml")
    assert proc.returncode == 2
    assert needle in proc.stderr


def test_openai_runner_without_model_is_a_validation_error(ap: AgentProject) -> None:
    ap.define("reviewer", BODY, model="sonnet")
    ap.config('[defaults]\nrunner = "openai"\n')
    one_task(ap)
    proc = ap.run("validate", "t.yaml")
    assert proc.returncode == 2
    assert "openai runner, which needs a model" in proc.stderr


def test_toml_written_by_init_is_accepted_by_validation(ap: AgentProject) -> None:
    proc = ap.run("init")
    assert proc.returncode == 0, proc.stderr
    data = tomllib.loads((ap.root / ".aiwg/dispatch.toml").read_text())
    assert data["defaults"]["runner"] == "claude"  # the fake claude is on PATH
    assert ap.run("validate", ".aiwg/tasks/example.yaml").returncode == 0


def test_architecture_review_example_runs_on_claude_code_agents(ap: AgentProject) -> None:
    """README's walkthrough: the reference example against .claude/agents/."""
    examples = Path(__file__).resolve().parent.parent / "examples"
    agents = ap.root / ".claude/agents"
    agents.mkdir(parents=True)
    for src in (examples / "claude-agents").glob("*.md"):
        (agents / src.name).write_text(src.read_text())
    (ap.root / "tasks.yaml").write_text((examples / "architecture-review.yaml").read_text())
    proc = ap.run("tasks.yaml")
    assert proc.returncode == 0, proc.stderr
    out = ap.root / ".aiwg/working/reviews"
    assert (out / "final-review.md").read_text() == \
        "RESULT: Synthesize all reviews into final assessment\n"
    synthesis = ap.call_for("Synthesize all reviews")
    assert synthesis["argv"][synthesis["argv"].index("--model") + 1] == "opus"
    for dep in ("security-review", "test-review", "ops-review"):
        assert f"### {dep} (agent: " in synthesis["stdin"]
    security = ap.call_for("Review architecture at")
    body = (agents / "security-architect.md").read_text().split("---\n", 2)[2].strip()
    assert security["argv"][security["argv"].index("--append-system-prompt") + 1] == body
    assert security["argv"][-2:] == ["--tools=Read,Grep,Glob", "--allowedTools=Read,Grep,Glob"]
    report = json.loads((out / "dispatch-report.json").read_text())
    assert report["summary"]["cost_usd"] == pytest.approx(4 * 0.0123)
    assert "## Cost and tokens" in (out / "dispatch-report.md").read_text()
