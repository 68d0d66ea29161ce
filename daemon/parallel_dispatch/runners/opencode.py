"""opencode preset: `opencode run --format json [--agent NAME]`, prompt on stdin.

Followed (see docs/agent-clis.md, "opencode"): opencode **1.15** — anomalyco/opencode
`packages/web/src/content/docs/cli.mdx`, `agents.mdx` and `packages/opencode/src/cli/cmd/
run.ts` (the JSON event stream and the `--agent` fallback).  Notable choices:

* opencode has no system-prompt flag: an agent defined in the project's
  `.opencode/agent/` (as AIWG deploys it) is passed by name with `--agent`; any other
  definition (or a `mode: subagent` one, which `run` refuses) has its body put in
  front of the prompt instead;
* `run` does not fail on an unknown agent — it falls back to its default agent with a
  warning; the preset treats that warning as an error;
* the result is the `text` parts of the last step; cost and tokens are summed over the
  `step_finish` parts, and turns are the number of steps.
"""

from __future__ import annotations

from typing import Any, ClassVar

from .preset import Call, Invocation, Parsed, PresetRunner, add, jsonl, last_line

FALLBACK_WARNING = "Falling back to default agent"


def native_agent(call: Call) -> str | None:
    """The `--agent` name when opencode can load the definition itself, else None."""
    d = call.agent.definition
    if d is None:
        return None
    folder = (call.job.spec.root / ".opencode" / "agent").resolve()
    if d.path.parent.resolve() != folder or d.extra.get("mode") == "subagent":
        return None
    return d.path.stem


class OpencodeRunner(PresetRunner):
    name = "opencode"
    executable = "opencode"
    docs = "opencode 1.15; anomalyco/opencode cli.mdx, agents.mdx, cli/cmd/run.ts"
    install_hint = ("install opencode (npm install -g opencode-ai) or set "
                    "command = [\"/path/to/opencode\"] in [runners.opencode]")
    auth_hint = "run `opencode auth login` (or set the provider's API key variable)"
    model_families: ClassVar[frozenset[str]] = frozenset({"provider"})

    def build(self, call: Call) -> Invocation:
        agent = call.agent
        argv = [*self.prefix(agent), "run", "--format", "json"]
        native = native_agent(call)
        stdin = call.prompt
        if native is not None:
            argv += ["--agent", native]
        elif call.system_prompt:
            stdin = call.with_system_prompt() if not call.show else f"{call.body} + <prompt>"
        # A native agent brings its own model; only an explicit config model overrides it.
        own = agent.definition.model if agent.definition is not None else None
        model = agent.model if native is None or agent.model != own else None
        if model:
            argv += ["-m", model]
        argv += list(agent.args)
        return Invocation(argv=argv, stdin=stdin)

    def parse(self, call: Call, code: int, stdout: bytes, stderr: str) -> Parsed:
        metrics: dict[str, Any] = {}
        steps: list[list[str]] = [[]]
        error: dict[str, Any] | None = None
        for event in jsonl(stdout):
            kind = event.get("type")
            part = event.get("part") if isinstance(event.get("part"), dict) else {}
            if isinstance(event.get("sessionID"), str):
                metrics["session_id"] = event["sessionID"]
            if kind == "step_start":
                steps.append([])
            elif kind == "text" and isinstance(part.get("text"), str):
                steps[-1].append(part["text"])
            elif kind == "step_finish":
                add(metrics, "cost_usd", part.get("cost"))
                tokens = part.get("tokens") if isinstance(part.get("tokens"), dict) else {}
                cache = tokens.get("cache") if isinstance(tokens.get("cache"), dict) else {}
                for value in (tokens.get("input"), cache.get("read"), cache.get("write")):
                    add(metrics, "input_tokens", value)
                add(metrics, "cached_input_tokens", cache.get("read"))
                add(metrics, "output_tokens", tokens.get("output"))
                add(metrics, "output_tokens", tokens.get("reasoning"))
                add(metrics, "turns", 1)
            elif kind == "error" and isinstance(event.get("error"), dict):
                error = event["error"]
        if error is not None:
            parsed = _error(self, error, code)
            parsed.metrics = metrics
            return parsed
        if FALLBACK_WARNING in stderr:
            return Parsed(ok=False, retryable=False, metrics=metrics,
                          error=f"{last_line(stderr, '!').lstrip('! ')}; the agent's definition "
                                "was not used: check .opencode/agent/ and its 'mode'")
        if code != 0:
            parsed = self.failure(last_line(stderr), code)
            parsed.metrics = metrics
            return parsed
        texts = next((s for s in reversed(steps) if s), None)
        if texts is None:
            return Parsed(ok=False, retryable=True, metrics=metrics,
                          error="printed no text events; check `opencode --version` "
                                "(needs `run --format json`)")
        return Parsed(ok=True, text="\n".join(texts), metrics=metrics)


def _error(runner: OpencodeRunner, error: dict[str, Any], code: int) -> Parsed:
    name = str(error.get("name") or "Error")
    data = error.get("data") if isinstance(error.get("data"), dict) else {}
    message = str(data.get("message") or name)
    if name == "ProviderAuthError":
        return runner.auth_error(message)
    if name == "ProviderModelNotFoundError":
        return Parsed(ok=False, retryable=False,
                      error=f"{message}; set model = \"provider/model\" in [agents.<name>] "
                            "or [runners.opencode]")
    retryable = data.get("isRetryable")
    parsed = runner.failure(f"{name}: {message}", code or None)
    if isinstance(retryable, bool) and not parsed.error.startswith("bad credentials"):
        parsed.retryable = retryable
    return parsed
