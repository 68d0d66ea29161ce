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


def test_claude_is_the_default_runner_and_gets_definition_body_model_and_tools(
        ap: AgentProject) -> None:
    ap.define("reviewer", BODY, model="sonnet", tools="Read, Grep, Bash(git log:*)")
    one_task(ap)
    proc = ap.run("t.yaml")
    assert proc.returncode == 0, proc.stderr
    call = ap.calls("claude")[0]
    assert call["argv"] == ["-p", "--output-format", "json", "--model", "sonnet",
                            "--append-system-prompt", BODY,
                            "--allowedTools", "Read,Grep,Bash(git log:*)"]
    assert call["stdin"] == PROMPT
    assert call["env"]["DISPATCH_TASK_ID"] == "a"
    assert ap.output("a.md") == RESULT  # only the result, not the JSON payload
    task = ap.task("a")
    assert task["cost_usd"] == pytest.approx(0.0123)
    assert (task["input_tokens"], task["output_tokens"], task["turns"]) == (1200, 345, 1)
    assert task["session_id"]


def test_codex_gets_developer_instructions_as_a_toml_string(ap: AgentProject) -> None:
    ap.define("reviewer", BODY + "\x7f", model="sonnet")
    ap.config('[defaults]\nrunner = "codex"\n')
    one_task(ap)
    proc = ap.run("t.yaml")
    assert proc.returncode == 0, proc.stderr
    call = ap.calls("codex")[0]
    argv = call["argv"]
    assert argv[:5] == ["exec", "--json", "--skip-git-repo-check", "--sandbox", "read-only"]
    assert argv[5] == "-o" and argv[6].endswith("last-message.txt")
    assert argv[7] == "-c" and argv[-1] == "-"
    assert "-m" not in argv  # `sonnet` is a Claude model: not passed to codex
    assert call["config"]["developer_instructions"] == BODY + "\x7f"  # parsed back as TOML
    assert call["stdin"] == PROMPT
    assert ap.output("a.md") == RESULT
    task = ap.task("a")
    assert task["cost_usd"] is None  # codex reports no cost
    assert (task["input_tokens"], task["output_tokens"], task["turns"]) == (1200, 345, 1)


def test_gemini_gets_the_body_through_gemini_system_md(ap: AgentProject) -> None:
    ap.define("reviewer", BODY, model="gemini-2.5-flash")
    ap.config('[defaults]\nrunner = "gemini"\n')
    one_task(ap)
    proc = ap.run("t.yaml")
    assert proc.returncode == 0, proc.stderr
    call = ap.calls("gemini")[0]
    assert call["argv"] == ["--output-format", "json", "-m", "gemini-2.5-flash"]
    assert call["stdin"] == PROMPT
    assert call["system_md"] == BODY
    path = call["system_md_path"]
    assert path == path.lower() and not Path(path).exists()  # temp file, removed afterwards
    assert ap.output("a.md") == RESULT
    assert (ap.task("a")["input_tokens"], ap.task("a")["output_tokens"]) == (1200, 345)


def test_opencode_puts_a_foreign_definition_in_front_of_the_prompt(ap: AgentProject) -> None:
    ap.define("reviewer", BODY, model="sonnet")
    ap.config('[defaults]\nrunner = "opencode"\n')
    one_task(ap)
    assert ap.run("t.yaml").returncode == 0
    call = ap.calls("opencode")[0]
    assert call["argv"] == ["run", "--format", "json"]
    assert call["stdin"] == f"{BODY}\n\n---\n\n{PROMPT}"
    assert ap.output("a.md") == "RESULT: You are a careful reviewer.\n"
    task = ap.task("a")
    assert task["cost_usd"] == pytest.approx(0.0123) and task["turns"] == 1


def test_opencode_runs_its_own_agents_by_name(ap: AgentProject) -> None:
    ap.define("reviewer", BODY, folder=".opencode/agent", model="anthropic/claude-sonnet-4-5",
              description="Reviews")
    ap.config('[defaults]\nrunner = "opencode"\n')
    one_task(ap)
    assert ap.run("t.yaml").returncode == 0
    call = ap.calls("opencode")[0]
    assert call["argv"] == ["run", "--format", "json", "--agent", "reviewer"]
    assert call["agent_status"] == "found"
    assert call["stdin"] == PROMPT
    assert ap.output("a.md") == RESULT


