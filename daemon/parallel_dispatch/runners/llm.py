"""llm preset (simonw/llm): `llm -m M -s BODY --no-stream -u -n`, prompt on stdin.

Followed (see docs/agent-clis.md, "llm"): llm **0.27** — simonw/llm `docs/usage.md`,
`llm prompt --help`, and `llm/cli.py` / `llm/utils.py` (`token_usage_string`).
Notable choices:

* stdout is the answer as is; `-u` prints `Token usage: 1,234 input, 56 output` on
  stderr (no cost is reported); `-n` keeps parallel runs from all writing logs.db;
* a system prompt too long for argv is put in front of the prompt instead of `-s`;
* llm has no exit-0 error payload: failures are click's `Error: ...` with exit 1.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from .preset import Call, Invocation, Parsed, PresetRunner, last_line

USAGE_RE = re.compile(r"Token usage: ([\d,]+) input, ([\d,]+) output")


class LlmRunner(PresetRunner):
    name = "llm"
    executable = "llm"
    docs = "llm 0.27; simonw/llm docs/usage.md, llm/cli.py"
    install_hint = ("install llm (pipx install llm) or set command = [\"/path/to/llm\"] in "
                    "[runners.llm]")
    auth_hint = "add a key with `llm keys set <provider>` or set the provider's key variable"
    model_families: ClassVar[frozenset[str]] = frozenset({"claude", "gemini", "other"})

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
        argv += ["--no-stream", "-u", "-n", *agent.args]
        return Invocation(argv=argv, stdin=stdin)

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
            if "unknown model" in message.lower():
                return Parsed(ok=False, retryable=False,
                              error=f"{message}; set model = \"...\" (see `llm models`) in "
                                    "[agents.<name>] or [runners.llm]")
            if "no key found" in message.lower():  # llm's message already says what to do
                return Parsed(ok=False, retryable=False, error=f"bad credentials: {message}")
            return self.failure(message, code)
        metrics["turns"] = 1
        return Parsed(ok=True, text=stdout.decode("utf-8", errors="replace"), metrics=metrics)
