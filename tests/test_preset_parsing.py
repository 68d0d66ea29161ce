"""Preset helpers and result parsing without processes: the corner cases of each format."""

from __future__ import annotations

import json
import time
import tomllib
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from parallel_dispatch.events import AgentEvent
from parallel_dispatch.presets import PRESETS, RUNNER_NAMES, accepts_model, model_family
from parallel_dispatch.runners.claude import ClaudeRunner
from parallel_dispatch.runners.codex import CodexRunner, classify, reset_after
from parallel_dispatch.runners.gemini import GeminiRunner
from parallel_dispatch.runners.llm import LlmRunner
from parallel_dispatch.runners.opencode import OpencodeRunner, tool_permissions
from parallel_dispatch.runners.preset import Call, json_object, toml_string
from parallel_dispatch.runners.registry import RUNNERS


class _Job:
    """Just enough of a Job for `parse` (which only looks at the scratch folder)."""


def call(tmp_path: Path) -> Call:
    return Call(job=_Job(), prompt="p", scratch=tmp_path)  # type: ignore[arg-type]


def dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()


@pytest.mark.parametrize("text", [
    "", "plain", 'quote " and \\ backslash', "line\nbreak\ttab\rcr", "ünïcödé 🚀 emoji",
    "\x00\x01\x1f\x7f control", "'''triple''' \"\"\"quotes\"\"\"", "${HOME} $(id) `id`",
])
def test_toml_string_round_trips(text: str) -> None:
    assert tomllib.loads(f"v = {toml_string(text)}")["v"] == text


def test_model_families_keep_claude_aliases_away_from_other_tools() -> None:
    assert model_family("sonnet") == "claude-alias"
    assert model_family("claude-sonnet-4-5") == "claude"
    assert model_family("gemini-2.5-pro") == "gemini" and model_family("flash") == "gemini-alias"
    assert model_family("anthropic/claude-sonnet-4-5") == "provider"
    assert model_family("gpt-5.1-codex") == "other"
    assert accepts_model("claude", "sonnet") and not accepts_model("codex", "sonnet")
    assert accepts_model("codex", "gpt-5.1-codex") and not accepts_model("gemini", "gpt-5")
    assert accepts_model("gemini", "pro") and not accepts_model("opencode", "gpt-5")
    assert accepts_model("opencode", "openai/gpt-5") and accepts_model("llm", "claude-3.5-haiku")
    assert not accepts_model("llm", "opus") and accepts_model("openai", "llama3.1:8b")


def test_registry_covers_every_configurable_runner() -> None:
    assert tuple(PRESETS) == tuple(RUNNERS) == RUNNER_NAMES


def test_json_object_tolerates_a_warning_before_the_payload() -> None:
    assert json_object(b'warning: something\n{"a": 1}\n') == {"a": 1}
    assert json_object(b'{\n  "a": 1\n}') == {"a": 1}
    assert json_object(b"no json here") is None
    assert json_object(b"") is None


# --- claude -------------------------------------------------------------------------


def test_claude_success_payload(tmp_path: Path) -> None:
    payload = {"type": "result", "subtype": "success", "is_error": False, "result": "answer",
               "total_cost_usd": 0.5, "num_turns": 3, "session_id": "s1",
               "usage": {"input_tokens": 10, "cache_creation_input_tokens": 5,
                         "cache_read_input_tokens": 100, "output_tokens": 7}}
    parsed = ClaudeRunner().parse(call(tmp_path), 0, dumps(payload), "")
    assert parsed.ok and parsed.text == "answer"
    assert parsed.metrics == {"cost_usd": 0.5, "input_tokens": 115, "cached_input_tokens": 100,
                              "output_tokens": 7, "turns": 3, "session_id": "s1"}


def test_claude_old_cost_field_and_missing_usage(tmp_path: Path) -> None:
    payload = {"type": "result", "subtype": "success", "result": "x", "cost_usd": 0.25}
    parsed = ClaudeRunner().parse(call(tmp_path), 0, dumps(payload), "")
    assert parsed.ok and parsed.metrics == {"cost_usd": 0.25}


def test_claude_without_json(tmp_path: Path) -> None:
    runner = ClaudeRunner()
    crashed = runner.parse(call(tmp_path), 1, b"", "Error: something broke\n")
    assert not crashed.ok and crashed.error == "Error: something broke (exit code 1)"
    silent = runner.parse(call(tmp_path), 0, b"plain text answer", "")
    assert not silent.ok and not silent.retryable and "claude --version" in (silent.error or "")


def stream(*events: dict[str, Any]) -> list[str]:
    return [json.dumps(e) for e in events]


INIT_API_KEY = {"type": "system", "subtype": "init", "model": "claude-sonnet-4-5",
                "tools": ["Read"], "apiKeySource": "ANTHROPIC_API_KEY",
                "claude_code_version": "2.1.332"}
RETRY_401 = {"type": "system", "subtype": "api_retry", "attempt": 1, "max_retries": 10,
             "retry_delay_ms": 519, "error_status": 401, "error": "authentication_failed"}


def watch_all(c: Call, lines: list[str]) -> list[AgentEvent | None]:
    runner = ClaudeRunner()
    return [runner.watch(c, line, "stdout") for line in lines]


def test_claude_401_retry_is_fatal_at_once_with_an_api_key(tmp_path: Path) -> None:
    init, retry = watch_all(call(tmp_path), stream(INIT_API_KEY, RETRY_401))
    assert init is not None and init.text == ("claude 2.1.332 started: model "
                                              "claude-sonnet-4-5, 1 tools")
    assert retry is not None and retry.fatal and retry.cause == "auth"
    assert retry.text.startswith("bad credentials: the API refused the credentials "
                                 "(HTTP 401 authentication_failed; claude was about to "
                                 "retry, 1/10)")


