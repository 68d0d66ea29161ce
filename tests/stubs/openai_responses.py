"""A local OpenAI Responses API (`POST /v1/responses`, SSE), as the Codex CLI uses it.

Codex 0.171.0 streams every turn from `POST {base_url}/responses` and reads the
server-sent events `response.created`, `response.output_item.added` / `.done`,
`response.output_text.delta` and `response.completed` (whose `usage` becomes the
`turn.completed` token counts).  Errors are OpenAI's error JSON with the real headers:

* "401": `invalid_api_key`;
* "429": a per-minute rate limit (`rate_limit_exceeded`, `retry-after`,
  `x-ratelimit-reset-*`); "usage_limit": ChatGPT's plan limit as codex parses it
  (`error.type = usage_limit_reached`, `resets_at`, `resets_in_seconds`, the
  `x-codex-primary-*` headers);
* "503" / "529" / "overloaded": `server_is_overloaded` (503, which codex maps to
  ServerOverloaded); "500": `server_error`;
* "drop": the stream is cut after the first delta; "hang": held open (base class);
* "tool:Bash": a function call to codex's shell tool (`exec_command`) running
  `self.tool_command`; once its output comes back, the final text;
* any other step: a 400 `invalid_request_error` naming it.

A provider with `supports_websockets = true` first tries a WebSocket upgrade
(`GET /v1/responses`); like a server without WebSocket support this stub answers it
with OpenAI's 404 "Invalid URL", and codex falls back to HTTPS.
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

from .base import Reply, Request, StubServer

DEFAULT_TEXT = "Hello from the Responses stub."
USAGE = {"input_tokens": 1200, "cached_input_tokens": 200, "output_tokens": 34,
         "reasoning_tokens": 0}
"""What every streamed response reports (per request; codex sums them per turn)."""

RATE_LIMIT_RESET_S = 20
"""The 429's `retry-after`; also what its message says ("Please try again in 20s")."""
USAGE_LIMIT_RESET_S = 3600
"""How far away the usage-limit reset is (`resets_in_seconds`; `resets_at` = now + this)."""


