"""Notifications (`[notify]` in dispatch.toml): tell a webhook and/or a command when a run
finishes, a task fails or stalls, or a pool waits for quota.

A `NotifyingProgress` tees the run's progress to the real display and to a `Notifier`,
so the scheduler knows nothing of it (ninja's `Status` is an observer too).  Delivery
never slows the run: an event is put on a bounded queue without waiting (dropped, and
said so, when the queue is full) and one background trio task per run sends them in
order.  Each delivery has `timeout` seconds per try and `retries` more tries (1 s, 2 s,
4 s... apart); a failure is said in the progress stream (or logged once the run's
display is done), never raised.

Cancellation contract of `notifying`: when the run it wraps returns, what is still
queued gets `DRAIN_S` seconds, then it is dropped with one log line; when the run
raises (or is cancelled) the queue is dropped at once.  A command being run is killed
with its whole process group (`process.run_in_group`), so no notifier outlives its run.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import trio

from .config import NotifyConfig, NotifyEvent
from .events import AgentEvent
from .fmt import now_iso, plural
from .process import run_in_group
from .progress import NullProgress, Progress, one_line
from .report import REPORT_MD
from .result import COUNTED, MERGE_PROBLEMS, PROBLEMS, RunResult, TaskRecord, TaskStatus, verb

if TYPE_CHECKING:
    import httpx

    from .quota import Governor

log = logging.getLogger("parallel_dispatch.notify")

QUEUE_SIZE = 64
"""Events waiting for delivery; past it new ones are dropped (a webhook down for the
whole of a 1,000-task run must not hold 1,000 bodies)."""
DRAIN_S = 10.0
"""How long the end of a run waits for notifications still queued or being sent."""
BACKOFF_S = 1.0
"""Pause before the first retry, doubled before each next one."""
QUOTA_QUIET_S = 60.0
"""At most one `quota_wait` per pool in this time (and one per pause of the pool)."""
RETRIED_HTTP = frozenset({408, 425, 429})
"""4xx answers worth another try; any other 4xx (and 3xx) means the request is wrong."""
OUTPUT_TAIL = 300
"""Bytes of a failed command's output quoted in the failure line."""


def target_name(url: str) -> str:
    """A webhook as shown in messages: scheme and host only, since a Slack-style URL
    carries its secret in the path."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def _base(kind: NotifyEvent, result: RunResult) -> dict[str, Any]:
    spec = result.spec
    return {"event": kind, "run_id": result.run_id, "time": now_iso(),
            "project": str(spec.root), "task_file": str(spec.path.absolute()),
            "name": spec.name}


def task_event(kind: NotifyEvent, rec: TaskRecord, result: RunResult,
               **extra: Any) -> dict[str, Any]:
    """The documented object for one task's event (README "Notifications")."""
    spec = result.spec
    body = _base(kind, result)
    body.update(task=rec.id, agent=rec.agent, status=str(rec.status),
                error=rec.error or rec.reason,
                attempts=rec.attempts, log=str(rec.log_path),
                report=str(spec.settings.output_dir / REPORT_MD), **extra)
    where = f"{spec.display}, run {result.run_id}"
    if kind == "quota_wait":
        wait = extra.get("wait_s") or 0.0
        pause = f"paused for {wait:.0f}s" if wait > 0 else "slowed down"
        text = (f"pool '{extra.get('pool')}' is waiting for quota ({where}): task "
                f"'{rec.id}' was refused ({rec.error}); {pause}")
    else:
        text = f"task '{rec.id}' {verb(rec.status)} ({where})"
        if body["error"]:
            text += f": {body['error']}"
    body["text"] = one_line(f"{rec.status.mark} {text}")
    return body


def run_event(result: RunResult) -> dict[str, Any]:
    """The documented object for `run_finished`."""
    body = _base("run_finished", result)
    counts = {str(s): result.count(s) for s in COUNTED if result.count(s)}
    problems = sum(result.count(s) for s in PROBLEMS)
    report = result.report_md_path
    body.update(task=None, status=str(result.status),
                error=(f"{plural(problems, 'task')} did not succeed" if problems else None),
                report=str(report) if report is not None else None,
                summary=counts, wall_s=round(result.wall_s, 3))
    shown = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in counts.items())
    text = (f"run of '{result.spec.name}' ({result.spec.display}) {result.status}: "
            f"{shown or 'no tasks'} in {result.wall_s:.1f}s")
    if report is not None:
        text += f"; report {report}"
    body["text"] = one_line(text)
    return body


def slack_body(event: dict[str, Any]) -> dict[str, Any]:
    """Slack's incoming-webhook shape; `&`, `<` and `>` are escaped as Slack asks."""
    text = str(event["text"]).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return {"text": f"parallel-dispatch: {text}"}


