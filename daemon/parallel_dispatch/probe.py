"""Looking at a path without tripping over permissions.

A path we may not look at (EACCES) is treated as *there*: the caller then goes on to
read it and reports why it cannot, instead of the path silently not existing.
"""

from __future__ import annotations

from pathlib import Path


def exists(path: Path) -> bool:
    """`Path.exists`, except that a path we may not stat counts as existing."""
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True
    return True
