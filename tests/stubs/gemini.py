"""The Gemini API (generativelanguage v1beta) as gemini-cli 0.61.0 uses it.

gemini-cli talks to `{GOOGLE_GEMINI_BASE_URL}/v1beta/models/{model}:{method}`:

* `:streamGenerateContent?alt=sse` for every model turn: server-sent events, each a
  `GenerateContentResponse` (`candidates[].content.parts[]`, `finishReason` on the
  last chunk, `usageMetadata`, `modelVersion`, `responseId`);
* `:generateContent` for its helper calls (the model router's classifier when the model
  is `auto`, ...), answered by the JSON schema they ask for; `:countTokens`.  These
  always succeed: a scripted step only hits model turns.

Errors use Google's shape, `{"error": {"code", "message", "status", "details": [...]}}`,
with the `details` gemini-cli reads (`ErrorInfo.reason`, `RetryInfo.retryDelay`,
`QuotaFailure`).  Steps: "ok", "400" (API key not valid), "401", "429" (per-minute quota
with a RetryInfo), "quota" (the per-day quota used up), "503" (model overloaded; "529"
is an alias, as the other stubs name overload), "500", "drop" (one text chunk, then the
connection is cut before the finishReason), "empty" (a finished answer without text),
"hang" (base), and "tool:Bash" (a `run_shell_command` call running `touch <marker>`,
then, once the function response comes back, a final text).
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

from .base import Reply, Request, StubServer

ANSWER = "Stub answer from gemini."
TOOL_DONE = "The shell command ran."
PROMPT_TOKENS = 1234
OUTPUT_TOKENS = 56
CACHED_TOKENS = 200
RETRY_DELAY_S = 2
"""The `retryDelay` a 429 asks for: short, so a test sees gemini wait and retry."""

PATH = re.compile(r"^/v1(?:beta|alpha)?/models/(?P<model>[^:/?]+):(?P<method>\w+)")

API_KEY_INVALID = {
    "code": 400,
    "message": "API key not valid. Please pass a valid API key.",
    "status": "INVALID_ARGUMENT",
    "details": [
        {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
         "domain": "googleapis.com",
         "metadata": {"service": "generativelanguage.googleapis.com"}},
        {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US",
         "message": "API key not valid. Please pass a valid API key."},
    ],
}
UNAUTHENTICATED = {
    "code": 401,
    "message": "Request had invalid authentication credentials. Expected OAuth 2 access "
               "token, login cookie or other valid authentication credential.",
    "status": "UNAUTHENTICATED",
    "details": [
        {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "CREDENTIALS_MISSING",
         "domain": "googleapis.com",
         "metadata": {"service": "generativelanguage.googleapis.com",
                      "method": "google.ai.generativelanguage.v1beta.GenerativeService."
                                "StreamGenerateContent"}},
    ],
}


def rate_limited(model: str, delay_s: float = RETRY_DELAY_S) -> dict[str, Any]:
    """A free-tier per-minute quota hit, as the Gemini API words it."""
    return {
        "code": 429,
        "message": "You exceeded your current quota, please check your plan and billing "
                   "details. For more information on this error, head to: "
                   "https://ai.google.dev/gemini-api/docs/rate-limits.",
        "status": "RESOURCE_EXHAUSTED",
        "details": [
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [
                {"quotaMetric": "generativelanguage.googleapis.com/"
                                "generate_content_free_tier_requests",
                 "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                 "quotaDimensions": {"location": "global", "model": model},
                 "quotaValue": "10"}]},
            {"@type": "type.googleapis.com/google.rpc.Help", "links": [
                {"description": "Learn more about Gemini API quotas",
                 "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo",
             "retryDelay": f"{delay_s:g}s"},
        ],
    }


def daily_quota(model: str) -> dict[str, Any]:
    """A per-day quota used up: gemini-cli gives up at once (TerminalQuotaError)."""
    err = rate_limited(model, delay_s=41 * 60)
    err["details"][0]["violations"][0].update(
        quotaId="GenerateRequestsPerDayPerProjectPerModel-FreeTier",
        quotaMetric="generativelanguage.googleapis.com/generate_content_free_tier_requests")
    return err


OVERLOADED = {"code": 503, "message": "The model is overloaded. Please try again later.",
              "status": "UNAVAILABLE", "details": []}
INTERNAL = {"code": 500, "message": "An internal error has occurred. Please retry or report "
                                    "in https://developers.generativeai.google/guide/"
                                    "troubleshooting",
            "status": "INTERNAL", "details": []}


class GeminiStub(StubServer):
    """Answers gemini-cli's model calls; `marker` is the file "tool:Bash" touches."""

    name = "gemini"

    def __init__(self, marker: Path | None = None) -> None:
        super().__init__()
        self.marker = marker

    # -- what the test reads --------------------------------------------------------
    def turns(self) -> list[Request]:
        """The model turns (streamGenerateContent), in order."""
        return [r for r in self.calls(":streamGenerateContent")]

    @staticmethod
    def model_of(req: Request) -> str | None:
        m = PATH.match(req.path)
        return m.group("model") if m else None

    @staticmethod
    def system_text(req: Request) -> str:
        """The systemInstruction's text parts, joined."""
        body = req.body if isinstance(req.body, dict) else {}
        si = body.get("systemInstruction") or {}
        parts = si.get("parts") if isinstance(si, dict) else None
        return "".join(p.get("text", "") for p in parts or [] if isinstance(p, dict))

    # -- scripting --------------------------------------------------------------------
    def accepts(self, req: Request) -> bool:
        return req.method == "POST" and ":streamGenerateContent" in req.path

    def respond(self, req: Request, reply: Reply) -> None:
        m = PATH.match(req.path)
        if m is None:
            reply.json(404, {"error": {"code": 404, "message": f"no route {req.path}",
                                       "status": "NOT_FOUND", "details": []}})
            return
        model, method = m.group("model"), m.group("method")
        if method == "countTokens":
            reply.json(200, {"totalTokens": PROMPT_TOKENS})
            return
        if method == "generateContent":
            reply.json(200, self._response(model, [{"text": self._helper_text(req)}]))
            return
        if method != "streamGenerateContent":
            reply.json(404, {"error": {"code": 404, "message": f"no method {method}",
                                       "status": "NOT_FOUND", "details": []}})
            return
        step = req.step or "ok"
        errors = {"400": API_KEY_INVALID, "401": UNAUTHENTICATED, "429": rate_limited(model),
                  "quota": daily_quota(model), "503": OVERLOADED, "529": OVERLOADED,
                  "500": INTERNAL}
        if step in errors:
            err = errors[step]
            reply.json(int(err["code"]), {"error": err})
            return
        if step == "drop":
            reply.start_stream()
            reply.sse(self._chunk(model, [{"text": "Partial "}]))
            reply.drop()
            return
        if step == "empty":
            reply.start_stream()
            reply.sse(self._response(model, [{"text": ""}]))
            return
        if step == "tool:Bash" and not _has_function_response(req):
            reply.start_stream()
            reply.sse(self._response(model, [{"functionCall": {
                "name": "run_shell_command",
                "args": {"command": f"touch {self.marker}",
                         "description": "Create the marker file"}}}]))
            return
        text = TOOL_DONE if step == "tool:Bash" else ANSWER
        reply.start_stream()
        half = len(text) // 2
        reply.sse(self._chunk(model, [{"text": text[:half]}]))
        reply.sse(self._response(model, [{"text": text[half:]}]))

    # -- payloads ---------------------------------------------------------------------
    def _chunk(self, model: str, parts: list[dict[str, Any]]) -> dict[str, Any]:
        return {"candidates": [{"content": {"role": "model", "parts": parts}, "index": 0}],
                "modelVersion": model, "responseId": uuid.uuid4().hex[:20]}

    def _response(self, model: str, parts: list[dict[str, Any]]) -> dict[str, Any]:
        out = self._chunk(model, parts)
        out["candidates"][0]["finishReason"] = "STOP"
        out["usageMetadata"] = {
            "promptTokenCount": PROMPT_TOKENS, "candidatesTokenCount": OUTPUT_TOKENS,
            "totalTokenCount": PROMPT_TOKENS + OUTPUT_TOKENS,
            "cachedContentTokenCount": CACHED_TOKENS,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": PROMPT_TOKENS}]}
        return out

    @staticmethod
    def _helper_text(req: Request) -> str:
        """gemini-cli's helper calls ask for JSON by schema (the model router's
        `complexity_score`, the next-speaker check...): fill it in."""
        body = req.body if isinstance(req.body, dict) else {}
        cfg = body.get("generationConfig") or {}
        schema = cfg.get("responseJsonSchema") or cfg.get("responseSchema")
        if isinstance(schema, dict):
            return json.dumps(_fill(schema))
        return "summary"


def _fill(schema: dict[str, Any]) -> Any:
    """A value matching a (Gemini-flavoured) JSON schema: first enum value, 1, "stub"."""
    kind = str(schema.get("type", "object")).lower()
    if schema.get("enum"):
        return schema["enum"][0]
    if kind == "object":
        props = schema.get("properties") or {}
        return {k: _fill(v) for k, v in props.items() if isinstance(v, dict)}
    if kind == "array":
        items = schema.get("items")
        return [_fill(items)] if isinstance(items, dict) else []
    if kind in ("integer", "number"):
        return 1
    if kind == "boolean":
        return False
    return "stub"


def _has_function_response(req: Request) -> bool:
    """Whether the last user turn carries a functionResponse (the tool ran)."""
    body = req.body if isinstance(req.body, dict) else {}
    contents = body.get("contents") or []
    if not contents:
        return False
    last = contents[-1] if isinstance(contents[-1], dict) else {}
    return any(isinstance(p, dict) and "functionResponse" in p for p in last.get("parts", []))
