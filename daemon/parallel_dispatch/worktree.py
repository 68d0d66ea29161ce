"""`isolation: worktree`: one detached git worktree per attempt, and its changes as a patch.

An isolated attempt runs in `<root>/.aiwg/worktrees/<run id>/<task id>/`, checked out
at the run's base commit (`git rev-parse HEAD` when the run starts: the user's
uncommitted changes are not in it) with the patches of the task's isolated
dependencies applied, in topological order, and committed there, so the task's own
patch (`git diff --binary --full-index` against that commit, after `git add -A`) holds
only its own changes.  The worktree is removed after every attempt; a dispatcher
killed outright leaves its run's folder behind, with an `.owner` file naming it, and
`clean_leftovers` removes it at the next run.

git runs as argv lists through `trio.run_process` with hooks and commit signing off
and the user's diff settings neutralised, so a patch reads the same on every machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from .atomic import write_text
from .config import git_toplevel
from .probe import proc_stat

WORKTREES_DIR = ".aiwg/worktrees"
OWNER_FILE = ".owner"
"""In each run's folder: `<pid> <start time>` of the dispatcher that made it."""

GIT_CONFIG = ("-c", "core.hooksPath=/dev/null", "-c", "commit.gpgsign=false",
              "-c", "diff.noprefix=false", "-c", "diff.mnemonicPrefix=false",
              "-c", "diff.relative=false", "-c", "core.quotePath=true",
              "-c", "advice.detachedHead=false")
"""Hooks would run the user's scripts on our worktrees (post-checkout, pre-commit); the
diff settings would change the patch's text."""

_GIT_ENV_DROP = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY",
                 "GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_PREFIX", "GIT_COMMON_DIR",
                 "GIT_EXTERNAL_DIFF", "GIT_DIFF_OPTS")
"""Set when the dispatcher runs from a git hook: they would point git at the user's
repository instead of a worktree; the diff ones would change a patch's text."""
IDENTITY = {"GIT_AUTHOR_NAME": "parallel-dispatch", "GIT_AUTHOR_EMAIL": "dispatch@localhost",
            "GIT_COMMITTER_NAME": "parallel-dispatch",
            "GIT_COMMITTER_EMAIL": "dispatch@localhost"}
"""For the commit of the dependencies' state: it never leaves the worktree."""


class GitError(Exception):
    """A git command failed; the message holds its stderr."""


def user_env() -> dict[str, str]:
    """The dispatcher's environment without git's location variables (`_GIT_ENV_DROP`)."""
    return {k: v for k, v in os.environ.items() if k not in _GIT_ENV_DROP}


def git_env(*, identity: bool = True) -> dict[str, str]:
    """For our own git commands: no prompts, C messages (parsed), and, unless the commit
    is the user's (the merge branch), our identity."""
    env = user_env()
    env["GIT_TERMINAL_PROMPT"] = "0"
    env["LC_ALL"] = "C"
    if identity:
        env.update(IDENTITY)
    return env


_ADMIN: trio.lowlevel.RunVar[trio.Lock] = trio.lowlevel.RunVar("worktree_admin")


def _admin_lock() -> trio.Lock:
    """One `git worktree` command at a time per run: a `prune` while another task's `add`
    is half done deletes that worktree's record under it ("failed to read .../commondir",
    seen with parallel isolated tasks)."""
    try:
        return _ADMIN.get()
    except LookupError:
        lock = trio.Lock()
        _ADMIN.set(lock)
        return lock


async def git(args: Sequence[str], cwd: Path) -> bytes:
    """Run `git <args>` in `cwd`; its stdout, or `GitError` with its stderr."""
    admin = _admin_lock() if args and args[0] == "worktree" else contextlib.nullcontext()
    async with admin:
        proc = await trio.run_process(["git", *GIT_CONFIG, *args], cwd=str(cwd), env=git_env(),
                                      stdin=b"", capture_stdout=True, capture_stderr=True,
                                      check=False)
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip() or f"exit code {proc.returncode}"
        raise GitError(f"git {args[0]}: {err}")
    return bytes(proc.stdout)


async def base_commit(root: Path) -> str:
    """The commit every isolated task starts from: HEAD of the project now."""
    try:
        out = await git(["rev-parse", "--verify", "--quiet", "HEAD^{commit}"], root)
    except GitError:
        raise GitError("isolation: worktree needs a commit to start from, and this "
                       "repository has none yet; commit once (`git commit`)") from None
    return out.decode().strip()


@dataclass(frozen=True)
class Worktree:
    path: Path
    """The worktree's top folder."""
    workdir: Path
    """Where the agent runs: the project root's place inside the worktree."""
    start: str
    """The commit the task's own changes are measured from (base + dependencies)."""


@dataclass(frozen=True)
class Changes:
    patch: bytes
    files: list[str]
    added: int
    removed: int


def run_dir(root: Path, run_id: str) -> Path:
    return root / WORKTREES_DIR / run_id


