"""Gemini CLI preset: `gemini --output-format stream-json`, prompt on stdin, GEMINI_SYSTEM_MD.

Verified against the real **gemini-cli 0.61.0** run on a local Gemini API stub
(tests/contract/test_gemini.py; docs/agent-clis.md, "Gemini CLI").  Notable choices:

* no `-p`: piped stdin already selects headless mode, and a `-p` value would be
  appended after the prompt;
* `GEMINI_CLI_TRUST_WORKSPACE=true`: in 0.61.0 a headless run in a folder gemini was
  never told to trust exits 55 (`FatalUntrustedWorkspaceError`) before any model call.
  The variable is what `--skip-trust` sets, and a build without trust checks ignores it
  (where it might reject an unknown flag);
* the definition body is written to a private temp file named by `GEMINI_SYSTEM_MD`
  (it *replaces* Gemini's built-in system prompt);
* `stream-json`, read live by `watch`: `init`, `message` deltas, `tool_use`,
  `tool_result`, `error` and a final `result` (status, token stats, or the error).  The
  answer is the last model turn's text; turns are counted from the stream (its stats
  have no request count).  Retries are only on stderr (`Attempt 2 failed with status
  503. Retrying with backoff... _ApiError: {...}`), and so are read there;
* gemini exits with the API's HTTP status modulo 256 (400 → 144, 401 → 145, 429 → 173,
  500 → 244, 503 → 247) or its own codes (41 auth, 52 config, 55 untrusted, ...); the
  Google error JSON it quotes names the cause (`API_KEY_INVALID`, `RetryInfo`, ...).
  Messages lose their ANSI colours.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ..events import CAUSES, AgentEvent, Cause
from .preset import (
    Call,
    Invocation,
    Parsed,
    PresetRunner,
    StreamName,
    add,
    as_dict,
    cause_patterns,
    jsonl,
    strip_ansi,
)

EXIT_CODES: dict[int, tuple[str, str, bool]] = {
    # gemini's own codes: (what, what to fix, retryable)
    42: ("input error", "check the prompt", False),
    44: ("sandbox error", "check gemini's sandbox settings (or run without --sandbox)", False),
    52: ("configuration error", "fix ~/.gemini/settings.json or .gemini/settings.json", False),
    53: ("turn limit reached", "raise model.maxSessionTurns in gemini's settings.json", False),
    54: ("tool execution failed", "see the task log", True),
    55: ("workspace not trusted", "the preset sets GEMINI_CLI_TRUST_WORKSPACE=true; do not "
         "override it in the agent's env, or trust the folder in gemini", False),
    130: ("cancelled", "run it again", True),
}
AUTH_EXIT = 41
"""FatalAuthenticationError: no key, or no auth method gemini accepts."""

HTTP_EXITS: dict[int, int] = {s % 256: s for s in (400, 401, 403, 404, 429, 499, 500, 502,
                                                    503, 504)}
"""gemini exits with an API error's HTTP status, which the OS truncates to 8 bits."""

RETRY = re.compile(r"^Attempt (?P<n>\d+) failed(?P<rest>.*)$")
"""gemini's retry notices on stderr: `Attempt 3 failed with status 500. Retrying with
backoff... _ApiError: {json}`, `Attempt 1 failed: <message>` (a quota error with a
RetryInfo; its next line says how long it waits), `Attempt 2 failed. Retrying with
backoff... Error: exception TypeError: fetch failed sending request`."""
RETRY_NOISE = re.compile(r"^(?: with status \d{3}| with \w+ error(?: \([^)]*\))?)?[.:]?\s*"
                         r"(?:Retrying with backoff\.\.\.\s*)?(?:_ApiError: )?")
