"""Contract: the real OpenAI Codex CLI (pinned in tests/clients/versions.txt) run by
`parallel-dispatch` end to end against a local Responses API stub.

Codex is pointed at the stub through a model provider in a private `CODEX_HOME`
(`config.toml`: `base_url`, `wire_api = "responses"`, `env_key`), with codex's own retry
defaults, so each case shows what a user of that version gets: exit codes, `--json`
events, how long codex retries, and how the dispatcher names the outcome.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from contract.clients import CODEX_BODY as BODY
from contract.clients import CODEX_MODEL as MODEL
from contract.clients import configure_codex, set_codex_provider
from contract.common import GOOD_KEY as KEY
from contract.common import (
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
from stubs.openai_responses import USAGE, ResponsesStub


@pytest.fixture
def stub() -> Iterator[ResponsesStub]:
    with ResponsesStub.running() as server:
        yield server


@pytest.fixture
def cx(contract_project: AgentProject, stub: ResponsesStub) -> AgentProject:
    """A project whose agents run on the real codex, talking to `stub`."""
    client("codex")
    return configure_codex(contract_project, stub)


def developer_texts(body: dict[str, Any]) -> list[str]:
    return [part.get("text") for item in body.get("input", [])
            if item.get("type") == "message" and item.get("role") == "developer"
            for part in item.get("content", [])]


# --- success ------------------------------------------------------------------------------


def test_success_output_is_only_the_model_text_and_the_request_carries_body_and_model(
        cx: AgentProject, stub: ResponsesStub) -> None:
    one_task(cx)
    proc = cx.run("t.yaml")
    assert proc.returncode == 0, proc.stderr
    assert cx.output("a.md") == stub.text + "\n"
    (call,) = stub.model_calls()
    assert call.body["model"] == MODEL
    assert call.body["stream"] is True
    assert call.headers["authorization"] == f"Bearer {KEY}"
    # developer_instructions arrives whole (quotes, backslash, tab, unicode, DEL) as a
    # developer message beside codex's own instructions, not instead of them.
    texts = developer_texts(call.body)
    assert BODY in texts and len(texts) > 1
    user = [p["text"] for i in call.body["input"] if i.get("role") == "user"
            for p in i["content"]]
    assert any(t.strip() == PROMPT for t in user)
    task = cx.task("a")
    assert task["status"] == "succeeded" and task["attempts"] == 1
    assert task["input_tokens"] == USAGE["input_tokens"]
    assert task["output_tokens"] == USAGE["output_tokens"]
    assert task["turns"] == 1
    assert task["cost_usd"] is None  # codex reports no cost, and no price is configured
    assert task["cost_source"] == "tokens only"
    assert task["session_id"]
    assert f"| a | tokens only | {USAGE['input_tokens']:,} | {USAGE['output_tokens']:,} | 1 |" \
        in cx.report_md()
    assert task["last_event"].startswith("turn completed")


def test_a_claude_model_name_is_not_passed_and_codex_uses_its_configured_model(
        cx: AgentProject, stub: ResponsesStub) -> None:
    cx.define("reviewer", BODY, model="sonnet")
    one_task(cx)
    assert cx.run("t.yaml").returncode == 0
    (call,) = stub.model_calls()
    assert call.body["model"] == MODEL  # from CODEX_HOME/config.toml, not "sonnet"
    header = log_of(cx.task("a")).splitlines()[1]
    assert header.startswith("=== argv: ['codex', 'exec', '--json', '--skip-git-repo-check', "
                             "'--sandbox', 'read-only', '-o', ")
    assert "'-m'" not in header


def test_tokens_add_up_over_two_tasks_in_both_reports(
        cx: AgentProject, stub: ResponsesStub) -> None:
    report = run_two_chained_tasks(cx)
    assert [t["turns"] for t in report["tasks"]] == [1, 1]
    summary = report["summary"]
    assert summary["input_tokens"] == 2 * USAGE["input_tokens"]
    assert summary["output_tokens"] == 2 * USAGE["output_tokens"]
    assert summary["turns"] == 2 and summary["cost_usd"] is None
    n_in, n_out = 2 * USAGE["input_tokens"], 2 * USAGE["output_tokens"]
    assert f"| **Total** | **–** | **{n_in:,}** | **{n_out:,}** | **2** |" in cx.report_md()
    assert len(stub.model_calls()) == 2


# --- provider failures -----------------------------------------------------------------


def test_bad_key_ends_in_seconds_as_bad_credentials_and_stops_the_runner(
        cx: AgentProject, stub: ResponsesStub) -> None:
    """codex retries a 401 five times (~7 s) before failing; the first retry event ends
    the task, and the runner's other task does not run into the same wall."""
    stub.behave("401")
    a, _ = run_two_tasks_with_a_bad_key(cx, "codex", STUB_API_KEY="sk-bad-key")
    assert a["error"].startswith("codex runner: bad credentials")
    assert "401 Unauthorized" in a["error"] and "Incorrect API key" in a["error"]
    assert "codex login" in a["error"]
    assert len(stub.model_calls()) < 6  # codex alone would have made six


