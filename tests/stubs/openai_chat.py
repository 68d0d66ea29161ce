"""A local OpenAI Chat Completions API (`POST /v1/chat/completions`), JSON and SSE.

What opencode (through `@ai-sdk/openai-compatible`), llm (through the `openai` SDK)
and the dispatcher's own `openai` runner speak.  Streaming replies are
`chat.completion.chunk` events ended by `data: [DONE]`; with
`stream_options.include_usage` the last chunk has empty `choices` and the `usage`.
`GET /v1/models` lists `self.models`.  Steps (see `StubServer.behave`):

* "ok": a text reply (streamed when the request says `stream: true`); "json": a whole
  JSON reply even to a streaming request (a server that ignores `stream`);
  "midstream": an `error` event after the first delta (llama.cpp's way to fail late);
* "llamacpp": like llama.cpp's server before it honoured `include_usage` (b4xxx-b6xxx,
  `server_task_result_cmpl_final::to_json_oaicompat_chat_stream`): no usage-only
  chunk; the finishing chunk itself carries `usage` and llama.cpp's `timings`
  (`prompt_n`, `predicted_n`, ...), whatever the request asked;
* "timings": only `timings` in the finishing chunk, no `usage` (ik_llama.cpp before
  its PR 695 "Added usage to server response");
* "nousage": no usage at all (a server that ignores `include_usage` and counts nothing);
* "401": `invalid_api_key`; "quota": 429 `insufficient_quota`; "429": a per-minute
  rate limit (`rate_limit_exceeded`, `retry-after`, `x-ratelimit-reset-*`);
  "503": `server_is_overloaded`; "529": status 529 `overloaded_error` (what
  Anthropic-style gateways send); "500": `server_error`; "context": 400
  `context_length_exceeded`; with `retry_after_ms` set, the 5xx replies carry a
  `retry-after-ms` header (as Azure OpenAI sends; the OpenAI SDKs and opencode wait that
  long instead of their exponential backoff, which keeps a test of "keeps failing" short);
* "drop": the reply is cut after the first content delta (a JSON reply half-way);
  "hang": held open (base); "slow": the text streamed one word per `slow_s` seconds;
* "tool:Bash": a tool call for the client's shell tool (the offered tool named `bash`
  or `shell`, else `bash` anyway, as a model may ask for a tool it was not given)
  running `self.tool_command`; once the tool result comes back, the final text.

A request whose system prompt asks for a session title (opencode's title agent) is
answered "ok" without taking a scripted step, so the steps count model turns only.

Opt-in provider limits: `limiter = Limiter(Limits(concurrency=4, rpm=60, ...))`
(tests/stubs/limits.py) refuses model calls beyond them with OpenAI's 429, serves the
rest after its delay, and puts `x-ratelimit-*` headers on every model call's reply.
Each call costs `PROMPT_TOKENS + COMPLETION_TOKENS`, the usage it reports.  A refused
call has still taken its scripted step.
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

from .base import Reply, Request, StubServer
from .limits import Limiter, Verdict, openai_error, openai_headers, serve

DEFAULT_TEXT = "Hello from the chat stub."
DEFAULT_MODEL = "stub-model"
PROMPT_TOKENS = 1200
CACHED_TOKENS = 200
COMPLETION_TOKENS = 34
"""What every reply reports as its usage (per request; clients sum them per turn)."""
RATE_LIMIT_RESET_S = 2
"""The 429's `retry-after`, its `x-ratelimit-reset-requests` and its message's wait."""
TITLE_TEXT = "Stub session title"


def error_body(message: str, type_: str, code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON: `{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class OpenAIChatStub(StubServer):
    """OpenAI Chat Completions over JSON or SSE; `base_url` is `origin + "/v1"`."""

    name = "openai-chat"

    def __init__(self, text: str = DEFAULT_TEXT, models: tuple[str, ...] = (DEFAULT_MODEL,),
                 tool_command: str = "touch tool-ran.marker",
                 retry_after_s: int = RATE_LIMIT_RESET_S) -> None:
        super().__init__()
        self.text = text
        self.models = models
        self.tool_command = tool_command
        self.retry_after_s = retry_after_s
        self.retry_after_ms: int | None = None
        self.slow_s = 0.5
        self.limiter: Limiter | None = None
        self._ids = itertools.count(1)

    @property
    def base_url(self) -> str:
        return self.origin + "/v1"

    def accepts(self, req: Request) -> bool:
        return self.is_completion(req) and not self.is_title(req)

    @staticmethod
    def is_completion(req: Request) -> bool:
        return req.method == "POST" and req.path.split("?")[0].endswith("/chat/completions")

    @staticmethod
    def is_title(req: Request) -> bool:
        """opencode's title agent: a side request, not a model turn of the task."""
        return "title" in OpenAIChatStub.system_prompt(req).lower()[:400]

    def model_calls(self) -> list[Request]:
        """The chat completion requests that took a scripted step (no title requests)."""
        return [r for r in self.requests if self.accepts(r)]

    @staticmethod
    def system_prompt(req: Request) -> str:
        """The system message(s) of a request, joined (content parts flattened)."""
        out = []
        for msg in _messages(req):
            if msg.get("role") in ("system", "developer"):
                out.append(_content_text(msg.get("content")))
        return "\n".join(out)

    @staticmethod
    def user_text(req: Request) -> str:
        return "\n".join(_content_text(m.get("content")) for m in _messages(req)
                         if m.get("role") == "user")

    @staticmethod
    def tool_names(req: Request) -> list[str]:
        """The tools the client offered the model in this request."""
        tools = req.body.get("tools") if isinstance(req.body, dict) else None
        names = []
        for tool in tools or []:
            fn = tool.get("function") if isinstance(tool, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                names.append(fn["name"])
        return names

    @staticmethod
    def tool_results(req: Request) -> list[str]:
        """The tool results this request sends back (role `tool` messages)."""
        return [_content_text(m.get("content")) for m in _messages(req)
                if m.get("role") == "tool"]

    # -- replies -----------------------------------------------------------------------
    def respond(self, req: Request, reply: Reply) -> None:
        if self.limiter is None or not self.accepts(req):
            self._respond(req, reply)
            return

        def refuse(verdict: Verdict) -> None:
            reply.json(429, openai_error(verdict, req.model or DEFAULT_MODEL),
                       {**self._headers(), **openai_headers(verdict)})

        def answer(verdict: Verdict) -> None:
            reply.headers.update(openai_headers(verdict))
            self._respond(req, reply)

        serve(self.limiter, PROMPT_TOKENS + COMPLETION_TOKENS, refuse, answer)

    def _respond(self, req: Request, reply: Reply) -> None:
        path = req.path.split("?")[0]
        if req.method == "GET" and path.endswith("/models"):
            reply.json(200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": 1700000000, "owned_by": "stub"}
                for m in self.models]})
            return
        if not self.is_completion(req):
            reply.json(404, error_body(f"Invalid URL ({req.method} {path})",
                                       "invalid_request_error"), self._headers())
            return
        step = "ok" if self.is_title(req) else req.step
        text = TITLE_TEXT if self.is_title(req) else self.text
        if step.startswith("tool:"):
            if self.tool_results(req):
                self._answer(req, reply, text=text)
            else:
                self._answer(req, reply, call=self._tool_call(req, step.partition(":")[2]))
        elif step in ("ok", "llamacpp", "timings", "nousage"):
            self._answer(req, reply, text=text, usage_style=step)
        elif step == "drop":
            self._answer(req, reply, text=text, cut=True)
        elif step == "slow":
            self._answer(req, reply, text=text, pause=self.slow_s)
        elif step == "json":
            self._answer(req, reply, text=text, whole=True)
        elif step == "midstream":
            self._answer(req, reply, text=text, fail=True)
        elif step == "401":
            reply.json(401, error_body(
                "Incorrect API key provided: sk-bad***key. You can find your API key at "
                "https://platform.openai.com/account/api-keys.", "invalid_request_error",
                "invalid_api_key"), self._headers())
        elif step == "429":
            wait = self.retry_after_s
            reply.json(429, error_body(
                f"Rate limit reached for {req.model or DEFAULT_MODEL} in organization "
                "org-stub on requests per min (RPM): Limit 3, Used 3, Requested 1. Please "
                f"try again in {wait}s. Visit https://platform.openai.com/account/rate-limits "
                "to learn more.", "requests", "rate_limit_exceeded"),
                {**self._headers(), "retry-after": str(wait),
                 "x-ratelimit-limit-requests": "3", "x-ratelimit-remaining-requests": "0",
                 "x-ratelimit-reset-requests": f"{wait}s",
                 "x-ratelimit-limit-tokens": "40000", "x-ratelimit-remaining-tokens": "38800",
                 "x-ratelimit-reset-tokens": "1.8s"})
        elif step == "quota":
            reply.json(429, error_body(
                "You exceeded your current quota, please check your plan and billing "
                "details. For more information on this error, read the docs: "
                "https://platform.openai.com/docs/guides/error-codes/api-errors.",
                "insufficient_quota", "insufficient_quota"), self._headers())
        elif step == "503":
            reply.json(503, error_body("The server is overloaded, please try again later.",
                                       "server_error", "server_is_overloaded"),
                       self._headers(server_error=True))
        elif step == "529":
            reply.json(529, error_body("Overloaded", "overloaded_error"),
                       self._headers(server_error=True))
        elif step == "500":
            reply.json(500, error_body(
                "The server had an error while processing your request. Sorry about that!",
                "server_error"), self._headers(server_error=True))
        elif step == "context":
            reply.json(400, error_body(
                "This model's maximum context length is 8192 tokens. However, your messages "
                "resulted in 9100 tokens. Please reduce the length of the messages.",
                "invalid_request_error", "context_length_exceeded", "messages"),
                self._headers())
        else:
            reply.json(400, error_body(f"stub: unknown step {step!r}", "invalid_request_error"))

    def _headers(self, server_error: bool = False) -> dict[str, str]:
        headers = {"x-request-id": f"req_stub{next(self._ids):06d}"}
        if server_error and self.retry_after_ms is not None:
            headers["retry-after-ms"] = str(self.retry_after_ms)
        return headers

    def _answer(self, req: Request, reply: Reply, text: str | None = None,
                call: dict[str, Any] | None = None, cut: bool = False,
                usage_style: str = "ok", pause: float = 0.0, whole: bool = False,
                fail: bool = False) -> None:
        body = req.body if isinstance(req.body, dict) else {}
        cid = f"chatcmpl-stub{next(self._ids):06d}"
        model = req.model or DEFAULT_MODEL
        finish = "tool_calls" if call is not None else "stop"
        usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS,
                 "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
                 "prompt_tokens_details": {"cached_tokens": CACHED_TOKENS}}
        timings = {"prompt_n": PROMPT_TOKENS, "prompt_ms": 120.5,
                   "prompt_per_token_ms": 0.1, "prompt_per_second": 9958.5,
                   "predicted_n": COMPLETION_TOKENS, "predicted_ms": 210.0,
                   "predicted_per_token_ms": 6.2, "predicted_per_second": 161.9}
        if whole or not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if call is not None:
                message = {"role": "assistant", "content": None, "tool_calls": [call]}
            payload: dict[str, Any] = {
                "id": cid, "object": "chat.completion", "created": int(time.time()),
                "model": model, "choices": [{"index": 0, "message": message,
                                             "finish_reason": finish}]}
            if usage_style in ("ok", "llamacpp"):
                payload["usage"] = usage
            if usage_style in ("llamacpp", "timings"):
                payload["timings"] = timings
            if cut:  # the body stops half-way, before its announced length
                data = json.dumps(payload).encode()
                reply.h.send_response(200)
                reply.h.send_header("Content-Type", "application/json")
                reply.h.send_header("Content-Length", str(len(data)))
                reply.h.end_headers()
                reply.raw(data[:len(data) // 2])
                reply.drop()
                return
            reply.json(200, payload, self._headers())
            return

        def chunk(delta: dict[str, Any], finish_reason: str | None = None,
                  **extra: Any) -> dict[str, Any]:
            return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                    "model": model, "system_fingerprint": "fp_stub",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                 "finish_reason": finish_reason}], **extra}

        reply.start_stream(self._headers())
        reply.sse(chunk({"role": "assistant", "content": ""}))
        if call is not None:
            fn = call["function"]
            reply.sse(chunk({"tool_calls": [{"index": 0, "id": call["id"], "type": "function",
                                             "function": {"name": fn["name"],
                                                          "arguments": ""}}]}))
            reply.sse(chunk({"tool_calls": [{"index": 0,
                                             "function": {"arguments": fn["arguments"]}}]}))
        else:
            words = (text or "").split(" ")
            for i, word in enumerate(words):
                if pause and i:
                    time.sleep(pause)
                reply.sse(chunk({"content": word if i == len(words) - 1 else word + " "}))
                if cut:
                    reply.drop()
                    return
                if fail:
                    reply.sse(error_body("the model crashed", "server_error"))
                    reply.drop()
                    return
        include = bool((body.get("stream_options") or {}).get("include_usage"))
        if usage_style == "llamacpp":
            reply.sse(chunk({}, finish, usage=usage, timings=timings))
        elif usage_style == "timings":
            reply.sse(chunk({}, finish, timings=timings))
        else:
            reply.sse(chunk({}, finish))
            if usage_style == "ok" and include:
                reply.sse({"id": cid, "object": "chat.completion.chunk",
                           "created": int(time.time()), "model": model,
                           "system_fingerprint": "fp_stub", "choices": [], "usage": usage})
        reply.sse("[DONE]")

    def _tool_call(self, req: Request, tool: str) -> dict[str, Any]:
        """A call to the client's shell tool, whatever the client calls it."""
        offered = self.tool_names(req)
        wanted = {tool.lower(), "bash", "shell"}
        name = next((n for n in offered if n.lower() in wanted), "bash")
        args = {"command": self.tool_command, "description": "Create the marker file"}
        return {"id": f"call_stub{next(self._ids):06d}", "type": "function",
                "function": {"name": name, "arguments": json.dumps(args)}}


def _messages(req: Request) -> list[dict[str, Any]]:
    msgs = req.body.get("messages") if isinstance(req.body, dict) else None
    return [m for m in msgs or [] if isinstance(m, dict)]


def _content_text(content: Any) -> str:
    """A message's content as text: a string, or the text of its content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else json.dumps(content)
