"""Claude Code preset: `claude -p --output-format json`, prompt on stdin.

Followed (see docs/agent-clis.md, "Claude Code"): Claude Code **2.1.266** — the
headless page (code.claude.com/docs/en/headless), the CLI reference, and the Agent
SDK's `SDKResultMessage` for the JSON result.  Notable choices:

* the definition body goes through `--append-system-prompt` (Claude Code keeps its own
  tool-use prompt), or `--append-system-prompt-file` when it is too long for argv;
* frontmatter `tools` become one comma-joined `--allowedTools` argument, placed last:
  the option is variadic and would swallow any bare word after it;
* failure = `is_error` or a `subtype` other than `success` — API failures arrive as
  `subtype: success, is_error: true`, possibly with exit code 0.
"""

from __future__ import annotations

from typing import Any, ClassVar

from .preset import Call, Invocation, Parsed, PresetRunner, add, json_object, last_line

ERROR_SUBTYPES = {
    "error_max_turns": "raise the limit with args = [\"--max-turns\", \"N\"]",
    "error_max_budget_usd": "raise --max-budget-usd in args",
    "error_max_structured_output_retries": "check the structured output schema",
}


class ClaudeRunner(PresetRunner):
    name = "claude"
    executable = "claude"
    docs = "Claude Code 2.1.266; code.claude.com/docs/en/headless, cli-reference"
    install_hint = ("install Claude Code (npm install -g @anthropic-ai/claude-code) or set "
                    "command = [\"/path/to/claude\"] in [runners.claude]")
    auth_hint = "run `claude` and log in with /login, or set ANTHROPIC_API_KEY"
    model_families: ClassVar[frozenset[str]] = frozenset(
        {"claude-alias", "claude", "provider", "other"})

    def build(self, call: Call) -> Invocation:
        agent = call.agent
        argv = [*self.prefix(agent), "-p", "--output-format", "json"]
        if agent.model:
            argv += ["--model", agent.model]
        files = {}
        if call.system_prompt:
            if call.argv_safe(call.system_prompt) or call.show:
                argv += ["--append-system-prompt", call.body]
            else:
                path = call.scratch / "system-prompt.md"
                files[path] = call.system_prompt
                argv += ["--append-system-prompt-file", str(path)]
        argv += list(agent.args)
        tools = agent.definition.tools if agent.definition is not None else ()
        if tools:
            argv += ["--allowedTools", ",".join(tools)]
        return Invocation(argv=argv, stdin=call.prompt, files=files)

    def parse(self, call: Call, code: int, stdout: bytes, stderr: str) -> Parsed:
        payload = json_object(stdout)
        if payload is None or payload.get("type") not in (None, "result"):
            if code != 0:
                return self.failure(last_line(stderr) or "no JSON result on stdout", code)
            return Parsed(ok=False, retryable=False,
                          error="printed no JSON result; check `claude --version` "
                                "(needs --output-format json support)")
        metrics = _metrics(payload)
        subtype = str(payload.get("subtype") or "success")
        result = payload.get("result")
        if not payload.get("is_error") and subtype == "success" and code != 0:
            parsed = self.failure(last_line(stderr), code)
            parsed.metrics = metrics
            return parsed
        if payload.get("is_error") or subtype != "success":
            errors = payload.get("errors")
            message = (result if isinstance(result, str) and result
                       else errors[0] if isinstance(errors, list) and errors
                       else last_line(stderr) or subtype)
            if subtype in ERROR_SUBTYPES:
                parsed = Parsed(ok=False, retryable=False,
                                error=f"{message} ({subtype}); {ERROR_SUBTYPES[subtype]}")
            else:
                parsed = self.failure(str(message), code)
            parsed.metrics = metrics
            return parsed
        if not isinstance(result, str):
            return Parsed(ok=False, retryable=False, metrics=metrics,
                          error="the JSON result has no 'result' text")
        return Parsed(ok=True, text=result, metrics=metrics)


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
