"""The live page: a small read-only HTTP server for `watch --http` and `serve`.

It follows the live journals (`.dispatch-live.jsonl`, live.py) of every run it can
find — the daemon's output dirs, and the CLI's under the project — and serves:

  GET /             the page (static/live.html: one file, no build step, no CDN)
  GET /api/state    every run, as JSON
  GET /events       the same as Server-Sent Events: one `state` event per change

The HTTP side is a minimal HTTP/1.1 reader on `trio.serve_tcp`: GET and HEAD only,
headers capped at 16 KiB, one request per connection (`Connection: close`).  h11 is
installed (httpx → httpcore → h11) but is nobody's direct dependency here, and a
read-only GET server needs a request line and headers, nothing more.

Security: it binds loopback only unless a token is given; with a token every request
needs `Authorization: Bearer TOKEN` or `?token=TOKEN`.  Without a token the Host header
must name a loopback host too, so a web page in the user's browser cannot read it
through DNS rebinding.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trio

from ..errors import DispatchError
from ..live import LIVE_FILE
from ..outputs import dirs_holding
from ..probe import pid_alive

log = logging.getLogger("parallel_dispatch")

POLL_S = 0.25
"""How often the journals are checked for new lines (a stat each)."""
RESCAN_S = 2.0
"""How often the project is searched for new output dirs."""
HEARTBEAT_S = 15.0
"""An SSE comment this often keeps proxies and the browser from timing the stream out."""
MAX_HEADER_BYTES = 16 * 1024
TAIL_BYTES = 3000
"""Each task's log tail, as shown (its last bytes)."""
MAX_TAILS = 40
"""Log tails sent per run: the running tasks first, then the latest to end."""
TOKEN_ENV = "PARALLEL_DISPATCH_HTTP_TOKEN"
LOOPBACK_NAMES = ("localhost", "localhost.")


# -- the address ------------------------------------------------------------------------
@dataclass(frozen=True)
class HttpOptions:
    """`--http HOST:PORT` and `--http-token`, checked."""

    host: str
    port: int
    token: str | None = None


