"""Shared machinery for the fake agent CLIs in `tests/fakes/bin/`.

The fakes stand in for claude, codex, gemini, opencode and llm so tests can run real
subprocesses without network, keys or cost.  Every fake:

* appends one JSON line describing the call (argv, stdin, selected env, cwd) to
  `$FAKE_RECORD`, written at start so even a hanging call is recorded;
* then behaves as `$FAKE_MODE` says (success, error, exit, hang, hang_hard).

Knobs may also be set per call from the prompt with a `[fake key=value ...]` tag,
because one dispatcher run shares one environment across many tasks.
See `tests/fakes/README.md` for the full list.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NoReturn

MODES = ("success", "error", "exit", "hang", "hang_hard")
RECORD_PREFIXES = ("DISPATCH_", "GEMINI_")
SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD")
_TAG_RE = re.compile(r"\[fake((?:\s+[A-Za-z_]+=[^\s\]]*)*)\s*\]")


def read_stdin() -> str:
    """All of stdin, or "" when stdin is a terminal or closed (never blocks on a TTY)."""
    try:
        if sys.stdin is None or sys.stdin.isatty():
            return ""
        return sys.stdin.buffer.read().decode("utf-8", errors="replace")
    except (OSError, ValueError):
        return ""


def prompt_tags(text: str) -> dict[str, str]:
    """`[fake mode=error exit_code=3]` tags in the prompt, lower-cased keys."""
    tags: dict[str, str] = {}
    for match in _TAG_RE.finditer(text):
        for pair in match.group(1).split():
            key, _, value = pair.partition("=")
            tags[key.lower()] = value
    return tags


def first_line(text: str) -> str:
    """The first non-empty line of the prompt, without fake tags: the fakes' result seed."""
    for line in _TAG_RE.sub("", text).splitlines():
        if line.strip():
            return line.strip()
    return ""


@dataclass
class Call:
    """One invocation of a fake: who it is, what it got, and the knobs in force."""

    tool: str
    argv: list[str]
    stdin: str
    tags: dict[str, str] = field(default_factory=dict)
    recorded: bool = False

    def knob(self, name: str, default: str | None = None) -> str | None:
        """Prompt tag, then FAKE_<NAME>_<TOOL>, then FAKE_<NAME>, then `default`."""
        if name in self.tags:
            return self.tags[name]
        upper = name.upper()
        for var in (f"FAKE_{upper}_{self.tool.upper()}", f"FAKE_{upper}"):
            if var in os.environ:
                return os.environ[var]
        return default

    @property
    def mode(self) -> str:
        return self.knob("mode", "success") or "success"

    def number(self, name: str, default: float) -> float:
        raw = self.knob(name)
        try:
            return float(raw) if raw not in (None, "") else default
        except ValueError:
            return default

    def integer(self, name: str, default: int) -> int:
        return int(self.number(name, default))


def selected_env() -> dict[str, str]:
    """DISPATCH_*/GEMINI_* plus names in FAKE_RECORD_ENV; secret-looking values redacted."""
    extra = {n.strip() for n in os.environ.get("FAKE_RECORD_ENV", "").split(",") if n.strip()}
    env: dict[str, str] = {}
    for name, value in os.environ.items():
        if name.startswith(RECORD_PREFIXES) or name in extra:
            secret = any(marker in name.upper() for marker in SECRET_MARKERS)
            env[name] = "<redacted>" if secret and name not in extra else value
    return env


def record(call: Call, **details: object) -> None:
    """Append one JSON line for this call to $FAKE_RECORD (one write, under a lock)."""
    call.recorded = True
    target = os.environ.get("FAKE_RECORD")
    if not target:
        return
    entry = {
        "tool": call.tool,
        "argv": call.argv,
        "stdin": call.stdin,
        "env": selected_env(),
        "cwd": os.getcwd(),
        "pid": os.getpid(),
        "mode": call.mode,
        "time": time.time(),
        **details,
    }
    data = (json.dumps(entry, sort_keys=True) + "\n").encode("utf-8")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, data)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def hang(hard: bool = False) -> NoReturn:
    """Sleep forever; `hard` also ignores SIGTERM so tests can check SIGKILL escalation."""
    if hard:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.stderr.write("working...\n")
    sys.stderr.flush()
    while True:
        time.sleep(3600)


def delay(call: Call) -> None:
    """FAKE_DELAY seconds of pretend work before answering (for timing tests)."""
    seconds = call.number("delay", 0.0)
    if seconds > 0:
        time.sleep(seconds)


