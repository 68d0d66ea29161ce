"""Sanity checks for the fake agent CLIs in tests/fakes/bin.

The runner tests trust these fakes to speak each tool's documented format, so the
formats themselves are pinned here, with real subprocesses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from support import wait_until

FAKE_BIN = Path(__file__).parent / "fakes" / "bin"
TOOLS = ("claude", "codex", "gemini", "opencode", "llm")
PROMPT = "Review the login flow\nsecond line\n"
EXPECTED = "RESULT: Review the login flow"


def fake_env(record: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAKE_", "GEMINI_"))}
    env["FAKE_RECORD"] = str(record)
    env.update(extra)
    return env


def run_fake(
    tool: str,
    args: list[str],
    cwd: Path,
    *,
    stdin: str = PROMPT,
    timeout: float = 20,
    **env: str,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(FAKE_BIN / tool), *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=fake_env(cwd / "calls.jsonl", **env),
        timeout=timeout,
        check=False,
    )


def records(cwd: Path) -> list[dict[str, Any]]:
    path = cwd / "calls.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# --- success payloads: argv a runner would build, and how to read the result -----------


def claude_result(proc: subprocess.CompletedProcess[str], _: Path) -> tuple[str, int, int]:
    payload = json.loads(proc.stdout)
    assert payload["type"] == "result" and payload["subtype"] == "success"
    assert payload["is_error"] is False
    assert payload["total_cost_usd"] == pytest.approx(0.0123)
    assert payload["num_turns"] == 1 and payload["session_id"]
    usage = payload["usage"]
    return payload["result"], usage["input_tokens"], usage["output_tokens"]


def codex_result(proc: subprocess.CompletedProcess[str], cwd: Path) -> tuple[str, int, int]:
    events = jsonl(proc.stdout)
    assert [e["type"] for e in events][:2] == ["thread.started", "turn.started"]
    messages = [
        e["item"]["text"]
        for e in events
        if e["type"] == "item.completed" and e["item"]["type"] == "agent_message"
    ]
    usage = next(e["usage"] for e in events if e["type"] == "turn.completed")
    assert (cwd / "last.txt").read_text() == messages[-1]
    return messages[-1], usage["input_tokens"], usage["output_tokens"]


def gemini_result(proc: subprocess.CompletedProcess[str], _: Path) -> tuple[str, int, int]:
    events = jsonl(proc.stdout)
    assert [e["type"] for e in events] == ["init", "message", "message", "result"]
    assert events[0]["session_id"] and events[1]["role"] == "user"
    result = events[-1]
    assert result["status"] == "success"
    text = "".join(e["content"] for e in events if e.get("role") == "assistant")
    return text, result["stats"]["input_tokens"], result["stats"]["output_tokens"]


def opencode_result(proc: subprocess.CompletedProcess[str], _: Path) -> tuple[str, int, int]:
    events = jsonl(proc.stdout)
    assert all(e["sessionID"] == events[0]["sessionID"] for e in events)
    text = "".join(e["part"]["text"] for e in events if e["type"] == "text")
    finish = [e["part"] for e in events if e["type"] == "step_finish"]
    assert finish[-1]["reason"] == "stop" and finish[-1]["cost"] == pytest.approx(0.0123)
    return text, finish[-1]["tokens"]["input"], finish[-1]["tokens"]["output"]


def llm_result(proc: subprocess.CompletedProcess[str], _: Path) -> tuple[str, int, int]:
    assert proc.stderr.strip() == "Token usage: 1,200 input, 345 output"
    return proc.stdout.rstrip("\n"), 1200, 345


Reader = Callable[[subprocess.CompletedProcess[str], Path], tuple[str, int, int]]
SUCCESS: dict[str, tuple[list[str], Reader]] = {
    "claude": (["-p", "--output-format", "json", "--model", "sonnet"], claude_result),
    "codex": (
        ["exec", "--json", "--skip-git-repo-check", "-o", "last.txt", "-m", "gpt-5", "-"],
        codex_result,
    ),
    "gemini": (["--output-format", "stream-json", "-m", "gemini-2.5-flash"], gemini_result),
    "opencode": (
        ["run", "--format", "json", "-m", "anthropic/claude-sonnet-4-5"],
        opencode_result,
    ),
    "llm": (["-s", "You review code.", "-m", "gpt-4o-mini", "--no-stream", "-u"], llm_result),
}


@pytest.mark.parametrize("tool", TOOLS)
def test_success_payload_carries_the_prompt_and_usage(tool: str, tmp_path: Path) -> None:
    args, read = SUCCESS[tool]
    proc = run_fake(tool, args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    text, tokens_in, tokens_out = read(proc, tmp_path)
    assert text == EXPECTED
    assert (tokens_in, tokens_out) == (1200, 345)


@pytest.mark.parametrize("tool", TOOLS)
def test_call_is_recorded(tool: str, tmp_path: Path) -> None:
    args, _ = SUCCESS[tool]
    proc = run_fake(
        tool,
        args,
        tmp_path,
        DISPATCH_TASK_ID="t1",
        GEMINI_API_KEY="sekrit",
        OTHER_VAR="not recorded",
    )
    assert proc.returncode == 0, proc.stderr
    (entry,) = records(tmp_path)
    assert entry["tool"] == tool
    assert entry["argv"] == args
    assert entry["stdin"] == PROMPT
    assert entry["cwd"] == str(tmp_path)
    assert entry["env"]["DISPATCH_TASK_ID"] == "t1"
    assert entry["env"]["GEMINI_API_KEY"] == "<redacted>"
    assert "OTHER_VAR" not in entry["env"]
    assert "Review the login flow" in entry["prompt"]


@pytest.mark.parametrize("tool", TOOLS)
def test_version_answers_without_reading_stdin(tool: str, tmp_path: Path) -> None:
    # stdin stays open: a fake that read it would block until the timeout.
    proc = subprocess.Popen(
        [str(FAKE_BIN / tool), "--version"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=fake_env(tmp_path / "calls.jsonl"),
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.wait(timeout=10) == 0
        out = proc.stdout.read()
    finally:
        proc.kill()
        proc.stdin.close()
        proc.stdout.close()
        proc.wait()
    assert out.strip()
    assert records(tmp_path)[0]["version_query"] is True


def test_version_knobs(tmp_path: Path) -> None:
    ok = run_fake("codex", ["--version"], tmp_path, FAKE_VERSION="codex-cli 9.9.9")
    assert ok.stdout.strip() == "codex-cli 9.9.9"
    broken = run_fake("claude", ["--version"], tmp_path, FAKE_VERSION_MODE="exit")
    assert broken.returncode == 127


# --- error payloads (exit 0) -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["error", "exit"])
def test_claude_failures_are_left_to_the_real_client(mode: str, tmp_path: Path) -> None:
    """tests/contract/test_claude.py runs the real claude for every failure case."""
    proc = run_fake("claude", ["-p", "--output-format", "json"], tmp_path, FAKE_MODE=mode)
    assert proc.returncode == 99 and "tests/contract/test_claude.py" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("mode", ["error", "exit"])
def test_codex_failures_are_left_to_the_real_client(mode: str, tmp_path: Path) -> None:
    """tests/contract/test_codex.py runs the real codex for every failure case."""
    args = ["exec", "--json", "--skip-git-repo-check", "-o", "last.txt", "-"]
    proc = run_fake("codex", args, tmp_path, FAKE_MODE=mode)
    assert proc.returncode == 99 and "tests/contract/test_codex.py" in proc.stderr
    assert not (tmp_path / "last.txt").exists()


@pytest.mark.parametrize("mode", ["error", "exit"])
def test_gemini_failures_are_left_to_the_real_client(mode: str, tmp_path: Path) -> None:
    """tests/contract/test_gemini.py runs the real gemini for every failure case."""
    proc = run_fake("gemini", ["-o", "stream-json"], tmp_path, FAKE_MODE=mode)
    assert proc.returncode == 99 and "tests/contract/test_gemini.py" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("tool", ["opencode", "llm"])
@pytest.mark.parametrize("mode", ["error", "exit"])
def test_opencode_and_llm_failures_are_left_to_the_real_client(
        tool: str, mode: str, tmp_path: Path) -> None:
    """tests/contract/test_opencode.py and test_llm.py run the real clients for every
    failure case."""
    args = ["run", "--format", "json"] if tool == "opencode" else ["-s", "x"]
    proc = run_fake(tool, args, tmp_path, FAKE_MODE=mode)
    assert proc.returncode == 99 and f"tests/contract/test_{tool}.py" in proc.stderr
    assert proc.stdout == ""


# --- hangs ---------------------------------------------------------------------------------


def start_fake(tool: str, args: list[str], cwd: Path, **env: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [str(FAKE_BIN / tool), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env=fake_env(cwd / "calls.jsonl", **env),
    )
    assert proc.stdin is not None
    proc.stdin.write(PROMPT)
    proc.stdin.close()
    proc.stdin = None  # so communicate() does not flush the closed pipe
    return proc


def wait_for_record(cwd: Path, count: int = 1) -> None:
    assert wait_until(lambda: len(records(cwd)) >= count, 10), "fake never recorded its call"


@pytest.mark.parametrize("tool", TOOLS)
def test_hang_mode_hangs_after_recording(tool: str, tmp_path: Path) -> None:
    args, _ = SUCCESS[tool]
    proc = start_fake(tool, args, tmp_path, FAKE_MODE="hang")
    try:
        wait_for_record(tmp_path)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=0.3)
        proc.terminate()
        assert proc.wait(timeout=10) == -signal.SIGTERM
    finally:
        proc.kill()
        proc.communicate()


def test_hang_hard_ignores_sigterm(tmp_path: Path) -> None:
    proc = start_fake("claude", ["-p"], tmp_path, FAKE_MODE="hang_hard")
    try:
        wait_for_record(tmp_path)
        assert proc.stderr is not None  # hang() says "working..." once SIGTERM is ignored
        assert proc.stderr.readline() == "working...\n"
        proc.terminate()
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=0.3)
        proc.kill()
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.communicate()


# --- knobs and checks -----------------------------------------------------------------------


def test_prompt_tag_overrides_environment(tmp_path: Path) -> None:
    proc = run_fake(
        "claude",
        ["-p", "--output-format", "json"],
        tmp_path,
        stdin="[fake result=from-the-tag] Do it\n",
        FAKE_RESULT="from-the-environment",
    )
    payload = json.loads(proc.stdout)
    assert payload["result"] == "from-the-tag"


def test_tool_specific_knob_beats_generic(tmp_path: Path) -> None:
    env = {"FAKE_MODE": "exit", "FAKE_MODE_LLM": "success", "FAKE_RESULT": "fixed"}
    proc = run_fake("llm", ["-s", "x"], tmp_path, **env)
    assert proc.returncode == 0 and proc.stdout == "fixed\n"


def test_usage_knobs(tmp_path: Path) -> None:
    proc = run_fake(
        "claude",
        ["-p", "--output-format", "json"],
        tmp_path,
        FAKE_COST="0.5",
        FAKE_INPUT_TOKENS="7",
        FAKE_OUTPUT_TOKENS="3",
        FAKE_TURNS="4",
    )
    payload = json.loads(proc.stdout)
    assert payload["total_cost_usd"] == 0.5 and payload["num_turns"] == 4
    assert payload["usage"]["input_tokens"] == 7 and payload["usage"]["output_tokens"] == 3


def test_unknown_mode_is_a_setup_error(tmp_path: Path) -> None:
    proc = run_fake("gemini", ["-o", "json"], tmp_path, FAKE_MODE="explode")
    assert proc.returncode == 99 and "unknown FAKE_MODE" in proc.stderr


def test_claude_refuses_what_the_real_cli_refuses(tmp_path: Path) -> None:
    interactive = run_fake("claude", ["--output-format", "json"], tmp_path)
    assert interactive.returncode == 2
    assert records(tmp_path)[-1]["rejected"] is True
    stream = run_fake("claude", ["-p", "--output-format", "stream-json"], tmp_path)
    assert "requires --verbose" in stream.stderr and stream.returncode == 1
    ok = run_fake("claude", ["-p", "--output-format", "stream-json", "--verbose"], tmp_path)
    assert jsonl(ok.stdout)[-1]["result"] == EXPECTED
    # commander's variadic --allowedTools swallows a trailing positional prompt (2.1.332
    # says so), but not when written --allowedTools=Read:
    swallowed = run_fake(
        "claude", ["-p", "--allowedTools", "Read", "the prompt"], tmp_path, stdin=""
    )
    assert swallowed.returncode == 1
    assert '"the prompt" was read as a value of --allowedTools' in swallowed.stderr
    assert records(tmp_path)[-1]["parsed"]["allowed_tools"] == ["Read", "the prompt"]
    inline = run_fake("claude", ["-p", "--tools=Read", "the prompt"], tmp_path, stdin="")
    assert inline.returncode == 0
    assert records(tmp_path)[-1]["parsed"]["tools"] == ["Read"]
    assert records(tmp_path)[-1]["prompt"] == "the prompt"


def test_claude_records_the_appended_system_prompt_file(tmp_path: Path) -> None:
    (tmp_path / "sys.md").write_text("You are a security architect.")
    args = ["-p", "--append-system-prompt-file", str(tmp_path / "sys.md")]
    assert run_fake("claude", args, tmp_path).returncode == 0
    assert records(tmp_path)[-1]["system_prompt"] == "You are a security architect."
    missing = run_fake("claude", ["-p", "--append-system-prompt-file", "no.md"], tmp_path)
    assert missing.returncode == 1 and "no.md" in missing.stderr


def test_claude_text_output_is_just_the_result(tmp_path: Path) -> None:
    proc = run_fake("claude", ["-p"], tmp_path)
    assert proc.stdout == EXPECTED + "\n"


def test_codex_prompt_sources_and_git_check(tmp_path: Path) -> None:
    refused = run_fake("codex", ["exec", "-"], tmp_path)
    assert refused.returncode == 1 and "--skip-git-repo-check" in refused.stderr
    (tmp_path / ".git").mkdir()
    both = run_fake("codex", ["exec", "Summarize:"], tmp_path, stdin="data\n")
    assert both.returncode == 0
    assert records(tmp_path)[-1]["prompt"] == "Summarize:\n\n<stdin>\ndata\n\n</stdin>"
    assert both.stdout == "RESULT: Summarize:\n"
    config = run_fake(
        "codex",
        ["exec", "-c", 'developer_instructions="Be terse"', "-c", "x=raw words", "-"],
        tmp_path,
    )
    assert config.returncode == 0
    assert records(tmp_path)[-1]["config"] == {
        "developer_instructions": "Be terse",
        "x": "raw words",
    }


def test_gemini_system_md_and_prompt_sources(tmp_path: Path) -> None:
    args = ["-o", "stream-json"]
    missing = run_fake("gemini", args, tmp_path, GEMINI_SYSTEM_MD=str(tmp_path / "no.md"))
    assert missing.returncode == 1
    assert f"missing system prompt file '{tmp_path / 'no.md'}'" in missing.stderr
    (tmp_path / "sys.md").write_text("You are a security architect.")
    ok = run_fake("gemini", args, tmp_path, GEMINI_SYSTEM_MD="sys.md")
    assert ok.returncode == 0
    assert records(tmp_path)[-1]["system_md"] == "You are a security architect."
    flag = run_fake("gemini", ["-p", "Answer briefly."], tmp_path, stdin="Context\n")
    assert records(tmp_path)[-1]["prompt"] == "Context\n\n\nAnswer briefly."
    assert flag.stdout == "RESULT: Context\n"
    empty = run_fake("gemini", args, tmp_path, stdin="")
    assert empty.returncode == 42 and "No input provided via stdin" in empty.stderr


def test_opencode_agent_fallback_warnings(tmp_path: Path) -> None:
    agents = tmp_path / ".opencode" / "agent"
    agents.mkdir(parents=True)
    (agents / "primary.md").write_text("---\ndescription: p\nmode: primary\n---\nbody\n")
    (agents / "helper.md").write_text("---\ndescription: h\nmode: subagent\n---\nbody\n")
    found = run_fake("opencode", ["run", "--agent", "primary"], tmp_path, PWD=str(tmp_path))
    assert found.returncode == 0 and "Falling back" not in found.stderr
    sub = run_fake("opencode", ["run", "--agent", "helper"], tmp_path, PWD=str(tmp_path))
    assert "is a subagent" in sub.stderr
    missing = run_fake("opencode", ["run", "--agent", "ghost"], tmp_path, PWD=str(tmp_path))
    assert missing.stderr.startswith('\x1b[93m\x1b[1m! \x1b[0m agent "ghost" not found')
    inline = run_fake("opencode", ["run", "--agent", "pd-x"], tmp_path, PWD=str(tmp_path),
                      OPENCODE_CONFIG_CONTENT='{"agent": {"pd-x": {"mode": "primary"}}}')
    assert "Falling back" not in inline.stderr
    assert [r["agent_status"] for r in records(tmp_path)] == ["found", "subagent", "missing",
                                                              "found"]
    assert missing.stdout == EXPECTED + "\n"


def test_llm_prompt_is_stdin_then_argument(tmp_path: Path) -> None:
    proc = run_fake("llm", ["explain this"], tmp_path, stdin="code\n")
    assert proc.returncode == 0
    assert records(tmp_path)[-1]["prompt"] == "code\n\nexplain this"


def test_parallel_calls_record_one_line_each(tmp_path: Path) -> None:
    procs = [
        start_fake(tool, SUCCESS[tool][0], tmp_path, DISPATCH_TASK_ID=f"t{i}")
        for i, tool in enumerate(TOOLS * 3)
    ]
    for proc in procs:
        proc.communicate(timeout=20)
        assert proc.returncode == 0
    entries = records(tmp_path)
    assert sorted(e["env"]["DISPATCH_TASK_ID"] for e in entries) == sorted(
        f"t{i}" for i in range(len(procs))
    )


def test_fakes_are_executable_python_scripts() -> None:
    for tool in TOOLS:
        path = FAKE_BIN / tool
        assert os.access(path, os.X_OK), f"{path} is not executable"
        assert path.read_text().startswith("#!/usr/bin/env python3\n")
