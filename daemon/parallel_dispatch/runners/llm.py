"""llm preset (simonw/llm): `llm -m M -s BODY --no-stream -u -n`, prompt on stdin.

Verified against the real **llm 0.36** with an OpenAI-compatible model from
`extra-openai-models.yaml` pointing at a local Chat Completions stub, and with the
local SmolLM2 model (tests/contract/test_llm.py; docs/agent-clis.md, "llm").  Notable
choices:

* stdout is the answer as is; `-u` prints `Token usage: 1,234 input, 56 output` on
  stderr (no cost; an empty `Token usage: ` when the model reports none); `-n` keeps
  parallel runs from all writing logs.db;
* `--no-stream` stays: streamed, a connection cut mid-reply ends with exit 0 and half
  an answer (the `openai` SDK's stream just stops), while a whole reply that is cut
  raises, and the SDK retries it;
* `OPENAI_LOG=info` (unless set) makes the `openai` SDK that llm's OpenAI models use
  print `Retrying request in 2.0 seconds (retry 1 of 2)` on stderr: live retry events;
* a system prompt too long for argv is put in front of the prompt instead of `-s`;
* llm has no exit-0 error payload: failures are click's `Error: ...` with exit 1; the
  SDK's errors read `Error code: 401 - <message>`, `Connection error.` (refused or cut
  after the SDK's 2 retries), and a local model's `Requested tokens (931) exceed
  context window of 512`.  They are classified into causes (bad credentials, rate
  limit, quota, overloaded, server, unreachable, rejected request).
"""

from __future__ import annotations

import re
from typing import Any

from ..events import AgentEvent, Cause
from ..fmt import duration_s
from ..outputs import Staging
from .attempt import schema_path
from .base import Job, Outcome
from .preset import Call, Invocation, Parsed, PresetRunner, StreamName, cause_patterns, last_line

NO_SCHEMA = "does not support schemas"
"""llm 0.36's error for `--schema` with a model that cannot take one."""
USAGE_RE = re.compile(r"Token usage: ([\d,]+) input, ([\d,]+) output")
STATUS_RE = re.compile(r"Error code: (\d{3})\b")
RETRY_RE = re.compile(r"Retrying request in ([\d.]+) seconds \(retry (\d+) of (\d+)\)")
WAIT_RE = re.compile(r"try again in ((?:\d+(?:\.\d+)?(?:ms|h|m|s))+)(?![a-z])", re.IGNORECASE)
"""The server's wait in its message: `2s`, `120ms`, or with minutes, `1m2.64s`."""
TEXT_CAUSES = cause_patterns(
    ("auth", r"no key found|incorrect api key|invalid[ _]api[ _]key|unauthori[sz]ed|"
             r"authentication"),
    ("quota", r"insufficient_quota|exceeded your current quota"),
    ("rate_limit", r"rate.?limit"),
    ("overloaded", r"overloaded"),
    ("bad_request", r"context window|context length|context_length_exceeded|"
                    r"maximum context|too many tokens"),
    ("unreachable", r"^connection error\.?$|connection refused|name or service not known"),
)


def stated_wait(message: str) -> float | None:
    """The wait an OpenAI-style 429 message states ("Please try again in 1m2.64s")."""
    found = WAIT_RE.search(message)
    return duration_s(found.group(1).lower()) if found else None


def classify(message: str) -> tuple[Cause | None, int | None]:
    """The cause of an llm error message, and the HTTP status it quotes."""
    match = STATUS_RE.search(message)
    status = int(match.group(1)) if match else None
    text = next((c for c, pattern in TEXT_CAUSES if pattern.search(message)), None)
    if status in (401, 403):
        return "auth", status
    if status == 429:
        return ("quota" if text == "quota" else "rate_limit"), status
    if status in (503, 529):
        return "overloaded", status
    if status is not None and status >= 500:
        return "server", status
    if status in (400, 404, 413, 422):
        return "bad_request", status
    return text, status