def test_claude_401_with_oauth_waits_for_a_second_one(tmp_path: Path) -> None:
    """claude.ai logins refresh their token after a 401; only a second one is final."""
    oauth = {**INIT_API_KEY, "apiKeySource": "none"}
    _, first, second = watch_all(call(tmp_path), stream(oauth, RETRY_401,
                                                        {**RETRY_401, "attempt": 2}))
    assert first is not None and not first.fatal and first.cause == "auth"
    assert second is not None and second.fatal


def test_claude_rate_limit_events_carry_the_wait(tmp_path: Path) -> None:
    c = call(tmp_path)
    (retry,) = watch_all(c, stream({**RETRY_401, "error_status": 429, "error": "rate_limit",
                                    "retry_delay_ms": 41876}))
    assert retry is not None and retry.cause == "rate_limit" and not retry.fatal
    assert retry.retry_after == pytest.approx(41.876)
    assert retry.text == "API retry 1/10: rate limited (HTTP 429 rate_limit), next try in 42 s"
    # claude.ai subscription limits (the stub cannot send these to an API-key client)
    reset = 2_000_000_000
    rejected, warning, allowed = watch_all(c, stream(
        {"type": "rate_limit_event", "rate_limit_info": {
            "status": "rejected", "resetsAt": reset, "rateLimitType": "five_hour"}},
        {"type": "rate_limit_event", "rate_limit_info": {
            "status": "allowed_warning", "utilization": 0.9, "rateLimitType": "seven_day"}},
        {"type": "rate_limit_event", "rate_limit_info": {"status": "allowed"}}))
    assert rejected is not None and rejected.cause == "quota"
    assert rejected.text.startswith("usage limit reached (five_hour, resets at ")
    assert rejected.retry_after is not None and rejected.retry_after > 0
    assert warning is not None and warning.text == "usage warning: 90% of the seven_day limit"
    assert allowed is None


def test_claude_tool_calls_tokens_and_refusals_become_events(tmp_path: Path) -> None:
    c = call(tmp_path)
    message = {"id": "msg_1", "usage": {"input_tokens": 1000, "cache_read_input_tokens": 234}}
    tool, text, again, refused, other = watch_all(c, stream(
        {"type": "assistant", "message": {**message, "content": [
            {"type": "tool_use", "name": "Bash", "input": {"command": "touch x"}}]}},
        {"type": "assistant", "message": {**message, "id": "msg_2",
                                          "content": [{"type": "text", "text": "hi"}]}},
        {"type": "assistant", "message": {**message, "id": "msg_2",
                                          "content": [{"type": "text", "text": "hi"}]}},
        {"type": "system", "subtype": "permission_denied", "tool_name": "Bash",
         "message": "touch needs approval."},
        {"type": "user", "message": {"content": []}}))
    assert tool is not None and (tool.kind, tool.text) == ("tool", "tool: Bash touch x")
    assert text is not None and text.kind == "tokens"
    assert text.text == "model answered (call 1): 1,234 input tokens so far"
    assert again is None  # the same message again (one event per content block)
    assert refused is not None and refused.text == "tool refused: Bash (touch needs approval.)"
    assert other is None
    runner = ClaudeRunner()
    assert runner.watch(c, "not json", "stdout") is None
    err = runner.watch(c, "Error: boom", "stderr")
    assert err is not None and err.kind == "error"


@pytest.mark.parametrize(("fields", "cause"), [
    ({"api_error_status": 401, "api_error_type": "authentication_error"}, "auth"),
    ({"api_error_status": 529, "api_error_type": "overloaded_error"}, "overloaded"),
    ({"api_error_status": 404, "api_error_type": "not_found_error"}, "bad_request"),
    ({"api_error_status": None, "api_error": "connection_failed"}, "unreachable"),
    ({"api_error_status": None, "api_error": "usage_limit_reached"}, "quota"),
    ({"api_error_status": None, "api_error": "max_output_tokens"}, None),
])
def test_claude_result_errors_are_classified_by_status_and_kind(
        tmp_path: Path, fields: dict[str, Any], cause: str | None) -> None:
    result = {"type": "result", "subtype": "success", "is_error": True,
              "result": "API Error: something", "num_turns": 1, **fields}
    parsed = ClaudeRunner().parse(call(tmp_path), 1, dumps(result), "")
    assert not parsed.ok and parsed.cause == cause
    assert parsed.error is not None and "API Error: something" in parsed.error
    assert parsed.retryable == (cause not in ("auth", "quota", "bad_request"))


def test_claude_rate_limited_result_keeps_claudes_last_wait(tmp_path: Path) -> None:
    out = b"\n".join(line.encode() for line in stream(
        {**RETRY_401, "error_status": 429, "error": "rate_limit", "retry_delay_ms": 40000},
        {"type": "result", "subtype": "success", "is_error": True, "api_error_status": 429,
         "result": "API Error: Request rejected (429)"}))
    parsed = ClaudeRunner().parse(call(tmp_path), 1, out, "")
    assert parsed.cause == "rate_limit" and parsed.retry_after == 40.0


USAGE_LIMIT_EVENT = {
    "type": "rate_limit_event", "rate_limit_info": {
        "status": "rejected", "resetsAt": 1778565600, "rateLimitType": "five_hour",
        "overageStatus": "rejected", "overageDisabledReason": "org_level_disabled",
        "isUsingOverage": False},
    "uuid": "2c5c5ff4-5b0c-4a4e-9d43-1c3a7f6e0c11", "session_id": "s1"}
