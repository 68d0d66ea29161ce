"""opencode preset: `opencode run --format json --print-logs --log-level WARN [--agent NAME]`.

Verified against the real **opencode 1.18.33** run on a local OpenAI Chat Completions
stub through an `@ai-sdk/openai-compatible` provider (tests/contract/test_opencode.py;
docs/agent-clis.md, "opencode").  Notable choices:

* `opencode run` takes its directory from `$PWD` (falling back to its cwd), so the
  preset sets `PWD` to the project root;
* the prompt goes on stdin; an agent kept in the project's `.opencode/agent/` (as AIWG
  deploys it) is run by name with `--agent`, so opencode applies its own prompt, model,
  `tools` and `permission`;
* any other definition becomes an inline primary agent in `OPENCODE_CONFIG_CONTENT`
  (merged into one the user set): its body is the agent's prompt, read by opencode from
  a private file (`{file:...}`, so no env-string limit applies), and its frontmatter
  `tools:` become a `permission` map that denies every tool not listed — opencode's
  `run` otherwise allows every tool, Bash included;
* `run` does not fail on an unknown agent — it falls back to its default agent with a
  warning; the preset stops the tool at that warning (`fatal`);
* in `--format json` opencode prints nothing while it retries a failing API call (up to
  ~80 s for 5xx, 529 or an unreachable server).  `--print-logs --log-level WARN` puts
  each failed attempt on stderr (`level=ERROR message="stream error" ...`), which
  `watch` turns into live retry events;
* a provider error ends as an `error` event whose `data` carries the HTTP `statusCode`,
  `isRetryable`, `responseHeaders` and `responseBody`: 401/403 are bad credentials
  (not retried, fatal when seen live), 429 a rate limit (with the headers' reset time)
  or an exhausted quota (`insufficient_quota`), 503/529 overloaded, other 5xx a server
  error, `ContextOverflowError` / 4xx a rejected request, no status and "Cannot connect"
  an unreachable server.  Exit code 1 on any error, 0 otherwise;
* stderr warnings are ANSI-coloured even with NO_COLOR; they are matched uncoloured;
* the result is the `text` parts of the last step with text; cost and tokens are
  summed over the `step_finish` parts, and turns are the number of steps.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..agentdefs import AgentDefinition
from ..events import CAUSES, AgentEvent, Cause
from .llm import stated_wait
from .openai import reset_after_s
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

FALLBACK_WARNING = "Falling back to default agent"
INLINE_PREFIX = "pd-"
"""Inline agents are named `pd-<definition>`, apart from opencode's and the user's."""

LOG_FIELD = re.compile(r'([\w.]+)=("(?:[^"\\]|\\.)*"|\S*)')
LOG_LINE = re.compile(r"^timestamp=\S+ level=(?P<level>[A-Z]+) ")

CLAUDE_TOOLS: dict[str, str] = {
    "read": "read", "notebookread": "read",
    "edit": "edit", "multiedit": "edit", "write": "edit", "notebookedit": "edit",
    "patch": "edit",
    "glob": "glob", "grep": "grep", "ls": "list", "list": "list",
    "bash": "bash", "bashoutput": "bash", "killshell": "bash", "killbash": "bash",
    "webfetch": "webfetch", "websearch": "websearch",
    "task": "task", "agent": "task", "todowrite": "todowrite", "todoread": "todowrite",
    "skill": "skill",
}
"""Claude Code tool names (and opencode's own) → opencode permission keys."""

AUTH_TEXT = re.compile(r"incorrect api key|invalid[ _]api[ _]key|invalid x-api-key|"
                       r"api key (?:is )?(?:missing|invalid|not valid)|\b401\b|"
                       r"unauthori[sz]ed|authentication[_ ](?:failed|error)", re.IGNORECASE)
TEXT_CAUSES = cause_patterns(
    ("auth", AUTH_TEXT.pattern),
    ("quota", r"insufficient_quota|exceeded your current quota.*billing"),
    ("rate_limit", r"rate.?limit|too many requests|\b429\b"),
    ("overloaded", r"overloaded|\b52[9]\b|\b503\b|service unavailable"),
    ("unreachable", r"cannot connect to api|unable to connect|econnrefused|"
                    r"econnreset|enotfound|fetch failed|socket hang up"),
    ("bad_request", r"context length|context window|maximum context|too long"),
    ("server", r"server (?:had an )?error|internal server error|bad gateway|\b50[0-4]\b"),
)
"""Cause per wording, for log lines that carry no HTTP status."""


def text_cause(text: str) -> Cause | None:
    return next((cause for cause, pattern in TEXT_CAUSES if pattern.search(text)), None)


def native_agent(call: Call) -> str | None:
    """The `--agent` name when opencode can load the definition itself, else None."""
    d = call.agent.definition
    if d is None or not _in_opencode_folder(call, d) or d.extra.get("mode") == "subagent":
        return None
    return d.path.stem


def _in_opencode_folder(call: Call, d: AgentDefinition) -> bool:
    return d.path.parent.resolve() == (call.job.spec.root / ".opencode" / "agent").resolve()


def tool_permissions(tools: tuple[str, ...]) -> dict[str, Any]:
    """A Claude-style `tools:` list as opencode permissions: listed tools allowed, the rest
    denied.  `Bash(git log:*)` allows only matching commands; unknown names (an MCP tool,
    say) grant nothing."""
    allowed: dict[str, Any] = {}
    for tool in tools:
        name, _, rest = tool.partition("(")
        key = CLAUDE_TOOLS.get(name.strip().lower())
        if key is None:
            continue
        pattern = rest.rstrip(")").strip()
        if not pattern:
            allowed[key] = "allow"
            continue
        if allowed.get(key) == "allow":
            continue
        if pattern.endswith(":*"):
            pattern = pattern[:-2] + "*"
        rules = allowed.setdefault(key, {"*": "deny"})
        rules[pattern] = "allow"
    return {"*": "deny", **allowed}


def _frontmatter(d: AgentDefinition) -> dict[str, Any]:
    """The raw frontmatter of an opencode-format definition (its `tools` map keeps the
    `false` entries that AgentDefinition.tools drops)."""
    try:
        text = d.path.read_text(encoding="utf-8")
        front = text.split("\n---", 1)[0].removeprefix("---")
        data = yaml.safe_load(front)
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


@dataclass
class _Live:
    """What `watch` counted so far for one call (opencode's events carry no numbers)."""

    steps: int = 0
    failed_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


class OpencodeRunner(PresetRunner):
    name = "opencode"
    docs = "opencode 1.18.33 (verified on a local Chat Completions stub); anomalyco/opencode"
    install_hint = ("install opencode (npm install -g opencode-ai) or set "
                    "command = [\"/path/to/opencode\"] in [runners.opencode]")
    auth_hint = ("run `opencode auth login` (or set the provider's API key variable, or "
                 "`apiKey` in the provider's options in opencode.json)")

    # -- the command -------------------------------------------------------------------
    def build(self, call: Call) -> Invocation:
        agent = call.agent
        argv = [*self.prefix(agent), "run", "--format", "json", "--print-logs",
                "--log-level", "WARN"]
        # `opencode run` works in $PWD (before its cwd), so $PWD must be the project root,
        # not wherever the dispatcher was started: that is where its tools act and where
        # it looks for .opencode/agent/.
        env: dict[str, str] = {"PWD": str(call.job.workdir or call.job.spec.root)}
        files: dict[Path, str] = {}
        d = agent.definition
        native = native_agent(call)
        if native is not None:
            argv += ["--agent", native]
        elif d is not None and (d.system_prompt or d.tools):
            name = INLINE_PREFIX + re.sub(r"[^a-z0-9_-]+", "-", d.path.stem.lower()).strip("-")
            spec: dict[str, Any] = {"mode": "primary"}
            if d.description:
                spec["description"] = d.description
            if d.system_prompt:
                path = call.tempdir(self.name) / "prompt.md"
                files[path] = d.system_prompt
                spec["prompt"] = "{file:" + str(path) + "}"
            if _in_opencode_folder(call, d):  # a subagent: keep opencode's own limits
                front = _frontmatter(d)
                spec.update({k: front[k] for k in ("tools", "permission", "temperature")
                             if k in front})
            elif d.tools:
                spec["permission"] = tool_permissions(d.tools)
            env["OPENCODE_CONFIG_CONTENT"] = json.dumps(self._config(agent.env, name, spec))
            argv += ["--agent", name]
        # A native agent brings its own model; only an explicit config model overrides it.
        own = d.model if d is not None else None
        model = agent.model if native is None or agent.model != own else None
        if model:
            argv += ["-m", model]
        argv += list(agent.args)
        return Invocation(argv=argv, stdin=call.prompt, env=env, files=files)

    def _config(self, agent_env: Any, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        """The user's OPENCODE_CONFIG_CONTENT (if any) with the inline agent added."""
        raw = agent_env.get("OPENCODE_CONFIG_CONTENT") or self.base_env.get(
            "OPENCODE_CONFIG_CONTENT")
        try:
            config = json.loads(raw) if raw else {}
        except ValueError:
            config = {}
        if not isinstance(config, dict):
            config = {}
        agents = as_dict(config.get("agent"))
        return {**config, "agent": {**agents, name: spec}}

    # -- live events ---------------------------------------------------------------------
    def watch(self, call: Call, line: str, stream: StreamName) -> AgentEvent | None:
        text = strip_ansi(line).strip()
        if not text:
            return None
        live = call.state.setdefault("opencode", _Live())
        if stream == "stdout":
            if not text.startswith("{"):
                return None
            try:
                event = json.loads(text)
            except ValueError:
                return None
            return self._stdout_event(live, event) if isinstance(event, dict) else None
        if FALLBACK_WARNING in text:
            return AgentEvent(_fallback_message(text), kind="error", fatal=True)
        if "permission requested" in text:
            return AgentEvent(text.lstrip("! ").strip(), kind="tool")
        log = LOG_LINE.match(text)
        if log is None or log["level"] != "ERROR":
            return None
        fields = _log_fields(text)
        if fields.get("message") != "stream error" or fields.get("agent") == "title":
            return None
        live.failed_calls += 1
        message = _api_message(fields.get("error.error", ""))
        cause = text_cause(message)
        if cause == "auth" and live.failed_calls > 1:
            # opencode does not retry a 401: its `error` event (with the status) follows at
            # once and ends the run.  Retrying one anyway would take minutes: stop it.
            return AgentEvent(self.provider_error("auth", message).error or message,
                              kind="error", cause="auth", fatal=True)
        retrying = cause in ("rate_limit", "overloaded", "server", "unreachable")
        what = CAUSES[cause] if cause else "API call failed"
        # The log line has no headers; an OpenAI-style body still states its wait.
        wait = stated_wait(message) if cause == "rate_limit" else None
        return AgentEvent(f"{what} (failed API call {live.failed_calls}"
                          f"{', opencode retries' if retrying else ''}): {_short(message)}",
                          kind="retry" if retrying else "error", cause=cause,
                          retry_after=wait)

    def _stdout_event(self, live: _Live, event: dict[str, Any]) -> AgentEvent | None:
        kind = event.get("type")
        part = as_dict(event.get("part"))
        if kind == "step_start":
            live.steps += 1
            return AgentEvent(f"step {live.steps}: waiting for the model")
        if kind == "tool_use":
            state = as_dict(part.get("state"))
            inp = as_dict(state.get("input"))
            what = inp.get("command") or state.get("title") or inp.get("filePath") or ""
            status = state.get("status", "")
            error = f": {_short(str(state.get('error')))}" if state.get("error") else ""
            return AgentEvent(f"tool {part.get('tool', '?')} {status}"
                              f"{f' ({_short(str(what), 80)})' if what else ''}{error}",
                              kind="tool")
        if kind == "step_finish":
            tokens = as_dict(part.get("tokens"))
            cache = as_dict(tokens.get("cache"))
            for value in (tokens.get("input"), cache.get("read"), cache.get("write")):
                live.input_tokens += int(value) if isinstance(value, int) else 0
            for value in (tokens.get("output"), tokens.get("reasoning")):
                live.output_tokens += int(value) if isinstance(value, int) else 0
            return AgentEvent(f"step {live.steps} done ({part.get('reason', '?')}); tokens so "
                              f"far: {live.input_tokens:,} input, {live.output_tokens:,} "
                              "output", kind="tokens")
        if kind == "error" and isinstance(event.get("error"), dict):
            parsed = self._error(event["error"], 1)
            return AgentEvent(parsed.error or "error", kind="error", cause=parsed.cause,
                              fatal=parsed.cause == "auth", retry_after=parsed.retry_after)
        return None

    # -- the result ----------------------------------------------------------------------
    def parse(self, call: Call, code: int, stdout: bytes, stderr: str) -> Parsed:
        metrics: dict[str, Any] = {}
        steps: list[list[str]] = [[]]
        error: dict[str, Any] | None = None
        for event in jsonl(stdout):
            kind = event.get("type")
            part = as_dict(event.get("part"))
            if isinstance(event.get("sessionID"), str):
                metrics["session_id"] = event["sessionID"]
            if kind == "step_start":
                steps.append([])
            elif kind == "text" and isinstance(part.get("text"), str):
                steps[-1].append(part["text"])
            elif kind == "step_finish":
                add(metrics, "cost_usd", part.get("cost"))
                tokens = as_dict(part.get("tokens"))
                cache = as_dict(tokens.get("cache"))
                for value in (tokens.get("input"), cache.get("read"), cache.get("write")):
                    add(metrics, "input_tokens", value)
                add(metrics, "cached_input_tokens", cache.get("read"))
                add(metrics, "output_tokens", tokens.get("output"))
                add(metrics, "output_tokens", tokens.get("reasoning"))
                add(metrics, "turns", 1)
            elif kind == "error" and isinstance(event.get("error"), dict) and error is None:
                error = event["error"]  # the first: later ones follow from it (compaction)
        stderr = strip_ansi(stderr)
        if error is not None:
            parsed = self._error(error, code)
        elif FALLBACK_WARNING in stderr:
            line = next(ln for ln in stderr.splitlines() if FALLBACK_WARNING in ln)
            parsed = Parsed(ok=False, retryable=False, error=_fallback_message(line))
        elif code != 0:
            parsed = self.failure(_stderr_message(stderr), code)
        else:
            texts = next((s for s in reversed(steps) if s), None)
            if texts is None:
                parsed = Parsed(ok=False, retryable=True,
                                error="printed no text events; check `opencode --version` "
                                      "(needs `run --format json`)")
            else:
                parsed = Parsed(ok=True, text="\n".join(texts))
        parsed.metrics = metrics
        return parsed

    def _error(self, error: dict[str, Any], code: int) -> Parsed:
        """An opencode `error` event as a task error, classified by its HTTP status."""
        name = str(error.get("name") or "Error")
        data = as_dict(error.get("data"))
        message = str(data.get("message") or name).strip()
        status = data.get("statusCode") if isinstance(data.get("statusCode"), int) else None
        body = str(data.get("responseBody") or "")
        headers = data.get("responseHeaders")
        headers = {str(k).lower(): str(v) for k, v in headers.items()} \
            if isinstance(headers, dict) else {}
        http = f"HTTP {status}: {message}" if status else message
        if name == "ProviderModelNotFoundError":
            return Parsed(ok=False, retryable=False,
                          error=f"{message}; set model = \"provider/model\" in [agents.<name>] "
                                "or [runners.opencode]")
        if name == "ProviderAuthError" or status in (401, 403):
            return self.provider_error("auth", http)
        if name == "ContextOverflowError" or status in (400, 404, 413, 422):
            return self.provider_error("bad_request", http)
        if status == 429:
            if "insufficient_quota" in body or "insufficient_quota" in message:
                return self.provider_error("quota", http)
            wait = reset_after_s(headers)
            hint = f"; the provider said to retry after {wait:g} s" if wait is not None else ""
            return self.provider_error("rate_limit", http + hint, retry_after=wait)
        if status in (503, 529) or "overloaded" in message.lower():
            return self.provider_error("overloaded", http, retry_after=reset_after_s(headers))
        if status is not None and status >= 500:
            return self.provider_error("server", http)
        if status is None and text_cause(message) == "unreachable":
            url = data.get("metadata", {}).get("url") if isinstance(data.get("metadata"),
                                                                    dict) else None
            return self.provider_error("unreachable", message + (f" ({url})" if url else ""))
        retryable = data.get("isRetryable")
        parsed = self.failure(f"{name}: {message}", code or None)
        if isinstance(retryable, bool) and parsed.retryable:
            parsed.retryable = retryable
        return parsed


def _fallback_message(line: str) -> str:
    return (f"{strip_ansi(line).lstrip('! ').strip()}; the agent's definition was not used: "
            "check .opencode/agent/ and its 'mode'")


def _log_fields(line: str) -> dict[str, str]:
    """The `key=value` fields of an opencode log line (quoted values unescaped)."""
    out: dict[str, str] = {}
    for key, value in LOG_FIELD.findall(line):
        if value.startswith('"'):
            try:
                value = json.loads(value)
            except ValueError:
                value = value[1:-1]
        out[key] = value
    return out


def _api_message(error: str) -> str:
    """`AI_APICallError: Overloaded` → `Overloaded` (also AI_RetryError's last error)."""
    error = re.sub(r"^AI_\w+: ", "", error.strip())
    error = re.sub(r"^Failed after \d+ attempts\. Last error: ", "", error)
    return re.sub(r" \(cause: .*\)$", "", error)


def _stderr_message(stderr: str) -> str:
    """What a failed run said on stderr: its last plain line, else its last error log."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    plain = [ln for ln in lines if not LOG_LINE.match(ln) and not ln.startswith("=== ")]
    if plain:
        return plain[-1]
    for ln in reversed(lines):
        fields = _log_fields(ln)
        if fields.get("level") == "ERROR":
            return fields.get("error") or fields.get("error.error") or fields.get("message", "")
    return ""


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"
