"""Pushing the merge queue's branch (`merge: branch`) to `origin` with the Action's token.

The token reaches git as an HTTP header for this one `git push` only, through git's
`GIT_CONFIG_COUNT`/`GIT_CONFIG_KEY_<n>`/`GIT_CONFIG_VALUE_<n>` environment (the
equivalent of `git -c`): never on disk (no `git config`, no credential helper), never
in an argv that `ps` or a log shows.  The header's value is masked before git runs.

The header is keyed to origin's URL (`http.<url>.extraheader`), after an empty value
for the same key: actions/checkout leaves its own token in the repository's config
under `http.https://github.com/.extraheader` (`persist-credentials`), and git ignores a
plain `http.extraheader` that comes after a more specific one; two Authorization
headers would be refused.  The empty value resets that list to ours.

Tasks ran in this repository: hooks are off for the push (`core.hooksPath` to an empty
folder, `--no-verify`), so a `pre-push` hook an agent wrote cannot see the header in
its environment.
"""

from __future__ import annotations

import base64
import os
import subprocess
import tempfile
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..agent_env import redact

PUSH_TIMEOUT_S = 300.0
REMOTE = "origin"


@dataclass(frozen=True)
class PushResult:
    """What became of the push: `error` is None when the branch is on origin."""

    branch: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def auth_header(token: str) -> str:
    """The header GitHub's git endpoints take an installation token in (as checkout does)."""
    basic = base64.b64encode(f"x-access-token:{token}".encode()).decode("ascii")
    return f"AUTHORIZATION: basic {basic}"


def header_secrets(token: str) -> list[str]:
    """What must be masked and redacted besides the token: its base64 form."""
    return [auth_header(token).split(" ", 2)[2]]


def _git(args: Sequence[str], cwd: Path,
         env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=cwd, env=dict(env), capture_output=True,
                          text=True, errors="replace", timeout=PUSH_TIMEOUT_S, check=False)


def _config_key(url: str) -> str:
    """`http.<url>.extraheader` for an http(s) remote; plain otherwise (file, ssh)."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    return f"http.{url}.extraheader" if scheme in ("http", "https") else "http.extraheader"


def push_env(base: Mapping[str, str], key: str, header: str | None,
             hooks: str) -> dict[str, str]:
    """`base` with the push's config entries in place of any `GIT_CONFIG_COUNT` ones;
    without a header, origin's configured authentication is left alone."""
    env = {k: v for k, v in base.items()
           if not (k == "GIT_CONFIG_COUNT" or k.startswith(("GIT_CONFIG_KEY_",
                                                            "GIT_CONFIG_VALUE_")))}
    env.update({"GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"})
    entries = [("core.hooksPath", hooks)]
    if header is not None:
        entries += [(key, ""), (key, header), ("credential.helper", "")]
    env["GIT_CONFIG_COUNT"] = str(len(entries))
    for n, (k, v) in enumerate(entries):
        env[f"GIT_CONFIG_KEY_{n}"] = k
        env[f"GIT_CONFIG_VALUE_{n}"] = v
    return env


def push_branch(root: Path, branch: str, token: str | None,
                env: Mapping[str, str] | None = None) -> PushResult:
    """`git push origin refs/heads/<branch>` in the repository around `root`.

    Without a token the push goes as git is configured (a file or ssh remote needs
    none).  Errors are returned, with the token and header redacted, never raised.
    """
    base = dict(os.environ if env is None else env)
    secrets = [token, *header_secrets(token)] if token else []
    try:
        url = _git(["remote", "get-url", REMOTE], root, base)
        if url.returncode != 0:
            return PushResult(branch, f"no remote '{REMOTE}' to push to: "
                              f"{url.stderr.strip() or url.stdout.strip()}")
        key = _config_key(url.stdout.strip())
        ref = f"refs/heads/{branch}"
        with tempfile.TemporaryDirectory(prefix="pd-nohooks-") as hooks:
            run_env = push_env(base, key, auth_header(token) if token else None, hooks)
            done = _git(["push", "--no-verify", "--porcelain", REMOTE, f"{ref}:{ref}"],
                        root, run_env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return PushResult(branch, redact(f"git push could not run: {exc}", secrets))
    if done.returncode != 0:
        text = done.stderr.strip() or done.stdout.strip() or f"exit code {done.returncode}"
        return PushResult(branch, redact(f"git push {REMOTE} {branch} failed: {text}", secrets))
    return PushResult(branch)


def compare_url(server: str, repository: str, base: str | None, branch: str) -> str:
    """GitHub's compare page of the branch against the run's base commit (or the default
    branch when the base is unknown)."""
    target = urllib.parse.quote(branch, safe="/")
    head = f"{urllib.parse.quote(base, safe='')}...{target}" if base else target
    return f"{server.rstrip('/')}/{repository}/compare/{head}"
