"""What every coding-agent CLI preset shares: build argv, run the tool, read it, parse.

A preset (claude.py, codex.py, ...) only knows its tool: how to pass the prompt (always
stdin, so long or untrusted text never meets a shell or the argv limit), how to pass the
agent definition's system prompt and model, and how to read the result.  The staging
area, DISPATCH_* variables, the log and its header are `AttemptRunner`'s (attempt.py);
the process group that dies with the task is process.py's.  `PresetRunner` is a sibling
of `CommandRunner`, not a kind of it.

The difference from a command agent: both streams are piped and read live (`watch`),
stdout is captured to a private file and parsed, and only the *result text* is written
to the task's output.  `parse` returns a `Parsed`: an `Outcome` plus that text; cost and
token counts land in its metrics (cost_usd, input_tokens, output_tokens, turns, ...).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any, ClassVar, Literal

import trio

from ..agents import AgentSpec
from ..events import CAUSES, Activity, AgentEvent, Cause
from ..fmt import rel_path
from ..outputs import Staging, staging_for
from ..presets import PRESETS, Preset
from ..process import Exit
from .attempt import (
    AttemptRunner,
    exit_message,
    io_error_message,
    is_transient,
    log_error,
    survivors_message,
)
from .base import Job, Outcome
from .stream import LogBudget, pipe, pump

StreamName = Literal["stdout", "stderr"]

ARG_SAFE_BYTES = 100_000
"""Linux refuses one argv string over 128 KiB (MAX_ARG_STRLEN); longer system prompts take
a file or stdin instead."""
STDERR_KEEP = 64 * 1024

AUTH_PATTERNS = re.compile(
    r"invalid api key|please run /login|\b401\b|unauthori[sz]ed|not logged in|no key found|"
    r"api key is missing|authentication|auth method|permission denied.*api key",
    re.IGNORECASE)


def toml_string(text: str) -> str:
    """A TOML basic string: what codex's `-c key=value` parses (json.dumps is not quite it:
    it writes surrogate pairs and leaves DEL unescaped, both invalid TOML)."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
"""CSI, OSC and two-byte escape sequences: tools colour their messages even without a TTY."""


def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)


def jsonl(data: bytes) -> Iterator[dict[str, Any]]:
    """JSON objects, one per line; other lines (warnings, banners) are skipped."""
    for line in data.decode("utf-8", errors="replace").splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                yield obj


def json_object(data: bytes | str) -> dict[str, Any] | None:
    """The one JSON object a tool printed (whole text, else its last JSON line)."""
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    text = text.strip()
    if not text:
        return None
    try:
        obj = json.loads(text)
        return obj if isinstance(obj, dict) else None
    except ValueError:
        pass
    start = text.find("{")
    if start > 0:  # a warning line before a pretty-printed object
        try:
            obj = json.loads(text[start:])
            if isinstance(obj, dict):
                return obj
        except ValueError:
            pass
    objs = list(jsonl(text.encode()))
    return objs[-1] if objs else None


def as_dict(value: Any) -> dict[str, Any]:
    """`value` if it is a JSON object, else an empty one (agents' JSON has any shape)."""
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    """`value` if it is a JSON array, else an empty one."""
    return value if isinstance(value, list) else []


def last_line(text: str, prefix: str = "") -> str:
    """The last non-empty line (starting with `prefix`, if given) of a tool's stderr."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line and not line.startswith("=== ") and line.startswith(prefix):
            return line
    return ""


def cause_patterns(*pairs: tuple[Cause, str]) -> tuple[tuple[Cause, re.Pattern[str]], ...]:
    """(cause, regexp) pairs compiled case-insensitive; typed here so each literal is a Cause."""
    return tuple((cause, re.compile(pattern, re.IGNORECASE)) for cause, pattern in pairs)


def number(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def add(metrics: dict[str, Any], key: str, value: Any) -> None:
    """Add a reported number to a metric, ignoring anything that is not a number."""
    n = number(value)
    if n is not None:
        metrics[key] = metrics.get(key, 0) + n


@dataclass
class Parsed(Outcome):
    """What a preset made of the tool's exit code, stdout and stderr: the attempt's
    `Outcome` as far as the tool said (its error without the runner's name, no exit
    code or pid yet: `PresetRunner.attempt` adds those), and the answer to write."""

    text: str | None = None
    """The result text, written to the task's output when `ok`."""

    def outcome(self, exit_code: int | None, pid: int | None, prefix: str) -> Outcome:
        """The attempt's `Outcome` (the one place a verdict becomes one): the process's
        exit code and pid added, the error led by `prefix` (which runner), no text."""
        error = None if self.ok else f"{prefix}{self.error or 'failed'}"
        return Outcome(ok=self.ok, exit_code=exit_code, error=error, retryable=self.retryable,
                       pid=pid, metrics=self.metrics, retry_after=self.retry_after,
                       cause=self.cause)


