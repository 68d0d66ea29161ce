"""The daemon: watch `.aiwg/tasks/`, run each task file as it appears or changes.

One trio task per task file waits for the file to be dirty, lets a burst of
saves settle, then runs it incrementally (unchanged tasks are `cached`).  A
change during a run interrupts it — its agents' process groups are killed —
and the new version starts.  All runs share one global slot pool on top of
each file's own `max_parallel`.  Bad files get an error report where their
report would go; the daemon keeps serving.  Layout and behaviour: README, "The daemon".

The daemon never dies of one file: whatever goes wrong while loading or
running a file (an unwritable output dir, a bug) ends in that file's error
report, and the file waits for its next change.  Task files are validated in
a worker thread, so a slow one never stalls the watchdog or other files.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import hashlib
import json
import logging
import os
import signal
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from watchfiles import Change

from ..agentdefs import search_dirs
from ..api import run_spec
from ..atomic import write_text
from ..config import BUILTIN_DEFAULTS, CONFIG_NAME, ProjectConfig, load_config
from ..control import DAEMON_SOCKET, ControlError, ControlledRun, ControlServer, socket_dir
from ..errors import ConfigError, Diagnostic, DispatchError, TaskFileError
from ..executor import agents_used, make_executor
from ..fingerprint import hash_files
from ..fmt import now_iso, plural
from ..loader import load_spec
from ..orphans import REGISTRY_DIR, AgentRegistry
from ..probe import exists
from ..progress import PlainProgress
from ..quota import Governor
from ..report import write_error_report
from ..result import COUNTED, PROBLEMS, RunResult, RunStatus, TaskRecord, TaskStatus
from ..runners import RunnerSet
from ..scheduler import Scheduler
from ..spec import DispatchSpec
from ..state import State
from ..taskfiles import STATUS_FILE, ignored_name, is_task_file, task_name
from ..yamlsafe import MAX_FILE_BYTES
from .sdnotify import Notifier, watchdog_loop
from .watcher import static_root, watch
from .webpage import HttpOptions, listen, project_bases, serve_page

log = logging.getLogger("parallel_dispatch")

DEFAULT_GLOBAL_PARALLEL = 8
DEBOUNCE_S = 0.005
INVALID_SETTLE_S = 1.0
"""An invalid version is published (error report, ERROR log) only once its bytes
have not changed for this long: a file caught half-written never replaces a report."""
MAX_LOGGED_ERRORS = 10
"""Errors of one file written to the log; all of them are in its error report."""
LOAD_THREADS = 2
"""Task files validated at once, in worker threads (off the event loop)."""
WATCH_RETRY_S = 5.0
CONFIG_DISPLAY = f".aiwg/{CONFIG_NAME}"
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
    forced: set[str] = field(default_factory=set)
    """Tasks its next run runs even if unchanged (a re-run asked on the control socket)."""
    invalid: bool = False
    error: str | None = None
    """Why the last attempt did not run (shown by `status`); None after a good load."""


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

    def task_waiting(self, rec: TaskRecord, pool: str, wait_s: float) -> None:
        self.fs.running.discard(rec.id)
        self.daemon.changed()
        super().task_waiting(rec, pool, wait_s)


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
        executor: str | None = None,
    ) -> None:
        self.project = project.resolve()
        self.tasks_dir = (tasks_dir if tasks_dir else self.project / ".aiwg" / "tasks")
        if not self.tasks_dir.is_absolute():
            self.tasks_dir = (self.project / self.tasks_dir).resolve()
        self.max_parallel = max_parallel or DEFAULT_GLOBAL_PARALLEL
        self.limiter = trio.CapacityLimiter(self.max_parallel)
        self.governor = Governor()
        """Runner and agent pools shared by every task file: a provider limits the account."""
        self.force = force
        self.notifier = notifier or Notifier(unset_environment=True)
        self.registry = AgentRegistry(self.project)
        self.runner = RunnerSet(registry=self.registry)
        self.executor_choice = executor
        """`--executor`; else `[executor]` of the config at start (a change needs a restart)."""
        self.files: dict[Path, TaskFileState] = {}
        self.config = ProjectConfig(root=self.project)
        self.stopping = False
        self._stop_watch = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._status_dirty = trio.Event()
        self._watching: set[Path] = set()
        self._watch_live = trio.Event()
        self._def_dirs: list[Path] = []
        self._unreadable_dirs: set[Path] = set()
        self.config_errors: list[Diagnostic] = []
        """The config's errors while it is invalid (at start): no file runs until it is fixed."""
        self._load_limiter = trio.CapacityLimiter(LOAD_THREADS)
        self.started_at = now_iso()
        self.http: HttpOptions | None = None
        """`--http`: also serve the live page (webpage.py) of every run."""

    # -- lifecycle ------------------------------------------------------------------
    async def serve(self) -> None:
        """Run until SIGTERM/SIGINT; then cancel runs, write partial reports, return."""
        control = ControlServer(self, socket_dir(self.project) / DAEMON_SOCKET)
        await control.bind()  # first: a second daemon for this project stops here
        page = await listen(self.http) if self.http is not None else None  # (a port in use)
        if not self._load_config(at_start=True):
            log.error("no task file runs until %s is fixed and the daemon reloaded "
                      "(SIGHUP, systemctl reload)", CONFIG_DISPLAY)
        await self._start_executor()
        killed = self.registry.reap()
        if killed:
            log.warning("killed %s of an earlier dispatcher",
                        plural(len(killed), "orphaned agent group"))
        try:
            self.tasks_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DispatchError(f"cannot create the tasks folder {self.tasks_dir}: "
                                f"{exc.strerror or exc}") from None
        async with trio.open_nursery() as services:
            services.start_soon(self._signals)
            services.start_soon(watchdog_loop, self.notifier)
            services.start_soon(self._status_writer)
            services.start_soon(control.serve)
            if page is not None:
                url = await services.start(serve_page, page, self._page_dirs,
                                           f"parallel-dispatch watch · {self.project.name}")
                log.info("live page: %s%s", url, "  (token required)" if page.options.token
                         else "")
            async with trio.open_nursery() as runs:
                self._nursery = runs
                for path in self._task_files(self.tasks_dir):
                    self._touch(path)
                runs.start_soon(self._announce)
                await self._watch_loop()
            services.cancel_scope.cancel()
        self.registry.close()
        self._remove_status()
        log.info("stopped")

    async def _start_executor(self) -> None:
        """Join the Ray cluster when asked to; a cluster that can't be reached stops the
        daemon at start, with the reason (systemd restarts it), rather than failing every
        task later."""
        executor = make_executor(self.executor_choice, self.config, os.environ)
        if executor.local:
            return
        await trio.to_thread.run_sync(executor.connect)
        self.runner = RunnerSet(registry=self.registry, executor=executor)
        log.info("agents run on the Ray cluster at %s", getattr(executor, "address", "?"))

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
        """SIGHUP: re-read `.aiwg/dispatch.toml`; running work keeps its old config.

        An invalid new config is logged and the old one kept.  Files that were
        refused (invalid, or waiting for a valid config) are checked again.
        """
        self.notifier.reloading()
        blocked = bool(self.config_errors)
        ok = self._load_config()
        if ok:
            log.info("configuration reloaded")
        elif blocked:
            log.error("configuration still invalid; no task file runs until it is fixed")
        else:
            log.error("configuration kept: the new %s is invalid", CONFIG_DISPLAY)
        if ok or blocked:
            for fs in list(self.files.values()):
                if fs.invalid or fs.error is not None:
                    self._touch(fs.path)
        self._rewatch_if_needed()  # e.g. an agent-definition folder that appeared since
        self.notifier.ready(self._status_text())

    def _load_config(self, at_start: bool = False) -> bool:
        """Read the config; on any problem keep the one in use and log why.

        At start there is none to keep: `config_errors` then holds the problems,
        and every file gets them as its error report until a reload succeeds.
        """
        try:
            config = load_config(self.project)
        except Exception as exc:  # no config problem may stop the daemon
            diagnostics = (exc.diagnostics if isinstance(exc, ConfigError) else
                           [Diagnostic(CONFIG_DISPLAY, None, None, _describe(exc))])
            for d in diagnostics:
                log.error("%s", d.format())
            if not isinstance(exc, ConfigError):
                log.debug("details", exc_info=True)
            if at_start or self.config_errors:
                self.config_errors = list(diagnostics)
            return False
        self.config = config
        self.config_errors = []
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
            try:
                async for batch in watch(roots, self._stop_watch, self._keep):
                    for _change, raw in sorted(batch, key=lambda c: c[1]):
                        try:
                            self._on_change(Path(raw))
                        except Exception as exc:  # a bug must not stop the watcher
                            log.error("cannot handle a change of %s: %s", raw, _describe(exc))
                            log.debug("details", exc_info=True)
            except OSError as exc:  # e.g. a folder that vanished or became unreadable
                log.warning("file watcher stopped: %s; restarting it in %.0f s",
                            exc, WATCH_RETRY_S)
                with trio.move_on_after(WATCH_RETRY_S):
                    await self._stop_watch.wait()

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
                try:
                    self.tasks_dir.mkdir(parents=True, exist_ok=True)
                    canary.write_text(str(os.getpid()))
                except OSError as exc:
                    log.warning("cannot write %s: %s", canary, exc)
                    break
                with trio.move_on_after(0.25):
                    await live.wait()
        with contextlib.suppress(OSError):
            canary.unlink(missing_ok=True)
        for path in self._task_files(self.tasks_dir):
            fs = self.files.get(path)
            if fs is None or (fs.mtime_ns and fs.mtime_ns != _mtime_ns(path)):
                self._touch(path)
        for fs in list(self.files.values()):
            if not exists(fs.path):
                self._touch(fs.path)  # gone while the watcher was down
            elif fs.patterns and fs.files_hash != hash_files(self.project, fs.patterns):
                self._touch(fs.path)

    def _task_files(self, folder: Path) -> list[Path]:
        """Task files under `folder` (inside the tasks folder), in name order."""
        try:
            return sorted(p for p in folder.rglob("*")  # (a FIFO too: it gets its error)
                          if is_task_file(p.relative_to(self.tasks_dir)) and not _is_dir(p))
        except OSError as exc:
            log.warning("cannot list %s: %s", folder, exc)
            return []

    def _roots(self) -> set[Path]:
        """What to watch; also refreshes the agent-definition folders seen in events.

        A folder we may not list is left out (watching it would fail) and named
        once in the log; validation reports it where it matters.
        """
        self._def_dirs = []
        for d in search_dirs(self.project):
            try:
                if not d.is_dir():
                    continue
                readable = os.access(d, os.R_OK | os.X_OK)
            except OSError:  # a parent we may not search: it may be there
                readable = False
            if readable:
                self._def_dirs.append(d)
                self._unreadable_dirs.discard(d)
            elif d not in self._unreadable_dirs:
                self._unreadable_dirs.add(d)
                log.warning("cannot read the agent folder %s (permission denied): it is not "
                            "watched, and its definitions are not found; make it readable "
                            "(chmod u+rx) and reload", d)
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
            if is_task_file(path.relative_to(self.tasks_dir)):
                return True
            # A folder moved in or out brings or takes its task files without an
            # event of their own.
            return (path != self.tasks_dir and not ignored_name(path.name)
                    and (_is_dir(path) or self._known_under(path)))
        if path.suffix == ".md" and any(path.is_relative_to(d) for d in self._def_dirs):
            return True
        if path.is_relative_to(self.project / REGISTRY_DIR) or any(
                (fs.output_dir is not None and path.is_relative_to(fs.output_dir))
                or (fs.invalid and path.is_relative_to(self._default_output(fs)))
                for fs in self.files.values()):
            return False  # our own writes (reports, error reports) must never trigger runs
        return any(self._matches(fs, raw) for fs in self.files.values())

    def _known_under(self, folder: Path) -> bool:
        return any(p.is_relative_to(folder) for p in self.files)

    @staticmethod
    def _matches(fs: TaskFileState, raw: str) -> bool:
        return any(fnmatch.fnmatchcase(raw, p) for p in fs.patterns)

    def _on_change(self, path: Path) -> None:
        if path.name == CANARY and path.parent == self.tasks_dir:
            self._watch_live.set()
            return
        if path.is_relative_to(self.tasks_dir):
            if not is_task_file(path.relative_to(self.tasks_dir)):
                self._folder_changed(path)
                return
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

    def _folder_changed(self, folder: Path) -> None:
        """A folder in the tasks folder appeared (moved in) or went away (moved out)."""
        if _is_dir(folder):
            for path in self._task_files(folder):
                self._touch(path, content_event=True)
        for path in [p for p in self.files if p.is_relative_to(folder)]:
            if not exists(path):
                self._touch(path)

    def _touch(self, path: Path, content_event: bool = False) -> None:
        """Mark a task file dirty (starting its loop if new); interrupt its run.

        With `content_event` (an event on the task file itself), a file whose
        bytes equal the version last loaded is left alone: one save can arrive
        as several event batches, and a no-op save must not restart a run.
        """
        fs = self.files.get(path)
        if fs is None:
            if not exists(path) or self.stopping:
                return
            fs = self.files[path] = TaskFileState(path, task_name(path, self.tasks_dir))
            assert self._nursery is not None
            self._nursery.start_soon(self._file_loop, fs)
        else:
            if content_event and fs.source_hash and fs.source_hash == _fingerprint(path):
                return
            fs.initial = False
        fs.last_change = trio.current_time()
        if fs.scheduler is not None:
            why = "task file changed" if exists(path) else "task file deleted"
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
            if not exists(fs.path):
                log.info("[%s] deleted; its outputs stay in %s", fs.name, fs.output_dir)
                del self.files[fs.path]
                self.changed()
                return
            try:
                await self._run(fs)
            except Exception as exc:  # the daemon never dies of one file
                self._failed(fs, exc)
            if not fs.dirty.is_set():  # its verdict stands: what a reader (or test) waits for
                log.info("[%s] settled; idle until it changes", fs.name)

    async def _load(self, fs: TaskFileState, config: ProjectConfig) -> DispatchSpec:
        """Validate in a worker thread: a slow file must not stall the event loop
        (watchdog pings, other files' runs and events)."""
        load = functools.partial(load_spec, fs.path, config=config, default_subdir=fs.name,
                                 confine_to=(self.tasks_dir,))
        return await trio.to_thread.run_sync(load, abandon_on_cancel=True,
                                             limiter=self._load_limiter)

    async def _run(self, fs: TaskFileState) -> None:
        if self.config_errors:
            fs.error = f"{CONFIG_DISPLAY} is invalid"
            self._invalid(fs, [Diagnostic(
                str(fs.path), None, None,
                f"not run: the project config {CONFIG_DISPLAY} is invalid (errors below); "
                "fix it, then reload the daemon (SIGHUP, or systemctl reload)"),
                *self.config_errors])
            return
        read = _fingerprint(fs.path)
        if read is not None and read.startswith(SPECIAL):  # reading it could block forever
            fs.source_hash = read
            self._invalid(fs, [Diagnostic(
                str(fs.path), None, None,
                "not a regular file (a pipe, socket or device); a task file must be a "
                "plain file: replace it with one")])
            return
        try:
            spec = await self._load(fs, self.config)
        except TaskFileError as exc:
            if await self._settled(fs, read):
                fs.source_hash = read or ""  # a no-op save of these bytes changes nothing
                fs.error = None
                self._invalid(fs, exc.diagnostics)
            return
        if self.stopping:
            return
        problems = await trio.to_thread.run_sync(
            self.runner.executor.check, spec.config, agents_used(spec.agents))
        if problems:
            fs.source_hash = spec.source_hash
            self._invalid(fs, problems)
            return
        fs.source_hash = spec.source_hash
        fs.invalid = False
        fs.error = None
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
        fs.patterns = [p if os.path.isabs(p) else str(self.project / p)  # (and a new file
                       for p in (*(p for t in spec.tasks for p in t.files),  # for a foreach)
                                 *spec.foreach_watch)]
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
            for i in (i for i, t in enumerate(spec.tasks) if t.id in fs.forced):
                scheduler.force(i)
            fs.forced.clear()
            if fs.dirty.is_set() or self.stopping:  # changed while we were loading it
                scheduler.interrupt("task file changed")

        try:
            fs.result = await run_spec(
                spec, runner=self.runner, reuse=reuse, limiter=self.limiter,
                governor=self.governor, progress=_FileProgress(self, fs),
                scheduler_hook=hook)
        finally:
            fs.scheduler = None
            fs.running.clear()
            self.changed()
        r = fs.result
        log.info("[%s] run %s %s: %d succeeded, %d cached, %d failed, %d skipped; report %s",
                 fs.name, r.run_id, r.status, r.count(TaskStatus.SUCCEEDED),
                 r.count(TaskStatus.CACHED), sum(r.count(p) for p in PROBLEMS),
                 r.count(TaskStatus.SKIPPED),
                 r.report_md_path)

    async def _settled(self, fs: TaskFileState, read: str | None) -> bool:
        """Whether the bytes that failed to load are the file's settled content.

        A file being rewritten in place is often read half-written; its error
        report must not replace the last good report.  So the invalid version is
        published only after `INVALID_SETTLE_S` without a change; if the bytes
        changed meanwhile (an event may still be on its way), the file is read
        again — unless they are back to the version already in effect.
        """
        with trio.move_on_after(INVALID_SETTLE_S):
            await fs.dirty.wait()
        if fs.dirty.is_set() or self.stopping:
            return False  # a newer version is queued: the loop reads it next
        now = _fingerprint(fs.path)
        if now is None:
            return False  # deleted: its event is on its way
        if now == read:
            return True
        if now != fs.source_hash:
            self._touch(fs.path)
        return False

    def _failed(self, fs: TaskFileState, exc: Exception) -> None:
        """Whatever went wrong at run time ends in this file's error report."""
        what = _describe(exc)
        if isinstance(_unwrap(exc), DispatchError):
            message = f"could not run: {what}"
        elif isinstance(_unwrap(exc), OSError):  # the machine's, not the file's or ours
            message = (f"could not run: {what}; check that the output dir (and the disk) "
                       "can be written by the user running the daemon")
        else:
            message = (f"could not run: internal error: {what}; this is a bug in "
                       "parallel-dispatch: please report it (set PARALLEL_DISPATCH_DEBUG=1 "
                       "for details in the log)")
            log.debug("[%s] details", fs.name, exc_info=exc)
        fs.error = what
        fs.source_hash = ""  # the same bytes, saved again, are tried again
        self._invalid(fs, [Diagnostic(str(fs.path), None, None,
                                      f"{message}; it runs again when the file changes")],
                      crashed=True)

    def _up_to_date(self, spec: DispatchSpec) -> bool:
        """At start: skip files whose last run finished on this exact file.

        Files with `files:` globs always get an (incremental) run, since what
        they read may have changed while the daemon was down.
        """
        last = State.load(spec.settings.output_dir).runs
        return (last.get("status") in (RunStatus.SUCCEEDED, RunStatus.FAILED)
                and last.get("task_file_hash") == spec.source_hash
                and not any(t.files for t in spec.tasks))

    def _claimed_by_other(self, fs: TaskFileState, out: Path) -> TaskFileState | None:
        for other in self.files.values():
            if other is fs or other.output_dir is None or not exists(other.path):
                continue
            if (out == other.output_dir or out.is_relative_to(other.output_dir)
                    or other.output_dir.is_relative_to(out)):
                return other
        return None

    def _invalid(self, fs: TaskFileState, diagnostics: list[Diagnostic],
                 crashed: bool = False) -> None:
        """Log the errors and write the error report where the file's report goes.

        If that dir cannot be written (read-only, `/proc/...`), the report goes to
        the file's default dir under `.aiwg/working/` instead, unless another file
        owns that dir.
        """
        fs.invalid = True
        self.changed()
        for d in diagnostics[:MAX_LOGGED_ERRORS]:
            log.error("[%s] %s", fs.name, d.format())
        if len(diagnostics) > MAX_LOGGED_ERRORS:
            log.error("[%s] ... and %d more errors (all are in its error report)", fs.name,
                      len(diagnostics) - MAX_LOGGED_ERRORS)
        default = self._default_output(fs)
        places = [fs.output_dir or default]
        if places[0] != default and self._claimed_by_other(fs, default) is None:
            places.append(default)
        problems = []
        for out in places:
            try:
                out.mkdir(parents=True, exist_ok=True)
                report = write_error_report(out, str(fs.path), diagnostics, crashed)
            except OSError as exc:
                problems.append(f"cannot write its error report in {out}: "
                                f"{exc.strerror or exc}")
                continue
            for problem in problems:
                log.error("[%s] %s", fs.name, problem)
            log.error("[%s] %s: %s; report %s", fs.name,
                      "could not run" if crashed else "invalid; nothing was run",
                      plural(len(diagnostics), "error"), report)
            return
        for problem in problems:
            log.error("[%s] %s", fs.name, problem)

    def _default_output(self, fs: TaskFileState) -> Path:
        base = self.config.defaults.output_dir or BUILTIN_DEFAULTS["output_dir"]
        root = Path(base) if os.path.isabs(base) else self.project / base
        return root / fs.name

    # -- the control socket (control.py) ------------------------------------------------
    kind = "daemon"

    def runs(self) -> list[ControlledRun]:
        """Each task file's live run, else its last one."""
        return [ControlledRun(fs.name, fs.path, fs.scheduler, fs.result)
                for fs in sorted(self.files.values(), key=lambda f: f.name)
                if fs.scheduler is not None or fs.result is not None]

    def rerun_ended(self, run: ControlledRun, task: str) -> dict[str, Any]:
        """A new run of the file, `task` forced past the cache (its dependents as usual)."""
        fs = self.files.get(run.file)
        if fs is None or self.stopping:
            raise ControlError(f"{run.name} is no longer watched", "refused")
        fs.forced.add(task)
        if fs.scheduler is None:
            self._touch(fs.path)
        else:  # its run is writing its report: the file loop starts the next one after
            fs.dirty.set()
        log.info("[%s] re-run of task '%s' asked on the control socket", fs.name, task)
        return {"new_run": True, "file": str(fs.path)}

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
                    "waiting_for_quota": (sorted(r.id for r in fs.scheduler.records
                                                 if r.status == TaskStatus.WAITING_FOR_QUOTA)
                                          if fs.scheduler else []),
                    "done": (sum(1 for r in fs.scheduler.records if r.status in COUNTED)
                        if fs.scheduler else None),
                    "total": len(fs.scheduler.records) if fs.scheduler else None,
                    "invalid": fs.invalid,
                    "error": fs.error,
                }
                for fs in sorted(self.files.values(), key=lambda f: f.name)
            },
            "pools": self.governor.snapshot(trio.current_time()),
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

    def _page_dirs(self) -> list[Path]:
        """Where the live page looks for runs: each file's output dir, and the project's."""
        dirs = [fs.output_dir for fs in self.files.values() if fs.output_dir is not None]
        return [*dirs, *project_bases(self.project)()]

    def _remove_status(self) -> None:
        with contextlib.suppress(OSError):
            (self.project / STATUS_FILE).unlink()