WAIT = re.compile(r"^Suggested retry after (?P<n>[\d.]+)(?P<u>ms|s)\.\.? ?(?P<rest>.*)$")
"""The line after a quota retry: `Suggested retry after 2s.. Retrying after 5103ms...`."""
RETRY_AFTER = re.compile(r"(?:Suggested retry after|Please retry in) (?P<n>[\d.]+)(?P<u>ms|s)\b")
NO_QUOTA = re.compile(r"limit:\s*0(?![\d.])")
"""Google's words for a quota the plan does not include (`..., limit: 0, model: ...`)."""
STATUS_IN_TEXT = re.compile(r"\bstatus:? (?P<s>\d{3})\b|\b(?P<t>[45]\d\d) error\b")
API_ERROR_LINE = "Error when talking to Gemini API"

TEXT_CAUSES = cause_patterns(
    ("auth", r"api key not valid|api_key_invalid|api key expired|unauthenticated|"
             r"permission_denied|invalid authentication credentials|"
             r"must specify the GEMINI_API_KEY|please set an auth method|"
             r"invalid auth method selected"),
    ("quota", r"daily quota|exhausted your capacity|capacity exceeded|"
              r"model_capacity_exhausted|quota_exhausted|insufficient_g1_credits|"
              r"limit:\s*0(?![\d.])|PerDay"),
    ("rate_limit", r"exceeded your current quota|resource_exhausted|rate.?limit|"
                   r"too many requests|quota"),
    ("overloaded", r"overloaded|unavailable|high demand"),
    ("server", r"internal error|\binternal\b|bad gateway|deadline_exceeded"),
    ("unreachable", r"fetch failed|econnrefused|econnreset|enotfound|eai_again|"
                    r"etimedout|und_err_\w*timeout|network is unreachable|"
                    r"socket hang up"),
    ("bad_request", r"invalid_argument|not found for api version|failed_precondition|"
                    r"exceeds the maximum number of tokens"),
)
"""Cause per wording, for messages without an HTTP status."""

STDERR_NOISE = re.compile(
    r"^(Warning: 256-color support not detected|Ripgrep is not available|\[STARTUP\]|"
    r"Loaded cached credentials|Data collection is disabled)")
"""stderr lines gemini prints on every run that are not the error."""

GATEWAY_HINT = ("with GOOGLE_GEMINI_BASE_URL set, gemini-cli 0.61 needs "
                '"security": {"auth": {"selectedType": "gemini-api-key"}} in '
                "~/.gemini/settings.json")


@dataclass
class ApiError:
    """What gemini quoted of the provider's error."""

    message: str
    status: int | None = None
    google_status: str | None = None
    reason: str | None = None
    retry_after: float | None = None

    @property
    def cause(self) -> Cause | None:
        text = " ".join(filter(None, (self.message, self.google_status, self.reason)))
        if self.reason == "API_KEY_INVALID" or self.status in (401, 403):
            return "auth"
        if self.status in (429, 499) or self.google_status == "RESOURCE_EXHAUSTED":
            return "quota" if _text_cause(text) == "quota" else "rate_limit"
        if self.status in (503, 529):
            return "overloaded"
        if self.status is not None and self.status >= 500:
            return "server"
        if self.status in (400, 404, 413, 422):
            return "auth" if _text_cause(text) == "auth" else "bad_request"
        return _text_cause(text)

    def describe(self) -> str:
        what = " ".join(str(x) for x in (self.status, self.google_status) if x)
        return f"{self.message} (HTTP {what})" if what else self.message


def _text_cause(text: str) -> Cause | None:
    for cause, pattern in TEXT_CAUSES:
        if pattern.search(text):
            return cause
    return None


def _seconds(amount: str, unit: str) -> float:
    return float(amount) / (1000 if unit == "ms" else 1)


def api_error(text: str) -> ApiError:
    """Read the provider error out of one of gemini's messages: the Google error JSON it
    quotes (`[API Error: {"error": {...}}]`, `_ApiError: {...}`), else its own words."""
    text = strip_ansi(text).strip()
    start = text.find('{"error"')
    if start >= 0:
        try:
            body, _ = json.JSONDecoder().raw_decode(text[start:])
        except ValueError:
            body = None
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            return _from_google(err)
    inner = re.match(r"^\[API Error: (?P<m>.*?)\](?:\n|$)", text, re.DOTALL)
    message = inner.group("m") if inner else text
    message = re.sub(r"^(?:RetryableQuotaError|TerminalQuotaError|Error): ", "", message)
    found = RETRY_AFTER.search(message)
    status_m = STATUS_IN_TEXT.search(message)
    status = int(status_m.group("s") or status_m.group("t")) if status_m else None
    message = " ".join(line.strip() for line in message.splitlines() if line.strip())
    return ApiError(message=message, status=status,
                    retry_after=_seconds(found["n"], found["u"]) if found else None)


