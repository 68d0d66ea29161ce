"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from support import Project


@pytest.fixture
def project(tmp_path: Path) -> Project:
    (tmp_path / ".aiwg").mkdir()
    return Project(tmp_path)