"""A claude.ai plan limit as Claude Code 2.1.x prints it (paperclipai/paperclip PR 5776;
docs/design/quota-governor.md §3.1); `resetsAt` is epoch seconds."""


@pytest.mark.parametrize("result", [
    {"api_error_status": 429, "result": "You've hit your limit · resets 2pm (Asia/Shanghai)"},
    {"api_error_status": None, "api_error": "usage_limit_reached",
     "result": "Claude AI usage limit reached"},
])
def test_claude_usage_limit_waits_for_the_rejected_events_reset(
        tmp_path: Path, result: dict[str, Any]) -> None:
    """claude does not retry a plan limit and its result does not say when it resets: the
    rejected rate_limit_event before it does, so the task waits for it (quota, not a
    per-minute rate limit)."""
    resets = int(time.time()) + 3600
    event = {**USAGE_LIMIT_EVENT,
             "rate_limit_info": {**USAGE_LIMIT_EVENT["rate_limit_info"], "resetsAt": resets}}
    out = "\n".join(stream(INIT_API_KEY, event, {
        "type": "result", "subtype": "success", "is_error": True, **result})).encode()
    parsed = ClaudeRunner().parse(call(tmp_path), 1, out, "")
    assert parsed.cause == "quota" and not parsed.retryable
    assert parsed.retry_after == pytest.approx(3600, abs=5)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(resets))
    assert parsed.error is not None and parsed.error.startswith("usage quota exhausted: ")
    assert parsed.error.endswith(f"(five_hour limit, resets at {stamp})")
    # A later "allowed" event means the refusal is over: back to claude's own wait.
    allowed = {"type": "rate_limit_event", "rate_limit_info": {"status": "allowed"}}
    out = "\n".join(stream(event, allowed, {
        "type": "result", "subtype": "success", "is_error": True, "api_error_status": 429,
        "result": "API Error: Request rejected (429)"})).encode()
    parsed = ClaudeRunner().parse(call(tmp_path), 1, out, "")
    assert parsed.cause == "rate_limit" and parsed.retry_after is None


# --- codex, gemini, opencode, llm ----------------------------------------------------------


def test_codex_prefers_the_last_message_file_and_sums_turns(tmp_path: Path) -> None:
    (tmp_path / "last-message.txt").write_text("final answer")
    events = b"\n".join(dumps(e) for e in [
        {"type": "thread.started", "thread_id": "t1"},
        {"type": "item.completed", "item": {"type": "agent_message", "text": "interim"}},
        {"type": "turn.completed", "usage": {"input_tokens": 5, "output_tokens": 1}},
        {"type": "turn.completed", "usage": {"input_tokens": 7, "cached_input_tokens": 3,
                                             "output_tokens": 2, "reasoning_output_tokens": 9}},
    ])
    parsed = CodexRunner().parse(call(tmp_path), 0, b"noise\n" + events, "")
    assert parsed.ok and parsed.text == "final answer"
    assert parsed.metrics == {"session_id": "t1", "input_tokens": 12, "output_tokens": 3,
                              "cached_input_tokens": 3, "reasoning_output_tokens": 9,
                              "turns": 2}


def test_codex_falls_back_to_the_last_agent_message(tmp_path: Path) -> None:
    events = dumps({"type": "item.completed", "item": {"type": "agent_message", "text": "hi"}})
    parsed = CodexRunner().parse(call(tmp_path), 0, events, "")
    assert parsed.ok and parsed.text == "hi"


def test_codex_with_no_events_points_at_the_version(tmp_path: Path) -> None:
    parsed = CodexRunner().parse(call(tmp_path), 0, b"", "")
    assert not parsed.ok and "codex --version" in (parsed.error or "")


# Lines as codex-cli 0.171.0 printed them against tests/stubs/openai_responses.py.
CODEX_401 = ("unexpected status 401 Unauthorized: Incorrect API key provided: sk-bad***key. "
             "You can find your API key at https://platform.openai.com/account/api-keys., "
             "url: http://127.0.0.1:45833/v1/responses, request id: req_stub000001")
CODEX_WS_404 = ("unexpected status 404 Not Found: Invalid URL (GET /v1/responses), "
                "url: ws://127.0.0.1:45387/v1/responses, request id: req_stub000004")


@pytest.mark.parametrize(("message", "cause"), [
    (CODEX_401, "auth"),
    ("Missing environment variable: `STUB_API_KEY`.", "auth"),
    ("exceeded retry limit, last status: 429 Too Many Requests, request id: r1", "rate_limit"),
    ("You\u2019ve hit your usage limit. Upgrade to Pro (https://chatgpt.com/explore/pro), "
     "visit https://chatgpt.com/settings/usage to purchase more credits or try again at "
     "12:36 PM.", "quota"),
    ("Selected model is at capacity. Please try a different model.", "overloaded"),
    ("We\u2019re currently experiencing high demand, which may cause temporary errors.",
     "server"),
    ("stream disconnected before completion: stream closed before response.completed",
     "server"),
    ("Connection failed: error sending request", "unreachable"),
    ("stream disconnected before completion: failed to lookup address information: Name "
     "does not resolve", "unreachable"),
    ('{"error": {"message": "bad", "type": "invalid_request_error"}}', "bad_request"),
    (CODEX_WS_404, None),  # a WebSocket upgrade refused: codex falls back to HTTPS
    ("The agent could not finish the task", None),
])
def test_codex_names_the_cause_of_its_errors(message: str, cause: str | None) -> None:
    assert classify(message) == cause


