"""`Plan`'s ready order: longest remaining path first, ties in file order (in process)."""

from __future__ import annotations

from parallel_dispatch.graph import Graph
from parallel_dispatch.plan import Plan


def _drain(plan: Plan) -> list[int]:
    order = []
    while plan.has_ready():
        i = plan.pop_ready()
        order.append(i)
        plan.succeeded(i)
    return order


def test_higher_priority_first_and_ties_in_file_order() -> None:
    graph = Graph.build(["a", "b", "c", "d", "e"], [[], [], [], [], []])
    plan = Plan(graph, [1.0, 3.0, 1.0, 3.0, 2.0])
    assert _drain(plan) == [1, 3, 4, 0, 2]


def test_dependents_become_ready_and_keep_their_rank() -> None:
    # 0 → 1 → 2 is the long chain; 3 and 4 are short side tasks of equal weight.
    graph = Graph.build(["c1", "c2", "c3", "s1", "s2"], [[], [0], [1], [], []])
    plan = Plan.with_weights(graph, [1.0] * 5)
    assert plan.pop_ready() == 0
    assert plan.succeeded(0) == [1]
    assert plan.pop_ready() == 1  # 2 left on its chain beats the side tasks' 1
    plan.succeeded(1)
    assert _drain(plan) == [2, 3, 4]


def test_requeued_task_returns_to_its_place() -> None:
    graph = Graph.build(["a", "b", "c"], [[], [], []])
    plan = Plan(graph, [5.0, 1.0, 1.0])
    assert plan.pop_ready() == 0
    assert plan.pop_ready() == 1
    plan.requeue(0)  # a retry after its backoff still outranks the rest
    assert _drain(plan) == [0, 2]


def test_remaining_path_and_levels() -> None:
    graph = Graph.build(["a", "b", "c", "d"], [[], [0], [0], [1, 2]])
    assert graph.remaining_path([1.0, 2.0, 5.0, 1.0]) == [7.0, 3.0, 6.0, 1.0]
    assert graph.levels() == [0, 1, 1, 2]
    assert graph.waves() == [[0], [1, 2], [3]]
