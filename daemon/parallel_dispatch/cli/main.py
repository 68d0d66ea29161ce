"""The `parallel-dispatch` command line.

The bare form mirrors the reference's usage line; subcommands cover the rest.
Exit codes: 0 all tasks succeeded, 1 a task failed/timed out/was skipped,
2 invalid input or usage, 130 interrupted.

Start-up: at import this module needs only argparse and the version, so `--version`
and `--help` cost an interpreter start and no more (issue 9 §23).  Each command
imports what it uses when it runs: `validate` the loader (pydantic, PyYAML), `run`
trio, the scheduler and the runners; `watch` and `action` the optional extras.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from .. import __version__

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from ..errors import TaskFileError
    from ..executor import Executor
    from ..result import RunResult
    from ..scheduler import Scheduler
    from ..spec import DispatchSpec

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

EXTRAS = {"watchfiles": "daemon", "github": "action", "requests": "action", "mcp": "mcp"}
"""Top-level module → the extra (pyproject.toml) that installs it: only the daemon and
the Action need these, so a plain `pip install parallel-dispatch` leaves them out."""

SUBCOMMANDS = ("run", "validate", "plan", "schema", "action", "watch", "status", "agents", "init",
               "doctor", "serve", "mcp", "cancel")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}


def _duration_ms(text: str) -> int:
    """`90s`, `30m`, `2h`, `500ms`, or a bare number of milliseconds (like --timeout)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", text)
    if m is None:
        raise argparse.ArgumentTypeError(
            f"expected a duration such as 90s, 30m, 2h or milliseconds, got {text!r}")
    return round(float(m.group(1)) * _UNITS_MS[m.group(2) or "ms"])


def _executor(text: str) -> str:
    from ..executor import EXECUTOR_CHOICES, valid_choice

    if not valid_choice(text):
        raise argparse.ArgumentTypeError(f"expected {EXECUTOR_CHOICES}, got {text!r}")
    return text


EXECUTOR_HELP = ("where agents run: local (default), or a Ray cluster: ray (the cluster of "
                 "[executor] address, RAY_ADDRESS or this machine) or ray:HOST:PORT (README: "
                 "Running on a Ray cluster)")
CONFIG_HELP = "project config (default .aiwg/dispatch.toml in the project root)"
HTTP_HELP = ("serve the live page (README: The live page) on HOST:PORT, e.g. 127.0.0.1:8765 "
             "(port 0 picks a free one); a non-loopback HOST is refused unless "
             "--http-token is given")
HTTP_TOKEN_HELP = ("require this token on every request of the live page "
                   "('Authorization: Bearer TOKEN' or ?token=TOKEN); needed to bind a "
                   "non-loopback address (or set $PARALLEL_DISPATCH_HTTP_TOKEN, which keeps "
                   "it out of the process list)")
