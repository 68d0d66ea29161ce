"""OpenAI Codex CLI preset: `codex exec --json ... -`, prompt on stdin.

Verified against the real **codex-cli 0.171.0** run on a local Responses API stub
(tests/contract/test_codex.py; docs/agent-clis.md, "OpenAI Codex CLI").  Notable choices:

* the result is the `-o/--output-last-message` file (the final message only);
* usage is summed over `turn.completed` events (tokens only: codex reports no cost);
* the system prompt is `-c developer_instructions=<TOML string>` (codex keeps its own
  base instructions); a body too long for argv is put in front of the prompt instead;
* `--skip-git-repo-check` so tasks run outside a repository, and `--sandbox read-only`
  (exec's documented default) unless `args` choose a sandbox;
* failure = a non-zero exit or a `turn.failed` event.  `{"type":"error"}` events are
  progress: codex prints `Reconnecting... 2/5 (...)` while it retries a dropped stream
  or falls back from WebSockets to HTTPS, and then often succeeds;
* its retries are read live (`watch`): the first one caused by a 401/403 ends the task
  at once as bad credentials (codex itself would retry five times first);
* each attempt has its own `CODEX_HOME` (config.toml and instructions copied, auth.json
  and the user's prompts, rules and skills linked), so sessions, history and codex's
  databases of parallel runs stay apart; not where credentials are kept in the keyring
  (client_state.py; `shared_state = true` turns it off).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from ..events import AgentEvent, Cause
from .attempt import schema_path
from .client_state import codex_state
from .preset import (
    Call,
    Invocation,
    Parsed,
    PresetRunner,
    StreamName,
    add,
    cause_patterns,
    jsonl,
    toml_string,
)

SANDBOX_FLAGS = ("-s", "--sandbox", "--full-auto", "--yolo",
                 "--dangerously-bypass-approvals-and-sandbox")

RECONNECT = re.compile(r"^Reconnecting\.\.\.\s*(?:(?P<n>\d+)/(?P<of>\d+)|waiting for network)"
                       r"\s*(?:\((?P<why>.*)\))?\s*$", re.DOTALL)
"""codex's retry notice: `Reconnecting... 2/5 (<error>)` or `... waiting for network (...)`."""
STATUS = re.compile(r"\bstatus:? (\d{3})\b")
"""The HTTP status in codex's messages: `unexpected status 401 Unauthorized: ...`,
`exceeded retry limit, last status: 429 Too Many Requests`."""
QUOTA = (r"usage limit|insufficient_quota|quota exceeded|out of credits|usage_not_included|"
         r"purchase more credits")
TEXT_CAUSES = cause_patterns(
    ("auth", r"missing environment variable|invalid_api_key|incorrect api key|"
             r"not logged in|refresh token|please log ?in|401 unauthorized"),
    ("quota", QUOTA),
    ("rate_limit", r"too many requests|rate.?limit"),
    ("overloaded", r"at capacity|overloaded|slow_down|service unavailable"),
    ("unreachable", r"waiting for network|connection failed|error sending request|"
                    r"failed to lookup address|name does not resolve|"
                    r"connection refused|network is unreachable|dns error"),
    ("server", r"high demand|internal server error|server_error|bad gateway|"
               r"stream disconnected|idle timeout waiting for sse|response\.failed"),
    ("bad_request", r"invalid_request_error|context_length_exceeded|context window"),
)
"""codex's own wording per cause, for messages that carry no HTTP status (its 500 says
"We're currently experiencing high demand", its 503 "Selected model is at capacity")."""

RESET_AT = re.compile(
    r"(?i:try again at) "
    r"(?:(?P<mon>[A-Z][a-z]{2}) (?P<day>\d{1,2})(?:st|nd|rd|th), (?P<year>\d{4}) )?"
    r"(?P<h>\d{1,2}):(?P<m>\d{2}) (?P<ampm>AM|PM)")
"""codex's usage-limit reset time, in its local time: `... or try again at 3:05 PM.` (today)
or `... try again at Dec 2nd, 2026 3:05 PM.`"""
RESET_ROUNDING_S = 60.0
"""codex prints the reset to the minute (`%-I:%M %p`): the true reset lies within it."""

STDERR_NOISE = re.compile(
    r"^(WARNING: proceeding, even though we could not create PATH aliases|"
    r"\d{4}-\d\d-\d\dT[\d:.]+Z\s+(?:TRACE|DEBUG|INFO|WARN)\b|"
    r"Reading (?:additional )?(?:prompt|input) from stdin)")
"""stderr lines that are not the error: the helper-alias warning codex prints for a
CODEX_HOME under /tmp, tracing log lines below ERROR, the stdin notice."""
STDERR_KEEP_CHARS = 4000


def classify(message: str) -> Cause | None:
    """Which provider problem a codex error message describes, if any."""
    status = STATUS.search(message)
    if status is not None:
        code = int(status.group(1))
        if code in (401, 403):
            return "auth"
        if code == 429:
            return "quota" if re.search(QUOTA, message, re.IGNORECASE) else "rate_limit"
        if code in (503, 529):
            return "overloaded"
        if code >= 500:
            return "server"
        if "url: ws" in message:
            return None  # a WebSocket upgrade refused: codex falls back to HTTPS
        if code in (400, 404, 413, 422):
            return "bad_request"
    for cause, pattern in TEXT_CAUSES:
        if pattern.search(message):
            return cause
    return None


