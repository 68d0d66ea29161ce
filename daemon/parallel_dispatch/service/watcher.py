"""File watching for the daemon: what to watch, and a stoppable `awatch`.

Which files are task files is `taskfiles.py`'s (the `status` command needs it too).
The rust watcher is stopped through `stop_event` (not by cancellation, which can
take up to `rust_timeout` to land).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import aclosing
from pathlib import Path

import trio
from watchfiles import Change, awatch

STEP_MS = 10
"""watchfiles yields once no new event arrived for this long: bursts of writes
from one save become one batch, and reaction time stays in tens of ms."""
RUST_TIMEOUT_MS = 1000


def static_root(pattern: str, project: Path) -> Path:
    """The deepest directory of a glob with no wildcard in it (what to watch)."""
    parts = Path(pattern).parts
    base = project if not Path(pattern).is_absolute() else Path("/")
    for part in parts if not Path(pattern).is_absolute() else parts[1:]:
        if any(ch in part for ch in "*?["):
            break
        base = base / part
    while not base.is_dir() and base != base.parent:
        base = base.parent
    return base


async def watch(
    roots: Iterable[Path],
    stop: trio.Event,
    keep: Callable[[Change, str], bool],
) -> AsyncIterator[set[tuple[Change, str]]]:
    """Batches of relevant changes under `roots` until `stop` is set."""
    paths = sorted({str(r) for r in roots})
    async with aclosing(awatch(*paths, watch_filter=keep, step=STEP_MS, debounce=1600,
                               stop_event=stop, rust_timeout=RUST_TIMEOUT_MS,
                               recursive=True)) as changes:
        async for batch in changes:
            yield batch
