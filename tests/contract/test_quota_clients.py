"""Contract (issue 10): one rate-limit case per real client with the quota governor on.

Each stub refuses the first model call(s) with a 429 that says when the limit resets,
then answers.  The client's own retries are turned down or kept short
(docs/design/quota-governor.md §6), so the client gives up within seconds; the
dispatcher then parks the task as `waiting_for_quota` until the runner's pool reopens,
re-runs it, and it succeeds, with `retries: 0` untouched.  Every case checks the same
things (`assert_waited_once`): the JSON report's `quota_waits` and `quota_wait_s`, the
Markdown row, the `⧗` progress line on stderr, the `## Pools` section, and that the
re-run reached the stub no earlier than the reset the provider stated.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from contract.clients import (
    configure_claude,
    configure_codex,
    configure_gemini,
    configure_llm,
    configure_opencode,
    write_gemini_settings,
)
from contract.common import client, log_of, one_task
from preset_support import AgentProject
from stubs.anthropic import AnthropicStub
from stubs.base import Reply, Request
from stubs.gemini import GeminiStub, rate_limited
from stubs.openai_chat import OpenAIChatStub
from stubs.openai_responses import ResponsesStub


def run_limited(ap: AgentProject, **env: str) -> subprocess.CompletedProcess[str]:
    """Task `a` with `retries: 0` (a wait for quota must not need one), run to success."""
    one_task(ap, retries=0)
    proc = ap.run("t.yaml", timeout=120, **env)
    assert proc.returncode == 0, proc.stderr
    return proc


def assert_waited_once(ap: AgentProject, proc: subprocess.CompletedProcess[str],
                       runner: str, refused: Request, retried: Request,
                       reset_s: float) -> dict[str, Any]:
    """One wait for quota, seen in both reports and the progress, and the re-run sent no
    earlier than `reset_s` after the refusal that stated it.  Returns task `a`."""
    a = ap.task("a")
    assert a["status"] == "succeeded", a
    assert (a["attempts"], a["quota_waits"]) == (2, 1), a
    assert a["quota_wait_s"] > 0
    assert retried.t - refused.t >= reset_s, (retried.t - refused.t, reset_s)
    line = next((ln for ln in proc.stderr.splitlines() if "waiting for quota" in ln), None)
    assert line is not None, proc.stderr
    assert re.match(r"\[ *\d+\.\ds\] ⧗ a waiting for quota \(", line), line
    assert f"; the {runner} pool is paused for " in line, line
    data = ap.report()
    assert data["summary"]["waited_for_quota"] == 1
    (pool,) = (p for p in data["pools"] if p["name"] == runner)
    assert pool["quota_waits"] == 1 and pool["paused_s"] > 0, pool
    md = ap.report_md()
    row = next(ln for ln in md.splitlines() if ln.startswith("| a | "))
    assert re.search(r"\(waited 1× for quota, [\dm .]+s\) \| 2 \|", row), row
    assert "## Pools" in md and f"| {runner} | " in md
    return a


def paused_for(proc: subprocess.CompletedProcess[str]) -> float:
    """How long the progress line says the pool pauses (`... paused for 2.4s`)."""
    found = re.search(r"pool is paused for (\d+\.\d)s", proc.stderr)
    assert found is not None, proc.stderr
    return float(found.group(1))


# --- claude ---------------------------------------------------------------------------------


@pytest.fixture
def anthropic(tmp_path: Path) -> Iterator[AnthropicStub]:
    with AnthropicStub.running() as server:
        yield server


def test_claude_rate_limit_waits_for_the_retry_after_then_succeeds(
        contract_project: AgentProject, anthropic: AnthropicStub) -> None:
    """`CLAUDE_CODE_MAX_RETRIES=1`: claude retries once, waiting the 429's `retry-after`
    (its `api_retry` event says how long, in ms), is refused again and gives up; its
    result does not repeat the wait, so the pool pauses for the `retry_delay_ms` it last
    printed.  (With 0 retries claude prints no `api_retry` and the reset is unknown; a
    subscriber's `rate_limit_event` cannot be provoked with an API key: see
    test_preset_parsing.py.)"""
    client("claude")
    cc = configure_claude(contract_project, anthropic)
    anthropic.rate_limit_reset_s = 3  # not the pool's own 2 s backoff
    anthropic.behave("429", "429", "ok")
    proc = run_limited(cc, CLAUDE_CODE_MAX_RETRIES="1")
    first, refused, retried = anthropic.messages()
    assert refused.t - first.t >= 3  # claude's own retry honoured retry-after
    a = assert_waited_once(cc, proc, "claude", refused, retried, 3)
    assert paused_for(proc) >= 3
    assert cc.output("a.md") == anthropic.text + "\n"
    assert "rate limited: API Error: Request rejected (429)" in proc.stderr
    assert a["cost_usd"] > 0


# --- codex ----------------------------------------------------------------------------------


class MinuteEndStub(ResponsesStub):
    """The usage-limit step resets at the end of a local minute: at the first epoch second
    at least 2 s after the refusal that is second 59 in the run's TZ (`offset_s` east of
    UTC).  `resets_at` is that second, chosen once."""

    offset_s = 0
    resets_at = 0

    @property
    def usage_limit_reset_s(self) -> int:
        if not self.resets_at:
            soon = int(time.time()) + 2
            self.resets_at = soon + (59 - (soon + self.offset_s)) % 60
        return self.resets_at - int(time.time())

    @usage_limit_reset_s.setter
    def usage_limit_reset_s(self, value: int) -> None:
        pass


@pytest.fixture
def minute_end() -> Iterator[MinuteEndStub]:
    with MinuteEndStub.running() as server:
        yield server


def test_codex_usage_limit_waits_for_the_printed_reset_then_succeeds(
        contract_project: AgentProject, minute_end: MinuteEndStub) -> None:
    """codex does not retry a usage limit (`usage_limit_reached`, not retryable) and
    prints its reset as local wall-clock time to the minute ("…or try again at 5:14 PM").
    The preset waits to the end of that minute.  To keep this case to seconds the run's
    `TZ` has a seconds offset chosen so that a local minute ends about 6 s after the
    start, and the stub's reset is the end of the first local minute 2 s after its
    refusal (a slow start only makes the wait longer).  (The plain per-minute 429 carries
    no time in codex's output at all: `exceeded retry limit, last status: 429`, which
    the pool meets with its own backoff.)"""
    client("codex")
    cx = configure_codex(contract_project, minute_end)
    cx.project.cold = True  # the dispatcher must read TZ as codex does (tzset at start)
    offset = minute_end.offset_s = (59 - (int(time.time()) + 6)) % 60
    minute_end.behave("usage_limit", "ok")
    proc = run_limited(cx, TZ=f"XST-00:00:{offset:02d}")
    refused, retried = minute_end.model_calls()
    reset = minute_end.resets_at
    refused_at = time.time() - (time.monotonic() - refused.t)  # Request.t is monotonic
    a = assert_waited_once(cx, proc, "codex", refused, retried, reset - refused_at)
    log = log_of(a)
    printed = re.search(r"try again at (\d{1,2}:\d\d [AP]M)", log)
    assert printed is not None, log
    local = time.strftime("%-I:%M %p", time.gmtime(reset + offset))
    assert printed.group(1) == local  # codex formatted the reset in the run's TZ
    line = next(ln for ln in proc.stderr.splitlines() if "waiting for quota" in ln)
    assert "usage quota exhausted" in line and "hit your usage limit" in line


# --- gemini ---------------------------------------------------------------------------------


class RetryInfoStub(GeminiStub):
    """The per-minute 429 with a `RetryInfo.retryDelay` of `retry_delay_s` (the shared
    stub's is 2 s, the pool's own first backoff: a parse that lost the delay would pass)."""

    retry_delay_s = 3

    def respond(self, req: Request, reply: Reply) -> None:
        model = self.model_of(req)
        if req.step == "429" and model is not None:
            reply.json(429, {"error": rate_limited(model, self.retry_delay_s)})
            return
        super().respond(req, reply)


@pytest.fixture
def gemini() -> Iterator[RetryInfoStub]:
    with RetryInfoStub.running() as server:
        yield server


def test_gemini_rate_limit_waits_for_the_retry_info_then_succeeds(
        contract_project: AgentProject, gemini: RetryInfoStub) -> None:
    """`general.maxAttempts: 1`: gemini gives up at the first 429 (exit 173) and quotes
    the RetryInfo as "Suggested retry after 3s."; the pool pauses that long."""
    client("gemini")
    gm = configure_gemini(contract_project, gemini)
    write_gemini_settings(gm, maxAttempts=1)
    gemini.behave("429", "ok")
    proc = run_limited(gm)
    refused, retried = gemini.turns()
    assert_waited_once(gm, proc, "gemini", refused, retried, gemini.retry_delay_s)
    assert paused_for(proc) >= gemini.retry_delay_s
    assert "Suggested retry after 3s" in proc.stderr


# --- opencode -------------------------------------------------------------------------------


@pytest.fixture
def chat() -> Iterator[OpenAIChatStub]:
    with OpenAIChatStub.running(retry_after_s=1) as server:
        yield server


def test_opencode_rate_limit_waits_for_the_response_headers_then_succeeds(
        contract_project: AgentProject, chat: OpenAIChatStub) -> None:
    """opencode retries a 429 five times by itself, each after the server's
    `retry-after` (1 s here; it cannot be turned down otherwise), printing only
    `stream error` log lines; then its `error` event carries the `responseHeaders`, whose
    reset the pool waits for."""
    client("opencode")
    oc = configure_opencode(contract_project, chat)
    chat.behave(*["429"] * 6, "ok")
    proc = run_limited(oc)
    calls = chat.model_calls()
    assert len(calls) == 7
    assert_waited_once(oc, proc, "opencode", calls[5], calls[6], 1)
    assert "retry after 1 s" in proc.stderr


# --- llm ------------------------------------------------------------------------------------


def test_llm_rate_limit_waits_for_the_try_again_in_then_succeeds(
        contract_project: AgentProject, chat: OpenAIChatStub) -> None:
    """The openai SDK under llm retries a 429 twice (1 s apart: `retry-after: 1`); then llm
    fails with the body's "Please try again in 1s", which the pool waits for."""
    client("llm")
    lm = configure_llm(contract_project, chat)
    chat.behave("429", "429", "429", "ok")
    proc = run_limited(lm)
    calls = chat.model_calls()
    assert len(calls) == 4
    assert_waited_once(lm, proc, "llm", calls[2], calls[3], 1)
    assert paused_for(proc) >= 1
    assert "Error code: 429" in proc.stderr
