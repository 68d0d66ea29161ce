"""Staging areas for outputs: agents write there; only success promotes.

Each attempt writes into `<output_dir>/.dispatch/staging/<run>/<task>.<attempt>/`.
On success the staged file (or directory) is renamed over the final output, so
whatever sits at an output path is always a complete, successful result.  On
failure the partial output moves to `logs/<task>.failed.out` (or `.failed/`)
for debugging, and the previous successful output, if any, stays untouched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .atomic import fsync_dir, remove_path, replace_path
from .spec import STDOUT_FILE_IN_DIR, DispatchSpec

STAGING_DIR = ".dispatch/staging"


@dataclass(frozen=True)
class Staging:
    """Where one attempt's output is written before it is promoted."""

    root: Path
    target: Path
    """What the agent sees as `{output}` / DISPATCH_OUTPUT."""
    stdout: Path
    final: Path
    failed: Path
    is_directory: bool

    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if self.is_directory:
            self.target.mkdir(parents=True, exist_ok=True)

    def promote(self) -> None:
        """Make the staged output the real one, then drop the staging area."""
        if self.is_directory:
            if self.stdout.exists() and self.stdout.stat().st_size == 0:
                self.stdout.unlink()
        elif not self.target.exists():
            self.target.touch()
        if self.target.is_file():
            with open(self.target, "rb") as fh:
                os.fsync(fh.fileno())
        replace_path(self.target, self.final)
        remove_path(self.root)

    def discard(self) -> None:
        """Keep a failed attempt's partial output under logs/ and drop the rest."""
        has_output = self.target.exists() and (
            (self.target.is_dir() and any(self.target.iterdir()))
            or (self.target.is_file() and self.target.stat().st_size > 0)
        )
        if has_output:
            self.failed.parent.mkdir(parents=True, exist_ok=True)
            replace_path(self.target, self.failed)
        remove_path(self.root)
        fsync_dir(self.root.parent)


def staging_for(spec: DispatchSpec, index: int, run_id: str, attempt: int) -> Staging:
    task = spec.tasks[index]
    out_dir = spec.settings.output_dir
    root = out_dir / STAGING_DIR / run_id / f"{task.id}.{attempt}"
    name = spec.output_path(index).name
    target = root / name
    is_dir = task.is_directory
    return Staging(
        root=root,
        target=target,
        stdout=target / STDOUT_FILE_IN_DIR if is_dir else target,
        final=spec.output_path(index),
        failed=out_dir / "logs" / (f"{task.id}.failed" if is_dir else f"{task.id}.failed.out"),
        is_directory=is_dir,
    )


def clean_staging(spec: DispatchSpec, run_id: str) -> None:
    """Remove this run's staging area (after cancellation, say)."""
    base = spec.settings.output_dir / STAGING_DIR
    remove_path(base / run_id)
    for p in (base, base.parent):
        try:
            p.rmdir()
        except OSError:
            break