def _from_google(err: dict[str, Any]) -> ApiError:
    details = [d for d in err.get("details") or [] if isinstance(d, dict)]
    reason = next((str(d["reason"]) for d in details if d.get("reason")), None)
    retry_after = None
    for d in details:
        delay = d.get("retryDelay")
        m = re.fullmatch(r"([\d.]+)(ms|s)", delay) if isinstance(delay, str) else None
        if m:
            retry_after = _seconds(m.group(1), m.group(2))
    quota_ids = " ".join(str(v.get("quotaId", "")) for d in details
                         for v in d.get("violations") or [] if isinstance(v, dict))
    code = err.get("code")
    message = str(err.get("message") or "").strip()
    return ApiError(message=message + (f" [{quota_ids}]" if "PerDay" in quota_ids else ""),
                    status=code if isinstance(code, int) else None,
                    google_status=err.get("status") if isinstance(err.get("status"), str)
                    else None, reason=reason, retry_after=retry_after)


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def stderr_message(stderr: str) -> str:
    """The error in gemini's stderr: its last paragraph of plain lines, without the
    start-up notices and the stack traces and object dumps node adds."""
    kept: list[str] = []
    block: list[str] = []
    for raw in strip_ansi(stderr).splitlines():
        line = raw.rstrip()
        if not line.strip() or STDERR_NOISE.match(line.strip()) or line.startswith("=== "):
            continue
        if line[0].isspace() or line in ("}", "]", "{"):
            if block:  # a stack or an object dump ends the message it belongs to
                kept, block = block, []
            continue
        block.append(line.strip())
    return " ".join(block or kept)