def test_codex_usage_limit_reset_time_becomes_seconds() -> None:
    """Up to the end of the printed minute: codex drops the seconds of `resets_at`."""
    now = datetime(2026, 11, 29, 12, 0, 30)
    assert reset_after("... or try again at 12:46 PM.", now) == 47 * 60 - 30
    assert reset_after("Try again at 1:05 AM.", now) == pytest.approx(13 * 3600 + 6 * 60 - 30)
    assert reset_after("try again at Dec 2nd, 2026 3:05 PM.", now) == \
        (datetime(2026, 12, 2, 15, 6) - now).total_seconds()
    assert reset_after("or try again later.", now) is None
    # The minute it was printed in (the reset is this minute's :59 at the latest).
    assert reset_after("try again at 12:00 PM.", now) == 30


def watch(line: str | dict[str, Any], stream: str = "stdout") -> Any:
    text = line if isinstance(line, str) else json.dumps(line)
    return CodexRunner().watch(None, text, stream)  # type: ignore[arg-type]


def test_codex_watch_ends_a_rejected_key_at_the_first_retry() -> None:
    ev = watch({"type": "error", "message": f"Reconnecting... 1/5 ({CODEX_401})"})
    assert ev.fatal and ev.cause == "auth" and ev.kind == "retry"
    assert ev.text.startswith("bad credentials: unexpected status 401") and "codex login" in ev.text


def test_codex_watch_reports_retries_as_progress_with_their_cause() -> None:
    ws = watch({"type": "error", "message": f"Reconnecting... 2/5 ({CODEX_WS_404})"})
    assert ws.kind == "retry" and ws.cause is None and not ws.fatal
    assert ws.text.startswith("API retry 2/5: unexpected status 404")
    rate = watch({"type": "error", "message": "Reconnecting... 3/5 (exceeded retry limit, "
                                              "last status: 429 Too Many Requests)"})
    assert rate.cause == "rate_limit" and not rate.fatal
    net = watch({"type": "error", "message": "Reconnecting... waiting for network "
                                             "(Connection failed: error sending request)"})
    assert net.cause == "unreachable" and "waiting for network" in net.text
    assert watch({"type": "turn.started"}).text == "turn started, waiting for the model"
    tool = watch({"type": "item.started", "item": {"type": "command_execution",
                                                   "command": "/bin/bash -lc 'touch m'"}})
    assert tool.kind == "tool" and "touch m" in tool.text
    tokens = watch({"type": "turn.completed", "usage": {"input_tokens": 5,
                                                        "output_tokens": 2}})
    assert tokens.kind == "tokens" and "5 input" in tokens.text
    assert watch("2026-11-29T11:39:10Z ERROR codex_api::endpoint::responses_websocket: "
                 "failed to connect to Responses WebSocket", "stderr") is None
    assert watch("not json") is None


def test_codex_error_events_before_a_completed_turn_are_not_a_failure(tmp_path: Path) -> None:
    """issue 8: `Reconnecting... n/5` then success, exit 0, must be a success."""
    (tmp_path / "last-message.txt").write_text("answer")
    events = b"\n".join(dumps(e) for e in [
        {"type": "thread.started", "thread_id": "t1"},
        {"type": "turn.started"},
        {"type": "error", "message": f"Reconnecting... 2/5 ({CODEX_WS_404})"},
        {"type": "item.completed", "item": {"id": "item_1", "type": "error", "message":
                                            "Falling back from WebSockets to HTTPS transport."}},
        {"type": "item.completed", "item": {"type": "agent_message", "text": "answer"}},
        {"type": "turn.completed", "usage": {"input_tokens": 5, "output_tokens": 1}},
    ])
    parsed = CodexRunner().parse(call(tmp_path), 0, events, "")
    assert parsed.ok and parsed.text == "answer"


def test_codex_failed_turn_is_named_by_cause_with_its_retries(tmp_path: Path) -> None:
    message = "exceeded retry limit, last status: 429 Too Many Requests, request id: r6"
    events = b"\n".join(dumps(e) for e in [
        *({"type": "error", "message": f"Reconnecting... {n}/5 ({message})"}
          for n in range(1, 6)),
        {"type": "error", "message": message},
        {"type": "turn.failed", "error": {"message": message}},
    ])
    parsed = CodexRunner().parse(call(tmp_path), 1, events, "")
    assert not parsed.ok and parsed.cause == "rate_limit" and parsed.retryable
    assert parsed.error == f"rate limited: {message} (after 5 retries)"


def test_codex_rejected_request_keeps_the_providers_message(tmp_path: Path) -> None:
    body = json.dumps({"error": {"message": "Unsupported parameter: 'x'",
                                 "type": "invalid_request_error", "param": None}})
    events = b"\n".join(dumps(e) for e in [{"type": "error", "message": body},
                                           {"type": "turn.failed", "error": {"message": body}}])
    parsed = CodexRunner().parse(call(tmp_path), 1, events, "")
    assert parsed.cause == "bad_request" and not parsed.retryable
    assert parsed.error == ("request rejected by the provider: Unsupported parameter: 'x' "
                            "(invalid_request_error)")


def test_codex_keeps_a_multi_line_config_error_whole(tmp_path: Path) -> None:
    stderr = (
        'WARNING: proceeding, even though we could not create PATH aliases: Refusing to '
        'create helper binaries under temporary dir "/tmp"\n'
        "Error loading config.toml:\n"
        "/home/u/.codex/config.toml:1:9: string values must be quoted, expected literal "
        "string\n  |\n1 | model = \n  |         ^\n")
    parsed = CodexRunner().parse(call(tmp_path), 1, b"", stderr)
    assert not parsed.ok and not parsed.retryable and parsed.cause is None
    assert parsed.error == (
        "Error loading config.toml:\n/home/u/.codex/config.toml:1:9: string values must be "
        "quoted, expected literal string\n  |\n1 | model =\n  |         ^\n(exit code 1)")


