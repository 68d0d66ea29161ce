"""`parallel-dispatch action` end to end: a real subprocess, real shell agents, and the
GitHub REST stand-in on 127.0.0.1 behind GITHUB_API_URL."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from github_stub import BOT_LOGIN, MAX_BODY, GitHubStub
from parallel_dispatch.github import comment as gh
from test_workflow_commands import parse_command, parse_output_file, runner_acts_on
from warmcli import run_cli

REPO = "octo/widgets"
PR = 7

GOOD = """\
name: smoke
description: one shell task
tasks:
  - id: hello
    agent: shell
    prompt: "echo hi; echo 'note to @alice' >&2"
    output: hello.txt
settings:
  max_parallel: 2
  timeout_per_task: 60000
  output_dir: out/
  on_failure: continue
"""

FAILING = """\
name: failing
description: one task fails, its dependent is skipped
tasks:
  - id: ok
    agent: shell
    prompt: "echo fine"
    output: ok.txt
  - id: boom
    agent: shell
    prompt: "echo 'boom: 100%, done' >&2; echo '::add-mask::x' >&2; exit 3"
    output: boom.txt
  - id: after
    agent: shell
    prompt: "echo never"
    output: after.txt
    dependencies: [boom]
settings:
  max_parallel: 2
  timeout_per_task: 60000
  output_dir: out-failing/
  on_failure: continue
"""

NOISY = """\
name: noisy
description: two failing tasks whose log tails alone exceed a GitHub comment
tasks:
  - id: loud1
    agent: shell
    prompt: "yes \\"$(printf '%3000s' | tr ' ' x)\\" | head -n 25 >&2; exit 1"
    output: loud1.txt
  - id: loud2
    agent: shell
    prompt: "yes \\"$(printf '%3000s' | tr ' ' y)\\" | head -n 25 >&2; exit 1"
    output: loud2.txt
settings:
  output_dir: out-noisy/
"""

INVALID = """\
name: invalid
description: a dependency that does not exist
tasks:
  - id: a
    agent: shell
    prompt: "true"
    output: a.txt
    dependencies: [nope]
