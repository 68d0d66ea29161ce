"""The quota governor (issue 10): pools, AIMD, pausing until a reset, `waiting_for_quota`.

The pool's rules are tested on the pool itself (it takes the time as an argument), the
scheduler's on trio's MockClock with the scripted runner of test_scheduler_events, so
hours of pausing take milliseconds and every time asserted is exact.  The real clients
and a real rate-limited HTTP provider are in tests/contract/ and test_quota_stub.py.
"""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

import pytest

from parallel_dispatch.events import AgentEvent
from parallel_dispatch.quota import QUIET_S, STAGGER_S, Governor, Pool
from parallel_dispatch.report import to_json, to_markdown
from parallel_dispatch.runners.base import Outcome
from test_scheduler_events import Recorder, Script, ScriptedRunner, Step, _rec, _run, _spec, _starts


def limited(after: float = 0.0, retry_after: float | None = None,
            cause: str = "rate_limit") -> Script:
    """An attempt the provider refuses after `after` seconds (HTTP 429 and its reset)."""
    return Script([Step(after)] if after else [],
                  Outcome(ok=False, error="rate limited: HTTP 429", cause=cause,  # type: ignore[arg-type]
                          retry_after=retry_after))


def tasks(n: int, agent: str = "c", prefix: str = "t", extra: str = "") -> str:
    return "tasks:\n" + "".join(
        f"  - {{id: {prefix}{i}, agent: {agent}, prompt: p, output: {prefix}{i}.md{extra}}}\n"
        for i in range(n))


# -- the pool's rules ------------------------------------------------------------------------


def test_a_signal_halves_the_limit_but_never_above_what_the_provider_accepted() -> None:
    pool = Pool("claude", 16)
    epochs = [pool.start(0.0) for _ in range(5)]  # (stagger spacing is ignored here)
    pool.signal(1.0, "rate_limit", epoch=epochs[4], others=4)
    assert pool.limit == 4  # 16 // 2 = 8, but only 4 were accepted
    # The rest of the same burst (started before the cut) does not cut again ...
    pool.signal(1.1, "rate_limit", epoch=epochs[3], others=3)
    assert pool.limit == 4 and pool.decreases == 1
    # ... an attempt started after it does; and the limit never goes below 1.
    for _ in range(5):
        pool.signal(2.0, "overloaded", epoch=pool.start(2.0), others=8)
    assert pool.limit == 1 and pool.decreases == 6
    assert pool.signals == {"rate_limit": 2, "overloaded": 5}


def test_recovery_is_quick_up_to_the_accepted_level_then_one_probe_per_quiet_period() -> None:
    pool = Pool("codex", 16)
    pool.signal(0.0, "rate_limit", epoch=pool.epoch, others=8, retry_after=0)
    pool.limit = 2  # as if cut twice more
    for t in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0):
        pool.succeeded(t)
    assert pool.limit == 8  # +1 per success up to the 8 that were accepted
    pool.waiting = 3
    pool.succeeded(QUIET_S - 1)
    assert pool.limit == 8  # not quiet for long enough yet
    pool.succeeded(QUIET_S + 1)
    assert pool.limit == 9
    pool.succeeded(QUIET_S + 2)
    assert pool.limit == 9  # one probe per quiet period
    pool.waiting = 0
    pool.succeeded(3 * QUIET_S)
    assert pool.limit == 9  # nobody waits: growing would only allow a burst later


def test_a_reset_time_pauses_the_pool_then_one_probe_goes_first() -> None:
    pool = Pool("gemini", 4)
    pool.signal(10.0, "rate_limit", epoch=pool.start(0.0), others=0, retry_after=30.0)
    pool.release()
    assert pool.blocked_until(10.0) == 40.0 and pool.blocked_until(39.9) == 40.0
    assert pool.blocked_until(40.0) is None
    pool.start(40.0)
    assert pool.blocked_until(45.0) == math.inf  # the others wait for the probe
    woken: list[str] = []
    pool.on_release[1] = lambda: woken.append("wake")
    pool.alive()  # the probe's first sign of life: the others may start, and are told
    assert woken == ["wake"] and not pool.probing  # (its limit is 1: no room yet)
    pool.succeeded(50.0)
    pool.release()
    assert pool.blocked_until(50.0) is None and not pool.probing
    assert pool.paused_s == pytest.approx(30.0)