def error_body(message: str, type_: str, code: str | None = None,
               **extra: Any) -> dict[str, Any]:
    """OpenAI's error JSON: `{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": message, "type": type_, "param": None, "code": code, **extra}}


class ResponsesStub(StubServer):
    """OpenAI Responses API over SSE; `base_url` is `origin + "/v1"`."""

    name = "openai-responses"

    def __init__(self, text: str = DEFAULT_TEXT,
                 tool_command: str = "touch tool-ran.marker") -> None:
        super().__init__()
        self.text = text
        self.tool_command = tool_command
        self.rate_limit_reset_s = RATE_LIMIT_RESET_S
        self.usage_limit_reset_s = USAGE_LIMIT_RESET_S
        self._ids = itertools.count(1)

    @property
    def base_url(self) -> str:
        return self.origin + "/v1"

    def accepts(self, req: Request) -> bool:
        return req.method == "POST" and req.path.split("?")[0].endswith("/responses")

    def model_calls(self) -> list[Request]:
        """The `POST /v1/responses` requests (not WebSocket upgrade attempts)."""
        return [r for r in self.calls("/responses") if r.method == "POST"]

    def upgrades(self) -> list[Request]:
        """WebSocket upgrade attempts (`GET` with `Upgrade: websocket`)."""
        return [r for r in self.requests if r.headers.get("upgrade", "").lower() == "websocket"]

    # -- replies -----------------------------------------------------------------------
    def respond(self, req: Request, reply: Reply) -> None:
        if not self.accepts(req):
            # What api.openai.com says for a method/path it does not serve, a WebSocket
            # upgrade included: codex then falls back to plain HTTPS.
            reply.h.close_connection = True
            reply.json(404, error_body(f"Invalid URL ({req.method} {req.path.split('?')[0]})",
                                       "invalid_request_error"), self._ids_headers())
            return
        step = req.step
        if step.startswith("tool:"):
            if self._tool_output(req) is None:
                self._stream(reply, req, call=self._tool_call(step.partition(":")[2]))
            else:
                self._stream(reply, req, text=self.text)
        elif step == "ok":
            self._stream(reply, req, text=self.text)
        elif step == "drop":
            self._stream(reply, req, text=self.text, cut=True)
        elif step == "401":
            reply.json(401, error_body(
                "Incorrect API key provided: sk-bad***key. You can find your API key at "
                "https://platform.openai.com/account/api-keys.", "invalid_request_error",
                "invalid_api_key"), self._ids_headers())
        elif step == "429":
            reply.json(429, error_body(
                f"Rate limit reached for {req.model or 'gpt-5'} in organization org-stub on "
                "tokens per min (TPM): Limit 30000, Used 30000, Requested 1200. Please try "
                f"again in {self.rate_limit_reset_s}s. Visit https://platform.openai.com/account/"
                "rate-limits to learn more.", "tokens", "rate_limit_exceeded"),
                {**self._ids_headers(), "retry-after": str(self.rate_limit_reset_s),
                 "x-ratelimit-limit-requests": "500", "x-ratelimit-remaining-requests": "499",
                 "x-ratelimit-reset-requests": "120ms", "x-ratelimit-limit-tokens": "30000",
                 "x-ratelimit-remaining-tokens": "0",
                 "x-ratelimit-reset-tokens": f"{self.rate_limit_reset_s}s"})
        elif step == "usage_limit":
            resets_at = int(time.time()) + self.usage_limit_reset_s
            reply.json(429, {"error": {
                "type": "usage_limit_reached", "message": "The usage limit has been reached",
                "plan_type": "plus", "resets_at": resets_at,
                "resets_in_seconds": self.usage_limit_reset_s}},
                {**self._ids_headers(), "x-codex-primary-used-percent": "100.0",
                 "x-codex-primary-window-minutes": "300",
                 "x-codex-primary-reset-at": str(resets_at),
                 "x-codex-secondary-used-percent": "42.0",
                 "x-codex-secondary-window-minutes": "10080"})
        elif step in ("503", "529", "overloaded"):
            reply.json(503, error_body("The server is overloaded, please try again later.",
                                       "server_error", "server_is_overloaded"),
                       self._ids_headers())
        elif step == "500":
            reply.json(500, error_body(
                "The server had an error while processing your request. Sorry about that!",
                "server_error"), self._ids_headers())
        else:
            reply.json(400, error_body(f"stub: unknown step {step!r}", "invalid_request_error"))

    def _ids_headers(self) -> dict[str, str]:
        return {"x-request-id": f"req_stub{next(self._ids):06d}"}

    def _stream(self, reply: Reply, req: Request, text: str | None = None,
                call: dict[str, Any] | None = None, cut: bool = False) -> None:
        rid = f"resp_stub{next(self._ids):06d}"
        model = req.model or "gpt-5"
        reply.start_stream(self._ids_headers())
        base = {"id": rid, "object": "response", "created_at": int(time.time()),
                "model": model, "status": "in_progress", "output": []}
        seq = itertools.count()

        def ev(kind: str, **fields: Any) -> None:
            reply.sse({"type": kind, "sequence_number": next(seq), **fields}, event=kind)

        ev("response.created", response=base)
        ev("response.in_progress", response=base)
        if call is not None:
            item: dict[str, Any] = call
            ev("response.output_item.added", output_index=0,
               item={**call, "status": "in_progress", "arguments": ""})
            ev("response.function_call_arguments.delta", output_index=0,
               item_id=call["id"], delta=call["arguments"])
            ev("response.function_call_arguments.done", output_index=0,
               item_id=call["id"], arguments=call["arguments"])
        else:
            mid = f"msg_stub{next(self._ids):06d}"
            part = {"type": "output_text", "text": text or "", "annotations": []}
            item = {"id": mid, "type": "message", "status": "completed", "role": "assistant",
                    "content": [part]}
            ev("response.output_item.added", output_index=0,
               item={**item, "status": "in_progress", "content": []})
            ev("response.content_part.added", output_index=0, item_id=mid, content_index=0,
               part={**part, "text": ""})
            words = (text or "").split(" ")
            for i, word in enumerate(words):
                ev("response.output_text.delta", output_index=0, item_id=mid, content_index=0,
                   delta=word if i == len(words) - 1 else word + " ")
                if cut:
                    reply.drop()
                    return
            ev("response.output_text.done", output_index=0, item_id=mid, content_index=0,
               text=text or "")
            ev("response.content_part.done", output_index=0, item_id=mid, content_index=0,
               part=part)
        ev("response.output_item.done", output_index=0, item=item)
        u = USAGE
        usage = {"input_tokens": u["input_tokens"],
                 "input_tokens_details": {"cached_tokens": u["cached_input_tokens"]},
                 "output_tokens": u["output_tokens"],
                 "output_tokens_details": {"reasoning_tokens": u["reasoning_tokens"]},
                 "total_tokens": u["input_tokens"] + u["output_tokens"]}
        ev("response.completed",
           response={**base, "status": "completed", "output": [item], "usage": usage})

    def _tool_call(self, tool: str) -> dict[str, Any]:
        """A call to codex's shell tool; any tool name asked for maps to `exec_command`
        ("Bash" is Claude's name for the same thing)."""
        del tool
        n = next(self._ids)
        return {"id": f"fc_stub{n:06d}", "type": "function_call", "status": "completed",
                "call_id": f"call_stub{n:06d}", "name": "exec_command",
                "arguments": json.dumps({"cmd": self.tool_command})}

    @staticmethod
    def _tool_output(req: Request) -> str | None:
        """The output of a tool call this request sends back, if any."""
        items = req.body.get("input") if isinstance(req.body, dict) else None
        for item in items or []:
            if isinstance(item, dict) and item.get("type") == "function_call_output":
                out = item.get("output")
                return out if isinstance(out, str) else json.dumps(out)
        return None

    def tool_outputs(self) -> list[str]:
        """Every tool output codex sent back (what the shell command printed)."""
        outs = [self._tool_output(r) for r in self.model_calls()]
        return [o for o in outs if o is not None]
