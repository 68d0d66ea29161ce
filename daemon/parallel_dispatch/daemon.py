"""The daemon: watch `.aiwg/tasks/`, run each task file as it appears or changes.

One trio task per task file waits for the file to be dirty, lets a burst of
saves settle, then runs it incrementally (unchanged tasks are `cached`).  A
change during a run interrupts it — its agents' process groups are killed —
and the new version starts.  All runs share one global slot pool on top of
each file's own `max_parallel`.  Bad files get an error report where their
report would go; the daemon keeps serving.  Layout and behaviour: README, "The daemon".
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from watchfiles import Change

from .agentdefs import search_dirs
from .api import run_spec
from .atomic import write_text
from .config import BUILTIN_DEFAULTS, ProjectConfig, load_config
from .errors import ConfigError, Diagnostic, TaskFileError
from .fingerprint import hash_files
from .fmt import now_iso, plural
from .loader import load_spec
from .orphans import REGISTRY_DIR, AgentRegistry
from .progress import PlainProgress
from .report import write_error_report
from .result import COUNTED, PROBLEMS, RunResult, TaskRecord
from .runners import RunnerSet
from .scheduler import Scheduler
from .sdnotify import Notifier, watchdog_loop
from .spec import DispatchSpec
from .state import State
from .watcher import is_task_file, static_root, watch

log = logging.getLogger("parallel_dispatch")

DEFAULT_GLOBAL_PARALLEL = 8
DEBOUNCE_S = 0.005
STATUS_FILE = ".aiwg/dispatch-daemon.json"
CANARY = ".dispatch-watch-canary"
"""Written into the tasks folder to learn when the file watcher is live."""


@dataclass(eq=False)
class TaskFileState:
    """What the daemon knows about one task file."""

    path: Path
    name: str
    dirty: trio.Event = field(default_factory=trio.Event)
    last_change: float = 0.0
    initial: bool = True
    scheduler: Scheduler | None = None
    result: RunResult | None = None
    output_dir: Path | None = None
    patterns: list[str] = field(default_factory=list)
    running: set[str] = field(default_factory=set)
    runs: int = 0
    mtime_ns: int = 0
    files_hash: str = ""
    source_hash: str = ""
    uses_definitions: bool = False
    invalid: bool = False


class _FileProgress(PlainProgress):
    """Plain progress lines, prefixed with the task file, plus live counts."""

    def __init__(self, daemon: Daemon, fs: TaskFileState) -> None:
        super().__init__(sys.stderr)
        self.daemon = daemon
        self.fs = fs

    def _line(self, text: str) -> None:
        log.info("[%s] %s", self.fs.name, text)

    def task_started(self, rec: TaskRecord) -> None:
        self.fs.running.add(rec.id)
        self.daemon.changed()
        super().task_started(rec)

    def task_finished(self, rec: TaskRecord) -> None:
        self.fs.running.discard(rec.id)
        self.daemon.changed()
        super().task_finished(rec)

    def task_retrying(self, rec: TaskRecord, delay: float) -> None:
        self.fs.running.discard(rec.id)
        super().task_retrying(rec, delay)


class Daemon:
    """`parallel-dispatch watch`: serve a project until SIGTERM/SIGINT."""

    def __init__(
        self,
        project: Path,
        tasks_dir: Path | None = None,
        *,
        max_parallel: int | None = None,
        force: bool = False,
        notifier: Notifier | None = None,
    ) -> None:
        self.project = project.resolve()
        self.tasks_dir = (tasks_dir if tasks_dir else self.project / ".aiwg" / "tasks")
        if not self.tasks_dir.is_absolute():
            self.tasks_dir = (self.project / self.tasks_dir).resolve()
        self.max_parallel = max_parallel or DEFAULT_GLOBAL_PARALLEL
        self.limiter = trio.CapacityLimiter(self.max_parallel)
        self.force = force
        self.notifier = notifier or Notifier(unset_environment=True)
        self.registry = AgentRegistry(self.project)
        self.runner = RunnerSet(registry=self.registry)
        self.files: dict[Path, TaskFileState] = {}
        self.config = ProjectConfig(root=self.project)
        self.stopping = False
        self._stop_watch = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._status_dirty = trio.Event()
        self._watching: set[Path] = set()
        self._watch_live = trio.Event()
        self._def_dirs: list[Path] = []
        self.started_at = now_iso()

    # -- lifecycle ------------------------------------------------------------------
    async def serve(self) -> None:
        """Run until SIGTERM/SIGINT; then cancel runs, write partial reports, return."""
        self._load_config()
        killed = self.registry.reap()
        if killed:
            log.warning("killed %s of an earlier dispatcher",
                        plural(len(killed), "orphaned agent group"))
        self.tasks_dir.mkdir(parents=True, exist_ok=True)
        async with trio.open_nursery() as services:
            services.start_soon(self._signals)
            services.start_soon(watchdog_loop, self.notifier)
            services.start_soon(self._status_writer)
            async with trio.open_nursery() as runs:
                self._nursery = runs
                for path in sorted(self.tasks_dir.rglob("*")):
                    if path.is_file() and is_task_file(path.relative_to(self.tasks_dir)):
                        self._touch(path)
                runs.start_soon(self._announce)
                await self._watch_loop()
            services.cancel_scope.cancel()
        self.registry.close()
        self._remove_status()
        log.info("stopped")

    async def _announce(self) -> None:
        """Ready once the watcher is up: rescan for files dropped while it started."""
        await self._rescan()
        log.info("watching %s (%d task files, global max_parallel %d)",
                 self.tasks_dir, len(self.files), self.max_parallel)
        self.notifier.ready(self._status_text())

    def shutdown(self, why: str) -> None:
        if self.stopping:
            return
        log.info("shutting down: %s", why)
        self.stopping = True
        self.notifier.stopping()
        self._stop_watch.set()
        for fs in self.files.values():
            if fs.scheduler is not None:
                fs.scheduler.interrupt(f"daemon shutting down ({why})")
            fs.dirty.set()

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for signum in sigs:
                if signum == signal.SIGHUP:
                    self.reload()
                else:
                    self.shutdown(signal.Signals(signum).name)

    def reload(self) -> None:
        """SIGHUP: re-read `.aiwg/dispatch.toml`; running work keeps its old config."""
        self.notifier.reloading()
        ok = self._load_config()
        log.info("configuration %s", "reloaded" if ok else "kept (the new one is invalid)")
        self._rewatch_if_needed()  # e.g. an agent-definition folder that appeared since
        self.notifier.ready(self._status_text())

    def _load_config(self) -> bool:
        try:
            self.config = load_config(self.project)
        except ConfigError as exc:
            for d in exc.diagnostics:
                log.error("%s", d.format())
            return False
        return True

    # -- watching -------------------------------------------------------------------
    async def _watch_loop(self) -> None:
        first = True
        while not self.stopping:
            self._stop_watch = trio.Event()
            self._watching = roots = self._roots()
            if not first:  # (the first rescan is `_announce`'s)
                assert self._nursery is not None
                self._nursery.start_soon(self._rescan)
            first = False
            async for batch in watch(roots, self._stop_watch, self._keep):
                for _change, raw in sorted(batch, key=lambda c: c[1]):
                    self._on_change(Path(raw))

    def _rewatch_if_needed(self) -> None:
        """Restart the watcher when `files:` globs need other directories."""
        if self._roots() != self._watching:
            self._stop_watch.set()

    async def _rescan(self) -> None:
        """Catch what changed while the watcher was (re)starting.

        watchfiles sets up its inotify watches some time after its generator
        first runs.  A canary file written into the tasks folder tells us when
        they are live; whatever appeared or changed before that is found here.
        """
        live = self._watch_live = trio.Event()
        canary = self.tasks_dir / CANARY
        with trio.move_on_after(5):
            while not live.is_set():
                canary.write_text(str(os.getpid()))
                with trio.move_on_after(0.25):
                    await live.wait()
        canary.unlink(missing_ok=True)
        for path in sorted(self.tasks_dir.rglob("*")):
            if not (path.is_file() and is_task_file(path.relative_to(self.tasks_dir))):
                continue
            fs = self.files.get(path)
            if fs is None or (fs.mtime_ns and fs.mtime_ns != _mtime_ns(path)):
                self._touch(path)
        for fs in list(self.files.values()):
            if fs.patterns and fs.files_hash != hash_files(self.project, fs.patterns):
                self._touch(fs.path)

    def _roots(self) -> set[Path]:
        """What to watch; also refreshes the agent-definition folders seen in events."""
        self._def_dirs = [d for d in search_dirs(self.project) if d.is_dir()]
        roots = {self.tasks_dir, *self._def_dirs}
        for fs in self.files.values():
            for pattern in fs.patterns:
                roots.add(static_root(pattern, self.project))
        return roots

    def _keep(self, change: Change, raw: str) -> bool:
        path = Path(raw)
        if path.name == CANARY and path.parent == self.tasks_dir:
            return change != Change.deleted
        if path.is_relative_to(self.tasks_dir):
            return is_task_file(path.relative_to(self.tasks_dir))
        if path.suffix == ".md" and any(path.is_relative_to(d) for d in self._def_dirs):
            return True
        if path.is_relative_to(self.project / REGISTRY_DIR) or any(
                fs.output_dir is not None and path.is_relative_to(fs.output_dir)
                for fs in self.files.values()):
            return False  # our own writes must never trigger runs
        return any(self._matches(fs, raw) for fs in self.files.values())

    @staticmethod
    def _matches(fs: TaskFileState, raw: str) -> bool:
        return any(fnmatch.fnmatchcase(raw, p) for p in fs.patterns)

    def _on_change(self, path: Path) -> None:
        if path.name == CANARY and path.parent == self.tasks_dir:
            self._watch_live.set()
            return
        if path.is_relative_to(self.tasks_dir):
            self._touch(path, content_event=True)
            return
        if any(path.is_relative_to(d) for d in self._def_dirs):
            for fs in list(self.files.values()):
                if fs.uses_definitions or fs.invalid:
                    log.info("[%s] agent definition %s changed", fs.name, path.name)
                    self._touch(fs.path)
            return
        for fs in self.files.values():
            if self._matches(fs, str(path)):
                log.info("[%s] %s changed", fs.name, path.relative_to(self.project)
                         if path.is_relative_to(self.project) else path)
                self._touch(fs.path)

    def _touch(self, path: Path, content_event: bool = False) -> None:
        """Mark a task file dirty (starting its loop if new); interrupt its run.

        With `content_event` (an event on the task file itself), a file whose
        bytes equal the version last loaded is left alone: one save can arrive
        as several event batches, and a no-op save must not restart a run.
        """
        fs = self.files.get(path)
        if fs is None:
            if not path.exists() or self.stopping:
                return
            fs = self.files[path] = TaskFileState(path, _name(path, self.tasks_dir))
            assert self._nursery is not None
            self._nursery.start_soon(self._file_loop, fs)
        else:
            if content_event and fs.source_hash and fs.source_hash == _sha256(path):
                return
            fs.initial = False
        fs.last_change = trio.current_time()
        if fs.scheduler is not None:
            why = "task file changed" if path.exists() else "task file deleted"
            fs.scheduler.interrupt(why)
        fs.dirty.set()

    # -- one task file --------------------------------------------------------------
    async def _file_loop(self, fs: TaskFileState) -> None:
        while True:
            await fs.dirty.wait()
            while (wait := fs.last_change + DEBOUNCE_S - trio.current_time()) > 0:
                await trio.sleep(wait)  # let a burst of saves settle into one run
            fs.dirty = trio.Event()
            if self.stopping:
                return
            if not fs.path.exists():
                log.info("[%s] deleted; its outputs stay in %s", fs.name, fs.output_dir)
                del self.files[fs.path]
                self.changed()
                return
            await self._run(fs)

    async def _run(self, fs: TaskFileState) -> None:
        try:
            spec = load_spec(fs.path, config=self.config, default_subdir=fs.name)
        except TaskFileError as exc:
            fs.source_hash = ""  # unknown which bytes were read: never skip the next event
            if fs.path.exists():
                self._invalid(fs, exc.diagnostics)
            return
        fs.source_hash = spec.source_hash
        fs.invalid = False
        fs.uses_definitions = any(a.definition is not None for a in spec.agents)
        clash = self._claimed_by_other(fs, spec.settings.output_dir)
        if clash is not None:
            self._invalid(fs, [Diagnostic(
                str(fs.path), None, None,
                f"output_dir {spec.settings.output_dir} is already used by {clash.path}; "
                "give this file its own settings.output_dir")])
            return
        fs.output_dir = spec.settings.output_dir
        fs.mtime_ns = _mtime_ns(fs.path)
        fs.patterns = [p if os.path.isabs(p) else str(self.project / p)
                       for t in spec.tasks for p in t.files]
        fs.files_hash = hash_files(self.project, fs.patterns) if fs.patterns else ""
        self._rewatch_if_needed()
        if fs.initial and not self.force and self._up_to_date(spec):
            log.info("[%s] up to date", fs.name)
            return
        reuse = not (self.force and fs.initial)
        fs.initial = False
        fs.runs += 1

        def hook(scheduler: Scheduler) -> None:
            fs.scheduler = scheduler
            if fs.dirty.is_set() or self.stopping:  # changed while we were loading it
                scheduler.interrupt("task file changed")

        try:
            fs.result = await run_spec(
                spec, runner=self.runner, reuse=reuse, limiter=self.limiter,
                progress=_FileProgress(self, fs), scheduler_hook=hook)
        finally:
            fs.scheduler = None
            fs.running.clear()
            self.changed()
        r = fs.result
        log.info("[%s] run %s %s: %d succeeded, %d cached, %d failed, %d skipped; report %s",
                 fs.name, r.run_id, r.status, r.count("succeeded"), r.count("cached"),
                 sum(r.count(p) for p in PROBLEMS), r.count("skipped"),
                 r.report_md_path)

    def _up_to_date(self, spec: DispatchSpec) -> bool:
        """At start: skip files whose last run finished on this exact file.

        Files with `files:` globs always get an (incremental) run, since what
        they read may have changed while the daemon was down.
        """
        last = State.load(spec.settings.output_dir).runs
        return (last.get("status") in ("succeeded", "failed")
                and last.get("task_file_hash") == spec.source_hash
                and not any(t.files for t in spec.tasks))

    def _claimed_by_other(self, fs: TaskFileState, out: Path) -> TaskFileState | None:
        for other in self.files.values():
            if other is fs or other.output_dir is None or not other.path.exists():
                continue
            if (out == other.output_dir or out.is_relative_to(other.output_dir)
                    or other.output_dir.is_relative_to(out)):
                return other
        return None

    def _invalid(self, fs: TaskFileState, diagnostics: list[Diagnostic]) -> None:
        fs.invalid = True
        out = fs.output_dir or self._default_output(fs)
        for d in diagnostics:
            log.error("[%s] %s", fs.name, d.format())
        try:
            out.mkdir(parents=True, exist_ok=True)
            report = write_error_report(out, str(fs.path), diagnostics)
            log.error("[%s] invalid: %s; nothing was run; report %s", fs.name,
                      plural(len(diagnostics), "error"), report)
        except OSError as exc:
            log.error("[%s] cannot write its error report in %s: %s", fs.name, out, exc)

    def _default_output(self, fs: TaskFileState) -> Path:
        base = self.config.defaults.output_dir or BUILTIN_DEFAULTS["output_dir"]
        root = Path(base) if os.path.isabs(base) else self.project / base
        return root / fs.name

    # -- status ---------------------------------------------------------------------
    def changed(self) -> None:
        self._status_dirty.set()

    def _status_text(self) -> str:
        runs = sum(1 for fs in self.files.values() if fs.scheduler is not None)
        agents = int(self.limiter.borrowed_tokens)
        queued = self.limiter.statistics().tasks_waiting
        return (f"{plural(len(self.files), 'task file')}; {runs} running, "
                f"{plural(agents, 'agent')} busy, {queued} queued")

    def status_data(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "started_at": self.started_at,
            "updated_at": now_iso(),
            "project": str(self.project),
            "tasks_dir": str(self.tasks_dir),
            "max_parallel": self.max_parallel,
            "files": {
                fs.name: {
                    "path": str(fs.path),
                    "output_dir": str(fs.output_dir) if fs.output_dir else None,
                    "running": fs.scheduler is not None,
                    "run_id": fs.scheduler.result.run_id if fs.scheduler else None,
                    "running_tasks": sorted(fs.running),
                    "done": (sum(1 for r in fs.scheduler.records if r.status in COUNTED)
                        if fs.scheduler else None),
                    "total": len(fs.scheduler.records) if fs.scheduler else None,
                }
                for fs in sorted(self.files.values(), key=lambda f: f.name)
            },
        }

    async def _status_writer(self) -> None:
        """Keep STATUS= and the status file current, at most every 0.2 s."""
        path = self.project / STATUS_FILE
        while True:
            self.notifier.status(self._status_text())
            try:
                write_text(path, json.dumps(self.status_data(), indent=2) + "\n", fsync=False)
            except OSError as exc:
                log.warning("cannot write %s: %s", path, exc)
            await self._status_dirty.wait()
            self._status_dirty = trio.Event()
            await trio.sleep(0.2)

    def _remove_status(self) -> None:
        with contextlib.suppress(OSError):
            (self.project / STATUS_FILE).unlink()


def _sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""


def _mtime_ns(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def _name(path: Path, tasks_dir: Path) -> str:
    """`tasks/review.yaml` → `review`; nested files keep their folders."""
    rel = path.relative_to(tasks_dir) if path.is_relative_to(tasks_dir) else Path(path.name)
    return str(rel.with_suffix(""))


def run_daemon(project: Path, tasks_dir: Path | None, max_parallel: int | None,
               force: bool) -> int:
    """Entry point of `parallel-dispatch watch`."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(message)s")
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
    daemon = Daemon(project, tasks_dir, max_parallel=max_parallel, force=force)
    t0 = time.monotonic()
    trio.run(daemon.serve)
    log.debug("served for %.1fs", time.monotonic() - t0)
    return 0