def result_text(call: Call, prompt: str) -> str:
    """What the fake 'answers': FAKE_RESULT, else "RESULT: <first line of the prompt>"."""
    override = call.knob("result")
    if override is not None:
        return override
    return "RESULT: " + first_line(prompt)


def usage(call: Call) -> tuple[int, int, float]:
    """(input tokens, output tokens, cost USD), overridable so tests can check the sums."""
    return (
        call.integer("input_tokens", 1200),
        call.integer("output_tokens", 345),
        call.number("cost", 0.0123),
    )


def out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def err(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


def emit_json(payload: Mapping[str, object], *, indent: int | None = None) -> None:
    out(json.dumps(payload, indent=indent) + "\n")


def fail(message: str, code: int = 1) -> NoReturn:
    err(message.rstrip("\n") + "\n")
    sys.exit(code)


def new_id() -> str:
    return str(uuid.uuid4())


def parse_args(
    argv: list[str],
    *,
    with_value: Mapping[str, str],
    variadic: Mapping[str, str] | None = None,
    flags: Mapping[str, str] | None = None,
    pairs: Mapping[str, str] | None = None,
) -> tuple[dict[str, object], list[str]]:
    """A tiny argv parser shaped like the real CLIs' (commander/yargs/clap/click).

    Each mapping goes from spelling (`-m`, `--model`, `--model=`) to a canonical name.
    `variadic` options swallow following non-dash args, as commander's `<tools...>` does:
    that is how a positional prompt after `--allowedTools a b` gets eaten in the real
    claude, and the fake reproduces it on purpose.  Repeated options keep every value.
    """
    variadic = variadic or {}
    flags = flags or {}
    pairs = pairs or {}
    parsed: dict[str, object] = {}
    positional: list[str] = []

    def put(name: str, value: object) -> None:
        if name in parsed:
            prior = parsed[name]
            parsed[name] = [*prior, value] if isinstance(prior, list) else [prior, value]
        else:
            parsed[name] = value

    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            positional.extend(argv[i + 1 :])
            break
        spelling, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if spelling in with_value:
            if eq:
                put(with_value[spelling], inline)
            elif i + 1 < len(argv):
                i += 1
                put(with_value[spelling], argv[i])
            else:
                fail(f"error: option '{spelling}' argument missing", 2)
        elif spelling in variadic:
            values = [inline] if eq else []
            while i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                i += 1
                values.append(argv[i])
            put(variadic[spelling], values)
        elif spelling in pairs:
            if i + 2 >= len(argv):
                fail(f"error: option '{spelling}' needs two values", 2)
            put(pairs[spelling], [argv[i + 1], argv[i + 2]])
            i += 2
        elif arg in flags:
            parsed[flags[arg]] = True
        else:
            positional.append(arg)
        i += 1
    return parsed, positional


def answer_version(tool: str, version: str) -> NoReturn:
    """Answer `--version` without touching stdin; FAKE_VERSION / FAKE_VERSION_MODE shape it."""
    call = Call(tool=tool, argv=sys.argv[1:], stdin="")
    record(call, version_query=True)
    mode = call.knob("version_mode", "success")
    if mode == "hang":
        hang()
    if mode == "exit":
        fail(f"{tool}: fake install is broken (FAKE_VERSION_MODE=exit)", 127)
    out((call.knob("version") or version) + "\n")
    sys.exit(0)


def after_record(call: Call) -> None:
    """The part of every mode that is the same for all fakes: delay, then maybe hang."""
    delay(call)
    if call.mode == "hang":
        hang()
    if call.mode == "hang_hard":
        hang(hard=True)


def exit_code(call: Call, default: int) -> int:
    return call.integer("exit_code", default)


def run(
    tool: str,
    main: Callable[[Call], int],
    *,
    version: str,
    version_flags: tuple[str, ...] = ("--version",),
) -> NoReturn:
    """Entry point shared by the fakes.

    `--version` is answered before stdin is read, so a probe with an open stdin pipe
    cannot block.  Unknown modes are a loud test-setup error (exit 99).
    """
    if any(arg in version_flags for arg in sys.argv[1:]):
        answer_version(tool, version)
    stdin = read_stdin()
    call = Call(tool=tool, argv=sys.argv[1:], stdin=stdin, tags=prompt_tags(stdin))
    if call.mode not in MODES:
        fail(f"fake {tool}: unknown FAKE_MODE {call.mode!r}; use one of {', '.join(MODES)}", 99)
    try:
        code = main(call)
    except SystemExit as exc:
        # Rejected before the fake got to record (bad flags, interactive mode...):
        # still leave a trace, so a test sees what argv the runner built.
        if not call.recorded:
            record(call, rejected=True, exit_code=exc.code)
        raise
    sys.exit(code)