"""


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    outputs: dict[str, str]
    summary: str


@pytest.fixture
def stub() -> Iterator[GitHubStub]:
    with GitHubStub(repository=REPO, pulls=(PR,)) as s:
        yield s


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / ".aiwg").mkdir()
    (tmp_path / "tasks.yml").write_text(GOOD)
    (tmp_path / "other.yml").write_text(GOOD.replace("out/", "out-other/"))
    (tmp_path / "failing.yml").write_text(FAILING)
    (tmp_path / "invalid.yml").write_text(INVALID)
    (tmp_path / "noisy.yml").write_text(NOISY)
    event = {"action": "synchronize", "number": PR, "pull_request": {"number": PR}}
    (tmp_path / "event.json").write_text(json.dumps(event))
    (tmp_path / "push.json").write_text(json.dumps({"ref": "refs/heads/main"}))
    return tmp_path


def run_action(
    workdir: Path,
    stub: GitHubStub,
    *args: str,
    token: str = "installation-token",
    event: str = "pull_request",
    extra_env: dict[str, str] | None = None,
    cold: bool = False,
    **inputs: str,
) -> Run:
    """Run the command like the runner would: INPUT_* and GITHUB_* in the environment.
    Forked warm (warmcli.py) unless `cold`: what the process's own exec-time environment
    (/proc/PID/environ) holds needs a real exec."""
    out_file, summary_file = workdir / "github_output", workdir / "step_summary"
    for f in (out_file, summary_file):
        f.write_text("")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GITHUB_", "INPUT_", "RUNNER_")) and k != "CI"
    }
    env.update(
        {
            "GITHUB_ACTIONS": "true",
            "GITHUB_OUTPUT": str(out_file),
            "GITHUB_STEP_SUMMARY": str(summary_file),
            "GITHUB_EVENT_NAME": event,
            "GITHUB_EVENT_PATH": str(workdir / ("push.json" if event == "push" else "event.json")),
            "GITHUB_REPOSITORY": REPO,
            "GITHUB_API_URL": stub.api_url,
            "GITHUB_SERVER_URL": stub.host,
            "GITHUB_RUN_ID": "4242",
            "INPUT_TASK-FILE": "tasks.yml",
            "INPUT_GITHUB-TOKEN": token,
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
    )
    env.update({f"INPUT_{k.upper().replace('_', '-')}": v for k, v in inputs.items()})
    env.update(extra_env or {})
    proc = run_cli(["action", *args], workdir, env, timeout=120, cold=cold)
    return Run(
        proc.returncode,
        proc.stdout,
        proc.stderr,
        parse_output_file(out_file.read_text()),
        summary_file.read_text(),
    )


def commands(stdout: str, name: str) -> list[tuple[dict[str, str], str]]:
    found = []
    for line in live_lines(stdout):
        if line.startswith(f"::{name} ") or line.startswith(f"::{name}::"):
            _, props, data = parse_command(line)
            found.append((props, data))
    return found


def live_lines(stdout: str) -> list[str]:
    """The lines the runner would act on: those outside `::stop-commands::` blocks."""
    live, resume = [], None
    for line in stdout.splitlines():
        if resume is None:
            if m := re.fullmatch(r"::stop-commands::(\S+)", line):
                resume = f"::{m.group(1)}::"
            else:
                live.append(line)
        elif line == resume:
            resume = None
    return live


def test_two_runs_on_a_pr_leave_one_updated_comment(workdir: Path, stub: GitHubStub) -> None:
    first = run_action(workdir, stub)
    assert first.code == 0, first.stdout + first.stderr
    second = run_action(workdir, stub)
    assert second.code == 0, second.stdout + second.stderr

    [comment] = stub.comments(PR)
    assert comment.login == BOT_LOGIN and comment.edits == 1
    assert comment.body.startswith("<!-- parallel-dispatch:tasks.yml -->\n")
    report_md = Path(second.outputs["report"]).read_text()
    assert gh.neutralise(report_md).strip() in comment.body
    assert f"{stub.host}/{REPO}/actions/runs/4242" in comment.body
    assert "@alice" not in comment.body  # agent text cannot ping anyone
    assert first.outputs["comment-url"] == second.outputs["comment-url"]
    assert second.outputs["comment-url"].endswith(f"#issuecomment-{comment.id}")
    assert "PR comment updated" in second.stdout


def test_outputs_and_step_summary(workdir: Path, stub: GitHubStub) -> None:
    run = run_action(workdir, stub)
    assert run.code == 0, run.stdout + run.stderr
    o = run.outputs
    assert (o["status"], o["succeeded"], o["failed"], o["skipped"]) == ("succeeded", "1", "0", "0")
    report_md, report_json = Path(o["report"]), Path(o["report-json"])
    assert report_md.is_file() and report_json.is_file()
    assert json.loads(report_json.read_text())["status"] == "succeeded"
    # the step summary is the Markdown report (untruncated: it is small)
    assert run.summary.rstrip("\n") == report_md.read_text().rstrip("\n")
    assert o["comment-url"].startswith(stub.host)
    # each task's log is folded into a group
    assert "::group::hello: succeeded" in run.stdout and "::endgroup::" in run.stdout


def test_second_task_file_gets_its_own_comment(workdir: Path, stub: GitHubStub) -> None:
    assert run_action(workdir, stub).code == 0
    assert run_action(workdir, stub, "--task-file", "other.yml").code == 0
    assert run_action(workdir, stub).code == 0
    markers = sorted(c.body.split("\n", 1)[0] for c in stub.comments(PR))
    assert markers == [
        "<!-- parallel-dispatch:other.yml -->",
        "<!-- parallel-dispatch:tasks.yml -->",
    ]


def test_another_users_marker_comment_is_untouched(workdir: Path, stub: GitHubStub) -> None:
    decoy_body = "<!-- parallel-dispatch:tasks.yml -->\nnot yours"
    decoy = stub.add_comment(PR, decoy_body, "mallory")
    for i in range(120):  # and push the real one past the first page on the second run
        stub.add_comment(PR, f"chatter {i}", "someone")
    assert run_action(workdir, stub).code == 0
    for i in range(120):
        stub.add_comment(PR, f"more chatter {i}", "someone")
    assert run_action(workdir, stub).code == 0
    assert decoy.body == decoy_body and decoy.edits == 0
    ours = [c for c in stub.comments(PR) if c.login == BOT_LOGIN]
    assert len(ours) == 1 and ours[0].edits == 1


def test_failed_tasks_annotate_and_fail_the_step(workdir: Path, stub: GitHubStub) -> None:
    run = run_action(workdir, stub, task_file="failing.yml")
    assert run.code == 1
    o = run.outputs
    assert (o["status"], o["succeeded"], o["failed"], o["skipped"]) == ("failed", "1", "1", "1")
    errors = commands(run.stdout, "error")
    [(props, message)] = [e for e in errors if "boom" in e[0].get("title", "")]
    assert props["title"] == "Task boom failed (shell)"
    assert "boom: 100%, done" in message  # escaped on the wire, intact after parsing
    # the agent's own `::add-mask::` line is inert: it sits between stop-commands markers
    assert live_lines(run.stdout).count("::add-mask::x") == 0
    assert "::add-mask::x" in run.stdout.splitlines()
    assert stub.comments(PR)  # a failure is still reported on the PR


def test_oversized_report_is_truncated_in_the_comment(workdir: Path, stub: GitHubStub) -> None:
    run = run_action(workdir, stub, task_file="noisy.yml")
    assert run.code == 1, run.stdout + run.stderr
    report_md = Path(run.outputs["report"]).read_text()
    assert len(report_md) > MAX_BODY  # the stand-in would answer 422 to this
    [comment] = stub.comments(PR)  # … but the fitted body was accepted
    assert len(comment.body) <= MAX_BODY
    assert "Truncated" in comment.body and "/actions/runs/4242" in comment.body
    assert "## Summary" in comment.body
    assert run.summary.rstrip("\n") == report_md.rstrip("\n")  # 1 MiB is plenty here
    assert not commands(run.stdout, "warning")


def test_fail_on_never_keeps_the_step_green(workdir: Path, stub: GitHubStub) -> None:
    run = run_action(workdir, stub, task_file="failing.yml", fail_on="never")
    assert run.code == 0
    assert run.outputs["status"] == "failed"
    assert commands(run.stdout, "error")  # still annotated


def test_read_only_token_warns_and_passes(workdir: Path, stub: GitHubStub) -> None:
    run = run_action(workdir, stub, token="read-only-token")
    assert run.code == 0, run.stdout + run.stderr
    [(_, message)] = commands(run.stdout, "warning")
    assert "403" in message
    assert run.outputs["comment-url"] == ""
    assert stub.comments(PR) == []
    assert run.outputs["status"] == "succeeded"


def test_push_event_writes_summary_but_no_comment(workdir: Path, stub: GitHubStub) -> None:
    run = run_action(workdir, stub, event="push")
    assert run.code == 0
    assert run.summary.strip()
    assert stub.requests() == []
    assert run.outputs["comment-url"] == ""


def test_comment_off_and_personal_token(workdir: Path, stub: GitHubStub) -> None:
    assert run_action(workdir, stub, comment="off").code == 0
    assert stub.requests() == []
    assert run_action(workdir, stub, token="pat-token", comment="new").code == 0
    assert run_action(workdir, stub, token="pat-token", comment="new").code == 0
    assert [c.login for c in stub.comments(PR)] == ["octocat", "octocat"]


def test_invalid_task_file_is_annotated_with_its_position(workdir: Path, stub: GitHubStub):
    run = run_action(workdir, stub, task_file="invalid.yml")
    assert run.code == 2
    errors = commands(run.stdout, "error")
    assert errors and all(
        p.get("file") == "invalid.yml" or "invalid.yml" in p.get("file", "") for p, _ in errors
    )
    assert any(p.get("line") for p, _ in errors) and any("nope" in m for _, m in errors)
    assert run.outputs["status"] == "invalid"
    assert "nope" in run.summary
    [comment] = stub.comments(PR)
    assert "invalid" in comment.body and "nope" in comment.body


def test_flags_win_over_inputs_and_bad_inputs_exit_2(workdir: Path, stub: GitHubStub) -> None:
    run = run_action(workdir, stub, "--comment", "off", comment="new")
    assert run.code == 0 and stub.requests() == []
    bad = run_action(workdir, stub, max_parallel="lots")
    assert bad.code == 2
    [(_, message)] = commands(bad.stdout, "error")
    assert "max-parallel" in message
    assert run_action(workdir, stub, fail_on="sometimes").code == 2


def test_token_is_never_printed(workdir: Path, stub: GitHubStub) -> None:
    run = run_action(workdir, stub, token="installation-token")
    text = run.stdout + run.stderr
    # the only place it may appear is the mask request, which the runner does not echo
    assert text.count("installation-token") == 1
    assert "::add-mask::installation-token" in run.stdout


def test_summary_is_cut_by_section_when_the_file_is_nearly_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The step-summary budget is what earlier steps left; long sections are cut, fences
    closed, short sections kept."""
    from parallel_dispatch.github import action, workflow_commands

    summary = tmp_path / "summary"
    summary.write_bytes(b"x" * (workflow_commands.SUMMARY_LIMIT_BYTES - 50_000))
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    logs = "".join(f"line {i} {'é' * 100}\n" for i in range(2_000))
    report = (
        f"# Report\n\n## Summary\n\nall here\n\n## Logs\n\n```text\n{logs}```\n\n## End\n\nok\n"
    )
    action._write_summary(report, "out/dispatch-report.md")
    assert summary.stat().st_size <= workflow_commands.SUMMARY_LIMIT_BYTES
    added = summary.read_bytes()[workflow_commands.SUMMARY_LIMIT_BYTES - 50_000 :].decode()
    assert "## Summary\n\nall here" in added and "## End\n\nok" in added
    assert "Truncated" in added and "`out/dispatch-report.md`" in added
    assert added.count("```") == 2


