"""How dependency outputs reach a dependent: an appended prompt section and env.

Inline content is capped per dependency so a huge upstream output cannot blow
up the prompt (or argv limits); the cap is noted in the text so agents know.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .model import InputsMode
from .spec import STDOUT_FILE_IN_DIR, DispatchSpec

INLINE_CAP = 64 * 1024
DIR_LISTING_CAP = 200


def inputs_env(paths: dict[str, Path]) -> str:
    """`DISPATCH_INPUTS`: a JSON object of dependency id → absolute output path."""
    return json.dumps({k: str(v) for k, v in paths.items()})


def compose_prompt(spec: DispatchSpec, index: int, mode: InputsMode | None = None) -> str:
    """The task's prompt plus, for `paths`/`inline`, a section per dependency."""
    task = spec.tasks[index]
    mode = mode or spec.inputs_mode(index)
    if mode == "none" or not task.dependencies:
        return task.prompt
    parts = [task.prompt.rstrip("\n"), "", "---", "", "## Inputs from dependencies", ""]
    for dep in task.dependencies:
        j = spec.index(dep)
        path = spec.output_path(j)
        parts.append(f"### {dep} (agent: {spec.tasks[j].agent})")
        parts.append(f"Output: {path}")
        if mode == "inline":
            parts.append("")
            # a schema-checked output is JSON: fenced as such
            lang = "json" if spec.tasks[j].output_schema is not None else ""
            parts.append(_inline(path, spec.tasks[j].is_directory, lang))
        if spec.isolation(j) == "worktree":
            parts.extend(_changes(spec.patch_path(j), mode,
                                  applied=spec.isolation(index) == "worktree"))
        parts.append("")
    return "\n".join(parts)


def _changes(patch: Path, mode: InputsMode, applied: bool) -> list[str]:
    """An isolated dependency's patch: already applied in this task's worktree, shown so
    the agent knows what changed (capped like any input)."""
    if not patch.is_file():
        return ["", "Changes: none (it changed no files)"]
    where = " (already applied in your working tree)" if applied else ""
    lines = ["", f"Changes{where}: {patch}"]
    if mode == "inline":
        lines += ["", _fenced(_read_capped(patch))]
    return lines


def _inline(path: Path, is_directory: bool, lang: str = "") -> str:
    if is_directory:
        return _directory(path)
    return _fenced(_read_capped(path), lang)


def _directory(path: Path) -> str:
    if not path.is_dir():
        return "(output directory is missing)"
    files = sorted(p for p in path.rglob("*") if p.is_file())
    listing = [f"- {p.relative_to(path)}" for p in files[:DIR_LISTING_CAP]]
    if len(files) > DIR_LISTING_CAP:
        listing.append(f"- … and {len(files) - DIR_LISTING_CAP} more files")
    text = "Files:\n" + ("\n".join(listing) if listing else "(empty)")
    main = path / STDOUT_FILE_IN_DIR
    if main.is_file():
        text += f"\n\n{STDOUT_FILE_IN_DIR}:\n\n" + _fenced(_read_capped(main))
    return text


def _read_capped(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            data = fh.read(INLINE_CAP + 1)
    except OSError as exc:
        return f"(cannot read output: {exc.strerror})"
    text = data[:INLINE_CAP].decode("utf-8", errors="replace")
    if len(data) > INLINE_CAP:
        size = path.stat().st_size
        text += (f"\n[… truncated: showing the first {INLINE_CAP // 1024} KiB of "
                 f"{size:,} bytes; read the full file at {path}]")
    return text


def _fenced(text: str, lang: str = "") -> str:
    """A code fence longer than any backtick run inside, so the content cannot close it."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text}\n{fence}"
