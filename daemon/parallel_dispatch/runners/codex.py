"""OpenAI Codex CLI preset: `codex exec --json ... -`, prompt on stdin.

Followed (see docs/agent-clis.md, "OpenAI Codex CLI"): **codex-cli 0.151.0** — openai/codex
`docs/exec.md`, the JSONL event types in `codex-rs/exec/src/exec_events.rs`, and the
"Non-interactive mode" page.  Notable choices:

* the result is the `-o/--output-last-message` file (the final message only);
* usage is summed over `turn.completed` events (tokens only: codex reports no cost);
* the system prompt is `-c developer_instructions=<TOML string>` (codex keeps its own
  base instructions); a body too long for argv is put in front of the prompt instead;
* `--skip-git-repo-check` so tasks run outside a repository, and `--sandbox read-only`
  (exec's documented default) unless `args` choose a sandbox;
* failure = a non-zero exit, or a `turn.failed` / `error` event even with exit 0.
"""

from __future__ import annotations

from typing import Any, ClassVar

from .preset import Call, Invocation, Parsed, PresetRunner, add, jsonl, last_line, toml_string

SANDBOX_FLAGS = ("-s", "--sandbox", "--full-auto", "--yolo",
                 "--dangerously-bypass-approvals-and-sandbox")


class CodexRunner(PresetRunner):
    name = "codex"
    executable = "codex"
    docs = "codex-cli 0.151.0; openai/codex docs/exec.md, exec_events.rs"
    install_hint = ("install the Codex CLI (npm install -g @openai/codex) or set "
                    "command = [\"/path/to/codex\"] in [runners.codex]")
    auth_hint = "run `codex login`, or set CODEX_API_KEY"
    model_families: ClassVar[frozenset[str]] = frozenset({"other"})

    def build(self, call: Call) -> Invocation:
        agent = call.agent
        argv = [*self.prefix(agent), "exec", "--json", "--skip-git-repo-check"]
        if not any(a in SANDBOX_FLAGS or a.startswith("--sandbox=") for a in agent.args):
            argv += ["--sandbox", "read-only"]
        argv += ["-o", str(call.scratch / "last-message.txt")]
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

    def parse(self, call: Call, code: int, stdout: bytes, stderr: str) -> Parsed:
        metrics: dict[str, Any] = {}
        failure: str | None = None
        answer: str | None = None
        events = 0
        for event in jsonl(stdout):
            events += 1
            kind = event.get("type")
            if kind == "turn.completed":
                usage = event.get("usage")
                if isinstance(usage, dict):
                    add(metrics, "input_tokens", usage.get("input_tokens"))
                    add(metrics, "cached_input_tokens", usage.get("cached_input_tokens"))
                    add(metrics, "output_tokens", usage.get("output_tokens"))
                add(metrics, "turns", 1)
            elif kind == "turn.failed":
                error = event.get("error")
                if isinstance(error, dict) and error.get("message"):
                    failure = str(error["message"])
            elif kind == "error" and event.get("message"):
                failure = failure or str(event["message"])
            elif kind == "item.completed":
                item = event.get("item")
                if isinstance(item, dict) and item.get("type") == "agent_message":
                    answer = str(item.get("text", ""))
            elif kind == "thread.started" and isinstance(event.get("thread_id"), str):
                metrics["session_id"] = event["thread_id"]
        if failure is not None or code != 0:
            message = failure or last_line(stderr, "ERROR:").removeprefix("ERROR:").strip() \
                or last_line(stderr)
            if "usage limit" in message.lower():
                parsed = Parsed(ok=False, retryable=False,
                                error=f"{message}; wait for the limit to reset or change plan")
            else:
                parsed = self.failure(message, code or None)
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
