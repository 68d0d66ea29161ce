"""The `parallel-dispatch` command line: a front end on the core.

`main` is the console script (`parallel-dispatch = parallel_dispatch.cli:main`) and
`python -m parallel_dispatch`.  Its `watch` and `action` subcommands hand over to the
other front ends (`service`, `github`), imported only when they are asked for.
"""

from __future__ import annotations

from .main import main

__all__ = ["main"]
