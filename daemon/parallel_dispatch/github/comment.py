"""The report as one sticky pull-request comment, through PyGithub.

One comment per (PR, task file, author): a hidden marker on the first line
names the task file, so re-runs edit the comment instead of piling up new
ones, and two task files keep two comments. Agent text in the body is
untrusted: it must not ping people or forge the marker.
"""

from __future__ import annotations

import logging
import posixpath
import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import requests
from github import Auth, Github, GithubException, GithubRetry

#: GitHub rejects an issue comment body above this many characters (HTTP 422).
MAX_COMMENT_CHARS = 65_536
#: Who the workflow's own GITHUB_TOKEN posts as; it may not read `GET /user`.
ACTIONS_BOT_LOGIN = "github-actions[bot]"
DEFAULT_API_URL = "https://api.github.com"
MARKER_PREFIX = "<!-- parallel-dispatch:"

CommentMode = Literal["sticky", "new", "off"]
COMMENT_MODES: tuple[str, ...] = ("sticky", "new", "off")

_PR_EVENTS = ("pull_request", "pull_request_target")
_MENTION = re.compile(r"(?<![A-Za-z0-9])@(?=[A-Za-z0-9])")
_AT_ENTITY = re.compile(r"&(?:#0*64|#[xX]0*40|commat);")
_FORGED_MARKER = re.compile(r"<!--(\s*)parallel-dispatch", re.IGNORECASE)
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_HEADING = re.compile(r"^ {0,3}#{1,6}(\s|$)")
_ZWJ = "\u200d"


class CommentError(Exception):
    """Posting failed for a reason other than missing permission (bad URL, 422, outage)."""


@dataclass(frozen=True)
class CommentResult:
    """What happened to the comment; `warning` is set when permission was missing."""

    url: str | None
    action: Literal["created", "updated", "skipped"]
    warning: str | None = None


def pr_number_from_event(event_name: str | None, payload: Mapping[str, Any] | None) -> int | None:
    """The PR an event is about, or None for events that should not comment (push, schedule)."""
    if not event_name or not payload:
        return None
    if event_name in _PR_EVENTS:
        pr = payload.get("pull_request") or {}
        number = pr.get("number", payload.get("number"))
    elif event_name == "issue_comment":
        issue = payload.get("issue") or {}
        if not issue.get("pull_request"):
            return None  # a comment on a plain issue
        number = issue.get("number")
    else:
        return None
    return number if isinstance(number, int) and number > 0 else None


def marker(task_file: str) -> str:
    """The hidden first line that identifies this task file's comment.

    The path is normalised (`./a.yml` == `a.yml`) and percent-quoted, so no
    path can close the HTML comment early.
    """
    path = posixpath.normpath(str(task_file).replace("\\", "/"))
    return f"{MARKER_PREFIX}{urllib.parse.quote(path, safe='/._~+@')} -->"


def neutralise(text: str) -> str:
    """Defang agent text: `@name` no longer pings and no marker can be forged.

    A zero-width joiner after `@` breaks GitHub's mention syntax while the
    text still reads the same. Every `@` before a name is defanged, inside code
    too: guessing where GitHub's Markdown sees a code span is how an unmatched
    backtick got a mention through, and a joiner inside code costs nothing.
    HTML entities for `@` (`&#64;`, `&commat;`) render as one, so they become one.
    """
    text = _AT_ENTITY.sub("@", text)
    text = _MENTION.sub("@" + _ZWJ, text)
    return _FORGED_MARKER.sub(lambda m: f"<!--{m.group(1)}parallel{_ZWJ}-dispatch", text)


def _fence_step(opener: str | None, line: str) -> str | None:
    """The open code fence after `line`, given the one open before it."""
    found = _FENCE.match(line)
    if not found:
        return opener
    fence = found.group(1)
    if opener is None:
        return fence
    closes = set(line.strip()) == {opener[0]} and len(line.strip()) >= len(opener)
    return None if closes else opener


def _open_fence(text: str) -> str | None:
    """The fence (e.g. "```") still open at the end of `text`, if any."""
    opener: str | None = None
    for line in text.splitlines():
        opener = _fence_step(opener, line)
    return opener


def _sections(text: str) -> list[str]:
    """Split Markdown before each heading that is not inside a code block."""
    sections: list[str] = []
    current: list[str] = []
    opener: str | None = None
    for line in text.splitlines(keepends=True):
        if opener is None and _HEADING.match(line) and current:
            sections.append("".join(current))
            current = []
        current.append(line)
        opener = _fence_step(opener, line)
    if current:
        sections.append("".join(current))
    return sections


def _cut(section: str, cap: int, note: str, measure: Callable[[str], int]) -> str:
    """The head of `section` plus `note`, with any open code fence closed, within `cap`."""
    room = cap - measure(note)
    for _ in range(8):  # backing up to a line end can reopen a fence: then aim lower
        lo, hi = 0, len(section)
        while lo < hi:  # longest prefix whose closed form fits in `room`
            mid = (lo + hi + 1) // 2
            if measure(_closed(section[:mid])) <= room:
                lo = mid
            else:
                hi = mid - 1
        head = section[:lo]
        newline = head.rfind("\n")
        if newline > 0:
            head = head[: newline + 1]
        cut = _closed(head) + note
        if measure(cut) <= cap:
            return cut
        room -= measure(cut) - cap
    return note if measure(note) <= cap else ""