def gemini_stream(*events: dict[str, Any]) -> bytes:
    return b"\n".join(dumps(e) for e in events) + b"\n"


GOOGLE_400 = {"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.",
                        "status": "INVALID_ARGUMENT", "details": [
                            {"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                             "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]}}


def test_gemini_answer_is_the_last_turns_text_and_turns_are_counted(tmp_path: Path) -> None:
    stream = gemini_stream(
        {"type": "init", "session_id": "s1", "model": "gemini-2.5-flash"},
        {"type": "message", "role": "user", "content": "p"},
        {"type": "message", "role": "assistant", "content": "Let me ", "delta": True},
        {"type": "message", "role": "assistant", "content": "look.", "delta": True},
        {"type": "tool_use", "tool_name": "read_file", "tool_id": "t1",
         "parameters": {"file_path": "a.py"}},
        {"type": "tool_result", "tool_id": "t1", "status": "success", "output": ""},
        {"type": "message", "role": "assistant", "content": "final ", "delta": True},
        {"type": "message", "role": "assistant", "content": "answer", "delta": True},
        {"type": "result", "status": "success", "stats": {
            "input_tokens": 30, "output_tokens": 3, "cached": 4, "tool_calls": 1}},
    )
    parsed = GeminiRunner().parse(call(tmp_path), 0, b"noise\n" + stream, "")
    assert parsed.ok and parsed.text == "final answer"
    assert parsed.metrics == {"session_id": "s1", "input_tokens": 30, "output_tokens": 3,
                              "cached_input_tokens": 4, "turns": 2}


def test_gemini_error_before_the_result_event_is_read_from_stderr(tmp_path: Path) -> None:
    stderr = ("Warning: 256-color support not detected.\nError when talking to Gemini API Full "
              "report available at: /tmp/r.json _ApiError: " + json.dumps(GOOGLE_400) +
              "\n    at throwErrorIfNotOK (file:///x.js:1:1)\n  status: 400\n}\n"
              "An unexpected critical error occurred:[object Object]\n")
    parsed = GeminiRunner().parse(call(tmp_path), 1, b"", stderr)
    assert not parsed.ok and parsed.cause == "auth"
    assert (parsed.error or "").startswith("bad credentials: API key not valid.")


@pytest.mark.parametrize(("code", "message", "cause", "needle", "retry_after"), [
    (144, f"[API Error: {json.dumps(GOOGLE_400)}]", "auth",
     "bad credentials: API key not valid. Please pass a valid API key. (HTTP 400 "
     "INVALID_ARGUMENT) (exit code 144); set GEMINI_API_KEY", None),
    (173, "[API Error: You exceeded your current quota.\nSuggested retry after 37s.]\nPlease "
          "wait and try again later.", "rate_limit", "rate limited: You exceeded", 37.0),
    (173, "[API Error: You have exhausted your daily quota on this model.]", "quota",
     "usage quota exhausted: You have exhausted your daily quota", None),
    # A terminal quota error past gemini's 300 s retry cap: the pool waits the 3600 s.
    (173, "[API Error: You exceeded your current quota, please check your plan and billing "
          "details. For more information on this error, head to: https://ai.google.dev/"
          "gemini-api/docs/rate-limits.\nSuggested retry after 3600s.]", "rate_limit",
     "rate limited: You exceeded your current quota", 3600.0),
    # `limit: 0`: no quota for this model at all; its window's wait is not a reset.
    (173, "[API Error: You exceeded your current quota, please check your plan and billing "
          "details. * Quota exceeded for metric: generativelanguage.googleapis.com/"
          "generate_content_free_tier_requests, limit: 0, model: gemini-2.5-pro\nPlease "
          "retry in 52.3s.]", "quota", "usage quota exhausted: You exceeded", None),
    (247, "", "overloaded",
     "provider overloaded: gemini exited with HTTP status 503 (exit code 247)", None),
    (244, "[API Error: {\"error\":{\"code\":500,\"message\":\"boom\",\"status\":"
          "\"INTERNAL\"}}]", "server", "provider server error: boom (HTTP 500 INTERNAL)", None),
    (1, "[API Error: exception TypeError: fetch failed sending request]", "unreachable",
     "provider unreachable: exception TypeError: fetch failed sending request (exit code 1)",
     None),
    (148, "[API Error: models/x is not found for API version v1beta]", "bad_request",
     "request rejected by the provider: models/x is not found", None),
])
def test_gemini_names_the_provider_problem(tmp_path: Path, code: int, message: str,
                                           cause: str, needle: str,
                                           retry_after: float | None) -> None:
    result = {"type": "result", "status": "error", "stats": {}}
    if message:
        result["error"] = {"type": "unknown", "message": message}
    parsed = GeminiRunner().parse(call(tmp_path), code, gemini_stream(result), "")
    assert not parsed.ok and parsed.cause == cause
    assert needle in (parsed.error or "")
    assert parsed.retry_after == retry_after
    assert parsed.retryable is (cause not in ("auth", "quota", "bad_request"))


def test_gemini_own_exit_codes_lose_their_ansi(tmp_path: Path) -> None:
    untrusted = "\x1b[31mGemini CLI is not running in a trusted directory.\x1b[0m\n"
    parsed = GeminiRunner().parse(call(tmp_path), 55, b"", "Warning: 256-color support not "
                                  "detected.\n" + untrusted)
    assert not parsed.ok and not parsed.retryable and parsed.cause is None
    assert parsed.error == ("workspace not trusted (exit code 55): Gemini CLI is not running in "
                            "a trusted directory.; the preset sets GEMINI_CLI_TRUST_WORKSPACE="
                            "true; do not override it in the agent's env, or trust the folder "
                            "in gemini")
    no_key = ("When using Gemini API, you must specify the GEMINI_API_KEY environment variable.\n"
              "Update your environment and try again (no reload needed if using .env)!\n")
    auth = GeminiRunner().parse(call(tmp_path), 41, b"", no_key)
    assert auth.cause == "auth" and not auth.retryable
    assert (auth.error or "").startswith("bad credentials: When using Gemini API, you must "
                                         "specify the GEMINI_API_KEY environment variable. "
                                         "Update your environment")


