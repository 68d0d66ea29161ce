"""Cost and token accounting for the reports: per task, totals, and the Markdown section.

Runners report what their tool tells them in `Outcome.metrics` (the scheduler sums
attempts); not every tool reports everything (codex and gemini give no cost), so a
missing figure stays `null` instead of becoming a misleading 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

USAGE_KEYS = ("cost_usd", "input_tokens", "output_tokens", "turns")
EMPTY: dict[str, Any] = dict.fromkeys(USAGE_KEYS)


def _num(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def totals(tasks: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Sum of each usage figure over the tasks that reported it (None if none did)."""
    out: dict[str, Any] = dict(EMPTY)
    for t in tasks:
        for key in USAGE_KEYS:
            n = _num(t.get(key))
            if n is not None:
                out[key] = (out[key] or 0) + n
    if out["cost_usd"] is not None:
        out["cost_usd"] = round(out["cost_usd"], 6)
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
            lines.append(f"| {t['id']} | {fmt_cost(t.get('cost_usd'))} | "
                         f"{fmt_count(t.get('input_tokens'))} | "
                         f"{fmt_count(t.get('output_tokens'))} | {fmt_count(t.get('turns'))} |")
    s = data["summary"]
    lines.append(f"| **Total** | **{fmt_cost(s.get('cost_usd'))}** | "
                 f"**{fmt_count(s.get('input_tokens'))}** | "
                 f"**{fmt_count(s.get('output_tokens'))}** | **{fmt_count(s.get('turns'))}** |")
    budget = data["settings"].get("max_cost_usd")
    if budget is not None:
        lines += ["", f"Budget: {fmt_cost(budget)} (max_cost_usd)."]
    return lines


def notes_markdown(notes: Iterable[str]) -> list[str]:
    return [f"> **Note:** {n}" for n in notes]
