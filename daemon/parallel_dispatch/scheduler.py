"""Starts jobs and records their results (ninja's `Builder`).

All attempts of a run live in one trio nursery.  The loop starts the most
urgent ready task whenever a slot is free, so there is no barrier between
waves.  Each attempt gets its deadline as a cancel scope opened right where the
timeout is decided; `stop` and interrupts cancel the per-attempt scopes.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass

import trio

from .events import CAUSES, Activity, AgentEvent
from .fmt import plural
from .incremental import Reuse
from .model import MAX_BACKOFF_S
from .plan import Plan
from .progress import NullProgress, Progress
from .result import PROBLEMS, RunResult, TaskRecord, TaskStatus, verb
from .runners.base import Job, Outcome, Runner
from .spec import DispatchSpec

_DEADLINES = (TaskStatus.TIMEOUT, TaskStatus.STALLED)
"""Ended by the scheduler's clock, not by the agent: always worth another attempt."""


@dataclass
class _Finished:
    index: int
    attempt: int
    status: TaskStatus | None
    """How the attempt ended; None: it never started (stopped while queued)."""
    outcome: Outcome | None
    start: float
    end: float
    last_event: AgentEvent | None = None
    last_event_text: str | None = None
    """'last event 3 s ago: …', as it read when the attempt ended."""


@dataclass
class _RetryDue:
    index: int


