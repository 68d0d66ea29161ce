"""Gemini CLI preset: `gemini --output-format json`, prompt on stdin, GEMINI_SYSTEM_MD.

Followed (see docs/agent-clis.md, "Gemini CLI"): gemini-cli **0.24** — google-gemini/
gemini-cli `docs/cli/headless.md`, `docs/cli/system-prompt.md`, `docs/cli/cli-reference.md`
and the error/JSON formatter sources.  Notable choices:

* no `-p`: piped stdin already selects headless mode, and a `-p` value would be
  appended after the prompt (documented);
* the definition body is written to a private temp file named by `GEMINI_SYSTEM_MD`
  (lower-case path); note it *replaces* Gemini's built-in system prompt;
* the JSON result is `{response, stats, error?}`; fatal errors print that JSON on
  *stderr* with stdout empty, and the documented exit codes map to the fixes below;
* tokens are summed over `stats.models[*].tokens` (prompt, candidates); no cost is
  reported.
"""

from __future__ import annotations

from typing import Any, ClassVar

from .preset import Call, Invocation, Parsed, PresetRunner, add, json_object, last_line

EXIT_CODES: dict[int, tuple[str, str, bool]] = {
    # code: (what, what to fix, retryable)
    41: ("authentication failed", "set GEMINI_API_KEY or choose an auth method in "
         "~/.gemini/settings.json", False),
    42: ("input error", "check the prompt", False),
    44: ("sandbox error", "check gemini's sandbox settings (or run without --sandbox)", False),
    52: ("configuration error", "fix ~/.gemini/settings.json or .gemini/settings.json", False),
    53: ("turn limit reached", "raise maxSessionTurns in gemini's settings.json", False),
    54: ("tool execution failed", "see the task log", True),
    130: ("cancelled", "run it again", True),
}


class GeminiRunner(PresetRunner):
    name = "gemini"
    executable = "gemini"
    docs = "gemini-cli 0.24; docs/cli/headless.md, docs/cli/system-prompt.md"
    install_hint = ("install the Gemini CLI (npm install -g @google/gemini-cli) or set "
                    "command = [\"/path/to/gemini\"] in [runners.gemini]")
    auth_hint = "set GEMINI_API_KEY or choose an auth method in ~/.gemini/settings.json"
    model_families: ClassVar[frozenset[str]] = frozenset({"gemini", "gemini-alias"})

    def build(self, call: Call) -> Invocation:
        agent = call.agent
        argv = [*self.prefix(agent), "--output-format", "json"]
        if agent.model:
            argv += ["-m", agent.model]
        argv += list(agent.args)
        env: dict[str, str] = {}
        files = {}
        if call.system_prompt:
            path = call.tempdir(self.name) / "system.md"
            files[path] = call.system_prompt
            env["GEMINI_SYSTEM_MD"] = str(path) if not call.show else call.body
        return Invocation(argv=argv, stdin=call.prompt, env=env, files=files)

    def parse(self, call: Call, code: int, stdout: bytes, stderr: str) -> Parsed:
        payload = json_object(stdout)
        if payload is None and code != 0:
            payload = json_object(stderr[stderr.find("{"):] if "{" in stderr else "")
        metrics = _metrics(payload or {})
        error = (payload or {}).get("error")
        if code in EXIT_CODES:
            what, fix, retryable = EXIT_CODES[code]
            detail = error.get("message") if isinstance(error, dict) else last_line(stderr)
            return Parsed(ok=False, retryable=retryable, metrics=metrics,
                          error=f"{what} (exit code {code}): {detail}; {fix}")
        if isinstance(error, dict) or code != 0:
            message = (str(error.get("message") or error.get("type"))
                       if isinstance(error, dict) else last_line(stderr))
            parsed = self.failure(message, code or None)
            parsed.metrics = metrics
            return parsed
        if payload is None or not isinstance(payload.get("response"), str):
            return Parsed(ok=False, retryable=False, metrics=metrics,
                          error="printed no JSON result with a 'response'; check "
                                "`gemini --version` (needs --output-format json)")
        return Parsed(ok=True, text=payload["response"], metrics=metrics)


def _metrics(payload: dict[str, Any]) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    stats = payload.get("stats")
    models = stats.get("models") if isinstance(stats, dict) else None
    if isinstance(models, dict):
        for model in models.values():
            tokens = model.get("tokens") if isinstance(model, dict) else None
            if isinstance(tokens, dict):
                add(metrics, "input_tokens", tokens.get("prompt"))
                add(metrics, "cached_input_tokens", tokens.get("cached"))
                add(metrics, "output_tokens", tokens.get("candidates"))
    if isinstance(payload.get("session_id"), str):
        metrics["session_id"] = payload["session_id"]
    return metrics
