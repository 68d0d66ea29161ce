"""`push-branch`: the Action pushes the branch of `merge: branch` to `origin`.

`origin` is a local bare repository (a file path remote), so the push is real git end
to end; the token still goes to git as an Authorization header, through the
environment only.  A `git` wrapper first on PATH records every argv git is started
with, to show the token is in none of them."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from github_stub import GitHubStub
from parallel_dispatch.github import push as git_push
from test_action import PR, REPO, Run, commands, run_action, stub, workdir  # noqa: F401
from test_merge import git, make_repo

TOKEN = "installation-token"  # the stand-in knows it as the workflow's token
HEADER_B64 = base64.b64encode(f"x-access-token:{TOKEN}".encode()).decode()

REFACTOR = """\
name: refactor
description: two isolated edits merged onto a branch
settings: {isolation: worktree, merge: branch, max_parallel: 1, output_dir: out-refactor/}
tasks:
  - {id: up, agent: shell, prompt: "sed -i 's/^a$/A/' f.txt", output: up.md}
  - {id: new, agent: shell, prompt: "echo new > g.txt", output: new.md,
     dependencies: [up]}
"""


@pytest.fixture
def repo(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """`workdir` as a git checkout whose origin is a bare repository; returns origin."""
    (workdir / "refactor.yml").write_text(REFACTOR)
    make_repo(workdir, {"f.txt": "a\nb\n", "refactor.yml": REFACTOR})
    origin = tmp_path_factory.mktemp("remote") / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    git(workdir, "remote", "add", "origin", str(origin))
    git(workdir, "push", "-q", "origin", "main")
    return origin


@pytest.fixture
def argv_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `git` first on PATH that appends its argv to a file, then runs the real git."""
    folder = tmp_path_factory.mktemp("wrapped")
    log = folder / "argv.log"
    real = subprocess.run(["sh", "-c", "command -v git"], capture_output=True, text=True,
                          check=True).stdout.strip()
    wrapper = folder / "bin" / "git"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$*\" >> '{log}'\nexec '{real}' \"$@\"\n")
    wrapper.chmod(0o755)
    log.write_text("")
    return log


def pushed_branches(origin: Path) -> list[str]:
    out = subprocess.run(["git", "--git-dir", str(origin), "for-each-ref", "--format=%(refname)",
                          "refs/heads/dispatch/"], capture_output=True, text=True, check=True)
    return [r.removeprefix("refs/heads/") for r in out.stdout.split()]


def action(workdir: Path, stub: GitHubStub, argv_log: Path | None = None,  # noqa: F811
           **inputs: str) -> Run:
    extra = {}
    if argv_log is not None:
        extra["PATH"] = f"{argv_log.parent / 'bin'}{os.pathsep}{os.environ['PATH']}"
    return run_action(workdir, stub, token=TOKEN, task_file="refactor.yml",
                      extra_env=extra, **inputs)


def everything_written(*roots: Path) -> str:
    """Every file's bytes under `roots` (git objects are compressed: their contents are
    checked through git itself by the caller)."""
    parts = []
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file() and "objects" not in p.parts:
                parts.append(p.read_bytes().decode("utf-8", "replace"))
    return "\n".join(parts)


def test_the_branch_arrives_on_origin_and_the_comment_names_it(
        workdir: Path, stub: GitHubStub, repo: Path, argv_log: Path) -> None:  # noqa: F811
    run = action(workdir, stub, argv_log, push_branch="true")
    assert run.code == 0, run.stdout + run.stderr
    branch = run.outputs["branch"]
    assert branch.startswith("dispatch/refactor/")
    assert pushed_branches(repo) == [branch]
    log = git(workdir, "--git-dir", str(repo), "log", "--format=%s", f"main..{branch}")
    assert log.splitlines() == ["new (shell)", "up (shell)"]
    assert git(workdir, "--git-dir", str(repo), "show", f"{branch}:g.txt") == "new\n"
    base = git(workdir, "rev-parse", "main").strip()
    link = f"{stub.host}/{REPO}/compare/{base}...{branch}"
    [comment] = stub.comments(PR)
    assert f"Pushed `{branch}` to origin: [compare]({link})" in comment.body
    assert f"[compare]({link})" in run.summary
    # the header was masked before git ran, and went to git only through its environment
    masks = [data for _, data in commands(run.stdout, "add-mask")]
    assert TOKEN in masks and HEADER_B64 in masks
    argvs = argv_log.read_text()
    assert "push --no-verify --porcelain origin" in argvs
    assert TOKEN not in argvs and HEADER_B64 not in argvs
    printed = run.stdout.replace(f"::add-mask::{TOKEN}", "").replace(
        f"::add-mask::{HEADER_B64}", "") + run.stderr
    on_disk = everything_written(workdir, repo)
    for secret in (TOKEN, HEADER_B64):
        assert secret not in printed and secret not in comment.body
        assert secret not in on_disk and secret not in "".join(run.outputs.values())
    assert "extraheader" not in (workdir / ".git/config").read_text()