def test_llm_gets_system_and_model_and_reports_tokens(ap: AgentProject) -> None:
    ap.define("reviewer", BODY)
    ap.config('[defaults]\nrunner = "llm"\n\n[runners.llm]\nmodel = "gpt-4o-mini"\n')
    one_task(ap)
    assert ap.run("t.yaml").returncode == 0
    call = ap.calls("llm")[0]
    assert call["argv"] == ["-m", "gpt-4o-mini", "-s", BODY, "--no-stream", "-u", "-n"]
    assert call["stdin"] == PROMPT
    assert ap.output("a.md") == RESULT
    assert (ap.task("a")["input_tokens"], ap.task("a")["output_tokens"]) == (1200, 345)


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
    assert ("$ claude -p --output-format json --model sonnet --append-system-prompt "
            "'<system prompt: .claude/agents/reviewer.md>' --allowedTools Read") in proc.stdout
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
    assert "| c | – | 1,000 | 5 | 1 |" in md
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
    """)
    proc = ap.run("t.yaml", "--max-cost", "0.9")
    assert proc.returncode == 1
    data = ap.report()
    status = {t["id"]: t["status"] for t in data["tasks"]}
    ran = sorted(t for t, st in status.items() if st == "succeeded")
    assert len(ran) == 2 and "d" not in ran  # one at a time: 0.5, then 1.0 ≥ 0.9
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
    """)
    ap.run("t.yaml")
    status = {t["id"]: t["status"] for t in ap.report()["tasks"]}
    assert status == {"a": "succeeded", "b": "succeeded", "c": "skipped"}


# --- errors ---------------------------------------------------------------------------


def test_claude_error_payload_with_exit_0_fails_the_task_and_the_run_goes_on(
        ap: AgentProject) -> None:
    ap.define("reviewer", BODY)
    ap.tasks("""\
        tasks:
          - {id: a, agent: reviewer, output: a.md, prompt: "[fake mode=error turns=7] A"}
          - {id: b, agent: reviewer, output: b.md, prompt: "[fake mode=error error_kind=api] B"}
          - {id: c, agent: reviewer, output: c.md, prompt: "C"}
          - {id: d, agent: reviewer, output: d.md, prompt: "D", dependencies: [a]}
    """)
    assert ap.run("t.yaml").returncode == 1
    a, b = ap.task("a"), ap.task("b")
    assert a["status"] == "failed" and a["exit_code"] == 0
    assert a["error"].startswith("claude runner: Reached maximum number of turns (7)")
    assert "error_max_turns" in a["error"] and "--max-turns" in a["error"]
    assert a["cost_usd"] == pytest.approx(0.0123)  # a failed call still cost money
    assert b["status"] == "failed" and "API Error: 529" in b["error"]
    assert ap.task("c")["status"] == "succeeded"
    assert ap.task("d")["status"] == "skipped"
    assert not (ap.root / ".aiwg/working/a.md").exists()
    assert "claude runner: Reached maximum number of turns" in ap.report_md()


@pytest.mark.parametrize(("runner", "needle", "fix"), [
    ("claude", "Invalid API key", "/login"),
    ("codex", "401 Unauthorized", "codex login"),
    ("gemini", "Please set an Auth method", "GEMINI_API_KEY"),
    ("opencode", "API key is missing or invalid", "opencode auth login"),
    ("llm", "No key found", "llm keys set"),
])
def test_bad_credentials_are_clear_and_not_retried(
        ap: AgentProject, runner: str, needle: str, fix: str) -> None:
    ap.define("reviewer", BODY)
    ap.config(f'[defaults]\nrunner = "{runner}"\non_failure = "retry"\nretry_backoff = 0\n')
    one_task(ap, prompt="[fake mode=exit] A")
    assert ap.run("t.yaml").returncode == 1
    task = ap.task("a")
    assert task["status"] == "failed"
    assert task["error"].startswith(f"{runner} runner: ")
    assert needle in task["error"] and fix in task["error"]
    assert task["attempts"] == 1  # retrying cannot fix credentials


