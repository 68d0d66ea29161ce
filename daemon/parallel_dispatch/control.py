"""The control socket: list, cancel and re-run live work from outside a dispatcher.

Each dispatcher process listens on its own Unix socket in `<project>/.aiwg/run/`:
the daemon on `daemon.sock`, a CLI run started with `--control` on
`run-<pid>.sock`.  The folder is 0700 and each socket 0600 (bound inside the
private folder, then narrowed, so nobody else can reach it in between); a peer
of another user is refused all the same (SO_PEERCRED).  A socket left by a
dead process (connecting is refused) is removed by whoever finds it.

The protocol is one JSON object per line each way.  A request names an `op`:
`list`; `cancel_task` / `rerun_task` (`run`, `task`); `cancel_run` (`run`).  `run`
is a run id, a task file's absolute path, or the daemon's name for a task file;
`by` (optional) says who asks, for the reason a cancelled task is given.
Replies carry `"ok": true`, or `"ok": false` with an `error` message and a `kind`:
`bad_request`, `unknown` (no such run or task: the message has a did-you-mean) or
`refused` (the task already finished, the run has ended).  Requests are capped at
`MAX_REQUEST_BYTES`; a bad one gets its error and the connection stays usable.

Re-running (`rerun_task`) a task of a run still going: it runs again in that run,
then its dependents (scheduler.py `rerun_task`).  For a run that has ended: the
daemon starts a new run of that file with the task forced past the cache (its
dependents then run or are reused as usual); a CLI run refuses (it is exiting).

The client half (`dispatchers`, `request`, `list_runs`, `find_run`, `cancel`, `rerun`)
is plain blocking sockets: the CLI commands and the MCP server call it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import trio

from .errors import DispatchError
from .result import RunResult, TaskStatus, verb
from .scheduler import Refused, Scheduler
from .suggest import did_you_mean

RUN_DIR = Path(".aiwg") / "run"
DAEMON_SOCKET = "daemon.sock"
MAX_REQUEST_BYTES = 64 * 1024
"""A request line longer than this is refused and its connection closed."""
MAX_BY_CHARS = 120
IDLE_S = 300.0
"""A connection silent for this long is closed (a client that went away uncleanly)."""
SETTLE_S = 30.0
"""How long `cancel_task` / `cancel_run` wait for what they cancelled to be settled
before answering (killing a process group takes at most its grace period)."""
CLOSE_GRACE_S = 5.0
"""At the end of a CLI run: time open connections get to send their last answers."""
CLIENT_TIMEOUT_S = SETTLE_S + 10.0
OPS = ("list", "cancel_task", "cancel_run", "rerun_task")


class ControlError(DispatchError):
    """A control request failed; `kind` as in the protocol (or `unavailable`: no
    dispatcher answered)."""

    def __init__(self, message: str, kind: str = "bad_request") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class ControlledRun:
    """One run a dispatcher can be asked about: live (`scheduler`) or its last `result`."""

    name: str
    file: Path
    scheduler: Scheduler | None
    result: RunResult | None


class Controlled(Protocol):
    """What a dispatcher (the daemon, a CLI run) offers its control socket."""

    kind: str

    def runs(self) -> list[ControlledRun]: ...

    def rerun_ended(self, run: ControlledRun, task: str) -> dict[str, Any]:
        """Re-run `task` of a run that has ended; raises `ControlError` if it can't."""
        ...


def socket_dir(project: Path) -> Path:
    return project / RUN_DIR


