"""OpenAI-compatible HTTP runner: streams a chat completion into the task's output.

For any server speaking the OpenAI Chat Completions API — OpenAI, Ollama, vLLM,
llama.cpp's server, LM Studio.  Followed: the OpenAI API reference for
`POST /v1/chat/completions` with `stream: true` (server-sent events of
`chat.completion.chunk`, ended by `data: [DONE]`; `stream_options.include_usage` adds a
last chunk with `usage`), the `Retry-After` / `x-ratelimit-reset-*` headers of 429
replies, and llama.cpp's server, which ignores `include_usage` and puts `usage` and its
own `timings` (`prompt_n`, `predicted_n`) into the finishing chunk instead (some builds
and forks send only `timings`).  Tested against tests/stubs/openai_chat.py.

A failed request names its cause (`Outcome.cause`, see events.CAUSES): 401/403 bad
credentials (not retried), 429 rate limited (retried after the server's reset time) or
`insufficient_quota` (not retried), 503/529 overloaded, other 5xx a server error,
400/404/413/422 a rejected request, a refused connection an unreachable server.  Each
streamed chunk counts as activity for `idle_timeout`; errors are also live events.

httpx runs natively on trio (through anyio), so a task's timeout or a Ctrl-C cancels
the request like any other attempt.  The reply is written to the staged output as it
arrives; a failed attempt's partial text ends up in logs/<id>.failed.out.

Config (`[runners.openai]` or `[agents.X]`): `base_url` (default `$OPENAI_BASE_URL`,
else https://api.openai.com/v1), `model` (required unless the definition names one),
`api_key_env` (the *name* of the variable holding the key; default OPENAI_API_KEY,
sent only if set), `read_timeout` (seconds of silence before giving up; default: the
task's timeout only).
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar

from ..agents import AgentSpec
from ..events import CAUSES, AgentEvent, Cause
from ..fmt import duration_s
from ..outputs import Staging
from .attempt import AttemptRunner, log_error
from .base import Job, Outcome

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_KEY_ENV = "OPENAI_API_KEY"
CONNECT_TIMEOUT_S = 10.0
MAX_RETRY_AFTER_S = 3600.0
RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 529})
"""OpenAI's `x-ratelimit-reset-*` values: `1s`, `6m0s`, `120ms`, `1h2m3.5s`."""


