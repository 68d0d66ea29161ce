"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from support import Project


@pytest.fixture
def project(request: pytest.FixtureRequest, tmp_path: Path) -> Project:
    """A project in `tmp_path`; its CLI runs are forked warm (warmcli.py) unless the test
    or its module is marked `fresh_cli`."""
    (tmp_path / ".aiwg").mkdir()
    return Project(tmp_path, cold=request.node.get_closest_marker("fresh_cli") is not None)
