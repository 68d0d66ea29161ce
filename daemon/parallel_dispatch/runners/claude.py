"""Claude Code preset: `claude -p --output-format stream-json --verbose`, prompt on stdin.

Verified against the real **Claude Code 2.1.332** pointed at a local Anthropic API stub
(tests/contract/test_claude.py; the facts are in docs/agent-clis.md, "Claude Code"):

* the definition body goes through `--append-system-prompt` (Claude Code keeps its own
  tool-use prompt), or `--append-system-prompt-file` when it is too long for argv; the
  plan shows whichever the run will use;
* frontmatter `tools:` becomes `--tools=A,B`, which *restricts* the built-in tools to
  those (a tool left out is not offered, and a call to it is refused), and the same
  tools are pre-approved with `--allowedTools` (which alone restricts nothing; without
  it a tool that needs approval is denied in `-p` mode).  A rule (`Bash(git log:*)`, in
  `tools:` or `allowed-tools:`) narrows its tool: then only the rule is approved.
  `allowed-tools:` entries are passed to `--allowedTools` as they are.  Both options are
  variadic: the `=` form keeps each to one argument, so nothing after it is swallowed;
* `--no-session-persistence`: no transcript is left under `~/.claude/projects`;
* the stream's events are read live (`watch`): API retries with their HTTP status,
  tool calls, refusals, tokens; a retry after 401/403 ends the task at once as bad
  credentials, where claude would retry for about three minutes;
* the last `result` event is the outcome; `api_error_status` / `api_error` say when
  the provider (not the agent) failed.  A 429 after a `rejected` `rate_limit_event`
  (claude.ai plan limits, which claude does not retry) is a usage quota that resets at
  the event's `resetsAt`: the task waits for quota until then (issue 10);
* each attempt has its own `CLAUDE_CONFIG_DIR` (a private copy of `.claude.json`,
  settings and memory; credentials read in place through
  `CLAUDE_SECURESTORAGE_CONFIG_DIR`), so parallel runs never write the user's
  `~/.claude.json` (client_state.py; `shared_state = true` turns it off).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..agentdefs import split_tools
from ..events import CAUSES, AgentEvent, Cause
from .client_state import claude_state
from .preset import (
    AUTH_PATTERNS,
    Call,
    Invocation,
    Parsed,
    PresetRunner,
    StreamName,
    add,
    as_dict,
    as_list,
    jsonl,
    last_line,
)

ERROR_SUBTYPES = {
    "error_max_turns": "raise the limit with args = [\"--max-turns\", \"N\"]",
    "error_max_budget_usd": "raise the task's max_cost_usd (or --max-budget-usd in args)",
    "error_max_structured_output_retries": "check the structured output schema",
}

# The `error` kinds of api_retry events and API-error assistant messages (2.1.332).
ERROR_KINDS: dict[str, Cause] = {
    "authentication_failed": "auth", "oauth_org_not_allowed": "auth",
    "account_on_hold": "auth", "verification_required": "auth",
    "cloud_credential_error": "auth", "billing_error": "quota", "rate_limit": "rate_limit",
    "overloaded": "overloaded", "invalid_request": "bad_request",
    "model_not_found": "bad_request", "server_error": "server",
}
# The result's `api_error` when no HTTP status explains the failure (2.1.332).
API_ERRORS: dict[str, Cause] = {
    **dict.fromkeys(("connection_failed", "no_response", "tls_untrusted_ca",
                     "tls_cert_signature_failure", "network_edge_blocked",
                     "computer_slept"), "unreachable"),
    **dict.fromkeys(("stored_login_refused", "oauth_refresh_store_refused",
                     "provider_credentials", "gateway_signin_required",
                     "gateway_session_expired", "api_key_auth_disabled",
                     "org_disabled_credential", "invalid_credential_header",
                     "named_profile_unusable"), "auth"),
    **dict.fromkeys(("usage_limit_reached", "model_requires_usage_credits",
                     "long_context_credits_required"), "quota"),
    **dict.fromkeys(("message_over_context_limit", "pdf_too_large",
                     "pdf_password_protected", "effort_requires_thinking"), "bad_request"),
    **dict.fromkeys(("stream_idle_timeout", "empty_completion", "gateway_content_type"),
                    "server"),
}
KEY_SOURCES = frozenset({"ANTHROPIC_API_KEY"})
"""Credentials claude cannot renew: their first 401 is final.  With OAuth (or an
apiKeyHelper) claude may refresh and retry successfully, so a second one is awaited."""


def status_cause(status: int) -> Cause | None:
    """The cause an HTTP status from the Anthropic API stands for."""
    if status in (401, 403):
        return "auth"
    if status == 402:
        return "quota"
    if status == 429:
        return "rate_limit"
    if status == 529:
        return "overloaded"
    if status >= 500:
        return "server"
    if status in (400, 404, 413, 422):
        return "bad_request"
    return None


@dataclass
class _Seen:
    """What one attempt's stream said so far (for 'tokens so far' and the 401 rule)."""

    key_source: str | None = None
    messages: set[str] = field(default_factory=set)
    input_tokens: int = 0
    auth_retries: int = 0