@dataclass
class Invocation:
    argv: list[str]
    stdin: str
    env: dict[str, str] = field(default_factory=dict)
    files: dict[Path, str] = field(default_factory=dict)
    """Files to write before the tool starts (a system prompt file, say)."""


@dataclass
class Call:
    """One attempt as a preset sees it; `show` builds the argv for plans, with labels."""

    job: Job
    prompt: str
    scratch: Path
    """Private folder for capture files; lives inside the staging area."""
    show: bool = False
    state: dict[str, Any] = field(default_factory=dict)
    """What a preset's `watch` keeps between lines of this attempt (counts, last retry)."""
    _temps: list[Path] = field(default_factory=list)

    @property
    def agent(self) -> AgentSpec:
        return self.job.agent

    @property
    def system_prompt(self) -> str:
        return self.agent.system_prompt

    @property
    def body(self) -> str:
        """The system prompt as it goes into argv; a short label when only showing."""
        if self.show and self.system_prompt:
            d = self.agent.definition
            where = rel_path(d.path, self.job.spec.root) if d is not None else "config"
            return f"<system prompt: {where}>"
        return self.system_prompt

    def argv_safe(self, text: str) -> bool:
        return len(text.encode("utf-8")) <= ARG_SAFE_BYTES

    def with_system_prompt(self) -> str:
        """The prompt with the system prompt in front: the fallback when a tool has no
        other way (or the body is too long for argv)."""
        if not self.system_prompt:
            return self.prompt
        return f"{self.system_prompt}\n\n---\n\n{self.prompt}"

    def tempdir(self, runner: str) -> Path:
        """A private temp folder with a lower-case path (older gemini builds lower-case
        GEMINI_SYSTEM_MD before opening it)."""
        if self.show:
            return Path(tempfile.gettempdir()) / f"pd-{runner}-xxxx"
        path = Path(tempfile.mkdtemp(prefix=f"pd-{runner}-"))
        self._temps.append(path)
        return path

    def statedir(self, runner: str) -> Path:
        """A private folder (0700) for the tool's own state, in the scratch folder: not
        under TMPDIR, where codex sets up no sandbox helper (`bwrap: execvp
        codex-linux-sandbox` fails every shell call); removed by `cleanup`."""
        path = Path(tempfile.mkdtemp(prefix=f"{runner}-state-", dir=self.scratch))
        self._temps.append(path)
        return path

    def cleanup(self) -> None:
        for path in self._temps:
            shutil.rmtree(path, ignore_errors=True)


