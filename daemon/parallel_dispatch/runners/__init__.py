"""Runners: the interface, the command runner, runner presets, and the dry-run runner."""

from .base import Job, Outcome, Runner
from .command import CommandRunner
from .dryrun import DryRunRunner
from .registry import RunnerSet

__all__ = ["CommandRunner", "DryRunRunner", "Job", "Outcome", "Runner", "RunnerSet"]