def test_gemini_watch_reads_retries_and_stops_on_bad_credentials(tmp_path: Path) -> None:
    runner, c = GeminiRunner(), call(tmp_path)
    retry = runner.watch(c, 'Attempt 2 failed with status 503. Retrying with backoff... '
                         '_ApiError: {"error":{"code":503,"message":"The model is overloaded.",'
                         '"status":"UNAVAILABLE"}}', "stderr")
    assert retry is not None and retry.kind == "retry" and retry.cause == "overloaded"
    assert retry.text.startswith("API retry 2: provider overloaded (The model is overloaded.")
    assert not retry.fatal
    denied = runner.watch(c, "Attempt 1 failed with status 400. Retrying with backoff... "
                          f"_ApiError: {json.dumps(GOOGLE_400)}", "stderr")
    assert denied is not None and denied.cause == "auth" and denied.fatal
    wait = runner.watch(c, "Suggested retry after 37s.. Retrying after 37512ms...", "stderr")
    assert wait is not None and wait.cause == "rate_limit" and wait.retry_after == 37.0
    offline = runner.watch(c, "Attempt 3 failed. Retrying with backoff... Error: exception "
                           "TypeError: fetch failed sending request", "stderr")
    assert offline is not None and offline.cause == "unreachable"
    tool = runner.watch(c, dumps({"type": "tool_use", "tool_name": "run_shell_command",
                                  "parameters": {"command": "ls -la"}}).decode(), "stdout")
    assert tool is not None and tool.kind == "tool"
    assert tool.text == "tool run_shell_command: ls -la"
    assert runner.watch(c, "    at async Turn.run (file:///x.js:1:1)", "stderr") is None
    assert runner.watch(c, "Ripgrep is not available. Falling back to GrepTool.",
                        "stderr") is None


def oc_events(*events: dict[str, Any]) -> bytes:
    return b"\n".join(dumps({"sessionID": "ses_1", **e}) for e in events)


def oc_part(kind: str, **part: Any) -> dict[str, Any]:
    return {"type": kind, "part": part}


OC_FALLBACK = '\x1b[93m\x1b[1m! \x1b[0m agent "x" not found. Falling back to default agent'
"""What opencode 1.18.33 prints on stderr for an unknown --agent, colours and all."""


def oc_log(message: str, **fields: str) -> str:
    """An opencode `--print-logs` line as 1.18.33 writes it."""
    extra = "".join(f" {k}={json.dumps(v) if ' ' in v else v}" for k, v in fields.items())
    return (f'timestamp=2026-11-29T11:40:00.473Z level=ERROR run=e4c9c355 message="{message}"'
            f"{extra}")


def test_opencode_takes_the_last_steps_text_and_treats_fallback_as_error(tmp_path: Path) -> None:
    stream = oc_events(
        oc_part("step_start"), oc_part("text", text="let me look"),
        oc_part("step_finish", cost=0.1, tokens={"input": 10, "output": 2, "reasoning": 1,
                                                 "cache": {"read": 5, "write": 0}}),
        oc_part("step_start"), oc_part("text", text="final"), oc_part("text", text="answer"),
        oc_part("step_finish", cost=0.2, tokens={"input": 3, "output": 4}),
    )
    runner = OpencodeRunner()
    parsed = runner.parse(call(tmp_path), 0, stream, "")
    assert parsed.ok and parsed.text == "final\nanswer"
    assert parsed.metrics["cost_usd"] == pytest.approx(0.3)
    assert (parsed.metrics["input_tokens"], parsed.metrics["output_tokens"],
            parsed.metrics["turns"], parsed.metrics["session_id"]) == (18, 7, 2, "ses_1")
    warned = runner.parse(call(tmp_path), 0, stream, OC_FALLBACK + "\n")
    assert not warned.ok and not warned.retryable
    assert warned.error == ('agent "x" not found. Falling back to default agent; the agent\'s '
                            "definition was not used: check .opencode/agent/ and its 'mode'")


def oc_error(name: str = "APIError", **data: Any) -> dict[str, Any]:
    return {"type": "error", "error": {"name": name, "data": data}}


