"""Starts jobs and records their results (ninja's `Builder`).

All attempts of a run live in one trio nursery.  The loop starts the most
urgent ready task whenever a slot is free, so there is no barrier between
waves.  Each attempt gets its deadline as a cancel scope opened right where the
timeout is decided; `stop` and interrupts cancel the per-attempt scopes.

From outside (control.py, the same trio thread) one task can be cancelled
(`cancel_task`) or a finished one run again (`rerun_task`) while the run goes on.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass

import trio

from . import fanout, pricing
from .budget import Ledger, Usage, Verdict
from .events import CAUSES, Activity, AgentEvent
from .fmt import fmt_duration, plural
from .incremental import Reuse
from .model import MAX_BACKOFF_S
from .plan import Plan, expected_durations
from .progress import NullProgress, Progress
from .quota import MAX_QUOTA_WAITS, RATE_CAUSES, Governor, Parking, Pool, beyond_wait
from .result import COUNTED, PROBLEMS, RunResult, TaskRecord, TaskStatus, verb
from .runners.base import Job, Outcome, Runner
from .spec import DispatchSpec
from .writesets import clashes

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
    node: str | None = None
    """The cluster node it ran on (None: this machine)."""


@dataclass
class _RetryDue:
    index: int


@dataclass
class _Wake:
    """A pool may admit again (a slot freed elsewhere, a pause or spacing ended)."""


_Msg = _Finished | _RetryDue | _Wake


class Refused(Exception):
    """A control request (`cancel_task`, `rerun_task`) that cannot be honoured now; the
    message says why, for the person who asked."""


def _count_attempt(rec: TaskRecord, msg: _Finished) -> None:
    """What an ended attempt used, added to its task: time, node, cost and tokens."""
    rec.end_s = msg.end
    rec.busy_s += msg.end - msg.start
    if msg.node is not None:
        rec.nodes.append(msg.node)
    if msg.outcome is not None:
        pricing.add_attempt(rec.metrics, msg.outcome.metrics)


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
        governor: Governor | None = None,
        usage: Mapping[str, Usage] | None = None,
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
        self.governor = governor or Governor(rng=self.rng)
        """Runner and agent pools (quota.py); the daemon shares one across files."""
        self._pools: list[tuple[Pool, ...] | None] = [None] * len(spec.tasks)
        self._held: dict[int, tuple[tuple[Pool, int], ...]] = {}
        """Running task → the pools it holds a slot of, with its start epoch in each."""
        self._parked = Parking()
        """Ready tasks a pool refused for now."""
        self._timers: dict[float, trio.CancelScope] = {}
        self._wake_pending = False
        self._send: trio.MemorySendChannel[_Msg] | None = None
        self._signalled: set[int] = set()
        """Tasks whose running attempt already told its pool of a limit (a live event)."""
        self._write_pools = _write_pools(spec, self.governor)
        """Task → one single-slot pool per task whose `writes:` clash with its own."""
        self._quota_first: dict[int, float] = {}
        """Task → when its provider's limits first sent it waiting (`max_quota_wait`)."""
        self._instant: Callable[[Job], Outcome] | None = (
            getattr(runner, "run_now", None) if reuse is None and limiter is None else None)
        weights = expected_durations(spec.graph.ids, durations or {})
        rest = spec.graph.remaining_path(weights)
        self.plan = Plan(spec.graph, rest)
        self.result.critical_path = [
            spec.graph.ids[i] for i in spec.graph.critical_path(weights, rest)]
        self._scopes: dict[int, trio.CancelScope] = {}
        self._started: dict[int, float] = {}
        self._activities: dict[int, Activity] = {}
        """The live state of each running attempt (a cancelled one still names its node)."""
        self._backoffs: dict[int, trio.CancelScope] = {}
        self._stopping: str | None = None
        self._t0 = 0.0
        self.budget = Ledger(spec, usage)
        """Spent and reserved cost and tokens (`usage`: each task's last recorded usage)."""
        self._budget_note: str | None = None
        self._budget_held = False
        """A start waits for running attempts' reservations to settle (`_admit_budget`)."""
        self._budget_skips = 0
        self._rejected: dict[tuple[object, ...], str] = {}
        """Credential key → the task whose provider rejected those credentials."""
        self._blocked: dict[int, str] = {}
        """Attempts cancelled because their runner's credentials were rejected."""
        self._finished = False
        """The loop ran to its end (False: cancelled from outside, or a runner raised)."""
        self._closed = False
        self._open = False
        """The loop is running and may still start tasks (a re-run needs it)."""
        self._launched: set[int] = set()
        """Tasks with an attempt started in the nursery whose end is not handled yet."""
        self._cancels: dict[int, str] = {}
        """Tasks cancelled from outside → why, until they are settled `cancelled`."""
        self._forced: set[int] = set()
        """Tasks the cache must not answer for (re-run from outside)."""
        self._watchers: dict[int, list[trio.Event]] = {}
        """Task → events set when it is settled (`wait_done`)."""

    # -- public control -----------------------------------------------------------
    def interrupt(self, why: str = "run interrupted") -> None:
        """Cancel running attempts and start nothing more (Ctrl-C, SIGTERM, file changed)."""
        self.result.interrupted = True
        self._stop(why)

    def cancel_task(self, i: int, why: str) -> None:
        """Cancel task `i` wherever it is; it ends `cancelled` with `why` as its reason.

        A running attempt is cancelled like on `interrupt()` (its runner kills its
        process group) and settled when it has stopped; a task waiting (for its
        dependencies, a slot, a retry's backoff or quota) is settled now.  Its dependents
        are then treated as after any task that did not succeed (`_fail`: skipped, or
        the run stops under `on_failure: stop`); it is never retried.  Raises `Refused`
        when the task has already finished or the run has ended.
        """
        rec = self.records[i]
        if self._closed or self._send is None:
            raise Refused("the run has ended")
        if i in self._cancels:
            raise Refused(f"task '{rec.id}' is already being cancelled")
        if not self._is_live(i):
            raise Refused(f"task '{rec.id}' already finished ({rec.status.label})")
        self._cancels[i] = why
        if i in self._launched:  # running, or queued for a slot: `_handle` settles it
            scope = self._scopes.get(i)
            if scope is not None:
                scope.cancel()  # (not yet entered: `_attempt` sees `_cancels` at once)
        elif i in self._backoffs:  # its `_RetryDue` settles it
            self._backoffs[i].cancel()
        else:  # pending, ready, or parked by a pool: it never starts
            self._parked.discard(i)
            self._settle_cancelled(i, None)

    def rerun_task(self, i: int) -> list[str]:
        """Run finished task `i` again, then its dependents as for a first run.

        Its dependents that finished are reopened too (those whose other dependencies
        did not succeed keep their status); the cache does not answer for `i`.
        Attempts start again from one; cost and busy time add up.  Raises `Refused`
        while `i` or a dependent still runs or waits, and once the run's loop has
        ended (nothing would start them).  Returns the ids reopened.
        """
        rec = self.records[i]
        if not self._open or self._stopping is not None:
            raise Refused("the run has ended" if not self._open
                          else f"the run is stopping ({self._stopping})")
        if self._is_live(i):
            raise Refused(f"task '{rec.id}' has not finished ({rec.status.label})")
        family = self._rerun_family(i)
        busy = [self.records[d].id for d in family if self._is_live(d)]
        if busy:
            raise Refused(f"task '{rec.id}' has dependents that have not finished "
                          f"({', '.join(busy)}); cancel them or wait")
        for d in family:
            _reset(self.records[d])
        self._forced.add(i)
        self.plan.reopen(family, self._succeeded_before)
        self._wake()
        return [self.records[d].id for d in family]

    def force(self, i: int) -> None:
        """Run task `i` even if the cache could reuse its output (a re-run asked of the
        daemon for a run that has ended: a new run with this task forced)."""
        self._forced.add(i)

    async def wait_done(self, i: int) -> None:
        """Until task `i` is settled (at once if it is); for whoever cancelled it."""
        if self._is_live(i) and not self._closed:
            event = trio.Event()
            self._watchers.setdefault(i, []).append(event)
            await event.wait()

    def retrying(self, i: int) -> bool:
        """Waiting out a retry's backoff (its status is still the last failure's)."""
        return i in self._backoffs

    def _is_live(self, i: int) -> bool:
        """Not finished yet: pending, running, queued, retrying or waiting for quota."""
        return (i in self._launched or i in self._backoffs
                or self.records[i].status not in COUNTED)

    def _succeeded_before(self, i: int) -> bool:
        return self.records[i].status in (TaskStatus.SUCCEEDED, TaskStatus.CACHED)

    def _rerun_family(self, i: int) -> list[int]:
        """`i` and each dependent all of whose other dependencies succeeded or rerun."""
        family = {i}
        below = set(self.spec.graph.descendants(i))
        for d in self.spec.graph.order:
            if d in below and all(p in family or self._succeeded_before(p)
                                  for p in self.spec.graph.deps[d]):
                family.add(d)
        return sorted(family)

    def _settle_cancelled(self, i: int, msg: _Finished | None) -> None:
        """End task `i` `cancelled` from outside; its dependents as for a failure."""
        rec = self.records[i]
        if msg is not None and msg.status is not None:  # it ran: count what it used
            _count_attempt(rec, msg)
            rec.exit_code = None
        if rec.quota_since is not None:
            rec.quota_wait_s += self._now() - rec.quota_since
            rec.quota_since = None
        rec.status = TaskStatus.CANCELLED
        rec.reason = self._cancels[i]
        rec.error = rec.cause = None
        self._done(rec)
        self._fail(i, rec)
        del self._cancels[i]
        self._wake()  # the loop may be waiting with nothing left: let it see the end

    def _stop(self, why: str) -> None:
        if self._stopping is None:
            self._stopping = why
        for scope in [*self._scopes.values(), *self._backoffs.values()]:
            scope.cancel()
        if self._send is not None:
            self._wake()  # the loop may be waiting for a pool to reopen: let it see the stop

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
        send, recv = trio.open_memory_channel[_Msg](math.inf)
        self._t0 = trio.current_time()
        self._send = send
        self._open = True
        try:
            await self._loop(send, recv)
        finally:
            self._open = False
            for pool in self.governor.pools.values():
                pool.on_release.pop(id(self), None)
            self._parked.clear()  # drained below as not started: not waiting any more
            self._close_leftovers()
            self.result.pools = self.governor.snapshot(trio.current_time())
            self.result.wall_s = trio.current_time() - self._t0
        return self.result

    async def _loop(self, send: trio.MemorySendChannel[_Msg],
                    recv: trio.MemoryReceiveChannel[_Msg]) -> None:
        running = 0
        async with trio.open_nursery() as nursery:
            while True:
                while (self._stopping is None and running < self.spec.settings.max_parallel
                       and not self._over_budget()):
                    i = self._next_ready()
                    if i is None:
                        break
                    if self.spec.tasks[i].foreach is not None:  # `from:`: no process
                        self._fan_out(i)
                        continue
                    if self._credentials_rejected(i):
                        continue
                    if not self._admit_budget(i):
                        continue
                    if self._instant is not None:  # e.g. a dry run: no task, no await
                        unsettled = self._run_instantly(i, self._instant)
                        if unsettled is not None:
                            self._handle(unsettled, nursery, send)
                        continue
                    running += 1
                    self._take_pools(i)
                    self._launched.add(i)
                    nursery.start_soon(self._attempt, i, send)
                if running == 0 and not self._backoffs and not (
                        self._parked.pools() and self._stopping is None
                        and not self._over_budget()):
                    self._open = False  # from here on nothing starts: no re-run
                    break
                self._arm_wakeup(nursery)
                msg = await recv.receive()
                if isinstance(msg, _Wake):
                    self._wake_pending = False
                    continue
                if isinstance(msg, _RetryDue):
                    self._backoffs.pop(msg.index, None)
                    if msg.index in self._cancels:
                        self._settle_cancelled(msg.index, None)
                    elif self._stopping is None:
                        self.plan.requeue(msg.index)
                    else:
                        self._finish_record(msg.index)
                    continue
                running -= 1
                self._handle(msg, nursery, send)
            for scope in self._timers.values():
                scope.cancel()
        self._finished = True

    # -- pools (quota.py): which ready task may start now ---------------------------
    def _pools_of(self, i: int) -> tuple[Pool, ...]:
        """The runner's adaptive pool and the agent's fixed one, made on first use."""
        pools = self._pools[i]
        if pools is None:
            agent, settings = self.spec.agents[i], self.spec.settings
            found = []
            if self._instant is not None:  # a dry run: nothing reaches a provider
                pass
            elif agent.runner is not None:
                found.append(self.governor.pool(
                    agent.runner, agent.runner_max_parallel or settings.max_parallel,
                    adaptive=settings.adaptive_parallel))
            if agent.max_parallel is not None:
                found.append(self.governor.pool(f"agent {agent.name}", agent.max_parallel,
                                                adaptive=False))
            if self._instant is None:
                found += self._write_pools.get(i, ())
            pools = self._pools[i] = tuple(found)
        return pools

    def _next_ready(self) -> int | None:
        """The most urgent ready task all of whose pools admit it now; parks the others."""
        now = trio.current_time()
        for j in self._parked.admitted(now):
            self.plan.requeue(j)
        while self.plan.has_ready():
            i = self.plan.pop_ready()
            if self.plan.is_closed(i):
                continue  # cancelled from outside while it was ready
            refusing = next((p for p in self._pools_of(i)
                             if p.blocked_until(now) is not None), None)
            if refusing is None:
                return i
            self._parked.park(refusing, self.plan.priority[i], i)
        return None

    def _take_pools(self, i: int) -> None:
        pools = self._pools_of(i)
        if pools:
            now = trio.current_time()
            self._held[i] = tuple((p, p.start(now)) for p in pools)
        rec = self.records[i]
        if rec.quota_since is not None:
            rec.quota_wait_s += self._now() - rec.quota_since
            rec.quota_since = None

    def _release_pools(self, i: int) -> None:
        for pool, _ in self._held.get(i, ()):
            pool.release()

    def _arm_wakeup(self, nursery: trio.Nursery) -> None:
        """Make sure a pool that refused a parked task wakes the loop when it may admit."""
        now = trio.current_time()
        for pool in self._parked.pools():
            when = pool.blocked_until(now)
            if when == math.inf:
                pool.on_release[id(self)] = self._wake
            elif when is not None and when not in self._timers:
                scope = self._timers[when] = trio.CancelScope()
                nursery.start_soon(self._wake_at, when, scope)

    async def _wake_at(self, when: float, scope: trio.CancelScope) -> None:
        with scope:
            await trio.sleep_until(when)
            self._wake()
        self._timers.pop(when, None)

    def _wake(self) -> None:
        if not self._wake_pending and self._send is not None:
            self._wake_pending = True
            self._send.send_nowait(_Wake())

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

    @property
    def spent_usd(self) -> float:
        """Known cost (reported or priced) of finished attempts."""
        return self.budget.spent_usd

    def _over_budget(self) -> bool:
        """Whether nothing may start now: `max_cost_usd` / `max_tokens` is used up, or a
        start waits for running attempts to settle their reservations."""
        if self._budget_held:
            return True
        why = self.budget.reached()
        if why is None:
            return False
        if self._budget_note is None:
            self._budget_note = why
        return True

    def _admit_budget(self, i: int) -> bool:
        """Reserve task `i`'s expected cost and tokens before it starts (budget.py), so
        parallel starts cannot overshoot the run's budget.

        False: not started now.  Either it would exceed the remaining budget and is
        recorded `skipped` (a retry keeps its last failure), or it is back in the queue
        and `_over_budget()` holds further starts until a running attempt settles.
        """
        if self._instant is not None:  # a dry run spends nothing
            return True
        verdict, reason = self.budget.admit(i)
        if verdict is Verdict.START:
            return True
        if verdict is Verdict.HOLD:
            self.plan.requeue(i)
            self._budget_held = True
            return False
        self._budget_skips += 1
        rec = self.records[i]
        if rec.attempts:
            rec.error = f"{rec.error}; not retried: {reason.removeprefix('not started: ')}"
            self._done(rec)
            self._fail(i, rec)
            return False
        rec.status = TaskStatus.SKIPPED
        rec.reason = reason
        self._done(rec)
        for d in self.plan.failed(i):
            dep = self.records[d]
            dep.status = TaskStatus.SKIPPED
            dep.reason = f"dependency '{rec.id}' was skipped ({reason})"
            self._done(dep)
        return False

    def _settle_budget(self, msg: _Finished) -> None:
        """Price the attempt's tokens (pricing.py), replace its reservation with what it
        spent, and warn once when the spend passes `warn_cost_usd`."""
        self._budget_held = False
        i, out = msg.index, msg.outcome
        if msg.status is None or msg.status == TaskStatus.CACHED:
            self.budget.release(i)
            return
        if out is None:  # killed at its deadline: what it spent is unknown
            self.budget.settle(i, None)
        else:
            agent = self.spec.agents[i]
            model = out.metrics.get("model")
            pricing.apply(out.metrics, model if isinstance(model, str) else agent.model,
                          self.spec.config.pricing)
            self.budget.settle(i, Usage.of(out.metrics))
        warning = self.budget.warning()
        if warning is not None:
            self.progress.note(warning)
            self.result.notes.append(warning[0].upper() + warning[1:] + ".")

    async def _attempt(self, i: int, send: trio.MemorySendChannel[_Msg]) -> None:
        """One attempt of task `i`, from the cache check through waiting for a slot to the end.

        `_stop` cancels `stop_scope` wherever the attempt is: a task still queued
        for a (global) slot never starts, and a running one is cancelled.
        """
        rec = self.records[i]
        msg: _Finished | None = None
        try:
            with trio.CancelScope() as stop_scope:
                self._scopes[i] = stop_scope
                if self._stopping is not None or i in self._cancels:
                    stop_scope.cancel()
                if (rec.attempts == 0 and self.reuse is not None and i not in self._forced
                        and await self.reuse.lookup(i)):
                    now = self._now()
                    msg = _Finished(i, 0, TaskStatus.CACHED, None, now, now)
                else:
                    async with self.limiter if self.limiter is not None else nullcontext():
                        await trio.lowlevel.checkpoint_if_cancelled()
                        msg = await self._attempt_in_slot(i, rec)
        finally:  # also when cancelled from outside: the pools' slots go back at once
            self._release_pools(i)
        self._scopes.pop(i, None)
        started = self._started.pop(i, None)
        activity = self._activities.pop(i, None)
        if msg is None:
            now = self._now()
            status = TaskStatus.CANCELLED if started is not None else None
            msg = _Finished(i, rec.attempts, status, None, started or now, now,
                            node=activity.node if activity is not None else None)
        send.send_nowait(msg)

    async def _attempt_in_slot(self, i: int, rec: TaskRecord) -> _Finished:
        rec.attempts += 1
        rec.event = None
        activity = self._activities[i] = Activity(on_event=lambda ev: self._on_event(rec, ev))
        job = Job(self.spec, i, rec.attempts, self.result.run_id, activity=activity)
        start = self._started[i] = self._now()
        first = rec.start_s is None
        if first:
            rec.start_s = start
        rec.status = TaskStatus.RUNNING
        self.progress.task_started(rec)
        outcome: Outcome | None = None
        idle_s = self.spec.idle_timeout_s(i)
        # Both deadlines are decided here, so this is where their cancel scopes open: the
        # task's timeout, and the idle deadline that each line of agent output pushes on.
        timeout_s = self.spec.timeout_s(i)
        with trio.move_on_after(timeout_s) as deadline:
            def started_on_node() -> None:
                """A cluster ran it only now: its timeout and times start here."""
                nonlocal start
                start = self._started[i] = self._now()
                if first:
                    rec.start_s = start
                deadline.deadline = trio.current_time() + timeout_s

            activity.on_start = started_on_node
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
                         activity.last_event, activity.describe_last(),
                         (outcome.node if outcome is not None else None) or activity.node)

    def _on_event(self, rec: TaskRecord, ev: AgentEvent) -> None:
        rec.event = ev.text
        if ev.cause in RATE_CAUSES:  # the client is retrying a limit: slow its pool now
            first = rec.index not in self._signalled  # a refusal counts once per attempt
            self._signalled.add(rec.index)
            for pool, epoch in self._held.get(rec.index, ()):
                self._signal(pool, rec, ev.cause, epoch=epoch, others=pool.running - 1,
                             retry_after=ev.retry_after, count=first)
        elif ev.kind not in ("retry", "error"):
            for pool, _ in self._held.get(rec.index, ()):
                pool.alive()
        self.progress.task_event(rec, ev)

    def _fan_out(self, i: int) -> None:
        """A `foreach: from:` task, once its source has succeeded, becomes one task per
        element of the source's output (fanout.py), appended to the run; it is then
        their join, and succeeds when they all have (a dry run: at once)."""
        rec = self.records[i]
        task = self.spec.tasks[i]
        rec.start_s = rec.start_s if rec.start_s is not None else self._now()
        if task.id in self.spec.foreach or self.result.dry_run:
            rec.end_s = self._now()
            members = [self.records[self.spec.index(m)]
                       for m in self.spec.foreach.get(task.id, ())]
            if members and all(m.status == TaskStatus.CACHED for m in members):
                rec.status, rec.reason = TaskStatus.CACHED, "all its tasks were cached"
                self.plan.succeeded(i)
                self._done(rec)
            else:
                self._succeeded(i, rec)
            return
        assert task.foreach is not None and task.foreach.from_ is not None
        source = self.spec.output_path(self.spec.index(task.foreach.from_))
        try:
            grown = fanout.grow(self.spec, i,
                                fanout.items_from_output(source, task.foreach.max_items))
        except fanout.FanoutError as exc:
            rec.status, rec.error, rec.end_s = TaskStatus.FAILED, f"foreach: {exc}", self._now()
            self._done(rec)
            self._fail(i, rec)
            return
        old = len(self.spec.tasks)
        self.spec = self.result.spec = self.budget.spec = grown
        if self.reuse is not None:
            self.reuse.spec = grown
        levels = grown.graph.levels()
        for r in self.records:
            r.spec = grown
        self.records.extend(TaskRecord(id=t.id, agent=t.agent, wave=levels[j] + 1,
                                       output=t.output, spec=grown, index=j)
                            for j, t in enumerate(grown.tasks[old:], start=old))
        self._pools.extend([None] * (len(grown.tasks) - old))
        if any(t.writes for t in grown.tasks[old:]):  # (pools by name: the same ones again)
            self._write_pools = _write_pools(grown, self.governor)
        priority = list(self.plan.priority)
        self.plan.grow(grown.graph, priority + [priority[i]] * (len(grown.tasks) - old), i)

    def _succeeded(self, i: int, rec: TaskRecord) -> None:
        rec.status = TaskStatus.SUCCEEDED
        rec.error = None
        self.plan.succeeded(i)
        self._done(rec)

    def _handle(self, msg: _Finished, nursery: trio.Nursery,
                send: trio.MemorySendChannel[_Msg]) -> None:
        i = msg.index
        rec = self.records[i]
        held = self._held.pop(i, ())
        signalled = i in self._signalled
        self._signalled.discard(i)
        self._launched.discard(i)
        self._settle_budget(msg)
        if i in self._cancels:
            if msg.status not in (TaskStatus.SUCCEEDED, TaskStatus.CACHED):
                self._settle_cancelled(i, msg)
                return
            del self._cancels[i]  # it finished just before the cancel reached it
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
        _count_attempt(rec, msg)
        out = msg.outcome
        if out is not None:
            rec.exit_code = out.exit_code
            rec.error = out.error
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
            now = trio.current_time()
            for pool, _ in held:
                pool.succeeded(now)
            self._succeeded(i, rec)
            return
        if self._waits_for_quota(i, rec, status, msg, held, nursery, send, signalled):
            return
        retryable = msg.status in _DEADLINES or (out is not None and out.retryable)
        would_retry = (status in PROBLEMS and retryable and self._stopping is None
                       and rec.attempts - rec.quota_waits < self.spec.max_attempts(i))
        task_spent = self.budget.task_spent(i, rec.metrics) if would_retry else None
        if would_retry and task_spent is None:
            rec.status = status
            delay = max(self._backoff(i, rec.attempts), (out and out.retry_after) or 0.0)
            self.progress.task_retrying(rec, delay)
            scope = trio.CancelScope()
            self._backoffs[i] = scope
            nursery.start_soon(self._sleep_then_retry, i, delay, scope, send)
            return
        rec.status = status
        if task_spent is not None:
            rec.error = f"{rec.error or verb(status)}; not retried: {task_spent}"
        self._done(rec)
        if status == TaskStatus.PROVIDER_ERROR and rec.cause == "auth":
            self._reject_credentials(i, rec)
        self._fail(i, rec)

    # -- waiting for quota ----------------------------------------------------------------
    @property
    def _max_quota_wait_s(self) -> float:
        return self.spec.settings.max_quota_wait / 1000

    def _waits_for_quota(self, i: int, rec: TaskRecord, status: TaskStatus, msg: _Finished,
                         held: tuple[tuple[Pool, int], ...], nursery: trio.Nursery,
                         send: trio.MemorySendChannel[_Msg], signalled: bool) -> bool:
        """A provider's rate or usage limit: the task waits for its pool, no retry used.

        False when this is not a limit the governor handles (then `_handle` goes on as
        for any failure).  True when the task now waits (`waiting_for_quota`), or has
        ended because the reset lies beyond `max_quota_wait`.
        """
        out = msg.outcome
        retry_after = out.retry_after if out is not None else None
        if retry_after is None and msg.last_event is not None:
            retry_after = msg.last_event.retry_after
        cause = rec.cause
        adaptive = [(p, e) for p, e in held if p.adaptive]
        if (status != TaskStatus.PROVIDER_ERROR or not adaptive or self._stopping is not None
                or cause not in RATE_CAUSES or (cause == "quota" and retry_after is None)):
            return False
        clock, now = trio.current_time(), self._now()
        pool, epoch = adaptive[0]
        self._signal(pool, rec, cause, epoch=epoch, others=pool.running,
                     retry_after=retry_after, count=not signalled,
                     rpm=out.requests_per_min if out is not None else None)
        ahead = max(pool.wait_left(clock), retry_after or 0.0)
        first = self._quota_first.setdefault(i, now)
        limit = self._max_quota_wait_s
        if now - first + ahead > limit or limit == 0 or rec.quota_waits >= MAX_QUOTA_WAITS:
            rec.status = status
            why = beyond_wait(pool, ahead, now - first, rec.quota_waits, limit)
            rec.error = f"{rec.error}; {why}"
            self._done(rec)
            self._fail(i, rec)
            return True
        rec.quota_waits += 1
        pool.waits += 1
        rec.status = TaskStatus.WAITING_FOR_QUOTA
        rec.quota_since = now
        self.progress.task_waiting(rec, pool.name, pool.wait_left(clock))
        if pool.wait_left(clock) > 0:
            self.plan.requeue(i)  # parked until the pool's pause ends
        else:  # slowed down but not paused (overloaded): the task's own jittered backoff
            scope = self._backoffs[i] = trio.CancelScope()
            nursery.start_soon(self._sleep_then_retry, i,
                               self._backoff(i, rec.quota_waits), scope, send)
        return True

    def _signal(self, pool: Pool, rec: TaskRecord, cause: str, *, epoch: int, others: int,
                retry_after: float | None, rpm: float | None = None,
                count: bool = True) -> None:
        """Tell the pool; say on the progress stream when its limit or pause changed."""
        clock = trio.current_time()
        limit, paused = pool.limit, pool.paused_until
        pool.signal(clock, cause, epoch=epoch, others=others, retry_after=retry_after, rpm=rpm,
                    max_wait=self._max_quota_wait_s, count=count)
        changes = []
        if pool.limit != limit:
            changes.append(f"limit {limit} → {pool.limit}")
        if pool.paused_until > max(paused, clock):
            changes.append(f"paused for {fmt_duration(pool.wait_left(clock))} "
                           f"({pool.pause_reason})")
        if changes:
            self.progress.note(f"pool {pool.name}: {', '.join(changes)} after "
                               f"{cause.replace('_', ' ')} in task '{rec.id}'")


    def _end_quota_wait(self, rec: TaskRecord, why: str) -> None:
        """A task still waiting for quota when the run stops keeps its provider error."""
        if rec.status != TaskStatus.WAITING_FOR_QUOTA:
            return
        if rec.quota_since is not None:
            rec.quota_wait_s += self._now() - rec.quota_since
            rec.quota_since = None
        rec.status = TaskStatus.PROVIDER_ERROR
        rec.error = f"{rec.error}; interrupted while waiting for quota: {why}"

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
        if rec.status == TaskStatus.CANCELLED and i not in self._cancels:
            return  # the run is stopping: its dependents are drained as not started
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
                                send: trio.MemorySendChannel[_Msg]) -> None:
        with scope:
            await trio.sleep(delay)
        send.send_nowait(_RetryDue(i))

    def _finish_record(self, i: int) -> None:
        """A task whose retry was pending when the run stopped keeps its last failure."""
        rec = self.records[i]
        self._end_quota_wait(rec, self._stopping or "the run stopped")
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
            self.result.notes.append(self.budget.summary(self._budget_note))
        if self._budget_skips:
            self.result.notes.append(
                f"{plural(self._budget_skips, 'task')} did not start: the cost or tokens "
                "expected of each would have exceeded the remaining budget (see Problems).")
        self.result.notes.extend(self.budget.unbudgeted())
        why = self._stopping or self._budget_note or "not reached"
        for i in self.plan.drain():
            rec = self.records[i]
            if rec.status == TaskStatus.WAITING_FOR_QUOTA:
                self._end_quota_wait(rec, why)
                self._done(rec)
            elif rec.status in (TaskStatus.PENDING, TaskStatus.RUNNING):
                rec.status = TaskStatus.SKIPPED
                rec.reason = f"not started: {why}"
                self._done(rec)

    def _done(self, rec: TaskRecord) -> None:
        self.progress.task_finished(rec)
        if self.on_task_done is not None:
            self.on_task_done(rec)
        for event in self._watchers.pop(rec.index, ()):
            event.set()

    def _now(self) -> float:
        return trio.current_time() - self._t0


def _write_pools(spec: DispatchSpec, governor: Governor) -> dict[int, list[Pool]]:
    """A one-slot pool per pair of tasks whose `writes:` clash: the two never run at the
    same time, while each still runs beside everything else (a clash is not transitive)."""
    # An isolated task works in its own worktree: its writes cannot clash with anyone's.
    writes = [[] if spec.isolation(i) == "worktree" else t.writes
              for i, t in enumerate(spec.tasks)]
    pools: dict[int, list[Pool]] = {}
    if not any(writes):
        return pools
    ids = spec.graph.ids
    for (i, j), _globs in clashes(writes).items():
        pool = governor.pool(f"writes {spec.display}: {ids[i]} ↔ {ids[j]}", 1, adaptive=False)
        pools.setdefault(i, []).append(pool)
        pools.setdefault(j, []).append(pool)
    return pools


def _reset(rec: TaskRecord) -> None:
    """A finished task's record made pending again for a re-run (its cost and busy time
    stay: they were spent)."""
    rec.status = TaskStatus.PENDING
    rec.attempts = rec.quota_waits = 0
    rec.start_s = rec.end_s = rec.exit_code = None
    rec.error = rec.reason = rec.cause = rec.last_event = rec.event = None