def test_example_workflow_files_validate() -> None:
    """The files .github/workflows/dispatch-example.yml points at exist and are valid."""
    import os
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    workflow = (repo / ".github/workflows/dispatch-example.yml").read_text()
    assert "task-file: examples/pr-review.yaml" in workflow
    assert "config: examples/pr-review.toml" in workflow
    env = dict(os.environ, PATH=f"{repo / 'tests/fakes/bin'}{os.pathsep}{os.environ['PATH']}")
    out = run_cli(["plan", "examples/pr-review.yaml", "--config", "examples/pr-review.toml"],
                  repo, env)
    assert out.returncode == 0, out.stderr
    assert ("claude -p --output-format stream-json --verbose --no-session-persistence "
            "--tools=") in out.stdout
    assert "Critical path:" in out.stdout


# --- issue 9: secrets, runner files and workflow commands ---------------------------

TOKEN = "installation-token"

SNOOPING = """\
name: snooping
description: agents that go looking for the token and the runner's files
tasks:
  - id: snoop
    agent: shell
    prompt: |
      env
      tr '\\0' '\\n' < /proc/$PPID/environ > "$DISPATCH_OUTPUT_DIR/parent-environ.txt"
      echo "PWNED=1" >> "$GITHUB_ENV"
      echo "status=pwned" >> "$GITHUB_OUTPUT"
      echo "/tmp/pwned" >> "$GITHUB_PATH"
      echo "# pwned" >> "$GITHUB_STEP_SUMMARY"
      true
    output: snoop.txt
  - id: told
    agent: courier
    prompt: go
    output: told.txt
settings:
  output_dir: out-snooping/
"""

