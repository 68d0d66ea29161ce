"""The Anthropic Messages API as Claude Code uses it: `POST /v1/messages` (JSON, or SSE
when the body says `"stream": true`), `POST /v1/messages/count_tokens`, and errors in
Anthropic's shape (`{"type": "error", "error": {"type", "message"}, "request_id"}`) with
the headers the real API sends (`request-id`, `retry-after`,
`anthropic-ratelimit-*-reset`).

Point Claude Code at it with `env(stub)`: `ANTHROPIC_BASE_URL` plus a key, and the
switches that keep it from calling anything but this stub.

Steps (see `StubServer.behave`):

* "ok" — one text block (`text`), `end_turn`, usage `input_tokens`/`output_tokens`;
* "401" authentication_error, "403" permission_error, "429" rate_limit_error (with
  `retry-after` and reset headers), "529" overloaded_error, "500" api_error,
  "400" invalid_request_error;
* "drop" — a stream that starts (message_start, part of a text block) and is cut;
* "hang" — no answer at all (the base holds the connection);
* "tool:Bash" — a `tool_use` block asking Bash to `touch <marker>`; once the request
  carries that call's `tool_result`, a final text that quotes the result.
* "tool:StructuredOutput" — the call `claude --json-schema` asks for, with `text` parsed
  as JSON as its input; then a final text as for Bash.

A request with another key than `key` gets the 401 whatever the step.  429, 500 and 529
carry `x-should-retry: true` (as api.anthropic.com sends with a 429); a 401 carries no
`x-should-retry`, and Claude Code then retries it ten times (with `false` it would stop
at once).  Every request is recorded (`requests`, `messages()`).

Opt-in provider limits: `limiter = Limiter(Limits(...))` (tests/stubs/limits.py) refuses
model calls beyond them with Anthropic's 429 (`retry-after`,
`anthropic-ratelimit-{requests,tokens}-*` with RFC 3339 resets), serves the rest after
its delay, and puts those headers on every model call's reply.  Each call costs
`input_tokens + output_tokens`.  A refused call has still taken its scripted step.
"""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from .base import Reply, Request, StubServer
from .limits import Limiter, Verdict, anthropic_error, anthropic_headers, serve

KEY = "sk-ant-api03-stub-key-for-local-tests"
RATE_LIMIT_RESET_S = 37
"""What a "429" asks the client to wait by default (`retry-after`, whole seconds as the
real API sends it); the `anthropic-ratelimit-*-reset` headers agree."""

ERRORS: dict[str, tuple[int, str, str]] = {
    "400": (400, "invalid_request_error", "messages: at least one message is required"),
    "401": (401, "authentication_error", "invalid x-api-key"),
    "403": (403, "permission_error", "Your API key does not have permission to use the "
            "specified resource."),
    "429": (429, "rate_limit_error", "This request would exceed the rate limit for your "
            "organization of 50 requests per minute. For details, refer to: "
            "https://docs.claude.com/en/api/rate-limits."),
    "500": (500, "api_error", "Internal server error"),
    "529": (529, "overloaded_error", "Overloaded"),
}


def env(stub: StubServer, key: str = KEY) -> dict[str, str]:
    """What a Claude Code process needs to talk to `stub` and nothing else."""
    return {
        "ANTHROPIC_BASE_URL": stub.origin,
        "ANTHROPIC_API_KEY": key,
        # No telemetry, error reports, feature flags, update checks or other side traffic:
        # nothing may leave the machine, and none of it should wait on a network.
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_GROWTHBOOK": "1",
        "CLAUDE_CODE_DISABLE_FEATURE_FLAGS": "1",
    }


