"""Preset helpers and result parsing without processes: the corner cases of each format."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from parallel_dispatch.config import RUNNER_NAMES
from parallel_dispatch.runners.claude import ClaudeRunner
from parallel_dispatch.runners.codex import CodexRunner
from parallel_dispatch.runners.gemini import GeminiRunner
from parallel_dispatch.runners.llm import LlmRunner
from parallel_dispatch.runners.opencode import OpencodeRunner
from parallel_dispatch.runners.preset import Call, json_object, model_family, toml_string
from parallel_dispatch.runners.registry import PRESETS, accepts_model


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
    assert tuple(PRESETS) == RUNNER_NAMES


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


def test_claude_error_subtypes_are_final(tmp_path: Path) -> None:
    payload = {"type": "result", "subtype": "error_max_budget_usd", "is_error": True,
               "errors": ["Reached maximum budget"], "total_cost_usd": 1.0}
    parsed = ClaudeRunner().parse(call(tmp_path), 0, dumps(payload), "")
    assert not parsed.ok and not parsed.retryable
    assert parsed.error is not None and parsed.error.startswith("Reached maximum budget")
    assert parsed.metrics["cost_usd"] == 1.0


def test_claude_api_error_is_retryable(tmp_path: Path) -> None:
    payload = {"type": "result", "subtype": "success", "is_error": True,
               "result": "API Error: 529 Overloaded"}
    parsed = ClaudeRunner().parse(call(tmp_path), 1, dumps(payload), "")
    assert not parsed.ok and parsed.retryable and "529" in (parsed.error or "")


def test_claude_without_json(tmp_path: Path) -> None:
    runner = ClaudeRunner()
    crashed = runner.parse(call(tmp_path), 1, b"", "Error: something broke\n")
    assert not crashed.ok and crashed.error == "Error: something broke (exit code 1)"
    silent = runner.parse(call(tmp_path), 0, b"plain text answer", "")
    assert not silent.ok and not silent.retryable and "claude --version" in (silent.error or "")


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
                              "cached_input_tokens": 3, "turns": 2}


def test_codex_falls_back_to_the_last_agent_message(tmp_path: Path) -> None:
    events = dumps({"type": "item.completed", "item": {"type": "agent_message", "text": "hi"}})
    parsed = CodexRunner().parse(call(tmp_path), 0, events, "")
    assert parsed.ok and parsed.text == "hi"


def test_codex_with_no_events_points_at_the_version(tmp_path: Path) -> None:
    parsed = CodexRunner().parse(call(tmp_path), 0, b"", "")
    assert not parsed.ok and "codex --version" in (parsed.error or "")


def test_gemini_fatal_json_on_stderr(tmp_path: Path) -> None:
    stderr = json.dumps({"session_id": "s", "error": {"type": "FatalToolExecutionError",
                                                      "message": "disk full", "code": 54}},
                        indent=2)
    parsed = GeminiRunner().parse(call(tmp_path), 54, b"", "warning\n" + stderr)
    assert not parsed.ok and parsed.retryable
    assert parsed.error == "tool execution failed (exit code 54): disk full; see the task log"


def test_gemini_sums_tokens_over_models(tmp_path: Path) -> None:
    payload = {"response": "ok", "stats": {"models": {
        "a": {"tokens": {"prompt": 10, "candidates": 1, "cached": 4}},
        "b": {"tokens": {"prompt": 20, "candidates": 2}}}}}
    parsed = GeminiRunner().parse(call(tmp_path), 0, json.dumps(payload, indent=2).encode(), "")
    assert parsed.ok and parsed.text == "ok"
    assert parsed.metrics == {"input_tokens": 30, "cached_input_tokens": 4, "output_tokens": 3}


def test_opencode_takes_the_last_steps_text_and_treats_fallback_as_error(tmp_path: Path) -> None:
    def ev(kind: str, **part: Any) -> bytes:
        return dumps({"type": kind, "sessionID": "ses", "part": part})

    stream = b"\n".join([
        ev("step_start"), ev("text", text="let me look"),
        ev("step_finish", cost=0.1, tokens={"input": 10, "output": 2, "reasoning": 1,
                                            "cache": {"read": 5, "write": 0}}),
        ev("step_start"), ev("text", text="final"), ev("text", text="answer"),
        ev("step_finish", cost=0.2, tokens={"input": 3, "output": 4}),
    ])
    runner = OpencodeRunner()
    parsed = runner.parse(call(tmp_path), 0, stream, "")
    assert parsed.ok and parsed.text == "final\nanswer"
    assert parsed.metrics["cost_usd"] == pytest.approx(0.3)
    assert (parsed.metrics["input_tokens"], parsed.metrics["output_tokens"],
            parsed.metrics["turns"]) == (18, 7, 2)
    warned = runner.parse(call(tmp_path), 0, stream,
                          '!  agent "x" not found. Falling back to default agent\n')
    assert not warned.ok and not warned.retryable and "not found" in (warned.error or "")


def test_llm_usage_line_and_unknown_model(tmp_path: Path) -> None:
    runner = LlmRunner()
    ok = runner.parse(call(tmp_path), 0, b"answer\n", "Token usage: 12,345 input, 6 output\n")
    assert ok.ok and ok.text == "answer\n"
    assert ok.metrics == {"input_tokens": 12345, "output_tokens": 6, "turns": 1}
    bad = runner.parse(call(tmp_path), 1, b"", "Error: Unknown model: nope\n")
    assert not bad.ok and not bad.retryable and "llm models" in (bad.error or "")
