"""The governor against a real rate-limited HTTP provider (issue 10).

The dispatcher runs as a real subprocess with the `openai` runner; the provider is the
Chat Completions stub on 127.0.0.1 enforcing a concurrency limit with real 429s
(`retry-after`, `x-ratelimit-*`; tests/stubs/limits.py).  Nothing here depends on
timing margins: the stub counts what it refused and admitted, the reports say what the
dispatcher did.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from preset_support import AgentProject, make_agent_project
from stubs.limits import Limiter, Limits
from stubs.openai_chat import OpenAIChatStub
from support import Project
from test_openai_runner import configure

N = 8


@pytest.fixture
def server() -> Iterator[OpenAIChatStub]:
    with OpenAIChatStub.running() as stub:
        # Two at a time, each answered after 2 s: the third concurrent request is refused.
        stub.limiter = Limiter(Limits(concurrency=2, delay_s=2.0))
        yield stub


@pytest.fixture
def ap(project: Project, tmp_path: Path, server: OpenAIChatStub) -> AgentProject:
    ap = make_agent_project(project, tmp_path)
    ap.define("assistant", "You are terse.")
    configure(ap, server, "m")
    ap.tasks("tasks:\n" + "".join(
        f"  - {{id: t{i}, agent: assistant, prompt: hi, output: t{i}.md, retries: 0}}\n"
        for i in range(N)))
    return ap


def test_the_governor_finds_the_providers_limit_and_fails_nothing(
        ap: AgentProject, server: OpenAIChatStub) -> None:
    proc = ap.run("t.yaml", "--max-parallel", str(N))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((ap.root / ".aiwg/working/dispatch-report.json").read_text())
    assert report["summary"]["succeeded"] == N
    stats = server.limiter.stats() if server.limiter else {}
    assert stats["admitted"] == N and stats["max_in_flight"] == 2
    # The first refusal cut the pool to the 2 the provider accepted and paused it for the
    # retry-after; starts were staggered, so a burst of 8 never went out at once.
    (pool,) = report["pools"]
    assert (pool["name"], pool["limit_max"], pool["limit_now"]) == ("openai", N, 2)
    # One burst, one cut. On a busy machine the first start after the pause can still
    # find the provider full (its two slots held past the retry-after): a second cut,
    # never more, and the limit stays at the 2 the provider accepts.
    assert 1 <= pool["decreases"] <= 2, pool
    assert 1 <= stats["rejected"] <= 4, stats
    waited = [t for t in report["tasks"] if t.get("quota_waits")]
    assert sum(t["quota_waits"] for t in waited) == stats["rejected"]  # each refusal a wait
    assert all(t["status"] == "succeeded" and t["attempts"] == 1 + t["quota_waits"]
               for t in waited)  # a wait spends no retry (retries: 0 here)
    assert report["summary"]["waited_for_quota"] == len(waited)
    md = (ap.root / ".aiwg/working/dispatch-report.md").read_text()
    assert "## Pools" in md and "| openai | 2 / 8 |" in md
    assert "waited 1× for quota" in md
    assert "⧗ t" in proc.stderr and "waiting for quota (openai runner: rate limited (HTTP 429" \
        in proc.stderr
    assert "pool openai: limit 8 → 2, paused for " in proc.stderr


def test_with_fixed_parallel_the_same_run_fails_tasks(
        ap: AgentProject, server: OpenAIChatStub) -> None:
    """Today's behaviour without the governor: 8 at once, 6 refused, no retries left."""
    proc = ap.run("t.yaml", "--max-parallel", str(N), "--fixed-parallel")
    assert proc.returncode == 1
    report = json.loads((ap.root / ".aiwg/working/dispatch-report.json").read_text())
    failed = [t for t in report["tasks"] if t["status"] == "provider_error"]
    assert failed and all(t["cause"] == "rate_limit" for t in failed)
    stats = server.limiter.stats() if server.limiter else {}
    assert stats["rejected"] == len(failed)
    assert "## Pools" not in (ap.root / ".aiwg/working/dispatch-report.md").read_text()
