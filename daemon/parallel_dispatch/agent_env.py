"""The environment an agent runs with: the user's, minus a deny-list, plus its own `env`.

Agents run untrusted text (task prompts, PR diffs), so anything that grants write
access or steers what runs after them is withheld unless the user names it:
GitHub Actions' tokens and command files, the action's `INPUT_*`, the runner's
`ACTIONS_*` (runtime and OIDC request tokens, cache URLs), and the systemd
variables meant for the daemon alone. Harmless context (`CI`, `GITHUB_REPOSITORY`,
`GITHUB_SHA`, `RUNNER_TEMP`, ...) and the agents' own API keys pass. The list is
documented in README.md ("What an agent's environment holds"); a test checks
that every name here appears there.

This is not a sandbox: an agent runs as the same user and can read what that user
can. It keeps capabilities from being *handed* to an agent.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

DENIED_NAMES: frozenset[str] = frozenset({
    # the GitHub token under the names workflows pass it by (gh reads GH_TOKEN)
    "GITHUB_TOKEN", "GH_TOKEN", "GITHUB_ENTERPRISE_TOKEN", "GH_ENTERPRISE_TOKEN",
    # runner files: whatever is appended to them steers later steps
    "GITHUB_ENV", "GITHUB_OUTPUT", "GITHUB_PATH", "GITHUB_STATE", "GITHUB_STEP_SUMMARY",
    # the event payload, which later steps' toolkits read back as `github.context`
    "GITHUB_EVENT_PATH",
    # systemd's, for the daemon's main process only (a watchdog ping or a READY=1
    # from an agent would speak for the service)
    "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
    "LISTEN_FDNAMES",
})
"""Variables never inherited by an agent (exact names)."""

DENIED_PREFIXES: tuple[str, ...] = ("INPUT_", "ACTIONS_")
"""Action inputs (the token is one: `INPUT_GITHUB-TOKEN`) and the runner's own
`ACTIONS_*` (ACTIONS_RUNTIME_TOKEN, ACTIONS_ID_TOKEN_REQUEST_TOKEN/URL, cache URLs)."""

_SECRET_WORDS = re.compile(r"TOKEN|SECRET|PASSWORD|KEY", re.IGNORECASE)
MIN_SECRET_CHARS = 8
"""Shorter values are not redacted: replacing "true" or "1" everywhere would garble text."""

_REFERENCE = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)\})")


def is_denied(name: str) -> bool:
    """Whether `name` is withheld from agents unless their config names it."""
    upper = name.upper()
    return upper in DENIED_NAMES or upper.startswith(DENIED_PREFIXES)


class _Unset(Exception):
    pass


def _expand(value: str, source: Mapping[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        if m.group(1) is None:
            return "$"  # `$$` is a literal dollar sign
        if m.group(1) not in source:
            raise _Unset(m.group(1))
        return source[m.group(1)]

    return _REFERENCE.sub(one, value)


def expand_references(extra: Mapping[str, str], source: Mapping[str, str]) -> dict[str, str]:
    """`[agents.X] env` values with `${NAME}` replaced from `source` (the user's whole
    environment, deny-list included: naming a variable is the explicit way to pass it).

    Only the braced form is a reference; `$$` is a literal `$`, a bare `$NAME` stays
    as written. A value that refers to an unset variable is left out, so the agent
    sees the variable missing rather than silently empty.
    """
    out: dict[str, str] = {}
    for key, value in extra.items():
        try:
            out[key] = _expand(value, source) if "$" in value else value
        except _Unset:
            continue
    return out


def agent_environment(base: Mapping[str, str],
                      extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` without the deny-list, then `extra` (the agent's configured `env`) on top."""
    env = {k: v for k, v in base.items() if not is_denied(k)}
    if extra:
        env.update(expand_references(extra, base))
    return env


def secret_values(env: Mapping[str, str], extra: Iterable[str | None] = ()) -> list[str]:
    """Values to redact from what is posted: denied variables whose names say they are
    credentials (GITHUB_TOKEN, INPUT_GITHUB-TOKEN, ACTIONS_RUNTIME_TOKEN, ...), plus
    `extra`; longest first, so a token containing another is replaced whole."""
    found = {v for k, v in env.items()
             if is_denied(k) and _SECRET_WORDS.search(k) and not k.upper().endswith("_URL")}
    found.update(v for v in extra if v)
    return sorted((v for v in found if len(v.strip()) >= MIN_SECRET_CHARS),
                  key=lambda v: (-len(v), v))


def redact(text: str, secrets: Iterable[str]) -> str:
    """Replace each secret value in `text` with `***`, as the runner's log masking does."""
    for value in secrets:
        if value in text:
            text = text.replace(value, "***")
    return text


def hide_own_environment(secrets: Iterable[str] = ()) -> bool:
    """Keep agents from reading secrets out of this process's environment.

    An agent is our child, so `/proc/<ppid>/environ` would hand it everything the
    deny-list withheld. Linux only: the process becomes non-dumpable
    (`PR_SET_DUMPABLE` 0), which closes `/proc/<pid>/environ`, `mem` and `fd` to
    other processes of the same user, and since root is not stopped by that, the
    values in `secrets` are also overwritten with `*` in the original environment
    block that `/proc/<pid>/environ` shows (`os.environ` keeps its copy). Children are
    unaffected (exec resets the flag). Returns False where this is not possible.
    """
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        ok = int(libc.prctl(4, 0, 0, 0, 0)) == 0  # PR_SET_DUMPABLE = 4
        _overwrite_environ_values(ctypes, libc, {s.encode() for s in secrets if s})
    except (OSError, AttributeError, ValueError):
        return False
    return ok


def _overwrite_environ_values(ctypes: Any, libc: Any, values: set[bytes]) -> None:
    """Overwrite, in place, each `NAME=VALUE` string of C `environ` whose value is secret."""
    if not values:
        return
    entries = ctypes.POINTER(ctypes.c_void_p).in_dll(libc, "environ")
    i = 0
    while entries[i]:
        address = entries[i]
        entry = ctypes.string_at(address)
        name, sep, value = entry.partition(b"=")
        if sep and value in values:
            ctypes.memset(address + len(name) + 1, ord("*"), len(value))
        i += 1
