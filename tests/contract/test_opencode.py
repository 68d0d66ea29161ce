"""Contract: the real opencode (pinned in tests/clients/versions.txt) run by
`parallel-dispatch` end to end against a local OpenAI Chat Completions stub.

opencode is pointed at the stub through an `@ai-sdk/openai-compatible` provider in a
private `$XDG_CONFIG_HOME/opencode/opencode.json` (`options.baseURL`, the key from
`{env:STUB_API_KEY}`).  `OPENCODE_DISABLE_MODELS_FETCH=1` keeps it from fetching
models.dev (without it opencode resolves the internet at every start), and
`autoupdate: false` / `OPENCODE_DISABLE_AUTOUPDATE` from looking for updates, and
`npm_config_offline=true` its background npm install of `@opencode-ai/plugin` from the
registry (checked after the success case); nothing else leaves 127.0.0.1.  opencode's
own retry policy is left as shipped (6 attempts over about 80 s for 5xx and unreachable
servers, the server's `retry-after` honoured), so each case shows what a user of that
version gets.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from contract.clients import OPENCODE_MODEL as MODEL
from contract.clients import configure_opencode, write_opencode_provider
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
from contract.common import GOOD_KEY as KEY
from preset_support import AgentProject
from stubs.openai_chat import (
    CACHED_TOKENS,
    COMPLETION_TOKENS,
    PROMPT_TOKENS,
    RATE_LIMIT_RESET_S,
    OpenAIChatStub,
)


@pytest.fixture
def stub() -> Iterator[OpenAIChatStub]:
    with OpenAIChatStub.running() as server:
        yield server


@pytest.fixture
def oc(contract_project: AgentProject, stub: OpenAIChatStub) -> AgentProject:
    """A project whose agents run on the real opencode, talking to `stub`."""
    client("opencode")
    return configure_opencode(contract_project, stub)


def marker(ap: AgentProject) -> Path:
    """Where the stub's Bash call leaves its file: the project root, which is where
    opencode works only because the preset sets $PWD (opencode prefers it to its cwd)."""
    return ap.root / "bash-ran.marker"


# --- success ------------------------------------------------------------------------------


def test_success_output_is_only_the_model_text_and_the_body_is_the_system_prompt(
        oc: AgentProject, stub: OpenAIChatStub) -> None:
    one_task(oc)
    proc = oc.run("t.yaml")
    assert proc.returncode == 0, proc.stderr
    assert oc.output("a.md") == stub.text + "\n"
    (call,) = stub.model_calls()  # opencode's title request is not a model turn
    assert call.model == "stub-model"
    assert call.body["stream"] is True
    assert call.headers["authorization"] == f"Bearer {KEY}"
    # The definition is an inline opencode agent: its body *is* the system prompt
    # (opencode's own "You are opencode" prompt is replaced), the prompt the user turn.
    system = stub.system_prompt(call)
    assert system.startswith(BODY + "\n")
    assert "You are opencode" not in system
    assert stub.user_text(call).strip() == PROMPT
    header = log_of(oc.task("a")).splitlines()[1]
    assert "'--agent', 'pd-reviewer'" in header and f"'-m', '{MODEL}'" in header
    task = oc.task("a")
    assert task["status"] == "succeeded" and task["attempts"] == 1
    # opencode reports input without the cached part, and the cache reads apart.
    assert task["input_tokens"] == PROMPT_TOKENS
    assert task["cached_input_tokens"] == CACHED_TOKENS
    assert task["output_tokens"] == COMPLETION_TOKENS
    assert task["turns"] == 1
    # The stub model has no price in opencode's catalogue: its `cost: 0` means unknown,
    # not free, and no [pricing] entry names it.
    assert task["cost_usd"] is None and task["cost_source"] == "tokens only"
    assert task["session_id"].startswith("ses_")
    assert task["last_event"].startswith("step 1 done (stop); tokens so far: 1,200 input")
    assert f"| a | tokens only | {PROMPT_TOKENS:,} | {COMPLETION_TOKENS} | 1 |" \
        in oc.report_md()
    assert _npm_registry_requests(oc) == []


def _npm_registry_requests(ap: AgentProject) -> list[str]:
    """URLs npm fetched for opencode (its HTTP cache keeps one index entry per request)."""
    index = Path(ap.env["HOME"]) / ".npm" / "_cacache" / "index-v5"
    found = re.findall(r'"key":"make-fetch-happen:request-cache:([^"]+)"', "".join(
        p.read_text(errors="replace") for p in index.rglob("*") if p.is_file()))
    return sorted(set(found))


def test_an_agent_in_opencode_agent_runs_by_name_with_its_own_model(
        oc: AgentProject, stub: OpenAIChatStub) -> None:
    oc.define("ops", BODY, folder=".opencode/agent", description="Reviews code",
              model=MODEL)
    oc.config('[defaults]\nrunner = "opencode"\n')  # no configured model: the agent's own
    one_task(oc, agent="ops")
    assert oc.run("t.yaml").returncode == 0
    (call,) = stub.model_calls()
    assert call.model == "stub-model"
    assert stub.system_prompt(call).startswith(BODY + "\n")
    header = log_of(oc.task("a")).splitlines()[1]
    assert header.endswith("'--agent', 'ops']")
    assert oc.output("a.md") == stub.text + "\n"


def test_tokens_and_turns_add_up_over_tasks_and_tool_steps_in_both_reports(
        oc: AgentProject, stub: OpenAIChatStub) -> None:
    oc.define("reviewer", BODY, tools="Read, Bash")
    stub.behave("tool:Bash")  # each task: a Bash call, then the answer: two steps
    report = run_two_chained_tasks(oc)
    assert [t["turns"] for t in report["tasks"]] == [2, 2]
    summary = report["summary"]
    assert summary["input_tokens"] == 4 * PROMPT_TOKENS
    assert summary["output_tokens"] == 4 * COMPLETION_TOKENS
    n_in, n_out = 4 * PROMPT_TOKENS, 4 * COMPLETION_TOKENS
    assert f"| **Total** | **–** | **{n_in:,}** | **{n_out:,}** | **4** |" \
        in oc.report_md()
    assert oc.output("b.md") == stub.text + "\n"


# --- tool limits --------------------------------------------------------------------------


def test_tools_without_bash_deny_the_bash_call_and_listing_bash_allows_it(
        oc: AgentProject, stub: OpenAIChatStub) -> None:
    """opencode's `run` allows every tool by default; a definition's `tools:` becomes a
    permission map that denies the rest, so opencode does not even offer Bash."""
    oc.define("reviewer", BODY, tools="Read, Grep, Glob")
    stub.behave("tool:Bash")
    one_task(oc)
    assert oc.run("t.yaml").returncode == 0
    assert not marker(oc).exists()  # the model asked; nothing ran
    first, second = stub.model_calls()
    assert sorted(stub.tool_names(first)) == ["glob", "grep", "read"]
    assert "unavailable tool" in stub.tool_results(second)[0]
    assert oc.output("a.md") == stub.text + "\n"

    oc.define("reviewer", BODY, tools="Read, Bash")
    assert oc.run("t.yaml").returncode == 0
    assert marker(oc).exists()
    assert "bash" in stub.tool_names(stub.model_calls()[2])
    (used,) = [e["part"] for e in json_events(log_of(oc.task("a"))) if e["type"] == "tool_use"]
    assert (used["tool"], used["state"]["status"]) == ("bash", "completed")


def test_an_opencode_agent_keeps_its_own_tool_map(
        oc: AgentProject, stub: OpenAIChatStub) -> None:
    path = oc.root / ".opencode/agent/ops.md"
    path.parent.mkdir(parents=True)
    path.write_text(f"---\ndescription: Reviews code\nmodel: {MODEL}\ntools:\n  bash: false\n"
                    f"---\n{BODY}\n")
    stub.behave("tool:Bash")
    one_task(oc, agent="ops")
    assert oc.run("t.yaml").returncode == 0
    assert not marker(oc).exists()
    assert "bash" not in stub.tool_names(stub.model_calls()[0])


# --- provider failures -----------------------------------------------------------------


def test_bad_key_ends_in_seconds_as_bad_credentials_and_stops_the_runner(
        oc: AgentProject, stub: OpenAIChatStub) -> None:
    stub.behave("401")
    a, _ = run_two_tasks_with_a_bad_key(oc, "opencode", STUB_API_KEY="sk-bad-key")
    assert a["error"].startswith("opencode runner: bad credentials: HTTP 401: Incorrect API key")
    assert "opencode auth login" in a["error"]
    assert len(stub.model_calls()) == 1  # opencode does not retry a 401


def test_429_waits_for_the_reset_time_then_succeeds(
        oc: AgentProject, stub: OpenAIChatStub) -> None:
    stub.behave("429", "ok")
    one_task(oc)
    assert oc.run("t.yaml").returncode == 0
    first, second = stub.model_calls()
    assert second.t - first.t >= RATE_LIMIT_RESET_S * 0.9  # opencode honoured retry-after
    log = log_of(oc.task("a"))
    assert 'message="stream error"' in log and "Rate limit reached" in log
    assert oc.output("a.md") == stub.text + "\n"


def test_persistent_429_is_a_rate_limit_with_the_reset_time(
        oc: AgentProject, stub: OpenAIChatStub) -> None:
    """The reset in the final `error` event's headers is past a 1 s `max_quota_wait`: the
    task ends at once instead of waiting for quota."""
    stub.behave("429")
    one_task(oc, retries=0, settings="{max_quota_wait: 1000}")
    oc.run("t.yaml")
    a = oc.task("a")
    assert a["status"] == "provider_error" and a["cause"] == "rate_limit"
    assert a["error"].startswith("opencode runner: rate limited: HTTP 429: Rate limit reached")
    assert f"retry after {RATE_LIMIT_RESET_S} s" in a["error"]
    assert "beyond --max-quota-wait 1.0s" in a["error"]
    assert a["attempts"] == 1 and "quota_waits" not in a
    assert len(stub.model_calls()) == 6  # opencode's own 5 retries, 2 s apart


@pytest.mark.parametrize(("step", "cause", "needle"), [
    ("529", "overloaded", "HTTP 529: Overloaded"),
    ("503", "overloaded", "HTTP 503: The server is overloaded"),
    ("500", "server", "HTTP 500: The server had an error"),
])
def test_server_errors_are_named_and_retried_by_the_dispatcher(
        oc: AgentProject, stub: OpenAIChatStub, step: str, cause: str, needle: str) -> None:
    """A server error uses the task's retry; an overloaded one waits for quota instead,
    runs again, and ends once the second attempt (opencode's start and five retries)
    has passed the 0.5 s `max_quota_wait`."""
    stub.retry_after_ms = 100  # opencode's own 5 retries in a second, not 80 s
    stub.behave(step)
    one_task(oc, retries=1, settings="{retry_backoff: 0, max_quota_wait: 500}")
    assert oc.run("t.yaml").returncode == 1
    a = oc.task("a")
    assert a["status"] == "provider_error" and a["cause"] == cause
    assert a["error"].startswith("opencode runner: ") and needle in a["error"]
    assert a["attempts"] == 2
    if cause == "overloaded":
        assert a["quota_waits"] == 1
        # its last wait was the 0.1 s `retry-after-ms`: the pool may still be paused
        assert re.search(r"--max-quota-wait (of )?0\.5s", a["error"]), a["error"]
    else:
        assert "quota_waits" not in a
    assert len(stub.model_calls()) == 12
    assert a["last_event"].startswith("provider ")


def test_an_overloaded_server_once_is_retried_by_opencode(
        oc: AgentProject, stub: OpenAIChatStub) -> None:
    stub.behave("529", "ok")
    one_task(oc)
    assert oc.run("t.yaml").returncode == 0
    assert oc.task("a")["attempts"] == 1 and len(stub.model_calls()) == 2
    assert "AI_APICallError: Overloaded" in log_of(oc.task("a"))


def test_a_stream_dropped_once_then_success(oc: AgentProject, stub: OpenAIChatStub) -> None:
    """opencode ends the cut step (reason "unknown") and asks again: the answer is the
    second step's text, not the fragment."""
    stub.behave("drop", "ok")
    one_task(oc)
    assert oc.run("t.yaml").returncode == 0
    assert oc.output("a.md") == stub.text + "\n"
    assert len(stub.model_calls()) == 2
    events = json_events(log_of(oc.task("a")))
    reasons = [e["part"]["reason"] for e in events if e.get("type") == "step_finish"]
    assert reasons == ["unknown", "stop"]


def test_context_overflow_is_a_rejected_request_and_not_retried(
        oc: AgentProject, stub: OpenAIChatStub) -> None:
    stub.behave("context")
    one_task(oc, retries=2, settings="{retry_backoff: 0}")
    oc.run("t.yaml")
    a = oc.task("a")
    assert a["status"] == "provider_error" and a["cause"] == "bad_request"
    assert "maximum context length is 8192 tokens" in a["error"]
    assert a["attempts"] == 1


def test_a_hanging_server_times_out_and_the_log_keeps_the_event_stream(
        oc: AgentProject, stub: OpenAIChatStub) -> None:
    oc.define("reviewer", BODY, tools="Bash")
    stub.behave("tool:Bash", "hang")  # one step, then the model never answers
    one_task(oc, timeout_ms=25_000)
    oc.run("t.yaml")
    a = oc.task("a")
    assert a["status"] == "timeout"
    assert a["error"].startswith("opencode runner: timed out after 25s (last event ")
    assert "step 1 done (tool-calls)" in a["error"]
    assert "process group was killed" in a["error"]
    log = log_of(a)
    kinds = [e.get("type") for e in json_events(log)]
    assert kinds[:3] == ["step_start", "tool_use", "step_finish"]
    assert marker(oc).exists()


def test_an_unreachable_server_is_named_by_the_live_retry_events(
        oc: AgentProject) -> None:
    """opencode retries a refused connection for ~70 s and prints nothing in
    `--format json`; its logs on stderr show each attempt, so a timeout says why."""
    write_opencode_provider(oc, f"http://127.0.0.1:{closed_port()}/v1")
    one_task(oc, timeout_ms=40_000)
    oc.run("t.yaml")
    a = oc.task("a")
    assert a["status"] == "provider_error" and a["cause"] == "unreachable"
    assert a["error"].startswith(
        "opencode runner: provider unreachable: timed out after 40s (last event ")
    assert "Cannot connect to API" in a["error"]
    assert "opencode retries" in a["last_event"]
