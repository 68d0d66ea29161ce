"""Pricing: dollars for runners that report tokens but no cost (codex, gemini, llm, openai).

The table is `[pricing."model-name"]` in `.aiwg/dispatch.toml`; no prices ship built in,
since a list price we cannot cite (and keep current) is worse than none.  A runner's own
cost wins over the table, except opencode's `cost: 0` with tokens, which means "model
not in its catalogue", not "free".  An attempt with tokens and no price keeps
`cost_usd` unknown and says `cost_source = "tokens only"`: never a misleading 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr

RUNNER = "runner"
PRICED = "pricing table"
TOKENS_ONLY = "tokens only"

_Rate = Annotated[float, Field(ge=0, le=100_000, allow_inf_nan=False)]


class Price(BaseModel):
    """`[pricing."model"]`: USD per million tokens, and where the numbers come from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_per_mtok: _Rate
    output_per_mtok: _Rate
    cached_input_per_mtok: _Rate | None = None
    """Without it, cached input tokens are priced as input."""
    source: Annotated[StrictStr, Field(min_length=1)]
    """Required: a price nobody can trace cannot be checked when it changes."""


def lookup(table: Mapping[str, Price], model: str | None) -> tuple[str, Price] | None:
    """Exact name first, then without a `provider/` prefix; no fuzzy matching."""
    if not model:
        return None
    if model in table:
        return model, table[model]
    bare = model.rsplit("/", 1)[-1]
    return (bare, table[bare]) if bare != model and bare in table else None


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def tokens(metrics: Mapping[str, Any]) -> int | None:
    """Input + output tokens of an attempt (input includes cached); None if none reported."""
    if not any(isinstance(metrics.get(k), int) for k in ("input_tokens", "output_tokens")):
        return None
    return _int(metrics.get("input_tokens")) + _int(metrics.get("output_tokens"))


def cost(price: Price, metrics: Mapping[str, Any]) -> float:
    """(input − cached)·input + cached·cached_input + output·output, per million tokens."""
    total_in = _int(metrics.get("input_tokens"))
    cached = min(_int(metrics.get("cached_input_tokens")), total_in)
    cached_rate = (price.cached_input_per_mtok if price.cached_input_per_mtok is not None
                   else price.input_per_mtok)
    usd = ((total_in - cached) * price.input_per_mtok + cached * cached_rate
           + _int(metrics.get("output_tokens")) * price.output_per_mtok)
    return usd / 1e6


def apply(metrics: dict[str, Any], model: str | None, table: Mapping[str, Price]) -> None:
    """Set one attempt's `cost_usd` and `cost_source` in place (see the module docstring)."""
    reported = metrics.get("cost_usd")
    used = tokens(metrics)
    if isinstance(reported, int | float) and not isinstance(reported, bool) and (
            reported > 0 or not used):
        metrics["cost_source"] = RUNNER
        return
    if not used:
        return
    metrics.pop("cost_usd", None)
    found = lookup(table, model)
    if found is None:
        metrics["cost_source"] = TOKENS_ONLY
        return
    name, price = found
    metrics["cost_usd"] = metrics["priced_cost_usd"] = round(cost(price, metrics), 9)
    metrics["cost_source"] = PRICED
    metrics["priced_as"] = name
    metrics["price_source"] = price.source


def add_attempt(total: dict[str, Any], metrics: Mapping[str, Any]) -> None:
    """Add one attempt's usage to a task's: numbers sum, `cost_source` merges, the rest
    (session id, model) is the latest."""
    for key, value in metrics.items():
        if key == "cost_source":
            total[key] = merge_source(total.get(key), value)
        elif isinstance(value, int | float) and key in total:
            total[key] += value
        else:
            total[key] = value


def merge_source(before: Any, now: Any) -> Any:
    """A task's `cost_source` over its attempts: any unpriced attempt taints the total."""
    if now is None or before is None or before == now:
        return before if now is None else now
    if TOKENS_ONLY in (before, now) or str(before).startswith("partly"):
        return f"partly {TOKENS_ONLY}"
    return f"{RUNNER} + {PRICED}"