class ClaudeRunner(PresetRunner):
    name = "claude"
    docs = "Claude Code 2.1.332 (contract-tested); code.claude.com/docs/en/headless"
    install_hint = ("install Claude Code (npm install -g @anthropic-ai/claude-code) or set "
                    "command = [\"/path/to/claude\"] in [runners.claude]")
    auth_hint = "run `claude` and log in with /login, or set ANTHROPIC_API_KEY"
    native_schema = True  # --json-schema: the answer comes as the result's structured_output

    def private_state(self, env: Mapping[str, str], folder: Path) -> dict[str, str]:
        return claude_state(env, folder)

    def build(self, call: Call) -> Invocation:
        agent = call.agent
        argv = [*self.prefix(agent), "-p", "--output-format", "stream-json", "--verbose",
                "--no-session-persistence"]
        if agent.model:
            argv += ["--model", agent.model]
        budget = call.job.task.max_cost_usd
        if budget is not None:  # claude stops itself (error_max_budget_usd) at a task budget
            argv += ["--max-budget-usd", f"{budget:g}"]
        files = {}
        if call.system_prompt:
            if call.argv_safe(call.system_prompt):
                argv += ["--append-system-prompt", call.body]
            else:
                path = call.scratch / "system-prompt.md"
                files[path] = call.system_prompt
                shown = call.body if call.show else str(path)
                argv += ["--append-system-prompt-file", shown]
        tools, allowed = tool_flags(call)
        if tools:
            argv.append("--tools=" + ",".join(tools))
        if allowed:
            argv.append("--allowedTools=" + ",".join(allowed))
        schema = call.job.task.output_schema
        if isinstance(schema, dict):  # (a StructuredOutput tool the model must call)
            argv += ["--json-schema", "<schema>" if call.show
                     else json.dumps(schema, separators=(",", ":"))]
        argv += list(agent.args)
        return Invocation(argv=argv, stdin=call.prompt, files=files)

    # -- live events ---------------------------------------------------------------------
    def watch(self, call: Call, line: str, stream: StreamName) -> AgentEvent | None:
        text = line.strip()
        if stream == "stderr":
            return AgentEvent(text[:300], kind="error") if text else None
        if not text.startswith("{"):
            return None
        try:
            ev = json.loads(text)
        except ValueError:
            return None
        if not isinstance(ev, dict):
            return None
        seen = _seen(call)
        kind, subtype = ev.get("type"), ev.get("subtype")
        if kind == "system" and subtype == "init":
            seen.key_source = _str(ev.get("apiKeySource"))
            tools = as_list(ev.get("tools"))
            version = _str(ev.get("claude_code_version"))
            who = f"claude {version}" if version else "claude"
            return AgentEvent(f"{who} started: model {ev.get('model')}, {len(tools)} tools")
        if kind == "system" and subtype == "api_retry":
            return self._retry_event(ev, seen)
        if kind == "system" and subtype == "permission_denied":
            why = _short(_str(ev.get("message")) or "", 160)
            return AgentEvent(f"tool refused: {ev.get('tool_name')} ({why})", kind="tool")
        if kind == "rate_limit_event":
            return _rate_limit_event(ev.get("rate_limit_info"))
        if kind == "assistant":
            return _assistant_event(ev, seen)
        if kind == "result":
            if ev.get("is_error") or ev.get("subtype") not in (None, "success"):
                message, cause = _result_error(ev)
                return AgentEvent(f"ended with an error: {_short(message, 200)}",
                                  kind="error", cause=cause)
            return AgentEvent(f"done: {ev.get('num_turns')} turn(s)", kind="progress")
        return None

    def _retry_event(self, ev: dict[str, Any], seen: _Seen) -> AgentEvent:
        status = ev.get("error_status")
        error = _str(ev.get("error")) or "unknown"
        cause = _retry_cause(status, error)
        attempt = f"{ev.get('attempt')}/{ev.get('max_retries')}"
        delay = ev.get("retry_delay_ms")
        wait = delay / 1000 if isinstance(delay, int | float) else None
        what = (f"HTTP {status} {error}" if isinstance(status, int)
                else "no answer from the API (connection refused, cut or timed out)")
        text = f"API retry {attempt}: {CAUSES[cause]} ({what})"
        if wait is not None:
            text += f", next try in {wait:.0f} s"
        if cause == "auth":
            seen.auth_retries += 1
            if seen.key_source in KEY_SOURCES or seen.auth_retries >= 2:
                # claude would go on for ~3 minutes (10 retries): end the task now.
                return AgentEvent(
                    f"{CAUSES['auth']}: the API refused the credentials ({what}; claude "
                    f"was about to retry, {attempt}); {self.auth_hint}",
                    kind="retry", cause="auth", fatal=True)
        else:
            seen.auth_retries = 0
        return AgentEvent(text, kind="retry", cause=cause,
                          retry_after=wait if cause == "rate_limit" else None)

    # -- outcome ---------------------------------------------------------------------------
    def parse(self, call: Call, code: int, stdout: bytes, stderr: str) -> Parsed:
        events = list(jsonl(stdout))
        result = next((e for e in reversed(events) if e.get("type") == "result"), None)
        if result is None:
            if code != 0:
                return self.failure(last_line(stderr) or "no result event on stdout", code)
            return Parsed(ok=False, retryable=False,
                          error="printed no result event; check `claude --version` "
                                "(needs --output-format stream-json support)")
        metrics = _metrics(result)
        subtype = str(result.get("subtype") or "success")
        text = result.get("result")
        if not result.get("is_error") and subtype == "success":
            if code != 0:
                parsed = self.failure(last_line(stderr), code)
            elif not isinstance(text, str):
                parsed = Parsed(ok=False, retryable=False,
                                error="the result event has no 'result' text")
            elif "structured_output" in result:  # --json-schema: the StructuredOutput call
                return Parsed(ok=True, text=json.dumps(result["structured_output"]),
                              metrics=metrics)
            else:
                return Parsed(ok=True, text=text, metrics=metrics)
            parsed.metrics = metrics
            return parsed
        message, cause = _result_error(result)
        reset = _usage_reset(events) if cause in ("rate_limit", "quota") else None
        if reset is not None:
            # A claude.ai usage limit: the 429 is the plan's window, not a per-minute
            # limit; claude does not retry it, so the task waits for `resetsAt`.
            wait, note = reset
            if note not in message:
                message = f"{message} ({note})"
            parsed = self.provider_error("quota", message, retry_after=wait)
        elif cause is not None:
            parsed = self.provider_error(cause, message, retry_after=_last_wait(events, cause))
        elif subtype in ERROR_SUBTYPES:
            parsed = Parsed(ok=False, retryable=False,
                            error=f"{message} ({subtype}); {ERROR_SUBTYPES[subtype]}")
        elif AUTH_PATTERNS.search(message):
            parsed = self.provider_error("auth", message)
        else:
            parsed = self.failure(message, code)
        parsed.metrics = metrics
        return parsed