PROJECT_HELP = ("the project's root (default: the project around the current directory: "
                "the nearest folder up holding .aiwg/, else .claude/ or .git)")


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("task_file", metavar="TASK_FILE", help="YAML task file")
    p.add_argument("--max-parallel", type=_positive_int, metavar="N",
                   help="maximum concurrent agents (default 4)")
    p.add_argument("--timeout", type=_positive_int, metavar="MS",
                   help="per-task timeout in milliseconds (default 120000)")
    p.add_argument("--idle-timeout", type=_positive_int, metavar="MS",
                   help="kill an agent as 'stalled' once it has printed nothing for this "
                        "long (default off)")
    p.add_argument("--output", metavar="DIR", help="output directory (default .aiwg/working/)")
    p.add_argument("--on-failure", choices=("continue", "stop", "retry"),
                   help="failure handling (default continue)")
    p.add_argument("--dry-run", action="store_true", help="show execution plan without running")
    p.add_argument("--max-cost", type=_positive_float, metavar="USD",
                   help="cost budget: each start reserves its expected cost first, and a task "
                        "that would pass the budget is skipped")
    p.add_argument("--max-tokens", type=_positive_int, metavar="N",
                   help="token budget (input + output), reserved before each start like "
                        "--max-cost")
    p.add_argument("--warn-cost", type=_positive_float, metavar="USD",
                   help="print one warning when the run's cost passes this")
    p.add_argument("--max-quota-wait", type=_duration_ms, metavar="TIME",
                   help="how long a task may wait in all for its provider's rate or usage "
                        "limit to reset, e.g. 90s, 30m, 2h or milliseconds (default 1h)")
    p.add_argument("--fixed-parallel", action="store_true",
                   help="keep every pool at its configured limit: no adapting to rate "
                        "limits, no waiting for quota (a rate limit is a retryable failure)")
    p.add_argument("--resume", action="store_true",
                   help="reuse outputs of tasks unchanged since their last successful run")
    p.add_argument("--control", action="store_true",
                   help="listen on a control socket in .aiwg/run/ while running, for "
                        "`parallel-dispatch cancel` and `status --json` (README: Cancel a task)")
    p.add_argument("--executor", type=_executor, metavar="WHERE", help=EXECUTOR_HELP)
    p.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parallel-dispatch",
        usage="parallel-dispatch TASK_FILE [--max-parallel N] [--timeout MS] [--output DIR] "
              "[--on-failure continue|stop|retry] [--dry-run]\n"
              "       parallel-dispatch {run,validate,plan,schema,watch,serve,status,cancel,"
              "agents,init,doctor,mcp,action} ...",
        description="Run a YAML file of AI-agent tasks as a dependency graph.",
    )
    parser.add_argument("--version", action="version", version=f"parallel-dispatch {__version__}")
    # prog: each command's usage line reads "parallel-dispatch plan ...", not the main usage.
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", prog="parallel-dispatch")
    _run_options(sub.add_parser("run", help="run a task file (same as the bare form)"))
    v = sub.add_parser("validate", help="check task files; run nothing")
    v.add_argument("files", nargs="+", metavar="FILE", help="YAML task files to check")
    v.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    p = sub.add_parser("plan", help="show waves, order, critical path; run and write nothing")
    p.add_argument("task_file", metavar="FILE", help="YAML task file")
    p.add_argument("--max-parallel", type=_positive_int, metavar="N",
                   help="plan for this many concurrent agents (default 4)")
    p.add_argument("--timeout", type=_positive_int, metavar="MS",
                   help="per-task timeout to show, in milliseconds (default 120000)")
    p.add_argument("--output", metavar="DIR",
                   help="output directory to plan for (default .aiwg/working/)")
    p.add_argument("--on-failure", choices=("continue", "stop", "retry"),
                   help="failure handling to plan for (default continue)")
    p.add_argument("--max-cost", type=_positive_float, metavar="USD",
                   help="cost budget, as a run would get it")
    p.set_defaults(max_tokens=None, warn_cost=None)  # run-only budget flags
    p.set_defaults(max_quota_wait=None, fixed_parallel=False)  # run-only quota flags
    p.set_defaults(control=False)
    p.add_argument("--idle-timeout", type=_positive_int, metavar="MS",
                   help="idle timeout, as a run would get it (default off)")
    p.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    sub.add_parser("schema", help="print the JSON Schema of task files")
    ag = sub.add_parser("agents", help="list the agents tasks can name: runner, model, file")
    ag.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    ag.add_argument("--json", action="store_true", help="machine-readable output")
    mc = sub.add_parser("mcp", help="serve the engine to coding assistants over MCP (stdio)")
    mc.add_argument("project", nargs="?", metavar="PROJECT_DIR", help=PROJECT_HELP)
    ini = sub.add_parser("init", help="write a starter .aiwg/dispatch.toml and example task file")
    ini.add_argument("--force", action="store_true", help="overwrite existing files")
    ini.add_argument("--claude", action="store_true",
                     help="instead: add the MCP server to .mcp.json and write "
                          ".claude/commands/parallel-dispatch.md (README: From Claude Code)")
    doc = sub.add_parser("doctor", help="check runners (versions), agents and definitions")
    doc.add_argument("--config", metavar="PATH", help=CONFIG_HELP)
    doc.add_argument("--timeout", type=_positive_float, default=10.0, metavar="SECONDS",
                     help="how long each `--version` probe may take (default 10)")
    w = sub.add_parser("watch", help="daemon: run task files in .aiwg/tasks/ as they change")
    w.add_argument("project", nargs="?", metavar="PROJECT_DIR", help=PROJECT_HELP)
    w.add_argument("--tasks-dir", metavar="DIR",
                   help="folder of task files to watch (default PROJECT_DIR/.aiwg/tasks/)")
    w.add_argument("--max-parallel", type=_positive_int, metavar="N",
                   help="agents at once across all task files (default 8)")
    w.add_argument("--force", action="store_true",
                   help="at start, re-run every task file in full, ignoring earlier results")
    w.add_argument("--executor", type=_executor, metavar="WHERE", help=EXECUTOR_HELP)
    w.add_argument("--http", metavar="HOST:PORT", help=HTTP_HELP)
    w.add_argument("--http-token", metavar="TOKEN", help=HTTP_TOKEN_HELP)
    sv = sub.add_parser("serve", help="the live page of the project's runs (CLI runs too), "
                                      "read from their output dirs")
    sv.add_argument("project", nargs="?", metavar="PROJECT_DIR", help=PROJECT_HELP)
    sv.add_argument("--http", metavar="HOST:PORT", default="127.0.0.1:8765",
                    help=HTTP_HELP.replace("on HOST:PORT", "on HOST:PORT (default "
                                           "127.0.0.1:8765)"))
    sv.add_argument("--http-token", metavar="TOKEN", help=HTTP_TOKEN_HELP)
    st = sub.add_parser("status", help="each task file's last run, and what runs now")
    st.add_argument("project", nargs="?", metavar="PROJECT_DIR", help=PROJECT_HELP)
    st.add_argument("--tasks-dir", metavar="DIR",
                    help="folder of the daemon's task files (default PROJECT_DIR/.aiwg/tasks/)")
    st.add_argument("--json", action="store_true",
                    help="machine-readable: live runs from the control sockets, last runs "
                         "from the output dirs (README: Cancel a task)")
    ca = sub.add_parser("cancel", help="cancel a running task, or a whole run (the daemon's, "
                                       "or one started with --control)")
    ca.add_argument("target", metavar="FILE|RUN-ID",
                    help="the run: its id, its task file, or the daemon's name for the file")
    ca.add_argument("task", nargs="?", metavar="TASK-ID", help="only this task (and so its "
                    "dependents); without it the whole run")
    ca.add_argument("--project", metavar="DIR", help=PROJECT_HELP)
    sub.add_parser("action", help="run as a GitHub Action step (see action.yml)", add_help=False)
    return parser