def _closed(head: str) -> str:
    fence = _open_fence(head)
    if fence is None:
        return head
    return head + ("" if head.endswith("\n") or not head else "\n") + fence + "\n"


def fit_markdown(text: str, budget: int, note: str, measure: Callable[[str], int] = len) -> str:
    """Fit Markdown into `budget` (as counted by `measure`) by cutting the longest sections.

    Short sections (summary, timeline) survive whole; every section that is
    cut ends with `note`, which should say where the full text is.
    """
    if measure(text) <= budget:
        return text
    sections = _sections(text)
    sizes = [measure(s) for s in sections]
    floor = measure(note) + 8  # below this a cut section would be only its note

    def total(cap: int) -> int:
        return sum(min(size, cap) for size in sizes)

    lo, hi = 0, max(sizes)
    while lo < hi:  # the largest per-section cap that fits the budget
        mid = (lo + hi + 1) // 2
        if total(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    if lo < floor:  # too many sections to cut each: cut the document as one
        return _cut(text, budget, note, measure) if budget > floor else ""
    return "".join(
        s if size <= lo else _cut(s, lo, note, measure)
        for s, size in zip(sections, sizes, strict=True)
    )


def build_comment_body(
    report_md: str, task_file: str, run_url: str | None, *, limit: int = MAX_COMMENT_CHARS
) -> str:
    """The comment: marker, the (defanged, fitted) report, and a link to the run."""
    link = f"[workflow run]({run_url})" if run_url else "the workflow run's summary"
    head = marker(task_file) + "\n"
    foot = (
        f"\n\n---\n<sub>parallel-dispatch · `{neutralise(str(task_file))}`"
        + (f" · [workflow run]({run_url})" if run_url else "")
        + "</sub>\n"
    )
    note = f"\n\n> ✂️ **Truncated** to fit a GitHub comment. The full report is in the {link}.\n\n"
    # GitHub counts characters; UTF-16 units are never fewer, so they are the safe measure.
    measure = _utf16_len
    budget = limit - measure(head) - measure(foot)
    body = fit_markdown(neutralise(report_md).rstrip("\n"), budget, note, measure)
    return head + body + foot


def _utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _client(token: str, api_url: str | None) -> Github:
    return Github(
        auth=Auth.Token(token),
        base_url=(api_url or DEFAULT_API_URL).rstrip("/"),
        per_page=100,
        timeout=30,
        retry=GithubRetry(total=3, max_rate_limit_wait=60),
        lazy=True,
    )


def _own_login(gh: Github) -> str:
    """The login our comments carry; an installation token cannot ask `GET /user`."""
    retry_log = logging.getLogger("github.GithubRetry")
    level = retry_log.level
    retry_log.setLevel(logging.ERROR)  # the expected 403 is not worth a log line
    try:
        return gh.get_user().login
    except GithubException as exc:
        if exc.status == 403:
            return ACTIONS_BOT_LOGIN
        raise
    finally:
        retry_log.setLevel(level)


def post_comment(
    *,
    token: str,
    repository: str,
    pr_number: int,
    body: str,
    task_file: str,
    mode: str = "sticky",
    api_url: str | None = None,
) -> CommentResult:
    """Create or update the report comment on `repository`#`pr_number`.

    `sticky` edits the first comment by the same author whose first line is
    this task file's marker, searching every page; `new` always creates;
    `off` does nothing. A 403 (fork PR, read-only token) becomes a warning.
    """
    if mode not in COMMENT_MODES:
        raise ValueError(f"comment mode must be one of {', '.join(COMMENT_MODES)}: {mode!r}")
    if mode == "off":
        return CommentResult(None, "skipped")
    gh = _client(token, api_url)
    try:
        issue = gh.get_repo(repository).get_issue(pr_number)
        if mode == "sticky":
            login = _own_login(gh)
            first_line = marker(task_file)
            for comment in issue.get_comments():
                if (
                    comment.user.login == login
                    and (comment.body or "").split("\n", 1)[0] == first_line
                ):
                    comment.edit(body)
                    return CommentResult(comment.html_url, "updated")
        created = issue.create_comment(body)
        return CommentResult(created.html_url, "created")
    except GithubException as exc:
        message = _message(exc)
        if exc.status == 403:
            return CommentResult(
                None,
                "skipped",
                f"could not comment on PR #{pr_number} (403: {message}); a fork PR or a "
                "token without pull-requests: write. The report is in the step summary.",
            )
        raise CommentError(f"GitHub API error {exc.status}: {message}") from exc
    except requests.RequestException as exc:
        raise CommentError(f"GitHub API unreachable: {type(exc).__name__}: {exc}") from exc
    finally:
        gh.close()


def _message(exc: GithubException) -> str:
    data = exc.data
    if isinstance(data, dict) and data.get("message"):
        return str(data["message"])
    return str(exc.message or "no message")