def test_missing_key_variable_is_bad_credentials(cx: AgentProject, stub: ResponsesStub) -> None:
    one_task(cx)
    env = dict(cx.env)
    env.pop("STUB_API_KEY")
    cx.env = env
    assert cx.run("t.yaml").returncode == 1
    a = cx.task("a")
    assert a["status"] == "provider_error" and a["cause"] == "auth"
    assert "Missing environment variable: `STUB_API_KEY`" in a["error"]
    assert stub.model_calls() == []


def test_rate_limit_waits_the_reset_time_then_ends_as_rate_limited(
        cx: AgentProject, stub: ResponsesStub) -> None:
    """codex's own five retries each wait the 429's `retry-after`; its output never says
    how long, so the pool backs off on its own (at least 2 s): beyond a 1 s
    `max_quota_wait`, so the task ends at once instead of waiting for quota."""
    stub.rate_limit_reset_s = 2
    stub.behave("429")
    one_task(cx, "{max_quota_wait: 1000}")
    assert cx.run("t.yaml", timeout=150).returncode == 1
    a = cx.task("a")
    assert a["status"] == "provider_error" and a["cause"] == "rate_limit"
    assert a["error"].startswith("codex runner: rate limited")
    assert "429 Too Many Requests" in a["error"] and "after 5 retries" in a["error"]
    assert "beyond --max-quota-wait 1.0s" in a["error"]
    assert a["attempts"] == 1 and "quota_waits" not in a
    calls = stub.model_calls()
    assert len(calls) == 6
    # codex honours the server's retry-after between its attempts
    gaps = [b.t - x.t for x, b in itertools.pairwise(calls)]
    assert min(gaps) >= stub.rate_limit_reset_s * 0.9, gaps
    retries = [e for e in json_events(log_of(a)) if e.get("type") == "error"
               and str(e.get("message", "")).startswith("Reconnecting... ")]
    assert len(retries) == 5


def test_usage_limit_is_an_exhausted_quota_with_its_reset_time_and_not_retried(
        cx: AgentProject, stub: ResponsesStub) -> None:
    """A usage limit that resets in an hour, past a 1 min `max_quota_wait`: the task ends
    at once, saying when the pool would reopen (a nearer reset is waited for:
    test_quota_clients.py)."""
    stub.behave("usage_limit")
    one_task(cx, "{retry_backoff: 0, max_quota_wait: 60000}", retries=2)
    assert cx.run("t.yaml").returncode == 1
    a = cx.task("a")
    assert a["status"] == "provider_error" and a["cause"] == "quota"
    assert a["error"].startswith("codex runner: usage quota exhausted")
    assert "hit your usage limit" in a["error"] and "try again at" in a["error"]
    assert re.search(r"the codex pool would reopen in (59m [\d.]+s|1h 0[01]m \d+s) \(at ",
                     a["error"]), a["error"]
    assert "beyond --max-quota-wait 1m 00.0s" in a["error"]
    assert a["attempts"] == 1  # an exhausted quota is not retried
    assert len(stub.model_calls()) == 1


