"""`glob_files` finds what `glob.glob(recursive=True)` finds, except below symlinked
folders (globwalk.py), which `glob` follows for ever when they loop."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest

from parallel_dispatch.globwalk import glob_files

FILES = ["a.md", "b.py", ".hidden.py", "src/c.py", "src/d.txt", "src/pkg/e.py",
         "src/pkg/deep/f.py", "src/.cache/g.py", ".github/workflows/ci.yml", "docs/x.md",
         "docs/sub/y.md", "node/lib/z.py", "src/pkg/test_h.py"]
PATTERNS = ["*.md", "*.py", "**/*.py", "src/**/*.py", "src/*/*.py", "**/test_*.py",
            "**/.*", ".github/**/*.yml", "**", "src/**", "docs/**/*.md", "**/**/*.md",
            "src/pkg/e.py", "nope/*.py", "src/[cd].*", "s*/**/f.py", "./*.md", "src/.c*/*"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    for rel in FILES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    return root


@pytest.mark.parametrize("pattern", PATTERNS)
def test_same_files_as_glob(tree: Path, pattern: str) -> None:
    expected = {Path(m).relative_to(tree).as_posix()
                for m in glob.glob(str(tree / pattern), recursive=True) if os.path.isfile(m)}
    got = {m for m in glob_files(tree, pattern) if (tree / m).is_file()}
    assert got == expected


def test_symlinked_folders_are_not_followed_but_symlinked_files_match(tmp_path: Path) -> None:
    (tmp_path / "src/x").mkdir(parents=True)
    (tmp_path / "src/x/a.py").write_text("")
    (tmp_path / "src/x/up").symlink_to("..")
    (tmp_path / "src/x/root").symlink_to("/")
    (tmp_path / "src/b.py").symlink_to("x/a.py")
    assert sorted(glob_files(tmp_path, "src/**/*.py")) == ["src/b.py", "src/x/a.py"]
