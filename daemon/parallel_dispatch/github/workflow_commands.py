"""GitHub Actions runner plumbing: workflow commands on stdout and the file commands.

The runner acts on a line that starts with `::` after leading whitespace
(`TryParseV2`), and on the legacy `##[name]data` *anywhere* in a line
(`TryParse`); it splits lines at `\n`, `\r` and `\r\n`, on stdout and stderr alike.
So anything untrusted is escaped (messages), fenced off with
`::stop-commands::` (logs) or made `inert` (single lines such as progress).
Escaping follows the runner's own parser (`ActionCommand.cs`): data unescapes
`%0D %0A %25`; properties additionally `%3A %2C`. `%` is escaped first so the
others are not double-escaped.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

#: The runner refuses a step summary above 1024 KiB ("upload aborted"): keep a margin.
SUMMARY_LIMIT_BYTES = 1024 * 1024 - 16 * 1024
SUMMARY_TRUNCATED_NOTE = (
    "\n\n> **Summary truncated** to stay under GitHub's 1 MiB step-summary limit.\n"
)


def escape_data(value: str) -> str:
    """Escape a command's message so newlines and `%` survive the runner's parser."""
    return value.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(value: str) -> str:
    """Escape a property value: `:` would end the command, `,` the property."""
    return escape_data(value).replace(":", "%3A").replace(",", "%2C")


def format_command(name: str, message: str = "", **properties: str | int | None) -> str:
    """Render `::name k=v,k=v::message`, dropping properties that are None or empty."""
    props = ",".join(
        f"{key}={escape_property(str(value))}"
        for key, value in properties.items()
        if value is not None and str(value) != ""
    )
    head = f"{name} {props}" if props else name
    return f"::{head}::{escape_data(message)}"


_ZWSP = "\u200b"
"""Breaks a command marker without changing how the text reads; .NET's `TrimStart`
does not count it as whitespace."""


def inert(text: str) -> str:
    """`text` as one log line the runner will not act on.

    Line breaks become ` ⏎ ` (as in progress lines), every legacy `##[` is broken
    up, and a line that would start with `::` is preceded by a zero-width space.
    """
    line = text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", " ⏎ ")
    line = line.replace("##[", f"#{_ZWSP}#[")
    return _ZWSP + line if line.lstrip().startswith("::") else line


def echo(text: str, *, out: TextIO | None = None) -> None:
    """Print a plain line that may hold untrusted text (names, paths, messages)."""
    _emit(inert(text), out)


class InertLines:
    """A write-only text stream that makes every line written to it `inert` and
    replaces `secrets` with `***`: for progress output, whose lines quote agents
    and task files.

    Only whole lines are passed on (the rest waits for its newline or `close`), so
    a marker split across two writes cannot reassemble on the runner's side.
    """

    def __init__(self, stream: TextIO, secrets: Iterable[str] = ()) -> None:
        self.stream = stream
        self.secrets = [s for s in secrets if s]
        self._pending = ""

    def _clean(self, line: str) -> str:
        for secret in self.secrets:
            line = line.replace(secret, "***")
        return inert(line)

    def write(self, text: str) -> int:
        data = self._pending + text
        *lines, self._pending = data.split("\n")
        if lines:
            self.stream.write("".join(self._clean(line) + "\n" for line in lines))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        """Pass on an unfinished last line (with a newline)."""
        if self._pending:
            self.stream.write(self._clean(self._pending) + "\n")
            self._pending = ""
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        raise OSError("InertLines has no file descriptor")


def _emit(line: str, out: TextIO | None) -> None:
    stream = out if out is not None else sys.stdout
    stream.write(line + "\n")
    stream.flush()


def error(
    message: str,
    *,
    title: str | None = None,
    file: str | None = None,
    line: int | None = None,
    col: int | None = None,
    out: TextIO | None = None,
) -> None:
    """Emit an `::error` annotation (shown on the run and the PR's checks)."""
    _emit(format_command("error", message, title=title, file=file, line=line, col=col), out)


def warning(message: str, *, title: str | None = None, out: TextIO | None = None) -> None:
    """Emit a `::warning` annotation: visible, but the step still passes."""
    _emit(format_command("warning", message, title=title), out)


def notice(message: str, *, title: str | None = None, out: TextIO | None = None) -> None:
    """Emit a `::notice` annotation."""
    _emit(format_command("notice", message, title=title), out)


def add_mask(value: str, *, out: TextIO | None = None) -> None:
    """Ask the runner to mask `value` in all later log output.

    Only emitted inside Actions (`GITHUB_ACTIONS=true`): elsewhere nothing masks
    the line, and printing it would leak the very secret it is meant to hide.
    """
    if value.strip() and os.environ.get("GITHUB_ACTIONS") == "true":
        _emit(format_command("add-mask", value), out)


@contextmanager
def group(title: str, *, out: TextIO | None = None) -> Iterator[None]:
    """Fold the lines printed inside into one collapsible log group."""
    _emit(format_command("group", title), out)
    try:
        yield
    finally:
        _emit("::endgroup::", out)


@contextmanager
def commands_stopped(*, out: TextIO | None = None) -> Iterator[None]:
    """Print untrusted text (agent logs) without the runner acting on `::` lines in it.

    The resume token is random, so the text cannot guess it and re-enable commands.
    """
    token = f"pd-{uuid.uuid4().hex}"
    _emit(f"::stop-commands::{token}", out)
    try:
        yield
    finally:
        _emit(f"::{token}::", out)


def format_output(name: str, value: str) -> str:
    """One `GITHUB_OUTPUT` entry, always in the heredoc form so any value is safe.

    The delimiter is random (as in actions/toolkit) so a value cannot end it early.
    """
    while True:
        delimiter = f"ghadelimiter_{uuid.uuid4()}"
        if delimiter not in value and delimiter not in name:
            break
    return f"{name}<<{delimiter}\n{value}\n{delimiter}\n"


def set_outputs(outputs: Mapping[str, str], path: str | os.PathLike[str] | None = None) -> bool:
    """Append step outputs to `GITHUB_OUTPUT`; False when not running under Actions."""
    target = path if path is not None else os.environ.get("GITHUB_OUTPUT")
    if not target:
        return False
    text = "".join(format_output(name, value) for name, value in outputs.items())
    with open(target, "a", encoding="utf-8", newline="\n") as fh:
        fh.write(text)
    return True


def fit_bytes(text: str, budget: int, note: str = SUMMARY_TRUNCATED_NOTE) -> str:
    """Return `text`, or its head cut at a line boundary plus `note`, within `budget` bytes."""
    data = text.encode("utf-8")
    if len(data) <= budget:
        return text
    room = max(0, budget - len(note.encode("utf-8")))
    head = data[:room].decode("utf-8", errors="ignore")
    cut = head.rfind("\n")
    if cut > 0:
        head = head[:cut]
    return (head + note) if room else ""


def summary_size(path: str | os.PathLike[str] | None = None) -> int:
    """Bytes already in `GITHUB_STEP_SUMMARY` (earlier steps of a composite share it)."""
    target = path if path is not None else os.environ.get("GITHUB_STEP_SUMMARY")
    if not target:
        return 0
    try:
        return Path(target).stat().st_size
    except FileNotFoundError:
        return 0


def append_summary(
    markdown: str,
    path: str | os.PathLike[str] | None = None,
    *,
    limit: int = SUMMARY_LIMIT_BYTES,
) -> bool:
    """Append Markdown to `GITHUB_STEP_SUMMARY`, keeping the whole file under `limit` bytes.

    Returns False when not running under Actions. The cut here is a last
    resort; callers fit the text first with `github.fit_markdown` for a
    section-aware cut.
    """
    target = path if path is not None else os.environ.get("GITHUB_STEP_SUMMARY")
    if not target:
        return False
    text = markdown if markdown.endswith("\n") else markdown + "\n"
    text = fit_bytes(text, limit - summary_size(target))
    with open(target, "a", encoding="utf-8", newline="\n") as fh:
        fh.write(text)
    return True
