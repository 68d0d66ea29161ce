"""The sticky PR comment, posted through PyGithub to a local GitHub stand-in (real socket)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from github_stub import BOT_LOGIN, GitHubStub
from parallel_dispatch.github import comment as gh

REPO = "octo/widgets"
PR = 7
RUN_URL = "https://github.example/octo/widgets/actions/runs/42"


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def stub() -> Iterator[GitHubStub]:
    with GitHubStub(repository=REPO, pulls=(PR,)) as s:
        yield s


def post(stub: GitHubStub, report: str, *, task_file: str = "tasks.yml", **kw: object):
    body = gh.build_comment_body(report, task_file, RUN_URL)
    args = {
        "token": "installation-token",
        "repository": REPO,
        "pr_number": PR,
        "body": body,
        "task_file": task_file,
        "mode": "sticky",
        "api_url": stub.api_url,
    }
    args.update(kw)
    return gh.post_comment(**args)  # type: ignore[arg-type]


# --- which events comment -----------------------------------------------------


@pytest.mark.parametrize(
    ("event", "payload", "expected"),
    [
        ("pull_request", {"number": 5, "pull_request": {"number": 5}}, 5),
        ("pull_request_target", {"pull_request": {"number": 9}}, 9),
        ("issue_comment", {"issue": {"number": 3, "pull_request": {"url": "u"}}}, 3),
        ("issue_comment", {"issue": {"number": 3}}, None),  # a plain issue
        ("push", {"ref": "refs/heads/main"}, None),
        ("schedule", {}, None),
        ("workflow_dispatch", {"inputs": {}}, None),
        (None, None, None),
        ("pull_request", {"pull_request": {"number": "5"}}, None),
    ],
)
def test_pr_number_from_event(event: str | None, payload: dict | None, expected: int | None):
    assert gh.pr_number_from_event(event, payload) == expected


# --- the body -----------------------------------------------------------------


def test_marker_is_normalised_and_cannot_close_the_html_comment() -> None:
    assert (
        gh.marker("./tasks.yml")
        == gh.marker("tasks.yml")
        == ("<!-- parallel-dispatch:tasks.yml -->")
    )
    evil = gh.marker("x --> @here <b>.yml")
    assert evil.count("-->") == 1 and evil.endswith(" -->")
    assert "@here" not in evil.replace("%20", " ").split("-->")[1]


def test_mentions_are_defanged_but_emails_and_text_stay() -> None:
    text = gh.neutralise("ping @alice and @org/team, mail bob@example.com")
    assert "@alice" not in text and "@org/team" not in text
    assert "@\u200dalice" in text and "@\u200dorg/team" in text
    assert "bob@example.com" in text


MENTION = re.compile(r"(?<![A-Za-z0-9_])@[A-Za-z0-9]")
"""What GitHub turns into a mention once Markdown is rendered: `@` plus a name, not
glued to a word before it (an email)."""


@pytest.mark.parametrize("text", [
    "an unmatched backtick `@team gets pinged",     # issue 9, item 4
    "``@team``",                                     # inside code too: no parser guesswork
    "`code` then `@team",
    "x`@team",
    "(@team) [@team] *@team* _@team_ ~@team",
    "&#64;team &#x40;team &#X0040;team &commat;team",  # entities render as @
    "@\u200bteam is not enough? @@team",
])
def test_no_text_leaves_a_live_mention(text: str) -> None:
    import html

    out = gh.neutralise(text)
    rendered = html.unescape(out)
    assert not MENTION.search(rendered), rendered


def test_agent_text_cannot_forge_the_marker() -> None:
    forged = "<!-- parallel-dispatch:tasks.yml -->\nhijack\n<!--PARALLEL-DISPATCH:other -->"
    body = gh.build_comment_body(forged, "tasks.yml", RUN_URL)
    assert body.startswith(gh.marker("tasks.yml") + "\n")
    assert body.count(gh.marker("tasks.yml")) == 1
    assert body.lower().count("<!-- parallel-dispatch") == 1


def test_body_links_to_the_run() -> None:
    body = gh.build_comment_body("# Report\nall good\n", "tasks.yml", RUN_URL)
    assert "# Report\nall good" in body and f"]({RUN_URL})" in body


def big_report() -> str:
    """A report whose per-task log section dwarfs the rest, with an open code fence."""
    summary = "# Dispatch Report\n\n## Summary\n\n| Total | 3 |\n|---|---|\n"
    logs = "## Failed task logs\n\n```text\n" + "".join(
        f"log line {i} @mallory {'z' * 80}\n" for i in range(2_000)
    )
    return summary + logs + "```\n\n## Outputs\n\n- out/a.md\n"


def test_long_report_is_cut_per_section_with_a_note_and_link() -> None:
    report = big_report()
    assert len(report) > 3 * gh.MAX_COMMENT_CHARS
    body = gh.build_comment_body(report, "tasks.yml", RUN_URL)
    assert len(body) <= gh.MAX_COMMENT_CHARS
    assert len(body.encode("utf-16-le")) // 2 <= gh.MAX_COMMENT_CHARS
    assert "## Summary\n\n| Total | 3 |" in body  # short sections survive whole
    assert "## Outputs\n\n- out/a.md" in body
    assert "Truncated" in body and f"({RUN_URL})" in body
    # the cut log section closes its fence, so the rest is not swallowed into code
    logs = body[body.index("## Failed task logs") : body.index("## Outputs")]
    assert logs.count("```") == 2
    assert "@mallory" not in body


def test_fit_markdown_falls_back_to_one_cut_when_sections_are_many() -> None:
    text = "".join(f"# h{i}\n{'y' * 50}\n" for i in range(500))
    out = gh.fit_markdown(text, 1_000, note="\n[cut]\n")
    assert len(out) <= 1_000 and out.startswith("# h0\n") and out.endswith("[cut]\n")


def test_truncated_body_is_accepted_where_the_raw_one_is_refused(stub: GitHubStub) -> None:
    raw = "<!-- parallel-dispatch:tasks.yml -->\n" + big_report()
    with pytest.raises(gh.CommentError, match="422"):
        gh.post_comment(
            token="installation-token",
            repository=REPO,
            pr_number=PR,
            body=raw,
            task_file="tasks.yml",
            mode="new",
            api_url=stub.api_url,
        )
    result = post(stub, big_report())
    assert result.action == "created"
    assert len(stub.comments(PR)) == 1


# --- sticky behaviour -----------------------------------------------------------


def test_second_run_edits_the_same_comment(stub: GitHubStub) -> None:
    first = post(stub, "# run 1\n")
    second = post(stub, "# run 2\n", task_file="./tasks.yml")
    assert (first.action, second.action) == ("created", "updated")
    assert first.url == second.url and first.url and "#issuecomment-" in first.url
    [comment] = stub.comments(PR)
    assert comment.login == BOT_LOGIN and comment.edits == 1
    assert "# run 2" in comment.body and "# run 1" not in comment.body
    # the workflow token cannot read /user: the 403 is expected and handled
    assert any(r.path == "/api/v3/user" for r in stub.requests())


def test_each_task_file_keeps_its_own_comment(stub: GitHubStub) -> None:
    post(stub, "# a\n", task_file="a.yml")
    post(stub, "# b\n", task_file="b.yml")
    post(stub, "# a again\n", task_file="a.yml")
    bodies = sorted(c.body.split("\n", 2)[1] for c in stub.comments(PR))
    assert bodies == ["# a again", "# b"]


def test_another_users_comment_with_the_marker_is_untouched(stub: GitHubStub) -> None:
    decoy_body = gh.marker("tasks.yml") + "\nI copied your marker"
    decoy = stub.add_comment(PR, decoy_body, "mallory")
    result = post(stub, "# ours\n")
    assert result.action == "created"
    assert decoy.body == decoy_body and decoy.edits == 0
    assert len(stub.comments(PR)) == 2


def test_a_personal_token_matches_its_own_login(stub: GitHubStub) -> None:
    bot = stub.add_comment(PR, gh.marker("tasks.yml") + "\nby the bot", BOT_LOGIN)
    first = post(stub, "# by octocat\n", token="pat-token")
    second = post(stub, "# by octocat 2\n", token="pat-token")
    assert (first.action, second.action) == ("created", "updated")
    assert bot.edits == 0
    assert sorted(c.login for c in stub.comments(PR)) == [BOT_LOGIN, "octocat"]


def test_every_page_is_searched_before_creating(stub: GitHubStub) -> None:
    for i in range(230):
        stub.add_comment(PR, f"noise {i}", "someone")
    assert post(stub, "# first\n").action == "created"
    listed = [r for r in stub.requests() if r.method == "GET" and r.path.endswith("/comments")]
    assert [r.query.get("page", ["1"])[0] for r in listed] == ["1", "2", "3"]


def test_match_found_only_past_the_first_page(stub: GitHubStub) -> None:
    for i in range(130):
        stub.add_comment(PR, f"noise {i}", "someone")
    ours = stub.add_comment(PR, gh.marker("tasks.yml") + "\nold", BOT_LOGIN)
    result = post(stub, "# new\n")
    assert result.action == "updated" and ours.edits == 1 and "# new" in ours.body
    assert len(stub.comments(PR)) == 131
    listed = [r for r in stub.requests() if r.method == "GET" and r.path.endswith("/comments")]
    assert [r.query.get("page", ["1"])[0] for r in listed] == ["1", "2"]


def test_stub_pages_by_30_by_default(stub: GitHubStub) -> None:
    """The stand-in paginates like GitHub when no per_page is given."""
    import json
    import urllib.request

    for i in range(31):
        stub.add_comment(PR, f"c{i}", "someone")
    req = urllib.request.Request(
        f"{stub.api_url}/repos/{REPO}/issues/{PR}/comments",
        headers={"Authorization": "token pat-token"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        items = json.load(resp)
        link = resp.headers["Link"]
    assert len(items) == 30 and 'rel="next"' in link and "page=2" in link


def test_mode_new_always_creates_and_off_does_nothing(stub: GitHubStub) -> None:
    post(stub, "# 1\n", mode="new")
    post(stub, "# 2\n", mode="new")
    before = len(stub.requests())
    assert post(stub, "# 3\n", mode="off").action == "skipped"
    assert len(stub.requests()) == before
    assert len(stub.comments(PR)) == 2
    with pytest.raises(ValueError):
        post(stub, "# 4\n", mode="sometimes")


def test_read_only_token_is_a_warning_not_an_error(stub: GitHubStub) -> None:
    result = post(stub, "# report\n", token="read-only-token")
    assert result.action == "skipped" and result.url is None
    assert result.warning and "403" in result.warning
    assert stub.comments(PR) == []


def test_unknown_pr_and_bad_token_are_errors(stub: GitHubStub) -> None:
    with pytest.raises(gh.CommentError, match="404"):
        post(stub, "# x\n", pr_number=999)
    with pytest.raises(gh.CommentError, match="401"):
        post(stub, "# x\n", token="wrong")


def test_requests_go_to_the_enterprise_prefix(stub: GitHubStub) -> None:
    post(stub, "# ghes\n")
    assert stub.requests() and all(r.path.startswith("/api/v3/") for r in stub.requests())
    assert all(r.authorization == "token installation-token" for r in stub.requests())


def test_fit_markdown_always_fits_and_never_leaves_a_fence_open() -> None:
    import random

    rnd = random.Random(5)
    parts = ["# H\n", "## Sub\n", "```\n", "````py\n", "~~~\n", "é 😀 line\n", "x" * 200 + "\n"]
    for _ in range(150):
        text = "".join(rnd.choice(parts) for _ in range(rnd.randint(1, 100)))
        for budget in (0, 40, 300, 2_000):
            for measure in (len, lambda t: len(t.encode("utf-8"))):
                out = gh.fit_markdown(text, budget, "\n[cut]\n", measure)
                assert measure(out) <= budget or out == text
                if out != text and gh._open_fence(text) is None:
                    assert gh._open_fence(out) is None
