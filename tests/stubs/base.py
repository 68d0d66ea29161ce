"""What every provider stub shares: a loopback server, a request log, scripted replies.

A test says how the provider behaves with `behave(*steps, model=None)`: each request
(for that model, or any model) takes the next step, and the last step repeats.  Steps
are plain strings a provider subclass understands ("ok", "401", "429", "529", "500",
"drop", "hang", "tool:Bash"); "hang" is handled here: the handler holds the connection
until `close()` (bounded, so no thread outlives a test by long).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

HANG_LIMIT_S = 600.0
"""The longest a "hang" holds a connection; `close()` releases it at once."""


@dataclass
class Request:
    """One request as the provider saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    """Parsed JSON when the body was JSON, else the raw text."""
    t: float = field(default_factory=time.monotonic)
    step: str = ""
    """The scripted behaviour this request got."""

    @property
    def model(self) -> str | None:
        if isinstance(self.body, dict) and isinstance(self.body.get("model"), str):
            return self.body["model"]
        return None

    def text(self) -> str:
        """The whole body as text, for 'did the system prompt arrive' checks."""
        return self.body if isinstance(self.body, str) else json.dumps(self.body)


class Reply:
    """Helpers a handler uses to answer; all writes ignore a client that went away."""

    def __init__(self, h: BaseHTTPRequestHandler) -> None:
        self.h = h
        self.headers: dict[str, str] = {}
        """Sent with every reply through `json` and `start_stream` (a stub's rate-limit
        headers, which the provider sends on every response)."""

    def json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.h.send_response(status)
        self.h.send_header("Content-Type", "application/json")
        self.h.send_header("Content-Length", str(len(data)))
        for k, v in {**self.headers, **(headers or {})}.items():
            self.h.send_header(k, v)
        self.h.end_headers()
        self._write(data)

    def start_stream(self, headers: dict[str, str] | None = None,
                     content_type: str = "text/event-stream") -> None:
        """Start a streamed 200 reply (no length: the connection closes at its end)."""
        self.h.send_response(200)
        self.h.send_header("Content-Type", content_type)
        self.h.send_header("Cache-Control", "no-cache")
        self.h.send_header("Connection", "close")
        for k, v in {**self.headers, **(headers or {})}.items():
            self.h.send_header(k, v)
        self.h.end_headers()
        self.h.close_connection = True

    def sse(self, data: Any, event: str | None = None) -> None:
        """One server-sent event; `data` is JSON-encoded unless it is already a string."""
        text = data if isinstance(data, str) else json.dumps(data)
        chunk = (f"event: {event}\n" if event else "") + f"data: {text}\n\n"
        self._write(chunk.encode())

    def raw(self, data: bytes) -> None:
        self._write(data)

    def drop(self) -> None:
        """Cut the connection mid-reply, as a dropped stream looks to the client."""
        self.h.close_connection = True
        try:
            self.h.wfile.flush()
            self.h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _write(self, data: bytes) -> None:
        try:
            self.h.wfile.write(data)
            self.h.wfile.flush()
        except OSError:
            pass


S = TypeVar("S", bound="StubServer")


class StubServer:
    """Base of the provider stubs; subclasses implement `respond`."""

    name = "stub"

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self.released = threading.Event()
        self._plans: dict[str | None, list[str]] = {None: ["ok"]}
        self._served: dict[str | None, int] = {}
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                stub._handle(self, "GET")

            def do_POST(self) -> None:
                stub._handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        # A client closing a kept-alive connection is normal, not a traceback to print.
        self.server.handle_error = lambda *args: None  # type: ignore[method-assign]
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)

    # -- lifecycle -------------------------------------------------------------------
    @property
    def port(self) -> int:
        return int(self.server.server_port)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self: S) -> S:
        self.thread.start()
        return self

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    @classmethod
    @contextmanager
    def running(cls: type[S], *args: Any, **kw: Any) -> Iterator[S]:
        stub = cls(*args, **kw).start()
        try:
            yield stub
        finally:
            stub.close()

    # -- scripting -------------------------------------------------------------------
    def behave(self, *steps: str, model: str | None = None) -> None:
        """Requests (for `model`, or any) take `steps` in turn; the last one repeats."""
        with self.lock:
            self._plans[model] = list(steps) or ["ok"]
            self._served[model] = 0

    def _next_step(self, model: str | None) -> str:
        with self.lock:
            key = model if model in self._plans else None
            plan = self._plans[key]
            n = self._served.get(key, 0)
            self._served[key] = n + 1
            return plan[min(n, len(plan) - 1)]

    def calls(self, path_part: str = "") -> list[Request]:
        with self.lock:
            return [r for r in self.requests if path_part in r.path]

    # -- handling --------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        if h.headers.get("Content-Encoding") == "gzip" and raw:
            import gzip

            raw = gzip.decompress(raw)
        elif h.headers.get("Content-Encoding") == "zstd" and raw:  # codex may compress
            raw = _zstd(raw)
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", errors="replace")
        req = Request(method, h.path, {k.lower(): v for k, v in h.headers.items()}, body)
        if self.accepts(req):
            req.step = self._next_step(req.model)
        with self.lock:
            self.requests.append(req)
        reply = Reply(h)
        if req.step == "hang":
            self.released.wait(HANG_LIMIT_S)
            reply.drop()
            return
        self.respond(req, reply)

    def accepts(self, req: Request) -> bool:
        """Whether `req` is a model call that takes a scripted step (not a model list,
        a token count or telemetry, which always succeed)."""
        return True

    def respond(self, req: Request, reply: Reply) -> None:
        raise NotImplementedError


def _zstd(raw: bytes) -> bytes:
    try:
        import zstandard  # type: ignore[import-not-found]
    except ImportError:
        return raw
    return zstandard.ZstdDecompressor().decompress(raw, max_output_size=64 << 20)
