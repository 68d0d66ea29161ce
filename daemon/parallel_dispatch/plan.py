"""What is ready to run, and in which order (ninja's `Plan`).

A task becomes ready the moment its last dependency succeeds; there is no
barrier between waves.  Among ready tasks, the one with the longest remaining
path to the end of the DAG goes first, so the critical path never waits
behind short side branches.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping, Sequence

from .graph import Graph


class Plan:
    """Ready queue over a `Graph`, ordered by remaining critical-path length."""

    def __init__(self, graph: Graph, priority: Sequence[float]) -> None:
        self.graph = graph
        self.priority = priority
        self._missing = [len(d) for d in graph.deps]
        # The heap holds each task's rank in (priority descending, file order): one int
        # comparison instead of a tuple's; a dry run of 50,000 tasks pops them all.
        # (sorted is stable, also with reverse=True: equal priorities keep file order.)
        self._by_rank = sorted(range(len(graph)), key=priority.__getitem__, reverse=True)
        self._rank = [0] * len(graph)
        for r, i in enumerate(self._by_rank):
            self._rank[i] = r
        self._ready = [self._rank[i] for i in range(len(graph)) if self._missing[i] == 0]
        heapq.heapify(self._ready)
        self._closed = [False] * len(graph)

    @classmethod
    def with_weights(cls, graph: Graph, weight: Sequence[float]) -> Plan:
        return cls(graph, graph.remaining_path(weight))

    def _push(self, i: int) -> None:
        heapq.heappush(self._ready, self._rank[i])

    def has_ready(self) -> bool:
        return bool(self._ready)

    def pop_ready(self) -> int:
        """The most urgent ready task; ties go to file order."""
        return self._by_rank[heapq.heappop(self._ready)]

    def requeue(self, i: int) -> None:
        """Put a task back (a retry after its backoff)."""
        self._push(i)

    def succeeded(self, i: int) -> list[int]:
        """Mark `i` done; return dependents that just became ready."""
        self._closed[i] = True
        newly = []
        for c in self.graph.children[i]:
            self._missing[c] -= 1
            if self._missing[c] == 0 and not self._closed[c]:
                self._push(c)
                newly.append(c)
        return newly

    def failed(self, i: int) -> list[int]:
        """Mark `i` finished without success; return dependents now unreachable."""
        self._closed[i] = True
        doomed = [d for d in self.graph.descendants(i) if not self._closed[d]]
        for d in doomed:
            self._closed[d] = True
        return doomed

    def instant_order(self) -> list[int]:
        """The order in which a run starts the tasks when each succeeds the moment it
        starts, as in a dry run: the most urgent ready task, then whatever it made ready.

        The scheduler does exactly this with an instant runner (`run_now`): nothing
        runs, so one slot is always free and no budget or credential check can refuse
        a start.  `plan` prints this order without starting a scheduler (50,000 tasks:
        0.05 s instead of 0.4); `tests/test_plan_view.py` holds it to `run --dry-run`.
        Consumes the plan.
        """
        ready, by_rank, rank = self._ready, self._by_rank, self._rank
        missing, closed, children = self._missing, self._closed, self.graph.children
        pop, push = heapq.heappop, heapq.heappush
        order: list[int] = []
        while ready:  # `pop_ready` and `succeeded`, inlined
            i = by_rank[pop(ready)]
            order.append(i)
            closed[i] = True
            for c in children[i]:
                missing[c] -= 1
                if missing[c] == 0 and not closed[c]:
                    push(ready, rank[c])
        return order

    def is_closed(self, i: int) -> bool:
        """Finished, or given up (a task cancelled from outside may still sit in the heap)."""
        return self._closed[i]

    def reopen(self, tasks: Iterable[int], done: Callable[[int], bool]) -> None:
        """Open finished tasks again (a re-run asked from outside, scheduler.py).

        Each waits for its dependencies that are reopened too or not `done` (succeeded),
        like a task that was never run; those with none left are ready at once.
        """
        family = set(tasks)
        for t in family:
            self._closed[t] = False
        for t in sorted(family):
            self._missing[t] = sum(1 for d in self.graph.deps[t] if d in family or not done(d))
            if self._missing[t] == 0:
                self._push(t)

    def grow(self, graph: Graph, priority: Sequence[float], join: int) -> None:
        """Take in tasks appended to the graph (a `foreach: from:` expanded at run time,
        fanout.py): they rank after the others; `join`, popped already, waits for them."""
        old = len(self._missing)
        self.graph, self.priority = graph, priority
        for i in range(old, len(graph)):
            self._rank.append(len(self._by_rank))
            self._by_rank.append(i)
            self._closed.append(False)
            self._missing.append(sum(1 for d in graph.deps[i] if not self._closed[d]))
            if self._missing[i] == 0:
                self._push(i)
        self._missing[join] = len(graph) - old
        if self._missing[join] == 0:
            self._push(join)

    def drain(self) -> list[int]:
        """Close everything not yet finished (stop/interrupt); return those tasks."""
        self._ready.clear()
        rest = [i for i, closed in enumerate(self._closed) if not closed]
        for i in rest:
            self._closed[i] = True
        return rest


def expected_durations(ids: Sequence[str], durations: Mapping[str, float]) -> list[float]:
    """Each task's weight for the critical path: its recorded duration where known, the
    mean of those (or 1 s) elsewhere, so that a first run still ranks by path length."""
    known = [durations[t] for t in ids if t in durations]
    default = (sum(known) / len(known)) if known else 1.0
    return [durations.get(t, default) for t in ids]
