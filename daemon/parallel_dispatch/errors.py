"""Error types shared by every front end.

A `Diagnostic` carries enough position to jump to the mistake in an editor;
`TaskFileError` carries *all* diagnostics of a file so users fix them in one go.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One problem in an input file, located as precisely as we know."""

    file: str
    line: int | None
    column: int | None
    message: str
    task_id: str | None = None

    def format(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        task = f"task '{self.task_id}': " if self.task_id else ""
        return f"{where}: error: {task}{self.message}"

    def to_json(self) -> dict[str, object]:
        return {
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "task_id": self.task_id,
            "message": self.message,
        }


class DispatchError(Exception):
    """Base class: anything the user can fix, reported without a traceback."""


class TaskFileError(DispatchError):
    """A task file (or the config it uses) is invalid; nothing was run or written."""

    def __init__(self, diagnostics: list[Diagnostic]) -> None:
        self.diagnostics = diagnostics
        super().__init__("\n".join(d.format() for d in diagnostics))


class ConfigError(TaskFileError):
    """`.aiwg/dispatch.toml` is invalid."""


class UsageError(DispatchError):
    """Bad command-line usage (exit code 2)."""