def test_without_push_branch_nothing_is_pushed_and_the_comment_says_so(
        workdir: Path, stub: GitHubStub, repo: Path, argv_log: Path) -> None:  # noqa: F811
    run = action(workdir, stub, argv_log)
    assert run.code == 0, run.stdout + run.stderr
    branch = run.outputs["branch"]
    assert branch.startswith("dispatch/refactor/")
    assert git(workdir, "rev-parse", "--verify", branch)  # made locally …
    assert pushed_branches(repo) == []  # … and not pushed
    assert " push " not in argv_log.read_text()
    [comment] = stub.comments(PR)
    assert f"`{branch}` was made on the runner and not pushed" in comment.body
    assert HEADER_B64 not in run.stdout


def test_a_failed_push_is_reported_and_fails_the_step_per_fail_on(
        workdir: Path, stub: GitHubStub, repo: Path) -> None:  # noqa: F811
    (repo / "hooks" / "pre-receive").write_text("#!/bin/sh\necho 'refused by policy' >&2\n"
                                                "exit 1\n")
    (repo / "hooks" / "pre-receive").chmod(0o755)
    run = action(workdir, stub, push_branch="true")
    assert run.code == 1, run.stdout + run.stderr
    assert run.outputs["status"] == "succeeded"  # the tasks did; the push did not
    branch = run.outputs["branch"]
    [(props, message)] = commands(run.stdout, "error")
    assert props["title"] == f"push of {branch} failed"
    assert "refused by policy" in message
    [comment] = stub.comments(PR)
    assert f"`{branch}` could not be pushed to origin" in comment.body
    assert "refused by policy" in comment.body
    assert pushed_branches(repo) == []
    never = action(workdir, stub, push_branch="true", fail_on="never")
    assert never.code == 0, never.stdout + never.stderr
    assert commands(never.stdout, "error")
    for text in (run.stdout, run.stderr, comment.body, never.stdout):
        assert TOKEN not in text.replace(f"::add-mask::{TOKEN}", "")


def test_a_bad_push_branch_value_is_an_input_error(workdir: Path, stub: GitHubStub) -> None:  # noqa: F811
    bad = run_action(workdir, stub, push_branch="yes please")
    assert bad.code == 2
    [(_, message)] = commands(bad.stdout, "error")
    assert "push-branch" in message and "true | false" in message


class _Recorder(BaseHTTPRequestHandler):
    """Records the Authorization headers of each request; answers 404."""

    seen: ClassVar[list[list[str]]] = []

    def do_GET(self) -> None:
        type(self).seen.append(self.headers.get_all("Authorization") or [])
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_the_header_git_sends_replaces_the_one_checkout_left_in_the_config(
        tmp_path: Path) -> None:
    """actions/checkout persists its header keyed to the server URL; git skips a plain
    `http.extraheader` after a URL-keyed one (and would send two for two entries), so
    ours is keyed to origin's URL after an empty value that resets the list.  What git
    actually sends is recorded by a server on 127.0.0.1."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        host = f"http://127.0.0.1:{server.server_address[1]}"
        url = f"{host}/octo/widgets.git"
        git(tmp_path, "init", "-q")
        git(tmp_path, "config", f"http.{host}/.extraheader", "AUTHORIZATION: basic old")

        def sent(env: dict[str, str], *config: str) -> list[str]:
            _Recorder.seen = []
            subprocess.run(["git", *config, "ls-remote", url], cwd=tmp_path, env=env,
                           capture_output=True, check=False, timeout=60)
            assert _Recorder.seen, "git made no request"
            return _Recorder.seen[0]

        base = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "NO_PROXY": "127.0.0.1",
                "no_proxy": "127.0.0.1"}
        ours = git_push.push_env(base, git_push._config_key(url),
                                 git_push.auth_header(TOKEN), str(tmp_path / "nohooks"))
        assert sent(ours) == [f"basic {HEADER_B64}"]
        # what the plain key would have done: checkout's header, not ours
        assert sent(base, "-c", "http.extraheader=AUTHORIZATION: basic new") == ["basic old"]
    finally:
        server.shutdown()
        server.server_close()


if sys.platform != "linux":  # pragma: no cover
    pytest.skip("Linux runners only", allow_module_level=True)
