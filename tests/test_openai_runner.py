"""The openai runner against a real local HTTP server speaking OpenAI chat completions.

The server (stdlib http.server in a thread, ephemeral port on 127.0.0.1) picks its
behaviour from the request's `model`: streaming, plain JSON, 429 with Retry-After,
500, 401, a slow reply, a cut stream, an error mid-stream.  The dispatcher runs as a
real subprocess, so the whole chain (config → resolver → RunnerSet → httpx on trio →
staged output → reports) is exercised.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from parallel_dispatch.runners.openai import retry_after_s
from preset_support import AgentProject, make_agent_project
from support import Project

BODY = "You are a terse assistant."
CHUNKS = ["Hel", "lo, ", "wor", "ld"]


class FakeOpenAI:
    """Records requests; `release` frees handlers that are holding a reply back."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append({"t": time.monotonic(), "path": self.path,
                                          "headers": dict(self.headers), "body": body})
                    n = sum(1 for r in fake.requests if r["body"]["model"] == body["model"])
                fake.reply(self, body, n)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/v1"

    # -- replies -------------------------------------------------------------------
    def reply(self, h: BaseHTTPRequestHandler, body: dict[str, Any], n: int) -> None:
        model = body["model"]
        if h.path != "/v1/chat/completions":
            return self.error(h, 404, "Not found")
        if model == "ratelimit" or (model == "ratelimit-once" and n == 1):
            return self.error(h, 429, "Rate limit reached for requests", {"Retry-After": "1"})
        if model == "boom":
            return self.error(h, 500, "The server had an error")
        if model == "auth":
            return self.error(h, 401, "Incorrect API key provided")
        if model == "slow":
            self.release.wait(30)
        if model == "json":
            return self.send_json(h, 200, {
                "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "whole"},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8}})
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.end_headers()
        for i, text in enumerate(CHUNKS):
            if model == "cut" and i == 2:
                return
            if model == "midstream" and i == 2:
                self.event(h, {"error": {"message": "model crashed", "type": "server_error"}})
                return
            self.event(h, {"object": "chat.completion.chunk",
                           "choices": [{"index": 0, "delta": {"content": text},
                                        "finish_reason": None}]})
        self.event(h, {"object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        self.event(h, {"object": "chat.completion.chunk", "choices": [],
                       "usage": {"prompt_tokens": 42, "completion_tokens": 4,
                                 "total_tokens": 46}})
        h.wfile.write(b"data: [DONE]\n\n")

    @staticmethod
    def event(h: BaseHTTPRequestHandler, data: dict[str, Any]) -> None:
        h.wfile.write(f"data: {json.dumps(data)}\n\n".encode())
        h.wfile.flush()

    def send_json(self, h: BaseHTTPRequestHandler, status: int, data: dict[str, Any],
                  headers: dict[str, str] | None = None) -> None:
        raw = json.dumps(data).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(raw)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(raw)

    def error(self, h: BaseHTTPRequestHandler, status: int, message: str,
              headers: dict[str, str] | None = None) -> None:
        self.send_json(h, status, {"error": {"message": message, "type": "x"}}, headers)

    def of(self, model: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["body"]["model"] == model]


@pytest.fixture
def server() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI()
    fake.thread.start()
    yield fake
    fake.release.set()
    fake.server.shutdown()
    fake.server.server_close()


@pytest.fixture
def ap(project: Project, tmp_path: Path, server: FakeOpenAI) -> AgentProject:
    ap = make_agent_project(project, tmp_path)
    ap.define("assistant", BODY)
    ap.config(f"""
        [defaults]
        runner = "openai"
        retry_backoff = 0

        [runners.openai]
        base_url = "{server.base_url}"
        model = "stream"
    """)
    return ap


def tasks(ap: AgentProject, *rows: str) -> None:
    ap.tasks("tasks:\n" + "".join(f"  - {r}\n" for r in rows))


def test_streams_the_reply_into_the_output_with_usage(ap: AgentProject,
                                                       server: FakeOpenAI) -> None:
    tasks(ap, "{id: a, agent: assistant, prompt: 'Say hello', output: a.md}")
    proc = ap.run("t.yaml")
    assert proc.returncode == 0, proc.stderr
    assert ap.output("a.md") == "Hello, world\n"
    (req,) = server.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["body"]["stream"] is True
    assert req["body"]["messages"] == [{"role": "system", "content": BODY},
                                       {"role": "user", "content": "Say hello"}]
    assert "Authorization" not in req["headers"]  # no key configured, none in the env
    task = ap.task("a")
    assert (task["input_tokens"], task["output_tokens"], task["turns"]) == (42, 4, 1)
    assert task["cost_usd"] is None
    md = ap.report_md()
    assert "| **Total** | **–** | **42** | **4** | **1** |" in md


def test_a_server_that_ignores_stream_is_read_whole(ap: AgentProject) -> None:
    ap.config(ap.root.joinpath(".aiwg/dispatch.toml").read_text() + "\n[agents.assistant]\n"
              'model = "json"\n')
    tasks(ap, "{id: a, agent: assistant, prompt: hi, output: a.md}")
    assert ap.run("t.yaml").returncode == 0
    assert ap.output("a.md") == "whole\n"
    assert ap.task("a")["input_tokens"] == 7


def test_api_key_comes_from_the_named_variable(ap: AgentProject, server: FakeOpenAI) -> None:
    text = ap.root.joinpath(".aiwg/dispatch.toml").read_text()
    ap.config(text + 'api_key_env = "MY_LLM_KEY"\n')
    tasks(ap, "{id: a, agent: assistant, prompt: hi, output: a.md}")
    assert ap.run("t.yaml", MY_LLM_KEY="sekrit").returncode == 0
    assert server.requests[0]["headers"]["Authorization"] == "Bearer sekrit"
    assert ap.run("t.yaml").returncode == 1  # variable unset: clear error, no request
    assert len(server.requests) == 1
    error = ap.task("a")["error"]
    assert error.startswith("openai runner: $MY_LLM_KEY is not set")


def test_429_is_retried_after_the_retry_after_delay(ap: AgentProject,
                                                    server: FakeOpenAI) -> None:
    tasks(ap, "{id: a, agent: assistant, prompt: hi, output: a.md, retries: 1}")
    ap.config(ap.root.joinpath(".aiwg/dispatch.toml").read_text()
              + '\n[agents.assistant]\nmodel = "ratelimit-once"\n')
    assert ap.run("t.yaml").returncode == 0
    first, second = server.of("ratelimit-once")
    assert second["t"] - first["t"] >= 1.0  # Retry-After: 1 beat retry_backoff = 0
    assert ap.task("a")["attempts"] == 2
    assert ap.output("a.md") == "Hello, world\n"


def test_persistent_429_is_a_clear_retryable_error(ap: AgentProject, server: FakeOpenAI) -> None:
    ap.config(ap.root.joinpath(".aiwg/dispatch.toml").read_text()
              + '\n[agents.assistant]\nmodel = "ratelimit"\n')
    tasks(ap, "{id: a, agent: assistant, prompt: hi, output: a.md}")
    assert ap.run("t.yaml").returncode == 1
    error = ap.task("a")["error"]
    assert error == ("openai runner: rate limited (HTTP 429: Rate limit reached for requests); "
                     "retry after 1s")


@pytest.mark.parametrize(("model", "retries", "attempts", "needle"), [
    ("boom", 1, 2, "server error (HTTP 500: The server had an error)"),
    ("auth", 2, 1, "bad credentials (HTTP 401: Incorrect API key provided)"),
    ("cut", 0, 1, "the stream ended before the reply was finished"),
    ("midstream", 0, 1, "the server reported an error mid-stream: model crashed"),
])
def test_http_failures_are_clear_task_errors(ap: AgentProject, model: str, retries: int,
                                             attempts: int, needle: str) -> None:
    ap.config(ap.root.joinpath(".aiwg/dispatch.toml").read_text()
              + f'\n[agents.assistant]\nmodel = "{model}"\n')
    tasks(ap, f"{{id: a, agent: assistant, prompt: hi, output: a.md, retries: {retries}}}",
          "{id: b, agent: shell, prompt: 'echo fine', output: b.md}")
    assert ap.run("t.yaml").returncode == 1
    task = ap.task("a")
    assert task["status"] == "failed" and task["attempts"] == attempts
    assert task["error"].startswith("openai runner: ") and needle in task["error"]
    assert not (ap.root / ".aiwg/working/a.md").exists()
    assert ap.task("b")["status"] == "succeeded"  # the run goes on


def test_partial_stream_is_kept_for_debugging(ap: AgentProject) -> None:
    ap.config(ap.root.joinpath(".aiwg/dispatch.toml").read_text()
              + '\n[agents.assistant]\nmodel = "cut"\n')
    tasks(ap, "{id: a, agent: assistant, prompt: hi, output: a.md}")
    ap.run("t.yaml")
    assert (ap.root / ".aiwg/working/logs/a.failed.out").read_text() == "Hello, "


def test_slow_reply_hits_read_timeout(ap: AgentProject) -> None:
    ap.config(ap.root.joinpath(".aiwg/dispatch.toml").read_text()
              + '\n[agents.assistant]\nmodel = "slow"\nread_timeout = 0.5\n')
    tasks(ap, "{id: a, agent: assistant, prompt: hi, output: a.md}")
    ap.run("t.yaml")
    task = ap.task("a")
    assert task["status"] == "failed"
    assert "no data from" in task["error"] and "read_timeout" in task["error"]


def test_slow_reply_hits_the_task_timeout(ap: AgentProject) -> None:
    ap.config(ap.root.joinpath(".aiwg/dispatch.toml").read_text()
              + '\n[agents.assistant]\nmodel = "slow"\n')
    tasks(ap, "{id: a, agent: assistant, prompt: hi, output: a.md, timeout: 700}")
    ap.run("t.yaml")
    assert ap.task("a")["status"] == "timeout"


def test_unreachable_server(ap: AgentProject, server: FakeOpenAI) -> None:
    url = server.base_url
    server.server.shutdown()
    server.server.server_close()  # nothing listens on the port any more
    tasks(ap, "{id: a, agent: assistant, prompt: hi, output: a.md}")
    ap.run("t.yaml")
    error = ap.task("a")["error"]
    assert f"cannot connect to {url}/chat/completions" in error and "base_url" in error


def test_plan_describes_the_request(ap: AgentProject, server: FakeOpenAI) -> None:
    tasks(ap, "{id: a, agent: assistant, prompt: hi, output: a.md}")
    proc = ap.run("plan", "t.yaml")
    assert f"$ POST {server.base_url}/chat/completions model=stream" in proc.stdout
    assert server.requests == []


def test_retry_after_parsing() -> None:
    assert retry_after_s({"retry-after": "3"}) == 3.0
    assert retry_after_s({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert retry_after_s({"retry-after": "Wed, 21 Oct 2015 07:28:10 GMT"},
                         now=1445412480.0) == 10.0
    assert retry_after_s({"retry-after": "soon"}) is None
    assert retry_after_s({"retry-after": "-5"}) == 0.0
    assert retry_after_s({"retry-after": "999999"}) == 3600.0
    assert retry_after_s({}) is None