def test_a_rate_limit_without_a_reset_time_backs_off_doubling() -> None:
    pool = Pool("codex", 4)
    pool.signal(0.0, "rate_limit", epoch=pool.start(0.0), others=0)
    assert pool.paused_until == 2.0
    pool.signal(3.0, "rate_limit", epoch=pool.start(3.0), others=0)
    assert pool.paused_until == 7.0
    pool.succeeded(8.0)
    pool.signal(9.0, "rate_limit", epoch=pool.start(9.0), others=0)
    assert pool.paused_until == 11.0  # a success resets the backoff
    pool.signal(20.0, "overloaded", epoch=pool.start(20.0), others=0)
    assert pool.paused_until == 11.0  # overload without Retry-After: slower, not paused


def test_one_refusal_seen_thrice_backs_off_once_and_a_stated_reset_replaces_the_guess() -> None:
    pool = Pool("codex", 4)
    for _ in range(3):  # codex: the live `error`, the live `turn.failed`, the attempt's end
        pool.signal(0.0, "rate_limit", epoch=0, others=0)
    assert pool.paused_until == 2.0 and pool.backoff_s == 4.0
    pool.signal(0.5, "rate_limit", epoch=0, others=0, retry_after=1.0)
    assert pool.paused_until == 1.5  # the provider's stated reset, sooner than the guess
    pool.signal(0.6, "rate_limit", epoch=0, others=0)
    assert pool.paused_until == 1.5  # a guess never shortens or extends a stated reset


def test_starts_are_staggered_with_jitter_and_paced_to_a_stated_request_rate() -> None:
    pool = Pool("openai", 16, rng=random.Random(7))
    gaps = []
    now = 0.0
    for _ in range(50):
        assert pool.blocked_until(now) is None
        pool.start(now)
        pool.release()
        gaps.append(pool.next_start - now)
        now = pool.next_start
    assert all(0.5 * STAGGER_S <= g <= 1.5 * STAGGER_S for g in gaps)
    assert max(gaps) - min(gaps) > 0.5 * STAGGER_S  # jittered, not lockstep
    pool.signal(now, "rate_limit", epoch=pool.epoch, others=3, retry_after=0, rpm=60)
    gap = pool.next_start - now if pool.start(now) is not None else 0.0
    assert 60 / 60 * 1.05 <= gap <= 60 / 60 * 1.05 * 1.1  # never faster than 60 a minute


def test_a_pool_follows_a_changed_configuration() -> None:
    """The daemon keeps its pools across runs; a config change resizes them."""
    gov = Governor()
    pool = gov.pool("claude", 8, adaptive=True)
    pool.signal(0.0, "rate_limit", epoch=0, others=4, retry_after=0)
    assert pool.limit == 4
    assert gov.pool("claude", 3, adaptive=True) is pool and (pool.max_limit, pool.limit) == (3, 3)
    gov.pool("claude", 10, adaptive=True)
    assert (pool.max_limit, pool.limit) == (10, 3)  # room to grow, earned by successes
    gov.pool("claude", 6, adaptive=False)
    assert (pool.max_limit, pool.limit, pool.adaptive) == (6, 6, False)


def test_a_fixed_pool_ignores_signals() -> None:
    pool = Pool("agent reviewer", 2, adaptive=False)
    pool.signal(0.0, "rate_limit", epoch=0, others=1, retry_after=60)
    assert (pool.limit, pool.paused_until, pool.next_start) == (2, -math.inf, -math.inf)
    pool.start(0.0)
    pool.start(0.0)
    assert pool.blocked_until(0.0) == math.inf


# -- the scheduler ---------------------------------------------------------------------------