COURIER = """\
[agents.courier]
command = ["/bin/sh", "-c", "echo \\"I was given $LEAKED\\"; echo \\"token: $LEAKED\\" >&2; exit 1"]
prompt = "arg"
env = { LEAKED = "${GITHUB_TOKEN}" }
"""


def test_no_token_or_runner_file_reaches_an_agent_and_nothing_posted_shows_it(
    workdir: Path, stub: GitHubStub
) -> None:
    """Issue 9, item 1: the write token, the runner's command files and `INPUT_*` stay
    out of agents; an agent the user explicitly gave the token cannot get it posted."""
    (workdir / "snooping.yml").write_text(SNOOPING)
    (workdir / ".aiwg" / "dispatch.toml").write_text(COURIER)
    files = {name: workdir / name.lower() for name in ("GITHUB_ENV", "GITHUB_PATH", "GITHUB_STATE")}
    for f in files.values():
        f.write_text("")
    extra = {
        "GITHUB_TOKEN": TOKEN,  # a workflow-level `env: GITHUB_TOKEN: ${{ github.token }}`
        "ACTIONS_RUNTIME_TOKEN": "runtime-token-secret",
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "oidc-request-secret",
        **{k: str(v) for k, v in files.items()},
    }
    run = run_action(workdir, stub, token=TOKEN, task_file="snooping.yml", extra_env=extra,
                     cold=True)  # /proc/$PPID/environ: the exec-time environment
    assert run.code == 1, run.stdout + run.stderr  # `told` fails on purpose
    out = workdir / "out-snooping"
    seen = (out / "snoop.txt").read_text()
    assert "GITHUB_REPOSITORY=octo/widgets" in seen  # the agent did dump its environment
    # nor can it read them from its parent's (we run as root here: even that fails)
    parent = (out / "parent-environ.txt").read_text()
    assert parent == "" or "GITHUB_TOKEN=*****" in parent  # unreadable, or overwritten
    for secret in (TOKEN, "runtime-token-secret", "oidc-request-secret"):
        assert secret not in seen and secret not in parent
    for name in ("INPUT_", "ACTIONS_", "GITHUB_TOKEN", "GITHUB_ENV", "GITHUB_OUTPUT",
                 "GITHUB_PATH", "GITHUB_STEP_SUMMARY", "GITHUB_STATE"):
        assert name not in seen, name
    for path in (*files.values(), workdir / "github_output", workdir / "step_summary"):
        assert path.name not in seen  # no path of a runner file, either
    # … so its writes to them went nowhere
    assert files["GITHUB_ENV"].read_text() == files["GITHUB_PATH"].read_text() == ""
    assert "pwned" not in run.summary and "pwned" not in run.outputs.values()
    # the courier printed the token it was given: nothing we post or print shows it
    posted = [c.body for c in stub.comments(PR)]
    assert posted and "***" in posted[0]
    reports = [Path(run.outputs[k]).read_text() for k in ("report", "report-json")]
    printed = run.stdout.replace(f"::add-mask::{TOKEN}", "") + run.stderr
    for text in (*posted, run.summary, *reports, printed, *run.outputs.values()):
        assert TOKEN not in text
    [(_, message)] = [e for e in commands(run.stdout, "error") if "told" in e[0]["title"]]
    assert "token: ***" in message


