"""The live page (`serve`, `watch --http`): real sockets on 127.0.0.1, real CLI runs.

Agents are shell tasks that wait for a file the test creates, so each state change
happens when the test says so; the test then waits for the page to report it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from support import Project, cli_env, wait_until

WAIT = "while [ ! -e {flag} ]; do sleep 0.05; done"
"""A shell agent's body that waits for the test to create `flag` (polled by the agent)."""


# -- helpers ---------------------------------------------------------------------------
class Procs:
    """Processes a test starts; all stopped (by pid) at its end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, cwd: Path, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-m", "parallel_dispatch", *args], cwd=cwd,
                                env=cli_env(), text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=20)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    try:
        yield p
    finally:
        p.stop()


def page_url(proc: subprocess.Popen[str], stream: str = "stdout") -> str:
    """The `live page: URL` line the server prints once it listens."""
    pipe = proc.stdout if stream == "stdout" else proc.stderr
    assert pipe is not None
    seen = []
    for line in pipe:
        seen.append(line)
        if "live page: " in line:
            return line.split("live page: ", 1)[1].split()[0]
    raise AssertionError(f"no 'live page:' line; exit {proc.wait()}: {''.join(seen)}")


def http_get(url: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        if "Host" not in (headers or {}):
            extra += f"Host: {host}:{port}\r\n"
        sock.sendall(f"GET {path} HTTP/1.1\r\n{extra}\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


class EventStream:
    """A reader of `/events`: each `state` event's data, parsed."""

    def __init__(self, url: str, query: str = "") -> None:
        host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        self.sock.sendall(f"GET /events{query} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n"
                          .encode())
        self.file = self.sock.makefile("rb")
        status = self.file.readline()
        assert b" 200 " in status, status
        while self.file.readline() not in (b"\r\n", b""):
            pass

    def next_state(self, deadline: float | None = None) -> dict[str, Any]:
        """The next `state` event; by `deadline` (the server's heartbeats every 15 s
        give the check a chance to run), else AssertionError."""
        event, data = None, b""
        for line in self.file:
            if deadline is not None and time.monotonic() > deadline:
                raise AssertionError("the page's state never got there")
            if line.startswith(b"event:"):
                event = line[6:].strip()
            elif line.startswith(b"data:"):
                data += line[5:].strip()
            elif line == b"\n" and event == b"state":
                return dict(json.loads(data))
            elif line == b"\n":
                event, data = None, b""
        raise AssertionError("the event stream ended")

    def until(self, pred: Any, timeout: float = 120,
              run: subprocess.Popen[str] | None = None) -> tuple[dict[str, Any],
                                                              list[dict[str, Any]]]:
        """Read states until `pred(state)`; returns it and every state seen.  A run that
        ended meanwhile fails the test with its stderr (not a silent wait)."""
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                state = self.next_state(deadline)
            except AssertionError:
                if run is not None and run.poll() is not None:
                    raise AssertionError(f"the run ended ({run.returncode}): "
                                         f"{run.stderr.read() if run.stderr else ''}") from None
                raise
            seen.append(state)
            if pred(state):
                return state, seen

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def statuses(state: dict[str, Any]) -> dict[str, str]:
    """task id → status, of the newest run in a state."""
    if not state["runs"]:
        return {}
    return {t["id"]: t["status"] for t in state["runs"][0]["tasks"]}


def three_tasks(project: Project) -> Path:
    project.config()
    return project.write("t.yaml", f"""
        name: live demo
        tasks:
          - id: a
            agent: shell
            prompt: 'echo a-stderr-marker >&2; {WAIT.format(flag="go-a")}; echo a'
            output: a.txt
          - id: b
            agent: shell
            prompt: '{WAIT.format(flag="go-b")}; echo b'
            output: b.txt
          - {{id: c, agent: shell, prompt: 'echo c', output: c.txt, dependencies: [a, b]}}
    """)