@pytest.mark.parametrize(("event", "cause", "retryable", "retry_after", "needle"), [
    (oc_error(message="Incorrect API key provided: sk-bad***key.", statusCode=401,
              isRetryable=False), "auth", False, None,
     "bad credentials: HTTP 401: Incorrect API key provided"),
    (oc_error(message="Rate limit reached for stub-model. Please try again in 2s.",
              statusCode=429, isRetryable=True,
              responseHeaders={"retry-after": "2", "x-ratelimit-reset-requests": "2s"}),
     "rate_limit", True, 2.0, "rate limited: HTTP 429: Rate limit reached"),
    (oc_error(message="Rate limit reached", statusCode=429, isRetryable=True,
              responseHeaders={"x-ratelimit-reset-requests": "120ms",
                               "x-ratelimit-reset-tokens": "6m0s"}),
     "rate_limit", True, 360.0, "retry after 360 s"),
    (oc_error(message="You exceeded your current quota, please check your plan and billing "
                      "details.", statusCode=429, isRetryable=True,
              responseBody='{"error": {"type": "insufficient_quota", "code": '
                           '"insufficient_quota"}}'),
     "quota", False, None, "usage quota exhausted: HTTP 429: You exceeded"),
    (oc_error(message="Overloaded", statusCode=529, isRetryable=True), "overloaded", True,
     None, "provider overloaded: HTTP 529: Overloaded"),
    (oc_error(message="The server had an error", statusCode=500, isRetryable=True), "server",
     True, None, "provider server error: HTTP 500"),
    (oc_error("ContextOverflowError", message="This model's maximum context length is 8192 "
                                              "tokens."), "bad_request", False, None,
     "request rejected by the provider: This model's maximum context length"),
    (oc_error(message="Cannot connect to API: Unable to connect. Is the computer able to "
                      "access the url?", isRetryable=True,
              metadata={"url": "http://127.0.0.1:9/v1/chat/completions"}),
     "unreachable", True, None,
     "provider unreachable: Cannot connect to API: Unable to connect. Is the computer able to "
     "access the url? (http://127.0.0.1:9/v1/chat/completions)"),
])
def test_opencode_error_events_are_classified_by_status(
        tmp_path: Path, event: dict[str, Any], cause: str, retryable: bool,
        retry_after: float | None, needle: str) -> None:
    """The `error` event shapes opencode 1.18.33 printed against the stub."""
    runner = OpencodeRunner()
    second = oc_error(message="later error from compaction", statusCode=500)
    parsed = runner.parse(call(tmp_path), 1, oc_events(oc_part("step_start"), event, second),
                          "")
    assert not parsed.ok and parsed.cause == cause and parsed.retryable is retryable
    assert parsed.retry_after == retry_after
    assert needle in (parsed.error or "")
    live = runner.watch(call(tmp_path), json.dumps(event), "stdout")
    assert live is not None and live.cause == cause and live.fatal is (cause == "auth")


def test_opencode_other_failures(tmp_path: Path) -> None:
    runner = OpencodeRunner()
    auth = runner.parse(call(tmp_path), 1, oc_events(oc_error(
        "ProviderAuthError", providerID="anthropic", message="API key is missing or invalid")),
        "")
    assert auth.cause == "auth" and not auth.retryable and "opencode auth login" in (
        auth.error or "")
    model = runner.parse(call(tmp_path), 1, oc_events(oc_error(
        "ProviderModelNotFoundError", providerID="x", modelID="", message="Model not found")),
        "")
    assert model.cause is None and not model.retryable
    assert 'model = "provider/model"' in (model.error or "")
    unknown = runner.parse(call(tmp_path), 1, oc_events(oc_error(
        "UnknownError", message="Unexpected server error. Check server logs for details.")),
        "")
    assert not unknown.ok and unknown.cause is None
    assert unknown.error == ("UnknownError: Unexpected server error. Check server logs for "
                             "details. (exit code 1)")
    crashed = runner.parse(call(tmp_path), 1, b"",
                           oc_log("failed", error="boom") + "\nError: no such flag\n")
    assert not crashed.ok and crashed.error == "Error: no such flag (exit code 1)"
    silent = runner.parse(call(tmp_path), 0, b"", "")
    assert not silent.ok and "opencode --version" in (silent.error or "")


def test_opencode_watch_turns_logs_and_events_into_live_progress(tmp_path: Path) -> None:
    runner = OpencodeRunner()
    c = call(tmp_path)
    stream_error = oc_log("stream error", providerID="stub", agent="build",
                          **{"error.error": "AI_APICallError: Cannot connect to API: Unable to "
                                            "connect. Is the computer able to access the url? "
                                            "(cause: Error: Unable to connect.)"})
    first = runner.watch(c, stream_error, "stderr")
    assert first is not None and first.kind == "retry" and first.cause == "unreachable"
    assert first.text == ("provider unreachable (failed API call 1, opencode retries): Cannot "
                          "connect to API: Unable to connect. Is the computer able to access "
                          "the url?")
    second = runner.watch(c, stream_error, "stderr")
    assert second is not None and "failed API call 2" in second.text
    title = oc_log("stream error", agent="title", **{"error.error": "AI_RetryError: x"})
    assert runner.watch(c, title, "stderr") is None  # the title agent is not the task
    bad_key = oc_log("stream error", agent="build",
                     **{"error.error": "AI_APICallError: Incorrect API key provided"})
    c2 = call(tmp_path)
    once = runner.watch(c2, bad_key, "stderr")
    assert once is not None and once.cause == "auth" and not once.fatal  # the event follows
    again = runner.watch(c2, bad_key, "stderr")  # opencode retrying a 401: stop it
    assert again is not None and again.fatal and again.text.startswith("bad credentials: ")
    fallback = runner.watch(c, OC_FALLBACK, "stderr")
    assert fallback is not None and fallback.fatal and fallback.kind == "error"
    step = runner.watch(c, json.dumps(oc_part("step_start")), "stdout")
    assert step is not None and step.text == "step 1: waiting for the model"
    tool = runner.watch(c, json.dumps(oc_part("tool_use", tool="bash", state={
        "status": "completed", "input": {"command": "touch x"}})), "stdout")
    assert tool is not None and tool.kind == "tool" and tool.text == "tool bash completed (touch x)"
    done = runner.watch(c, json.dumps(oc_part("step_finish", reason="stop", tokens={
        "input": 1000, "output": 34, "cache": {"read": 200}})), "stdout")
    assert done is not None and done.kind == "tokens"
    assert done.text == "step 1 done (stop); tokens so far: 1,200 input, 34 output"
    assert runner.watch(c, oc_log("stream", level="INFO"), "stderr") is None