def command_env(event: dict[str, Any]) -> dict[str, str]:
    """The command's environment: ours plus the event's main fields."""
    env = dict(os.environ)
    for name, key in (("DISPATCH_EVENT", "event"), ("DISPATCH_EVENT_RUN", "run_id"),
                      ("DISPATCH_EVENT_TASK", "task"), ("DISPATCH_EVENT_STATUS", "status"),
                      ("DISPATCH_EVENT_TEXT", "text"), ("DISPATCH_EVENT_REPORT", "report")):
        value = event.get(key)
        env[name] = "" if value is None else str(value)
    return env


class Notifier:
    """The run's queue and the one task that drains it (`deliver`)."""

    def __init__(self, config: NotifyConfig, say: Callable[[str], None]) -> None:
        self.config = config
        self.say = say
        self.send, self.receive = trio.open_memory_channel[dict[str, Any]](QUEUE_SIZE)
        self.dropped = 0
        self.sending: dict[str, Any] | None = None
        self.done = trio.Event()
        self._client: httpx.AsyncClient | None = None

    def put(self, event: dict[str, Any]) -> None:
        """Queue an event without waiting; a full queue drops it."""
        try:
            self.send.send_nowait(event)
        except trio.WouldBlock:
            self.dropped += 1
            if self.dropped == 1:
                self.say(f"notify: {QUEUE_SIZE} notifications are waiting already; dropping "
                         f"{event['event']} and any more until the queue empties")
        except trio.ClosedResourceError:
            self.dropped += 1

    async def deliver(self) -> None:
        """Send each queued event in turn until the queue is closed and empty."""
        try:
            async for event in self.receive:
                self.sending = event
                async with trio.open_nursery() as nursery:
                    if self.config.webhook is not None:
                        nursery.start_soon(self._webhook, event, self.config.webhook)
                    if self.config.command is not None:
                        nursery.start_soon(self._command, event, self.config.command)
                self.sending = None
            self.done.set()
        finally:
            if self._client is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await self._client.aclose()

    def left(self) -> list[str]:
        """The events not delivered yet (the one being sent first)."""
        waiting = [self.sending] if self.sending is not None else []
        while True:
            try:
                waiting.append(self.receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        return [str(e["event"]) for e in waiting]

    async def _tries(self, event: dict[str, Any], target: str,
                     attempt: Callable[[], Awaitable[tuple[str, bool] | None]]) -> None:
        """Run `attempt` (which returns an error text, or None when delivered) until it
        succeeds, says not to retry (`(text, False)`), or the tries are used up."""
        tries = self.config.retries + 1
        error = ""
        for n in range(tries):
            if n:
                await trio.sleep(BACKOFF_S * 2 ** (n - 1))
            outcome = await attempt()
            if outcome is None:
                return
            error, retry = outcome
            if not retry:
                tries = n + 1
                break
        what = event["event"] + (f" ({event['task']})" if event.get("task") else "")
        self.say(f"notify: {target} failed for {what} after {plural(tries, 'try', 'tries')}: "
                 f"{error}")

    async def _webhook(self, event: dict[str, Any], url: str) -> None:
        import httpx  # imported here: runs without [notify] never pay for it

        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.config.timeout))
        client = self._client
        body = slack_body(event) if self.config.format == "slack" else event
        data = json.dumps(body, ensure_ascii=False).encode()
        timeout = self.config.timeout

        async def post() -> tuple[str, bool] | None:
            try:
                with trio.fail_after(timeout):
                    resp = await client.post(url, content=data, headers={
                        "Content-Type": "application/json",
                        "User-Agent": "parallel-dispatch-notify"})
            except trio.TooSlowError:
                return f"no answer within {timeout:g}s (timeout)", True
            except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
                return f"not a usable URL ({exc})", False
            except httpx.HTTPError as exc:
                return f"{type(exc).__name__}: {exc}", True
            if 200 <= resp.status_code < 300:
                return None
            code = resp.status_code
            return f"HTTP {code}", code >= 500 or code in RETRIED_HTTP

        await self._tries(event, f"webhook {target_name(url)}", post)

    async def _command(self, event: dict[str, Any], argv: list[str]) -> None:
        data = json.dumps(event, ensure_ascii=False).encode() + b"\n"
        env = command_env(event)
        timeout = self.config.timeout
        cwd = event["project"]

        async def run() -> tuple[str, bool] | None:
            with tempfile.TemporaryFile() as out:
                try:
                    with trio.move_on_after(timeout) as deadline:
                        done = await run_in_group(argv, cwd=cwd, env=env, stdin=data,
                                                  stdout=out, stderr=out)
                except OSError as exc:
                    return f"cannot start {argv[0]}: {exc.strerror or exc}", False
                if deadline.cancelled_caught:
                    return f"still running after {timeout:g}s; killed", True
                if done.returncode == 0:
                    return None
                out.seek(0, os.SEEK_END)
                out.seek(max(0, out.tell() - OUTPUT_TAIL))
                tail = one_line(out.read().decode(errors="replace").strip())
                return f"exit {done.returncode}" + (f": {tail}" if tail else ""), True

        await self._tries(event, f"command {argv[0]}", run)