class Scheduler:
    """Runs one `DispatchSpec` to completion with a `Runner`."""

    def __init__(
        self,
        spec: DispatchSpec,
        runner: Runner,
        result: RunResult,
        *,
        progress: Progress | None = None,
        durations: Mapping[str, float] | None = None,
        rng: random.Random | None = None,
        on_task_done: Callable[[TaskRecord], None] | None = None,
        reuse: Reuse | None = None,
        limiter: trio.CapacityLimiter | None = None,
    ) -> None:
        self.spec = spec
        self.runner = runner
        self.result = result
        self.records = result.records
        self.progress = progress or NullProgress()
        self.rng = rng or random.Random()
        self.on_task_done = on_task_done
        self.reuse = reuse
        self.limiter = limiter
        """A slot pool shared with other runs (the daemon's global --max-parallel)."""
        self._instant: Callable[[Job], Outcome] | None = (
            getattr(runner, "run_now", None) if reuse is None and limiter is None else None)
        weights = _weights(spec, durations or {})
        rest = spec.graph.remaining_path(weights)
        self.plan = Plan(spec.graph, rest)
        self.result.critical_path = [
            spec.graph.ids[i] for i in spec.graph.critical_path(weights, rest)]
        self._scopes: dict[int, trio.CancelScope] = {}
        self._started: dict[int, float] = {}
        self._backoffs: dict[int, trio.CancelScope] = {}
        self._stopping: str | None = None
        self._t0 = 0.0
        self.spent_usd = 0.0
        """Cost reported by finished attempts, for the `max_cost_usd` budget."""
        self._budget_note: str | None = None
        self._rejected: dict[tuple[object, ...], str] = {}
        """Credential key → the task whose provider rejected those credentials."""
        self._blocked: dict[int, str] = {}
        """Attempts cancelled because their runner's credentials were rejected."""
        self._finished = False
        """The loop ran to its end (False: cancelled from outside, or a runner raised)."""
        self._closed = False

    # -- public control -----------------------------------------------------------
    def interrupt(self, why: str = "run interrupted") -> None:
        """Cancel running attempts and start nothing more (Ctrl-C, SIGTERM, file changed)."""
        self.result.interrupted = True
        self._stop(why)

    def _stop(self, why: str) -> None:
        if self._stopping is None:
            self._stopping = why
        for scope in [*self._scopes.values(), *self._backoffs.values()]:
            scope.cancel()

    # -- the loop -------------------------------------------------------------------
    async def run(self) -> RunResult:
        """Run the spec to the end and return the result, every record settled.

        Cancellation contract: `run` may be cancelled from outside (an enclosing
        `trio.move_on_after`, a caller's nursery).  Running attempts are then
        cancelled like on `interrupt()` (each runner kills what it started), and
        before `trio.Cancelled` propagates every record is settled: an attempt cut
        off becomes `cancelled`, a retry waiting out its backoff keeps its last
        failure, tasks not started become `skipped`, and `result.interrupted` is set.
        So whatever the caller writes in its own `finally` (the reports) holds only
        the statuses of the contract, never `running` or `pending`.  The same holds
        when a runner's bug escapes as an exception.
        """
        send, recv = trio.open_memory_channel[_Finished | _RetryDue](math.inf)
        self._t0 = trio.current_time()
        try:
            await self._loop(send, recv)
        finally:
            self._close_leftovers()
            self.result.wall_s = trio.current_time() - self._t0
        return self.result

    async def _loop(self, send: trio.MemorySendChannel[_Finished | _RetryDue],
                    recv: trio.MemoryReceiveChannel[_Finished | _RetryDue]) -> None:
        running = 0
        async with trio.open_nursery() as nursery:
            while True:
                while (self._stopping is None and running < self.spec.settings.max_parallel
                       and self.plan.has_ready() and not self._over_budget()):
                    i = self.plan.pop_ready()
                    if self._credentials_rejected(i):
                        continue
                    if self._instant is not None:  # e.g. a dry run: no task, no await
                        unsettled = self._run_instantly(i, self._instant)
                        if unsettled is not None:
                            self._handle(unsettled, nursery, send)
                        continue
                    running += 1
                    nursery.start_soon(self._attempt, i, send)
                if running == 0 and not self._backoffs:
                    break
                msg = await recv.receive()
                if isinstance(msg, _RetryDue):
                    self._backoffs.pop(msg.index, None)
                    if self._stopping is None:
                        self.plan.requeue(msg.index)
                    else:
                        self._finish_record(msg.index)
                    continue
                running -= 1
                self._handle(msg, nursery, send)
        self._finished = True

    def _run_instantly(self, i: int, run_now: Callable[[Job], Outcome]) -> _Finished | None:
        """Runners that finish at once (`run_now`) need no task, slot or deadline.

        A plain success (a dry run's every task) is settled right here, as `_handle`
        would settle it; anything else is returned for `_handle`.
        """
        rec = self.records[i]
        rec.attempts += 1
        now = self._now()
        rec.start_s = now
        self.progress.task_started(rec)
        outcome = run_now(Job(self.spec, i, rec.attempts, self.result.run_id))
        if outcome.ok and not outcome.metrics:
            rec.end_s = now
            rec.exit_code = outcome.exit_code
            rec.last_event = rec.cause = None
            self._succeeded(i, rec)
            return None
        status = TaskStatus.SUCCEEDED if outcome.ok else TaskStatus.FAILED
        return _Finished(i, rec.attempts, status, outcome, now, now)

    def _over_budget(self) -> bool:
        """Whether reported costs reached `max_cost_usd`: then nothing new starts."""
        budget = self.spec.settings.max_cost_usd
        if budget is None or self.spent_usd < budget:
            return False
        if self._budget_note is None:
            self._budget_note = f"budget reached (max_cost_usd ${budget:g})"
        return True

    async def _attempt(self, i: int, send: trio.MemorySendChannel[_Finished | _RetryDue]) -> None:
        """One attempt of task `i`, from the cache check through waiting for a slot to the end.

        `_stop` cancels `stop_scope` wherever the attempt is: a task still queued
        for a (global) slot never starts, and a running one is cancelled.
        """
        rec = self.records[i]
        msg: _Finished | None = None
        with trio.CancelScope() as stop_scope:
            self._scopes[i] = stop_scope
            if self._stopping is not None:
                stop_scope.cancel()
            if rec.attempts == 0 and self.reuse is not None and await self.reuse.lookup(i):
                now = self._now()
                msg = _Finished(i, 0, TaskStatus.CACHED, None, now, now)
            else:
                async with self.limiter if self.limiter is not None else nullcontext():
                    await trio.lowlevel.checkpoint_if_cancelled()
                    msg = await self._attempt_in_slot(i, rec)
        self._scopes.pop(i, None)
        started = self._started.pop(i, None)
        if msg is None:
            now = self._now()
            status = TaskStatus.CANCELLED if started is not None else None
            msg = _Finished(i, rec.attempts, status, None, started or now, now)
        send.send_nowait(msg)

    async def _attempt_in_slot(self, i: int, rec: TaskRecord) -> _Finished:
        rec.attempts += 1
        rec.event = None
        activity = Activity(on_event=lambda ev: self._on_event(rec, ev))
        job = Job(self.spec, i, rec.attempts, self.result.run_id, activity=activity)
        start = self._started[i] = self._now()
        if rec.start_s is None:
            rec.start_s = start
        rec.status = TaskStatus.RUNNING
        self.progress.task_started(rec)
        outcome: Outcome | None = None
        idle_s = self.spec.idle_timeout_s(i)
        # Both deadlines are decided here, so this is where their cancel scopes open: the
        # task's timeout, and the idle deadline that each line of agent output pushes on.
        with trio.move_on_after(self.spec.timeout_s(i)) as deadline:
            with trio.CancelScope() as idle:
                if idle_s is not None:
                    activity.arm_idle(idle, idle_s)
                try:
                    outcome = await self.runner.run(job)
                except Exception as exc:  # a runner bug must not take the run down
                    outcome = Outcome(ok=False, error=f"runner error: {exc!r}",
                                      retryable=False)
        if deadline.cancelled_caught:
            status = TaskStatus.TIMEOUT
        elif idle.cancelled_caught or outcome is None:
            status = TaskStatus.STALLED
        elif outcome.ok:
            status = TaskStatus.SUCCEEDED
        elif outcome.cause is not None:
            status = TaskStatus.PROVIDER_ERROR
        else:
            status = TaskStatus.FAILED
        if status == TaskStatus.SUCCEEDED and self.reuse is not None:
            with trio.CancelScope(shield=True):  # the output is in place: record it
                await self.reuse.succeeded(i)
        return _Finished(i, rec.attempts, status, outcome, start, self._now(),
                         activity.last_event, activity.describe_last())

    def _on_event(self, rec: TaskRecord, ev: AgentEvent) -> None:
        rec.event = ev.text
        self.progress.task_event(rec, ev)

    def _succeeded(self, i: int, rec: TaskRecord) -> None:
        rec.status = TaskStatus.SUCCEEDED
        rec.error = None
        self.plan.succeeded(i)
        self._done(rec)

    def _handle(self, msg: _Finished, nursery: trio.Nursery,
                send: trio.MemorySendChannel[_Finished | _RetryDue]) -> None:
        i = msg.index
        rec = self.records[i]
        if msg.status is None and i not in self._blocked:
            return  # stopped while queued: `_close_leftovers` reports it as not started
        if i in self._blocked:  # cancelled because its runner's credentials were rejected
            rec.end_s = msg.end
            rec.busy_s += msg.end - msg.start
            rec.status = TaskStatus.PROVIDER_ERROR
            rec.cause = "auth"
            rec.error = self._blocked.pop(i)
            self._done(rec)
            self._fail(i, rec)
            return
        if msg.status == TaskStatus.CACHED:
            rec.status = TaskStatus.CACHED
            rec.start_s = rec.end_s = msg.end
            rec.reason = "unchanged since its last successful run; output reused"
            self.plan.succeeded(i)
            self._done(rec)
            return
        rec.end_s = msg.end
        rec.busy_s += msg.end - msg.start
        out = msg.outcome
        if out is not None:
            rec.exit_code = out.exit_code
            rec.error = out.error
            for key, value in out.metrics.items():
                if isinstance(value, int | float) and key in rec.metrics:
                    rec.metrics[key] += value
                else:
                    rec.metrics[key] = value
            cost = out.metrics.get("cost_usd")
            if isinstance(cost, int | float):
                self.spent_usd += cost
        status = msg.status
        assert status is not None  # an unstarted attempt was handled above
        rec.last_event = msg.last_event.text if msg.last_event is not None else None
        rec.cause = out.cause if out is not None and status == TaskStatus.PROVIDER_ERROR else None
        if status in _DEADLINES:
            rec.exit_code = None
            error = self._deadline_error(i, status, msg)
            ev = msg.last_event
            if ev is not None and ev.cause is not None:
                # The agent was waiting on the provider when the deadline hit: say so.
                status = TaskStatus.PROVIDER_ERROR
                rec.cause = ev.cause
                error = f"{CAUSES[ev.cause]}: {error}"
            runner = self.spec.agents[i].runner
            rec.error = f"{runner} runner: {error}" if runner else error
        if status == TaskStatus.CANCELLED:
            rec.error = f"cancelled: {self._stopping or 'run stopped'}"
        if status == TaskStatus.SUCCEEDED:
            self._succeeded(i, rec)
            return
        retryable = msg.status in _DEADLINES or (out is not None and out.retryable)
        if (status in PROBLEMS and retryable
                and self._stopping is None and rec.attempts < self.spec.max_attempts(i)):
            rec.status = status
            delay = max(self._backoff(i, rec.attempts), (out and out.retry_after) or 0.0)
            self.progress.task_retrying(rec, delay)
            scope = trio.CancelScope()
            self._backoffs[i] = scope
            nursery.start_soon(self._sleep_then_retry, i, delay, scope, send)
            return
        rec.status = status
        self._done(rec)
        if status == TaskStatus.PROVIDER_ERROR and rec.cause == "auth":
            self._reject_credentials(i, rec)
        self._fail(i, rec)

    def _deadline_error(self, i: int, status: TaskStatus, msg: _Finished) -> str:
        if status == TaskStatus.TIMEOUT:
            text = f"timed out after {self.spec.timeout_s(i):g}s"
        else:
            text = f"stalled: no output for {self.spec.idle_timeout_s(i):g}s"
        last = msg.last_event_text or "the agent printed no event"
        return f"{text} ({last}); the agent's process group was killed"

    # -- bad credentials: one clear failure, not one per task ---------------------------
    def _credential_key(self, i: int) -> tuple[object, ...] | None:
        """Tasks sharing a runner preset and its environment share credentials."""
        agent = self.spec.agents[i]
        if agent.runner is None:
            return None
        return (agent.runner, tuple(sorted(agent.env.items())))

    def _reject_credentials(self, i: int, rec: TaskRecord) -> None:
        """Stop every other task of this runner: they would be refused the same way."""
        key = self._credential_key(i)
        if key is None or key in self._rejected:
            return
        self._rejected[key] = rec.id
        runner = self.spec.agents[i].runner
        others = 0
        for j, scope in list(self._scopes.items()):
            if j != i and self._credential_key(j) == key:
                self._blocked[j] = self._rejected_message(j)
                scope.cancel()
                others += 1
        for j, scope in list(self._backoffs.items()):
            if self._credential_key(j) == key:
                scope.cancel()
        self.result.notes.append(
            f"Bad credentials for the {runner} runner (task '{rec.id}'): {rec.error}. "
            f"Its other tasks were stopped or not started.")
        if others:
            self.progress.note(f"{runner} runner: bad credentials; stopping "
                               f"{plural(others, 'running task')} of it")

    def _rejected_message(self, i: int) -> str:
        key = self._credential_key(i)
        first = self._rejected.get(key) if key is not None else None
        runner = self.spec.agents[i].runner
        return (f"bad credentials: the {runner} runner's credentials were rejected in task "
                f"'{first}'; not run")

    def _credentials_rejected(self, i: int) -> bool:
        """A ready task whose runner's credentials were rejected ends at once."""
        key = self._credential_key(i)
        if key is None or key not in self._rejected:
            return False
        rec = self.records[i]
        rec.status = TaskStatus.PROVIDER_ERROR
        rec.cause = "auth"
        rec.error = self._rejected_message(i)
        self._done(rec)
        self._fail(i, rec)
        return True

    def _fail(self, i: int, rec: TaskRecord) -> None:
        if rec.status == TaskStatus.CANCELLED:
            return
        if self.spec.settings.on_failure == "stop" and self._stopping is None:
            self._stop(f"on_failure is 'stop' and task '{rec.id}' {verb(rec.status)}")
            return
        for d in self.plan.failed(i):
            dep = self.records[d]
            dep.status = TaskStatus.SKIPPED
            dep.reason = f"dependency '{rec.id}' {verb(rec.status)}"
            self._done(dep)

    def _backoff(self, i: int, attempt: int) -> float:
        """Exponential backoff with full jitter on top: min(base·2^(n-1), 1 h) · [1, 2)."""
        base = min(self.spec.settings.retry_backoff * (2.0 ** (attempt - 1)), MAX_BACKOFF_S)
        return base * (1 + self.rng.random())

    async def _sleep_then_retry(self, i: int, delay: float, scope: trio.CancelScope,
                                send: trio.MemorySendChannel[_Finished | _RetryDue]) -> None:
        with scope:
            await trio.sleep(delay)
        send.send_nowait(_RetryDue(i))

    def _finish_record(self, i: int) -> None:
        """A task whose retry was pending when the run stopped keeps its last failure."""
        rec = self.records[i]
        self.plan.failed(i)
        self._done(rec)

    def _close_leftovers(self) -> None:
        """Give every record not yet finished its final status (idempotent).

        After a normal end only tasks never started remain.  When `run` was cancelled
        from outside (or a runner raised), attempts may have been cut off mid-flight
        and retries left waiting: see the contract in `run`'s docstring.
        """
        if self._closed:
            return
        self._closed = True
        if not self._finished:
            self.result.interrupted = True
            if self._stopping is None:
                self._stopping = "the run was cancelled by its caller"
            for i in list(self._backoffs):
                self._backoffs.pop(i).cancel()
                self._finish_record(i)
            now = self._now()
            for i, start in list(self._started.items()):
                rec = self.records[i]
                self._started.pop(i)
                if rec.status != TaskStatus.RUNNING:
                    continue
                rec.status = TaskStatus.CANCELLED
                rec.error = f"cancelled: {self._stopping}"
                rec.end_s = now
                rec.busy_s += now - start
                self._done(rec)  # its dependents are drained below, as not started
        if self._budget_note is not None:
            budget = self.spec.settings.max_cost_usd
            self.result.notes.append(
                f"Budget reached: ${self.spent_usd:.4f} spent of max_cost_usd ${budget:g}; "
                "no new task was started after that (running ones finished).")
        why = self._stopping or self._budget_note or "not reached"
        for i in self.plan.drain():
            rec = self.records[i]
            if rec.status in (TaskStatus.PENDING, TaskStatus.RUNNING):
                rec.status = TaskStatus.SKIPPED
                rec.reason = f"not started: {why}"
                self._done(rec)

    def _done(self, rec: TaskRecord) -> None:
        self.progress.task_finished(rec)
        if self.on_task_done is not None:
            self.on_task_done(rec)

    def _now(self) -> float:
        return trio.current_time() - self._t0


def _weights(spec: DispatchSpec, durations: Mapping[str, float]) -> list[float]:
    """Recorded durations where known; the mean of those (or 1) elsewhere."""
    known = [durations[t] for t in spec.graph.ids if t in durations]
    default = (sum(known) / len(known)) if known else 1.0
    return [durations.get(t, default) for t in spec.graph.ids]