class PresetRunner(AttemptRunner):
    """Base of the CLI presets: subclasses set `name` (a key of presets.PRESETS, where
    its executable and model families are) and implement `build` and `parse`."""

    name: ClassVar[str] = "preset"
    docs: ClassVar[str] = ""
    """Which CLI version and documentation the preset follows."""
    install_hint: ClassVar[str] = ""
    auth_hint: ClassVar[str] = ""

    @property
    def preset(self) -> Preset:
        return PRESETS[self.name]

    # -- to implement ------------------------------------------------------------
    def build(self, call: Call) -> Invocation:
        raise NotImplementedError

    def parse(self, call: Call, code: int, stdout: bytes, stderr: str) -> Parsed:
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------
    def prefix(self, agent: AgentSpec) -> list[str]:
        """The executable (or the user's replacement, e.g. `npx -y @openai/codex`)."""
        return list(agent.command) if agent.command else [self.preset.executable or self.name]

    def auth_error(self, message: str) -> Parsed:
        return Parsed(ok=False, retryable=False,
                      error=f"bad credentials ({message.strip()}); {self.auth_hint}")

    def failure(self, message: str, code: int | None = None) -> Parsed:
        """A failure classified by its text: credentials (final), transient (retryable)."""
        message = message.strip() or (exit_message(code) if code else "failed")
        if AUTH_PATTERNS.search(message):
            return self.auth_error(message)
        suffix = f" (exit code {code})" if code else ""
        return Parsed(ok=False, error=message + suffix, retryable=True)

    def watch(self, call: Call, line: str, stream: StreamName) -> AgentEvent | None:
        """Read one line of the tool's live output; return an event when it says something
        worth showing (a retry, a tool call, a provider error).  Lines arrive as printed;
        the whole stdout is still given to `parse` at the end."""
        return None

    def provider_error(self, cause: Cause, message: str, retry_after: float | None = None,
                       retryable: bool | None = None) -> Parsed:
        """The provider could not be used: named by cause, retried only where that helps
        (never bad credentials or an exhausted quota)."""
        if retryable is None:
            retryable = cause not in ("auth", "quota", "bad_request")
        hint = f"; {self.auth_hint}" if cause == "auth" else ""
        return Parsed(ok=False, cause=cause, retryable=retryable, retry_after=retry_after,
                      error=f"{CAUSES[cause]}: {message.strip()}{hint}")

    def private_state(self, env: Mapping[str, str], folder: Path) -> dict[str, str] | None:
        """Variables that point the tool at a private copy of the user's client state,
        made in `folder` (client_state.py); None where the tool keeps its state shared."""
        return None

    def _private_state(self, call: Call, env: Mapping[str, str]) -> dict[str, str]:
        if call.agent.shared_state or \
                type(self).private_state is PresetRunner.private_state:
            return {}
        return self.private_state(env, call.statedir(self.name)) or {}

    def describe(self, job: Job) -> str:
        call = self._call(job, _staging_guess(job), show=True)
        inv = self.build(call)
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in inv.env.items())
        notes = "".join(f"; {n}" for n in job.agent.notes)
        return (f"{env + ' ' if env else ''}{shlex.join(inv.argv)}  "
                f"(prompt on stdin; runner {self.name}{notes})")

    def _call(self, job: Job, staging: Staging, show: bool = False) -> Call:
        prompt = "<prompt>" if show else self.prompt(job)
        scratch = staging.root / f"{staging.target.name}.runner"
        return Call(job=job, prompt=prompt, scratch=scratch, show=show)

    async def attempt(self, job: Job, staging: Staging) -> Outcome:
        call = self._call(job, staging)
        try:
            return await self._invoke(call, staging)
        finally:
            call.cleanup()

    async def _invoke(self, call: Call, staging: Staging) -> Outcome:
        job = call.job
        inv = self.build(call)
        env = self.env(job, staging.target)
        env.update(inv.env)
        with self.open_log(job, inv.argv) as log:
            if self.executor.local and shutil.which(inv.argv[0], path=env.get("PATH")) is None:
                return self.failed(log, f"'{inv.argv[0]}' not found on PATH (agent "
                                        f"'{job.task.agent}', {job.agent.source}); "
                                        f"{self.install_hint}", retryable=False)
            call.scratch.mkdir(parents=True, exist_ok=True)
            try:
                env.update(self._private_state(call, env))
            except OSError as exc:
                return self.failed(log, f"cannot copy {self.name}'s own state for this "
                                        f"attempt: {io_error_message(exc, job)}; or set "
                                        f"shared_state = true in [runners.{self.name}]",
                                   retryable=is_transient(exc))
            for path, text in inv.files.items():
                path.write_text(text, encoding="utf-8")
            capture = call.scratch / "stdout"
            watcher = _Watcher(self, call, job.activity or Activity())
            with open(capture, "wb") as out:
                try:
                    result = await self._spawn(inv, job, env, log, out, watcher, staging)
                except OSError as exc:
                    return self.failed(log, f"cannot start '{inv.argv[0]}': "
                                            f"{io_error_message(exc, job)}",
                                       retryable=is_transient(exc))
            if result.lost is not None:
                return self.lost(log, result)
            stdout = capture.read_bytes()
            log.write(f"=== exit code {result.returncode}\n".encode())
            if result.survivors:  # nothing may outlive its task, even unpromotable
                return self.failed(log, survivors_message(result.survivors), retryable=False,
                                   exit_code=result.returncode, pid=result.pid)
            parsed = self._verdict(call, result.returncode, stdout, watcher)
            outcome = parsed.outcome(result.returncode, result.pid, self.error_prefix)
            outcome.node = result.node
            if not outcome.ok:
                log_error(log, outcome.error or "")
                return outcome
        text = parsed.text or ""
        if text and not text.endswith("\n"):
            text += "\n"
        with staging.open_stdout() as out:
            out.write(text.encode("utf-8"))
        return outcome

    def _verdict(self, call: Call, code: int, stdout: bytes, watcher: _Watcher) -> Parsed:
        """`parse`'s verdict, unless a fatal live event (bad credentials) already gave
        one: then only the metrics are taken from `parse`."""
        if watcher.fatal is None:
            return self.parse(call, code, stdout, watcher.stderr_text())
        ev = watcher.fatal
        parsed = Parsed(ok=False, error=ev.text, cause=ev.cause, retryable=False,
                        retry_after=ev.retry_after)
        parsed.metrics = self.parse(call, code, stdout, watcher.stderr_text()).metrics
        return parsed

    async def _spawn(self, inv: Invocation, job: Job, env: dict[str, str], log: IO[bytes],
                     capture: IO[bytes], watcher: _Watcher, staging: Staging) -> Exit:
        """Run the tool with both streams piped through `pump`, so its events are seen live
        and kept in the log.  A fatal event (bad credentials) stops it at once."""
        r_out, w_out = pipe()
        r_err, w_err = pipe()
        writers = [w_out, w_err]

        def close_writers() -> None:
            while writers:
                os.close(writers.pop())

        def on_spawn(pid: int) -> None:
            close_writers()  # the child holds them now; EOF comes when its group is gone

        hooks = self.hooks(job, on_spawn)
        req = self.request(job, staging, inv.argv, env, inv.stdin.encode())
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(pump, r_out, log=log, capture=capture,
                                           on_line=watcher.stdout_line, budget=LogBudget(),
                                           on_data=watcher.activity.saw_output))
                nursery.start_soon(partial(pump, r_err, log=log, on_line=watcher.stderr_line,
                                           budget=LogBudget(),
                                           on_data=watcher.activity.saw_output))
                r_out = r_err = -1
                with trio.CancelScope() as stop:
                    watcher.stop_scope = stop
                    result = await self.executor.run(req, stdout=w_out, stderr=w_err,
                                                     **hooks)
                if stop.cancelled_caught:
                    result = Exit(-1, -1)
                close_writers()  # a remote executor wrote into them itself: EOF now
                # Every writer is dead now (the group was killed); a process that left the
                # group could still hold a pipe: do not wait for it.
                nursery.cancel_scope.deadline = trio.current_time() + PUMP_DRAIN_S
        finally:
            close_writers()
            for fd in (r_out, r_err):
                if fd >= 0:
                    os.close(fd)
        return result


