"""Staging for outputs: agents write beside or below the output; only success promotes.

A file output is staged as a hidden sibling, `.<name>.<run>.<attempt>.partial`,
so promotion is one rename in the same directory and costs no extra folder.  A
directory output is staged in `<output_dir>/.dispatch/staging/<run>/<task>.<n>/`
and swapped in whole.  Whatever sits at an output path is therefore always a
complete, successful result.  On failure the partial output moves to
`logs/<task>.failed.out` (or `.failed/`) for debugging, and the previous
successful output, if any, stays untouched.  A failed file output is kept only
up to `KEEP_FAILED_BYTES` (cut there), and not at all when the disk holding it
is full: a runaway agent that filled the disk must not keep it full.

Staging folders left by a run that crashed are removed when the next run on the
same output dir starts (`clean_stale_staging`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .atomic import remove_path, replace_path
from .model import STAGED_NAME as _PARTIAL
from .spec import STDOUT_FILE_IN_DIR, DispatchSpec

STAGING_DIR = ".dispatch/staging"
KEEP_FAILED_BYTES = 16 * 2**20
"""The most of a failed file output kept under logs/ (its beginning)."""
LOW_SPACE_BYTES = 1 * 2**20
"""Below this much free space the disk counts as full: failed outputs are dropped."""


def open_creating_dirs(path: Path, mode: str = "wb") -> IO[bytes]:
    """Open for writing, creating parent folders only when they are missing."""
    try:
        return open(path, mode)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, mode)


@dataclass(frozen=True)
class Staging:
    """Where one attempt's output is written before it is promoted."""

    root: Path
    """This attempt's staging folder: a directory output lives in it; runners may keep
    scratch files there.  Created only when used; `clean_staging` removes it."""
    target: Path
    """What the agent sees as `{output}` / DISPATCH_OUTPUT."""
    stdout: Path
    final: Path
    failed: Path
    is_directory: bool

    def create(self, agent_writes: bool) -> None:
        """Make the folders an agent writing `{output}` itself needs."""
        if self.is_directory:
            self.target.mkdir(parents=True, exist_ok=True)
        elif agent_writes:
            self.target.parent.mkdir(parents=True, exist_ok=True)

    def open_stdout(self) -> IO[bytes]:
        return open_creating_dirs(self.stdout)

    def promote(self) -> None:
        """Make the staged output the real one, then drop the staging area."""
        if self.is_directory:
            if self.stdout.exists() and self.stdout.stat().st_size == 0:
                self.stdout.unlink()
            replace_path(self.target, self.final, durable=False)
        else:
            if not self.target.exists():
                self.target.parent.mkdir(parents=True, exist_ok=True)
                self.target.touch()
            try:
                os.replace(self.target, self.final)
            except OSError:  # e.g. a directory stands where the file goes
                replace_path(self.target, self.final, durable=False)
        if self.is_directory:
            remove_path(self.root)

    def discard(self) -> str | None:
        """Keep a failed attempt's partial output under logs/ and drop the rest.

        Returns a note for the task's error when the output was cut or dropped.
        Never raises: a failure while cleaning up must not hide the task's own.
        """
        note = None
        try:
            has_output = self.target.exists() and (
                (self.target.is_dir() and any(self.target.iterdir()))
                or (self.target.is_file() and self.target.stat().st_size > 0)
            )
            if has_output and disk_full(self.target.parent):
                note = ("its partial output was deleted, not kept under logs/: the disk "
                        "holding the output dir is full")
                has_output = False
            elif has_output and self.target.is_file():
                size = self.target.stat().st_size
                if size > KEEP_FAILED_BYTES:
                    os.truncate(self.target, KEEP_FAILED_BYTES)
                    note = (f"its partial output ({size:,} bytes) is kept under logs/ cut to "
                            f"its first {KEEP_FAILED_BYTES // 2**20} MiB")
            if has_output:
                try:
                    self.failed.parent.mkdir(parents=True, exist_ok=True)
                    replace_path(self.target, self.failed, durable=False)
                except OSError:
                    note = "its partial output could not be kept under logs/ and was deleted"
            remove_path(self.target)
            if self.is_directory:
                remove_path(self.root)
        except OSError:
            pass
        return note


def disk_full(folder: Path) -> bool:
    """Whether the file system holding `folder` is (nearly) out of space."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < LOW_SPACE_BYTES


def staging_for(spec: DispatchSpec, index: int, run_id: str, attempt: int) -> Staging:
    task = spec.tasks[index]
    out_dir = spec.settings.output_dir
    final = spec.output_path(index)
    failed = out_dir / "logs" / (f"{task.id}.failed" if task.is_directory
                                 else f"{task.id}.failed.out")
    root = out_dir / STAGING_DIR / run_id / f"{task.id}.{attempt}"
    if task.is_directory:
        target = root / final.name
        return Staging(root, target, target / STDOUT_FILE_IN_DIR, final, failed, True)
    target = final.with_name(f".{final.name}.{run_id}.{attempt}.partial")
    return Staging(root, target, target, final, failed, False)


def clean_staging(spec: DispatchSpec, run_id: str) -> None:
    """Remove a run's staging folder, and partial files any crashed run left behind."""
    base = spec.settings.output_dir / STAGING_DIR
    remove_path(base / run_id)
    for p in (base, base.parent):
        try:
            p.rmdir()
        except OSError:
            break
    for folder in {spec.output_path(i).parent for i, t in enumerate(spec.tasks)
                   if not t.is_directory}:
        try:
            with os.scandir(folder) as entries:
                stale = [e.path for e in entries if _PARTIAL.match(e.name)]
        except OSError:
            continue
        for path in stale:
            remove_path(Path(path))


def clean_stale_staging(output_dir: Path, keep: frozenset[str] = frozenset()) -> None:
    """Remove staging folders of runs that are over (crashed, or killed outright).

    The caller knows no other run is using `output_dir` (see `api.run_spec`), or
    names the runs to spare in `keep`.
    """
    base = output_dir / STAGING_DIR
    try:
        with os.scandir(base) as entries:
            stale = [Path(e.path) for e in entries if e.name not in keep]
    except OSError:
        return
    for path in stale:
        remove_path(path)
    for p in (base, base.parent):
        try:
            p.rmdir()
        except OSError:
            break


SEARCH_DEPTH = 5
"""How deep under a base folder output dirs are looked for (`dirs_holding`)."""
NOT_OUTPUT_DIRS = ("logs", "changes", ".git")
"""Folders inside an output dir that never hold another output dir."""


def dirs_holding(bases: Iterable[Path], name: str, depth: int = SEARCH_DEPTH) -> set[Path]:
    """Folders under `bases` (the bases included) holding a file `name`: the output dirs
    of runs (their state file, their live journal).  Logs, patches and our hidden folders
    are not searched, nor anything deeper than `depth` below a base."""
    found: set[Path] = set()
    for base in bases:
        if (base / name).is_file():
            found.add(base)
        if not base.is_dir():
            continue
        top = len(base.parts)
        for folder, subdirs, files in os.walk(base):
            here = Path(folder)
            if name in files:
                found.add(here)
            if len(here.parts) - top >= depth:
                subdirs[:] = []
            else:
                subdirs[:] = [d for d in subdirs if d not in NOT_OUTPUT_DIRS
                              and not d.startswith(".dispatch")]
    return found
