"""The task DAG: levels (waves), cycles and critical-path weights.

Works on integer indices so that validating and planning a 50,000-task file
stays well under a second.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Graph:
    """An acyclic dependency graph over tasks 0..n-1, in task-file order."""

    ids: tuple[str, ...]
    deps: tuple[tuple[int, ...], ...]
    children: tuple[tuple[int, ...], ...]
    order: tuple[int, ...]
    """A topological order (dependencies first), stable with respect to file order."""

    @classmethod
    def build(cls, ids: Sequence[str], deps: Sequence[Sequence[int]]) -> Graph:
        """Build from validated edges; raises ValueError if a cycle remains."""
        n = len(ids)
        children: list[list[int]] = [[] for _ in range(n)]
        for i, ds in enumerate(deps):
            for d in ds:
                children[d].append(i)
        order = topological_order(deps, children)
        if len(order) != n:
            raise ValueError("graph has a cycle")
        return cls(tuple(ids), tuple(tuple(d) for d in deps),
                   tuple(tuple(c) for c in children), tuple(order))

    def __len__(self) -> int:
        return len(self.ids)

    def levels(self) -> list[int]:
        """0-based dependency level of each task: its wave minus one."""
        level = [0] * len(self.ids)
        at = level.__getitem__  # map() over a bound method: no generator per task
        deps = self.deps
        for i in self.order:
            if deps[i]:
                level[i] = 1 + max(map(at, deps[i]))
        return level

    def waves(self) -> list[list[int]]:
        """Tasks grouped by level, in file order within a wave."""
        level = self.levels()
        out: list[list[int]] = [[] for _ in range(max(level, default=-1) + 1)]
        for i in range(len(self.ids)):
            out[level[i]].append(i)
        return out

    def remaining_path(self, weight: Sequence[float]) -> list[float]:
        """For each task, its weight plus the heaviest chain of dependents after it."""
        rest = [0.0] * len(self.ids)
        at = rest.__getitem__
        children = self.children
        for i in reversed(self.order):
            rest[i] = weight[i] + (max(map(at, children[i])) if children[i] else 0.0)
        return rest

    def critical_path(self, weight: Sequence[float],
                      rest: Sequence[float] | None = None) -> list[int]:
        """The heaviest chain from a root to a leaf (`rest`: `remaining_path`, if known)."""
        if not self.ids:
            return []
        rest = rest if rest is not None else self.remaining_path(weight)
        roots = [i for i in range(len(self.ids)) if not self.deps[i]]
        node = max(roots, key=lambda i: (rest[i], -i))
        path = [node]
        while self.children[node]:
            node = max(self.children[node], key=lambda c: (rest[c], -c))
            path.append(node)
        return path

    def descendants(self, start: int) -> list[int]:
        """Every task that (transitively) depends on `start`."""
        return sorted(_reach(self.children, start))

    def ancestors(self, start: int) -> set[int]:
        """Every task `start` (transitively) depends on."""
        return _reach(self.deps, start)


def topological_order(
    deps: Sequence[Sequence[int]], children: Sequence[Sequence[int]]
) -> list[int]:
    """Kahn's algorithm, the smallest ready index first; returns fewer than n nodes when
    there is a cycle."""
    if _file_ordered(deps):
        return list(range(len(deps)))  # what Kahn's gives then, without the heap
    indegree = [len(d) for d in deps]
    ready = [i for i, k in enumerate(indegree) if k == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for c in children[i]:
            indegree[c] -= 1
            if indegree[c] == 0:
                heapq.heappush(ready, c)
    return order


def _file_ordered(deps: Sequence[Sequence[int]]) -> bool:
    """Whether every task depends only on tasks before it in the file, as files are
    usually written.  Then file order is a topological order, and Kahn's algorithm
    taking the smallest ready index first yields exactly it: when it picks next, the
    first task not yet taken has all its dependencies taken.  50,000 tasks: 0.01 s
    instead of 0.06 s for Kahn's and 0.1 s for Tarjan's."""
    return all(not ds or max(ds) < i for i, ds in enumerate(deps))


def find_cycles(deps: Sequence[Sequence[int]]) -> list[list[int]]:
    """One cycle (as a closed list of nodes) per strongly connected component.

    Iterative Tarjan, so deep chains in big files don't hit the recursion limit.
    """
    if _file_ordered(deps):
        return []  # a cycle needs an edge to a later task
    n = len(deps)
    index = [-1] * n
    low = [0] * n
    on_stack = [False] * n
    stack: list[int] = []
    counter = 0
    cycles: list[list[int]] = []
    for root in range(n):
        if index[root] != -1:
            continue
        work: list[tuple[int, int]] = [(root, 0)]
        while work:
            v, pos = work.pop()
            if pos == 0:
                index[v] = low[v] = counter
                counter += 1
                stack.append(v)
                on_stack[v] = True
            recurse = False
            edges = deps[v]
            while pos < len(edges):
                w = edges[pos]
                pos += 1
                if index[w] == -1:
                    work.append((v, pos))
                    work.append((w, 0))
                    recurse = True
                    break
                if on_stack[w]:
                    low[v] = min(low[v], index[w])
            if recurse:
                continue
            if low[v] == index[v]:
                component: list[int] = []
                while True:
                    w = stack.pop()
                    on_stack[w] = False
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    cycles.append(_cycle_in(set(component), deps))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    return cycles


def _cycle_in(component: set[int], deps: Sequence[Sequence[int]]) -> list[int]:
    """Walk edges inside one SCC from its smallest node until a node repeats."""
    start = min(component)
    path = [start]
    seen = {start: 0}
    node = start
    while True:
        node = min(d for d in deps[node] if d in component)
        if node in seen:
            cycle = path[seen[node]:]
            cycle.append(node)
            return cycle
        seen[node] = len(path)
        path.append(node)


def _reach(edges: Sequence[Sequence[int]], start: int) -> set[int]:
    seen: set[int] = set()
    stack = list(edges[start])
    while stack:
        i = stack.pop()
        if i not in seen:
            seen.add(i)
            stack.extend(edges[i])
    return seen