def test_overloaded_ends_as_provider_overloaded(cx: AgentProject, stub: ResponsesStub) -> None:
    """`--fixed-parallel`: the case is codex's own message and request retries; with the
    governor an overloaded attempt would wait for quota and run again."""
    stub.behave("overloaded")
    one_task(cx)
    assert cx.run("t.yaml", "--fixed-parallel").returncode == 1
    a = cx.task("a")
    assert a["status"] == "provider_error" and a["cause"] == "overloaded"
    assert a["error"].startswith("codex runner: provider overloaded")
    assert "at capacity" in a["error"]
    assert a["exit_code"] == 1
    assert len(stub.model_calls()) == 5  # codex's request retries, no stream retries


def test_server_error_ends_as_provider_server_error(
        cx: AgentProject, stub: ResponsesStub) -> None:
    stub.behave("500")
    one_task(cx)
    assert cx.run("t.yaml", timeout=150).returncode == 1
    a = cx.task("a")
    assert a["status"] == "provider_error" and a["cause"] == "server"
    assert a["error"].startswith("codex runner: provider server error")
    assert "high demand" in a["error"]  # codex's wording for a 500
    assert len(stub.model_calls()) == 30  # 6 stream attempts x 5 request attempts


def test_unreachable_provider_times_out_as_unreachable_quoting_the_last_event(
        cx: AgentProject) -> None:
    """codex waits for the network forever; the timeout names the cause."""
    set_codex_provider(cx, f"http://127.0.0.1:{closed_port()}/v1")
    one_task(cx, "{timeout_per_task: 20000}")
    assert cx.run("t.yaml").returncode == 1
    a = cx.task("a")
    assert a["status"] == "provider_error" and a["cause"] == "unreachable"
    assert "timed out after 20s" in a["error"]
    assert "last event" in a["error"] and "waiting for network" in a["error"]
    assert a["error"].startswith("codex runner: provider unreachable")
    assert "waiting for network" in log_of(a)


# --- dropped streams and transport fallback: progress, not failure ---------------------


def test_stream_dropped_once_then_success(cx: AgentProject, stub: ResponsesStub) -> None:
    stub.behave("drop", "ok")
    one_task(cx)
    assert cx.run("t.yaml").returncode == 0
    a = cx.task("a")
    assert a["status"] == "succeeded" and a["attempts"] == 1
    assert cx.output("a.md") == stub.text + "\n"
    assert [c.step for c in stub.model_calls()] == ["drop", "ok"]
    errors = [e for e in json_events(log_of(a)) if e.get("type") == "error"]
    assert errors and errors[0]["message"].startswith("Reconnecting... 1/5 (stream disconnected")


def test_websocket_fallback_reconnect_errors_then_success(
        cx: AgentProject, stub: ResponsesStub) -> None:
    """issue 8: codex prints `{"type":"error","message":"Reconnecting... n/5 ..."}` while it
    falls back from WebSockets to HTTPS, then succeeds with exit 0."""
    set_codex_provider(cx, stub.base_url, supports_websockets=True)
    one_task(cx)
    assert cx.run("t.yaml").returncode == 0
    a = cx.task("a")
    assert a["status"] == "succeeded" and a["exit_code"] == 0
    assert cx.output("a.md") == stub.text + "\n"
    assert stub.upgrades(), "codex did not try a WebSocket first"
    assert len(stub.model_calls()) == 1
    events = json_events(log_of(a))
    reconnects = [e["message"] for e in events if e.get("type") == "error"]
    assert reconnects and all(m.startswith("Reconnecting... ") for m in reconnects)
    assert any("ws://" in m for m in reconnects)
    assert any(e.get("type") == "item.completed" and "Falling back from WebSockets"
               in str(e["item"].get("message")) for e in events)
    assert events[-1]["type"] == "turn.completed"