class LlmRunner(PresetRunner):
    name = "llm"
    docs = "llm 0.36 (verified on a local Chat Completions stub and SmolLM2); simonw/llm"
    install_hint = ("install llm (pipx install llm) or set command = [\"/path/to/llm\"] in "
                    "[runners.llm]")
    auth_hint = "add a key with `llm keys set <provider>` or set the provider's key variable"
    native_schema = True  # --schema (a JSON schema's file path)

    def build(self, call: Call) -> Invocation:
        agent = call.agent
        argv = [*self.prefix(agent)]
        if agent.model:
            argv += ["-m", agent.model]
        stdin = call.prompt
        if call.system_prompt:
            if call.show or call.argv_safe(call.system_prompt):
                argv += ["-s", call.body]
            else:
                stdin = call.with_system_prompt()
        if isinstance(call.job.task.output_schema, dict) and self.schema_native(call.job):
            argv += ["--schema", str(schema_path(call.job))]
        argv += ["--no-stream", "-u", "-n"]
        if not any(a in ("-d", "--database") or a.startswith("--database=") for a in agent.args):
            # llm 0.36 creates and migrates its logs.db on every prompt, even with -n:
            # parallel first runs race on it ("no such table: log").  A private
            # in-memory database avoids that and leaves the user's log alone.
            argv += ["-d", ":memory:"]
        argv += list(agent.args)
        env = {} if "OPENAI_LOG" in agent.env or "OPENAI_LOG" in self.base_env \
            else {"OPENAI_LOG": "info"}
        return Invocation(argv=argv, stdin=stdin, env=env)

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._schemaless: set[str | None] = set()
        """Models llm refused a `--schema` for: they get the schema in the prompt."""

    def schema_native(self, job: Job) -> bool:
        return job.agent.model not in self._schemaless

    async def attempt(self, job: Job, staging: Staging) -> Outcome:
        """A model llm says takes no schema (a plugin's, or an OpenAI-compatible one
        without `supports_schema: true`) gets it in the prompt instead, at once and from
        then on (README "Checked outputs")."""
        outcome = await super().attempt(job, staging)
        if (not outcome.ok and isinstance(job.task.output_schema, dict)
                and self.schema_native(job) and NO_SCHEMA in (outcome.error or "")):
            self._schemaless.add(job.agent.model)
            return await super().attempt(job, staging)
        return outcome

    def watch(self, call: Call, line: str, stream: StreamName) -> AgentEvent | None:
        if stream != "stderr":
            return None
        text = line.strip()
        retry = RETRY_RE.search(text)
        if retry:
            return AgentEvent(f"API retry {retry.group(2)}/{retry.group(3)} in "
                              f"{float(retry.group(1)):.1f} s", kind="retry")
        usage = USAGE_RE.search(text)
        if usage:
            return AgentEvent(f"tokens: {usage.group(1)} input, {usage.group(2)} output",
                              kind="tokens")
        if text.startswith("Error:"):
            cause, _ = classify(text)
            # The final error, seen live: its stated wait reaches the pool at once, so the
            # pool does not guess a backoff of its own first.
            return AgentEvent(text, kind="error", cause=cause,
                              retry_after=stated_wait(text) if cause == "rate_limit" else None)
        return None

    def parse(self, call: Call, code: int, stdout: bytes, stderr: str) -> Parsed:
        metrics: dict[str, Any] = {}
        matches = USAGE_RE.findall(stderr)
        if matches:
            tokens_in, tokens_out = matches[-1]
            metrics["input_tokens"] = int(tokens_in.replace(",", ""))
            metrics["output_tokens"] = int(tokens_out.replace(",", ""))
        if code != 0:
            message = last_line(stderr, "Error:").removeprefix("Error:").strip() \
                or last_line(stderr)
            parsed = self._error(message, code)
            parsed.metrics = metrics
            return parsed
        metrics["turns"] = 1
        return Parsed(ok=True, text=stdout.decode("utf-8", errors="replace"), metrics=metrics)

    def _error(self, message: str, code: int) -> Parsed:
        if "unknown model" in message.lower():
            return Parsed(ok=False, retryable=False,
                          error=f"{message}; set model = \"...\" (see `llm models`) in "
                                "[agents.<name>] or [runners.llm]")
        cause, _ = classify(message)
        if cause is None:
            return self.failure(message, code)
        retry_after = stated_wait(message) if cause == "rate_limit" else None
        return self.provider_error(cause, message, retry_after=retry_after)