class _QuietPipe:
    """stdout or stderr that drops what it is given once its reader has gone.

    `parallel-dispatch plan big.yaml | head` closes the pipe after ten lines; the next
    write fails with EPIPE.  Instead of a BrokenPipeError traceback, the stream's file
    descriptor is pointed at /dev/null and the command carries on to its normal end and
    exit code: a run whose progress reader went away still finishes its tasks and
    writes its report.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.closed_by_reader = False

    def write(self, text: str) -> int:
        if not self.closed_by_reader:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._drop()
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if not self.closed_by_reader:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._drop()

    def _drop(self) -> None:
        self.closed_by_reader = True
        try:  # whatever is still buffered, and the exit-time flush, go to /dev/null
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self._stream.fileno())
            finally:
                os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextmanager
def _quiet_pipes() -> Iterator[None]:
    """Wrap sys.stdout and sys.stderr in `_QuietPipe` while a command runs."""
    saved = sys.stdout, sys.stderr
    if not isinstance(sys.stdout, _QuietPipe):
        sys.stdout = _QuietPipe(sys.stdout)
    if not isinstance(sys.stderr, _QuietPipe):
        sys.stderr = _QuietPipe(sys.stderr)
    try:
        yield
        sys.stdout.flush()  # here, so a closed pipe is met while it is still handled
    finally:
        sys.stdout, sys.stderr = saved


def main(argv: Sequence[str] | None = None) -> int:
    """The `parallel-dispatch` command; returns its exit code."""
    with _quiet_pipes():
        return _main(argv)


def _missing_extra(exc: ImportError) -> str | None:
    """The extra whose absence (or broken install) `exc` is, else None."""
    name = exc.name or ""
    return EXTRAS.get(name.partition(".")[0])


def _launch(command: str, load: Callable[[], Callable[[], int]]) -> int:
    """Import a front end that needs an extra, then run it.

    A missing extra is one line naming what to install and exit 2, not an ImportError
    traceback: `pip install parallel-dispatch` alone leaves out PyGithub and watchfiles.
    """
    try:
        run = load()
    except ImportError as exc:
        extra = _missing_extra(exc)
        if extra is None:
            raise
        print(f"parallel-dispatch: error: `parallel-dispatch {command}` needs the "
              f"'{extra}' extra ({exc}): pip install 'parallel-dispatch[{extra}]'",
              file=sys.stderr)
        return EXIT_USAGE
    return run()


def _main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "action":
        def load_action() -> Callable[[], int]:
            from ..github.action import main as action_main

            return lambda: action_main(args_list[1:])

        return _launch("action", load_action)
    if args_list and args_list[0] not in (*SUBCOMMANDS, "-h", "--help", "--version"):
        args_list.insert(0, "run")  # the bare form, options first or not: `-q tasks.yaml`
    parser = build_parser()
    if not args_list:
        parser.print_usage(sys.stderr)
        return EXIT_USAGE
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code not in (0, None) else EXIT_OK
    from ..errors import DispatchError, TaskFileError

    try:
        if args.command == "validate":
            return _validate(args.files, args.config)
        if args.command == "schema":
            import json

            from ..model import task_file_schema

            print(json.dumps(task_file_schema(), indent=2))
            return EXIT_OK
        if args.command in ("watch", "run"):
            from .. import agent_env

            # Agents are our children: keep them from reading withheld secrets out of
            # /proc/<our pid>/environ (the Action does the same).
            agent_env.hide_own_environment(agent_env.secret_values(os.environ))
        if args.command == "watch":
            def load_daemon() -> Callable[[], int]:
                from ..service.daemon import run_daemon

                tasks = Path(args.tasks_dir) if args.tasks_dir else None
                http = _http(args)
                return lambda: run_daemon(_project(args.project), tasks, args.max_parallel,
                                          args.force, args.executor, http=http)

            return _launch("watch", load_daemon)
        if args.command == "serve":
            from ..service.webpage import run_serve

            http = _http(args)
            assert http is not None  # (serve's --http has a default)
            return run_serve(_project(args.project), http)
        if args.command == "mcp":
            def load_mcp() -> Callable[[], int]:
                import mcp  # noqa: F401  (the extra: a clear message when missing)

                from ..assistant.mcp_server import run_mcp

                return lambda: run_mcp(_project(args.project).resolve())

            return _launch("mcp", load_mcp)
        if args.command == "status":
            from .status import render_status, status_json

            tasks = Path(args.tasks_dir).resolve() if args.tasks_dir else None
            if args.json:
                print(status_json(_project(args.project), tasks))
                return EXIT_OK
            print(render_status(_project(args.project), tasks))
            return EXIT_OK
        if args.command == "cancel":
            from .cancel import cancel_command

            return cancel_command(_project(args.project), args.target, args.task,
                                  out=sys.stdout, err=sys.stderr)
        if args.command in ("agents", "init", "doctor"):
            from . import commands

            if args.command == "agents":
                return commands.agents_command(args.config, args.json, out=sys.stdout)
            if args.command == "init" and args.claude:
                from ..assistant.claude_init import init_claude

                return init_claude(_project(None), args.force, sys.stdout, sys.stderr)
            if args.command == "init":
                return commands.init_command(args.force, out=sys.stdout, err=sys.stderr)
            return commands.doctor_command(args.config, args.timeout, out=sys.stdout)
        if args.command == "plan":
            args.dry_run = True
            args.quiet = True
        return _run(args)
    except TaskFileError as exc:
        _print_diagnostics(exc)
        return EXIT_USAGE
    except DispatchError as exc:
        print(f"parallel-dispatch: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _http(args: argparse.Namespace) -> Any:
    """`--http` and `--http-token`, checked: a `webpage.HttpOptions` or None (typed Any:
    the CLI imports a front end only inside the function that launches it)."""
    from ..errors import DispatchError

    if args.http is None:
        if args.http_token:
            raise DispatchError("--http-token needs --http HOST:PORT")
        return None
    from ..service.webpage import parse_http

    return parse_http(args.http, args.http_token)


def _project(given: str | None) -> Path:
    """PROJECT_DIR as given, else the project around the current directory."""
    from ..config import find_project_dir

    return Path(given) if given else find_project_dir(Path.cwd())


def _print_diagnostics(exc: TaskFileError) -> None:
    for d in exc.diagnostics:
        print(d.format(), file=sys.stderr)
    files = sorted({d.file for d in exc.diagnostics})
    n = len(exc.diagnostics)
    print(f"{n} error{'s' if n != 1 else ''} in {', '.join(files)}; nothing was run.",
          file=sys.stderr)


def _validate(files: list[str], config: str | None) -> int:
    from ..errors import TaskFileError
    from ..fmt import plural
    from ..loader import load_spec

    status = EXIT_OK
    for f in files:
        try:
            spec = load_spec(f, config_path=config)
        except TaskFileError as exc:
            _print_diagnostics(exc)
            status = EXIT_USAGE
            continue
        print(f"{f}: OK — {plural(len(spec.tasks), 'task')} in "
              f"{plural(len(spec.graph.waves()), 'wave')}")
    return status


def _connected_executor(choice: str | None, spec: DispatchSpec) -> Executor | None:
    """The run's executor, connected and checked against the spec's agents; None (the
    error printed) when the cluster can't be used or can't run one of the agents."""
    from ..errors import TaskFileError
    from ..executor import agents_used, make_executor

    executor = make_executor(choice, spec.config, os.environ)
    if executor.local:
        return executor
    from ..fmt import plural
    from ..ray_executor import ExecutorError, RayExecutor

    assert isinstance(executor, RayExecutor)
    try:
        executor.connect()
        problems = executor.check(spec.config, agents_used(spec.agents))
    except ExecutorError as exc:
        print(f"parallel-dispatch: error: {exc}", file=sys.stderr)
        return None
    if problems:
        executor.close()
        _print_diagnostics(TaskFileError(problems))
        return None
    print(f"executor: Ray cluster at {executor.address} "
          f"({plural(len(executor.nodes()), 'node')})", file=sys.stderr)
    return executor


def _run(args: argparse.Namespace) -> int:
    import gc

    import trio

    from ..api import new_run_id, overrides_from, run_spec
    from ..loader import load_spec
    from ..orphans import AgentRegistry
    from ..progress import for_stream
    from ..runners import RunnerSet
    from .plan_view import plan_text, render_plan

    spec = load_spec(args.task_file, config_path=args.config, overrides=overrides_from(
        max_parallel=args.max_parallel, timeout_ms=args.timeout, output_dir=args.output,
        on_failure=args.on_failure, max_cost_usd=args.max_cost,
        idle_timeout_ms=args.idle_timeout, max_tokens=args.max_tokens,
        warn_cost_usd=args.warn_cost, max_quota_wait_ms=args.max_quota_wait,
        fixed_parallel=args.fixed_parallel))
    progress = for_stream(sys.stderr, quiet=args.quiet)
    gc.freeze()  # the spec lives as long as the process: keep the collector off it
    if args.dry_run:
        real = RunnerSet()
        if args.command == "plan":  # the same text, without the scheduler (plan_text)
            print(plan_text(spec, real, new_run_id()))
            return EXIT_OK
        result = trio.run(lambda: run_spec(spec, runner=real, dry_run=True, progress=progress))
        print(render_plan(spec, result, real))
        return EXIT_OK
    executor = _connected_executor(args.executor, spec)
    if executor is None:
        return EXIT_USAGE
    registry = AgentRegistry(spec.root)
    registry.reap()  # agents of an earlier dispatcher that was killed outright
    def start(hook: Callable[[Scheduler], None] | None = None) -> Awaitable[RunResult]:
        return run_spec(spec, progress=progress, handle_signals=True, reuse=args.resume,
                        runner=RunnerSet(registry=registry, executor=executor),
                        scheduler_hook=hook)

    try:
        if args.control:  # a control socket while it runs (control.py)
            from ..control import run_with_control

            result = trio.run(run_with_control, spec.root, args.task_file, spec.path, start)
        else:
            result = trio.run(start)
    finally:
        registry.close()
        executor.close()
    if result.report_md_path is not None:
        print(f"report: {result.report_md_path}")
    return result.exit_code


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
