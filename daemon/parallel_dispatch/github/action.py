"""`parallel-dispatch action`: one dispatch run, reported the GitHub Actions way.

Inputs come from flags or the runner's `INPUT_*` variables (flags win); the
GitHub context from `GITHUB_*`. After the run it writes the step summary,
the step outputs, `::error` annotations for failed tasks, each task's log in
a folded group, and the sticky PR comment. With `push-branch`, the branch of
`merge: branch` goes to `origin` (github/push.py) and the comment names it.

Agents never see the token (`agent_env.py`), and this process hides its own
environment from them. Everything agents or task files wrote is untrusted here:
progress lines are made inert and run with workflow commands stopped, logs are
printed between `::stop-commands::` markers, and known secret values are replaced
by `***` in all we print, post or leave in the reports (the runner's `::add-mask::`
covers only its log, not a comment posted through the API).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, cast

from ..agent_env import hide_own_environment, redact, secret_values
from ..errors import DispatchError, TaskFileError
from ..result import PROBLEMS, RunStatus, verb
from . import comment as gh
from . import push as git_push
from . import workflow_commands as wc

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
FAIL_ON = ("failure", "never")
BOOLEANS = ("true", "false")
LOG_TAIL_BYTES = 256 * 1024
ANNOTATION_LOG_LINES = 20
ANNOTATION_LINE_CHARS = 300  # annotations are for a glance; the group has the full log


@dataclass(frozen=True)
class Inputs:
    """The action's inputs after flags, `INPUT_*` variables and defaults are merged."""

    task_file: str
    max_parallel: int | None
    timeout_ms: int | None
    on_failure: str | None
    output_dir: str | None
    github_token: str | None
    comment: str
    fail_on: str
    config: str | None
    push_branch: bool = False


