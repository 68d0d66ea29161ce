"""Write-then-rename, so readers never see half a file."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_read_umask()
"""mkstemp creates 0600 files; reports and state should get the usual mode."""


def fsync_dir(path: Path) -> None:
    """Persist a rename: the directory entry lives in the parent."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Atomically replace `path` with `data` (temp file in the same dir, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)


def write_text(path: Path, text: str, *, fsync: bool = True) -> None:
    write_bytes(path, text.encode("utf-8"), fsync=fsync)


def replace_path(src: Path, dst: Path, durable: bool = True) -> None:
    """Move a finished file or directory into place (fsync'ing the directory if `durable`).

    Files are swapped in one rename.  A directory cannot replace a non-empty
    directory atomically, so the old one is first renamed aside and removed
    after the new one is in place: readers see old or new, never a mix.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir() and not src.is_symlink():
        old = None
        if dst.exists() or dst.is_symlink():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}-{id(src)}")
            os.replace(dst, old)
        os.replace(src, dst)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
    else:
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        os.replace(src, dst)
    if durable:
        fsync_dir(dst.parent)


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