class OpenAIError(Exception):
    """One failed request, already phrased for the task's error."""

    def __init__(self, message: str, retryable: bool = True,
                 retry_after: float | None = None, status: int | None = None,
                 cause: Cause | None = None, requests_per_min: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after
        self.status = status
        self.cause = cause
        self.requests_per_min = requests_per_min


class OpenAIRunner(AttemptRunner):
    """Sends the prompt as the user message and the definition body as the system message.

    A sibling of the process runners: no argv, no process group; staging, the log,
    the environment (for the key) are `AttemptRunner`'s."""

    name = "openai"
    docs: ClassVar[str] = "OpenAI Chat Completions API, streaming (SSE) and Retry-After"
    native_schema = True  # response_format: json_schema

    def url(self, agent: AgentSpec) -> str:
        base = agent.base_url or self.base_env.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
        return base.rstrip("/") + "/chat/completions"

    def describe(self, job: Job) -> str:
        agent = job.agent
        key = agent.api_key_env or DEFAULT_KEY_ENV
        system = f"system prompt from {agent.definition.path.name}, " if agent.definition else ""
        return (f"POST {self.url(agent)} model={agent.model}  ({system}prompt as the user "
                f"message, streamed; key from ${key}; runner openai)")

    async def attempt(self, job: Job, staging: Staging) -> Outcome:
        agent = job.agent
        url = self.url(agent)
        with self.open_log(job, f"POST {url} model={agent.model}") as log:
            try:
                metrics = await self._request(job, staging, url)
            except OpenAIError as exc:
                msg = f"{self.error_prefix}{exc}"
                log_error(log, msg)
                if job.activity is not None:
                    job.activity.event(AgentEvent(str(exc), kind="error", cause=exc.cause,
                                                  retry_after=exc.retry_after))
                return Outcome(ok=False, error=msg, retryable=exc.retryable,
                               retry_after=exc.retry_after, cause=exc.cause,
                               requests_per_min=exc.requests_per_min)
            metrics["turns"] = 1
            usage = ", ".join(f"{k} {v}" for k, v in metrics.items()
                              if k.endswith("tokens"))
            log.write(f"=== done: {usage or 'the server reported no token usage'}\n".encode())
            if job.activity is not None and usage:
                job.activity.event(AgentEvent(f"done: {usage}", kind="tokens"))
        return Outcome(ok=True, metrics=metrics)

    async def _request(self, job: Job, staging: Staging, url: str) -> dict[str, Any]:
        import httpx  # imported here: validation and other runners never pay for it

        agent = job.agent
        env = self.env(job, staging.target)
        key_name = agent.api_key_env or DEFAULT_KEY_ENV
        key = env.get(key_name, "")
        if agent.api_key_env and not key:
            raise OpenAIError(f"${key_name} is not set; export the API key in it (api_key_env "
                              f"in {agent.source}) or remove api_key_env for a keyless server",
                              retryable=False)
        headers = {"Accept": "text/event-stream"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        messages = []
        if agent.system_prompt:
            messages.append({"role": "system", "content": agent.system_prompt})
        messages.append({"role": "user", "content": self.prompt(job)})
        body: dict[str, Any] = {"model": agent.model, "messages": messages, "stream": True,
                                "stream_options": {"include_usage": True}}
        schema = job.task.output_schema
        if isinstance(schema, dict):  # the server constrains the answer (json_schema mode)
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "output", "schema": schema}}
        timeout = httpx.Timeout(CONNECT_TIMEOUT_S, read=agent.read_timeout)
        activity = job.activity
        if activity is not None:
            activity.event(AgentEvent(f"POST {url}: waiting for the model"))
        try:
            async with httpx.AsyncClient(timeout=timeout) as client, \
                    client.stream("POST", url, json=body, headers=headers) as resp:
                if resp.status_code >= 400:
                    raise _http_error(resp.status_code, await _body(resp), resp.headers,
                                      url, key_name, bool(key))
                staging.stdout.parent.mkdir(parents=True, exist_ok=True)
                with open(staging.stdout, "w", encoding="utf-8") as out:
                    if "text/event-stream" in resp.headers.get("content-type", ""):
                        saw = activity.saw_output if activity is not None else None
                        return await _stream(resp.aiter_lines(), out, saw)
                    return _whole(await _body(resp), out)
        except httpx.ConnectError as exc:
            raise OpenAIError(f"{CAUSES['unreachable']}: cannot connect to {url} ({exc}); is "
                              "the server running and base_url right?",
                              cause="unreachable") from None
        except httpx.ConnectTimeout:
            raise OpenAIError(f"{CAUSES['unreachable']}: connecting to {url} timed out after "
                              f"{CONNECT_TIMEOUT_S:g}s; is the server up?",
                              cause="unreachable") from None
        except httpx.ReadTimeout:
            raise OpenAIError(f"no data from {url} for {agent.read_timeout:g}s "
                              "(read_timeout); the server is overloaded or the model is slow: "
                              "raise read_timeout") from None
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            raise OpenAIError(f"base_url {url!r} is not a valid http(s) URL ({exc})",
                              retryable=False) from None
        except httpx.RemoteProtocolError as exc:
            raise OpenAIError(f"the server closed the connection before the reply ended "
                              f"({exc})") from None
        except httpx.HTTPError as exc:
            raise OpenAIError(f"request to {url} failed: {exc!r}") from None


async def _body(resp: Any, cap: int = 64 * 1024) -> bytes:
    data = b""
    async for chunk in resp.aiter_bytes():
        data += chunk
        if len(data) >= cap:
            break
    return data[:cap]