# -- the page and its event stream during a CLI run ------------------------------------
def test_events_follow_a_cli_run(project: Project, procs: Procs) -> None:
    three_tasks(project)
    server = procs.start(project.root, "serve", str(project.root), "--http", "127.0.0.1:0")
    url = page_url(server)
    assert url.startswith("http://127.0.0.1:")
    code, page = http_get(url, "/")
    assert code == 200 and b"<title>parallel-dispatch" in page and b"EventSource" in page
    assert b"<script src" not in page and b"https://" not in page  # self-contained

    events = EventStream(url)
    try:
        assert events.next_state()["runs"] == []  # no run yet
        run = procs.start(project.root, "t.yaml", "--timeout", "600000")
        state, history = events.until(lambda s: statuses(s).get("a") == "running"
                                      and statuses(s).get("b") == "running", run=run)
        live = state["runs"][0]
        assert live["status"] == "running" and live["name"] == "live demo"
        assert statuses(state)["c"] == "pending"
        assert [d for t in live["tasks"] if t["id"] == "c" for d in t["deps"]] == ["a", "b"]
        assert live["task_file"] == str(project.root / "t.yaml")
        assert wait_until(lambda: "a-stderr-marker" in json.dumps(
            json.loads(http_get(url, "/api/state")[1])["runs"][0]["tails"]), timeout=60)

        (project.root / "go-a").touch()
        state, seen = events.until(lambda s: statuses(s).get("a") == "succeeded", run=run)
        history += seen
        assert statuses(state)["b"] == "running" and statuses(state)["c"] == "pending"
        a = next(t for t in state["runs"][0]["tasks"] if t["id"] == "a")
        assert len(a["spans"]) == 1 and a["spans"][0][1] is not None  # its bar closed

        (project.root / "go-b").touch()
        state, seen = events.until(lambda s: s["runs"][0]["status"] == "succeeded", run=run)
        history += seen
        assert statuses(state) == {"a": "succeeded", "b": "succeeded", "c": "succeeded"}
        for task in "ab":  # each change, in order
            shown = [statuses(s)[task] for s in history if s["runs"]]
            changes = [x for i, x in enumerate(shown) if i == 0 or x != shown[i - 1]]
            assert changes in (["running", "succeeded"],
                               ["pending", "running", "succeeded"]), (task, changes)
        # c ran between two polls (a state is sent per change seen, not per line), but
        # its bar is there: start and end come from the journal, not from the polls
        c = next(t for t in state["runs"][0]["tasks"] if t["id"] == "c")
        assert len(c["spans"]) == 1 and c["spans"][0][0] <= c["spans"][0][1]
        assert state["runs"][0]["report"].endswith("dispatch-report.md")
        assert run.wait(timeout=120) == 0
    finally:
        events.close()
    # A new reader of a finished run gets it whole, at once.
    again = EventStream(url)
    try:
        assert again.next_state()["runs"][0]["status"] == "succeeded"
    finally:
        again.close()


def test_journal_states(tmp_path: Path) -> None:
    """Waiting for quota, retries and a stalled end, as the page's reader sees them."""
    from parallel_dispatch.live import LIVE_FILE
    from parallel_dispatch.service.webpage import _Run

    lines = [
        {"ev": "run", "run_id": "r1", "pid": os.getpid(), "t": 100.0,
         "tasks": [{"id": "q", "agent": "claude", "deps": []},
                   {"id": "s", "agent": "shell", "deps": []}]},
        {"ev": "start", "id": "q", "attempt": 1, "t": 101.0},
        {"ev": "wait", "id": "q", "pool": "claude", "wait_s": 30, "error": "429", "t": 102.0},
        {"ev": "pools", "pools": [{"name": "claude", "limit_now": 1, "limit_max": 4}],
         "t": 102.0},
        {"ev": "start", "id": "s", "attempt": 1, "t": 103.0},
        {"ev": "retry", "id": "s", "status": "failed", "error": "exit 1", "delay": 2,
         "t": 104.0},
    ]
    path = tmp_path / LIVE_FILE
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"ev": "sta')  # torn
    run = _Run(path)
    assert run.read()
    view = run.view()
    tasks = {t["id"]: t for t in view["tasks"]}
    assert tasks["q"]["status"] == "waiting_for_quota" and tasks["q"]["pool"] == "claude"
    assert tasks["q"]["spans"] == [[101.0, 102.0, "waiting_for_quota"]]
    assert tasks["s"]["status"] == "retrying"
    assert view["pools"][0]["limit_now"] == 1 and view["status"] == "running"
    with path.open("a") as fh:  # the torn line completes; the task stalls
        fh.write('rt", "id": "s", "attempt": 2, "t": 106.0}\n' + json.dumps(
            {"ev": "end", "id": "s", "status": "stalled", "attempts": 2, "busy_s": 9,
             "cost_usd": 0.25, "tokens": 1200, "t": 115.0}) + "\n")
    assert run.read()
    view = run.view()
    s = next(t for t in view["tasks"] if t["id"] == "s")
    assert s["status"] == "stalled" and [x[2] for x in s["spans"]] == ["failed", "stalled"]
    assert view["cost_usd"] == 0.25 and view["tokens"] == 1200
    assert not run.read()  # nothing new


# -- who may look --------------------------------------------------------------------
@pytest.mark.parametrize("command", ["serve", "watch"])
def test_non_loopback_needs_a_token(project: Project, command: str) -> None:
    result = project.run(command, str(project.root), "--http", "0.0.0.0:8765")
    assert result.returncode == 2
    assert "not a loopback address" in result.stderr and "--http-token" in result.stderr
    help_text = project.run(command, "--help").stdout
    assert "non-loopback" in help_text and "--http-token" in help_text