def reset_after(message: str, now: datetime | None = None) -> float | None:
    """Seconds until the reset time codex printed ("try again at 3:05 PM"), if any.

    Rounded up to the end of that minute: codex drops the seconds of `resets_at`, so a
    wait until 3:05:00 would start the next attempt up to a minute too early, into the
    same limit."""
    found = RESET_AT.search(message)
    if found is None:
        return None
    now = now or datetime.now()
    hour = int(found["h"]) % 12 + (12 if found["ampm"] == "PM" else 0)
    try:
        if found["year"]:
            month = datetime.strptime(found["mon"], "%b").month
            when = datetime(int(found["year"]), month, int(found["day"]), hour, int(found["m"]))
        else:
            when = now.replace(hour=hour, minute=int(found["m"]), second=0, microsecond=0)
            if when < now - timedelta(minutes=1):  # past midnight since it was printed
                when += timedelta(days=1)
    except ValueError:
        return None
    return max(0.0, (when - now).total_seconds() + RESET_ROUNDING_S)


def readable(message: str) -> str:
    """codex passes a 400's body through as JSON: keep its `error.message`."""
    text = message.strip()
    if text.startswith("{"):
        try:
            body = json.loads(text)
        except ValueError:
            return text
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            kind = error.get("type") or error.get("code")
            return f"{error['message']} ({kind})" if kind else error["message"]
    return text


def stderr_message(stderr: str) -> str:
    """codex's stderr as the error, every line of it (a config error spans several:
    'Error loading config.toml:', the file position, the offending line, a caret)."""
    lines = [ln.rstrip() for ln in stderr.splitlines()
             if not STDERR_NOISE.match(ln) and not ln.startswith("=== ")]
    text = "\n".join(lines).strip()
    if len(text) > STDERR_KEEP_CHARS:
        text = "...\n" + text[-STDERR_KEEP_CHARS:].partition("\n")[2]
    return text