class GeminiRunner(PresetRunner):
    name = "gemini"
    docs = "gemini-cli 0.61.0 (contract-tested: tests/contract/test_gemini.py)"
    install_hint = ("install the Gemini CLI (npm install -g @google/gemini-cli) or set "
                    "command = [\"/path/to/gemini\"] in [runners.gemini]")
    auth_hint = "set GEMINI_API_KEY or choose an auth method in ~/.gemini/settings.json"

    def build(self, call: Call) -> Invocation:
        agent = call.agent
        argv = [*self.prefix(agent), "--output-format", "stream-json"]
        if agent.model:
            argv += ["-m", agent.model]
        argv += list(agent.args)
        env = {"GEMINI_CLI_TRUST_WORKSPACE": "true"}
        files = {}
        if call.system_prompt:
            path = call.tempdir(self.name) / "system.md"
            files[path] = call.system_prompt
            env["GEMINI_SYSTEM_MD"] = str(path) if not call.show else call.body
        return Invocation(argv=argv, stdin=call.prompt, env=env, files=files)

    # -- live events -------------------------------------------------------------------
    def watch(self, call: Call, line: str, stream: StreamName) -> AgentEvent | None:
        text = strip_ansi(line).strip()
        if not text:
            return None
        if stream == "stdout":
            if not text.startswith("{"):
                return None
            try:
                ev = json.loads(text)
            except ValueError:
                return None
            return _stream_event(ev) if isinstance(ev, dict) else None
        return _stderr_event(text)

    # -- the result --------------------------------------------------------------------
    def parse(self, call: Call, code: int, stdout: bytes, stderr: str) -> Parsed:
        events = list(jsonl(stdout))
        result = next((e for e in reversed(events) if e.get("type") == "result"), None)
        metrics = _stream_metrics(events)
        error = result.get("error") if isinstance(result, dict) else None
        if code == 0 and result is not None and result.get("status") == "success":
            return Parsed(ok=True, text=_answer(events), metrics=metrics)
        message = (str(error.get("message") or error.get("type") or "")
                   if isinstance(error, dict) else "")
        if not message and isinstance(result, dict) and result.get("status") == "error":
            message = next((str(e.get("message")) for e in reversed(events)
                            if e.get("type") == "error" and e.get("message")), "")
        message = message or _stderr_api_error(stderr) or stderr_message(stderr)
        parsed = self._failure(code, message, result is None)
        parsed.metrics = metrics
        return parsed

    def _failure(self, code: int, message: str, no_result: bool) -> Parsed:
        """Name what went wrong: the provider (by cause), gemini's own exit codes, else a
        plain failure of the agent."""
        message = strip_ansi(message).strip()
        where = f"exit code {code}" if code else "exit code 0"
        if code == AUTH_EXIT:
            hint = f"; {GATEWAY_HINT}" if "invalid auth method" in message.lower() else ""
            return self.provider_error("auth", f"{_short(message, 400)} ({where}){hint}")
        if code in EXIT_CODES:
            what, fix, retryable = EXIT_CODES[code]
            return Parsed(ok=False, retryable=retryable,
                          error=f"{what} ({where}): {_short(message, 400)}; {fix}")
        err = api_error(message) if message else ApiError("")
        if err.status is None and code in HTTP_EXITS:
            err.status = HTTP_EXITS[code]
        cause = err.cause
        if err.message:
            detail = _short(err.describe(), 400)
        elif err.status is not None:
            detail = f"gemini exited with HTTP status {err.status}"
        else:
            detail = "gemini failed without a message"
        if cause is not None:
            # `limit: 0`: the plan has no quota for this model at all; its "retry in 52s"
            # is the free tier's window, and waiting for it would only fail again.
            wait = None if cause == "quota" and NO_QUOTA.search(message) else err.retry_after
            return self.provider_error(cause, f"{detail} ({where})", wait)
        if code == 0 and no_result:
            return Parsed(ok=False, retryable=False,
                          error="printed no stream-json result; check `gemini --version` "
                                "(the preset needs --output-format stream-json)")
        return Parsed(ok=False, retryable=True, error=f"{detail} ({where})")


# -- stream-json ------------------------------------------------------------------------


def _stream_event(ev: dict[str, Any]) -> AgentEvent | None:
    kind = ev.get("type")
    if kind == "init":
        return AgentEvent(f"session started, model {ev.get('model') or '?'}")
    if kind == "message":
        if ev.get("role") == "user":
            return AgentEvent("prompt sent, waiting for the model")
        return AgentEvent("model answering")
    if kind == "tool_use":
        return AgentEvent(f"tool {ev.get('tool_name')}: {_tool_summary(ev.get('parameters'))}",
                          kind="tool")
    if kind == "tool_result":
        err = ev.get("error")
        if ev.get("status") == "error" and isinstance(err, dict):
            return AgentEvent(f"tool failed: {_short(str(err.get('message')), 160)}",
                              kind="tool")
        return AgentEvent(f"tool done ({ev.get('status')})", kind="tool")
    if kind == "error":
        return AgentEvent(f"{ev.get('severity') or 'error'}: "
                          f"{_short(strip_ansi(str(ev.get('message'))), 200)}", kind="error")
    if kind == "result":
        err = ev.get("error")
        if ev.get("status") == "error" and isinstance(err, dict):
            api = api_error(str(err.get("message") or ""))
            cause = api.cause
            prefix = f"{CAUSES[cause]}: " if cause else "error: "
            return AgentEvent(prefix + _short(api.describe()), kind="error", cause=cause,
                              retry_after=api.retry_after)
        stats = as_dict(ev.get("stats"))
        return AgentEvent(f"done: {stats.get('input_tokens', 0):,} input / "
                          f"{stats.get('output_tokens', 0):,} output tokens", kind="tokens")
    return None


