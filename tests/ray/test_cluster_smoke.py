"""The `ray_cluster` fixture itself (issue 12's test cluster): both nodes take work, the
token is required, nothing listens beyond loopback, and a killed node can be restarted.
Run with tests/ray/run."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from raycluster import (
    DRIVER,
    RayCluster,
    bound_sockets,
    driver,
    driver_result,
    is_loopback,
    net_tables,
    processes,
    survivors,
    wait_gone,
)

pytestmark = pytest.mark.ray

PARTIES = 4  # 2 + 2 agent slots: four tasks holding one each must use both nodes


def wait_until(predicate: Any, what: str, proc: subprocess.Popen[str], within: float = 90) -> None:
    """Poll `predicate`; fail with the driver's stderr if it exits or `within` runs out."""
    deadline = time.monotonic() + within
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"driver exited {proc.returncode} before {what}:\n"
                        f"{proc.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{what} not seen within {within:.0f} s:\n{proc.communicate()[1][-3000:]}")
        time.sleep(0.1)


def spread(cluster: RayCluster, folder: Path) -> dict[str, Any]:
    """Four slot-holding tasks, held while we look at the processes and sockets."""
    running = folder / "running"
    proc = subprocess.Popen([sys.executable, str(DRIVER), "spread", cluster.address,
                             str(PARTIES), str(folder), "--hold"],
                            env=cluster.driver_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: running.is_dir() and len(os.listdir(running)) == PARTIES,
                   f"{PARTIES} tasks running", proc)
        seen = {
            "raylets": {n: cluster.raylet_pid(n) for n in ("head", "worker")},
            "workers": {n: cluster.worker_pids(n) for n in ("head", "worker")},
            "sockets": bound_sockets(net_tables()),
        }
        (folder / "release").touch()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    return {**seen, "tasks": driver_result(out)}


@pytest.fixture(scope="module")
def held(ray_cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return spread(ray_cluster, tmp_path_factory.mktemp("spread"))


def test_slot_tasks_run_on_both_nodes(ray_cluster: RayCluster, held: dict[str, Any]) -> None:
    nodes = Counter(t["node"] for t in held["tasks"])
    assert nodes == {ray_cluster.head_node_id: 2, ray_cluster.worker_node_id: 2}


def test_raylet_and_worker_pids_name_the_right_processes(ray_cluster: RayCluster,
                                                         held: dict[str, Any]) -> None:
    name = {ray_cluster.head_node_id: "head", ray_cluster.worker_node_id: "worker"}
    for task in held["tasks"]:
        node = name[task["node"]]
        assert task["ppid"] == held["raylets"][node], task
        assert task["pid"] in held["workers"][node], (task, held["workers"])


def test_nothing_listens_beyond_loopback(ray_cluster: RayCluster, held: dict[str, Any]) -> None:
    """Seen from the namespace while four workers, both raylets, the GCS and a driver run:
    by pytest and by each task."""
    snapshots = [held["sockets"], *(bound_sockets(t["net"]) for t in held["tasks"])]
    gcs_port = int(ray_cluster.address.rpartition(":")[2])
    for sockets in snapshots:
        assert any(table.startswith("tcp") and port == gcs_port
                   for table, _, port in sockets), sockets
        assert len(sockets) >= 7, sockets  # gcs, raylets, agents, workers: Ray's own
        elsewhere = [s for s in sockets if not is_loopback(ipaddress.ip_address(s[1]))]
        assert not elsewhere, f"bound beyond loopback: {elsewhere}"


def test_a_driver_without_the_token_is_refused(ray_cluster: RayCluster) -> None:
    quick = {"RAY_NUM_REDIS_GET_RETRIES": "3"}  # Ray retries for 20 s by default
    without = {k: v for k, v in ray_cluster.driver_env(**quick).items()
               if k not in ray_cluster.env}
    proc = driver("nodes", ray_cluster.address, env=without, timeout=60)
    assert proc.returncode != 0, proc.stdout
    assert "Unauthenticated" in proc.stderr, proc.stderr[-3000:]
    # The same driver with the token gets in: the refusal was the token's.
    proc = driver("nodes", ray_cluster.address, env=ray_cluster.driver_env(**quick), timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len([n for n in driver_result(proc.stdout) if n["Alive"]]) == 2


def test_survivors_finds_a_marked_process_until_it_is_gone() -> None:
    marker = f"pdray-marker-{uuid.uuid4().hex}"
    proc = subprocess.Popen(["bash", "-c", f'exec -a "{marker}" sleep 300'])
    try:
        deadline = time.monotonic() + 30
        while (found := survivors(marker)) != [proc.pid] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert found == [proc.pid], (  # say what became of it, should it fail
            f"exit {proc.poll()}; /proc/{proc.pid}: "
            f"{[p for p in processes().values() if p.pid == proc.pid]}")
        assert wait_gone(marker, within=0.5) == [proc.pid]
        proc.send_signal(signal.SIGKILL)
        assert not wait_gone(marker)
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_worker_node_can_be_restarted(ray_cluster: RayCluster,
                                                tmp_path: Path) -> None:
    """Last in this file: it replaces the second node (the fixture is session-wide, so a
    later test sees the new node's ids)."""
    old_node, old_raylet = ray_cluster.worker_node_id, ray_cluster.raylet_pid("worker")
    os.kill(old_raylet, signal.SIGKILL)
    ray_cluster.restart_worker_node()
    assert ray_cluster.worker_node_id != old_node
    assert ray_cluster.raylet_pid("worker") != old_raylet
    again = spread(ray_cluster, tmp_path)
    assert Counter(t["node"] for t in again["tasks"]) == {
        ray_cluster.head_node_id: 2, ray_cluster.worker_node_id: 2}
