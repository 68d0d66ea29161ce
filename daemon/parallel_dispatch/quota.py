"""Pools per runner and per agent: run at the provider's limit, never into it (issue 10).

A task of a runner preset holds a slot of its runner's pool besides its file's slot
(`max_parallel`) and the daemon's; `[agents.X] max_parallel` adds a fixed pool per agent.
The daemon keeps one `Governor`, so pools span every task file it runs.

A runner's pool adapts (AIMD), because providers limit per account, not per task file:

* a rate-limit or overload signal from an attempt started since the last cut halves the
  pool's limit, and never leaves it above what the provider just accepted (the
  attempts in flight besides the refused one); later signals of the same burst do not
  cut again (TCP's one cut per round trip);
* each success adds one back while the limit is under that accepted level; above it,
  one more only after `QUIET_S` without a signal and with tasks waiting (a probe);
* a signal that says when the limit resets (`Retry-After`, `resetsAt`, "try again in")
  pauses the whole pool until then, and the first start after a pause is a lone probe;
  without a reset time a rate limit pauses the pool for a doubling backoff;
* starts are spaced by `STAGGER_S` with jitter, and by the provider's request rate once
  it told us (`x-ratelimit-limit-requests`), so a pool never sends its burst at once.

The pool only decides; the scheduler parks the tasks a pool refuses and wakes them
(`on_release`, or a timer at `blocked_until`).  All times are trio's clock, so
`trio.testing.MockClock` drives hours of pausing in a test.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .fmt import fmt_duration

STAGGER_S = 0.2
"""Default spacing between two starts of one pool (jittered by ×0.5–1.5)."""
QUIET_S = 60.0
"""How long a pool at its known-good limit stays free of signals before it probes +1."""
BACKOFF_S = (2.0, 900.0)
"""A rate limit without a reset time pauses the pool this long, doubling per signal."""
RATE_MARGIN = 1.05
"""Pace starts this much slower than the provider's stated request rate."""
MAX_QUOTA_WAITS = 50
"""Quota waits per task: a provider that keeps announcing resets that never hold."""
RATE_CAUSES = frozenset({"rate_limit", "overloaded", "quota"})
"""Provider causes that speak about the pool rather than the task."""


