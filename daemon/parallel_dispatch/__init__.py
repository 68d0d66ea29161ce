"""parallel-dispatch: run a YAML file of AI-agent tasks as a dependency graph.

The public API is re-exported here; see docs/architecture.md for the roles.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .api import dispatch, run_dispatch, run_spec
from .errors import ConfigError, Diagnostic, DispatchError, TaskFileError, UsageError
from .loader import load_spec
from .model import Settings, Task, TaskFile
from .result import RunResult, TaskRecord
from .runners import CommandRunner, DryRunRunner, Job, Outcome, Runner
from .scheduler import Scheduler
from .spec import DispatchSpec

__all__ = [
    "CommandRunner",
    "ConfigError",
    "Diagnostic",
    "DispatchError",
    "DispatchSpec",
    "DryRunRunner",
    "Job",
    "Outcome",
    "RunResult",
    "Runner",
    "Scheduler",
    "Settings",
    "Task",
    "TaskFile",
    "TaskFileError",
    "TaskRecord",
    "UsageError",
    "__version__",
    "dispatch",
    "load_spec",
    "run_dispatch",
    "run_spec",
]