def tool_flags(call: Call) -> tuple[list[str], list[str]]:
    """`--tools` names and `--allowedTools` entries from the definition's frontmatter.

    A definition's `tools:` says what the agent may use, so each listed tool is both
    offered (`--tools`, which removes every other tool) and pre-approved (in `-p` mode
    nobody can answer a permission prompt).  Where a rule narrows a tool
    (`Bash(git log:*)` in `tools:` or `allowed-tools:`), only the rule is approved.
    """
    d = call.agent.definition
    if d is None:
        return [], []
    tools: list[str] = []
    rules: list[str] = []
    extra = d.extra.get("allowed-tools", d.extra.get("allowed_tools"))
    if isinstance(extra, str):
        extra = split_tools(extra)
    approved = [item.strip() for item in extra if isinstance(item, str) and item.strip()] \
        if isinstance(extra, list) else []
    for entry in d.tools:
        name = entry.split("(", 1)[0].strip()
        if name and name not in tools:
            tools.append(name)
        if "(" in entry:
            rules.append(entry)
    narrowed = {entry.split("(", 1)[0].strip() for entry in [*rules, *approved] if "(" in entry}
    allowed: list[str] = []
    for entry in [*(t for t in tools if t not in narrowed), *rules, *approved]:
        if entry not in allowed:
            allowed.append(entry)
    return tools, allowed