def parse_http(address: str, token: str | None) -> HttpOptions:
    """`127.0.0.1:8765`, `[::1]:8765`, `localhost:0`; a non-loopback host needs a token."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host:
        raise DispatchError(f"--http {address!r}: expected HOST:PORT, e.g. 127.0.0.1:8765")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise DispatchError(f"--http {address!r}: the port must be a number 0-65535 "
                            "(0 picks a free one)")
    token = token or os.environ.get(TOKEN_ENV) or None
    if not _loopback(host) and token is None:
        raise DispatchError(
            f"--http {address!r}: refusing to serve the live page on {host}, which is not "
            "a loopback address: anyone who can reach it would see your runs. Bind "
            f"127.0.0.1, or give --http-token TOKEN (or ${TOKEN_ENV}); then every request "
            "needs 'Authorization: Bearer TOKEN' or ?token=TOKEN")
    return HttpOptions(host, port, token)


def _loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- following the journals -------------------------------------------------------------
@dataclass
class _Run:
    """One output dir's live journal, read incrementally."""

    path: Path
    inode: int = -1
    offset: int = 0
    partial: bytes = b""
    head: dict[str, Any] = field(default_factory=dict)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    pools: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    done: dict[str, Any] | None = None
    tails: dict[str, tuple[tuple[int, int], str]] = field(default_factory=dict)
    finished: dict[str, Any] | None = None
    """The view of a run that ended, kept: nothing in it changes any more."""

    def reset(self, inode: int) -> None:
        self.inode, self.offset, self.partial = inode, 0, b""
        self.head, self.tasks, self.pools, self.notes, self.done = {}, {}, [], [], None
        self.tails, self.finished = {}, None

    def read(self) -> bool:
        """Apply new lines; True when anything changed.  A rewritten file starts over."""
        try:
            with open(self.path, "rb") as fh:
                st = os.fstat(fh.fileno())
                if st.st_ino != self.inode or st.st_size < self.offset:
                    self.reset(st.st_ino)
                if st.st_size == self.offset:
                    return False
                fh.seek(self.offset)
                data = fh.read(st.st_size - self.offset)
        except OSError:
            return False
        self.offset += len(data)
        self.finished = None
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()  # a line still being written
        for line in lines:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    self.apply(entry)
        return True

    def apply(self, e: dict[str, Any]) -> None:
        ev, t = e.get("ev"), e.get("t")
        if ev == "run":
            self.head = e
            self.tasks = {str(x.get("id")): {"id": x.get("id"), "agent": x.get("agent"),
                                             "deps": x.get("deps") or [], "status": "pending",
                                             "spans": [], "attempts": 0}
                          for x in e.get("tasks") or [] if isinstance(x, dict)}
            return
        if ev == "pools":
            self.pools = e.get("pools") or []
            return
        if ev == "note":
            self.notes = [*self.notes, str(e.get("text"))][-20:]
            return
        if ev == "done":
            self.done = e
            return
        task = self.tasks.get(str(e.get("id")))
        if task is None:
            return
        spans: list[list[Any]] = task["spans"]
        if spans and spans[-1][1] is None and ev in ("retry", "wait", "end"):
            spans[-1][1] = t
            spans[-1][2] = e.get("status") or ("waiting_for_quota" if ev == "wait" else None)
        if ev == "start":
            task.update(status="running", attempts=e.get("attempt"), event=None)
            spans.append([t, None, "running"])
            if len(spans) > 50:
                del spans[1:-49]
        elif ev == "event":
            task["event"] = e.get("text")
        elif ev == "retry":
            task.update(status="retrying", error=e.get("error"), retry_in=e.get("delay"))
        elif ev == "wait":
            task.update(status="waiting_for_quota", pool=e.get("pool"),
                        wait_s=e.get("wait_s"), wait_from=t, error=e.get("error"))
        elif ev == "end":
            task.update({k: v for k, v in e.items() if k not in ("ev", "id", "t")})
            task["ended"] = t

    def tail(self, task_id: str) -> str | None:
        """The end of `logs/<id>.log`, reread only when its size or mtime changed."""
        path = self.path.parent / "logs" / f"{task_id}.log"
        try:
            st = path.stat()
        except OSError:
            return None
        key = (st.st_size, st.st_mtime_ns)
        cached = self.tails.get(task_id)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            with open(path, "rb") as fh:
                fh.seek(max(0, st.st_size - TAIL_BYTES))
                text = fh.read(TAIL_BYTES).decode("utf-8", "replace")
        except OSError:
            return None
        if st.st_size > TAIL_BYTES:
            text = "…" + text.split("\n", 1)[-1]
        self.tails[task_id] = (key, text)
        return text

    def view(self) -> dict[str, Any]:
        """The run as the page draws it."""
        if self.finished is not None:
            return self.finished
        pid = self.head.get("pid")
        status = (self.done or {}).get("status") or "running"
        if self.done is None and isinstance(pid, int) and not pid_alive(pid):
            status = "gone"  # its dispatcher was killed: nothing more will come
        tasks = list(self.tasks.values())
        live = [t for t in tasks if t["status"] in ("running", "retrying", "waiting_for_quota")]
        ended = sorted((t for t in tasks if t.get("ended")), key=lambda t: -t["ended"])
        tails = {}
        for t in [*live, *ended][:MAX_TAILS]:
            text = self.tail(str(t["id"]))
            if text is not None:
                tails[t["id"]] = text
        printed = {}  # when each live task's log last grew: the page shows its silence
        for t in live:
            with contextlib.suppress(OSError):
                printed[t["id"]] = round((self.path.parent / "logs" /
                                          f"{t['id']}.log").stat().st_mtime, 1)
        cost = [t["cost_usd"] for t in tasks if isinstance(t.get("cost_usd"), int | float)]
        tokens = [t["tokens"] for t in tasks if isinstance(t.get("tokens"), int)]
        view = {
            "key": str(self.path.parent),
            "run_id": self.head.get("run_id"), "name": self.head.get("name"),
            "task_file": self.head.get("task_file"), "output_dir": str(self.path.parent),
            "started": self.head.get("t"), "started_at": self.head.get("started_at"),
            "ended": (self.done or {}).get("t"), "status": status,
            "report": (self.done or {}).get("report"),
            "max_parallel": self.head.get("max_parallel"),
            "on_failure": self.head.get("on_failure"),
            "tasks": tasks, "pools": self.pools, "notes": self.notes,
            "cost_usd": round(sum(cost), 6) if cost else None,
            "tokens": sum(tokens) if tokens else None,
            "tails": tails, "log_mtime": printed,
        }
        if self.done is not None:
            self.finished = view
        return view