PUMP_DRAIN_S = 2.0
"""How long the pumps may drain the pipes after the agent's group is gone."""


class _Watcher:
    """Hands each line to the preset's `watch` and the attempt's `Activity`; keeps the
    tail of stderr for `parse`."""

    def __init__(self, runner: PresetRunner, call: Call, activity: Activity) -> None:
        self.runner = runner
        self.call = call
        self.activity = activity
        self.fatal: AgentEvent | None = None
        self.stop_scope: trio.CancelScope | None = None
        self._stderr: list[str] = []
        self._stderr_len = 0

    def stdout_line(self, line: str) -> None:
        self._line(line, "stdout")

    def stderr_line(self, line: str) -> None:
        self._stderr.append(line)
        self._stderr_len += len(line) + 1
        while self._stderr_len > STDERR_KEEP and len(self._stderr) > 1:
            self._stderr_len -= len(self._stderr.pop(0)) + 1
        self._line(line, "stderr")

    def stderr_text(self) -> str:
        return "\n".join(self._stderr) + ("\n" if self._stderr else "")

    def _line(self, line: str, stream: StreamName) -> None:
        try:
            ev = self.runner.watch(self.call, line, stream)
        except Exception as exc:  # a parsing bug must not lose the run
            ev = AgentEvent(f"could not read an event: {exc!r}")
        if ev is None:
            return  # the chunk that held this line already counted as activity
        self.activity.event(ev)
        if ev.fatal and self.fatal is None:
            self.fatal = ev
            if self.stop_scope is not None:
                self.stop_scope.cancel()


def _staging_guess(job: Job) -> Staging:
    """Where an attempt *would* stage (for describe/plan); nothing is created."""
    return staging_for(job.spec, job.index, job.run_id, job.attempt)
