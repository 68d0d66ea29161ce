"""The openai runner against the shared Chat Completions stub (tests/stubs/openai_chat.py).

The stub is a real HTTP server on 127.0.0.1; each test scripts it per model
(`behave(step, model=...)`): streaming with and without the usage chunk, llama.cpp's
usage/timings in the finishing chunk, a whole JSON reply, 401, 429 with its reset
headers, an exhausted quota, 503/529, 500, a cut stream, an error mid-stream, a slow
and a hanging server.  The dispatcher runs as a real subprocess, so the whole chain
(config → resolver → RunnerSet → httpx on trio → staged output → reports) is exercised.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from parallel_dispatch.runners.openai import duration_s, reset_after_s, retry_after_s
from preset_support import AgentProject, make_agent_project
from stubs.openai_chat import (
    COMPLETION_TOKENS,
    PROMPT_TOKENS,
    RATE_LIMIT_RESET_S,
    OpenAIChatStub,
)
from support import Project

BODY = "You are a terse assistant."
TEXT = "Hello from the chat stub."


@pytest.fixture
def server() -> Iterator[OpenAIChatStub]:
    with OpenAIChatStub.running() as stub:
        stub.slow_s = 0.4
        yield stub


@pytest.fixture
def ap(project: Project, tmp_path: Path, server: OpenAIChatStub) -> AgentProject:
    ap = make_agent_project(project, tmp_path)
    ap.define("assistant", BODY)
    configure(ap, server, "stream")
    return ap


def configure(ap: AgentProject, server: OpenAIChatStub, model: str, extra: str = "") -> None:
    ap.config(f"""
        [defaults]
        runner = "openai"
        retry_backoff = 0

        [runners.openai]
        base_url = "{server.base_url}"
        model = "{model}"
        {extra}
    """)


def tasks(ap: AgentProject, *rows: str) -> None:
    ap.tasks("tasks:\n" + "".join(f"  - {r}\n" for r in rows))


def run_one(ap: AgentProject, server: OpenAIChatStub, *steps: str, row: str = "",
            extra: str = "", args: tuple[str, ...] = ()) -> dict[str, object]:
    """Run task `a` on a model that takes `steps`; return its report entry."""
    server.behave(*steps, model="m")
    configure(ap, server, "m", extra)
    tasks(ap, "{id: a, agent: assistant, prompt: hi, output: a.md" + row + "}")
    ap.run("t.yaml", *args)
    return ap.task("a")


# --- replies and tokens ----------------------------------------------------------------


def test_streams_the_reply_into_the_output_with_usage(ap: AgentProject,
                                                       server: OpenAIChatStub) -> None:
    tasks(ap, "{id: a, agent: assistant, prompt: 'Say hello', output: a.md}")
    proc = ap.run("t.yaml")
    assert proc.returncode == 0, proc.stderr
    assert ap.output("a.md") == TEXT + "\n"
    (req,) = server.model_calls()
    assert req.path == "/v1/chat/completions"
    assert req.body["stream"] is True
    assert req.body["stream_options"] == {"include_usage": True}
    assert req.body["messages"] == [{"role": "system", "content": BODY},
                                    {"role": "user", "content": "Say hello"}]
    assert "authorization" not in req.headers  # no key configured, none in the env
    task = ap.task("a")
    assert (task["input_tokens"], task["output_tokens"], task["turns"]) == \
        (PROMPT_TOKENS, COMPLETION_TOKENS, 1)
    assert task["cost_usd"] is None
    assert task["last_event"] == (f"done: input_tokens {PROMPT_TOKENS}, output_tokens "
                                  f"{COMPLETION_TOKENS}")
    md = ap.report_md()
    assert f"| **Total** | **–** | **{PROMPT_TOKENS:,}** | **{COMPLETION_TOKENS}** | **1** |" \
        in md


@pytest.mark.parametrize("step", ["llamacpp", "timings"])
def test_tokens_from_servers_that_ignore_include_usage(
        ap: AgentProject, server: OpenAIChatStub, step: str) -> None:
    """llama.cpp sends `usage` and `timings` in the finishing chunk (no usage chunk);
    some builds and forks send only `timings`."""
    task = run_one(ap, server, step)
    assert task["status"] == "succeeded"
    assert (task["input_tokens"], task["output_tokens"]) == (PROMPT_TOKENS, COMPLETION_TOKENS)
    assert ap.output("a.md") == TEXT + "\n"


def test_a_server_that_reports_no_usage_says_so(ap: AgentProject,
                                                server: OpenAIChatStub) -> None:
    task = run_one(ap, server, "nousage")
    assert task["status"] == "succeeded" and task["input_tokens"] is None
    log = (ap.root / ".aiwg/working/logs/a.log").read_text()
    assert "=== done: the server reported no token usage" in log


def test_a_server_that_ignores_stream_is_read_whole(ap: AgentProject,
                                                    server: OpenAIChatStub) -> None:
    task = run_one(ap, server, "json")
    assert task["status"] == "succeeded"
    assert ap.output("a.md") == TEXT + "\n"
    assert task["input_tokens"] == PROMPT_TOKENS


def test_api_key_comes_from_the_named_variable(ap: AgentProject, server: OpenAIChatStub) -> None:
    configure(ap, server, "stream", 'api_key_env = "MY_LLM_KEY"')
    tasks(ap, "{id: a, agent: assistant, prompt: hi, output: a.md}")
    assert ap.run("t.yaml", MY_LLM_KEY="sekrit").returncode == 0
    assert server.model_calls()[0].headers["authorization"] == "Bearer sekrit"
    assert ap.run("t.yaml").returncode == 1  # variable unset: clear error, no request
    assert len(server.model_calls()) == 1
    error = ap.task("a")["error"]
    assert error.startswith("openai runner: $MY_LLM_KEY is not set")


# --- provider errors ---------------------------------------------------------------------


def test_429_waits_for_the_servers_reset_time_without_using_a_retry(
        ap: AgentProject, server: OpenAIChatStub) -> None:
    task = run_one(ap, server, "429", "ok", row=", retries: 0")
    assert task["status"] == "succeeded" and task["attempts"] == 2
    assert task["quota_waits"] == 1
    first, second = server.model_calls()
    assert second.t - first.t >= RATE_LIMIT_RESET_S * 0.9  # retry-after beat retry_backoff 0
    assert ap.output("a.md") == TEXT + "\n"


def test_persistent_429_is_a_rate_limit_with_the_reset_time(
        ap: AgentProject, server: OpenAIChatStub) -> None:
    """With the governor off (`--fixed-parallel`) a 429 is an ordinary failure."""
    task = run_one(ap, server, "429", args=("--fixed-parallel",))
    assert task["status"] == "provider_error" and task["cause"] == "rate_limit"
    assert task["error"].startswith("openai runner: rate limited (HTTP 429: Rate limit reached")
    assert task["error"].endswith(f"; retry after {RATE_LIMIT_RESET_S}s")


def test_a_reset_beyond_max_quota_wait_ends_the_task_at_once(
        ap: AgentProject, server: OpenAIChatStub) -> None:
    task = run_one(ap, server, "429", args=("--max-quota-wait", "1s"))
    assert task["status"] == "provider_error" and task["cause"] == "rate_limit"
    assert task["attempts"] == 1 and len(server.model_calls()) == 1
    assert f"; retry after {RATE_LIMIT_RESET_S}s; the openai pool would reopen in " \
        in task["error"]
    assert "beyond --max-quota-wait 1.0s" in task["error"]


@pytest.mark.parametrize(("step", "retries", "attempts", "cause", "needle"), [
    ("401", 2, 1, "auth", "bad credentials (HTTP 401: Incorrect API key provided"),
    ("quota", 2, 1, "quota", "usage quota exhausted (HTTP 429: You exceeded your current"),
    ("529", 1, 2, "overloaded", "provider overloaded (HTTP 529: Overloaded)"),
    ("503", 1, 2, "overloaded", "provider overloaded (HTTP 503: The server is overloaded"),
    ("500", 1, 2, "server", "provider server error (HTTP 500: The server had an error"),
    ("context", 2, 1, "bad_request", "(HTTP 400: This model's maximum context length"),
    ("midstream", 0, 1, "server", "the server reported an error mid-stream: the model crashed"),
])
def test_provider_errors_name_their_cause(ap: AgentProject, server: OpenAIChatStub, step: str,
                                          retries: int, attempts: int, cause: str,
                                          needle: str) -> None:
    server.behave(step, model="m")
    configure(ap, server, "m")
    tasks(ap, f"{{id: a, agent: assistant, prompt: hi, output: a.md, retries: {retries}}}",
          "{id: b, agent: shell, prompt: 'echo fine', output: b.md}")
    # The cause and its wording, as a fixed pool retries them (the governor's waits for
    # 529/503: test_quota_http.py).
    assert ap.run("t.yaml", "--fixed-parallel").returncode == 1
    task = ap.task("a")
    assert task["status"] == "provider_error" and task["cause"] == cause
    assert task["attempts"] == attempts
    assert task["error"].startswith("openai runner: ") and needle in task["error"]
    assert not (ap.root / ".aiwg/working/a.md").exists()
    assert ap.task("b")["status"] == "succeeded"  # the run goes on


def test_a_cut_stream_fails_and_keeps_the_partial_text(ap: AgentProject,
                                                       server: OpenAIChatStub) -> None:
    task = run_one(ap, server, "drop")
    assert task["status"] == "failed" and task["cause"] is None
    assert "the stream ended before the reply was finished" in task["error"]
    assert (ap.root / ".aiwg/working/logs/a.failed.out").read_text() == "Hello "


def test_a_stream_cut_once_then_success(ap: AgentProject, server: OpenAIChatStub) -> None:
    task = run_one(ap, server, "drop", "ok", row=", retries: 1")
    assert task["status"] == "succeeded" and task["attempts"] == 2
    assert ap.output("a.md") == TEXT + "\n"


def test_unreachable_server(ap: AgentProject, server: OpenAIChatStub) -> None:
    url = server.base_url
    server.close()  # nothing listens on the port any more
    tasks(ap, "{id: a, agent: assistant, prompt: hi, output: a.md}")
    ap.run("t.yaml")
    task = ap.task("a")
    assert task["status"] == "provider_error" and task["cause"] == "unreachable"
    assert task["error"].startswith("openai runner: provider unreachable: cannot connect to "
                                    f"{url}/chat/completions")
    assert "base_url" in task["error"]


# --- slow and hanging servers ----------------------------------------------------------------


def test_a_hanging_server_hits_read_timeout(ap: AgentProject, server: OpenAIChatStub) -> None:
    task = run_one(ap, server, "hang", extra="read_timeout = 0.5")
    assert task["status"] == "failed"
    assert "no data from" in task["error"] and "read_timeout" in task["error"]


def test_a_hanging_server_hits_the_task_timeout_quoting_the_last_event(
        ap: AgentProject, server: OpenAIChatStub) -> None:
    task = run_one(ap, server, "hang", row=", timeout: 1500")
    assert task["status"] == "timeout"
    assert task["error"].startswith("openai runner: timed out after 1.5s (last event ")
    assert f"POST {server.base_url}/chat/completions: waiting for the model" in task["error"]


def test_each_streamed_chunk_counts_as_activity_for_idle_timeout(
        ap: AgentProject, server: OpenAIChatStub) -> None:
    """Five words 0.4 s apart take 1.6 s: longer than the 1 s idle_timeout, yet every
    chunk is output, so the agent is not stalled.  A hanging server is."""
    task = run_one(ap, server, "slow", row=", idle_timeout: 1000")
    assert task["status"] == "succeeded", task["error"]
    assert ap.output("a.md") == TEXT + "\n"
    t0 = time.monotonic()
    task = run_one(ap, server, "hang", row=", idle_timeout: 1000")
    assert task["status"] == "stalled"
    assert task["error"].startswith("openai runner: stalled: no output for 1s")
    assert time.monotonic() - t0 < 30


def test_plan_describes_the_request(ap: AgentProject, server: OpenAIChatStub) -> None:
    tasks(ap, "{id: a, agent: assistant, prompt: hi, output: a.md}")
    proc = ap.run("plan", "t.yaml")
    assert f"$ POST {server.base_url}/chat/completions model=stream" in proc.stdout
    assert server.requests == []


# --- header parsing ------------------------------------------------------------------------


def test_retry_after_parsing() -> None:
    assert retry_after_s({"retry-after": "3"}) == 3.0
    assert retry_after_s({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert retry_after_s({"retry-after": "Wed, 21 Oct 2015 07:28:10 GMT"},
                         now=1445412480.0) == 10.0
    assert retry_after_s({"retry-after": "soon"}) is None
    assert retry_after_s({"retry-after": "-5"}) == 0.0
    assert retry_after_s({"retry-after": "999999"}) == 3600.0
    assert retry_after_s({}) is None


def test_reset_time_from_openais_rate_limit_headers() -> None:
    assert duration_s("1s") == 1.0 and duration_s("6m0s") == 360.0
    assert duration_s("120ms") == pytest.approx(0.12) and duration_s("1h2m3.5s") == 3723.5
    assert duration_s("soon") is None and duration_s("5 s") is None
    # Retry-After wins; else the later of the two resets when neither says which limit is
    # used up (no x-ratelimit-remaining-*).
    assert reset_after_s({"retry-after": "2", "x-ratelimit-reset-tokens": "6m0s"}) == 2.0
    assert reset_after_s({"x-ratelimit-reset-requests": "120ms",
                          "x-ratelimit-reset-tokens": "1.5s"}) == 1.5
    assert reset_after_s({"x-ratelimit-reset-requests": "bogus"}) is None
    # The exhausted limit decides: the token window refilling in 6 min does not matter
    # when it is the request limit (reset in 2 s) that is used up, and vice versa.
    assert reset_after_s({"x-ratelimit-reset-requests": "2s", "x-ratelimit-remaining-requests": "0",
                          "x-ratelimit-reset-tokens": "6m0s",
                          "x-ratelimit-remaining-tokens": "149000"}) == 2.0
    assert reset_after_s({"x-ratelimit-reset-requests": "2s", "x-ratelimit-remaining-requests": "7",
                          "x-ratelimit-reset-tokens": "6m0s",
                          "x-ratelimit-remaining-tokens": "0"}) == 360.0