def test_a_rate_limited_task_waits_for_quota_without_using_a_retry(tmp_path: Path) -> None:
    spec = _spec(tmp_path, tasks(1, extra=", retries: 0"))
    runner = ScriptedRunner({"t0": [limited(1, 5.0), limited(1, 5.0), limited(1, 5.0),
                                    Script()]})
    progress = Recorder()
    result = _run(spec, runner, progress)
    t0 = _rec(result, "t0")
    assert (t0.status, t0.attempts, t0.quota_waits) == ("succeeded", 4, 3)
    assert t0.quota_wait_s == pytest.approx(15.0)
    starts = [t for _, t in _starts(runner, "t0")]
    assert [b - a for a, b in itertools.pairwise(starts)] == \
        pytest.approx([6.0, 6.0, 6.0])  # 1 s attempt + the 5 s the provider asked for
    assert progress.waits == [("t0", "claude", 5.0)] * 3
    data = to_json(result)
    task = data["tasks"][0]
    assert (task["status"], task["quota_waits"], task["quota_wait_s"]) == ("succeeded", 3, 15.0)
    assert data["summary"]["waited_for_quota"] == 1
    (pool,) = data["pools"]
    assert (pool["name"], pool["quota_waits"], pool["signals"]) == \
        ("claude", 3, {"rate_limit": 3})
    md = to_markdown(result, data)
    assert "| t0 | c | " in md and "(waited 3× for quota, 15.0s)" in md
    assert "## Pools" in md and "| claude | " in md


def test_a_reset_pauses_the_whole_pool_and_not_the_other_runners(tmp_path: Path) -> None:
    spec = _spec(tmp_path, tasks(4) + tasks(2, agent="g", prefix="g")[len("tasks:\n"):],
                 "settings: {max_parallel: 2}\n")
    runner = ScriptedRunner({"t0": [limited(1, 30.0), Script([Step(1)])],
                             "t1": [Script([Step(2)])],
                             **{f"t{i}": [Script([Step(1)])] for i in (2, 3)},
                             "g0": [Script([Step(1)])], "g1": [Script([Step(1)])]})
    result = _run(spec, runner)
    assert all(r.status == "succeeded" for r in result.records)
    first = {tid: _starts(runner, tid)[0][1] for tid in ("t1", "t2", "t3", "g0", "g1")}
    # t0 and t1 start at 0; at 1 s t0's 429 pauses the claude pool until 31 s.  The slots
    # freed at 1 s (t0) and 2 s (t1) go to the gemini tasks; the claude tasks wait.
    assert first["t1"] == 0.0
    assert first["g0"] == 1.0 and first["g1"] == 2.0
    assert first["t2"] >= 31.0 and first["t3"] >= 31.0
    assert _starts(runner, "t0")[1][1] >= 31.0
    claude = next(p for p in result.pools if p["name"] == "claude")
    assert claude["paused_s"] >= 30.0


def test_a_live_rate_limit_event_pauses_the_pool_while_the_client_retries(
        tmp_path: Path) -> None:
    spec = _spec(tmp_path, tasks(3), "settings: {max_parallel: 3}\n")
    retry = AgentEvent("API retry 1/10: rate limited (HTTP 429)", kind="retry",
                       cause="rate_limit", retry_after=20.0)
    runner = ScriptedRunner({"t0": [Script([Step(0.5, retry), Step(25)])],
                             "t1": [Script([Step(0.1)])], "t2": [Script([Step(0.1)])]})
    result = _run(spec, runner, governor=Governor(stagger_s=1.0, rng=random.Random(1)))
    assert all(r.status == "succeeded" and r.quota_waits == 0 for r in result.records)
    # t1 starts 0.5–1.5 s after t0 (the stagger); if that is after the event at 0.5 s,
    # it and t2 wait until 20.5 s.
    later = sorted(t for tid in ("t1", "t2") for _, t in _starts(runner, tid))
    assert later[-1] >= 20.5


def test_a_reset_beyond_max_quota_wait_ends_the_task_at_once_saying_so(tmp_path: Path) -> None:
    spec = _spec(tmp_path, tasks(1) + "  - {id: after, agent: c, prompt: p, output: b.md, "
                 "dependencies: [t0]}\n", "settings: {max_quota_wait: 600000}\n")
    runner = ScriptedRunner({"t0": [limited(1, 7200.0)]})
    result = _run(spec, runner)
    t0 = _rec(result, "t0")
    assert (t0.status, t0.cause, t0.attempts, t0.quota_waits) == \
        ("provider_error", "rate_limit", 1, 0)
    assert "the claude pool would reopen in 2h 00m" in (t0.error or "")
    assert "beyond --max-quota-wait 10m 00.0s" in (t0.error or "")
    assert result.wall_s == pytest.approx(1.0)  # not after waiting
    assert _rec(result, "after").status == "skipped"


