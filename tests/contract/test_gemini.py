"""Contract: the real Gemini CLI (pinned in tests/clients/versions.txt) run by
`parallel-dispatch` end to end against a local Gemini API stub (tests/stubs/gemini.py).

gemini-cli is pointed at the stub with `GOOGLE_GEMINI_BASE_URL` and a `GEMINI_API_KEY`.
0.61.0 treats a base URL alone as a "gateway" auth type that its own headless check then
rejects ("Invalid auth method selected.", exit 41), so the private `~/.gemini/settings.json`
also selects `gemini-api-key`, and turns off update checks and usage statistics.  Each
case shows what a user of that version gets: exit codes, stream-json events, stderr
retry notices, how long gemini retries, and how the dispatcher names the outcome.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from contract.clients import GEMINI_KEY as KEY
from contract.clients import GEMINI_MODEL as MODEL
from contract.clients import configure_gemini, write_gemini_settings
from contract.common import (
    BODY,
    PROMPT,
    client,
    closed_port,
    json_events,
    log_of,
    one_task,
    run_two_chained_tasks,
    run_two_tasks_with_a_bad_key,
)
from preset_support import AgentProject
from stubs.gemini import (
    ANSWER,
    CACHED_TOKENS,
    OUTPUT_TOKENS,
    PROMPT_TOKENS,
    RETRY_DELAY_S,
    TOOL_DONE,
    GeminiStub,
)


@pytest.fixture
def stub(tmp_path: Path) -> Iterator[GeminiStub]:
    with GeminiStub.running(marker=tmp_path / "tool-ran.marker") as server:
        yield server


@pytest.fixture
def gm(contract_project: AgentProject, stub: GeminiStub) -> AgentProject:
    """A project whose agents run on the real gemini, talking to `stub`."""
    client("gemini")
    return configure_gemini(contract_project, stub)


def user_texts(body: dict[str, Any]) -> list[str]:
    return [p.get("text", "") for c in body.get("contents", []) if c.get("role") == "user"
            for p in c.get("parts", [])]


def tool_names(body: dict[str, Any]) -> list[str]:
    return [f["name"] for t in body.get("tools") or [] for f in t.get("functionDeclarations", [])]


# --- success ------------------------------------------------------------------------------


def test_headless_run_succeeds_with_only_the_model_text_and_the_body_and_model_sent(
        gm: AgentProject, stub: GeminiStub) -> None:
    """issue 8: every headless run used to fail with exit 55 (untrusted workspace)."""
    one_task(gm)
    proc = gm.run("t.yaml")
    assert proc.returncode == 0, proc.stderr
    assert gm.output("a.md") == ANSWER + "\n"
    (turn,) = stub.turns()
    assert GeminiStub.model_of(turn) == MODEL
    assert turn.path.endswith(":streamGenerateContent?alt=sse")
    assert turn.headers["x-goog-api-key"] == KEY
    # GEMINI_SYSTEM_MD replaces gemini's own system prompt: the body arrives alone, whole.
    assert GeminiStub.system_text(turn) == BODY
    assert PROMPT in user_texts(turn.body)
    a = gm.task("a")
    assert a["status"] == "succeeded" and a["attempts"] == 1 and a["exit_code"] == 0
    assert (a["input_tokens"], a["output_tokens"], a["turns"]) == (PROMPT_TOKENS,
                                                                   OUTPUT_TOKENS, 1)
    assert a["cached_input_tokens"] == CACHED_TOKENS
    assert a["cost_usd"] is None  # gemini reports no cost
    assert a["session_id"]
    assert a["last_event"] == f"done: {PROMPT_TOKENS:,} input / {OUTPUT_TOKENS:,} output tokens"
    log = log_of(a)
    assert f"=== argv: ['gemini', '--output-format', 'stream-json', '-m', '{MODEL}']" in log
    kinds = [e["type"] for e in json_events(log)]
    assert kinds[0] == "init" and kinds[-1] == "result"
    # the GEMINI_SYSTEM_MD file was private to the run and is gone
    assert not list(Path(gm.env["TMPDIR"]).glob("pd-gemini-*"))


def test_tokens_and_turns_add_up_in_both_reports(gm: AgentProject, stub: GeminiStub) -> None:
    """A tool round makes a second model turn; the report sums tasks and turns."""
    gm.config('[defaults]\nrunner = "gemini"\n\n[agents.reviewer]\n'
              'args = ["--approval-mode", "yolo"]\n')
    stub.behave("tool:Bash")
    report = run_two_chained_tasks(gm)
    assert [t["turns"] for t in report["tasks"]] == [2, 2]
    assert [t["input_tokens"] for t in report["tasks"]] == [2 * PROMPT_TOKENS] * 2
    summary = report["summary"]
    assert summary["input_tokens"] == 4 * PROMPT_TOKENS
    assert summary["output_tokens"] == 4 * OUTPUT_TOKENS
    assert summary["turns"] == 4
    md = gm.report_md()
    assert f"**{4 * PROMPT_TOKENS:,}**" in md and f"**{4 * OUTPUT_TOKENS:,}**" in md
    assert "| **4** |" in md
    assert gm.output("a.md") == TOOL_DONE + "\n"  # the last turn's text only
    assert len(stub.turns()) == 4


# --- the workspace-trust gate ---------------------------------------------------------


def test_without_the_trust_variable_gemini_exits_55_and_the_error_has_no_ansi(
        gm: AgentProject, stub: GeminiStub) -> None:
    """What the preset now prevents: the agent's command drops GEMINI_CLI_TRUST_WORKSPACE.
    gemini refuses before any model call, in red unless NO_COLOR is set."""
    gm.config('[defaults]\nrunner = "gemini"\n\n[runners.gemini]\n'
              'command = ["env", "-u", "GEMINI_CLI_TRUST_WORKSPACE", "gemini"]\n')
    env = dict(gm.env)
    env.pop("NO_COLOR", None)
    gm.env = env
    one_task(gm, "{retry_backoff: 0}", retries=1)
    assert gm.run("t.yaml").returncode == 1
    a = gm.task("a")
    assert a["status"] == "failed" and a["exit_code"] == 55
    assert a["error"].startswith("gemini runner: workspace not trusted (exit code 55): "
                                 "Gemini CLI is not running in a trusted directory.")
    assert "GEMINI_CLI_TRUST_WORKSPACE=true" in a["error"]
    assert "\x1b" not in a["error"]
    assert "\x1b[31m" in log_of(a)  # gemini's own colour, kept in the log
    assert a["attempts"] == 1  # not retryable
    assert stub.turns() == []


def test_broken_settings_file_is_a_configuration_error(
        gm: AgentProject, stub: GeminiStub) -> None:
    settings = gm.home / ".gemini" / "settings.json"
    settings.write_text(settings.read_text()[:-3])
    one_task(gm, "{retry_backoff: 0}", retries=1)
    assert gm.run("t.yaml").returncode == 1
    a = gm.task("a")
    assert a["status"] == "failed" and a["exit_code"] == 52
    assert a["error"].startswith(f"gemini runner: configuration error (exit code 52): Error in "
                                 f"{settings}: ")
    assert "Please fix the configuration file(s) and try again." in a["error"]
    assert a["attempts"] == 1
    assert stub.requests == []


def test_turn_limit_is_named_with_its_setting(gm: AgentProject, stub: GeminiStub) -> None:
    """`model.maxSessionTurns: 1` and a model that wants a tool: gemini stops, exit 53."""
    settings = gm.home / ".gemini" / "settings.json"
    data = json.loads(settings.read_text())
    settings.write_text(json.dumps({**data, "model": {"maxSessionTurns": 1}}))
    stub.behave("tool:Bash")
    one_task(gm)
    assert gm.run("t.yaml").returncode == 1
    a = gm.task("a")
    assert a["status"] == "failed" and a["exit_code"] == 53
    assert a["error"].startswith("gemini runner: turn limit reached (exit code 53): Reached "
                                 "max session turns for this session.")
    assert "maxSessionTurns" in a["error"]
    assert len(stub.turns()) == 1


def test_empty_answer_exits_0_with_an_error_result_and_fails(
        gm: AgentProject, stub: GeminiStub) -> None:
    """gemini retries an empty answer itself (4 requests), then reports an `error` event
    and `result.status: error`, yet exits 0: the agent ran and failed."""
    stub.behave("empty")
    one_task(gm)
    assert gm.run("t.yaml").returncode == 1
    a = gm.task("a")
    assert a["status"] == "failed" and a["exit_code"] == 0 and a["cause"] is None
    assert a["error"].startswith("gemini runner: The model returned an empty response with "
                                 "no text or thoughts.")
    assert a["error"].endswith("(exit code 0)")
    assert len(stub.turns()) == 4
    assert not (gm.root / ".aiwg/working/a.md").exists()


# --- bad credentials: fast, not retried, one message ------------------------------------


@pytest.mark.parametrize(("step", "exit_code", "needle"), [
    ("400", 144, "API key not valid. Please pass a valid API key. (HTTP 400 INVALID_ARGUMENT)"),
    ("401", 145, "invalid authentication credentials"),
])
def test_bad_key_ends_in_seconds_as_bad_credentials_and_stops_the_runner(
        gm: AgentProject, stub: GeminiStub, step: str, exit_code: int, needle: str) -> None:
    """gemini does not retry a 400/401; it exits with the status modulo 256.  With the
    default 120 s timeout the task ends in seconds, naming the cause."""
    stub.behave(step)
    a, _ = run_two_tasks_with_a_bad_key(gm, "gemini", a_fields=", retries: 2",
                                        GEMINI_API_KEY="AIza-bad-key")
    assert a["exit_code"] == exit_code
    assert a["error"].startswith("gemini runner: bad credentials: ")
    assert needle in a["error"] and "set GEMINI_API_KEY" in a["error"]
    assert len(stub.turns()) == 1
    assert stub.turns()[0].headers["x-goog-api-key"] == "AIza-bad-key"


def test_missing_key_is_bad_credentials_before_any_request(
        gm: AgentProject, stub: GeminiStub) -> None:
    env = dict(gm.env)
    env.pop("GEMINI_API_KEY")
    gm.env = env
    one_task(gm)
    assert gm.run("t.yaml").returncode == 1
    a = gm.task("a")
    assert a["status"] == "provider_error" and a["cause"] == "auth" and a["exit_code"] == 41
    assert a["error"].startswith("gemini runner: bad credentials: When using Gemini API, you "
                                 "must specify the GEMINI_API_KEY environment variable.")
    assert stub.requests == []


def test_base_url_without_an_auth_type_is_rejected_by_gemini_with_the_fix_named(
        gm: AgentProject, stub: GeminiStub) -> None:
    """gemini-cli 0.61 quirk: GOOGLE_GEMINI_BASE_URL selects its 'gateway' auth type,
    which its own headless check does not accept."""
    (gm.home / ".gemini" / "settings.json").unlink()
    one_task(gm)
    assert gm.run("t.yaml").returncode == 1
    a = gm.task("a")
    assert a["status"] == "provider_error" and a["cause"] == "auth" and a["exit_code"] == 41
    assert "Invalid auth method selected." in a["error"]
    assert '"selectedType": "gemini-api-key"' in a["error"]
    assert stub.requests == []


# --- quota and rate limits ---------------------------------------------------------------


def test_rate_limit_honours_retry_info_then_ends_as_rate_limited(
        gm: AgentProject, stub: GeminiStub) -> None:
    """A 429 with a RetryInfo: gemini waits max(its backoff, retryDelay) between attempts
    and prints each retry on stderr.  `general.maxAttempts: 2` keeps the test short
    (the default 10 attempts take about 4 minutes).  The retryDelay it quotes at the end
    is past a 1 s `max_quota_wait`: the task ends at once instead of waiting for quota."""
    write_gemini_settings(gm, maxAttempts=2)
    stub.behave("429")
    one_task(gm, "{max_quota_wait: 1000}")
    assert gm.run("t.yaml").returncode == 1
    a = gm.task("a")
    assert a["status"] == "provider_error" and a["cause"] == "rate_limit"
    assert "beyond --max-quota-wait 1.0s" in a["error"]
    assert a["attempts"] == 1 and "quota_waits" not in a
    assert a["exit_code"] == 173  # 429 % 256
    assert a["error"].startswith("gemini runner: rate limited: You exceeded your current quota")
    assert f"Suggested retry after {RETRY_DELAY_S}s" in a["error"]
    calls = stub.turns()
    assert len(calls) == 2
    assert calls[1].t - calls[0].t >= RETRY_DELAY_S
    log = log_of(a)
    assert "Attempt 1 failed: You exceeded your current quota" in log
    assert f"Suggested retry after {RETRY_DELAY_S}s.. Retrying after" in log


def test_rate_limit_seen_live_names_the_cause_when_the_task_times_out(
        gm: AgentProject, stub: GeminiStub) -> None:
    """With gemini's default retries the task's timeout comes first: the last event (a
    retry, read from stderr as it happened) says why, and its wait is past a 1 s
    `max_quota_wait`, so the task ends instead of waiting for quota."""
    stub.behave("429")
    one_task(gm, "{timeout_per_task: 15000, max_quota_wait: 1000}")
    assert gm.run("t.yaml").returncode == 1
    a = gm.task("a")
    assert a["status"] == "provider_error" and a["cause"] == "rate_limit"
    assert a["error"].startswith("gemini runner: rate limited: timed out after 15s (last event")
    assert "beyond --max-quota-wait 1.0s" in a["error"]
    assert a["attempts"] == 1 and "quota_waits" not in a
    assert f"provider asked to wait {RETRY_DELAY_S} s" in a["error"]
    assert a["last_event"].startswith("API rate limited: provider asked to wait")
    assert "Attempt 1 failed" in log_of(a)


def test_daily_quota_is_exhausted_quota_and_not_retried(
        gm: AgentProject, stub: GeminiStub) -> None:
    stub.behave("quota")
    one_task(gm, "{retry_backoff: 0}", retries=2)
    assert gm.run("t.yaml").returncode == 1
    a = gm.task("a")
    assert a["status"] == "provider_error" and a["cause"] == "quota"
    assert a["error"].startswith("gemini runner: usage quota exhausted: You have exhausted "
                                 "your daily quota on this model.")
    assert a["exit_code"] == 173 and a["attempts"] == 1
    assert len(stub.turns()) == 1  # gemini gives up at once too


# --- overloaded, server errors, unreachable -------------------------------------------


@pytest.mark.parametrize(("step", "cause", "name", "needle", "exit_code"), [
    ("503", "overloaded", "provider overloaded", "The model is overloaded.", 247),
    ("500", "server", "provider server error", "An internal error has occurred.", 244),
])
def test_overloaded_and_server_errors_end_as_provider_errors(
        gm: AgentProject, stub: GeminiStub, step: str, cause: str, name: str, needle: str,
        exit_code: int) -> None:
    """`general.maxAttempts: 1`: gemini gives up after the first error and exits with the
    status modulo 256 (by default it retries 10 times over 3-4 minutes).
    `--fixed-parallel`: the case is gemini's own exit and message; with the governor an
    overloaded attempt would wait for quota and run again."""
    write_gemini_settings(gm, maxAttempts=1)
    stub.behave(step)
    one_task(gm)
    assert gm.run("t.yaml", "--fixed-parallel").returncode == 1
    a = gm.task("a")
    assert a["status"] == "provider_error" and a["cause"] == cause
    assert a["error"].startswith(f"gemini runner: {name}: {needle}")
    assert a["exit_code"] == exit_code
    assert len(stub.turns()) == 1


def test_server_error_retries_are_seen_live_and_recovery_succeeds(
        gm: AgentProject, stub: GeminiStub) -> None:
    stub.behave("500", "503", "ok")
    one_task(gm)
    assert gm.run("t.yaml").returncode == 0
    a = gm.task("a")
    assert a["status"] == "succeeded" and gm.output("a.md") == ANSWER + "\n"
    assert [c.step for c in stub.turns()] == ["500", "503", "ok"]
    log = log_of(a)
    assert "Attempt 1 failed with status 500. Retrying with backoff..." in log
    assert "Attempt 2 failed with status 503. Retrying with backoff..." in log


def test_server_error_seen_live_names_the_cause_when_the_task_times_out(
        gm: AgentProject, stub: GeminiStub) -> None:
    stub.behave("500")
    one_task(gm, "{timeout_per_task: 15000}")
    assert gm.run("t.yaml").returncode == 1
    a = gm.task("a")
    assert a["status"] == "provider_error" and a["cause"] == "server"
    assert a["error"].startswith(
        "gemini runner: provider server error: timed out after 15s (last event")
    assert re.search(r"last event \d+ s ago: API retry \d+: provider server error \(An "
                     r"internal error has occurred", a["error"]), a["error"]


def test_unreachable_provider_times_out_as_unreachable_quoting_the_last_event(
        gm: AgentProject) -> None:
    """gemini retries `fetch failed` for about 3.5 minutes, then exits 1."""
    gm.env["GOOGLE_GEMINI_BASE_URL"] = f"http://127.0.0.1:{closed_port()}"
    one_task(gm, "{timeout_per_task: 15000}")
    assert gm.run("t.yaml").returncode == 1
    a = gm.task("a")
    assert a["status"] == "provider_error" and a["cause"] == "unreachable"
    assert a["error"].startswith(
        "gemini runner: provider unreachable: timed out after 15s (last event")
    assert re.search(r"last event \d+ s ago: API retry \d+: provider unreachable \(exception "
                     r"TypeError: fetch failed sending request\)", a["error"]), a["error"]


# --- dropped streams ------------------------------------------------------------------------


def test_stream_dropped_once_then_success(gm: AgentProject, stub: GeminiStub) -> None:
    """gemini retries a stream cut before its finishReason, silently.  Headless 0.61.0
    keeps the cut attempt's text in front of the answer (in json and stream-json alike):
    the output shows what gemini printed."""
    stub.behave("drop", "ok")
    one_task(gm)
    assert gm.run("t.yaml").returncode == 0
    a = gm.task("a")
    assert a["status"] == "succeeded" and a["attempts"] == 1
    assert [c.step for c in stub.turns()] == ["drop", "ok"]
    assert gm.output("a.md") == "Partial " + ANSWER + "\n"
    assert a["turns"] == 1


# --- a server that hangs ------------------------------------------------------------------


def test_hanging_server_times_out_with_the_event_stream_kept(
        gm: AgentProject, stub: GeminiStub) -> None:
    """As users run it: gemini relaunches itself with a larger heap (the other cases turn
    that off to save start-up CPU), and the timeout ends both processes."""
    gm.env.pop("GEMINI_CLI_NO_RELAUNCH")
    stub.behave("hang")
    one_task(gm, "{timeout_per_task: 15000}")
    assert gm.run("t.yaml").returncode == 1
    a = gm.task("a")
    assert a["status"] == "timeout"
    assert a["error"].startswith("gemini runner: timed out after 15s (last event")
    assert "prompt sent, waiting for the model" in a["error"]
    assert a["last_event"] == "prompt sent, waiting for the model"
    events = json_events(log_of(a))
    assert [e["type"] for e in events] == ["init", "message"]
    assert events[1]["role"] == "user" and events[1]["content"] == PROMPT
    assert len(stub.turns()) == 1


def test_hanging_server_with_idle_timeout_is_stalled(
        gm: AgentProject, stub: GeminiStub) -> None:
    """gemini prints nothing while its request hangs (its fetch gives up after ~60 s)."""
    stub.behave("hang")
    one_task(gm, "{idle_timeout: 10000}")
    assert gm.run("t.yaml").returncode == 1
    a = gm.task("a")
    assert a["status"] == "stalled"
    assert "no output for 10s" in a["error"] and "prompt sent" in a["error"]
    assert '"type":"init"' in log_of(a)


# --- tools: headless gemini offers no shell unless told --------------------------------


def test_shell_tool_is_not_offered_by_default_and_runs_when_args_allow_it(
        gm: AgentProject, stub: GeminiStub) -> None:
    """Headless gemini in its default approval mode offers read-only tools only: the
    model's `run_shell_command` call is refused ("not found"), whatever the definition's
    `tools:` lists (the preset does not translate them).  `--allowed-tools
    run_shell_command` (or `--approval-mode yolo`) in `args` lets it run."""
    assert stub.marker is not None
    stub.behave("tool:Bash")
    gm.define("reader", BODY, model=MODEL, tools="Read, Bash")
    gm.define("shell", BODY, model=MODEL, tools="Read, Bash")
    gm.config('[defaults]\nrunner = "gemini"\n\n[agents.shell]\n'
              'args = ["--allowed-tools", "run_shell_command"]\n')
    one_task(gm, agent="reader")
    assert gm.run("t.yaml").returncode == 0
    a = gm.task("a")
    assert a["status"] == "succeeded" and a["turns"] == 2
    assert not stub.marker.exists()
    first = stub.turns()[0]
    assert "run_shell_command" not in tool_names(first.body)
    assert "read_file" in tool_names(first.body)
    results = [e for e in json_events(log_of(a)) if e["type"] == "tool_result"]
    assert results and results[0]["status"] == "error"
    assert 'Tool "run_shell_command" not found' in results[0]["output"]
    assert gm.output("a.md") == TOOL_DONE + "\n"

    one_task(gm, agent="shell")
    assert gm.run("t.yaml").returncode == 0
    assert stub.marker.exists()
    a = gm.task("a")
    assert a["status"] == "succeeded" and a["turns"] == 2
    assert "run_shell_command" in tool_names(stub.turns()[-1].body)
    uses = [e for e in json_events(log_of(a)) if e["type"] == "tool_use"]
    assert uses[0]["tool_name"] == "run_shell_command"
    assert uses[0]["parameters"]["command"] == f"touch {stub.marker}"
    assert os.path.getsize(stub.marker) == 0