def journal_dirs(bases: Iterable[Path]) -> set[Path]:
    """Output dirs under `bases` holding a live journal."""
    return dirs_holding(bases, LIVE_FILE)


class LiveState:
    """Every run the page shows; `changed` is set whenever one of them moved."""

    def __init__(self, bases: Callable[[], Iterable[Path]]) -> None:
        self.bases = bases
        self.runs: dict[Path, _Run] = {}
        self.version = 0
        self.changed = trio.Event()
        self.payload = b'{"now":0,"runs":[]}'
        self._runs = b""

    def poll(self, rescan: bool) -> bool:
        if rescan:
            for folder in journal_dirs(self.bases()):
                self.runs.setdefault(folder, _Run(folder / LIVE_FILE))
        for run in self.runs.values():
            run.read()
        runs = json.dumps(sorted((r.view() for r in self.runs.values() if r.head),
                                 key=lambda v: -(v["started"] or 0)), default=str).encode()
        if runs != self._runs:  # (a dead dispatcher or a grown log changes it, too)
            self._runs = runs
            # `now`: the server's clock, so the page can draw running bars on it
            self.payload = b'{"now":%.3f,"runs":%s}' % (time.time(), runs)
            self.version += 1
            self.changed.set()
            self.changed = trio.Event()
            return True
        return False

    async def follow(self) -> None:
        last_scan = -RESCAN_S
        while True:
            now = trio.current_time()
            self.poll(rescan=now - last_scan >= RESCAN_S)
            if now - last_scan >= RESCAN_S:
                last_scan = now
            await trio.sleep(POLL_S)


# -- HTTP -------------------------------------------------------------------------------
@dataclass
class _Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]


class _BadRequest(Exception):
    pass


async def _read_request(stream: trio.SocketStream) -> _Request:
    buf = b""
    while b"\r\n\r\n" not in buf:
        if len(buf) > MAX_HEADER_BYTES:
            raise _BadRequest("431 Request Header Fields Too Large")
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise _BadRequest("")
        buf += chunk
    head = buf.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    request_line, *lines = head.split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest("400 Bad Request")
    headers = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep:
            raise _BadRequest("400 Bad Request")
        headers[name.strip().lower()] = value.strip()
    url = urlsplit(parts[1])
    return _Request(parts[0], url.path, parse_qs(url.query), headers)


def page_html() -> bytes:
    """The page, from the package's data (static/live.html)."""
    return (resources.files("parallel_dispatch.service") / "static" / "live.html").read_bytes()