def _server_message(body: bytes) -> str:
    """The error text of an OpenAI-style error body, else the start of the body."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    return text[:300] or "(empty body)"


def reset_after_s(headers: Any, now: float | None = None) -> float | None:
    """How long a rate-limited client should wait: `Retry-After` (or `retry-after-ms`),
    else OpenAI's `x-ratelimit-reset-requests` / `-tokens`.

    Only a limit whose `x-ratelimit-remaining-*` is 0 says how long to wait (the other
    resets tell when an unexhausted window refills); when neither says it is used up,
    or the server sends no `remaining`, the later reset is the safe answer."""
    wait = retry_after_s(headers, now)
    if wait is not None:
        return wait
    resets: dict[str, float] = {}
    for kind in ("requests", "tokens"):
        reset = duration_s(str(headers.get(f"x-ratelimit-reset-{kind}") or ""))
        if reset is not None:
            resets[kind] = reset
    if not resets:
        return None
    spent = [r for kind, r in resets.items()
             if str(headers.get(f"x-ratelimit-remaining-{kind}") or "").strip() == "0"]
    return min(max(spent or resets.values()), MAX_RETRY_AFTER_S)


def requests_per_min(headers: Any) -> float | None:
    """The request rate the provider refills, once a 429 says the request limit is spent.

    OpenAI and Anthropic replenish their limits continuously (a token bucket), and
    `x-ratelimit-reset-requests` is the time until the bucket is full again; with
    `remaining` at 0 that is the time to refill all of `limit`, so limit ÷ reset is the
    rate the pool may start requests at.  None when the request limit is not what ran out
    (a token or concurrency limit), or the headers don't say.
    """
    if str(headers.get("x-ratelimit-remaining-requests") or "").strip() != "0":
        return None
    try:
        limit = float(str(headers.get("x-ratelimit-limit-requests") or "").strip())
    except ValueError:
        return None
    reset = duration_s(str(headers.get("x-ratelimit-reset-requests") or ""))
    if not (0 < limit < float("inf")) or reset is None or reset <= 0:
        return None
    return limit * 60.0 / reset


def retry_after_s(headers: Any, now: float | None = None) -> float | None:
    """Seconds to wait from `Retry-After` (seconds or HTTP date) or `retry-after-ms`."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return min(max(float(ms) / 1000, 0.0), MAX_RETRY_AFTER_S)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError):
            return None
        seconds = when - (time.time() if now is None else now)
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def _http_error(status: int, body: bytes, headers: Any, url: str, key_name: str,
                sent_key: bool) -> OpenAIError:
    message = _server_message(body)
    if status in (401, 403):
        fix = (f"set ${key_name} to a valid key" if sent_key
               else f"the server wants a key: export it as ${key_name} (or name another "
                    "variable with api_key_env)")
        return OpenAIError(f"{CAUSES['auth']} (HTTP {status}: {message}); {fix}",
                           retryable=False, status=status, cause="auth")
    if status == 404:
        return OpenAIError(f"{CAUSES['bad_request']} (HTTP 404 from {url}: {message}); check "
                           "base_url (most servers want it to end in /v1) and the model name",
                           retryable=False, status=status, cause="bad_request")
    if status == 429 and b"insufficient_quota" in body:
        return OpenAIError(f"{CAUSES['quota']} (HTTP 429: {message})", retryable=False,
                           status=status, cause="quota")
    if status == 429:
        wait = reset_after_s(headers)
        hint = f"retry after {wait:g}s" if wait is not None else "retry later"
        return OpenAIError(f"{CAUSES['rate_limit']} (HTTP 429: {message}); {hint}",
                           retryable=True, retry_after=wait, status=status, cause="rate_limit",
                           requests_per_min=requests_per_min(headers))
    if status in (503, 529):
        return OpenAIError(f"{CAUSES['overloaded']} (HTTP {status}: {message})", retryable=True,
                           retry_after=retry_after_s(headers), status=status,
                           cause="overloaded")
    if status in RETRYABLE_STATUS or status >= 500:
        return OpenAIError(f"{CAUSES['server']} (HTTP {status}: {message})", retryable=True,
                           retry_after=retry_after_s(headers), status=status, cause="server")
    return OpenAIError(f"{CAUSES['bad_request']} (HTTP {status}: {message}); check model and "
                       "base_url", retryable=False, status=status, cause="bad_request")


async def _sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The `data` of each server-sent event (multi-line data joined by newlines)."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield "\n".join(data)


async def _stream(lines: AsyncIterator[str], out: Any,
                  saw_output: Callable[[], None] | None = None) -> dict[str, Any]:
    usage = _Usage()
    finished = False
    last = ""
    async for data in _sse_data(lines):
        if saw_output is not None:
            saw_output()
        if data.strip() == "[DONE]":
            finished = True
            break
        try:
            chunk = json.loads(data)
        except ValueError:
            continue
        if not isinstance(chunk, dict):
            continue
        if "error" in chunk:
            raise OpenAIError(f"{CAUSES['server']}: the server reported an error mid-stream: "
                              f"{_server_message(data.encode())}", cause="server")
        usage.read(chunk)
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta") or {}
            text = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(text, str) and text:
                out.write(text)
                out.flush()
                last = text
            if choice.get("finish_reason"):
                finished = True
    if not finished:
        raise OpenAIError("the stream ended before the reply was finished (no finish_reason "
                          "and no [DONE])")
    if last and not last.endswith("\n"):
        out.write("\n")
    return usage.metrics()


def _whole(body: bytes, out: Any) -> dict[str, Any]:
    """A server that ignored `stream: true` and sent one JSON completion."""
    try:
        data = json.loads(body)
        text = data["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise OpenAIError(f"unexpected reply (not a chat completion): {body[:200]!r}") from None
    usage = _Usage()
    usage.read(data)
    text = text or ""
    out.write(text + ("" if not text or text.endswith("\n") else "\n"))
    return usage.metrics()


class _Usage:
    """Token counts seen in a reply: `usage` (OpenAI's usage chunk, or llama.cpp's
    finishing chunk) wins over llama.cpp's `timings` (whose `prompt_n` counts only the
    prompt tokens that were not already cached)."""

    def __init__(self) -> None:
        self.usage: dict[str, int] = {}
        self.timings: dict[str, int] = {}

    def read(self, chunk: dict[str, Any]) -> None:
        for key, fields, into in (("usage", ("prompt_tokens", "completion_tokens"), self.usage),
                                  ("timings", ("prompt_n", "predicted_n"), self.timings)):
            found = chunk.get(key)
            if not isinstance(found, dict):
                continue
            for src, dst in zip(fields, ("input_tokens", "output_tokens"), strict=True):
                value = found.get(src)
                if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                    into[dst] = value

    def metrics(self) -> dict[str, Any]:
        return dict(self.usage or self.timings)
