"""The tasks folder as both the daemon and `parallel-dispatch status` see it.

Which files in `.aiwg/tasks/` are task files (`*.yaml`/`*.yml`; no dotfiles, editor
swap, backup or temp files: watchfiles' default filter keeps `*.tmp`), what each
is called, and where the daemon publishes what it is doing.  Here, in the core,
so the `status` command reads the daemon's view without importing the daemon.
"""

from __future__ import annotations

import re
from pathlib import Path

TASK_SUFFIXES = (".yaml", ".yml")
STATUS_FILE = ".aiwg/dispatch-daemon.json"
"""The daemon's live status (relative to the project root), read by `status`."""

_IGNORED = re.compile(
    r"""^\.            # dotfiles, incl. vim's .x.swp and emacs' .#x
      | ~$ | \#$        # backups: x~  #x#
      | \.sw[a-p]$ | \.swx$
      | \.(tmp|temp|bak|orig|part|crdownload|kate-swp)$
      | ^4913$          # vim's write test
    """,
    re.VERBOSE | re.IGNORECASE,
)


def ignored_name(name: str) -> bool:
    return bool(_IGNORED.search(name))


def is_task_file(path: Path) -> bool:
    return path.suffix.lower() in TASK_SUFFIXES and not ignored_name(path.name)


def task_name(path: Path, tasks_dir: Path) -> str:
    """`tasks/review.yaml` → `review`; nested files keep their folders."""
    rel = path.relative_to(tasks_dir) if path.is_relative_to(tasks_dir) else Path(path.name)
    return str(rel.with_suffix(""))
