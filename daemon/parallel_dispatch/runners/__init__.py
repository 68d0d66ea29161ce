"""Runners: the real command runner, the dry-run runner, and the interface."""

from .base import Job, Outcome, Runner
from .command import CommandRunner
from .dryrun import DryRunRunner

__all__ = ["CommandRunner", "DryRunRunner", "Job", "Outcome", "Runner"]
