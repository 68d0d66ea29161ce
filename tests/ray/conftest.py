"""The `ray_cluster` fixture: one real two-node Ray cluster per test session, started only
inside a private network namespace (tests/ray/run). Helpers live in raycluster.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from raycluster import RayCluster, start_cluster, unusable_reason


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    """Head (`agent_slot: 2`, `head_only: 1`) + second node (`agent_slot: 2`) on
    127.0.0.1 with token auth; every process is stopped by PID at the end, also after a
    failed test or a failed start. Skips, never starts Ray, outside a namespace whose
    only interface is lo."""
    reason = unusable_reason()
    if reason:
        pytest.skip(reason)
    with start_cluster() as cluster:
        yield cluster