@dataclass(eq=False)  # identity: pools are dict keys
class Pool:
    """One pool's limit, occupancy and pause; see the module docstring for the rules."""

    name: str
    max_limit: int
    adaptive: bool = True
    stagger_s: float = STAGGER_S
    rng: random.Random = field(default_factory=random.Random, repr=False)
    limit: int = 0
    running: int = 0
    waiting: int = 0
    """Tasks parked on this pool by any scheduler (for progress and reports)."""
    paused_until: float = -math.inf
    pause_reason: str = ""
    resets_at: float | None = None
    """Wall-clock (epoch) time of the current pause's end, for messages and reports."""
    spacing_s: float = 0.0
    next_start: float = -math.inf
    epoch: int = 0
    """Bumped at each cut: signals from attempts started before it do not cut again."""
    accepted: int | None = None
    """What the provider accepted when it last refused: recover quickly up to it."""
    last_signal: float = -math.inf
    last_raise: float = -math.inf
    probing: bool = False
    backoff_s: float = BACKOFF_S[0]
    guessed: bool = False
    """The current pause is the pool's own backoff, not a reset the provider stated."""
    decreases: int = 0
    waits: int = 0
    """Times a task of this pool went to `waiting_for_quota`."""
    signals: dict[str, int] = field(default_factory=dict)
    paused_s: float = 0.0
    _paused_from: float | None = None
    on_release: dict[int, Callable[[], None]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.limit = self.limit or self.max_limit
        self.spacing_s = self.stagger_s if self.adaptive else 0.0

    # -- admission ------------------------------------------------------------------
    def blocked_until(self, now: float) -> float | None:
        """None when a task may start now; else when to look again (inf: at a release)."""
        if now < self.paused_until:
            return self.paused_until
        self._pause_ended(now)
        if self.running >= self.limit or (self.probing and self.running > 0):
            return math.inf
        if now < self.next_start:
            return self.next_start
        return None

    def start(self, now: float) -> int:
        """Take a slot; returns the epoch the attempt's signals will be judged by."""
        self.running += 1
        if self.spacing_s > 0:
            low, high = (1.0, 1.1) if self.spacing_s > self.stagger_s else (0.5, 1.5)
            self.next_start = now + self.spacing_s * (low + (high - low) * self.rng.random())
        return self.epoch

    def release(self) -> None:
        self.running -= 1
        self._notify()

    def alive(self) -> None:
        """The probe after a pause got through (it talks): the others may follow now."""
        if self.probing:
            self.probing = False
            self._notify()

    def _notify(self) -> None:
        for wake in list(self.on_release.values()):
            wake()

    # -- feedback ---------------------------------------------------------------------
    def succeeded(self, now: float) -> None:
        """An attempt of this pool succeeded: recover, or probe one more slot."""
        if not self.adaptive:
            return
        self.probing = False
        self.backoff_s = BACKOFF_S[0]
        if self.limit >= self.max_limit:
            return
        if self.accepted is not None and self.limit < self.accepted:
            self.limit += 1
        elif (self.waiting > 0 and now - self.last_signal >= QUIET_S
              and now - self.last_raise >= QUIET_S):
            self.limit += 1
            self.last_raise = now

    def signal(self, now: float, cause: str, *, epoch: int, others: int,
               retry_after: float | None = None, rpm: float | None = None,
               max_wait: float = math.inf, count: bool = True) -> None:
        """The provider refused or slowed one of this pool's attempts.

        `others`: this pool's attempts in flight besides the refused one (what the
        provider was accepting); `retry_after`: seconds until the limit resets, if the
        provider said; `rpm`: its stated requests per minute, if it said; `count`: False
        when the attempt's live event already counted this refusal.
        """
        if not self.adaptive:
            return
        if count:
            self.signals[cause] = self.signals.get(cause, 0) + 1
        self.last_signal = now
        if cause != "quota" and epoch == self.epoch:
            self.limit = max(1, min(self.limit // 2, others))
            self.accepted = max(1, others)
            self.epoch += 1
            self.decreases += 1
        if rpm is not None and rpm > 0:
            self.spacing_s = max(self.stagger_s, 60.0 / rpm * RATE_MARGIN)
        guess = retry_after is None and cause == "rate_limit"
        if guess:
            if now < self.paused_until:
                return  # the same refusal seen again (live, then at the end): no doubling
            retry_after, self.backoff_s = self.backoff_s, min(self.backoff_s * 2, BACKOFF_S[1])
            reason = f"rate limited without a reset time; backing off {retry_after:g}s"
        else:
            reason = f"{cause.replace('_', ' ')}; the provider asked to wait"
        if retry_after is not None and retry_after > 0:
            self.pause(now, min(retry_after, max_wait + 60.0), reason, guess=guess)

    def pause(self, now: float, seconds: float, reason: str, *, guess: bool = False) -> None:
        """Admit nothing for `seconds`: extending a pause, or replacing the pool's own
        backoff guess by the reset the provider stated (`guess` False), even a sooner one."""
        until = now + seconds
        if until <= self.paused_until and (guess or not self.guessed):
            return
        self.guessed = guess
        if self._paused_from is None:
            self._paused_from = now
        self.paused_until = until
        self.pause_reason = reason
        self.resets_at = time.time() + seconds
        self.probing = True

    def _pause_ended(self, now: float) -> None:
        if self._paused_from is not None:
            self.paused_s += max(0.0, self.paused_until - self._paused_from)
            self._paused_from = None

    def wait_left(self, now: float) -> float:
        """Seconds until the pause ends (0 when not paused)."""
        return max(0.0, self.paused_until - now)

    def snapshot(self, now: float) -> dict[str, Any]:
        """The pool as the reports and the daemon's status show it."""
        paused = now < self.paused_until
        return {
            "name": self.name, "adaptive": self.adaptive, "limit_max": self.max_limit,
            "limit_now": self.limit, "running": self.running, "waiting": self.waiting,
            "paused_until": _iso(self.resets_at) if paused else None,
            "paused_s": round(self.paused_s + (now - (self._paused_from or now)), 3),
            "decreases": self.decreases, "signals": dict(sorted(self.signals.items())),
            "quota_waits": self.waits,
        }


class Parking:
    """Ready tasks their pool refused for now: one heap per pool, most urgent first.

    The scheduler parks a task its pool refuses instead of blocking the tasks of other
    pools behind it, and takes one back per pool whenever that pool may admit again.
    """

    def __init__(self) -> None:
        self._heaps: dict[Pool, list[tuple[float, int]]] = {}

    def park(self, pool: Pool, priority: float, task: int) -> None:
        heapq.heappush(self._heaps.setdefault(pool, []), (-priority, task))
        pool.waiting += 1

    def admitted(self, now: float) -> list[int]:
        """The most urgent parked task of each pool that may admit one now."""
        out = []
        for pool, heap in self._heaps.items():
            if heap and pool.blocked_until(now) is None:
                pool.waiting -= 1
                out.append(heapq.heappop(heap)[1])
        return out

    def pools(self) -> list[Pool]:
        """The pools some task waits for."""
        return [pool for pool, heap in self._heaps.items() if heap]

    def discard(self, task: int) -> None:
        """Forget one parked task (cancelled from outside: control.py)."""
        for pool, heap in self._heaps.items():
            kept = [entry for entry in heap if entry[1] != task]
            if len(kept) != len(heap):
                pool.waiting -= len(heap) - len(kept)
                heapq.heapify(kept)
                heap[:] = kept

    def clear(self) -> None:
        """Forget every parked task (the run ends; they are drained as not started)."""
        for pool, heap in self._heaps.items():
            pool.waiting -= len(heap)
            heap.clear()


class Governor:
    """Every pool of a process: one per CLI run, one shared by all of the daemon's files."""

    def __init__(self, *, rng: random.Random | None = None,
                 stagger_s: float = STAGGER_S) -> None:
        self.pools: dict[str, Pool] = {}
        self.rng = rng or random.Random()
        self.stagger_s = stagger_s

    def pool(self, name: str, max_limit: int, *, adaptive: bool) -> Pool:
        """The pool called `name`, made on first use.

        A later run that configures it differently (the daemon after a config change)
        resizes it: a lower maximum takes effect at once, a higher one as room to grow.
        """
        pool = self.pools.get(name)
        if pool is None:
            pool = self.pools[name] = Pool(name, max_limit, adaptive=adaptive, rng=self.rng,
                                           stagger_s=self.stagger_s)
        elif (pool.max_limit, pool.adaptive) != (max_limit, adaptive):
            grow = max_limit > pool.max_limit and not adaptive
            pool.max_limit, pool.adaptive = max_limit, adaptive
            pool.limit = max_limit if grow or not adaptive else min(pool.limit, max_limit)
            pool.spacing_s = max(pool.spacing_s, pool.stagger_s) if adaptive else 0.0
        return pool

    def snapshot(self, now: float) -> list[dict[str, Any]]:
        return [p.snapshot(now) for p in self.pools.values()]


def beyond_wait(pool: Pool, ahead: float, waited: float, waits: int, limit_s: float) -> str:
    """Why a task stops waiting for quota and ends: what the user can do about it."""
    limit = fmt_duration(limit_s)
    if waits >= MAX_QUOTA_WAITS:
        return (f"still limited after {waits} waits for quota ({fmt_duration(waited)}); "
                "the provider's resets did not hold: check its limits or run later")
    if ahead <= 0:
        return (f"still limited after waiting {fmt_duration(waited)} for quota, the "
                f"--max-quota-wait of {limit}; raise it or run later")
    return (f"the {pool.name} pool would reopen in {fmt_duration(ahead)} (at "
            f"{_iso(pool.resets_at)}), beyond --max-quota-wait {limit} (waited "
            f"{fmt_duration(waited)} so far); raise --max-quota-wait or run later")


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def pool_lines(pools: list[dict[str, Any]]) -> list[str]:
    """One line per pool a provider has limited or tasks wait for (status, live line)."""
    lines = []
    for p in pools:
        if not (p["signals"] or p["waiting"] or p["paused_until"]):
            continue
        text = f"{p['name']}: limit {p['limit_now']}/{p['limit_max']}, {p['running']} running"
        if p["waiting"]:
            text += f", {p['waiting']} waiting"
        if p["paused_until"]:
            text += f", paused until {p['paused_until']}"
        lines.append(text)
    return lines


def markdown(data: dict[str, Any]) -> list[str]:
    """The `## Pools` section: shown once a provider limited a pool or a task waited."""
    pools = data.get("pools") or []
    if not any(p["signals"] or p["paused_s"] for p in pools):
        return []
    lines = ["", "## Pools", "",
             "| Pool | Limit (now / max) | Rate-limit signals | Cuts | Paused | Quota waits |",
             "|------|-------------------|--------------------|-----:|-------:|------------:|"]
    for p in pools:
        signals = ", ".join(f"{k.replace('_', ' ')} {n}" for k, n in p["signals"].items())
        limit = f"{p['limit_now']} / {p['limit_max']}" + ("" if p["adaptive"] else " (fixed)")
        lines.append(f"| {p['name']} | {limit} | {signals or '–'} | {p['decreases']} | "
                     f"{p['paused_s']:.1f}s | {p['quota_waits']} |")
    return lines
