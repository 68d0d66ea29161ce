"""`[notify]` (notify.py): real CLI runs tell a real HTTP server on 127.0.0.1, or a real
command, about failed and stalled tasks, quota waits and the run's end.

The CLI returns only once the run's notifications are delivered (or given up on after
`DRAIN_S`), so each test reads what the server received after the run: nothing here
waits on wall-clock time.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from parallel_dispatch.notify import DRAIN_S
from preset_support import make_agent_project
from stubs.limits import Limiter, Limits
from stubs.openai_chat import OpenAIChatStub
from support import Project, wait_until
from test_daemon import WAIT, Daemon, wait_report
from test_merge import FIVE_LINES, make_repo
from test_openai_runner import configure


@dataclass
class Hook:
    """A webhook receiver: records each POST and answers with the next scripted code."""

    url: str
    codes: list[int] = field(default_factory=list)
    posts: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def bodies(self) -> list[Any]:
        with self.lock:
            return [json.loads(p["body"]) for p in self.posts]


@pytest.fixture
def hook() -> Iterator[Hook]:
    state = Hook(url="")

    class Handler(BaseHTTPRequestHandler):
        timeout = 30  # a stuck client cannot hold a server thread forever

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with state.lock:
                state.posts.append({"path": self.path, "body": body.decode(),
                                    "type": self.headers.get("Content-Type")})
                code = state.codes.pop(0) if state.codes else 200
            self.send_response(code)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/SECRET-PATH"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def silent_url() -> Iterator[str]:
    """A server that accepts connections (the kernel's backlog does) and never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
    finally:
        sock.close()


FAILING = """\
    tasks:
      - {id: bad, agent: w, prompt: "exit=3", output: bad.md}
      - {id: good, agent: w, prompt: hello, output: good.md}
    settings: {max_retries: 0}
"""


def notify_config(project: Project, body: str) -> None:
    project.config("[notify]\n" + body)


def test_a_failing_task_posts_task_failed_then_run_finished(
        project: Project, hook: Hook) -> None:
    notify_config(project, f'webhook = "{hook.url}"\n')
    project.write("t.yaml", FAILING)
    proc = project.run("t.yaml")
    assert proc.returncode == 1, proc.stderr
    report = project.report()
    assert [p["path"] for p in hook.posts] == ["/hooks/SECRET-PATH"] * 2
    assert all(p["type"] == "application/json" for p in hook.posts)
    failed, finished = hook.bodies()
    root = project.root
    assert failed["event"] == "task_failed" and finished["event"] == "run_finished"
    assert failed["run_id"] == finished["run_id"] == report["run_id"]
    assert failed["task_file"] == finished["task_file"] == str(root / "t.yaml")
    assert failed["project"] == str(root)
    assert (failed["task"], failed["agent"], failed["status"]) == ("bad", "w", "failed")
    assert "3" in failed["error"] and failed["attempts"] == 1
    assert Path(failed["log"]).is_file()
    assert failed["report"] == str(root / ".aiwg/working/dispatch-report.md")
    assert failed["text"].startswith("✗ task 'bad' failed (t.yaml, run ")
    assert finished["task"] is None and finished["status"] == "failed"
    assert finished["error"] == "1 task did not succeed"
    assert finished["summary"] == {"succeeded": 1, "failed": 1}
    assert Path(finished["report"]).is_file()
    assert finished["text"].startswith("run of ") and " failed: 1 succeeded, 1 failed in " \
        in finished["text"]
    for body in (failed, finished):
        assert body["time"].endswith("Z")
    assert "notify:" not in proc.stderr


def test_slack_format_posts_a_text_summary(project: Project, hook: Hook) -> None:
    notify_config(project, f'webhook = "{hook.url}"\nformat = "slack"\n')
    project.write("t.yaml", FAILING)
    assert project.run("t.yaml").returncode == 1
    failed, finished = hook.bodies()
    assert list(failed) == ["text"] and list(finished) == ["text"]
    assert failed["text"].startswith("parallel-dispatch: ✗ task 'bad' failed (t.yaml, run ")
    assert finished["text"].startswith("parallel-dispatch: run of ")
    assert "1 succeeded, 1 failed" in finished["text"]


def test_a_server_error_is_retried_until_delivered(project: Project, hook: Hook) -> None:
    hook.codes = [500, 503, 200]
    notify_config(project, f'webhook = "{hook.url}"\nevents = ["run_finished"]\n')
    project.write("t.yaml", "tasks:\n  - {id: a, agent: w, prompt: hi, output: a.md}\n")
    proc = project.run("t.yaml")
    assert proc.returncode == 0, proc.stderr
    bodies = hook.bodies()
    assert len(bodies) == 3 and bodies[0] == bodies[1] == bodies[2]
    assert bodies[0]["event"] == "run_finished" and bodies[0]["status"] == "succeeded"
    assert "notify:" not in proc.stderr


def test_a_client_error_is_not_retried_and_is_reported(project: Project, hook: Hook) -> None:
    hook.codes = [404]
    notify_config(project, f'webhook = "{hook.url}"\nevents = ["run_finished"]\n')
    project.write("t.yaml", "tasks:\n  - {id: a, agent: w, prompt: hi, output: a.md}\n")
    proc = project.run("t.yaml")
    assert proc.returncode == 0, proc.stderr  # a notification never fails the run
    assert len(hook.posts) == 1
    port = hook.url.split(":")[2].split("/")[0]
    assert (f"notify: webhook http://127.0.0.1:{port} failed for run_finished after 1 try: "
            "HTTP 404") in proc.stderr
    assert "SECRET-PATH" not in proc.stderr  # a webhook's path may be its secret


def test_a_webhook_that_never_answers_does_not_hold_the_run(
        project: Project, silent_url: str) -> None:
    """Each try may take 120 s: a run that waited for one would outlast the CLI's timeout
    below; instead the task after the failed one runs at once, and the run ends
    `DRAIN_S` after its last task with the two undelivered notifications logged."""
    notify_config(project, f'webhook = "{silent_url}"\ntimeout = 120\nretries = 0\n')
    project.write("t.yaml", """\
        tasks:
          - {id: bad, agent: w, prompt: "exit=3", output: bad.md}
          - {id: after, agent: w, prompt: "sleep=1", output: after.md, dependencies: [bad]}
          - {id: other, agent: w, prompt: "sleep=1", output: other.md}
        settings: {max_retries: 0, on_failure: continue, max_parallel: 1}
    """)
    t0 = time.monotonic()
    proc = project.run("t.yaml", timeout=DRAIN_S + 60)
    took = time.monotonic() - t0
    assert proc.returncode == 1, proc.stderr
    report = project.report()
    statuses = {t["id"]: t["status"] for t in report["tasks"]}  # type: ignore[union-attr]
    assert statuses == {"bad": "failed", "after": "skipped", "other": "succeeded"}
    assert ("notify: gave up on 2 notifications (task_failed, run_finished) at the end of "
            f"run {report['run_id']}") in proc.stderr
    assert took < 120, took  # (measured: about DRAIN_S + 2 s)


def test_a_task_the_merge_queue_could_not_merge_is_told_once(
        project: Project, hook: Hook) -> None:
    """Its verdict comes after the tasks ran: told once, before run_finished."""
    make_repo(project.root, {"f.txt": FIVE_LINES})
    project.write(".aiwg/dispatch.toml", f'[notify]\nwebhook = "{hook.url}"\n')
    project.write("t.yaml", """\
        settings: {isolation: worktree, merge: branch, max_parallel: 1, max_retries: 0}
        tasks:
          - {id: x, agent: shell, prompt: "sed -i 's/^c$/X/' f.txt", output: x.md}
          - {id: y, agent: shell, prompt: "sed -i 's/^c$/Y/' f.txt", output: y.md}
    """)
    proc = project.run("t.yaml")
    assert proc.returncode == 1, proc.stderr
    conflict, finished = hook.bodies()
    assert (conflict["event"], conflict["task"], conflict["status"]) == (
        "task_failed", "y", "conflict")
    assert "f.txt" in conflict["error"]
    assert finished["event"] == "run_finished" and finished["summary"] == {
        "succeeded": 1, "conflict": 1}


def test_the_daemons_runs_notify_too(project: Project, hook: Hook) -> None:
    """`watch` runs each file through the same `run_spec`: its runs notify alike, and a
    file's run_finished names that file and its own report."""
    notify_config(project, f'webhook = "{hook.url}"\n')
    d = Daemon(project)
    try:
        d.wait_log("watching")
        project.write(".aiwg/tasks/pipe.yaml", FAILING)
        report = wait_report(project, "pipe")
        assert wait_until(lambda: len(hook.posts) >= 2, WAIT), hook.posts
    finally:
        assert d.stop() == 0
    failed, finished = hook.bodies()
    assert (failed["event"], failed["task"]) == ("task_failed", "bad")
    assert finished["event"] == "run_finished" and finished["run_id"] == report["run_id"]
    assert finished["task_file"] == str(project.root / ".aiwg/tasks/pipe.yaml")
    assert finished["report"] == str(project.root / ".aiwg/working/pipe/dispatch-report.md")


COMMAND = """\
import json, os, sys
event = json.load(sys.stdin)
with open(sys.argv[1], "a") as fh:
    fh.write(json.dumps({"stdin": event, "env": {k: v for k, v in os.environ.items()
                                                 if k.startswith("DISPATCH_EVENT")},
                         "cwd": os.getcwd()}) + "\\n")
sys.exit(int(sys.argv[2]))
"""


def test_a_command_gets_the_event_on_stdin(project: Project) -> None:
    script = project.write("notify.py", COMMAND)
    got = project.root / "got.jsonl"
    notify_config(project, f"command = [{json.dumps(sys.executable)}, "
                           f'"{script}", "{got}", "0"]\n')
    project.write("t.yaml", FAILING)
    proc = project.run("t.yaml")
    assert proc.returncode == 1, proc.stderr
    calls = [json.loads(line) for line in got.read_text().splitlines()]
    assert [c["stdin"]["event"] for c in calls] == ["task_failed", "run_finished"]
    failed = calls[0]
    assert failed["stdin"]["task"] == "bad" and failed["cwd"] == str(project.root)
    assert failed["env"]["DISPATCH_EVENT"] == "task_failed"
    assert failed["env"]["DISPATCH_EVENT_TASK"] == "bad"
    assert failed["env"]["DISPATCH_EVENT_STATUS"] == "failed"
    assert failed["env"]["DISPATCH_EVENT_RUN"] == project.report()["run_id"]
    assert failed["env"]["DISPATCH_EVENT_TEXT"] == failed["stdin"]["text"]
    assert calls[1]["env"]["DISPATCH_EVENT_TASK"] == ""
    assert "notify:" not in proc.stderr


def test_a_failing_command_is_retried_then_reported(project: Project) -> None:
    script = project.write("notify.py", COMMAND)
    got = project.root / "got.jsonl"
    notify_config(project, f"command = [{json.dumps(sys.executable)}, "
                           f'"{script}", "{got}", "7"]\nretries = 1\n'
                           'events = ["run_finished"]\n')
    project.write("t.yaml", "tasks:\n  - {id: a, agent: w, prompt: hi, output: a.md}\n")
    proc = project.run("t.yaml")
    assert proc.returncode == 0, proc.stderr
    assert len(got.read_text().splitlines()) == 2
    assert f"notify: command {sys.executable} failed for run_finished after 2 tries: exit 7" \
        in proc.stderr


def test_a_stalled_task_is_notified_as_stalled(project: Project, hook: Hook) -> None:
    notify_config(project, f'webhook = "{hook.url}"\nevents = ["task_stalled"]\n')
    project.write("t.yaml", """\
        tasks:
          - {id: quiet, agent: w, prompt: hang, output: q.md, idle_timeout: 1000}
        settings: {max_retries: 0}
    """)
    proc = project.run("t.yaml")
    assert proc.returncode == 1, proc.stderr
    (stalled,) = hook.bodies()  # only the events asked for: no run_finished
    assert (stalled["event"], stalled["task"], stalled["status"]) == (
        "task_stalled", "quiet", "stalled")
    assert "no output for 1s" in stalled["error"]


def test_a_pool_waiting_for_quota_is_notified_once(
        project: Project, tmp_path: Path, hook: Hook) -> None:
    """The openai stub admits two requests at a time and refuses the third with a real
    429: the pool pauses, which is told once however many tasks wait in it."""
    with OpenAIChatStub.running() as server:
        server.limiter = Limiter(Limits(concurrency=2, delay_s=2.0))
        ap = make_agent_project(project, tmp_path)
        ap.define("assistant", "You are terse.")
        configure(ap, server, "m",
                  f'\n[notify]\nwebhook = "{hook.url}"\nevents = ["quota_wait"]\n')
        ap.tasks("tasks:\n" + "".join(
            f"  - {{id: t{i}, agent: assistant, prompt: hi, output: t{i}.md, retries: 0}}\n"
            for i in range(4)))
        proc = ap.run("t.yaml", "--max-parallel", "4")
        rejected = server.limiter.stats()["rejected"]
    assert proc.returncode == 0, proc.stderr
    assert rejected >= 1
    (wait,) = hook.bodies()
    assert (wait["event"], wait["status"], wait["pool"]) == (
        "quota_wait", "waiting_for_quota", "openai")
    assert wait["task"] in {"t0", "t1", "t2", "t3"} and "429" in wait["error"]
    assert wait["wait_s"] > 0 and "is waiting for quota" in wait["text"]


@pytest.mark.parametrize(("body", "line", "message"), [
    ('webhook = "ftp://example.com/x"\n', 6, "notify.webhook: Value error, webhook must be "
                                             "an http:// or https:// URL with a host"),
    ('webhook = "https://example.com/x"\nevents = ["run_done"]\n', 7, "notify.events.0: "),
    ('command = "notify-send done"\n', 6, "notify.command: Input should be a valid list"),
    ('timeout = 5\n', 5, "notify: Value error, set webhook"),
    ('webhook = "https://example.com/x"\nretries = 99\n', 7, "notify.retries: "),
    ('command = ["true"]\ntimeout = true\n', 7, "notify.timeout: Input should be a valid "
                                              "number"),
    ('command = ["true"]\nformat = "slack"\n', 5, "notify: Value error, format applies "
                                                   "to the webhook only"),
])
def test_invalid_notify_config_exits_2_with_its_line(
        project: Project, body: str, line: int, message: str) -> None:
    notify_config(project, body)  # [notify] is line 5: the test agent's table comes first
    project.write("t.yaml", "tasks:\n  - {id: a, agent: w, prompt: hi, output: a.md}\n")
    proc = project.run("t.yaml")
    assert proc.returncode == 2, proc.stderr
    assert f".aiwg/dispatch.toml:{line}: error: {message}" in proc.stderr, proc.stderr
    assert not (project.root / ".aiwg/working").exists()
