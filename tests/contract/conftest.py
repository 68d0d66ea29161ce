"""Contract tests: the real agent CLIs, at the versions pinned in tests/clients/versions.txt,
run by `parallel-dispatch` end to end against local protocol stubs (tests/stubs/).

The clients must be installed (`bash tests/clients/install.sh`; `.ci/run` does it).  A
missing client fails these tests instead of skipping them: a contract nobody checked is
not a passing one.  The setup itself is plain functions (common.py, clients.py), shared
with bench/provider_errors.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from contract.common import new_project
from preset_support import AgentProject


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under tests/contract/ `contract`, so a CI job can run them apart."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.contract)


@pytest.fixture
def contract_project(tmp_path: Path) -> AgentProject:
    """A project whose PATH has the real clients and whose HOME and config dirs are
    private to the test; no provider key or setting leaks in from the machine."""
    return new_project(tmp_path)