def worktree_path(root: Path, run_id: str, task_id: str) -> Path:
    return run_dir(root, run_id) / task_id


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks: with the pid, it names one process."""
    fields = proc_stat(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def _owner_alive(folder: Path) -> bool:
    try:
        pid_text, _, started = (folder / OWNER_FILE).read_text().partition(" ")
        pid = int(pid_text)
    except (OSError, ValueError):
        return False
    now = _start_time(pid)
    return now is not None and now == started.strip()


def claim_run(root: Path, run_id: str) -> Path:
    """Make the run's folder, ignored by git, and mark it as this process's."""
    top = root / WORKTREES_DIR
    top.mkdir(parents=True, exist_ok=True)
    ignore = top / ".gitignore"
    if not ignore.exists():
        write_text(ignore, "*\n", fsync=False)
    folder = run_dir(root, run_id)
    folder.mkdir(exist_ok=True)
    owner = folder / OWNER_FILE
    if not owner.exists():  # whole or absent: a half-written one would read as "gone"
        write_text(owner, f"{os.getpid()} {_start_time(os.getpid()) or ''}\n", fsync=False)
    return folder


async def create(root: Path, run_id: str, task_id: str, base: str,
                 patches: Sequence[tuple[str, Path]]) -> Worktree:
    """A fresh worktree at `base` plus the dependencies' `(id, patch)`, in that order."""
    top = git_toplevel(root)
    if top is None:
        raise GitError(f"{root} is not in a git repository")
    path = worktree_path(root, run_id, task_id)
    claim_run(root, run_id)
    if path.exists() or path.is_symlink():  # an earlier attempt that could not be removed
        await remove(root, path)
    await git(["worktree", "add", "--detach", "--quiet", str(path), base], root)
    start = base
    for dep, patch in patches:
        try:
            await git(["apply", "--binary", "--index", "--whitespace=nowarn", str(patch)], path)
        except GitError as exc:
            raise GitError(f"the changes of dependency '{dep}' ({patch}) do not apply on top "
                           f"of the base commit and the dependencies before it: {exc}; "
                           "make one depend on the other, or merge them by hand") from None
    if patches:
        await git(["commit", "--quiet", "--no-verify", "--allow-empty", "-m",
                   f"dispatch: changes of the dependencies of {task_id}"], path)
        start = (await git(["rev-parse", "HEAD"], path)).decode().strip()
    rel = root.resolve().relative_to(top)
    return Worktree(path=path, workdir=path / rel, start=start)


async def capture(tree: Worktree) -> Changes | None:
    """The attempt's changes against `tree.start`; None when it changed nothing."""
    await git(["add", "-A", "."], tree.path)
    common = ["diff", "--cached", "--no-color", "--no-ext-diff", "--no-textconv",
              "--no-renames", "--ignore-submodules=none"]
    patch = await git([*common, "--binary", "--full-index", tree.start], tree.path)
    if not patch:
        return None
    numstat = await git([*common, "--numstat", "-z", tree.start], tree.path)
    files, added, removed = read_numstat(numstat)
    return Changes(patch=patch, files=files, added=added, removed=removed)


def read_numstat(numstat: bytes) -> tuple[list[str], int, int]:
    """Files, lines added and removed from `--numstat -z` (git diff or git apply); a
    binary file counts as a file with no lines."""
    files: list[str] = []
    added = removed = 0
    for entry in numstat.split(b"\0"):
        if entry.count(b"\t") < 2:
            continue
        plus, minus, name = entry.decode("utf-8", "surrogateescape").split("\t", 2)
        files.append(name)
        added += int(plus) if plus.isdigit() else 0  # "-" for a binary file
        removed += int(minus) if minus.isdigit() else 0
    return files, added, removed


async def remove(root: Path, path: Path) -> None:
    """Remove a worktree and git's record of it, whatever state it is in; never raises."""
    if path.exists():
        with contextlib.suppress(GitError, OSError):
            await git(["worktree", "remove", "--force", "--force", str(path)], root)
    if path.exists() or path.is_symlink():
        await trio.to_thread.run_sync(_rmtree, path)
    with contextlib.suppress(GitError, OSError):
        await git(["worktree", "prune"], root)


def _rmtree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


async def finish_run(root: Path, run_id: str) -> None:
    """The run is over: remove its folder (and any worktree still in it)."""
    await _remove_run(root, run_dir(root, run_id))


async def _remove_run(root: Path, folder: Path) -> None:
    for child in sorted(folder.iterdir()) if folder.is_dir() else ():
        if child.name != OWNER_FILE:
            await remove(root, child)
    await _unlock_records(root, folder)
    await trio.to_thread.run_sync(_rmtree, folder)
    with contextlib.suppress(GitError, OSError):
        await git(["worktree", "prune"], root)


async def _unlock_records(root: Path, folder: Path) -> None:
    """git locks a worktree's record while `worktree add` runs; one killed in the middle
    stays locked, and `prune` keeps it: unlock records of worktrees under `folder`."""
    try:
        common = Path((await git(["rev-parse", "--git-common-dir"], root)).decode().strip())
    except (GitError, OSError):
        return
    records = (common if common.is_absolute() else root / common) / "worktrees"
    inside = str(folder.resolve()) + os.sep
    for record in records.glob("*") if records.is_dir() else ():
        try:
            target = (record / "gitdir").read_text().strip()
        except OSError:
            continue
        if target.startswith(inside):
            with contextlib.suppress(OSError):
                (record / "locked").unlink(missing_ok=True)


async def clean_leftovers(root: Path) -> list[Path]:
    """Remove the run folders of dispatchers that are gone (killed outright); return
    them.  A folder whose dispatcher still runs (the daemon, another CLI) stays."""
    top = root / WORKTREES_DIR
    try:
        folders = [p for p in top.iterdir() if p.is_dir() and not p.is_symlink()]
    except OSError:
        return []
    gone = [f for f in sorted(folders) if not _owner_alive(f)]
    for folder in gone:
        await _remove_run(root, folder)
    return gone