@pytest.mark.parametrize(("runner", "needle"), [
    ("codex", "You've hit your usage limit"),
    ("gemini", "Resource has been exhausted"),
    ("opencode", "APIError: Overloaded"),
])
def test_error_payload_with_exit_0_per_tool(ap: AgentProject, runner: str, needle: str) -> None:
    ap.define("reviewer", BODY)
    ap.config(f'[defaults]\nrunner = "{runner}"\n')
    one_task(ap, prompt="[fake mode=error] A")
    ap.run("t.yaml")
    task = ap.task("a")
    assert task["status"] == "failed" and task["exit_code"] == 0
    assert task["error"].startswith(f"{runner} runner: ") and needle in task["error"]


def test_transient_errors_are_retried(ap: AgentProject) -> None:
    ap.define("reviewer", BODY)
    ap.config('[defaults]\nrunner = "opencode"\n')
    ap.tasks("""\
        tasks:
          - {id: a, agent: reviewer, output: a.md, prompt: "[fake mode=error] A", retries: 1}
        settings: {retry_backoff: 0}
    """)
    ap.run("t.yaml")
    assert ap.task("a")["attempts"] == 2  # opencode said isRetryable: true


@pytest.mark.parametrize(("code", "needle"), [
    (41, "authentication failed (exit code 41)"),
    (53, "turn limit reached (exit code 53)"),
    (52, "configuration error (exit code 52)"),
])
def test_gemini_exit_codes_map_to_fixes(ap: AgentProject, code: int, needle: str) -> None:
    ap.define("reviewer", BODY)
    ap.config('[defaults]\nrunner = "gemini"\n')
    one_task(ap, prompt=f"[fake mode=exit exit_code={code}] A")
    ap.run("t.yaml")
    task = ap.task("a")
    assert task["exit_code"] == code and needle in task["error"]


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


def test_failed_call_keeps_payload_in_log(ap: AgentProject) -> None:
    ap.define("reviewer", BODY)
    one_task(ap, prompt="[fake mode=error] A")
    ap.run("t.yaml")
    log = (ap.root / ".aiwg/working/logs/a.log").read_text()
    assert "error: claude runner:" in log
    assert '"subtype": "error_max_turns"' in log or '"subtype":"error_max_turns"' in log


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


def test_long_system_prompt_avoids_argv_limits(ap: AgentProject) -> None:
    body = "Rule: be precise.\n" * 8000  # ~144 KB: over Linux's 128 KiB per argument
    ap.define("reviewer", body.strip())
    one_task(ap)
    proc = ap.run("t.yaml")
    assert proc.returncode == 0, proc.stderr
    argv = ap.calls("claude")[0]["argv"]
    assert "--append-system-prompt-file" in argv and "--append-system-prompt" not in argv
    assert ap.output("a.md") == RESULT


def test_toml_written_by_init_is_accepted_by_validation(ap: AgentProject) -> None:
    proc = ap.run("init")
    assert proc.returncode == 0, proc.stderr
    data = tomllib.loads((ap.root / ".aiwg/dispatch.toml").read_text())
    assert data["defaults"]["runner"] == "claude"  # the fake claude is on PATH
    assert ap.run("validate", ".aiwg/tasks/example.yaml").returncode == 0


def test_architecture_review_example_runs_on_claude_code_agents(ap: AgentProject) -> None:
    """docs/runners.md's walkthrough: the reference example against .claude/agents/."""
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
    assert security["argv"][-2:] == ["--allowedTools", "Read,Grep,Glob"]
    report = json.loads((out / "dispatch-report.json").read_text())
    assert report["summary"]["cost_usd"] == pytest.approx(4 * 0.0123)
    assert "## Cost and tokens" in (out / "dispatch-report.md").read_text()