def test_opencode_live_rate_limit_carries_the_wait_its_message_states(tmp_path: Path) -> None:
    """opencode's `stream error` line has no headers, but OpenAI's 429 body says how long
    to wait: the pool is told at once, instead of guessing a backoff per failed call."""
    line = ('timestamp=2026-11-29T17:15:23.250Z level=ERROR run=c4e9ed1e message="stream '
            'error" providerID=stub modelID=stub-model session.id=ses_dd7b22c04ffemQQBxEai6gttMQ'
            ' small=false agent=pd-reviewer mode=primary error.error="AI_APICallError: Rate '
            'limit reached for stub-model in organization org-stub on requests per min (RPM): '
            'Limit 3, Used 3, Requested 1. Please try again in 1s. Visit https://platform.'
            'openai.com/account/rate-limits to learn more."')
    ev = OpencodeRunner().watch(call(tmp_path), line, "stderr")
    assert ev is not None and (ev.kind, ev.cause, ev.retry_after) == ("retry", "rate_limit", 1.0)
    other = oc_log("stream error", agent="build",
                   **{"error.error": "AI_APICallError: Rate limit reached"})
    ev = OpencodeRunner().watch(call(tmp_path), other, "stderr")
    assert ev is not None and ev.cause == "rate_limit" and ev.retry_after is None


def test_opencode_tool_lists_become_permissions() -> None:
    assert tool_permissions(("Read", "Grep", "Glob")) == {
        "*": "deny", "read": "allow", "grep": "allow", "glob": "allow"}
    assert tool_permissions(("Write", "Edit", "Bash(git log:*)", "Bash(git diff)",
                             "mcp__github__create_issue")) == {
        "*": "deny", "edit": "allow", "bash": {"*": "deny", "git log*": "allow",
                                                "git diff": "allow"}}
    assert tool_permissions(("Bash(ls:*)", "Bash")) == {"*": "deny", "bash": "allow"}


@pytest.mark.parametrize(("stderr", "cause", "retryable", "retry_after"), [
    ("Error: Error code: 401 - Incorrect API key provided: sk-bad***key.", "auth", False, None),
    ("Error: No key found - add one using 'llm keys set stub' or set the  environment "
     "variable", "auth", False, None),
    ("Error: Error code: 429 - Rate limit reached for stub-model in organization org-stub on "
     "requests per min (RPM): Limit 3, Used 3, Requested 1. Please try again in 2s.",
     "rate_limit", True, 2.0),
    ("Error: Error code: 429 - Rate limit reached for model `llama-3.1-8b-instant` on tokens "
     "per day (TPD): Limit 500000, Used 499771, Requested 1042. Please try again in 1m2.64s.",
     "rate_limit", True, 62.64),
    ("Error: Error code: 429 - Rate limit reached. Please try again in 120ms.",
     "rate_limit", True, 0.12),
    ("Error: Error code: 429 - You exceeded your current quota, please check your plan and "
     "billing details.", "quota", False, None),
    ("Error: Error code: 529 - Overloaded", "overloaded", True, None),
    ("Error: Error code: 503 - The server is overloaded, please try again later.",
     "overloaded", True, None),
    ("Error: Error code: 500 - The server had an error while processing your request.",
     "server", True, None),
    ("Error: Error code: 400 - This model's maximum context length is 8192 tokens.",
     "bad_request", False, None),
    ("Error: Requested tokens (931) exceed context window of 512", "bad_request", False, None),
    ("Error: Connection error.", "unreachable", True, None),
])
def test_llm_errors_are_classified(tmp_path: Path, stderr: str, cause: str, retryable: bool,
                                   retry_after: float | None) -> None:
    """The `Error:` lines llm 0.36 printed against the stub (and SmolLM2)."""
    parsed = LlmRunner().parse(call(tmp_path), 1, b"", stderr + "\n")
    assert not parsed.ok and parsed.cause == cause and parsed.retryable is retryable
    assert parsed.retry_after == retry_after
    assert parsed.error is not None and stderr.removeprefix("Error: ") in parsed.error


def test_llm_usage_line_unknown_model_and_live_events(tmp_path: Path) -> None:
    runner = LlmRunner()
    ok = runner.parse(call(tmp_path), 0, b"answer\n", "Token usage: 12,345 input, 6 output\n")
    assert ok.ok and ok.text == "answer\n"
    assert ok.metrics == {"input_tokens": 12345, "output_tokens": 6, "turns": 1}
    none = runner.parse(call(tmp_path), 0, b"answer\n", "Token usage: \n")  # SmolLM2
    assert none.ok and none.metrics == {"turns": 1}
    bad = runner.parse(call(tmp_path), 1, b"", "Error: 'Unknown model: nope'\n")
    assert not bad.ok and not bad.retryable and "llm models" in (bad.error or "")
    c = call(tmp_path)
    retry = runner.watch(c, "[2026-11-29 11:51:37 - openai._base_client:1272 - INFO] Retrying "
                            "request in 2.000000 seconds (retry 1 of 2)", "stderr")
    assert retry is not None and retry.kind == "retry" and retry.text == "API retry 1/2 in 2.0 s"
    error = runner.watch(c, "Error: Error code: 529 - Overloaded", "stderr")
    assert error is not None and error.cause == "overloaded" and error.retry_after is None
    # The final 429 seen live tells the pool its stated wait before the process exits.
    limited = runner.watch(c, "Error: Error code: 429 - Rate limit reached for stub-model in "
                              "organization org-stub on requests per min (RPM): Limit 3, Used "
                              "3, Requested 1. Please try again in 1m2.64s. Visit https://"
                              "platform.openai.com/account/rate-limits to learn more.", "stderr")
    assert limited is not None and limited.cause == "rate_limit"
    assert limited.retry_after == pytest.approx(62.64)
    assert runner.watch(c, "answer", "stdout") is None