FORGING = """\
name: "forged\\n::error title=forged::from the name ##[warning]legacy in the name"
description: hostile text wherever the Action prints
tasks:
  - id: liar
    agent: liar
    prompt: go
    output: liar.txt
settings:
  output_dir: out-forging/
"""

LIAR = """\
[agents.liar]
runner = "claude"
command = ["/bin/sh", "-c", \
  "printf '::warning::forged\\\\n##[add-mask]failed\\\\n##[stop-commands]abc\\\\n' >&2; exit 1"]
"""


def test_task_file_and_agent_text_cannot_issue_workflow_commands(
    workdir: Path, stub: GitHubStub
) -> None:
    """Issue 9, item 2: the runner acts on exactly the Action's own commands."""
    (workdir / "forging.yml").write_text(FORGING)
    (workdir / ".aiwg" / "dispatch.toml").write_text(LIAR)
    run = run_action(workdir, stub, task_file="forging.yml")
    assert run.code == 1, run.stdout + run.stderr
    assert "##[stop-commands]abc" in run.stdout  # the agent's text is shown …
    acted = runner_acts_on(run.stdout)
    annotations = [(name, props, data) for name, props, data in acted
                   if name in ("error", "warning", "notice", "add-mask")]
    # … but only our mask request and our own annotation of the failed task are acted on
    assert [a[0] for a in annotations] == ["add-mask", "error"], annotations
    assert annotations[0][2] == TOKEN
    assert annotations[1][1]["title"] == "Task liar failed (liar)"
    assert "stop-commands" not in [a[0] for a in acted if a[2] == "abc"]
    assert ("group" in [a[0] for a in acted]) and acted[-1][0] == "endgroup"


def test_a_symlinked_task_file_leading_out_of_the_workspace_is_refused_unread(
    workdir: Path, stub: GitHubStub, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Issue 9, item 3: nothing of the target reaches an annotation, summary or comment."""
    outside = tmp_path_factory.mktemp("elsewhere") / "secret.txt"
    outside.write_text("topsecret: value-from-outside\nroot: hash-of-root\n")
    (workdir / "linked.yml").symlink_to(outside)
    run = run_action(workdir, stub, task_file="linked.yml")
    assert run.code == 2, run.stdout + run.stderr
    assert run.outputs["status"] == "invalid"
    [(_, message)] = commands(run.stdout, "error")
    assert "symlink" in message and str(outside) in message
    everything = run.stdout + run.stderr + run.summary + "".join(
        c.body for c in stub.comments(PR))
    assert "topsecret" not in everything and "hash-of-root" not in everything