class LivePage:
    """The HTTP side: serves `state`'s payload to any number of readers."""

    def __init__(self, state: LiveState, options: HttpOptions, title: str) -> None:
        self.state = state
        self.options = options
        self.title = title
        self._page = page_html()

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(30):
                try:
                    req = await _read_request(stream)
                except _BadRequest as exc:
                    if str(exc):
                        await self._send(stream, str(exc), b"bad request\n")
                    return
            if self.options.token is None and not _loopback(_host_name(req)):
                await self._send(stream, "403 Forbidden", b"this page answers to loopback "
                                 b"host names only (127.0.0.1, localhost, [::1])\n")
                return
            if not self._allowed(req):
                await self._send(stream, "401 Unauthorized", b"a token is needed: "
                                 b"Authorization: Bearer TOKEN or ?token=TOKEN\n",
                                 extra=[("WWW-Authenticate", "Bearer")])
                return
            if req.method not in ("GET", "HEAD"):
                await self._send(stream, "405 Method Not Allowed", b"read-only\n",
                                 extra=[("Allow", "GET, HEAD")])
                return
            body_only = req.method == "GET"
            if req.path == "/":
                page = self._page.replace(b"{{TITLE}}", _html_escape(self.title).encode())
                await self._send(stream, "200 OK", page, "text/html; charset=utf-8",
                                 send_body=body_only)
            elif req.path == "/api/state":
                await self._send(stream, "200 OK", self.state.payload, "application/json",
                                 send_body=body_only)
            elif req.path == "/events" and body_only:
                await self._events(stream)
            else:
                await self._send(stream, "404 Not Found", b"not found\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the reader went away
        finally:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.aclose()

    def _allowed(self, req: _Request) -> bool:
        token = self.options.token
        if token is None:
            return True
        given = req.headers.get("authorization", "")
        if given.lower().startswith("bearer "):
            given = given[7:].strip()
        else:
            given = (req.query.get("token") or [""])[0]
        return hmac.compare_digest(given.encode(), token.encode())

    async def _send(self, stream: trio.SocketStream, status: str, body: bytes,
                    ctype: str = "text/plain; charset=utf-8", *, send_body: bool = True,
                    extra: list[tuple[str, str]] | None = None) -> None:
        headers = [("Content-Type", ctype), ("Content-Length", str(len(body))),
                   ("Cache-Control", "no-store"), ("Connection", "close"),
                   ("X-Content-Type-Options", "nosniff"), *(extra or [])]
        if ctype.startswith("text/html"):
            headers.append(("Content-Security-Policy",
                            "default-src 'self'; style-src 'unsafe-inline'; "
                            "script-src 'unsafe-inline'; img-src data:"))
        head = f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
        await stream.send_all(head.encode("latin-1") + b"\r\n" + (body if send_body else b""))

    async def _events(self, stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                              b"Cache-Control: no-store\r\nConnection: close\r\n"
                              b"X-Content-Type-Options: nosniff\r\n\r\nretry: 1000\n\n")
        sent = -1
        while True:
            if self.state.version != sent:
                sent = self.state.version
                await stream.send_all(b"event: state\ndata: " + self.state.payload + b"\n\n")
            with trio.move_on_after(HEARTBEAT_S):
                await self.state.changed.wait()
                continue
            await stream.send_all(b": keep-alive\n\n")


def _host_name(req: _Request) -> str:
    """The Host header without its port.  Without a token only loopback names are served,
    so another site cannot read the page through DNS rebinding."""
    host = req.headers.get("host", "")
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if ":" in host else host


def _html_escape(text: str) -> str:
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


@dataclass
class Listening:
    """The page's sockets, bound: `listen` fails early (a port in use) with a clear error,
    before a daemon starts its runs."""

    options: HttpOptions
    listeners: list[trio.SocketListener]
    url: str


async def listen(options: HttpOptions) -> Listening:
    try:
        listeners = await trio.open_tcp_listeners(options.port, host=options.host)
    except OSError as exc:
        raise DispatchError(f"--http {options.host}:{options.port}: cannot listen: "
                            f"{exc.strerror or exc}") from None
    sockname = listeners[0].socket.getsockname()
    host = f"[{sockname[0]}]" if ":" in sockname[0] else sockname[0]
    return Listening(options, listeners, f"http://{host}:{sockname[1]}/")


async def serve_page(listening: Listening, bases: Callable[[], Iterable[Path]], title: str,
                     *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the page until cancelled; `task_status.started` gets its URL.

    Cancelling it closes the listeners and every open event stream at once.
    """
    state = LiveState(bases)
    state.poll(rescan=True)
    page = LivePage(state, listening.options, title)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(state.follow)
        await nursery.start(trio.serve_listeners, page.handle, listening.listeners)
        task_status.started(listening.url)


def project_bases(project: Path) -> Callable[[], list[Path]]:
    """Where `serve` looks for runs: under `.aiwg/` and the CLI's default output dir
    (read from the project config each rescan; a broken config leaves `.aiwg/`)."""
    from ..config import load_config, resolve_settings
    from ..model import Settings

    def bases() -> list[Path]:
        found = [project / ".aiwg"]
        with contextlib.suppress(DispatchError, OSError):
            config = load_config(project)
            found.append(resolve_settings(project, Settings(), config, {}).output_dir)
        return found

    return bases


def run_serve(project: Path, options: HttpOptions) -> int:
    """Entry point of `parallel-dispatch serve`: the page until SIGINT/SIGTERM."""
    import signal

    project = project.resolve()

    async def main() -> None:
        listening = await listen(options)
        async with trio.open_nursery() as nursery:
            url = await nursery.start(serve_page, listening, project_bases(project),
                                      f"parallel-dispatch · {project.name}")
            print(f"live page: {url}" + ("  (token required)" if options.token else ""),
                  flush=True)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    break
            nursery.cancel_scope.cancel()

    trio.run(main)
    return 0