# -- server ------------------------------------------------------------------------------
class ControlServer:
    """Serves one `Controlled` on one socket path; one trio task per connection."""

    def __init__(self, target: Controlled, path: Path) -> None:
        self.target = target
        self.path = path
        self._accepting = trio.CancelScope()
        self._connections: trio.Nursery | None = None
        self._inode: int | None = None
        self._busy = 0
        """Requests being answered (`close` lets them finish)."""
        self._quiet = trio.Event()
        self._listener: trio.socket.SocketType | None = None

    async def bind(self) -> None:
        """Take the socket path now (`ControlError` if a live dispatcher has it), so a
        caller can fail before starting anything; `serve` binds if this was not called."""
        if self._listener is None:
            self._listener = await _bind(self.path)
            self._inode = os.stat(self.path).st_ino

    async def serve(self, *, task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Bind, report started, serve until `close()` (or cancelled); the socket is
        removed on the way out, if it is still ours."""
        await self.bind()
        assert self._listener is not None
        listener = trio.SocketListener(self._listener)  # (rides out EMFILE and the like)
        try:
            async with trio.open_nursery() as connections:
                self._connections = connections
                task_status.started(self.path)
                with self._accepting:
                    while True:
                        connections.start_soon(self._connection, await listener.accept())
        finally:
            self._listener.close()
            self._unlink()

    async def close(self) -> None:
        """Stop accepting; open connections get `CLOSE_GRACE_S` to finish answering."""
        self._accepting.cancel()
        if self._connections is None:
            return
        if self._busy:
            with trio.move_on_after(CLOSE_GRACE_S):
                await self._quiet.wait()
        self._connections.cancel_scope.cancel()

    def _unlink(self) -> None:
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)

    async def _connection(self, stream: trio.SocketStream) -> None:
        peer_pid, peer_uid = _peer(stream.socket)
        try:
            async with stream:
                if peer_uid != os.geteuid():
                    await _send(stream, _error("not allowed: another user's process",
                                               "refused"))
                    return
                await self._requests(stream, peer_pid)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away: nothing to tell it

    async def _requests(self, stream: trio.SocketStream, peer_pid: int) -> None:
        buf = b""
        while True:
            data = b""
            with trio.move_on_after(IDLE_S):
                data = await stream.receive_some(65536)
            if not data:  # end of stream, or idle too long
                return
            *lines, buf = (buf + data).split(b"\n")  # (buf: an unfinished line)
            for line in [*lines, buf]:
                if len(line) > MAX_REQUEST_BYTES:  # no request boundary to resync on: close
                    await _send(stream, _error(f"request longer than {MAX_REQUEST_BYTES} "
                                               "bytes"))
                    return
            for line in lines:
                if line.strip():
                    await self._reply(stream, line, peer_pid)

    async def _reply(self, stream: trio.SocketStream, line: bytes, peer_pid: int) -> None:
        self._busy += 1
        try:
            await _send(stream, await self.answer(line, peer_pid))
        finally:
            self._busy -= 1
            if not self._busy:
                self._quiet.set()
                self._quiet = trio.Event()

    async def answer(self, line: bytes, peer_pid: int = 0) -> dict[str, Any]:
        """The reply to one request line; never raises (a bug is an `internal` error)."""
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ControlError("a request is a JSON object, e.g. {\"op\": \"list\"}")
            op = req.get("op")
            if op not in OPS:
                raise ControlError(f"unknown op {op!r}{did_you_mean(str(op), OPS)}; "
                                   f"one of: {', '.join(OPS)}")
            by = _by(req.get("by"), peer_pid)
            if op == "list":
                return {"ok": True, "dispatcher": self._about(),
                        "runs": [run_view(r) for r in self.target.runs()]}
            run = self._find(req.get("run"))
            if op == "cancel_run":
                return await _cancel_run(run, by)
            task = _task_index(run, req.get("task"))
            if op == "cancel_task":
                return await _cancel_task(run, task, by)
            return self._rerun(run, task)
        except ValueError as exc:  # (json.JSONDecodeError, a bad UTF-8 line)
            return _error(f"not JSON: {exc}")
        except ControlError as exc:
            return _error(str(exc), exc.kind)
        except Refused as exc:
            return _error(str(exc), "refused")
        except Exception as exc:  # the server keeps serving whatever one request does
            return _error(f"internal error: {exc!r}", "internal")

    def _about(self) -> dict[str, Any]:
        return {"kind": self.target.kind, "pid": os.getpid(), "socket": str(self.path)}

    def _find(self, ref: object) -> ControlledRun:
        if not isinstance(ref, str) or not ref:
            raise ControlError("'run' must name a run: its id, its task file's path, or "
                               "the daemon's name for the file")
        runs = self.target.runs()
        for run in runs:
            if ref in (_run_id(run), run.name, str(run.file)):
                return run
        known = [x for r in runs for x in (_run_id(r), r.name) if x]
        raise ControlError(f"no run '{ref}' in this dispatcher{did_you_mean(ref, known)}",
                           "unknown")

    def _rerun(self, run: ControlledRun, i: int) -> dict[str, Any]:
        task = _records(run)[i].id
        if run.scheduler is not None:
            try:
                ids = run.scheduler.rerun_task(i)
            except Refused as exc:
                if str(exc) != "the run has ended":
                    raise
            else:
                return {"ok": True, "run_id": _run_id(run), "task": task, "reopened": ids,
                        "new_run": False}
        return {"ok": True, "task": task, **self.target.rerun_ended(run, task)}


async def _cancel_task(run: ControlledRun, i: int, by: str) -> dict[str, Any]:
    rec = _records(run)[i]
    if run.scheduler is None:
        raise ControlError(f"task '{rec.id}' already finished ({rec.status}): the run of "
                           f"{run.name} has ended", "refused")
    scheduler = run.scheduler
    scheduler.cancel_task(i, f"cancelled by {by}")
    await _settled(scheduler, [i])
    why = f"dependency '{rec.id}' {verb(TaskStatus.CANCELLED)}"
    return {"ok": True, "run_id": scheduler.result.run_id, "task": rec.id,
            "status": rec.status, "reason": rec.reason,
            "skipped": [r.id for r in scheduler.records if r.reason == why]}


async def _cancel_run(run: ControlledRun, by: str) -> dict[str, Any]:
    if run.scheduler is None:
        status = run.result.status if run.result is not None else "not run"
        raise ControlError(f"the run of {run.name} has ended ({status})", "refused")
    scheduler = run.scheduler
    scheduler.interrupt(f"the run was cancelled by {by}")
    await _settled(scheduler, range(len(scheduler.records)))
    return {"ok": True, "run_id": scheduler.result.run_id,
            "tasks": {r.id: r.status for r in scheduler.records}}


async def _settled(scheduler: Scheduler, tasks: Iterable[int]) -> None:
    """Until each of `tasks` is settled, or `SETTLE_S` passed (the reply says where each is)."""
    with trio.move_on_after(SETTLE_S):
        for i in tasks:
            await scheduler.wait_done(i)


def run_view(run: ControlledRun) -> dict[str, Any]:
    """A run as `list` and `status --json` show it."""
    result = run.scheduler.result if run.scheduler is not None else run.result
    records = result.records if result is not None else []
    counts: dict[str, int] = {}
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
    return {
        "run_id": result.run_id if result is not None else None,
        "name": run.name,
        "file": str(run.file),
        "live": run.scheduler is not None,
        "status": "running" if run.scheduler is not None
        else (result.status if result is not None else None),
        "started_at": result.started_at if result is not None else None,
        "finished_at": (result.finished_at or None) if result is not None else None,
        "counts": counts,
        "tasks": [{
            "id": r.id, "agent": r.agent, "status": r.status,
            "retrying": run.scheduler is not None and run.scheduler.retrying(r.index),
            "attempts": r.attempts, "start_s": r.start_s, "end_s": r.end_s,
            "reason": r.reason, "error": r.error, "event": r.event,
        } for r in records],
    }


def _records(run: ControlledRun) -> list[Any]:
    result = run.scheduler.result if run.scheduler is not None else run.result
    return result.records if result is not None else []


def _run_id(run: ControlledRun) -> str | None:
    result = run.scheduler.result if run.scheduler is not None else run.result
    return result.run_id if result is not None else None


def _task_index(run: ControlledRun, task: object) -> int:
    if not isinstance(task, str) or not task:
        raise ControlError("'task' must be a task id")
    ids = [r.id for r in _records(run)]
    if task not in ids:
        raise ControlError(f"unknown task '{task}' in {run.name}{did_you_mean(task, ids)}",
                           "unknown")
    return ids.index(task)


def _by(given: object, peer_pid: int) -> str:
    if isinstance(given, str) and given.strip():
        text = "".join(c if c.isprintable() else " " for c in given.strip())
        return text[:MAX_BY_CHARS]
    return f"a control client (pid {peer_pid})" if peer_pid else "a control client"


def _error(message: str, kind: str = "bad_request") -> dict[str, Any]:
    return {"ok": False, "error": message, "kind": kind}


async def _send(stream: trio.SocketStream, reply: dict[str, Any]) -> None:
    await stream.send_all(json.dumps(reply, ensure_ascii=False).encode() + b"\n")


def _peer(sock: trio.socket.SocketType) -> tuple[int, int]:
    """The connecting process's (pid, uid)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return pid, uid


async def _bind(path: Path) -> trio.socket.SocketType:
    """A listening socket at `path` in a private folder; a stale socket is replaced."""
    try:
        return await _bind_private(path)
    except OSError as exc:
        raise ControlError(f"cannot listen on the control socket {path}: "
                           f"{exc.strerror or exc}", "unavailable") from None


async def _bind_private(path: Path) -> trio.socket.SocketType:
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    if os.path.lexists(path):
        if _answers(path):
            raise ControlError(f"another dispatcher already listens on {path} (a daemon "
                               "already running for this project?)", "refused")
        os.unlink(path)  # a dead process's socket
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _addressable(path) as address:
            await sock.bind(address)
        os.chmod(path, 0o600)  # (nobody else could reach it meanwhile: the folder is 0700)
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    return sock


@contextlib.contextmanager
def _addressable(path: Path) -> Iterator[str]:
    """`path`, or an equivalent short enough for sun_path (108 bytes): the folder
    opened and named through /proc/self/fd, as deep test folders need."""
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


# -- client --------------------------------------------------------------------------------
def _connect(path: Path, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with _addressable(path) as address:
            sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _answers(path: Path) -> bool:
    """Whether a live process listens on `path` (a refused connect: a stale socket)."""
    try:
        _connect(path, 2.0).close()
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
            return False
        raise
    return True


def dispatchers(project: Path) -> list[Path]:
    """The live control sockets of `project`; stale ones (their process died) are removed."""
    folder = socket_dir(project)
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    live = []
    for name in names:
        path = folder / name
        try:
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                continue
            if _answers(path):
                live.append(path)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        except OSError:
            continue  # e.g. another user's socket: not ours to use
    return live


def request(path: Path, req: dict[str, Any], timeout: float = CLIENT_TIMEOUT_S
            ) -> dict[str, Any]:
    """Send one request, return the reply (`ok` true or false); `ControlError`
    (`unavailable`) when the socket does not answer."""
    try:
        with _connect(path, timeout) as sock:
            sock.sendall(json.dumps(req).encode() + b"\n")
            buf = b""
            while b"\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
    except OSError as exc:
        raise ControlError(f"the dispatcher at {path} did not answer: {exc}",
                           "unavailable") from None
    try:
        reply = json.loads(buf.split(b"\n", 1)[0])
    except ValueError:
        raise ControlError(f"the dispatcher at {path} sent no reply", "unavailable") from None
    if not isinstance(reply, dict):
        raise ControlError(f"the dispatcher at {path} sent {reply!r}", "unavailable")
    return reply


def _checked(reply: dict[str, Any]) -> dict[str, Any]:
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error")), str(reply.get("kind", "bad_request")))
    return reply


def list_runs(project: Path) -> list[dict[str, Any]]:
    """Every run the project's live dispatchers know, each with its `dispatcher`."""
    runs = []
    for path in dispatchers(project):
        with contextlib.suppress(ControlError):  # it died between listing and asking
            reply = _checked(request(path, {"op": "list"}))
            for run in reply["runs"]:
                runs.append({**run, "dispatcher": reply["dispatcher"]})
    return runs


def find_run(project: Path, ref: str) -> tuple[Path, dict[str, Any]]:
    """The socket and run (`list`'s view) that `ref` names: a run id, a task file (a
    path, absolute or from the current directory) or the daemon's name for one.  A live
    run wins over a finished one of the same file."""
    runs = list_runs(project)
    if not runs:
        raise ControlError(f"no dispatcher is running for {project} (no live socket in "
                           f"{socket_dir(project)}): start the daemon (`parallel-dispatch "
                           "watch`) or run with --control", "unavailable")
    as_file = str(Path(ref).resolve()) if os.path.exists(ref) else None
    hits = [r for r in runs if ref in (r["run_id"], r["name"], r["file"])
            or (as_file is not None and r["file"] == as_file)]
    if not hits:
        known = [x for r in runs for x in (r["run_id"], r["name"]) if x]
        raise ControlError(f"no run '{ref}' in the running dispatchers"
                           f"{did_you_mean(ref, known)}; `parallel-dispatch status --json` "
                           "lists them", "unknown")
    hits.sort(key=lambda r: not r["live"])
    run = hits[0]
    return Path(run["dispatcher"]["socket"]), run


def _ask(project: Path, ref: str, op: str, **args: Any) -> dict[str, Any]:
    path, run = find_run(project, ref)
    key = run["run_id"] if run["live"] else run["file"]  # (a daemon's next run has a new id)
    return _checked(request(path, {"op": op, "run": key, **args}))


def cancel(project: Path, ref: str, task: str | None = None, *, by: str | None = None
           ) -> dict[str, Any]:
    """Cancel one task of the run `ref` names, or the whole run; the reply once it is
    settled (`status` `cancelled`, `skipped` dependents).  `ControlError` otherwise."""
    if task is None:
        return _ask(project, ref, "cancel_run", by=by)
    return _ask(project, ref, "cancel_task", task=task, by=by)


def rerun(project: Path, ref: str, task: str, *, by: str | None = None) -> dict[str, Any]:
    """Run a finished task again (see the module docstring for a run that has ended)."""
    return _ask(project, ref, "rerun_task", task=task, by=by)


# -- a CLI run with --control ----------------------------------------------------------------
class _OneRun:
    """A CLI run as a `Controlled`: its one run, live while the scheduler runs."""

    kind = "run"

    def __init__(self, name: str, file: Path) -> None:
        self.run = ControlledRun(name, file, None, None)

    def runs(self) -> list[ControlledRun]:
        return [self.run] if self.run.scheduler or self.run.result else []

    def rerun_ended(self, run: ControlledRun, task: str) -> dict[str, Any]:
        raise ControlError(f"the run of {run.name} has ended and its dispatcher is exiting; "
                           "run the file again (or let the daemon run it)", "refused")


async def run_with_control(
    project: Path, name: str, file: Path,
    run: Callable[[Callable[[Scheduler], None]], Awaitable[RunResult]],
) -> RunResult:
    """`run(hook)` (a `run_spec` call passing `hook` as its `scheduler_hook`) with a
    control socket `run-<pid>.sock` open for as long as it lasts."""
    target = _OneRun(name, file.resolve())
    server = ControlServer(target, socket_dir(project) / f"run-{os.getpid()}.sock")

    def hook(scheduler: Scheduler) -> None:
        target.run.scheduler = scheduler

    await server.bind()  # outside the nursery: its error is not wrapped in a group
    result: RunResult | None = None
    error: Exception | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve)
        try:
            result = target.run.result = await run(hook)
        except Exception as exc:  # re-raised below, as the caller would get it without us
            error = exc
        finally:
            target.run.scheduler = None
            with trio.CancelScope(shield=True):
                await server.close()
    if error is not None:
        raise error
    assert result is not None
    return result
