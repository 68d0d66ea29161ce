"""A Ray driver for the `ray` test group, run as a subprocess (the pytest process never
calls `ray.init`). The token comes from the environment (RayCluster.env).

    raydriver.py nodes ADDRESS
        print ray.nodes() as JSON on a line of its own after RESULT (Ray prints its
        own lines to stdout too)
    raydriver.py spread ADDRESS N DIR [--hold]
        run N tasks that each need {"agent_slot": 1} and wait for one another (a barrier
        of files in DIR), so all N hold a slot at once; each writes DIR/running/<pid>.json
        (its node, pid, parent and the namespace's socket tables) and, with --hold, waits
        for DIR/release. Prints the N records as a RESULT line.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import ray

BARRIER_DEADLINE = 60.0
RESULT = "RESULT "


def connect(address: str) -> None:
    ray.init(address=address, _node_ip_address="127.0.0.1", logging_level=logging.ERROR,
             log_to_driver=False)


def wait_for(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + BARRIER_DEADLINE
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not seen within {BARRIER_DEADLINE:.0f} s")
        time.sleep(0.05)


@ray.remote(num_cpus=0, resources={"agent_slot": 1}, max_retries=0, retry_exceptions=False)
def hold_a_slot(folder: str, parties: int, hold: bool) -> dict[str, Any]:
    """Arrive, wait for all `parties`: then each of them holds a slot at the same time."""
    base = Path(folder)
    (base / "arrived" / uuid.uuid4().hex).touch()
    wait_for(lambda: len(os.listdir(base / "arrived")) >= parties,
             f"{parties} tasks holding a slot at once")
    record = {
        "node": ray.get_runtime_context().get_node_id(),
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "net": {n: Path(f"/proc/net/{n}").read_text() for n in ("tcp", "tcp6", "udp", "udp6")},
    }
    (base / "running" / f"{os.getpid()}.json").write_text(json.dumps(record))
    if hold:
        wait_for((base / "release").exists, f"{base / 'release'}")
    return record


def main(argv: list[str]) -> int:
    command, address = argv[0], argv[1]
    connect(address)
    if command == "nodes":
        fields = ("NodeID", "Alive", "NodeManagerAddress", "Resources")
        nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
        result: object = [{k: n[k] for k in fields} for n in nodes]
    elif command == "spread":
        parties, folder = int(argv[2]), argv[3]
        for sub in ("arrived", "running"):
            Path(folder, sub).mkdir(parents=True, exist_ok=True)
        refs = [hold_a_slot.remote(folder, parties, "--hold" in argv) for _ in range(parties)]
        result = ray.get(refs, timeout=2 * BARRIER_DEADLINE + 30)
    else:
        print(f"raydriver.py: unknown command {command!r}", file=sys.stderr)
        return 2
    print(RESULT + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