def _tool_summary(params: Any) -> str:
    if not isinstance(params, dict):
        return ""
    for key in ("command", "file_path", "absolute_path", "path", "pattern", "dir_path",
                "query", "url"):
        if isinstance(params.get(key), str):
            return _short(params[key], 120)
    return _short(json.dumps(params), 120)


def _stderr_event(text: str) -> AgentEvent | None:
    m = RETRY.match(text)
    if m is not None:
        rest = m.group("rest")
        status = re.match(r"^ with status (\d{3})", rest)
        err = api_error(RETRY_NOISE.sub("", rest))
        if err.status is None and status is not None:
            err.status = int(status.group(1))
        cause = err.cause
        if cause is None and "429" in rest:
            cause = "rate_limit"
        detail = _short(err.describe(), 160)
        text = f"API retry {m.group('n')}: " + (f"{CAUSES[cause]}" if cause else "error")
        return AgentEvent(f"{text} ({detail})" if detail else text, kind="retry", cause=cause,
                          fatal=cause == "auth", retry_after=err.retry_after)
    w = WAIT.match(text)
    if w is not None:
        asked = _seconds(w.group("n"), w.group("u"))
        waiting = re.search(r"Retrying after (\d+)ms", w.group("rest"))
        what = (f"retrying in {int(waiting.group(1)) / 1000:.0f} s" if waiting
                else "retries exhausted")
        return AgentEvent(f"API {CAUSES['rate_limit']}: provider asked to wait {asked:g} s, "
                          f"{what}", kind="retry", cause="rate_limit", retry_after=asked)
    if text.startswith(API_ERROR_LINE):
        found = re.search(r"(?:_ApiError|\w*Error): (.*)$", text)
        err = api_error(found.group(1) if found else text)
        cause = err.cause
        prefix = f"API error, {CAUSES[cause]}" if cause else "API error"
        return AgentEvent(f"{prefix}: {_short(err.describe(), 200)}", kind="error", cause=cause,
                          retry_after=err.retry_after)
    if text.startswith("Error executing tool "):
        return AgentEvent(_short(text, 200), kind="tool")
    if text.startswith(("[ERROR]", "[WARNING]")) or "not running in a trusted directory" in text:
        return AgentEvent(_short(text, 200), kind="error")
    return None


def _stderr_api_error(stderr: str) -> str:
    """The provider error gemini reported on stderr (`Error when talking to Gemini API ...
    _ApiError: {...}`), for runs that ended before their `result` event."""
    for line in reversed(strip_ansi(stderr).splitlines()):
        if line.startswith(API_ERROR_LINE):
            found = re.search(r"(?:_ApiError|\w*Error): (.*)$", line)
            return found.group(1) if found else ""
    return ""


def _answer(events: list[dict[str, Any]]) -> str:
    """The last model turn's text, as gemini's own JSON output keeps it: text written
    before a tool call belongs to an earlier turn."""
    parts: list[str] = []
    for ev in events:
        kind = ev.get("type")
        if kind in ("tool_use", "tool_result"):
            parts = []
        elif kind == "message" and ev.get("role") == "assistant":
            parts.append(str(ev.get("content") or ""))
    return "".join(parts)


def _stream_metrics(events: list[dict[str, Any]]) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    turns = 0
    in_turn = False
    for ev in events:
        kind = ev.get("type")
        if kind == "init" and isinstance(ev.get("session_id"), str):
            metrics["session_id"] = ev["session_id"]
        elif kind == "tool_result":
            in_turn = False
        elif kind == "tool_use" or (kind == "message" and ev.get("role") == "assistant"):
            if not in_turn:
                turns += 1
                in_turn = True
        elif kind == "result":
            stats = ev.get("stats")
            if isinstance(stats, dict):
                add(metrics, "input_tokens", stats.get("input_tokens"))
                add(metrics, "cached_input_tokens", stats.get("cached"))
                add(metrics, "output_tokens", stats.get("output_tokens"))
            if ev.get("status") == "success":
                turns = max(turns, 1)
    if turns:
        metrics["turns"] = turns
    return metrics