@pytest.mark.parametrize("command", ["serve", "watch"])
def test_port_in_use_is_a_clear_error(project: Project, command: str) -> None:
    pytest.importorskip("watchfiles")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = project.run(command, str(project.root), "--http", f"127.0.0.1:{port}")
    assert result.returncode == 2
    assert f"--http 127.0.0.1:{port}: cannot listen: Address already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_address_checks() -> None:
    from parallel_dispatch.errors import DispatchError
    from parallel_dispatch.service.webpage import parse_http

    assert parse_http("0.0.0.0:8765", "s3cret").token == "s3cret"  # allowed with a token
    assert parse_http("[::1]:0", None).host == "::1"
    assert parse_http("localhost:1", None).port == 1
    for bad in ("8765", "127.0.0.1:http", "127.0.0.1:70000", "192.168.1.5:80"):
        with pytest.raises(DispatchError, match="--http"):
            parse_http(bad, None)


def test_token_is_required(project: Project, procs: Procs) -> None:
    server = procs.start(project.root, "serve", str(project.root), "--http", "127.0.0.1:0",
                         "--http-token", "s3cret-token")
    url = page_url(server)
    assert http_get(url, "/")[0] == 401
    assert http_get(url, "/events")[0] == 401
    assert http_get(url, "/api/state", {"Authorization": "Bearer wrong"})[0] == 401
    assert http_get(url, "/?token=wrong")[0] == 401
    assert http_get(url, "/", {"Authorization": "Bearer s3cret-token"})[0] == 200
    code, body = http_get(url, "/api/state?token=s3cret-token")
    assert code == 200 and json.loads(body)["runs"] == []
    events = EventStream(url, "?token=s3cret-token")  # the page passes ?token= on
    try:
        assert events.next_state()["runs"] == []
    finally:
        events.close()


def test_loopback_page_refuses_other_host_names(project: Project, procs: Procs) -> None:
    """DNS rebinding: another site's name pointed at 127.0.0.1 must not read the page."""
    url = page_url(procs.start(project.root, "serve", str(project.root), "--http",
                               "127.0.0.1:0"))
    assert http_get(url, "/api/state", {"Host": "evil.example:80"})[0] == 403
    assert http_get(url, "/api/state", {"Host": "localhost"})[0] == 200
    assert http_get(url, "/nope")[0] == 404


# -- the daemon serves it too -------------------------------------------------------------
def test_watch_serves_the_page(project: Project, procs: Procs) -> None:
    pytest.importorskip("watchfiles")
    project.config()
    (project.root / ".aiwg" / "tasks").mkdir()
    daemon = procs.start(project.root, "watch", str(project.root), "--http", "127.0.0.1:0")
    url = page_url(daemon, "stderr")
    events = EventStream(url)
    try:
        project.write(".aiwg/tasks/one.yaml", f"""
            tasks:
              - {{id: w, agent: shell, prompt: '{WAIT.format(flag="go-w")}', output: w.txt}}
        """)
        events.until(lambda s: statuses(s).get("w") == "running")
        (project.root / "go-w").touch()
        state, _ = events.until(lambda s: s["runs"] and s["runs"][0]["status"] == "succeeded")
        assert statuses(state) == {"w": "succeeded"}
    finally:
        events.close()


# -- a real browser ------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium")


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                    reason="needs Debian's chromium package (apt-get install chromium)")
def test_chromium_shows_tasks_changing_state(project: Project, procs: Procs,
                                             tmp_path_factory: pytest.TempPathFactory) -> None:
    """Headless Chromium loads the page during a run; its DOM follows the run without a
    reload (the page's own event stream), and a screenshot of the finished run is kept."""
    from cdp import Browser

    assert CHROMIUM is not None, "CI installs chromium (.ci/run): it must be there"
    three_tasks(project)
    url = page_url(procs.start(project.root, "serve", str(project.root), "--http",
                               "127.0.0.1:0"))
    run = procs.start(project.root, "t.yaml", "--timeout", "600000")
    browser = Browser(tmp_path_factory.mktemp("chromium-profile"))
    row = "document.querySelector('tr[data-task=\"{}\"]')?.dataset.status"
    try:
        browser.navigate(url)
        browser.wait_for(f"{row.format('a')} === 'running' && {row.format('b')} === 'running'")
        assert browser.evaluate(row.format("c")) == "pending"
        assert browser.evaluate("document.getElementById('conn').textContent") == "live"
        # a mark on this document's window: a reload (or any new document) would lose it
        browser.evaluate("window.pdSameDocument = true")

        (project.root / "go-a").touch()
        browser.wait_for(f"{row.format('a')} === 'succeeded'")
        assert browser.evaluate(row.format("b")) == "running"
        (project.root / "go-b").touch()
        browser.wait_for("document.querySelector('section.run')?.dataset.status === "
                         "'succeeded'")
        assert [browser.evaluate(row.format(t)) for t in "abc"] == ["succeeded"] * 3
        assert browser.evaluate("document.querySelectorAll('[data-gantt] .gbar').length") == 3
        assert browser.evaluate("document.querySelector('.done').textContent") == "3/3"
        # the same document all along: the states arrived over its event stream
        assert browser.evaluate("window.pdSameDocument === true")
        assert int(browser.evaluate("document.body.dataset.version")) >= 3
        shot = project.root / "live-page.png"
        browser.screenshot(shot)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000
    finally:
        browser.close()
    assert run.wait(timeout=120) == 0