@dataclass(frozen=True)
class GitHubContext:
    """What the runner tells us about the event, read from `GITHUB_*` variables."""

    event_name: str | None
    event: Mapping[str, Any] | None
    repository: str | None
    api_url: str | None
    run_url: str | None
    server_url: str = "https://github.com"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> GitHubContext:
        event: Mapping[str, Any] | None = None
        if path := env.get("GITHUB_EVENT_PATH"):
            try:
                event = json.loads(Path(path).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                event = None
        server, repo, run_id = (
            env.get("GITHUB_SERVER_URL", "https://github.com").rstrip("/"),
            env.get("GITHUB_REPOSITORY"),
            env.get("GITHUB_RUN_ID"),
        )
        return cls(
            event_name=env.get("GITHUB_EVENT_NAME"),
            event=event,
            repository=repo,
            api_url=env.get("GITHUB_API_URL"),
            run_url=f"{server}/{repo}/actions/runs/{run_id}" if repo and run_id else None,
            server_url=server,
        )


class InputError(DispatchError):
    """An input value is malformed (exit code 2)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="parallel-dispatch action",
        description="Run a task file inside GitHub Actions: summary, outputs, annotations "
        "and a sticky PR comment. Every flag may instead come from INPUT_<NAME> "
        "(e.g. INPUT_TASK-FILE or INPUT_TASK_FILE); flags win.",
    )
    p.add_argument("task_file_arg", nargs="?", metavar="TASK_FILE", help="same as --task-file")
    p.add_argument("--task-file", help="the task file to run (input task-file)")
    p.add_argument("--max-parallel", help="maximum concurrent agents (input max-parallel)")
    p.add_argument("--timeout", help="per-task timeout in milliseconds")
    p.add_argument("--on-failure", help="continue | stop | retry")
    p.add_argument("--output-dir", help="where outputs and reports go (input output-dir)")
    p.add_argument("--github-token", help="prefer INPUT_GITHUB-TOKEN: flags show in `ps`")
    p.add_argument("--comment", help="sticky (default) | new | off")
    p.add_argument("--fail-on", help="failure (default) | never")
    p.add_argument("--config", help="path of the project config (.aiwg/dispatch.toml)")
    p.add_argument("--push-branch", help="true | false (default): push the branch of "
                   "`merge: branch` to origin with the github-token")
    return p


def _env_input(env: Mapping[str, str], name: str) -> str | None:
    """The runner's spelling keeps hyphens (`INPUT_TASK-FILE`); shells need underscores."""
    upper = name.upper()
    for key in (f"INPUT_{upper}", f"INPUT_{upper.replace('-', '_')}"):
        value = env.get(key, "").strip()
        if value:
            return value
    return None


def _int(name: str, raw: str | None, minimum: int) -> int | None:
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise InputError(f"input {name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise InputError(f"input {name} must be at least {minimum}, got {value}")
    return value


def _choice(name: str, raw: str | None, choices: Sequence[str], default: str) -> str:
    value = (raw or default).strip().lower()
    if value not in choices:
        raise InputError(f"input {name} must be one of {' | '.join(choices)}, got {raw!r}")
    return value


def read_inputs(argv: Sequence[str] | None, env: Mapping[str, str]) -> Inputs:
    """Merge flags over `INPUT_*` variables; raise InputError on bad values."""
    args = _parser().parse_args(argv)

    def get(name: str) -> str | None:
        flag = getattr(args, name.replace("-", "_"))
        return flag if flag not in (None, "") else _env_input(env, name)

    task_file = args.task_file or args.task_file_arg or _env_input(env, "task-file")
    if not task_file:
        raise InputError("input task-file is required")
    return Inputs(
        task_file=task_file,
        max_parallel=_int("max-parallel", get("max-parallel"), 1),
        timeout_ms=_int("timeout", get("timeout"), 1),
        on_failure=get("on-failure"),
        output_dir=get("output-dir"),
        github_token=get("github-token") or env.get("GITHUB_TOKEN") or None,
        comment=_choice("comment", get("comment"), gh.COMMENT_MODES, "sticky"),
        fail_on=_choice("fail-on", get("fail-on"), FAIL_ON, "failure"),
        config=get("config"),
        push_branch=_choice("push-branch", get("push-branch"), BOOLEANS, "false") == "true",
    )


def _counts(report: Mapping[str, Any]) -> dict[str, int]:
    """Step-output counts: timeouts count as failed, cancelled tasks as skipped."""
    s = report.get("summary", {})
    return {
        "succeeded": int(s.get("succeeded", 0)),
        "failed": (int(s.get("failed", 0)) + int(s.get("timed_out", 0))
                   + int(s.get("provider_errors", 0)) + int(s.get("stalled", 0))
                   + int(s.get("conflicts", 0)) + int(s.get("merge_failed", 0))),
        "skipped": int(s.get("skipped", 0)) + int(s.get("cancelled", 0)),
    }


def _clip(line: str, limit: int = ANNOTATION_LINE_CHARS) -> str:
    return line if len(line) <= limit else line[:limit] + " …"


def _annotate(report: Mapping[str, Any]) -> None:
    for task in report.get("tasks", []):
        status = task.get("status")
        if status not in PROBLEMS:
            continue
        lines = [str(task.get("error") or f"exit code {task.get('exit_code')}")]
        tail = [_clip(str(x)) for x in task.get("log_tail") or []][-ANNOTATION_LOG_LINES:]
        if tail:
            lines += ["", "Last log lines:", *tail]
        wc.error("\n".join(lines),
                 title=f"Task {task.get('id')} {verb(str(status))} ({task.get('agent')})")


def _read_tail(path: Path, limit: int = LOG_TAIL_BYTES) -> str:
    with path.open("rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(max(0, size - limit))
        data = fh.read()
    text = data.decode("utf-8", errors="replace")
    if size > limit:
        text = f"[… first {size - limit} bytes omitted; full log: {path}]\n" + text
    return text


def _print_logs(report: Mapping[str, Any], secrets: Sequence[str]) -> None:
    """Each task's log in a folded group; agent text cannot issue workflow commands."""
    for task in report.get("tasks", []):
        log = task.get("log_path")
        with wc.group(f"{task.get('id')}: {task.get('status')} — log"):
            if not log or not Path(log).is_file():
                print("(no log)")
                continue
            text = redact(_read_tail(Path(log)), secrets)
            with wc.commands_stopped():
                sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
                sys.stdout.flush()


def _write_summary(markdown: str, report_path: str | None) -> None:
    room = wc.SUMMARY_LIMIT_BYTES - wc.summary_size()
    where = f"`{report_path}`" if report_path else "the report file"
    note = (
        f"\n\n> ✂️ **Truncated** to fit GitHub's 1 MiB step-summary limit. Full report: {where}.\n\n"
    )
    fitted = gh.fit_markdown(markdown, room - 1, note, lambda t: len(t.encode("utf-8")))
    wc.append_summary(fitted)


def _comment(inputs: Inputs, ctx: GitHubContext, report_md: str) -> str:
    """Post or update the PR comment; return its URL ('' when none). CommentError escapes."""
    if inputs.comment == "off":
        return ""
    pr = gh.pr_number_from_event(ctx.event_name, ctx.event)
    if pr is None:
        wc.echo(
            f"parallel-dispatch: event {ctx.event_name or '(none)'} is not a pull request; "
            "no comment, the report is in the step summary"
        )
        return ""
    if not inputs.github_token or not ctx.repository:
        wc.warning("no github-token or GITHUB_REPOSITORY: the PR comment was skipped")
        return ""
    body = gh.build_comment_body(report_md, inputs.task_file, ctx.run_url)
    result = gh.post_comment(
        token=inputs.github_token,
        repository=ctx.repository,
        pr_number=pr,
        body=body,
        task_file=inputs.task_file,
        mode=inputs.comment,
        api_url=ctx.api_url,
    )
    if result.warning:
        wc.warning(result.warning, title="PR comment skipped")
        return ""
    wc.echo(f"parallel-dispatch: PR comment {result.action}: {result.url}")
    return result.url or ""


def _invalid_markdown(task_file: str, exc: TaskFileError) -> str:
    lines = "\n".join(d.format() for d in exc.diagnostics)
    # a fence longer than any backtick run in the messages, which quote the file
    fence = "`" * max(3, 1 + max((len(r) for r in re.findall(r"`+", lines)), default=0))
    return (
        f"## parallel-dispatch: `{task_file}` is invalid\n\nNothing ran.\n\n"
        f"{fence}text\n{lines}\n{fence}\n"
    )


def _workspace_relative(path: str) -> str:
    """Annotations attach to a file in the PR only by its repository-relative path."""
    workspace = os.environ.get("GITHUB_WORKSPACE") or os.getcwd()
    absolute = Path(workspace, path).resolve()
    try:
        return absolute.relative_to(Path(workspace).resolve()).as_posix()
    except ValueError:
        return path


def _report_invalid(inputs: Inputs, ctx: GitHubContext, exc: TaskFileError) -> None:
    """Nothing ran: annotate each error at its position, and say so everywhere."""
    for d in exc.diagnostics:
        file = _workspace_relative(d.file)
        where = f"task {d.task_id}" if d.task_id else file
        wc.error(
            d.message, title=f"invalid task file ({where})", file=file, line=d.line, col=d.column
        )
    markdown = _invalid_markdown(inputs.task_file, exc)
    wc.append_summary(markdown)
    outputs = {
        "status": RunStatus.INVALID.value,
        "succeeded": "0",
        "failed": "0",
        "skipped": "0",
        "report": "",
        "report-json": "",
        "branch": "",
    }
    _finish(inputs, ctx, markdown, outputs)


def _finish(inputs: Inputs, ctx: GitHubContext, markdown: str, outputs: dict[str, str]) -> bool:
    """Comment, then write outputs (they include the comment URL). False if commenting broke."""
    ok = True
    try:
        outputs["comment-url"] = _comment(inputs, ctx, markdown)
    except gh.CommentError as exc:
        wc.error(str(exc), title="PR comment failed")
        outputs["comment-url"] = ""
        ok = False
    wc.set_outputs(outputs)
    return ok


def _dispatch(inputs: Inputs, secrets: Sequence[str]) -> Any:
    """Run the core; SIGTERM (a cancelled workflow) still leaves a partial report.

    Progress lines quote the task file and agents, so each is made inert, and the
    whole run is fenced with `::stop-commands::` (which also covers anything else
    printed meanwhile, on stdout or stderr).
    """
    from ..api import dispatch  # the core; imported late so `--help` stays light
    from ..progress import PlainProgress

    stream = wc.InertLines(sys.stdout, secrets)  # stdout: keeps lines in order with groups
    with wc.commands_stopped():
        try:
            return dispatch(
                inputs.task_file,
                max_parallel=inputs.max_parallel,
                timeout_ms=inputs.timeout_ms,
                output_dir=inputs.output_dir,
                on_failure=inputs.on_failure,
                config_path=inputs.config,
                progress=PlainProgress(cast(TextIO, stream)),
                handle_signals=True,
            )
        finally:
            stream.close()


def _fenced(text: str) -> str:
    """`text` in a code block whose fence no backtick run inside can close."""
    fence = "`" * max(3, 1 + max((len(r) for r in re.findall(r"`+", text)), default=0))
    return f"{fence}text\n{text}\n{fence}\n"


def _branch(inputs: Inputs, ctx: GitHubContext, report: Mapping[str, Any], root: Path,
            secrets: Sequence[str]) -> tuple[str, str, bool]:
    """Push the branch of `merge: branch` if asked: (Markdown for the summary and the
    comment, the `branch` output, False if the push failed)."""
    merge = report.get("merge")
    branch = merge.get("branch") if isinstance(merge, Mapping) else None
    if not isinstance(branch, str) or not branch:
        if inputs.push_branch:
            wc.echo("parallel-dispatch: push-branch is true but the run made no branch "
                    "(it needs settings.merge: branch and a task that changed files)")
        return "", "", True
    if not inputs.push_branch:
        return (f"\n## Branch\n\n`{branch}` was made on the runner and not pushed "
                "(input `push-branch` is false).\n", branch, True)
    if inputs.github_token:
        for value in git_push.header_secrets(inputs.github_token):
            wc.add_mask(value)
    wc.echo(f"parallel-dispatch: pushing {branch} to {git_push.REMOTE}")
    pushed = git_push.push_branch(root, branch, inputs.github_token)
    if pushed.error is not None:
        error = redact(pushed.error, secrets)
        wc.error(error, title=f"push of {branch} failed")
        return (f"\n## Branch\n\n`{branch}` could not be pushed to {git_push.REMOTE}:\n\n"
                + _fenced(error), branch, False)
    merge_base = merge.get("base") if isinstance(merge, Mapping) else None
    link = (git_push.compare_url(ctx.server_url, ctx.repository, merge_base
                                 if isinstance(merge_base, str) else None, branch)
            if ctx.repository else None)
    wc.echo(f"parallel-dispatch: pushed {branch}" + (f": {link}" if link else ""))
    return (f"\n## Branch\n\nPushed `{branch}` to {git_push.REMOTE}"
            + (f": [compare]({link})" if link else "") + ".\n", branch, True)


def _redact_data(value: Any, secrets: Sequence[str]) -> Any:
    """The report with every string redacted (error texts and log tails quote agents)."""
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, list):
        return [_redact_data(v, secrets) for v in value]
    if isinstance(value, dict):
        return {k: _redact_data(v, secrets) for k, v in value.items()}
    return value


def _scrub_reports(paths: Sequence[Path], secrets: Sequence[str]) -> None:
    """Redact the report files in place: workflows upload them as artifacts."""
    from ..atomic import write_text

    forms = [*secrets, *(json.dumps(s)[1:-1] for s in secrets)]  # as JSON would escape it
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            continue
        clean = redact(text, forms)
        if clean != text:
            write_text(path, clean)


def _redact_error(exc: TaskFileError, secrets: Sequence[str]) -> TaskFileError:
    return TaskFileError([dataclasses.replace(d, message=redact(d.message, secrets))
                          for d in exc.diagnostics])


def _check_task_file(task_file: str) -> None:
    """A task file reached through a symlink must stay in the workspace (a PR can add
    such a symlink); it is refused unread, before anything else looks at it."""
    from ..loader import check_confined

    workspace = Path(os.environ.get("GITHUB_WORKSPACE") or os.getcwd())
    check_confined(Path(task_file), [workspace])


def main(argv: list[str] | None = None) -> int:
    """Entry point of `parallel-dispatch action`; returns the exit status."""
    env = os.environ
    try:
        inputs = read_inputs(argv, env)
    except InputError as exc:
        wc.error(str(exc), title="parallel-dispatch: bad input")
        return EXIT_USAGE
    secrets = secret_values(env, [inputs.github_token])
    for value in secrets:
        wc.add_mask(value)
    hide_own_environment(secrets)  # nor can agents read them from /proc/<ppid>/environ
    ctx = GitHubContext.from_env(env)

    try:
        _check_task_file(inputs.task_file)
        result = _dispatch(inputs, secrets)
    except TaskFileError as exc:
        _report_invalid(inputs, ctx, _redact_error(exc, secrets))
        return EXIT_USAGE
    except DispatchError as exc:
        wc.error(redact(str(exc), secrets), title="parallel-dispatch")
        return EXIT_USAGE

    _scrub_reports([Path(result.report_md_path), Path(result.report_json_path)], secrets)
    report: Mapping[str, Any] = _redact_data(result.report, secrets)
    branch_md, branch, pushed = _branch(inputs, ctx, report, Path(result.spec.root), secrets)
    report_md = Path(result.report_md_path).read_text(encoding="utf-8") + branch_md
    _write_summary(report_md, str(result.report_md_path))
    _annotate(report)
    _print_logs(report, secrets)
    status = str(report.get("status", RunStatus.FAILED))
    outputs = {
        "status": status,
        **{k: str(v) for k, v in _counts(report).items()},
        "report": str(result.report_md_path),
        "report-json": str(result.report_json_path),
        "branch": branch,
    }
    comment_ok = _finish(inputs, ctx, report_md, outputs)
    if status == RunStatus.INTERRUPTED:
        return EXIT_INTERRUPTED
    if (status != RunStatus.SUCCEEDED or not pushed) and inputs.fail_on == "failure":
        return EXIT_FAILED
    return EXIT_OK if comment_ok else EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