def test_waits_add_up_against_max_quota_wait(tmp_path: Path) -> None:
    spec = _spec(tmp_path, tasks(1), "settings: {max_quota_wait: 60000}\n")
    runner = ScriptedRunner({"t0": [limited(1, 25.0)]})  # every attempt refused
    result = _run(spec, runner)
    t0 = _rec(result, "t0")
    # 1 + 25 (wait 1) + 1 + 25 (wait 2) = 52 s; a third wait would pass 60 s.
    assert (t0.status, t0.attempts, t0.quota_waits) == ("provider_error", 3, 2)
    assert "beyond --max-quota-wait 1m 00.0s (waited 52.0s so far)" in (t0.error or "")


def test_interrupted_while_waiting_keeps_a_provider_error(tmp_path: Path) -> None:
    spec = _spec(tmp_path, tasks(1))
    runner = ScriptedRunner({"t0": [limited(1, 300.0)]})
    result = _run(spec, runner, interrupt_at=10.0)
    t0 = _rec(result, "t0")
    assert (t0.status, t0.cause) == ("provider_error", "rate_limit")
    assert "interrupted while waiting for quota: run interrupted" in (t0.error or "")
    assert t0.quota_wait_s == pytest.approx(9.0)
    assert result.interrupted


def test_a_burst_of_refusals_cuts_the_limit_once(tmp_path: Path) -> None:
    """A provider taking 3 at a time refuses 5 of 8 at once: one cut, to half the limit or
    less (the refusals are handled one by one, so "in flight besides the refused one" is
    3 or 4), not 8 → 4 → 2 → 1 → 1."""
    spec = _spec(tmp_path, tasks(8), "settings: {max_parallel: 8}\n")
    scripts: dict[str, list[Script]] = {f"t{i}": [Script([Step(10)])] for i in range(3)}
    for i in range(3, 8):
        scripts[f"t{i}"] = [limited(0.01, None, "overloaded"), Script([Step(10)])]
    runner = ScriptedRunner(scripts)
    result = _run(spec, runner)
    assert all(r.status == "succeeded" for r in result.records)
    (pool,) = result.pools
    assert pool["decreases"] == 1 and pool["limit_now"] in (3, 4)
    assert pool["signals"] == {"overloaded": 5}
    long_runs = [t for tid, a, t in runner.starts if a == 2 or tid in ("t0", "t1", "t2")]
    for t in long_runs:  # after the cut, never more than the limit at once
        assert sum(1 for s in long_runs if s <= t < s + 10) <= pool["limit_now"]


def test_fixed_parallel_turns_the_governor_off(tmp_path: Path) -> None:
    spec = _spec(tmp_path, tasks(1, extra=", retries: 0"),
                 "settings: {adaptive_parallel: false}\n")
    runner = ScriptedRunner({"t0": [limited(1, 5.0), Script()]})
    result = _run(spec, runner)
    t0 = _rec(result, "t0")
    assert (t0.status, t0.attempts, t0.quota_waits) == ("provider_error", 1, 0)


def test_an_agent_pool_caps_that_agent_across_the_run(tmp_path: Path) -> None:
    spec = _spec(tmp_path, tasks(5), "settings: {max_parallel: 5}\n", agents="""
        [agents.c]
        runner = "claude"
        max_parallel = 2
    """)
    runner = ScriptedRunner({f"t{i}": [Script([Step(10)])] for i in range(5)})
    result = _run(spec, runner)
    assert all(r.status == "succeeded" for r in result.records)
    starts = sorted(t for _, _, t in runner.starts)
    assert starts == [0.0, 0.0, 10.0, 10.0, 20.0]
    assert {p["name"]: p["limit_max"] for p in result.pools} == {"claude": 5, "agent c": 2}


def test_a_runner_pool_limit_from_dispatch_toml(tmp_path: Path) -> None:
    spec = _spec(tmp_path, tasks(3), "settings: {max_parallel: 3}\n", agents="""
        [runners.claude]
        max_parallel = 1
        [agents.c]
        runner = "claude"
    """)
    runner = ScriptedRunner({f"t{i}": [Script([Step(10)])] for i in range(3)})
    result = _run(spec, runner)
    assert sorted(t for _, _, t in runner.starts) == [0.0, 10.0, 20.0]
    assert result.pools[0]["limit_max"] == 1


# -- where a user sees the pools -------------------------------------------------------------


def _limited_governor() -> Governor:
    gov = Governor(stagger_s=0.0)
    pool = gov.pool("openai", 8, adaptive=True)
    epochs = [pool.start(0.0) for _ in range(3)]
    pool.signal(0.0, "rate_limit", epoch=epochs[2], others=2, retry_after=30.0)
    pool.waiting = 4
    gov.pool("claude", 8, adaptive=True)  # never limited: not shown
    return gov


