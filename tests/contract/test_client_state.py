"""Contract: per-attempt client state (runners/client_state.py, issue 11 §4) with the real
Claude Code and codex against their stubs.

Each client is started through a small wrapper (`[runners.X] command`) that runs the real
client and then records, per task, the state directory the client was given and what the
client left in it: so the tests see each attempt's private folder from inside, and that
it is gone after the run.  The user's own state (a login, settings, a config) is set up in
the private test HOME; it must still work from the private copy and must not be written.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from contract.clients import CLAUDE_MODEL, configure_claude, configure_codex
from contract.common import client
from preset_support import AgentProject
from stubs.anthropic import KEY, AnthropicStub
from stubs.openai_responses import ResponsesStub

AUTH_JSON_KEY = "sk-stub-key-from-auth-json"

WRAPPER = """\
#!/bin/sh
# Run the real client, then record the state folder it was given and its contents.
echo "${var}" > "{records}/$DISPATCH_TASK_ID.dir"
"{client}" "$@"
code=$?
out="{records}/$DISPATCH_TASK_ID.txt"
dir="${var}"
{{
  echo "dir=$dir"
  echo "storage=${{CLAUDE_SECURESTORAGE_CONFIG_DIR-unset}}"
  if [ -n "$dir" ]; then
    stat -c "mode=%a" "$dir"
    (cd "$dir" && find . | sort)
  fi
}} > "$out"
exit $code
"""


def wrap(ap: AgentProject, exe: str, var: str) -> Path:
    """A wrapper for the real `exe` that records `$var` and its folder's contents into
    records/<task>.txt; returns the records folder."""
    records = ap.home.parent / "records"
    records.mkdir()
    script = ap.home.parent / f"{exe}-wrapper"
    script.write_text(WRAPPER.format(client=client(exe), records=records, var=var))
    script.chmod(0o755)
    return records


def two_parallel_tasks(ap: AgentProject) -> None:
    ap.tasks("""\
        tasks:
          - {id: a, agent: reviewer, prompt: "First", output: a.md}
          - {id: b, agent: reviewer, prompt: "Second", output: b.md}
        settings: {max_parallel: 2}
    """)


def record(records: Path, task: str) -> tuple[dict[str, str], list[str]]:
    """(the `key=value` lines, the listed paths) a wrapper recorded for `task`."""
    lines = (records / f"{task}.txt").read_text().splitlines()
    fields = dict(line.split("=", 1) for line in lines if "=" in line and
                  not line.startswith("."))
    return fields, [line for line in lines if line.startswith(".")]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under `folder` with its size and mtime (ns)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        st = path.lstat()
        out[str(path.relative_to(folder))] = (st.st_size, st.st_mtime_ns)
    return out


# --- claude -------------------------------------------------------------------------------


@pytest.fixture
def anthropic() -> Iterator[AnthropicStub]:
    with AnthropicStub.running() as server:
        yield server


def claude_user_state(ap: AgentProject) -> None:
    """A user logged in with OAuth (`~/.claude/.credentials.json`, as on Linux), no API
    key in the environment, a `~/.claude.json` and user settings."""
    ap.env.pop("ANTHROPIC_API_KEY")
    folder = ap.home / ".claude"
    folder.mkdir()
    expires = int((time.time() + 365 * 86400) * 1000)
    creds = folder / ".credentials.json"
    creds.write_text(json.dumps({"claudeAiOauth": {
        "accessToken": KEY, "refreshToken": "stub-refresh-token", "expiresAt": expires,
        "scopes": ["user:inference", "user:profile"], "subscriptionType": "max"}}))
    creds.chmod(0o600)
    (folder / "settings.json").write_text(json.dumps({"env": {"PD_USER_SETTING": "1"}}))
    (ap.home / ".claude.json").write_text(json.dumps({"hasCompletedOnboarding": True,
                                                      "userMarker": "mine"}))


@pytest.fixture
def cc(contract_project: AgentProject, anthropic: AnthropicStub) -> AgentProject:
    ap = configure_claude(contract_project, anthropic)
    claude_user_state(ap)
    return ap


def claude_config(ap: AgentProject, extra: str = "") -> Path:
    records = wrap(ap, "claude", "{CLAUDE_CONFIG_DIR-}")
    script = ap.home.parent / "claude-wrapper"
    ap.config(f'[runners.claude]\ncommand = ["{script}"]\n{extra}')
    ap.define("reviewer", "Review.", model=CLAUDE_MODEL)
    return records


def test_claude_parallel_attempts_get_private_config_dirs_and_keep_the_login(
        cc: AgentProject, anthropic: AnthropicStub) -> None:
    records = claude_config(cc)
    two_parallel_tasks(cc)
    user_before = snapshot(cc.home)
    proc = cc.run("t.yaml")
    assert proc.returncode == 0, proc.stderr
    # The login still works: the stub saw the user's OAuth token on every call.
    calls = anthropic.messages()
    assert len(calls) == 2
    assert all(c.headers.get("authorization") == f"Bearer {KEY}" for c in calls)
    (fa, la), (fb, lb) = record(records, "a"), record(records, "b")
    assert fa["dir"] != fb["dir"]
    for fields, listing in ((fa, la), (fb, lb)):
        assert fields["mode"] == "700"
        assert fields["storage"] == ""  # credentials: ~/.claude, as without the variable
        assert "./.claude.json" in listing  # claude wrote its config into the copy...
        assert "./settings.json" in listing  # ...next to the user's copied settings
        assert "./.credentials.json" not in listing  # read in place, never copied
        assert not Path(fields["dir"]).exists()  # removed after the attempt
    copied = json.loads((cc.home / ".claude.json").read_text())
    assert copied["userMarker"] == "mine"
    # Nothing of the user's was written: no sessions, backups or plugin state.
    assert snapshot(cc.home) == user_before


def test_claude_shared_state_true_uses_the_users_own_files(
        cc: AgentProject, anthropic: AnthropicStub) -> None:
    records = claude_config(cc, "shared_state = true\n")
    two_parallel_tasks(cc)
    before = (cc.home / ".claude.json").stat().st_mtime_ns
    proc = cc.run("t.yaml")
    assert proc.returncode == 0, proc.stderr
    fields, _ = record(records, "a")
    assert fields["dir"] == "" and fields["storage"] == "unset"
    assert (cc.home / ".claude.json").stat().st_mtime_ns != before
    assert (cc.home / ".claude" / "backups").is_dir()


def test_claude_state_dir_is_removed_when_the_attempt_times_out(
        cc: AgentProject, anthropic: AnthropicStub) -> None:
    records = claude_config(cc)
    anthropic.behave("hang")
    cc.tasks("tasks:\n  - {id: a, agent: reviewer, prompt: Hi, output: a.md, retries: 0}\n"
             "settings: {timeout_per_task: 8000}\n")
    proc = cc.run("t.yaml")
    assert proc.returncode == 1, proc.stderr
    assert cc.task("a")["status"] == "timeout"
    assert anthropic.messages()  # claude was running, in its private folder, when cut
    folder = Path((records / "a.dir").read_text().strip())
    assert folder.name.startswith("claude-state-")
    assert not folder.exists()
    assert not (records / "a.txt").exists()  # the wrapper was killed with claude


# --- codex --------------------------------------------------------------------------------


@pytest.fixture
def responses() -> Iterator[ResponsesStub]:
    with ResponsesStub.running() as server:
        yield server


@pytest.fixture
def cx(contract_project: AgentProject, responses: ResponsesStub) -> AgentProject:
    """codex logged in with an API key in `$CODEX_HOME/auth.json` (what `codex login
    --with-api-key` writes), used for a provider with `requires_openai_auth`."""
    ap = configure_codex(contract_project, responses)
    ap.env.pop("STUB_API_KEY")
    home = Path(ap.env["CODEX_HOME"])
    (home / "config.toml").write_text(
        'model = "gpt-5.1-codex"\nmodel_provider = "stub"\n\n[model_providers.stub]\n'
        f'name = "Responses stub"\nbase_url = "{responses.base_url}"\n'
        'wire_api = "responses"\nrequires_openai_auth = true\n')
    (home / "auth.json").write_text(json.dumps({"OPENAI_API_KEY": AUTH_JSON_KEY}))
    (home / "auth.json").chmod(0o600)
    (home / "AGENTS.md").write_text("Global instructions of the user.\n")
    return ap


def codex_config(ap: AgentProject, extra: str = "") -> Path:
    records = wrap(ap, "codex", "{CODEX_HOME}")
    script = ap.home.parent / "codex-wrapper"
    ap.config(f'[defaults]\nrunner = "codex"\n\n[runners.codex]\ncommand = ["{script}"]\n'
              f"{extra}")
    return records


def sessions(listing: list[str]) -> list[str]:
    return [p for p in listing if p.startswith("./sessions/") and p.endswith(".jsonl")]


def test_codex_parallel_attempts_get_private_homes_and_keep_the_login(
        cx: AgentProject, responses: ResponsesStub) -> None:
    records = codex_config(cx)
    two_parallel_tasks(cx)
    user_home = Path(cx.env["CODEX_HOME"])
    proc = cx.run("t.yaml")
    assert proc.returncode == 0, proc.stderr
    calls = responses.calls("/responses")
    assert len(calls) == 2
    assert all(c.headers.get("authorization") == f"Bearer {AUTH_JSON_KEY}" for c in calls)
    (fa, la), (fb, lb) = record(records, "a"), record(records, "b")
    assert fa["dir"] != fb["dir"] and str(user_home) not in (fa["dir"], fb["dir"])
    for fields, listing in ((fa, la), (fb, lb)):
        assert fields["mode"] == "700"
        assert len(sessions(listing)) == 1  # each attempt's own session, nobody else's
        assert {"./config.toml", "./AGENTS.md", "./auth.json"} <= set(listing)
        assert not Path(fields["dir"]).exists()
    # The user's CODEX_HOME got no session, history or database.
    assert sorted(p.name for p in user_home.iterdir()) == ["AGENTS.md", "auth.json",
                                                           "config.toml"]
    assert json.loads((user_home / "auth.json").read_text()) == \
        {"OPENAI_API_KEY": AUTH_JSON_KEY}


def test_codex_shared_state_true_writes_sessions_to_the_users_home(
        cx: AgentProject, responses: ResponsesStub) -> None:
    records = codex_config(cx, "shared_state = true\n")
    two_parallel_tasks(cx)
    proc = cx.run("t.yaml")
    assert proc.returncode == 0, proc.stderr
    user_home = Path(cx.env["CODEX_HOME"])
    fields, _ = record(records, "a")
    assert fields["dir"] == str(user_home)
    found = [p for p in (user_home / "sessions").rglob("*.jsonl")]
    assert len(found) == 2, found
