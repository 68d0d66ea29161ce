"""A private copy of a client's own state per attempt, so parallel agents don't share it.

Parallel CLI processes corrupt the state they share: Claude Code rewrites `~/.claude.json`
on every start (users report it corrupted by parallel runs), and every `codex exec` adds
its session to the one `$CODEX_HOME` that `codex exec resume --last` reads.  Where a
client can be pointed at another state directory and its credentials still work from
there, each attempt gets one of its own (a private temp folder, mode 0700, removed after
the attempt whatever its end: `Call.cleanup` in a `finally`):

* **copied** — the user's settings and instructions (small files), so the agent behaves as
  the user configured it; what the client writes to them stays in the copy;
* **linked or read in place** — credentials, so a login that refreshes its token refreshes
  the user's one (a copied OAuth refresh token that the provider rotates would leave the
  user's own login stale), and user-authored folders (agents, commands, skills, prompts);
* **left out** — history, sessions, logs, caches, databases: what parallel runs fight over.

What each client reads was verified in the pinned builds (docs/agent-clis.md, "Client state
per attempt").  `[runners.X] shared_state = true` (or per agent) turns this off.
"""

from __future__ import annotations

import shutil
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path

CLAUDE_COPIED = (".claude.json", ".config.json", "settings.json", "CLAUDE.md",
                 "keybindings.json")
"""Claude Code's user config (`.claude.json`: MCP servers, onboarding, a /login key;
`.config.json`: its legacy name), settings and memory."""
CLAUDE_LINKED = ("agents", "commands", "skills", "output-styles", "hooks", "plugins",
                 "rules")
"""User-authored folders Claude Code reads; installed plugins are read in place."""

CODEX_COPIED = ("config.toml", "AGENTS.md", "AGENTS.override.md", "installation_id")
"""codex's config (plus every `<profile>.config.toml` beside it), global instructions and
its installation id."""
CODEX_LINKED = ("auth.json", "prompts", "rules", "plugins")
"""codex opens auth.json with O_TRUNC (no rename), so a refresh through the link updates
the user's file."""
CODEX_SKILLS = "skills"
CODEX_SYSTEM_SKILLS = ".system"
"""codex (re)installs its bundled skills into `skills/.system` at every start: the private
copy gets its own, the user's own skills are linked one by one."""
CODEX_FILE_STORE = ("file", "ephemeral")
"""`cli_auth_credentials_store` values (default `file`) whose credentials a private
CODEX_HOME still finds: `keyring` and `auto` key the keyring entry by the CODEX_HOME path."""


def home(env: Mapping[str, str]) -> Path:
    return Path(env.get("HOME") or Path.home())


def claude_state(env: Mapping[str, str], private: Path) -> dict[str, str]:
    """Point Claude Code (2.1.332) at `private`: `CLAUDE_CONFIG_DIR` moves `.claude.json`,
    settings, sessions, backups and plugin state there; `CLAUDE_SECURESTORAGE_CONFIG_DIR`
    keeps credentials where the user's are (`.credentials.json`, or the macOS keychain
    entry named after that folder; empty means "~/.claude, as if no CLAUDE_CONFIG_DIR").
    Claude refuses a symlinked `.credentials.json` (O_NOFOLLOW), hence the variable."""
    configured = env.get("CLAUDE_CONFIG_DIR")
    user_dir = Path(configured) if configured else home(env) / ".claude"
    copy_files(user_dir, private, CLAUDE_COPIED)
    if not configured:  # without the variable, the user config sits beside the folder
        copy_files(home(env), private, (".claude.json",))
    link_entries(user_dir, private, CLAUDE_LINKED)
    storage = env.get("CLAUDE_SECURESTORAGE_CONFIG_DIR", configured or "")
    return {"CLAUDE_CONFIG_DIR": str(private), "CLAUDE_SECURESTORAGE_CONFIG_DIR": storage}


def codex_state(env: Mapping[str, str], private: Path) -> dict[str, str] | None:
    """Point codex (0.171.0) at `private` as its `CODEX_HOME`; None (shared state) when the
    user keeps credentials in the keyring, whose entry is keyed by the CODEX_HOME path."""
    configured = env.get("CODEX_HOME")
    user_dir = Path(configured) if configured else home(env) / ".codex"
    if auth_store(user_dir / "config.toml") not in CODEX_FILE_STORE:
        return None
    copy_files(user_dir, private, CODEX_COPIED)
    copy_files(user_dir, private, sorted(p.name for p in _glob(user_dir, "*.config.toml")))
    link_entries(user_dir, private, CODEX_LINKED)
    skills = user_dir / CODEX_SKILLS
    if skills.is_dir():
        (private / CODEX_SKILLS).mkdir(mode=0o700)
        own = sorted(p.name for p in skills.iterdir() if p.name != CODEX_SYSTEM_SKILLS)
        link_entries(skills, private / CODEX_SKILLS, own)
    return {"CODEX_HOME": str(private)}


def auth_store(config: Path) -> str:
    """codex's `cli_auth_credentials_store` (default `file`); an unreadable config counts as
    `file`, since codex itself will then stop with the parse error."""
    try:
        data = tomllib.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return "file"
    value = data.get("cli_auth_credentials_store", "file")
    return value if isinstance(value, str) else "file"


def copy_files(source: Path, target: Path, names: Iterable[str]) -> None:
    """Copy each regular file `source/name` that exists (following a link, as the client
    would read it) into `target`, private to the user."""
    for name in names:
        src = source / name
        if src.is_file():
            dst = target / name
            shutil.copyfile(src, dst)
            dst.chmod(0o600)


def link_entries(source: Path, target: Path, names: Iterable[str]) -> None:
    """Symlink each `source/name` that exists into `target` (absolute links)."""
    for name in names:
        src = source / name
        if src.exists():
            (target / name).symlink_to(src.absolute())


def _glob(folder: Path, pattern: str) -> list[Path]:
    try:
        return [p for p in folder.glob(pattern) if p.is_file()]
    except OSError:
        return []