# --- a server that hangs ------------------------------------------------------------------


def test_hanging_server_times_out_with_the_event_stream_kept(
        cx: AgentProject, stub: ResponsesStub) -> None:
    stub.behave("hang")
    one_task(cx, "{timeout_per_task: 8000}")
    assert cx.run("t.yaml").returncode == 1
    a = cx.task("a")
    assert a["status"] == "timeout"
    assert a["error"].startswith("codex runner: timed out after 8s (last event")
    assert "turn started, waiting for the model" in a["error"]
    assert a["last_event"] == "turn started, waiting for the model"
    kinds = [e.get("type") for e in json_events(log_of(a))]
    assert kinds[:1] == ["thread.started"] and "turn.started" in kinds
    assert len(stub.model_calls()) == 1


def test_hanging_server_with_idle_timeout_is_stalled(
        cx: AgentProject, stub: ResponsesStub) -> None:
    stub.behave("hang")
    one_task(cx, "{idle_timeout: 4000}")
    assert cx.run("t.yaml").returncode == 1
    a = cx.task("a")
    assert a["status"] == "stalled"
    assert "no output for 4s" in a["error"] and "turn started" in a["error"]
    assert "turn.started" in log_of(a)


# --- tools: codex's sandbox is the limit -----------------------------------------------


def test_shell_tool_is_blocked_by_the_read_only_sandbox_and_runs_with_workspace_write(
        cx: AgentProject, stub: ResponsesStub) -> None:
    """codex has no per-tool allowlist: frontmatter `tools:` cannot remove its shell.  The
    preset's `--sandbox read-only` default is what stops a write; an agent given
    `--sandbox workspace-write` in `args` may write inside the project."""
    marker = cx.root / "tool-ran.marker"
    stub.tool_command = f"touch {marker}"
    stub.behave("tool:Bash")
    cx.define("reader", BODY, model=MODEL, tools="Read, Grep")
    cx.define("writer", BODY, model=MODEL, tools="Read, Bash")
    cx.config('[defaults]\nrunner = "codex"\n\n[agents.writer]\n'
              'args = ["--sandbox", "workspace-write"]\n')
    one_task(cx, agent="reader")
    assert cx.run("t.yaml").returncode == 0
    assert cx.task("a")["status"] == "succeeded"
    assert stub.tool_outputs(), "the model's shell call never came back"
    assert not marker.exists()
    one_task(cx, agent="writer")
    assert cx.run("t.yaml").returncode == 0
    assert marker.exists()
    a = cx.task("a")
    assert any(e.get("type") == "item.completed" and e["item"].get("type")
               == "command_execution" and e["item"].get("exit_code") == 0
               for e in json_events(log_of(a)))
    assert cx.output("a.md") == stub.text + "\n"


# --- codex's own errors -------------------------------------------------------------------


def test_multi_line_config_error_is_kept_whole_and_not_retried(
        cx: AgentProject, stub: ResponsesStub) -> None:
    set_codex_provider(cx, stub.base_url)
    config = Path(cx.env["CODEX_HOME"]) / "config.toml"
    config.write_text(config.read_text().replace('wire_api = "responses"', 'wire_api = "chat"'))
    one_task(cx, "{retry_backoff: 0}", retries=1)
    assert cx.run("t.yaml").returncode == 1
    a = cx.task("a")
    assert a["status"] == "failed" and a["exit_code"] == 1
    for line in ("Error loading config.toml", '`wire_api = "chat"` is no longer supported',
                 'How to fix: set `wire_api = "responses"`', "model_providers.stub.wire_api"):
        assert line in a["error"]
    assert "PATH aliases" not in a["error"]
    assert a["attempts"] == 1
    assert stub.model_calls() == []
