"""The worker's half of a remote attempt: prepare the workspace, run the shepherd, stream.

`attempt` runs inside a Ray worker (ray_executor.py wraps it in a streaming task) and
imports nothing of Ray, so it is tested like any generator.  It yields:

* `("out", bytes)` / `("err", bytes)`: the agent's output, in chunks, as it comes;
* `("exit", {...})` last: the exit code (or a spawn error, or why it was stopped), what
  the agent wrote into the folders it returns (a tar, `working_dir` mode), and the
  changes to its worktree (a patch, `working_dir` mode).

The agent never runs as the worker's child: `shepherd.py` does, detached, and kills it
when the worker's `life` pipe closes.  The worker waits in short `select` slices, so
Ray's cancel (a KeyboardInterrupt between bytecodes) reaches it within 0.1 s; its
`finally` closes `life` and waits for the shepherd to confirm the group is dead.

Workspaces: `shared` runs at the driver's paths; a path maps the driver's project root
there; `working_dir` copies the node's copy of the uploaded project (Ray's `working_dir`,
one shared, writable folder per node: never run in it) into a private scratch folder
per attempt, unpacks what the driver sent (dependency outputs, the staging folder, the
worktree's files) and rewrites the driver's paths in argv, environment and prompt.
"""

from __future__ import annotations

import io
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

CHUNK = 256 * 1024
"""Largest piece of output sent back at once."""
POLL_S = 0.1
"""How often the worker looks up from its pipes (a cancel is seen within this)."""
DEADLINE_MARGIN_S = 30.0
"""Added to the attempt's timeout and grace for the shepherd's own deadline: the driver's
cancel comes first; this backstop only acts when the driver is gone."""
DRAIN_S = 2.0
"""How long output may still arrive after the shepherd said the agent is gone."""
TREE = "tree"
"""Archive name of an isolated task's worktree files."""


# -- the driver's side: what goes out, what comes back ------------------------------
def pack(paths: Sequence[str], tree: str | None = None) -> bytes:
    """A tar of `paths` (arcname = position) and of `tree` without its `.git`; symlinks
    stay links.  Missing paths are left out (a dependency without output)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i, path in enumerate(paths):
            if os.path.lexists(path):
                tar.add(path, arcname=str(i))
        if tree is not None:
            tar.add(tree, arcname=TREE, filter=_no_git)
    return buf.getvalue()


def _no_git(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    parts = info.name.split("/")
    return None if len(parts) > 1 and parts[1] == ".git" else info


def unpack_returns(blob: bytes, paths: Sequence[str]) -> None:
    """Put what the worker returned into `paths` (the same order it was asked for).
    Only files and folders come back, and the `data` filter refuses anything that would
    land outside its folder: a worker cannot write elsewhere on the driver."""
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as tar:
        for i, path in enumerate(paths):
            members = [m for m in tar.getmembers()
                       if m.name == str(i) or m.name.startswith(f"{i}/")]
            for m in members:
                m.name = m.name[len(str(i)):].lstrip("/") or "."
            Path(path).mkdir(parents=True, exist_ok=True)
            tar.extractall(path, members=[m for m in members if m.name != "."],
                           filter="data")


# -- path mapping -------------------------------------------------------------------
class PathMap:
    """Rewrites the driver's paths into the node's: longest prefix first, whole path
    components only (`/p` never matches inside `/pq`)."""

    def __init__(self, pairs: Mapping[str, str]) -> None:
        self.pairs = {k.rstrip("/") or "/": v.rstrip("/") or "/" for k, v in pairs.items()
                      if k.rstrip("/") != v.rstrip("/")}
        keys = sorted(self.pairs, key=len, reverse=True)
        self._re = re.compile("|".join(re.escape(k) + r"(?=/|$|[^\w.@+-])" for k in keys)) \
            if keys else None

    def __call__(self, text: str) -> str:
        if self._re is None:
            return text
        return self._re.sub(lambda m: self.pairs[m.group(0)], text)


def _node_path(base: str | None, root: str) -> PathMap:
    return PathMap({root: base} if base else {})


# -- the worker's side ----------------------------------------------------------------
def attempt(req: Mapping[str, Any], blob: bytes | None, workspace: str,
            scratch_root: str | None = None) -> Iterator[tuple[str, Any]]:
    """Run one attempt on this node (see the module docstring for what it yields)."""
    scratch = None
    try:
        if workspace == "working_dir":
            scratch = tempfile.mkdtemp(prefix=f"pd-{_safe(req.get('label', ''))}-",
                                       dir=scratch_root)
            paths, tree = _prepare_copy(req, blob, Path(scratch))
        else:
            paths, tree = _node_path(None if workspace == "shared" else workspace,
                                     req["root"]), None
        shepherd_req = {
            "argv": [paths(a) for a in req["argv"]],
            "cwd": paths(req["cwd"]),
            "env": {k: paths(v) for k, v in req["env"].items()},
            "stdin": paths(req["stdin"].decode("latin-1")) if paths.pairs else
            req["stdin"].decode("latin-1"),
            "grace": req["grace"],
            "backstop_s": None if req.get("deadline_s") is None else
            float(req["deadline_s"]) + float(req["grace"]) + DEADLINE_MARGIN_S,
        }
        status = yield from _run_shepherd(shepherd_req, float(req["grace"]))
        if scratch is not None and "spawn_error" not in status:
            status["returns"] = pack([paths(p) for p in req["returns"]]) \
                if req["returns"] else None
            status["returns"] = _strip_links(status["returns"])
            if tree is not None:
                status["patch"] = _tree_patch(tree)
        yield ("exit", status)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _safe(label: str) -> str:
    return re.sub(r"[^\w.-]", "_", label)[:40]


def _prepare_copy(req: Mapping[str, Any], blob: bytes | None,
                  scratch: Path) -> tuple[PathMap, Path | None]:
    """The private copy of the project for `working_dir` mode, and the path map to it."""
    project = scratch / "p"
    shutil.copytree(os.getcwd(), project, symlinks=True)  # Ray's per-node copy is cwd
    pairs = {req["root"]: str(project)}
    for i, p in enumerate(req["sends"]):
        pairs.setdefault(p, str(scratch / f"s{i}"))
    tree = None
    if req.get("tree"):
        tree = scratch / "t"
        pairs[req["tree"]] = str(tree)
    paths = PathMap(pairs)
    if blob:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as tar:
            members = tar.getmembers()
            for m in members:  # "3/x" -> "s3/x", "tree/x" -> "t/x"
                head, sep, rest = m.name.partition("/")
                m.name = ("t" if head == TREE else f"s{int(head)}") + sep + rest
            tar.extractall(scratch, members=members, filter="tar")
    for p in req["returns"]:
        Path(paths(p)).mkdir(parents=True, exist_ok=True)
    if tree is not None:
        tree.mkdir(parents=True, exist_ok=True)
        _git(tree, "init", "-q")
        _git(tree, "add", "-A", ".")
        _git(tree, "commit", "-q", "--allow-empty", "-m", "start")
    return paths, tree


def _git(cwd: Path, *args: str) -> bytes:
    from .worktree import GIT_CONFIG, git_env

    proc = subprocess.run(["git", *GIT_CONFIG, *args], cwd=cwd, env=git_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"git {args[0]} in the node's copy of the worktree: "
                           f"{proc.stderr.decode('utf-8', 'replace').strip()}")
    return proc.stdout


def _tree_patch(tree: Path) -> bytes:
    """The agent's changes to its worktree copy, as the driver applies them."""
    _git(tree, "add", "-A", ".")
    return _git(tree, "diff", "--cached", "--binary", "--full-index", "--no-color",
                "--no-ext-diff", "--no-renames", "HEAD")