SPECIAL = "special:"


def _fingerprint(path: Path) -> str | None:
    """The sha256 of a task file's bytes (as `DispatchSpec.source_hash`); None if it is gone.

    A file that cannot be read gets a stable token instead, so its error is published
    too; reading stops past the loader's size limit (a `/dev/zero` never ends).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # (a FIFO must not block the loop)
        with open(fd, "rb") as fh:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return f"{SPECIAL}{stat.S_IFMT(st.st_mode):o}"
            data = fh.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"unreadable:{exc.errno}"
    return hashlib.sha256(data).hexdigest()



def _is_dir(path: Path) -> bool:
    """`Path.is_dir`, False (not an exception) when we may not look."""
    try:
        return path.is_dir()
    except OSError:
        return False


def _unwrap(exc: BaseException) -> BaseException:
    """The one real error inside (nested) single-member exception groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _describe(exc: BaseException) -> str:
    """One line for the log and the report; a user's error as is, a bug with its type."""
    inner = _unwrap(exc)
    if isinstance(inner, DispatchError):
        return str(inner)
    if isinstance(inner, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in inner.exceptions)
    text = str(inner)
    if isinstance(inner, OSError) and inner.strerror:
        text = f"{inner.strerror}: {inner.filename}" if inner.filename else inner.strerror
    return f"{type(inner).__name__}: {text}" if text else type(inner).__name__


def _mtime_ns(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def run_daemon(project: Path, tasks_dir: Path | None, max_parallel: int | None,
               force: bool, executor: str | None = None,
               http: HttpOptions | None = None) -> int:
    """Entry point of `parallel-dispatch watch`."""
    debug = os.environ.get("PARALLEL_DISPATCH_DEBUG", "") not in ("", "0")
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(message)s")
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
    daemon = Daemon(project, tasks_dir, max_parallel=max_parallel, force=force,
                    executor=executor)
    daemon.http = http
    t0 = time.monotonic()
    trio.run(daemon.serve)
    log.debug("served for %.1fs", time.monotonic() - t0)
    return 0
