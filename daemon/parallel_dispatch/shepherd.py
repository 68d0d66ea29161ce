"""The shepherd: keeps a remote agent's process tree from outliving the attempt.

A Ray worker that dies (SIGKILL, its node lost, a forced cancel) takes its direct
children with it, but an agent runs in its own session, so the agent and its tools
would live on (docs/design/ray-executor.md §4, measured).  So the worker does not start
the agent itself: it starts this program, which detaches (double fork, `setsid`: Ray's
kill-the-children no longer reaches it) and runs the agent with `process.run_in_group`
(its own group, the attempt's marker, subreaper sweep).  The shepherd then watches the
`life` pipe, whose only write end the worker holds: EOF means the worker is gone or gave
up, and the agent's group is killed at once.  It also enforces its own deadline, so a
lost driver cannot leave an agent running forever.

Protocol: `python -m parallel_dispatch.shepherd LIFE DONE OUT ERR` with a JSON request on
stdin (`argv`, `cwd`, `env`, `stdin` as latin-1 text, `grace`, `backstop_s`: how long the
agent may run at most, None for no limit).  The agent
writes to OUT and ERR; the shepherd closes its own copies, then writes one JSON line to
DONE: `{"code": N, "survivors": [...]}`, or `{"spawn_error": [errno, strerror]}`, or
`{"code": -1, "cause": "cancelled"|"deadline"}`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    life, done, out, err = (int(a) for a in args[:4])
    request = json.loads(sys.stdin.buffer.read())
    if os.fork() > 0:  # the worker's child exits at once: the rest is not its child
        os._exit(0)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    import trio

    result = trio.run(_shepherd, request, life, out, err)
    for fd in (out, err):
        os.close(fd)  # the agent's are closed too: the worker's reads see EOF
    with contextlib.suppress(OSError):  # the worker is gone: nobody to tell
        os.write(done, (json.dumps(result) + "\n").encode())
    return 0


async def _shepherd(request: dict[str, Any], life: int, out: int, err: int) -> dict[str, Any]:
    """Run the agent until it exits, `life` closes, or the backstop deadline passes."""
    import trio

    from .process import run_in_group

    grace = float(request.get("grace", 2.0))
    limit = request.get("backstop_s")
    result: dict[str, Any] = {"code": -1, "cause": "cancelled"}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_life, life, nursery.cancel_scope)
        with trio.move_on_after(float("inf") if limit is None else limit) as backstop:
            try:  # inside the nursery, or the error reaches us wrapped in a group
                exit_ = await run_in_group(
                    request["argv"], cwd=request["cwd"], env=request["env"],
                    stdin=request.get("stdin", "").encode("latin-1"),
                    stdout=out, stderr=err, grace=grace)
                result = {"code": exit_.returncode, "survivors": exit_.survivors}
            except OSError as exc:  # could not start: no such command, E2BIG...
                result = {"spawn_error": [exc.errno or 0, exc.strerror or str(exc)]}
        if backstop.cancelled_caught:
            result = {"code": -1, "cause": "deadline"}
        nursery.cancel_scope.cancel()
    return result


async def _watch_life(life: int, scope: Any) -> None:
    """Cancel `scope` (killing the agent's group) when the worker's end of `life` closes."""
    import trio

    while True:
        await trio.lowlevel.wait_readable(life)
        if not os.read(life, 64):
            scope.cancel()
            return


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