def _strip_links(blob: bytes | None) -> bytes | None:
    """Only files and folders go back to the driver (symlinks stay on the node)."""
    if not blob:
        return blob
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as src, \
            tarfile.open(fileobj=out, mode="w") as dst:
        for m in src.getmembers():
            if m.isfile():
                dst.addfile(m, src.extractfile(m))
            elif m.isdir():
                dst.addfile(m)
    return out.getvalue()


def _run_shepherd(request: dict[str, Any],
                  grace: float) -> Generator[tuple[str, Any], None, dict[str, Any]]:
    """Start the shepherd, yield the agent's output, return the shepherd's status."""
    life_r, life_w = os.pipe()
    done_r, done_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    child_fds = (life_r, done_w, out_w, err_w)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "parallel_dispatch.shepherd", *map(str, child_fds)],
            stdin=subprocess.PIPE, pass_fds=child_fds, cwd="/", close_fds=True)
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(request).encode())
        proc.stdin.close()
        proc.wait()  # the first fork's parent exits at once
    finally:
        for fd in child_fds:
            os.close(fd)
    status: dict[str, Any] | None = None
    done_text = b""
    open_fds = {out_r: "out", err_r: "err", done_r: "done"}
    drain_until: float | None = None
    try:
        while open_fds:
            if drain_until is not None and time.monotonic() > drain_until:
                break  # an escaped process holds a pipe: the shepherd already swept
            ready, _, _ = select.select(list(open_fds), [], [], POLL_S)
            for fd in ready:
                data = os.read(fd, CHUNK)
                kind = open_fds[fd]
                if not data:
                    del open_fds[fd]
                    os.close(fd)
                    if kind == "done":
                        status = json.loads(done_text or b'{"code": -1, "cause": "lost"}')
                        drain_until = time.monotonic() + DRAIN_S
                elif kind == "done":
                    done_text += data
                else:
                    yield (kind, data)
    finally:
        os.close(life_w)  # the shepherd kills the group now, if it still runs
        if status is None and done_r in open_fds:
            _await_done(done_r, grace + 5.0)
        for fd in open_fds:
            os.close(fd)
    return status or {"code": -1, "cause": "lost"}


def _await_done(fd: int, limit: float) -> None:
    """After a cancel: give the shepherd its grace to kill the group and say so."""
    until = time.monotonic() + limit
    while time.monotonic() < until:
        ready, _, _ = select.select([fd], [], [], POLL_S)
        if ready and not os.read(fd, 4096):
            return
