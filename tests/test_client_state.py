"""Per-attempt client state (runners/client_state.py) on real files: what is copied, what
is linked, when codex keeps the user's home, and the `shared_state` opt-out in the
config.  The real clients using these folders are in tests/contract/test_client_state.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from parallel_dispatch.config import load_config
from parallel_dispatch.errors import ConfigError
from parallel_dispatch.resolve import AgentResolver
from parallel_dispatch.runners.client_state import claude_state, codex_state


def private(tmp_path: Path) -> Path:
    folder = tmp_path / "private"
    folder.mkdir(mode=0o700)
    return folder


def test_claude_copies_config_and_settings_links_folders_and_reads_credentials_in_place(
        tmp_path: Path) -> None:
    home = tmp_path / "home"
    user = home / ".claude"
    (user / "agents").mkdir(parents=True)
    (user / "projects").mkdir()
    (user / "settings.json").write_text("{}")
    (user / ".credentials.json").write_text("{}")
    (user / "history.jsonl").write_text("")
    (home / ".claude.json").write_text(json.dumps({"mcpServers": {}}))
    target = private(tmp_path)
    env = claude_state({"HOME": str(home)}, target)
    assert env == {"CLAUDE_CONFIG_DIR": str(target), "CLAUDE_SECURESTORAGE_CONFIG_DIR": ""}
    assert sorted(p.name for p in target.iterdir()) == [".claude.json", "agents",
                                                        "settings.json"]
    assert (target / "agents").resolve() == (user / "agents").resolve()
    assert not (target / ".claude.json").is_symlink()
    assert (target / ".claude.json").stat().st_mode & 0o777 == 0o600


def test_claude_with_the_users_own_config_dir_keeps_its_credentials_there(
        tmp_path: Path) -> None:
    user = tmp_path / "elsewhere"
    user.mkdir()
    (user / ".claude.json").write_text('{"a": 1}')
    (tmp_path / ".claude.json").write_text('{"not": "read"}')  # HOME's is not the one
    target = private(tmp_path)
    env = claude_state({"HOME": str(tmp_path), "CLAUDE_CONFIG_DIR": str(user)}, target)
    assert env["CLAUDE_SECURESTORAGE_CONFIG_DIR"] == str(user)
    assert json.loads((target / ".claude.json").read_text()) == {"a": 1}


def test_codex_copies_config_and_profiles_links_auth_and_own_skills(tmp_path: Path) -> None:
    user = tmp_path / "codex"
    (user / "skills" / ".system").mkdir(parents=True)
    (user / "skills" / "mine").mkdir()
    (user / "sessions").mkdir()
    (user / "config.toml").write_text('model = "m"\n')
    (user / "work.config.toml").write_text('model = "w"\n')
    (user / "auth.json").write_text("{}")
    (user / "state_5.sqlite").write_text("")
    target = private(tmp_path)
    assert codex_state({"CODEX_HOME": str(user)}, target) == {"CODEX_HOME": str(target)}
    assert sorted(p.name for p in target.iterdir()) == ["auth.json", "config.toml",
                                                        "skills", "work.config.toml"]
    assert (target / "auth.json").is_symlink()
    assert [p.name for p in (target / "skills").iterdir()] == ["mine"]


@pytest.mark.parametrize("store, isolated", [("file", True), ("ephemeral", True),
                                             ("keyring", False), ("auto", False)])
def test_codex_keeps_the_users_home_when_credentials_are_in_the_keyring(
        tmp_path: Path, store: str, isolated: bool) -> None:
    user = tmp_path / "codex"
    user.mkdir()
    (user / "config.toml").write_text(f'cli_auth_credentials_store = "{store}"\n')
    target = private(tmp_path)
    env = codex_state({"CODEX_HOME": str(user)}, target)
    assert (env is not None) == isolated
    assert any(target.iterdir()) == isolated


def write_config(root: Path, text: str) -> None:
    (root / ".aiwg").mkdir(exist_ok=True)
    (root / ".aiwg" / "dispatch.toml").write_text(text)


def test_shared_state_from_the_runner_and_overridden_per_agent(tmp_path: Path) -> None:
    write_config(tmp_path, '[runners.claude]\nshared_state = true\n\n'
                           '[agents.a]\nrunner = "claude"\n\n'
                           '[agents.b]\nrunner = "claude"\nshared_state = false\n\n'
                           '[agents.c]\nrunner = "codex"\n')
    resolver = AgentResolver(load_config(tmp_path), home=tmp_path, path_env="")
    assert resolver.resolve("a").shared_state is True
    assert resolver.resolve("b").shared_state is False
    assert resolver.resolve("c").shared_state is False


def test_shared_state_on_a_command_agent_is_an_error_with_the_line(tmp_path: Path) -> None:
    write_config(tmp_path, '[agents.x]\ncommand = ["echo"]\nshared_state = true\n')
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert "only runner presets use shared_state" in str(info.value)
    assert any(d.line is not None for d in info.value.diagnostics)