def _seen(call: Call) -> _Seen:
    """Per-attempt stream state, kept on the attempt's `Call` (one per attempt)."""
    state = call.state.get("claude")
    if not isinstance(state, _Seen):
        state = call.state["claude"] = _Seen()
    return state


def _retry_cause(status: Any, error: str) -> Cause:
    if isinstance(status, int) and not isinstance(status, bool):
        by_status = status_cause(status)
        if by_status is not None:
            return by_status
    return ERROR_KINDS.get(error, "unreachable" if status is None else "server")


def _assistant_event(ev: dict[str, Any], seen: _Seen) -> AgentEvent | None:
    msg = as_dict(ev.get("message"))
    content = as_list(msg.get("content"))
    if ev.get("is_api_error_message") or ev.get("error"):
        status = ev.get("api_error_status")
        cause = (status_cause(status) if isinstance(status, int) else None) \
            or ERROR_KINDS.get(_str(ev.get("error")) or "")
        texts = [b.get("text", "") for b in content if isinstance(b, dict)]
        return AgentEvent(_short(" ".join(texts) or str(ev.get("error")), 200),
                          kind="error", cause=cause)
    for block in content:
        if isinstance(block, dict) and block.get("type") == "tool_use":
            return AgentEvent(f"tool: {block.get('name')} {_tool_summary(block.get('input'))}"
                              .rstrip(), kind="tool")
    mid = _str(msg.get("id"))
    usage = as_dict(msg.get("usage"))
    if mid is None or mid in seen.messages:
        return None
    seen.messages.add(mid)
    for key in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"):
        n = usage.get(key)
        if isinstance(n, int) and not isinstance(n, bool):
            seen.input_tokens += n
    return AgentEvent(f"model answered (call {len(seen.messages)}): "
                      f"{seen.input_tokens:,} input tokens so far", kind="tokens")


def _tool_summary(args: Any) -> str:
    if not isinstance(args, dict):
        return ""
    for key in ("command", "file_path", "path", "pattern", "url", "query", "description"):
        if isinstance(args.get(key), str):
            return _short(args[key], 120)
    return ""


