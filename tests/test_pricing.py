"""Pricing tokens for runners that report no cost (issue 10 §3, pricing.py).

End to end the dispatcher runs as a subprocess: the `openai` runner against the Chat
Completions stub (real HTTP, tokens but no cost) and the fake codex CLI (tokens only).
Both reports must show the priced cost apart from reported cost, and "tokens only"
where no price is known.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from parallel_dispatch import pricing
from parallel_dispatch.config import load_config
from parallel_dispatch.errors import ConfigError
from preset_support import AgentProject, make_agent_project
from stubs.openai_chat import COMPLETION_TOKENS, PROMPT_TOKENS, OpenAIChatStub
from support import Project

PRICE = pricing.Price(input_per_mtok=2.0, cached_input_per_mtok=0.5, output_per_mtok=8.0,
                      source="test")


# --- the formula and the lookup ---------------------------------------------------------


def test_cached_input_is_priced_at_its_own_rate_and_output_apart() -> None:
    metrics: dict[str, object] = {"input_tokens": 1_000_000, "cached_input_tokens": 400_000,
                                  "output_tokens": 100_000}
    # 600k uncached · $2 + 400k cached · $0.5 + 100k · $8 = 1.2 + 0.2 + 0.8
    pricing.apply(metrics, "gpt-x", {"gpt-x": PRICE})
    assert metrics["cost_usd"] == pytest.approx(2.2)
    assert metrics["priced_cost_usd"] == pytest.approx(2.2)
    assert (metrics["cost_source"], metrics["priced_as"], metrics["price_source"]) == \
        ("pricing table", "gpt-x", "test")


def test_without_a_cached_rate_cached_tokens_cost_as_input() -> None:
    price = pricing.Price(input_per_mtok=2.0, output_per_mtok=0.0, source="s")
    metrics: dict[str, object] = {"input_tokens": 500_000, "cached_input_tokens": 500_000,
                                  "output_tokens": 0}
    pricing.apply(metrics, "m", {"m": price})
    assert metrics["cost_usd"] == pytest.approx(1.0)


def test_provider_prefix_matches_the_bare_name_but_nothing_fuzzy() -> None:
    table = {"gpt-x": PRICE}
    assert pricing.lookup(table, "openai/gpt-x") == ("gpt-x", PRICE)
    assert pricing.lookup(table, "gpt-x-mini") is None
    assert pricing.lookup(table, None) is None


def test_a_runners_own_cost_wins_but_opencodes_zero_with_tokens_is_priced() -> None:
    claude: dict[str, object] = {"cost_usd": 0.25, "input_tokens": 1000, "output_tokens": 10}
    pricing.apply(claude, "gpt-x", {"gpt-x": PRICE})
    assert (claude["cost_usd"], claude["cost_source"]) == (0.25, "runner")
    opencode: dict[str, object] = {"cost_usd": 0, "input_tokens": 1_000_000, "output_tokens": 0}
    pricing.apply(opencode, "stub/gpt-x", {"gpt-x": PRICE})
    assert opencode["cost_usd"] == pytest.approx(2.0)
    assert opencode["cost_source"] == "pricing table"


def test_tokens_without_a_price_stay_unpriced_not_zero() -> None:
    metrics: dict[str, object] = {"cost_usd": 0, "input_tokens": 10, "output_tokens": 5}
    pricing.apply(metrics, "unknown", {"gpt-x": PRICE})
    assert "cost_usd" not in metrics and metrics["cost_source"] == "tokens only"
    nothing: dict[str, object] = {}
    pricing.apply(nothing, "gpt-x", {"gpt-x": PRICE})
    assert nothing == {}  # no tokens, no cost: nothing to say


def test_a_task_with_one_unpriced_attempt_is_partly_tokens_only() -> None:
    assert pricing.merge_source(None, "runner") == "runner"
    assert pricing.merge_source("pricing table", "tokens only") == "partly tokens only"
    assert pricing.merge_source("partly tokens only", "runner") == "partly tokens only"
    assert pricing.merge_source("runner", "pricing table") == "runner + pricing table"
    assert pricing.merge_source("tokens only", None) == "tokens only"


# --- the table in dispatch.toml ------------------------------------------------------------


def test_a_price_needs_its_source_and_the_error_names_file_and_line(tmp_path: Path) -> None:
    cfg = tmp_path / ".aiwg" / "dispatch.toml"
    cfg.parent.mkdir()
    cfg.write_text('[defaults]\nmax_parallel = 2\n\n[pricing."gpt-x"]\ninput_per_mtok = 1.0\n'
                   "output_per_mtok = -3\n")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    found = {(d.line, d.message.split(":")[0]) for d in info.value.diagnostics}
    assert (6, "pricing.gpt-x.output_per_mtok") in found
    assert (4, "pricing.gpt-x.source") in found  # missing: the table's own line
    assert all(d.file.endswith("dispatch.toml") for d in info.value.diagnostics)


def test_a_valid_table_is_read(tmp_path: Path) -> None:
    cfg = tmp_path / ".aiwg" / "dispatch.toml"
    cfg.parent.mkdir()
    cfg.write_text('[pricing."stub/m"]\ninput_per_mtok = 1\noutput_per_mtok = 2\n'
                   'source = "test stub"\n')
    assert load_config(tmp_path).pricing["stub/m"].output_per_mtok == 2.0


# --- end to end -----------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[OpenAIChatStub]:
    with OpenAIChatStub.running() as stub:
        yield stub


@pytest.fixture
def ap(project: Project, tmp_path: Path) -> AgentProject:
    ap = make_agent_project(project, tmp_path)
    ap.define("assistant", "You are terse.")
    return ap


def test_openai_runner_tokens_are_priced_in_both_reports(ap: AgentProject,
                                                         server: OpenAIChatStub) -> None:
    ap.config(f"""
        [defaults]
        runner = "openai"

        [runners.openai]
        base_url = "{server.base_url}"
        model = "m"

        [pricing."m"]
        input_per_mtok = 1.0
        output_per_mtok = 2.0
        source = "test price"
    """)
    ap.tasks("tasks:\n  - {id: a, agent: assistant, prompt: hi, output: a.md}\n")
    proc = ap.run("t.yaml")
    assert proc.returncode == 0, proc.stderr
    expected = (PROMPT_TOKENS * 1.0 + COMPLETION_TOKENS * 2.0) / 1e6
    task = ap.task("a")
    assert task["cost_usd"] == pytest.approx(expected)
    assert task["cost_source"] == "pricing table" and task["priced_as"] == "m"
    summary = ap.report()["summary"]
    assert summary["cost_usd"] == pytest.approx(expected)
    assert summary["priced_cost_usd"] == pytest.approx(expected)
    md = ap.report_md()
    assert f"| a | ${expected:.4f} (priced) | {PROMPT_TOKENS:,} |" in md
    assert (f"Cost reported by the runners: $0.0000; priced from the pricing table: "
            f"${expected:.4f} — m (test price).") in md


def test_codex_tokens_priced_and_an_unpriced_model_says_tokens_only(ap: AgentProject) -> None:
    ap.define("coder")
    ap.define("other")
    ap.config("""
        [agents.coder]
        runner = "codex"
        model = "gpt-x"

        [agents.other]
        runner = "codex"
        model = "no-price-model"

        [pricing."gpt-x"]
        input_per_mtok = 2.0
        cached_input_per_mtok = 0.5
        output_per_mtok = 8.0
        source = "test"
    """)
    ap.tasks("""\
        tasks:
          - {id: a, agent: coder, output: a.md,
             prompt: "[fake input_tokens=1000000 cache_read_tokens=400000 output_tokens=100000] A"}
          - {id: b, agent: other, output: b.md, prompt: "[fake input_tokens=10 output_tokens=5] B"}
          - {id: c, agent: reviewer, output: c.md, prompt: "[fake cost=0.5] C"}
    """)
    ap.define("reviewer")
    assert ap.run("t.yaml").returncode == 0
    data = ap.report()
    tasks = {t["id"]: t for t in data["tasks"]}
    assert tasks["a"]["cost_usd"] == pytest.approx(2.2)
    assert tasks["b"]["cost_usd"] is None and tasks["b"]["cost_source"] == "tokens only"
    assert tasks["c"]["cost_source"] == "runner"
    s = data["summary"]
    assert s["cost_usd"] == pytest.approx(2.7)
    assert s["priced_cost_usd"] == pytest.approx(2.2)
    assert s["tokens_only_tasks"] == ["b"]
    md = ap.report_md()
    assert "| a | $2.2000 (priced) |" in md
    assert "| b | tokens only | 10 | 5 |" in md
    assert "| c | $0.5000 |" in md
    assert ("Cost reported by the runners: $0.5000; priced from the pricing table: $2.2000 — "
            "gpt-x (test).") in md
    assert "Tokens only (no price known, not in the total): b." in md
