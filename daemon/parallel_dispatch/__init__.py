"""parallel-dispatch: run a YAML file of AI-agent tasks as a dependency graph.

The public API is re-exported here; see docs/architecture.md for the roles.  The
names are resolved on first use (PEP 562), so `import parallel_dispatch.loader`
to validate a file does not import the scheduler, the runners and trio with it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "dispatch": "api", "run_dispatch": "api", "run_spec": "api",
    "ConfigError": "errors", "Diagnostic": "errors", "DispatchError": "errors",
    "TaskFileError": "errors", "UsageError": "errors",
    "load_spec": "loader",
    "Settings": "model", "Task": "model", "TaskFile": "model",
    "RunResult": "result", "TaskRecord": "result", "TaskStatus": "result",
    "RunStatus": "result",
    "CommandRunner": "runners", "DryRunRunner": "runners", "Job": "runners",
    "Outcome": "runners", "Runner": "runners",
    "Scheduler": "scheduler",
    "DispatchSpec": "spec",
}

__all__ = [
    "CommandRunner", "ConfigError", "Diagnostic", "DispatchError", "DispatchSpec",
    "DryRunRunner", "Job", "Outcome", "RunResult", "RunStatus", "Runner", "Scheduler",
    "Settings", "Task", "TaskFile", "TaskFileError", "TaskRecord", "TaskStatus",
    "UsageError", "__version__", "dispatch", "load_spec", "run_dispatch", "run_spec",
]

if TYPE_CHECKING:
    from .api import dispatch, run_dispatch, run_spec
    from .errors import ConfigError, Diagnostic, DispatchError, TaskFileError, UsageError
    from .loader import load_spec
    from .model import Settings, Task, TaskFile
    from .result import RunResult, RunStatus, TaskRecord, TaskStatus
    from .runners import CommandRunner, DryRunRunner, Job, Outcome, Runner
    from .scheduler import Scheduler
    from .spec import DispatchSpec


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'parallel_dispatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
