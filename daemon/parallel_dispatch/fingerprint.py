"""Content fingerprints: what makes a task's result worth recomputing.

A task's fingerprint covers its agent and prompt, the resolved agent (argv,
modes, env, definition), the settings that shape its result, the hashes of
its dependencies' outputs and of the files its `files:` globs match.  Equal
fingerprint + last run succeeded + output intact ⇒ the old output is reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .globwalk import glob_files
from .spec import DispatchSpec

_CHUNK = 1 << 20


def hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hash_output(path: Path) -> str | None:
    """Hash of a file, or of a directory's relative names and contents; None if missing."""
    try:
        if path.is_dir():
            h = hashlib.sha256(b"dir\0")
            for p in sorted(path.rglob("*")):
                if p.is_file():
                    h.update(str(p.relative_to(path)).encode() + b"\0")
                    h.update(hash_file(p).encode())
            return h.hexdigest()
        return hash_file(path)
    except OSError:
        return None


def output_stamp(path: Path) -> list[int] | None:
    """(size, mtime_ns) of an output: a cheap check that it was not touched since."""
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def expand_files(root: Path, patterns: Iterable[str]) -> list[Path]:
    """Files matched by `files:` globs (recursive `**` allowed), sorted, deduplicated."""
    found: set[Path] = set()
    for pattern in patterns:  # symlinked folders are not followed (globwalk.py)
        # Task files give relative globs (model.py); the daemon passes them made absolute.
        base = root if not os.path.isabs(pattern) else Path("/")
        for rel in glob_files(base, pattern if base is root else pattern.lstrip("/")):
            p = base / rel
            if p.is_file():
                found.add(p)
    return sorted(found)


def hash_files(root: Path, patterns: Iterable[str]) -> str:
    h = hashlib.sha256()
    for p in expand_files(root, patterns):
        h.update(str(p).encode() + b"\0")
        try:
            h.update(hash_file(p).encode())
        except OSError:
            h.update(b"unreadable")
    return h.hexdigest()


def agent_identity_of(spec: DispatchSpec, i: int) -> Any:
    agent = spec.agents[i]
    if dataclasses.is_dataclass(agent):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(agent).items()}
    return repr(agent)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in sorted(value.items())}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def task_fingerprint(spec: DispatchSpec, i: int, dep_hashes: Mapping[str, str | None],
                     agent_identity: Any = None) -> str:
    """`agent_identity` may be passed in, cached per agent, by callers fingerprinting many
    tasks of the same agent."""
    task = spec.tasks[i]
    material = {
        "agent": task.agent,
        "prompt": task.prompt,
        "resolved_agent": (agent_identity if agent_identity is not None
                           else agent_identity_of(spec, i)),
        "output": task.output,
        "output_dir": str(spec.settings.output_dir),
        "inputs": spec.inputs_mode(i),
        "dependencies": {d: dep_hashes.get(d) for d in task.dependencies},
        "files": hash_files(spec.root, task.files) if task.files else None,
    }
    if task.output_schema is not None:  # only then: other fingerprints stay as they were
        material["output_schema"] = task.output_schema
    blob = json.dumps(material, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()
