"""Contract: the real Claude Code (pinned in tests/clients/versions.txt) run by
`parallel-dispatch` end to end against a local Anthropic Messages API stub
(tests/stubs/anthropic.py).

Claude Code is pointed at the stub with `ANTHROPIC_BASE_URL` and `ANTHROPIC_API_KEY`, and
kept off the network otherwise (`CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC` and friends,
see `stubs.anthropic.env`).  Most cases run with claude's own retry defaults (10 API
retries, about three minutes), so they show what a user of that version gets: the
stream-json events, exit codes, and how the dispatcher names the outcome.  Where the
case is what claude prints once it gives up, `CLAUDE_CODE_MAX_RETRIES` shortens its
retries to seconds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from contract.clients import CLAUDE_MODEL as MODEL
from contract.clients import configure_claude
from contract.common import (
    BODY,
    PROMPT,
    client,
    closed_port,
    json_events,
    log_of,
    one_task,
    pinned,
    run_two_chained_tasks,
    run_two_tasks_with_a_bad_key,
)
from preset_support import AgentProject
from stubs.anthropic import KEY, AnthropicStub

VERSION = pinned()["@anthropic-ai/claude-code"]


@pytest.fixture
def stub(tmp_path: Path) -> Iterator[AnthropicStub]:
    with AnthropicStub.running(marker=tmp_path / "project" / "tool-ran.marker") as server:
        yield server


@pytest.fixture
def cc(contract_project: AgentProject, stub: AnthropicStub) -> AgentProject:
    """A project whose agents run on the real claude (the default runner: it is on PATH
    and nothing is configured), talking to `stub`."""
    client("claude")
    return configure_claude(contract_project, stub)


def list_price_cost(calls: int, stub: AnthropicStub) -> float:
    """What claude charges for `calls` model calls at Sonnet 4.5's list price
    ($3 / $15 per million input / output tokens)."""
    return calls * (stub.input_tokens * 3 + stub.output_tokens * 15) / 1e6


# --- success ------------------------------------------------------------------------------


def test_success_output_is_only_the_model_text_and_the_request_carries_body_and_model(
        cc: AgentProject, stub: AnthropicStub) -> None:
    one_task(cc)
    proc = cc.run("t.yaml")
    assert proc.returncode == 0, proc.stderr
    assert cc.output("a.md") == stub.text + "\n"
    (call,) = stub.messages()
    assert call.model == MODEL
    assert call.body["stream"] is True
    assert call.headers["x-api-key"] == KEY
    assert call.headers["user-agent"].startswith(f"claude-cli/{VERSION} ")
    system = stub.system_text(call)
    assert system.rstrip().endswith(BODY)  # appended to Claude Code's own prompt
    assert "You are Claude Code" in system
    assert PROMPT in json.dumps(call.body["messages"], ensure_ascii=False)
    task = cc.task("a")
    assert task["status"] == "succeeded" and task["attempts"] == 1 and task["exit_code"] == 0
    assert (task["input_tokens"], task["output_tokens"], task["turns"]) == \
        (stub.input_tokens, stub.output_tokens, 1)
    assert task["cost_usd"] == pytest.approx(list_price_cost(1, stub))
    assert task["session_id"]
    assert task["last_event"] == "done: 1 turn(s)"
    # --no-session-persistence: no transcript left in the (private) home
    assert list((cc.home / ".claude").rglob("*.jsonl")) == []
    log = log_of(task)
    (init,) = json_events(log, "system", "init")
    assert init["claude_code_version"] == VERSION and init["model"] == MODEL
    assert json_events(log, "result")[0]["result"] == stub.text


def test_tokens_cost_and_turns_add_up_in_both_reports(
        cc: AgentProject, stub: AnthropicStub) -> None:
    report = run_two_chained_tasks(cc)
    assert [t["turns"] for t in report["tasks"]] == [1, 1]
    s = report["summary"]
    assert (s["input_tokens"], s["output_tokens"], s["turns"]) == \
        (2 * stub.input_tokens, 2 * stub.output_tokens, 2)
    assert s["cost_usd"] == pytest.approx(list_price_cost(2, stub))
    md = cc.report_md()
    one = f"${list_price_cost(1, stub):.4f} | {stub.input_tokens:,} | {stub.output_tokens} | 1 |"
    assert f"| a | {one}" in md and f"| b | {one}" in md
    assert (f"| **Total** | **${list_price_cost(2, stub):.4f}** | "
            f"**{2 * stub.input_tokens:,}** | **{2 * stub.output_tokens}** | **2** |") in md
    assert len(stub.messages()) == 2


def test_long_system_prompt_goes_through_a_file_and_plan_shows_the_same_flag(
        cc: AgentProject, stub: AnthropicStub) -> None:
    body = "Rule: be precise.\n" * 8000  # ~144 KB: over Linux's 128 KiB per argument
    cc.define("long", body.strip(), model=MODEL)
    cc.define("short", BODY, model=MODEL)
    cc.tasks("""\
        tasks:
          - {id: a, agent: long, prompt: "First", output: a.md}
          - {id: b, agent: short, prompt: "Second", output: b.md}
    """)
    plan = cc.run("plan", "t.yaml")
    assert plan.returncode == 0, plan.stderr
    assert ("--append-system-prompt-file '<system prompt: .claude/agents/long.md>'"
            in plan.stdout)
    assert "--append-system-prompt '<system prompt: .claude/agents/short.md>'" in plan.stdout
    assert stub.requests == []
    assert cc.run("t.yaml").returncode == 0
    assert "'--append-system-prompt-file'" in log_of(cc.task("a")).splitlines()[1]
    assert "'--append-system-prompt'," in log_of(cc.task("b")).splitlines()[1]
    systems = sorted((stub.system_text(c) for c in stub.messages()), key=len)
    assert systems[0].rstrip().endswith(BODY)
    assert systems[1].rstrip().endswith(body.strip())


# --- tool limits --------------------------------------------------------------------------


def test_tools_restrict_and_allowed_tools_pre_approve(
        cc: AgentProject, stub: AnthropicStub) -> None:
    """issue 8: `tools:` used to become --allowedTools, which removes nothing.  Now the
    model's Bash call runs only for an agent whose `tools:` lists Bash; one that leaves
    Bash out is not even offered it (approving it in `allowed-tools:` changes nothing),
    and a rule that narrows Bash approves only what the rule matches."""
    marker = stub.marker
    assert marker is not None
    stub.behave("tool:Bash")
    cc.define("reader", BODY, model=MODEL, tools="Read, Grep, Glob",
              **{"allowed-tools": "Bash"})
    cc.define("narrow", BODY, model=MODEL, tools="Read, Bash(git log:*)")
    cc.define("runner", BODY, model=MODEL, tools="Read, Bash")

    one_task(cc, agent="reader")
    assert cc.run("t.yaml").returncode == 0
    first, second = stub.messages()
    assert set(stub.tool_names(first)) <= {"Read", "Grep", "Glob"}
    assert "No such tool available: Bash" in json.dumps(second.body["messages"])
    assert not marker.exists()
    a = cc.task("a")
    assert a["status"] == "succeeded" and a["turns"] == 2
    assert "No such tool available: Bash" in cc.output("a.md")
    assert ("'--tools=Read,Grep,Glob', '--allowedTools=Read,Grep,Glob,Bash'"
            in log_of(a).splitlines()[1])

    one_task(cc, agent="narrow")
    assert cc.run("t.yaml").returncode == 0
    assert "Bash" in stub.tool_names(stub.messages()[2])
    assert not marker.exists()
    a = cc.task("a")
    assert "'--tools=Read,Bash', '--allowedTools=Read,Bash(git log:*)'" in (
        log_of(a).splitlines()[1])
    (denied,) = json_events(log_of(a), "system", "permission_denied")
    assert denied["tool_name"] == "Bash" and "needs approval" in denied["message"]

    one_task(cc, agent="runner")
    assert cc.run("t.yaml").returncode == 0
    assert marker.exists()
    a = cc.task("a")
    assert a["status"] == "succeeded" and a["turns"] == 2
    assert a["input_tokens"] == 2 * stub.input_tokens
    assert cc.output("a.md").startswith("The tool said: (Bash completed with no output).")


def test_turn_limit_is_a_final_failure_naming_the_fix(
        cc: AgentProject, stub: AnthropicStub) -> None:
    stub.behave("tool:Bash")
    cc.define("runner", BODY, model=MODEL, tools="Bash", **{"allowed-tools": "Bash"})
    cc.config('[agents.runner]\nargs = ["--max-turns", "1"]\n')
    one_task(cc, "{retry_backoff: 0}", agent="runner", retries=2)
    assert cc.run("t.yaml").returncode == 1
    a = cc.task("a")
    assert a["status"] == "failed" and a["exit_code"] == 1
    assert a["error"] == ("claude runner: Reached maximum number of turns (1) "
                          "(error_max_turns); raise the limit with args = "
                          "[\"--max-turns\", \"N\"]")
    assert a["attempts"] == 1  # the same limit would stop a retry too
    assert a["cost_usd"] == pytest.approx(list_price_cost(1, stub))


# --- bad credentials ----------------------------------------------------------------------


def test_bad_key_ends_in_seconds_as_bad_credentials_and_stops_the_runner(
        cc: AgentProject, stub: AnthropicStub) -> None:
    """claude retries a 401 ten times (about three minutes) before giving up; its first
    `api_retry` event with status 401 ends the task, with the default 120 s timeout."""
    a, _ = run_two_tasks_with_a_bad_key(cc, "claude", "{max_parallel: 1, on_failure: retry}",
                                        ANTHROPIC_API_KEY="sk-ant-api03-revoked")
    assert a["error"].startswith("claude runner: bad credentials: the API refused the "
                                 "credentials (HTTP 401 authentication_failed")
    assert "/login" in a["error"] and "ANTHROPIC_API_KEY" in a["error"]
    assert len(stub.messages()) < 3  # claude alone would have made 11
    (retry,) = json_events(log_of(a), "system", "api_retry")
    assert (retry["attempt"], retry["error_status"], retry["error"]) == \
        (1, 401, "authentication_failed")


def test_permission_error_is_bad_credentials_without_retries(
        cc: AgentProject, stub: AnthropicStub) -> None:
    """A 403 is not retried by claude: its result event carries the status."""
    stub.behave("403")
    one_task(cc)
    assert cc.run("t.yaml").returncode == 1
    a = cc.task("a")
    assert a["status"] == "provider_error" and a["cause"] == "auth"
    assert a["exit_code"] == 1
    assert a["error"].startswith("claude runner: bad credentials: Failed to authenticate. "
                                 "API Error: 403 Your API key does not have permission")
    assert "(HTTP 403 permission_error)" in a["error"]
    assert len(stub.messages()) == 1
    assert json_events(log_of(a), "system", "api_retry") == []


def test_rejected_request_is_not_retried(cc: AgentProject, stub: AnthropicStub) -> None:
    """A 400 gets no `api_retry` event (claude re-sends it a few times with other tool
    sets, silently) and ends in seconds; retrying the task would not help."""
    stub.behave("400")
    one_task(cc, "{retry_backoff: 0}", retries=2)
    assert cc.run("t.yaml").returncode == 1
    a = cc.task("a")
    assert a["status"] == "provider_error" and a["cause"] == "bad_request"
    assert a["error"] == ("claude runner: request rejected by the provider: API Error: 400 "
                          "messages: at least one message is required "
                          "(HTTP 400 invalid_request_error)")
    assert a["attempts"] == 1
    assert json_events(log_of(a), "system", "api_retry") == []


# --- rate limits, overload, server errors -------------------------------------------------


def test_rate_limit_waits_the_servers_reset_time_then_succeeds(
        cc: AgentProject, stub: AnthropicStub) -> None:
    stub.rate_limit_reset_s = 2
    stub.behave("429", "ok")
    one_task(cc)
    assert cc.run("t.yaml").returncode == 0
    a = cc.task("a")
    assert a["status"] == "succeeded" and a["attempts"] == 1
    first, second = stub.messages()
    assert second.t - first.t >= 2 * 0.9  # claude honours retry-after
    (retry,) = json_events(log_of(a), "system", "api_retry")
    assert (retry["error_status"], retry["error"]) == (429, "rate_limit")
    assert retry["retry_delay_ms"] >= 2000


def test_rate_limit_seen_live_names_the_cause_and_the_wait_when_the_task_times_out(
        cc: AgentProject, stub: AnthropicStub) -> None:
    """With the default reset (37 s) claude would wait about 40 s between ten retries.
    The wait its last `api_retry` named is where the pool reopens: beyond a 5 s
    `max_quota_wait`, so the task ends at once instead of waiting for quota."""
    stub.behave("429")
    one_task(cc, "{timeout_per_task: 10000, max_quota_wait: 5000}")
    assert cc.run("t.yaml").returncode == 1
    a = cc.task("a")
    assert a["status"] == "provider_error" and a["cause"] == "rate_limit"
    assert a["error"].startswith("claude runner: rate limited: timed out after 10s (last event ")
    assert "; the claude pool would reopen in " in a["error"]
    assert "beyond --max-quota-wait 5.0s" in a["error"]
    assert a["attempts"] == 1 and "quota_waits" not in a
    wait = re.search(r"API retry 1/10: rate limited \(HTTP 429 rate_limit\), next try in "
                     r"(\d+) s\)", a["error"])
    assert wait is not None, a["error"]
    assert int(wait.group(1)) >= stub.rate_limit_reset_s
    assert len(stub.messages()) == 1


@pytest.mark.parametrize(("step", "cause", "name", "needle"), [
    ("529", "overloaded", "provider overloaded", "API Error: 529 Overloaded"),
    ("500", "server", "provider server error", "API Error: 500 Internal server error"),
    ("429", "rate_limit", "rate limited", "API Error: Request rejected (429)"),
])
def test_claudes_final_api_error_is_classified_from_api_error_status(
        cc: AgentProject, stub: AnthropicStub, step: str, cause: str, name: str,
        needle: str) -> None:
    """What claude prints once its retries are spent (shortened with
    CLAUDE_CODE_MAX_RETRIES): `is_error` with `api_error_status`, exit 1.
    `--fixed-parallel`: the case is claude's own final message; with the governor a
    429 or 529 would send the task waiting for quota (test_quota_clients.py)."""
    stub.rate_limit_reset_s = 1
    stub.behave(step)
    one_task(cc)
    assert cc.run("t.yaml", "--fixed-parallel", CLAUDE_CODE_MAX_RETRIES="2").returncode == 1
    a = cc.task("a")
    assert a["status"] == "provider_error" and a["cause"] == cause
    assert a["exit_code"] == 1
    assert a["error"].startswith(f"claude runner: {name}: {needle}"), a["error"]
    assert f"(HTTP {step} " in a["error"]
    assert len(stub.messages()) == 3
    assert len(json_events(log_of(a), "system", "api_retry")) == 2
    (result,) = json_events(log_of(a), "result")
    assert result["is_error"] is True and result["api_error_status"] == int(step)


@pytest.mark.parametrize(("step", "cause", "name"), [
    ("529", "overloaded", "provider overloaded"),
    ("500", "server", "provider server error"),
])
def test_overload_and_server_errors_seen_live_name_the_cause_when_the_task_times_out(
        cc: AgentProject, stub: AnthropicStub, step: str, cause: str, name: str) -> None:
    """`--fixed-parallel`: the case is how a timeout amid claude's retries is named; with
    the governor an overloaded attempt would then wait for quota and run again."""
    stub.behave(step)
    one_task(cc, "{timeout_per_task: 12000}")
    assert cc.run("t.yaml", "--fixed-parallel").returncode == 1
    a = cc.task("a")
    assert a["status"] == "provider_error" and a["cause"] == cause
    assert a["error"].startswith(f"claude runner: {name}: timed out after 12s (last event ")
    assert "API retry " in a["error"] and f"(HTTP {step} " in a["error"]
    calls = len(stub.messages())
    assert calls >= 2  # claude's own retries (0.5, 1, 2, 4.5 s apart), seen as they happen
    retries = json_events(log_of(a), "system", "api_retry")
    assert calls - 1 <= len(retries) <= calls  # the last answer may beat its event


def test_overloaded_then_recovery_succeeds(cc: AgentProject, stub: AnthropicStub) -> None:
    stub.behave("529", "529", "ok")
    one_task(cc)
    assert cc.run("t.yaml").returncode == 0
    a = cc.task("a")
    assert a["status"] == "succeeded" and a["attempts"] == 1
    assert cc.output("a.md") == stub.text + "\n"
    assert [e["error"] for e in json_events(log_of(a), "system", "api_retry")] == \
        ["overloaded", "overloaded"]


# --- unreachable provider, dropped streams, hangs -----------------------------------------


def test_unreachable_provider_times_out_as_unreachable_quoting_the_last_event(
        cc: AgentProject) -> None:
    one_task(cc, "{timeout_per_task: 8000}")
    assert cc.run("t.yaml", ANTHROPIC_BASE_URL=f"http://127.0.0.1:{closed_port()}") \
        .returncode == 1
    a = cc.task("a")
    assert a["status"] == "provider_error" and a["cause"] == "unreachable"
    assert a["error"].startswith(
        "claude runner: provider unreachable: timed out after 8s (last event ")
    assert "API retry" in a["error"] and "no answer from the API" in a["error"]
    retries = json_events(log_of(a), "system", "api_retry")
    assert retries and all(r["error_status"] is None for r in retries)


def test_unreachable_provider_after_claudes_retries_is_connection_failed(
        cc: AgentProject) -> None:
    one_task(cc)
    assert cc.run("t.yaml", ANTHROPIC_BASE_URL=f"http://127.0.0.1:{closed_port()}",
                  CLAUDE_CODE_MAX_RETRIES="1").returncode == 1
    a = cc.task("a")
    assert a["status"] == "provider_error" and a["cause"] == "unreachable"
    assert a["error"].startswith("claude runner: provider unreachable: API Error: "
                                 "Connection refused")
    assert "ECONNREFUSED" in a["error"] and "(connection_failed)" in a["error"]


def test_stream_dropped_once_then_success(cc: AgentProject, stub: AnthropicStub) -> None:
    stub.behave("drop", "ok")
    one_task(cc)
    assert cc.run("t.yaml").returncode == 0
    a = cc.task("a")
    assert a["status"] == "succeeded" and a["attempts"] == 1
    assert cc.output("a.md") == stub.text + "\n"  # not the cut-off partial text
    assert [c.step for c in stub.messages()] == ["drop", "ok"]
    (retry,) = json_events(log_of(a), "system", "api_retry")
    assert retry["error_status"] is None


def test_stream_dropped_every_time_ends_in_seconds_as_unreachable(
        cc: AgentProject, stub: AnthropicStub) -> None:
    """claude retries a cut stream once, then falls back to a non-streaming request;
    when that is cut too it gives up at once (no ten retries)."""
    stub.behave("drop")
    one_task(cc)
    assert cc.run("t.yaml").returncode == 1
    a = cc.task("a")
    assert a["status"] == "provider_error" and a["cause"] == "unreachable"
    assert "Connection to the API was lost (ECONNRESET)" in a["error"]
    calls = stub.messages()
    assert [c.body.get("stream") for c in calls] == [True, True, False]


def test_hanging_server_times_out_with_the_event_stream_kept(
        cc: AgentProject, stub: AnthropicStub) -> None:
    stub.behave("hang")
    one_task(cc, "{timeout_per_task: 10000}")
    assert cc.run("t.yaml").returncode == 1
    a = cc.task("a")
    assert a["status"] == "timeout"
    started = f"claude {VERSION} started: model {MODEL}"
    assert a["error"].startswith("claude runner: timed out after 10s (last event ")
    assert started in a["error"]
    assert a["last_event"].startswith(started)
    assert [e["type"] for e in json_events(log_of(a))] == ["system"]  # the init event, kept
    assert len(stub.messages()) == 1


def test_hanging_server_with_idle_timeout_is_stalled(
        cc: AgentProject, stub: AnthropicStub) -> None:
    stub.behave("hang")
    one_task(cc, "{idle_timeout: 8000}")  # claude needs up to ~5 s to start on a busy box
    assert cc.run("t.yaml").returncode == 1
    a = cc.task("a")
    assert a["status"] == "stalled"
    assert "no output for 8s" in a["error"]
    assert f"claude {VERSION} started" in a["error"]
    assert json_events(log_of(a), "system", "init")


# --- what the real client refuses (the fake mirrors these) -------------------------------


def test_the_cli_rules_the_preset_relies_on(tmp_path: Path, cc: AgentProject) -> None:
    """stream-json needs --verbose; stdin is the prompt; a variadic option swallows the
    words after it unless given as --opt=value (why the preset uses that form)."""
    import subprocess

    exe = str(client("claude"))
    run_env = {**cc.env, "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{closed_port()}"}

    def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([exe, *args], input=stdin, capture_output=True, text=True,
                              env=run_env, cwd=tmp_path, timeout=60, check=False)

    plain = run("-p", "--output-format", "stream-json", stdin=PROMPT)
    assert plain.returncode == 1 and "requires --verbose" in plain.stderr
    empty = run("-p", "--output-format", "stream-json", "--verbose")
    assert empty.returncode == 1 and "Input must be provided" in empty.stderr
    swallowed = run("-p", "--allowedTools", "Read", "the prompt")
    assert swallowed.returncode == 1
    assert '"the prompt" was read as a value of --allowedTools' in swallowed.stderr
    version = run("--version")
    assert version.stdout.strip() == f"{VERSION} (Claude Code)"


def test_inline_tools_option_does_not_swallow_what_follows(
        cc: AgentProject, stub: AnthropicStub) -> None:
    cc.define("reader", BODY, model=MODEL, tools="Read")
    cc.config('[agents.reader]\nargs = ["--max-turns", "3"]\n')
    one_task(cc, agent="reader")
    assert cc.run("t.yaml").returncode == 0
    header = log_of(cc.task("a")).splitlines()[1]
    assert header.endswith("'--tools=Read', '--allowedTools=Read', '--max-turns', '3']")
    (call,) = stub.messages()
    assert set(stub.tool_names(call)) <= {"Read"}
    assert cc.output("a.md") == stub.text + "\n"

