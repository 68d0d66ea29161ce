"""Cost and token accounting for the reports: per task, totals, and the Markdown section.

Runners report what their tool tells them in `Outcome.metrics` (the scheduler sums
attempts); not every tool reports everything (codex and gemini give no cost), so a
missing figure stays `null` instead of becoming a misleading 0.  Tokens priced from the
project's pricing table (pricing.py) are shown apart from cost the runners reported,
and a task with tokens but no price says "tokens only".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .pricing import PRICED, TOKENS_ONLY

USAGE_KEYS = ("cost_usd", "input_tokens", "output_tokens", "turns")
EMPTY: dict[str, Any] = dict.fromkeys(USAGE_KEYS)


def _num(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def totals(tasks: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Sum of each usage figure over the tasks that reported it (None if none did)."""
    tasks = list(tasks)
    out: dict[str, Any] = dict(EMPTY)
    for t in tasks:
        for key in USAGE_KEYS:
            n = _num(t.get(key))
            if n is not None:
                out[key] = (out[key] or 0) + n
    if out["cost_usd"] is not None:
        out["cost_usd"] = round(out["cost_usd"], 6)
    # Present only when a price was applied or missing: older reports read as before.
    tasks = list(tasks)
    priced = [n for t in tasks if (n := _num(t.get("priced_cost_usd"))) is not None]
    if priced:
        out["priced_cost_usd"] = round(sum(priced), 6)
    unpriced = [t["id"] for t in tasks if TOKENS_ONLY in str(t.get("cost_source") or "")]
    if unpriced:
        out["tokens_only_tasks"] = unpriced
    return out


def reported(tasks: Iterable[Mapping[str, Any]]) -> bool:
    return any(_num(t.get(k)) is not None for t in tasks for k in USAGE_KEYS)


def fmt_cost(value: Any) -> str:
    n = _num(value)
    if n is None:
        return "–"
    return f"${n:.4f}" if n < 100 else f"${n:,.2f}"


def fmt_count(value: Any) -> str:
    n = _num(value)
    return "–" if n is None else f"{int(n):,}"


def markdown(data: Mapping[str, Any]) -> list[str]:
    """The `## Cost and tokens` section; empty when no runner reported anything."""
    tasks = data["tasks"]
    if not reported(tasks):
        return []
    lines = ["", "## Cost and tokens", "",
             "| Task | Cost (USD) | Input tokens | Output tokens | Turns |",
             "|------|-----------:|-------------:|--------------:|------:|"]
    for t in tasks:
        if any(_num(t.get(k)) is not None for k in USAGE_KEYS):
            lines.append(f"| {t['id']} | {_cost_cell(t)} | "
                         f"{fmt_count(t.get('input_tokens'))} | "
                         f"{fmt_count(t.get('output_tokens'))} | {fmt_count(t.get('turns'))} |")
    s = data["summary"]
    lines.append(f"| **Total** | **{fmt_cost(s.get('cost_usd'))}** | "
                 f"**{fmt_count(s.get('input_tokens'))}** | "
                 f"**{fmt_count(s.get('output_tokens'))}** | **{fmt_count(s.get('turns'))}** |")
    lines += _sources(tasks, s)
    budget = data["settings"].get("max_cost_usd")
    if budget is not None:
        lines += ["", f"Budget: {fmt_cost(budget)} (max_cost_usd)."]
    return lines


def _cost_cell(t: Mapping[str, Any]) -> str:
    source = str(t.get("cost_source") or "")
    cost = t.get("cost_usd")
    if source == TOKENS_ONLY:
        return TOKENS_ONLY
    text = fmt_cost(cost)
    if source.startswith("partly"):
        return f"{text} + tokens only"
    return f"{text} (priced)" if source == PRICED else text


def _sources(tasks: Iterable[Mapping[str, Any]], s: Mapping[str, Any]) -> list[str]:
    """Where the total comes from, when any of it is not the runners' own figure."""
    priced, unpriced = s.get("priced_cost_usd"), s.get("tokens_only_tasks")
    if priced is None and not unpriced:
        return []
    total = _num(s.get("cost_usd")) or 0
    out = [""]
    if priced is not None:
        prices = sorted({f"{t['priced_as']} ({t.get('price_source')})" for t in tasks
                         if t.get("priced_as")})
        out.append(f"Cost reported by the runners: {fmt_cost(total - priced)}; priced from "
                   f"the pricing table: {fmt_cost(priced)} — {'; '.join(prices)}.")
    if unpriced:
        out.append(f"Tokens only (no price known, not in the total): {', '.join(unpriced)}. "
                   'Add a [pricing."model"] entry to .aiwg/dispatch.toml to price them.')
    return out


def notes_markdown(notes: Iterable[str]) -> list[str]:
    return [f"> **Note:** {n}" for n in notes]