class NotifyingProgress:
    """A `Progress` that shows everything through `inner` and hands the events someone
    may want to hear about to the notifier."""

    def __init__(self, inner: Progress, config: NotifyConfig) -> None:
        self.inner = inner
        self.config = config
        self.notifier = Notifier(config, self.say)
        self.result: RunResult | None = None
        self.finished = False
        self._quiet_until: dict[str, float] = {}

    def say(self, text: str) -> None:
        """A notifier's trouble: on the run's display while it lasts, else in the log."""
        if self.finished or isinstance(self.inner, NullProgress):
            log.warning("%s", text)
        else:
            self.inner.note(text)

    def _emit(self, kind: NotifyEvent, make: Callable[[RunResult], dict[str, Any]]) -> None:
        if kind in self.config.events and self.result is not None:
            self.notifier.put(make(self.result))

    # -- the Progress protocol ------------------------------------------------------------
    def run_started(self, result: RunResult) -> None:
        self.result = result
        self.inner.run_started(result)

    def task_started(self, rec: TaskRecord) -> None:
        self.inner.task_started(rec)

    def task_event(self, rec: TaskRecord, event: AgentEvent) -> None:
        self.inner.task_event(rec, event)

    def task_retrying(self, rec: TaskRecord, delay: float) -> None:
        self.inner.task_retrying(rec, delay)

    def task_waiting(self, rec: TaskRecord, pool: str, wait_s: float) -> None:
        self.inner.task_waiting(rec, pool, wait_s)
        now = trio.current_time()
        if now < self._quiet_until.get(pool, -1.0):
            return  # this pool's pause was told already
        self._quiet_until[pool] = now + max(wait_s, QUOTA_QUIET_S)
        self._emit("quota_wait", lambda r: task_event("quota_wait", rec, r, pool=pool,
                                                      wait_s=round(wait_s, 3)))

    def task_finished(self, rec: TaskRecord) -> None:
        self.inner.task_finished(rec)
        if rec.status == TaskStatus.STALLED:
            self._emit("task_stalled", lambda r: task_event("task_stalled", rec, r))
        elif rec.status in PROBLEMS:
            self._emit("task_failed", lambda r: task_event("task_failed", rec, r))

    def note(self, text: str) -> None:
        self.inner.note(text)

    def task_merged(self, rec: TaskRecord, text: str) -> None:
        self.inner.task_merged(rec, text)

    def run_finished(self, result: RunResult) -> None:
        """A task the merge queue could not merge is told here, once its verdict is
        final: during the merge a conflict may be announced, re-run and resolved."""
        self.inner.run_finished(result)
        self.finished = True
        self.result = result
        for rec in result.records:
            if rec.status in MERGE_PROBLEMS:
                self._emit("task_failed", partial(task_event, "task_failed", rec))
        self._emit("run_finished", run_event)

    # -- what `run_spec` looks for on a live display ---------------------------------------
    def redraw(self) -> None:
        redraw = getattr(self.inner, "redraw", None)
        if callable(redraw):
            redraw()

    def watch_pools(self, governor: Governor, clock: Callable[[], float]) -> None:
        watch = getattr(self.inner, "watch_pools", None)
        if callable(watch):
            watch(governor, clock)


@asynccontextmanager
async def notifying(config: NotifyConfig, progress: Progress) -> AsyncIterator[NotifyingProgress]:
    """Deliver the notifications of the run inside the block (see the module docstring
    for what happens to those still pending when it ends)."""
    tee = NotifyingProgress(progress, config)
    notifier = tee.notifier
    async with trio.open_nursery() as nursery:
        nursery.start_soon(notifier.deliver)
        try:
            yield tee
        except BaseException:
            nursery.cancel_scope.cancel()
            raise
        notifier.send.close()
        tee.finished = True
        with trio.move_on_after(DRAIN_S):
            await notifier.done.wait()
        if not notifier.done.is_set():
            left = notifier.left()
            log.warning("notify: gave up on %s (%s) at the end of run %s: still not "
                        "delivered after %gs", plural(len(left), "notification"),
                        ", ".join(left), tee.result.run_id if tee.result else "?", DRAIN_S)
        if notifier.dropped:
            log.warning("notify: %s dropped: the queue of %d was full",
                        plural(notifier.dropped, "notification"), QUEUE_SIZE)
        nursery.cancel_scope.cancel()