class AnthropicStub(StubServer):
    """Answers like api.anthropic.com; `marker` is the file a "tool:Bash" step touches."""

    name = "anthropic"

    def __init__(self, text: str = "The stub model's answer.", marker: Path | None = None,
                 input_tokens: int = 1234, output_tokens: int = 56, key: str = KEY) -> None:
        super().__init__()
        self.text = text
        self.key = key
        """The one key accepted; any other gets a 401, as the real API answers."""
        self.rate_limit_reset_s = RATE_LIMIT_RESET_S
        self.marker = marker
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.limiter: Limiter | None = None
        self._ids = itertools.count(1)

    # -- what the client asked -------------------------------------------------------
    def accepts(self, req: Request) -> bool:
        return req.method == "POST" and _path(req) == "/v1/messages"

    def messages(self) -> list[Request]:
        """The model calls (`POST /v1/messages`), in order."""
        with self.lock:
            return [r for r in self.requests if self.accepts(r)]

    @staticmethod
    def system_text(req: Request) -> str:
        """The request's whole system prompt (a string or a list of text blocks)."""
        system = req.body.get("system") if isinstance(req.body, dict) else None
        if isinstance(system, str):
            return system
        if isinstance(system, list):
            return "\n".join(str(b.get("text", "")) for b in system if isinstance(b, dict))
        return ""

    @staticmethod
    def tool_names(req: Request) -> list[str]:
        """The tools the client offered the model in `req`."""
        tools = req.body.get("tools") if isinstance(req.body, dict) else None
        return [str(t.get("name")) for t in tools or [] if isinstance(t, dict)]

    def authorized(self, req: Request) -> bool:
        """Whether `req` carries the stub's key (`x-api-key`, or a bearer token)."""
        bearer = req.headers.get("authorization", "").removeprefix("Bearer ").strip()
        return self.key in (req.headers.get("x-api-key"), bearer)

    # -- answering -------------------------------------------------------------------
    def respond(self, req: Request, reply: Reply) -> None:
        if self.limiter is None or not self.accepts(req) or not self.authorized(req):
            self._respond(req, reply)
            return

        def refuse(verdict: Verdict) -> None:
            headers = {**_req_id(self), "x-should-retry": "true",
                       **anthropic_headers(verdict)}
            reply.json(429, {**anthropic_error(verdict), "request_id": headers["request-id"]},
                       headers)

        def answer(verdict: Verdict) -> None:
            reply.headers.update(anthropic_headers(verdict))
            self._respond(req, reply)

        serve(self.limiter, self.input_tokens + self.output_tokens, refuse, answer)

    def _respond(self, req: Request, reply: Reply) -> None:
        path = _path(req)
        if req.method == "POST" and path == "/v1/messages/count_tokens":
            reply.json(200, {"input_tokens": self.input_tokens}, _req_id(self))
            return
        if not self.accepts(req):
            reply.json(404, _error("not_found_error", f"Not found: {req.method} {path}"),
                       _req_id(self))
            return
        step = req.step
        if not self.authorized(req):
            step = "401"
        if step in ERRORS:
            self._error(reply, step)
        elif step == "drop":
            self._drop(req, reply)
        elif step.startswith("tool:"):
            result = _tool_result(req)
            if result is None:
                self._answer(req, reply, [self._tool_use(step.split(":", 1)[1])], "tool_use")
            else:
                text = f"The tool said: {result.strip() or '(nothing)'}. {self.text}"
                self._answer(req, reply, [{"type": "text", "text": text}], "end_turn")
        else:
            self._answer(req, reply, [{"type": "text", "text": self.text}], "end_turn")

    def _tool_use(self, tool: str) -> dict[str, Any]:
        if tool == "StructuredOutput":  # `claude --json-schema`'s answer: `text` as JSON
            return {"type": "tool_use", "id": f"toolu_stub{next(self._ids):06d}",
                    "name": tool, "input": json.loads(self.text)}
        if tool != "Bash":
            raise ValueError(f"the stub only scripts Bash and StructuredOutput calls, not "
                             f"{tool!r}")
        marker = self.marker or Path("/nonexistent/pd-stub-marker")
        return {"type": "tool_use", "id": f"toolu_stub{next(self._ids):06d}", "name": "Bash",
                "input": {"command": f"touch {marker}",
                          "description": "Create the marker file"}}

    def _usage(self, output: int | None = None) -> dict[str, Any]:
        return {"input_tokens": self.input_tokens, "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": self.output_tokens if output is None else output,
                "service_tier": "standard"}

    def _message(self, req: Request, content: list[dict[str, Any]],
                 stop: str | None) -> dict[str, Any]:
        return {"id": f"msg_stub{next(self._ids):06d}", "type": "message",
                "role": "assistant", "model": req.model or "claude-sonnet-4-5",
                "content": content, "stop_reason": stop, "stop_sequence": None,
                "usage": self._usage()}

    def _answer(self, req: Request, reply: Reply, content: list[dict[str, Any]],
                stop: str) -> None:
        if not (isinstance(req.body, dict) and req.body.get("stream")):
            reply.json(200, self._message(req, content, stop), _req_id(self))
            return
        reply.start_stream(_req_id(self))
        start = self._message(req, [], None)
        start["usage"] = self._usage(output=1)
        reply.sse({"type": "message_start", "message": start}, "message_start")
        reply.sse({"type": "ping"}, "ping")
        for i, block in enumerate(content):
            if block["type"] == "text":
                reply.sse({"type": "content_block_start", "index": i,
                           "content_block": {"type": "text", "text": ""}},
                          "content_block_start")
                words = block["text"].split(" ")
                for n, word in enumerate(words):
                    piece = word if n == len(words) - 1 else word + " "
                    reply.sse({"type": "content_block_delta", "index": i,
                               "delta": {"type": "text_delta", "text": piece}},
                              "content_block_delta")
            else:
                reply.sse({"type": "content_block_start", "index": i,
                           "content_block": {**block, "input": {}}}, "content_block_start")
                reply.sse({"type": "content_block_delta", "index": i,
                           "delta": {"type": "input_json_delta",
                                     "partial_json": json.dumps(block["input"])}},
                          "content_block_delta")
            reply.sse({"type": "content_block_stop", "index": i}, "content_block_stop")
        reply.sse({"type": "message_delta",
                   "delta": {"stop_reason": stop, "stop_sequence": None},
                   "usage": {"output_tokens": self.output_tokens}}, "message_delta")
        reply.sse({"type": "message_stop"}, "message_stop")

    def _drop(self, req: Request, reply: Reply) -> None:
        if not (isinstance(req.body, dict) and req.body.get("stream")):
            # A JSON answer cut half-way: the length promises more than ever arrives.
            data = json.dumps(self._message(req, [{"type": "text", "text": self.text}],
                                            "end_turn")).encode()
            reply.h.send_response(200)
            reply.h.send_header("Content-Type", "application/json")
            reply.h.send_header("Content-Length", str(len(data)))
            for k, v in _req_id(self).items():
                reply.h.send_header(k, v)
            reply.h.end_headers()
            reply.raw(data[: len(data) // 2])
            reply.drop()
            return
        reply.start_stream(_req_id(self))
        start = self._message(req, [], None)
        reply.sse({"type": "message_start", "message": start}, "message_start")
        reply.sse({"type": "content_block_start", "index": 0,
                   "content_block": {"type": "text", "text": ""}}, "content_block_start")
        reply.sse({"type": "content_block_delta", "index": 0,
                   "delta": {"type": "text_delta", "text": "This answer is cut "}},
                  "content_block_delta")
        reply.drop()

    def _error(self, reply: Reply, step: str) -> None:
        status, kind, message = ERRORS[step]
        headers = _req_id(self)
        if status in (429, 500, 529):
            headers["x-should-retry"] = "true"  # as api.anthropic.com sends with a 429
        if status == 429:
            reset = datetime.now(UTC) + timedelta(seconds=self.rate_limit_reset_s)
            stamp = reset.strftime("%Y-%m-%dT%H:%M:%SZ")
            headers.update({
                "retry-after": str(self.rate_limit_reset_s),
                "anthropic-ratelimit-requests-limit": "50",
                "anthropic-ratelimit-requests-remaining": "0",
                "anthropic-ratelimit-requests-reset": stamp,
                "anthropic-ratelimit-input-tokens-limit": "30000",
                "anthropic-ratelimit-input-tokens-remaining": "30000",
                "anthropic-ratelimit-input-tokens-reset": stamp,
                "anthropic-ratelimit-output-tokens-limit": "8000",
                "anthropic-ratelimit-output-tokens-remaining": "8000",
                "anthropic-ratelimit-output-tokens-reset": stamp,
                "anthropic-ratelimit-tokens-limit": "38000",
                "anthropic-ratelimit-tokens-remaining": "38000",
                "anthropic-ratelimit-tokens-reset": stamp,
            })
        payload = _error(kind, message)
        payload["request_id"] = headers["request-id"]
        reply.json(status, payload, headers)


def _path(req: Request) -> str:
    return req.path.split("?", 1)[0]


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


def _req_id(stub: AnthropicStub) -> dict[str, str]:
    return {"request-id": f"req_stub{next(stub._ids):06d}"}


def _tool_result(req: Request) -> str | None:
    """The text of the `tool_result` in the request's last user turn, if any."""
    messages = req.body.get("messages") if isinstance(req.body, dict) else None
    if not messages or not isinstance(messages[-1], dict):
        return None
    content = messages[-1].get("content")
    if not isinstance(content, list):
        return None
    for block in content:
        if isinstance(block, dict) and block.get("type") == "tool_result":
            inner = block.get("content")
            if isinstance(inner, list):  # the tool's text, then claude's own reminders
                texts = [str(b.get("text", "")) for b in inner if isinstance(b, dict)]
                inner = texts[0] if texts else ""
            # claude appends its own notes to the tool's output: keep the tool's part
            return str(inner or "").split("<system-reminder>", 1)[0].strip()
    return None
