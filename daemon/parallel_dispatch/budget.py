"""The run's spend ledger: `max_cost_usd` / `max_tokens`, reserved before each start.

Checking only what finished attempts spent lets a burst of parallel starts overshoot
the budget by `max_parallel` tasks.  So each start first reserves its expected cost and
tokens, and is admitted only if `charged + reserved + expected ≤ limit`; when the
attempt ends its reservation is replaced by what it really spent.

What an attempt is expected to spend, first found wins (per figure, cost and tokens):

1. the task's last recorded usage per attempt (the state file, like durations);
2. `estimate_cost_usd` / `estimate_tokens` (task-file settings or `[defaults]`);
3. the mean of this run's finished attempts of the same agent;
4. nothing known: one such "blind" attempt per agent runs at a time, until one
   finishes and gives 3.  An agent whose attempts report no such figure at all (a
   command agent, a runner without a price) cannot be budgeted: it is admitted
   without reservation and the report says so.

An attempt with tokens but no known cost (no price) is charged its estimate, if it had
one: it spent money, only how much is unknown.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from . import pricing
from .spec import DispatchSpec


@dataclass(frozen=True)
class Usage:
    """An attempt's (or a reservation's) cost and tokens; None where unknown."""

    cost_usd: float | None = None
    tokens: int | None = None

    @classmethod
    def of(cls, metrics: Mapping[str, Any]) -> Usage:
        cost = metrics.get("cost_usd")
        if isinstance(cost, bool) or not isinstance(cost, int | float):
            cost = None
        return cls(None if cost is None else float(cost), pricing.tokens(metrics))


def history(entries: Mapping[str, Any]) -> dict[str, Usage]:
    """Each task's usage per attempt in its last run, from the state file's `[tasks]`
    (checked value by value: a user may have edited it)."""
    out = {}
    for tid, entry in entries.items():
        if not isinstance(entry, Mapping):
            continue
        cost, tokens = entry.get("cost_usd"), entry.get("tokens")
        usage = Usage(float(cost) if isinstance(cost, int | float) and _count(cost) else None,
                      tokens if isinstance(tokens, int) and _count(tokens) else None)
        if usage != Usage():
            out[tid] = usage
    return out


def _count(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1e15


def per_attempt(metrics: Mapping[str, Any], attempts: int) -> Usage:
    """A finished task's usage per attempt, as `history` reads it back next run."""
    used = Usage.of(metrics)
    n = max(1, attempts)
    return Usage(None if used.cost_usd is None else round(used.cost_usd / n, 6),
                 None if used.tokens is None else used.tokens // n)


class Verdict(Enum):
    START = "start"
    HOLD = "hold"
    """Not now: running attempts hold reservations (or a blind attempt runs); ask again
    when one of them ends."""
    SKIP = "skip"


@dataclass
class _Figure:
    """One budgeted quantity (dollars or tokens) of the run."""

    name: str
    limit: float | None
    estimate: float | None
    charged: float = 0.0
    reserved: dict[int, float] = field(default_factory=dict)
    blind: dict[int, str] = field(default_factory=dict)
    """Running attempts admitted with no estimate → their agent."""
    seen: dict[str, list[float]] = field(default_factory=dict)
    """Agent → this run's figures of its finished attempts."""
    unmeasured: set[str] = field(default_factory=set)
    """Agents whose finished attempts reported no such figure."""

    def fmt(self, value: float) -> str:
        return f"${value:.2f}" if self.name == "max_cost_usd" else f"{value:,.0f} tokens"

    def limit_text(self) -> str:
        assert self.limit is not None
        return (f"max_cost_usd ${self.limit:g}" if self.name == "max_cost_usd"
                else f"max_tokens {self.limit:,.0f}")


class Ledger:
    """Spent, reserved and expected cost and tokens of one run (the scheduler's)."""

    def __init__(self, spec: DispatchSpec, history: Mapping[str, Usage] | None = None) -> None:
        self.spec = spec
        self.history = history or {}
        s = spec.settings
        self.cost = _Figure("max_cost_usd", s.max_cost_usd, s.estimate_cost_usd)
        self.tokens = _Figure("max_tokens", s.max_tokens,
                              float(s.estimate_tokens) if s.estimate_tokens is not None
                              else None)
        self.spent_usd = 0.0
        """Known cost (reported by runners or priced) of finished attempts."""
        self.unknown_usd = 0.0
        """Estimates charged for attempts whose cost is unknown (tokens only)."""
        self.warned = False

    # -- before a start ---------------------------------------------------------------
    def admit(self, i: int) -> tuple[Verdict, str]:
        """Whether task `i` may start now; on START its expected figures are reserved.

        The text is the skip reason ("expected $0.42 would exceed ...") for SKIP.
        """
        plans: list[tuple[_Figure, float, bool]] = []
        hold = False
        for fig in (self.cost, self.tokens):
            if fig.limit is None:
                continue
            expected, blind = self._expected(fig, i)
            if expected is None:
                hold = True
                continue
            if fig.charged + expected > fig.limit + 1e-12:
                left = max(0.0, fig.limit - fig.charged)
                return Verdict.SKIP, (
                    f"not started: expected {fig.fmt(expected)} would exceed the remaining "
                    f"budget ({fig.fmt(left)} left of {fig.limit_text()})")
            if fig.charged + sum(fig.reserved.values()) + expected > fig.limit + 1e-12:
                hold = True
            plans.append((fig, expected, blind))
        if hold:
            return Verdict.HOLD, ""
        for fig, expected, blind in plans:
            fig.reserved[i] = expected
            if blind:
                fig.blind[i] = self.spec.agents[i].name
        return Verdict.START, ""

    def _expected(self, fig: _Figure, i: int) -> tuple[float | None, bool]:
        """(expected figure, admitted blind); (None, _) means wait for a blind attempt."""
        agent = self.spec.agents[i]
        past = self.history.get(self.spec.tasks[i].id)
        recorded = (past.cost_usd if fig is self.cost else past.tokens) if past else None
        if recorded is not None:
            return float(recorded), False
        if fig.estimate is not None:
            return fig.estimate, False
        seen = fig.seen.get(agent.name)
        if seen:
            return sum(seen) / len(seen), False
        if agent.runner is None or agent.name in fig.unmeasured:
            return 0.0, False  # reports no such figure: cannot be budgeted
        if agent.name in fig.blind.values():
            return None, True
        return 0.0, True

    # -- after an attempt -------------------------------------------------------------
    def release(self, i: int) -> None:
        """The attempt never ran (stopped while queued, cached): drop its reservation."""
        for fig in (self.cost, self.tokens):
            fig.reserved.pop(i, None)
            fig.blind.pop(i, None)

    def settle(self, i: int, used: Usage | None) -> None:
        """Replace attempt `i`'s reservation with what it spent.

        None: it ran but left no figures (killed at its deadline); it is charged what it
        was expected to spend.
        """
        agent = self.spec.agents[i].name
        reserved_usd = self.cost.reserved.get(i, 0.0)
        reserved_tokens = self.tokens.reserved.get(i, 0.0)
        self.release(i)
        if used is None:
            self.unknown_usd += reserved_usd
            self.cost.charged += reserved_usd
            self.tokens.charged += reserved_tokens
            return
        if used.cost_usd is not None:
            self.spent_usd += used.cost_usd
            self.cost.charged += used.cost_usd
            self.cost.seen.setdefault(agent, []).append(used.cost_usd)
        else:
            if used.tokens:  # it cost something; charge what it was expected to
                self.unknown_usd += reserved_usd
                self.cost.charged += reserved_usd
            self.cost.unmeasured.add(agent)
        if used.tokens is not None:
            self.tokens.charged += used.tokens
            self.tokens.seen.setdefault(agent, []).append(float(used.tokens))
        else:
            self.tokens.unmeasured.add(agent)

    @property
    def spent_tokens(self) -> int:
        return int(self.tokens.charged)

    # -- run-level verdicts -------------------------------------------------------------
    def reached(self) -> str | None:
        """Why nothing more may start ("budget reached (max_cost_usd $5)"), or None."""
        for fig in (self.cost, self.tokens):
            if fig.limit is not None and fig.charged >= fig.limit:
                what = "budget" if fig is self.cost else "token budget"
                return f"{what} reached ({fig.limit_text()})"
        return None

    def warning(self) -> str | None:
        """The `warn_cost_usd` warning, the first time the spend passes it; else None."""
        warn = self.spec.settings.warn_cost_usd
        if warn is None or self.warned or self.cost.charged < warn:
            return None
        self.warned = True
        return (f"cost warning: ${self.cost.charged:.4f} spent, past warn_cost_usd "
                f"${warn:g}{self._unknown_part()}")

    def _unknown_part(self) -> str:
        return (f" (${self.unknown_usd:.4f} of it estimated for attempts with tokens but no "
                "price)" if self.unknown_usd else "")

    def summary(self, note: str) -> str:
        """The report's note once the budget stopped new starts."""
        parts = []
        if self.cost.limit is not None:
            parts.append(f"${self.cost.charged:.4f} spent of max_cost_usd "
                         f"${self.cost.limit:g}{self._unknown_part()}")
        if self.tokens.limit is not None:
            parts.append(f"{self.spent_tokens:,} tokens of max_tokens {self.tokens.limit:,.0f}")
        head = "Budget reached" if note.startswith("budget") else "Token budget reached"
        return (f"{head}: {'; '.join(parts)}; no new task was started after that (running "
                "ones finished).")

    def unbudgeted(self) -> list[str]:
        """Agents the budgets could not cover (their attempts report no such figure)."""
        out = []
        for fig, what in ((self.cost, "cost"), (self.tokens, "tokens")):
            if fig.limit is None:
                continue
            agents = sorted(a for a in fig.unmeasured if a not in fig.seen)
            if agents and fig.estimate is None:
                out.append(f"{fig.name} could not cover agent(s) {', '.join(agents)}: they "
                           f"report no {what}" + (
                               ' (add a [pricing."model"] entry to dispatch.toml or set '
                               "estimate_cost_usd)" if fig is self.cost
                               else " (set estimate_tokens)"))
        return out

    # -- per task -----------------------------------------------------------------------
    def task_spent(self, i: int, metrics: Mapping[str, Any]) -> str | None:
        """Why task `i` may not try again: its own budget is used up; else None."""
        task = self.spec.tasks[i]
        used = Usage.of(metrics)
        usd, tokens = used.cost_usd, used.tokens
        if task.max_cost_usd is not None and usd is not None and usd >= task.max_cost_usd:
            return f"task budget reached: ${usd:.4f} of max_cost_usd ${task.max_cost_usd:g}"
        if task.max_tokens is not None and tokens is not None and tokens >= task.max_tokens:
            return f"task budget reached: {tokens:,} tokens of max_tokens {task.max_tokens:,}"
        return None
