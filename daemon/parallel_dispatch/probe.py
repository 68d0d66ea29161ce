"""Looking at a path or a process without tripping over permissions.

A path we may not look at (EACCES) is treated as *there*: the caller then goes on to
read it and reports why it cannot, instead of the path silently not existing.  A
process we may not signal (EPERM) is alive: it belongs to someone else, not to nobody.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
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


def pid_alive(pid: int) -> bool:
    """A live process, not a zombie; one we may not signal (EPERM) is alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = proc_stat(pid)
    return fields is None or fields[0] not in ("Z", "X")


def signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to a process group; False when the group is already gone."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:  # pgid reused by someone else's process: not ours to kill
        return False
    return True


def proc_stat(pid: int) -> list[str] | None:
    """The fields of `/proc/<pid>/stat` after the command name (state first; the start
    time is index 19); None when unreadable.  The name may hold spaces and ')'."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields or None


def tagged(markers: Iterable[str]) -> dict[int, str]:
    """Live processes whose environment holds one of `markers` ("NAME=value"): pid → marker.

    One pass over `/proc`, one lookup per variable name whatever the number of values
    (a daemon's registry may name thousands of runs); processes of other users are
    skipped (unreadable).
    """
    wanted: dict[bytes, set[bytes]] = {}
    for marker in markers:
        name, _, value = marker.encode().partition(b"=")
        wanted.setdefault(b"\0" + name + b"=", set()).add(value)
    found: dict[int, str] = {}
    if not wanted:
        return found
    me = os.getpid()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = b"\0" + fh.read()
        except OSError:
            continue
        for prefix, values in wanted.items():
            at = env.find(prefix)
            if at < 0:
                continue
            start = at + len(prefix)
            end = env.find(b"\0", start)
            value = env[start:] if end < 0 else env[start:end]
            if value in values:
                found[int(entry)] = (prefix[1:] + value).decode(errors="replace")
                break
    return found