def _short(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


class CodexRunner(PresetRunner):
    name = "codex"
    docs = "codex-cli 0.171.0 (contract-tested); openai/codex docs/exec.md, exec_events.rs"
    install_hint = ("install the Codex CLI (npm install -g @openai/codex) or set "
                    "command = [\"/path/to/codex\"] in [runners.codex]")
    auth_hint = "run `codex login`, or set CODEX_API_KEY (or your provider's env_key)"
    native_schema = True  # --output-schema FILE

    def private_state(self, env: Mapping[str, str], folder: Path) -> dict[str, str] | None:
        return codex_state(env, folder)

    def build(self, call: Call) -> Invocation:
        agent = call.agent
        argv = [*self.prefix(agent), "exec", "--json", "--skip-git-repo-check"]
        if not any(a in SANDBOX_FLAGS or a.startswith("--sandbox=") for a in agent.args):
            argv += ["--sandbox", "read-only"]
        argv += ["-o", str(call.scratch / "last-message.txt")]
        if isinstance(call.job.task.output_schema, dict):
            argv += ["--output-schema", str(schema_path(call.job))]
        if agent.model:
            argv += ["-m", agent.model]
        stdin = call.prompt
        if call.system_prompt:
            instructions = "developer_instructions=" + toml_string(call.body)
            if call.show or call.argv_safe(instructions):
                argv += ["-c", instructions]
            else:
                stdin = call.with_system_prompt()
        argv += [*agent.args, "-"]
        return Invocation(argv=argv, stdin=stdin)

    # -- live events ---------------------------------------------------------------------
    def watch(self, call: Call, line: str, stream: StreamName) -> AgentEvent | None:
        line = line.strip()
        if stream == "stderr":
            if line.startswith(("Error", "error:")):
                return AgentEvent(_short(line), kind="error", cause=classify(line))
            return None
        if not line.startswith("{"):
            return None
        try:
            event = json.loads(line)
        except ValueError:
            return None
        if not isinstance(event, dict):
            return None
        kind = event.get("type")
        if kind == "error":
            return self._error_event(str(event.get("message", "")))
        if kind == "turn.failed":
            error = event.get("error")
            message = str(error.get("message", "")) if isinstance(error, dict) else ""
            message = readable(message)
            return AgentEvent(f"turn failed: {_short(message)}", kind="error",
                              cause=classify(message))
        if kind == "turn.started":
            return AgentEvent("turn started, waiting for the model")
        if kind == "turn.completed":
            usage = event.get("usage")
            if isinstance(usage, dict):
                return AgentEvent(f"turn completed: {usage.get('input_tokens', '?')} input, "
                                  f"{usage.get('output_tokens', '?')} output tokens",
                                  kind="tokens")
            return AgentEvent("turn completed", kind="tokens")
        if kind in ("item.started", "item.completed") and isinstance(event.get("item"), dict):
            return self._item_event(kind == "item.started", event["item"])
        return None

    def _error_event(self, message: str) -> AgentEvent:
        retry = RECONNECT.match(message)
        if retry is None:
            message = readable(message)
            return AgentEvent(_short(message), kind="error", cause=classify(message))
        why = readable(retry["why"] or "")
        cause: Cause | None = "unreachable" if retry["n"] is None else classify(why)
        count = f" {retry['n']}/{retry['of']}" if retry["n"] else ""
        text = f"API retry{count}: {_short(why) or 'reconnecting'}"
        if cause == "auth":
            # codex would retry a rejected key five times (~7 s) and then fail; nothing
            # later can change the outcome, so stop now with the provider's own words.
            return AgentEvent(self.provider_error("auth", why).error or text, kind="retry",
                              cause="auth", fatal=True)
        if retry["n"] is None:
            text = f"API retry (waiting for network): {_short(why)}"
        return AgentEvent(text, kind="retry", cause=cause)

    @staticmethod
    def _item_event(started: bool, item: dict[str, Any]) -> AgentEvent | None:
        kind = item.get("type")
        if kind == "command_execution":
            command = _short(str(item.get("command", "")), 80)
            if started:
                return AgentEvent(f"running `{command}`", kind="tool")
            return AgentEvent(f"ran `{command}` (exit {item.get('exit_code')})", kind="tool")
        if kind == "mcp_tool_call":
            name = f"{item.get('server', '?')}.{item.get('tool', '?')}"
            return AgentEvent(f"tool {name}" + ("" if started else " done"), kind="tool")
        if kind == "file_change" and not started:
            changes = item.get("changes")
            paths = [str(c.get("path")) for c in changes or [] if isinstance(c, dict)]
            return AgentEvent(f"changed {', '.join(paths) or 'files'}", kind="tool")
        if kind == "web_search":
            return AgentEvent(f"web search: {_short(str(item.get('query', '')), 60)}",
                              kind="tool")
        if kind == "error" and not started:
            # Non-fatal notices: "Falling back from WebSockets to HTTPS transport...".
            return AgentEvent(f"notice: {_short(str(item.get('message', '')))}")
        if kind == "agent_message" and not started:
            return AgentEvent(f"message: {_short(str(item.get('text', '')), 60)}")
        return None

    # -- result --------------------------------------------------------------------------
    def parse(self, call: Call, code: int, stdout: bytes, stderr: str) -> Parsed:
        metrics: dict[str, Any] = {}
        failure: str | None = None
        last_error: str | None = None
        answer: str | None = None
        events = retries = 0
        for event in jsonl(stdout):
            events += 1
            kind = event.get("type")
            if kind == "turn.completed":
                usage = event.get("usage")
                if isinstance(usage, dict):
                    add(metrics, "input_tokens", usage.get("input_tokens"))
                    add(metrics, "cached_input_tokens", usage.get("cached_input_tokens"))
                    add(metrics, "output_tokens", usage.get("output_tokens"))
                    add(metrics, "reasoning_output_tokens",
                        usage.get("reasoning_output_tokens"))
                add(metrics, "turns", 1)
            elif kind == "turn.failed":
                error = event.get("error")
                if isinstance(error, dict) and error.get("message"):
                    failure = readable(str(error["message"]))
            elif kind == "error" and event.get("message"):
                message = str(event["message"])
                if RECONNECT.match(message):
                    retries += 1
                else:
                    last_error = readable(message)
            elif kind == "item.completed":
                item = event.get("item")
                if isinstance(item, dict) and item.get("type") == "agent_message":
                    answer = str(item.get("text", ""))
            elif kind == "thread.started" and isinstance(event.get("thread_id"), str):
                metrics["session_id"] = event["thread_id"]
        if failure is not None or code != 0:
            parsed = self._failed(failure or last_error, code, stderr, retries)
            parsed.metrics = metrics
            return parsed
        last = call.scratch / "last-message.txt"
        if last.is_file():
            answer = last.read_text(encoding="utf-8", errors="replace")
        if answer is None:
            detail = "no --json events" if events == 0 else "no final agent message"
            return Parsed(ok=False, retryable=events > 0, metrics=metrics,
                          error=f"printed {detail}; check `codex --version` (0.151 or newer "
                                "reads the prompt from stdin with `-`)")
        return Parsed(ok=True, text=answer, metrics=metrics)

    def _failed(self, message: str | None, code: int, stderr: str, retries: int) -> Parsed:
        """A failed turn or a non-zero exit, named by cause where the provider is to blame."""
        if message is None:
            # No JSON error: codex stopped before its first turn (a config error, a bad
            # flag).  Not transient: retrying would fail the same way.
            text = stderr_message(stderr)
            if text:
                cause = classify(text)
                if cause is not None:
                    return self.provider_error(cause, text)
                suffix = f"\n(exit code {code})" if code else ""
                return Parsed(ok=False, retryable=False, error=text + suffix)
            return self.failure("", code or None)
        cause = classify(message)
        if cause is None:
            return self.failure(message, code or None)
        after = f" (after {retries} retries)" if retries else ""
        return self.provider_error(cause, message + after, retry_after=reset_after(message))
