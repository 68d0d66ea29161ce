"""Small text formats shared by the report, the plan, the daemon and the runners."""

from __future__ import annotations

import datetime as _dt
import re
from pathlib import Path


def now_iso() -> str:
    """The current UTC time as ISO-8601 with a `Z`, to the second."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(seconds, 60)
    if minutes < 60:
        return f"{int(minutes)}m {rest:04.1f}s"
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}h {minutes:02d}m {rest:02.0f}s"


def rel_path(path: Path, root: Path) -> str:
    """`path` relative to `root` when it is inside it, else as given."""
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def plural(n: int, word: str, many: str | None = None) -> str:
    """`1 wave`, `2 waves`: counts the CLI prints read as English."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def duration_s(value: str) -> float | None:
    """`6m0s` → 360.0, `120ms` → 0.12, as OpenAI-style servers write waits (headers and
    messages); None when it is not such a duration."""
    value = value.strip()
    parts = _DURATION.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        return None
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * scale[u] for n, u in parts)
