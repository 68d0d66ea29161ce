"""The merge queue: the isolated tasks' patches joined into one result after the run.

Each succeeded `isolation: worktree` task left `changes/<id>.patch`, measured against
the run's base commit plus its dependencies' patches (runners/isolated.py).  Here they
are applied one at a time, in topological order (file order breaks ties), in a scratch
worktree at the base commit (`.aiwg/worktrees/<run id>/_merge/`), each committed as
"<task id> (<agent>)" with the user's git identity:

* a patch that does not apply (`git apply --3way` leaves conflicts) makes its task
  `conflict`, naming the files git names; so does a task that builds on the changes of
  one that was not merged (its patch assumes them).  The other merges go on, unless
  `on_failure: stop`;
* re-run: once every task was tried (and the queue was not stopped), each task whose
  patch git could not apply and that has retries left (`spec.max_attempts` minus its
  attempts) runs once more, through the isolated runner (`IsolatedRunner.rerun_at`: a
  fresh worktree at the scratch worktree's HEAD, so the merged state, dependencies
  included), under its own `timeout` as a cancel scope, one at a time in merge order so
  each starts from what the ones before it merged.  Its prompt ends with
  `conflict_note` (files, git's message; `#` comments for `inputs: none` agents, whose
  prompt is a script).  Its new patch goes through `_merge_one` like any: merged, the
  task is `succeeded` with the reason `RERUN_NOTE`; a second conflict, a failure or a
  timeout leave it `conflict`.  `summary["reruns"]` (only when one ran) lists them.  Not
  re-run: tasks that only build on an unmerged one (their patch assumes its old
  changes), verify failures, `apply`'s conflicts with the user's own edits.  The
  re-run's cost joins the task's metrics but is not checked against `max_cost_usd`, and
  it has no `idle_timeout` (the scheduler's, not used here);
* `verify`, if set, runs after each commit in the scratch worktree (its own process
  group, killed on timeout); a failure resets that commit away and makes the task
  `merge_failed`, its output appended to the task's log;
* `branch`: the branch `dispatch/<name>/<run id>` is created at the last commit.  The
  user's working tree, index and HEAD are never touched;
* `apply`: each commit's diff (what the task changed, conflicts already resolved against
  the tasks before it) is applied to the user's working tree, after `git apply --check`
  says it applies, so a patch that does not leaves the tree as it was.  Only the working
  tree: `--3way` would stage into the user's index, and `--check --3way` exits 0 on a
  patch that then conflicts (git 2.39), so it cannot say beforehand.

Cancellation: `merge_changes` may be cancelled (Ctrl-C, SIGTERM): a running verify's
group is killed, no further task is merged, the scratch worktree is removed (shielded)
and the tasks not merged keep `succeeded`; with `apply`, nothing reaches the user's tree
unless the loop finished.  git's own hooks and commit signing are off (worktree.py's
`GIT_CONFIG`): they could run the user's scripts or wait for a passphrase.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import trio

from . import pricing, worktree
from .config import git_toplevel
from .process import run_in_group
from .progress import Progress
from .result import RunResult, TaskRecord, TaskStatus
from .runners.base import Job, Outcome

MERGE_DIR = "_merge"
"""The scratch worktree's folder in the run's worktree folder (task ids cannot start
with `_`, so no task's worktree has this name)."""
FALLBACK_NAME = "parallel-dispatch"
FALLBACK_EMAIL = "parallel-dispatch@localhost"
"""The commits' author and committer when the user's git config names none."""
VERIFY_TAIL_LINES = 20
VERIFY_TAIL_BYTES = 64 * 1024

_CONFLICT_PATTERNS = (
    re.compile(r"^U (.+)$"),
    re.compile(r"^Applied patch to '(.+)' with conflicts\.$"),
    re.compile(r"^error: patch failed: (.+):\d+$"),
    re.compile(r"^error: (.+): (?:does not exist in index|already exists in (?:index|"
               r"working directory)|patch does not apply|does not match index|"
               r"No such file or directory|wrong type)$"),
    re.compile(r"^error: (.+): does not exist in working tree$"),
)
"""The lines in which `git apply` (LC_ALL=C) names a file it could not apply."""

RERUN_NOTE = "re-run after a merge conflict"
GIT_MESSAGE_LINES = 12
"""Lines of git's own message quoted in a re-run's prompt."""


class Rerunner(Protocol):
    """What re-runs a conflicting task: `IsolatedRunner` (runners/isolated.py)."""

    changes: dict[str, dict[str, Any]]

    async def rerun_at(self, job: Job, start: str) -> Outcome: ...


def branch_name(name: str, run_id: str) -> str:
    """`dispatch/<name>/<run id>`, the name cut down to what git accepts in a ref."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name)
    safe = re.sub(r"\.{2,}", ".", safe)
    safe = re.sub(r"-{2,}", "-", safe).strip(".-")
    while safe.endswith(".lock"):
        safe = safe.removesuffix(".lock").rstrip(".-")
    return f"dispatch/{safe or 'dispatch'}/{run_id}"


def conflicting_files(output: str) -> list[str]:
    """The files `git apply` names as not applying, in its order, once each."""
    found: list[str] = []
    for line in output.splitlines():
        for pattern in _CONFLICT_PATTERNS:
            m = pattern.match(line.strip())
            if m and m.group(1) not in found:
                found.append(m.group(1))
                break
    return found


@dataclass
class _Pick:
    rec: TaskRecord
    patch: Path
    ancestors: set[str]
    """Ids of every task it depends on, directly or not: its patch assumes their changes."""


@dataclass
class _Queue:
    result: RunResult
    progress: Progress
    top: Path
    """The user's working tree (the git top folder around the project root)."""
    scratch: Path
    identity: list[str]
    summary: dict[str, Any]
    unmerged: set[str] = field(default_factory=set)
    commits: list[tuple[TaskRecord, str]] = field(default_factory=list)
    """(task, commit in the scratch worktree), in merge order."""
    clashes: dict[str, tuple[list[str], str]] = field(default_factory=dict)
    """Task id → (files, git's message) for each patch git could not apply: the tasks a
    re-run may help (not those that only build on an unmerged task)."""


def _picks(result: RunResult) -> list[_Pick]:
    """Succeeded isolated tasks with a patch, in topological order (file order on ties)."""
    spec = result.spec
    graph = spec.graph
    out = []
    for i in graph.order:
        rec = result.records[i]
        patch = (rec.changes or {}).get("patch")
        if rec.status not in (TaskStatus.SUCCEEDED, TaskStatus.CACHED) or not patch:
            continue
        path = spec.settings.output_dir / patch
        if not path.is_file():
            continue
        out.append(_Pick(rec, path, {graph.ids[d] for d in graph.ancestors(i)}))
    return out


async def merge_changes(result: RunResult, progress: Progress,
                        rerunner: Rerunner | None = None) -> None:
    """Merge the run's isolated changes as `settings.merge` says; record it in
    `result.merge` and in the statuses of the tasks that could not be merged.  With a
    `rerunner`, a conflicting task with retries left is re-run once on the merged state."""
    spec = result.spec
    mode = spec.settings.merge
    if mode == "none" or result.dry_run:
        return
    verify = spec.settings.verify
    summary: dict[str, Any] = {
        "mode": mode, "base": result.base_commit, "branch": None, "commits": [],
        "conflicts": [], "unchanged": [],
        "verify": None if verify is None else {
            "command": {"shell": verify} if isinstance(verify, str) else list(verify),
            "timeout_ms": spec.settings.verify_timeout, "failed": []},
    }
    if mode == "apply":
        summary["applied"] = []
    result.merge = summary
    picks = _picks(result)
    if not picks:
        return
    if result.interrupted:
        summary["stopped"] = "the run was interrupted: nothing was merged"
        return
    top = git_toplevel(spec.root)
    if result.base_commit is None or top is None:
        summary["stopped"] = "no base commit: the project is not in a git repository"
        result.notes.append(f"merge: {mode} found no git repository; nothing was merged.")
        return
    scratch = worktree.run_dir(spec.root, result.run_id) / MERGE_DIR
    try:
        worktree.claim_run(spec.root, result.run_id)
        if scratch.exists() or scratch.is_symlink():
            await worktree.remove(spec.root, scratch)
        await worktree.git(["worktree", "add", "--detach", "--quiet", str(scratch),
                            result.base_commit], spec.root)
        queue = _Queue(result, progress, top, scratch, await _identity(spec.root), summary)
        await _merge_all(queue, picks)
        if rerunner is not None and "stopped" not in summary:
            await _rerun_conflicts(queue, picks, rerunner)
        if mode == "branch":
            await _make_branch(queue)
        elif not result.interrupted:
            await _apply_to_tree(queue)
    except (worktree.GitError, OSError) as exc:
        summary["stopped"] = f"the merge stopped: {exc}"
        result.notes.append(f"merge: {mode} stopped: {exc}")
    finally:
        with trio.CancelScope(shield=True):
            await worktree.remove(spec.root, scratch)
    if result.interrupted and "stopped" not in summary:
        summary["stopped"] = "the run was interrupted while merging"


async def _merge_all(queue: _Queue, picks: Sequence[_Pick]) -> None:
    stop = queue.result.spec.settings.on_failure == "stop"
    for n, pick in enumerate(picks):
        if queue.result.interrupted:
            return
        await _merge_one(queue, pick)
        if stop and pick.rec.status != TaskStatus.SUCCEEDED and n + 1 < len(picks):
            left = ", ".join(p.rec.id for p in picks[n + 1:])
            queue.summary["stopped"] = (f"on_failure: stop: '{pick.rec.id}' was not merged, "
                                        f"so {left} were not tried")
            return


async def _merge_one(queue: _Queue, pick: _Pick) -> None:
    rec = pick.rec
    missing = sorted(pick.ancestors & queue.unmerged)
    if missing:
        _conflict(queue, rec, [], "not merged: it builds on the changes of "
                  f"{', '.join(repr(m) for m in missing)}, which were not merged")
        return
    code, out = await _git(["apply", "--index", "--binary", "--3way", "--whitespace=nowarn",
                            str(pick.patch)], queue.scratch)
    if code != 0:
        files = conflicting_files(out)
        await _git(["reset", "--quiet", "--hard", "HEAD"], queue.scratch)
        await _git(["clean", "-fdq"], queue.scratch)
        shown = ", ".join(files) if files else _last_line(out)
        queue.clashes[rec.id] = (files, out)
        _conflict(queue, rec, files, f"merge conflict in {shown}: its changes do not apply "
                  "on top of the tasks merged before it; its patch is kept in "
                  f"{pick.patch}")
        return
    if (await _git(["diff", "--cached", "--quiet"], queue.scratch))[0] == 0:
        queue.summary["unchanged"].append(rec.id)
        queue.progress.task_merged(rec, "had nothing left to merge (the tasks before it "
                                   "made the same changes)")
        return
    message = (f"{rec.id} ({rec.agent})\n\nparallel-dispatch run {queue.result.run_id}, "
               f"task file {queue.result.spec.display}\n")
    await _checked(queue, ["commit", "--quiet", "--no-verify", "-m", message], queue.identity)
    sha = (await _checked(queue, ["rev-parse", "HEAD"])).decode().strip()
    if queue.result.spec.settings.verify is not None and not await _verify(queue, rec):
        await _checked(queue, ["reset", "--quiet", "--hard", "HEAD~1"])
        queue.unmerged.add(rec.id)
        return
    queue.commits.append((rec, sha))
    if queue.summary["mode"] == "branch":
        queue.summary["commits"].append({"task": rec.id, "agent": rec.agent, "sha": sha})
        queue.progress.task_merged(rec, f"merged as {sha[:12]}")


def _conflict(queue: _Queue, rec: TaskRecord, files: list[str], reason: str) -> None:
    rec.status = TaskStatus.CONFLICT
    rec.reason = reason
    queue.unmerged.add(rec.id)
    queue.summary["conflicts"].append({"task": rec.id, "files": files, "reason": reason})
    queue.progress.task_merged(rec, reason)


async def _rerun_conflicts(queue: _Queue, picks: Sequence[_Pick], rerunner: Rerunner) -> None:
    """Each task git could not apply, with retries left, once more on the merged state, in
    merge order and one at a time: each re-run starts from what the ones before it merged."""
    spec = queue.result.spec
    for pick in picks:
        rec = pick.rec
        if queue.result.interrupted:
            return
        if (rec.status == TaskStatus.CONFLICT and rec.id in queue.clashes
                and rec.attempts - rec.quota_waits < spec.max_attempts(rec.index)):
            await _rerun_one(queue, pick, rerunner)


async def _rerun_one(queue: _Queue, pick: _Pick, rerunner: Rerunner) -> None:
    """Run the task in a fresh worktree at the scratch worktree's HEAD with the conflict
    in its prompt, under its own timeout; merge its new patch like any other."""
    rec, spec = pick.rec, queue.result.spec
    i = rec.index
    files, message = queue.clashes.pop(rec.id)
    head = (await _checked(queue, ["rev-parse", "HEAD"])).decode().strip()
    task = spec.tasks[i]
    note = conflict_note(files, message, as_comment=spec.inputs_mode(i) == "none")
    prompt = task.prompt.rstrip("\n") + "\n\n" + note
    respec = dataclasses.replace(spec, tasks=(
        *spec.tasks[:i], task.model_copy(update={"prompt": prompt}), *spec.tasks[i + 1:]))
    rec.attempts += 1
    queue.progress.task_merged(rec, f"is re-run on top of the merged changes (attempt "
                               f"{rec.attempts})")
    job = Job(respec, i, rec.attempts, queue.result.run_id)
    _log_line(rec, f"=== {RERUN_NOTE} in {', '.join(files) or 'its patch'}: attempt "
                   f"{rec.attempts}, on top of the merged changes at {head[:12]} ===\n")
    timeout_s = spec.timeout_s(i)
    outcome: Outcome | None = None
    started = trio.current_time()
    with trio.move_on_after(timeout_s):
        try:
            outcome = await rerunner.rerun_at(job, head)
        except Exception as exc:  # a runner bug must not take the merge down
            outcome = Outcome(ok=False, error=f"runner error: {exc!r}", retryable=False)
    rec.busy_s += trio.current_time() - started
    if outcome is not None:
        pricing.add_attempt(rec.metrics, outcome.metrics)  # as a retry's (scheduler.py)
    entry = next(c for c in queue.summary["conflicts"] if c["task"] == rec.id)
    rerun: dict[str, Any] = {"task": rec.id, "attempt": rec.attempts, "files": files,
                             "start": head}
    queue.summary.setdefault("reruns", []).append(rerun)
    if outcome is None or not outcome.ok:
        why = (f"timed out after {timeout_s:g}s" if outcome is None
               else f"failed: {outcome.error or 'exit code ' + str(outcome.exit_code)}")
        rerun["result"] = "timeout" if outcome is None else "failed"
        rec.reason = entry["reason"] = f"{rec.reason}; its {RERUN_NOTE} {why}"
        queue.progress.task_merged(rec, f"stays a conflict: its re-run {why}")
        return
    queue.summary["conflicts"].remove(entry)
    queue.unmerged.discard(rec.id)
    rec.changes = rerunner.changes.get(rec.id)
    rec.status, rec.reason, rec.error = TaskStatus.SUCCEEDED, None, None
    patch = (rec.changes or {}).get("patch")
    if not patch:
        queue.summary["unchanged"].append(rec.id)
        rec.reason = f"{RERUN_NOTE}; it changed nothing on top of the merged changes"
        rerun["result"] = "unchanged"
        queue.progress.task_merged(rec, rec.reason)
        return
    await _merge_one(queue, dataclasses.replace(pick, patch=spec.settings.output_dir / patch))
    rerun["result"] = ("unchanged" if rec.id in queue.summary["unchanged"]
                       else {TaskStatus.SUCCEEDED: "merged", TaskStatus.CONFLICT: "conflict"}
                       .get(rec.status, str(rec.status)))
    if rec.status == TaskStatus.SUCCEEDED:
        rec.reason = RERUN_NOTE
    elif rec.status == TaskStatus.CONFLICT:
        again = queue.summary["conflicts"][-1]
        rec.reason = again["reason"] = f"{RERUN_NOTE}, and it conflicted again: {rec.reason}"


def conflict_note(files: Sequence[str], message: str, *, as_comment: bool = False) -> str:
    """The section a re-run's prompt ends with; `as_comment` (agents with `inputs: none`,
    such as `shell`, whose prompt is a script) makes each line a `#` comment."""
    named = ", ".join(files) if files else "(git named no file)"
    quoted = [line for line in message.splitlines() if line.strip()][:GIT_MESSAGE_LINES]
    lines = ["---", "", "## Merge conflict", "",
             "Your previous changes did not apply on top of the other tasks' merged "
             f"changes: conflicting files: {named}.", "", "git said:", "",
             *(f"    {line}" for line in quoted), "",
             "Redo your change on top of the current files."]
    if as_comment:
        lines = [f"# {line}".rstrip() for line in lines]
    return "\n".join(lines) + "\n"


def _log_line(rec: TaskRecord, text: str) -> None:
    log = rec.log_path
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        fh.write(text.encode())


async def _verify(queue: _Queue, rec: TaskRecord) -> bool:
    """Run `verify` in the scratch worktree; False (the task marked) when it fails."""
    spec = queue.result.spec
    verify = spec.settings.verify
    assert verify is not None
    argv = ["/bin/sh", "-c", verify] if isinstance(verify, str) else list(verify)
    workdir = queue.scratch / spec.root.resolve().relative_to(queue.top.resolve())
    env = worktree.user_env()  # verify runs in the scratch worktree, not the user's repo
    env.update({"DISPATCH_RUN_ID": queue.result.run_id, "DISPATCH_TASK_ID": rec.id,
                "DISPATCH_PROJECT": str(spec.root)})
    log = rec.log_path
    log.parent.mkdir(parents=True, exist_ok=True)
    timeout_s = spec.settings.verify_timeout / 1000
    with open(log, "ab") as fh:
        fh.write(f"=== merge verify after {rec.id}: {' '.join(argv)} ===\n".encode())
        fh.flush()
        start = fh.tell()
        code: int | None = None
        try:
            with trio.move_on_after(timeout_s):
                code = (await run_in_group(argv, cwd=str(workdir), env=env, stdin=b"",
                                           stdout=fh, stderr=fh)).returncode
        except OSError as exc:  # not found, not executable
            fh.write(f"cannot run verify: {exc.strerror or exc}\n".encode())
            code = 127
    if code == 0:
        return True
    tail = _tail(log, start)
    why = (f"verify timed out after {timeout_s:g}s" if code is None
           else f"verify failed (exit code {code})")
    rec.status = TaskStatus.MERGE_FAILED
    rec.reason = f"{why} after merging it; the merge was reverted" + (
        f": {tail[-1]}" if tail else "")
    failed = {"task": rec.id, "exit_code": code, "timed_out": code is None, "tail": tail}
    queue.summary["verify"]["failed"].append(failed)
    queue.progress.task_merged(rec, rec.reason)
    return False


async def _make_branch(queue: _Queue) -> None:
    if not queue.commits:
        return
    name = branch_name(queue.result.spec.name, queue.result.run_id)
    await _checked(queue, ["branch", name, queue.commits[-1][1]])
    queue.summary["branch"] = name


async def _apply_to_tree(queue: _Queue) -> None:
    """Each merged task's diff onto the user's working tree, checked first."""
    for rec, sha in queue.commits:
        missing = sorted(a for a in _ancestor_ids(queue, rec) if a in queue.unmerged)
        if missing:
            _conflict(queue, rec, [], "not applied: it builds on the changes of "
                      f"{', '.join(repr(m) for m in missing)}, which were not applied")
            continue
        diff = await _checked(queue, ["diff", "--binary", "--full-index", "--no-color",
                                      "--no-ext-diff", "--no-textconv", f"{sha}~1", sha])
        code, out = await _git(["apply", "--check", "--binary", "--whitespace=nowarn", "-"],
                               queue.top, stdin=diff)
        if code == 0:
            code, out = await _git(["apply", "--binary", "--whitespace=nowarn", "-"],
                                   queue.top, stdin=diff)
        if code != 0:
            files = conflicting_files(out)
            shown = ", ".join(files) if files else _last_line(out)
            _conflict(queue, rec, files, f"conflict with the working tree in {shown}: its "
                      "changes were not applied (the tree is as it was for them)")
            continue
        queue.summary["applied"].append(rec.id)
        queue.progress.task_merged(rec, "applied to the working tree")


def _ancestor_ids(queue: _Queue, rec: TaskRecord) -> set[str]:
    graph = queue.result.spec.graph
    seen: set[int] = set()
    stack = list(graph.deps[rec.index])
    while stack:
        d = stack.pop()
        if d not in seen:
            seen.add(d)
            stack.extend(graph.deps[d])
    return {graph.ids[d] for d in seen}


async def _identity(root: Path) -> list[str]:
    """`-c` flags for what the user's git config does not say (user.name, user.email)."""
    flags: list[str] = []
    for key, fallback in (("user.name", FALLBACK_NAME), ("user.email", FALLBACK_EMAIL)):
        code, out = await _git(["config", "--get", key], root)
        if code != 0 or not out.strip():
            flags += ["-c", f"{key}={fallback}"]
    return flags


async def _git(args: Sequence[str], cwd: Path, *, stdin: bytes = b"",
               flags: Sequence[str] = ()) -> tuple[int, str]:
    """`git <args>`: (exit code, stdout and stderr), never raising for a failure."""
    proc = await trio.run_process(["git", *worktree.GIT_CONFIG, *flags, *args], cwd=str(cwd),
                                  env=worktree.git_env(identity=False), stdin=stdin,
                                  capture_stdout=True, capture_stderr=True, check=False)
    text = (proc.stdout + proc.stderr).decode("utf-8", "surrogateescape")
    return proc.returncode, text


async def _checked(queue: _Queue, args: Sequence[str], flags: Sequence[str] = ()) -> bytes:
    """`git <args>` in the scratch worktree; a failure ends the merge (`GitError`)."""
    proc = await trio.run_process(["git", *worktree.GIT_CONFIG, *flags, *args],
                                  cwd=str(queue.scratch), env=worktree.git_env(identity=False),
                                  stdin=b"", capture_stdout=True, capture_stderr=True,
                                  check=False)
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip() or f"exit code {proc.returncode}"
        raise worktree.GitError(f"git {args[0]}: {err}")
    return bytes(proc.stdout)


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "git apply failed"


def _tail(path: Path, start: int) -> list[str]:
    """The last lines written to `path` since `start` (verify's output)."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(start, size - VERIFY_TAIL_BYTES))
            data = fh.read()
    except OSError:
        return []
    lines = data.decode("utf-8", "replace").splitlines()
    return [line for line in lines if line.strip()][-VERIFY_TAIL_LINES:]