def _rate_limit_event(info: Any) -> AgentEvent | None:
    """Claude.ai subscription limits (not sent with an API key)."""
    if not isinstance(info, dict):
        return None
    status = _str(info.get("status"))
    kind = _str(info.get("rateLimitType")) or "usage"
    resets = info.get("resetsAt")
    when, wait = "", None
    if isinstance(resets, int | float) and not isinstance(resets, bool):
        wait = max(0.0, float(resets) - time.time())
        when = ", resets at " + time.strftime("%H:%M", time.localtime(resets))
    if status == "rejected":
        return AgentEvent(f"usage limit reached ({kind}{when})", kind="retry", cause="quota",
                          retry_after=wait)
    if status == "allowed_warning":
        used = info.get("utilization")
        share = f"{used:.0%} of " if isinstance(used, int | float) else "near "
        return AgentEvent(f"usage warning: {share}the {kind} limit{when}")
    return None


def _result_error(result: dict[str, Any]) -> tuple[str, Cause | None]:
    """The message of a failed result and, when the provider failed, the cause."""
    text = result.get("result")
    errors = result.get("errors")
    message = (text if isinstance(text, str) and text
               else str(errors[0]) if isinstance(errors, list) and errors
               else str(result.get("subtype") or "error"))
    status = result.get("api_error_status")
    api_error = _str(result.get("api_error"))
    cause: Cause | None = None
    if isinstance(status, int) and not isinstance(status, bool):
        cause = status_cause(status)
        detail = f"HTTP {status}"
        if _str(result.get("api_error_type")):
            detail += f" {result['api_error_type']}"
        if detail not in message:
            message = f"{message} ({detail})"
    if cause is None and api_error is not None:
        cause = API_ERRORS.get(api_error)
        if cause is not None and api_error not in message:
            message = f"{message} ({api_error})"
    return message, cause


def _usage_reset(events: list[dict[str, Any]],
                 now: float | None = None) -> tuple[float, str] | None:
    """Seconds until the usage limit a `rejected` rate_limit_event announced resets, and
    a note naming it; None when claude printed no such event with a `resetsAt`."""
    for ev in reversed(events):
        if ev.get("type") != "rate_limit_event":
            continue
        info = ev.get("rate_limit_info")
        if not isinstance(info, dict) or info.get("status") != "rejected":
            return None  # the latest word on the limit is not a refusal
        resets = info.get("resetsAt")
        if not isinstance(resets, int | float) or isinstance(resets, bool):
            return None
        kind = _str(info.get("rateLimitType")) or "usage"
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(resets))
        wait = max(0.0, float(resets) - (time.time() if now is None else now))
        return wait, f"{kind} limit, resets at {stamp}"
    return None


def _last_wait(events: list[dict[str, Any]], cause: Cause) -> float | None:
    """The wait claude last chose for a rate limit (from the server's retry-after)."""
    if cause != "rate_limit":
        return None
    for ev in reversed(events):
        if ev.get("type") == "system" and ev.get("subtype") == "api_retry":
            delay = ev.get("retry_delay_ms")
            if isinstance(delay, int | float) and not isinstance(delay, bool):
                return delay / 1000
            return None
    return None


def _metrics(payload: dict[str, Any]) -> dict[str, Any]:
    """cost_usd, input_tokens (incl. cache reads and writes), output_tokens, turns."""
    metrics: dict[str, Any] = {}
    cost = payload.get("total_cost_usd", payload.get("cost_usd"))  # renamed in SDK 0.0.13
    add(metrics, "cost_usd", cost)
    usage = payload.get("usage")
    if isinstance(usage, dict):
        for key in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"):
            add(metrics, "input_tokens", usage.get(key))
        add(metrics, "cached_input_tokens", usage.get("cache_read_input_tokens"))
        add(metrics, "output_tokens", usage.get("output_tokens"))
    add(metrics, "turns", payload.get("num_turns"))
    if isinstance(payload.get("session_id"), str):
        metrics["session_id"] = payload["session_id"]
    return metrics


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _short(text: str, limit: int) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"
