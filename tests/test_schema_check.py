"""An `output_schema` check that never ends costs its attempt, not the dispatcher
(schema_check.py, schema_worker.py): a `pattern` that backtracks catastrophically holds
the GIL inside `re`, so the check runs in a worker process that is killed at its
deadline, while the event loop goes on with other tasks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from parallel_dispatch.schema_check import SchemaChecker, SchemaCheckTimeout
from support import Project, pid_alive, wait_until

EVIL = {"type": "string", "pattern": "^(a+)+$"}
"""Python's `re` needs about 2^n steps to refuse n `a`s and a `!` against this."""
EVIL_ANSWER = json.dumps("a" * 40 + "!")


def test_a_backtracking_pattern_fails_its_task_once_and_the_others_run(
        project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARALLEL_DISPATCH_SCHEMA_CHECK_S", "2")
    project.write("evil.json", EVIL_ANSWER + "\n")
    project.write("fine.src", '{"n": 1}\n')
    project.write("t.yaml", f"""\
        tasks:
          - id: evil
            agent: shell
            prompt: cat evil.json
            output: evil.json.out
            retries: 2
            output_schema: {json.dumps(EVIL)}
          - id: fine
            agent: shell
            prompt: cat fine.src
            output: fine.json
            output_schema: {{type: object}}
          - id: after
            agent: shell
            prompt: sleep 0.5; echo done
            output: after.txt
            dependencies: [fine]
    """)
    proc = project.run("t.yaml")
    assert proc.returncode == 1, proc.stderr
    tasks = {t["id"]: t for t in project.report()["tasks"]}  # type: ignore[attr-defined]
    evil = tasks["evil"]
    assert evil["status"] == "failed"
    assert "the schema check took longer than 2 s and was stopped" in evil["error"]
    assert evil["attempts"] == 1  # not retried: the same schema would hang again
    assert tasks["fine"]["status"] == "succeeded"
    assert tasks["after"]["status"] == "succeeded"
    assert (project.root / ".aiwg/working/fine.json").read_text() == '{\n  "n": 1\n}\n'


def test_the_event_loop_runs_on_while_a_check_spins_and_the_worker_is_killed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARALLEL_DISPATCH_SCHEMA_CHECK_S", "2")
    evil, good = tmp_path / "evil.json", tmp_path / "good.json"
    evil.write_text(EVIL_ANSWER)
    good.write_text('{"b": 1, "a": 2}')
    seen: dict[str, object] = {}

    async def main() -> None:
        checker = SchemaChecker()
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await trio.sleep(0.05)
                ticks += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(tick)
            with pytest.raises(SchemaCheckTimeout):
                await checker.check(evil, EVIL, lenient=False)
            seen["ticks"] = ticks
            seen["killed"] = checker._proc is None
            # the next check starts a new worker and works
            assert await checker.check(good, {"type": "object"}, lenient=False) == []
            assert checker._proc is not None
            seen["pid"] = checker._proc.pid
            await checker.aclose()
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert int(seen["ticks"]) >= 10  # type: ignore[call-overload]  # ~40 in 2 s; 10 on a busy box
    assert seen["killed"] is True
    assert good.read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
    assert not pid_alive(int(seen["pid"]))  # type: ignore[call-overload]


def test_the_alarm_kills_a_spinning_worker(tmp_path: Path) -> None:
    """Should the dispatcher die mid-check, nobody kills the worker: its own alarm does."""
    evil = tmp_path / "evil.json"
    evil.write_text(EVIL_ANSWER)
    proc = subprocess.Popen([sys.executable, "-m", "parallel_dispatch.schema_worker", "1"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdin is not None
        proc.stdin.write(json.dumps({"path": str(evil), "schema": EVIL,
                                     "lenient": False}) + "\n")
        proc.stdin.flush()
        assert wait_until(lambda: proc.poll() is not None, timeout=60)
        assert proc.returncode == -signal.SIGALRM
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_a_check_cancelled_from_outside_leaves_no_stale_reply(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A task cancelled while its answer is checked (Ctrl-C, `cancel`): the worker goes,
    so the next check cannot read the cancelled one's late reply as its own."""
    monkeypatch.setenv("PARALLEL_DISPATCH_SCHEMA_CHECK_S", "20")
    slow, good = tmp_path / "slow.json", tmp_path / "good.json"
    slow.write_text(json.dumps("a" * 24 + "!"))  # refused after a moment, not at once
    good.write_text('{"a": 1}')
    seen: dict[str, object] = {}

    async def main() -> None:
        checker = SchemaChecker()
        with trio.move_on_after(0.05):
            await checker.check(slow, EVIL, lenient=False)
        seen["after_cancel"] = checker._proc
        seen["good"] = await checker.check(good, {"type": "object"}, lenient=False)
        seen["bad"] = await checker.check(good, {"type": "array"}, lenient=False)
        await checker.aclose()

    trio.run(main)
    assert seen["after_cancel"] is None
    assert seen["good"] == []
    assert seen["bad"] and "is not of type 'array'" in str(seen["bad"])