def test_the_live_line_shows_limited_pools_and_counts_down_the_wait() -> None:
    import io

    from parallel_dispatch.progress import LiveProgress
    from parallel_dispatch.result import TaskRecord, TaskStatus

    out = io.StringIO()
    progress = LiveProgress(out)
    progress.watch_pools(_limited_governor(), lambda: 10.0)
    rec = TaskRecord(id="t2", agent="a", wave=1, output="t2.md", spec=None,  # type: ignore[arg-type]
                     index=0, status=TaskStatus.WAITING_FOR_QUOTA, error="rate limited")
    progress.task_waiting(rec, "openai", 20.0)
    line = out.getvalue().rsplit("\r\x1b[2K", 1)[-1]
    assert "⧗ 1 waiting for quota, next in 19." in line or "next in 20.0s" in line
    assert "pool openai: limit 2/8, 3 running, 4 waiting, paused until " in line
    assert "claude" not in line
    assert "⧗ t2 waiting for quota (rate limited); the openai pool is paused for 20.0s" \
        in out.getvalue()


def test_status_shows_the_daemons_pools_and_who_waits_for_quota(tmp_path: Path) -> None:
    import json
    import os

    from parallel_dispatch.cli.status import render_status
    from parallel_dispatch.taskfiles import STATUS_FILE

    (tmp_path / ".aiwg" / "tasks").mkdir(parents=True)
    (tmp_path / ".aiwg" / "tasks" / "review.yaml").write_text(
        "tasks:\n  - {id: a, agent: shell, prompt: 'true', output: a.md}\n")
    status = {"pid": os.getpid(), "started_at": "2026-11-29T17:00:00Z", "max_parallel": 8,
              "files": {"review": {"running": True, "done": 3, "total": 9,
                                   "running_tasks": ["a"], "waiting_for_quota": ["b", "c"]}},
              "pools": _limited_governor().snapshot(10.0)}
    (tmp_path / STATUS_FILE).write_text(json.dumps(status))
    text = render_status(tmp_path)
    assert "  pool openai: limit 2/8, 3 running, 4 waiting, paused until 20" in text
    assert "  waiting for quota: b, c" in text
    assert "pool claude" not in text


def test_the_limit_recovers_after_a_cut(tmp_path: Path) -> None:
    """Cut 4 → 2 by an overload while 3 others ran; each success brings one back up to
    those 3, and a quiet minute with tasks waiting probes the fourth slot again."""
    spec = _spec(tmp_path, tasks(30), "settings: {max_parallel: 4}\n")
    scripts: dict[str, list[Script]] = {f"t{i}": [Script([Step(10)])] for i in range(30)}
    scripts["t3"] = [limited(0.01, None, "overloaded"), Script([Step(10)])]
    runner = ScriptedRunner(scripts)
    result = _run(spec, runner)
    assert all(r.status == "succeeded" for r in result.records)

    def running_at(t: float) -> int:
        return sum(1 for _, a, s in runner.starts
                   if s <= t < s + (0.01 if a == 1 and _ == "t3" else 10))

    assert running_at(5.0) == 3  # t0–t2; t3 refused, the limit cut to 2 (<3 running)
    assert running_at(15.0) == 3  # the first success brought it back to the 3 accepted
    assert max(running_at(s + 0.001) for _, _, s in runner.starts if s >= 60.0) == 4
    (pool,) = result.pools
    assert (pool["decreases"], pool["limit_now"]) == (1, 4)


def test_max_quota_wait_zero_never_waits(tmp_path: Path) -> None:
    """Even an overload with no pause ahead ends the task at once (0 + 0 is not > 0)."""
    spec = _spec(tmp_path, tasks(1, extra=", retries: 3"), "settings: {max_quota_wait: 0}\n")
    runner = ScriptedRunner({"t0": [limited(1, None, "overloaded"), Script()]})
    result = _run(spec, runner)
    t0 = _rec(result, "t0")
    assert (t0.status, t0.cause, t0.attempts, t0.quota_waits) == \
        ("provider_error", "overloaded", 1, 0)
    assert "the --max-quota-wait of 0.0s; raise it or run later" in (t0.error or "")
