"""How each real client is pointed at its local stub: env vars, its own config files, the
agent definition and dispatch.toml.  One plain `configure_<client>(ap, stub)` per client,
so the contract tests' fixtures and bench/provider_errors.py set up the very same thing.

Each leaves the client's own retry policy as shipped (what a user of that version gets)
and returns `ap` with an agent `reviewer` whose runner is that client.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from contract.common import BODY, GOOD_KEY
from preset_support import AgentProject
from stubs import anthropic
from stubs.anthropic import AnthropicStub
from stubs.gemini import GeminiStub
from stubs.openai_chat import OpenAIChatStub
from stubs.openai_responses import ResponsesStub

CLAUDE_MODEL = "claude-sonnet-4-5"
CODEX_MODEL = "gpt-5.1-codex"
CODEX_BODY = BODY + "\x7f"
"""codex gets a DEL too: its `developer_instructions` go through TOML quoting."""
GEMINI_MODEL = "gemini-2.5-flash"
GEMINI_KEY = "AIza-stub-good-key"
OPENCODE_MODEL = "stub/stub-model"
LLM_MODEL = "stub-model"
OPENAI_MODEL = "stub-model"


# --- claude -------------------------------------------------------------------------------


def configure_claude(ap: AgentProject, stub: AnthropicStub) -> AgentProject:
    """claude is the default runner (on PATH, nothing configured); `ANTHROPIC_BASE_URL`
    and `ANTHROPIC_API_KEY` point it at `stub`, the rest of `stubs.anthropic.env` keeps
    it off the network."""
    ap.env.update(anthropic.env(stub))
    ap.define("reviewer", BODY, model=CLAUDE_MODEL)
    return ap


# --- codex --------------------------------------------------------------------------------


def codex_provider_config(base_url: str, **extra: Any) -> str:
    """A CODEX_HOME/config.toml selecting the stub as the model provider."""
    lines = [f'model = "{CODEX_MODEL}"', 'model_provider = "stub"', "",
             "[model_providers.stub]", 'name = "Responses stub"', f'base_url = "{base_url}"',
             'env_key = "STUB_API_KEY"', 'wire_api = "responses"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def set_codex_provider(ap: AgentProject, base_url: str, **extra: Any) -> None:
    (Path(ap.env["CODEX_HOME"]) / "config.toml").write_text(
        codex_provider_config(base_url, **extra))


def configure_codex(ap: AgentProject, stub: ResponsesStub) -> AgentProject:
    """A model provider in a private CODEX_HOME (`base_url`, `wire_api = "responses"`, the
    key from `$STUB_API_KEY`)."""
    codex_home = ap.home / ".codex"
    codex_home.mkdir()
    ap.env["CODEX_HOME"] = str(codex_home)
    ap.env["STUB_API_KEY"] = GOOD_KEY
    set_codex_provider(ap, stub.base_url)
    ap.define("reviewer", CODEX_BODY, model=CODEX_MODEL)
    ap.config('[defaults]\nrunner = "codex"\n')
    return ap


# --- gemini -------------------------------------------------------------------------------


def write_gemini_settings(ap: AgentProject, **general: Any) -> Path:
    """~/.gemini/settings.json: API-key auth (0.61.0 takes a base URL alone for its
    "gateway" auth type, which its own headless check rejects), no update checks or usage
    statistics; `general` adds e.g. maxAttempts."""
    settings: dict[str, Any] = {
        "security": {"auth": {"selectedType": "gemini-api-key"}},
        "general": {"enableAutoUpdate": False, "enableAutoUpdateNotification": False,
                    **general},
        "privacy": {"usageStatisticsEnabled": False},
        "telemetry": {"enabled": False},
    }
    path = ap.home / ".gemini" / "settings.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(settings, indent=2))
    return path


def configure_gemini(ap: AgentProject, stub: GeminiStub) -> AgentProject:
    """`GOOGLE_GEMINI_BASE_URL` and `GEMINI_API_KEY`, plus the settings above.  The
    project's private TMPDIR matters: gemini writes an error report to os.tmpdir() for
    every API error it gives up on."""
    write_gemini_settings(ap)
    # GEMINI_CLI_NO_RELAUNCH: gemini otherwise starts itself a second time with a larger
    # heap, which doubles each run's start-up CPU; the stub's replies are small.
    ap.env.update(GOOGLE_GEMINI_BASE_URL=stub.origin, GEMINI_API_KEY=GEMINI_KEY,
                  GEMINI_CLI_NO_RELAUNCH="true")
    ap.define("reviewer", BODY, model=GEMINI_MODEL)
    ap.config('[defaults]\nrunner = "gemini"\n')
    return ap


# --- opencode -----------------------------------------------------------------------------


def write_opencode_provider(ap: AgentProject, base_url: str) -> None:
    """opencode.json with the stub as an OpenAI-compatible provider."""
    config = {
        "$schema": "https://opencode.ai/config.json",
        "autoupdate": False,
        "share": "disabled",
        "provider": {"stub": {
            "npm": "@ai-sdk/openai-compatible",
            "name": "Chat Completions stub",
            "options": {"baseURL": base_url, "apiKey": "{env:STUB_API_KEY}"},
            "models": {"stub-model": {"name": "Stub model"}},
        }},
    }
    path = Path(ap.env["XDG_CONFIG_HOME"]) / "opencode" / "opencode.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2))


def configure_opencode(ap: AgentProject, stub: OpenAIChatStub) -> AgentProject:
    """The provider above; `OPENCODE_DISABLE_MODELS_FETCH` keeps opencode off models.dev
    (it resolves the internet at every start otherwise), `OPENCODE_DISABLE_AUTOUPDATE`
    off update checks.  At every start opencode also installs `@opencode-ai/plugin` into
    each config directory with npm, in the background; `npm_config_offline` keeps that
    npm off the registry (the install fails quietly, the run is unaffected)."""
    write_opencode_provider(ap, stub.base_url)
    ap.env.update(STUB_API_KEY=GOOD_KEY, OPENCODE_DISABLE_MODELS_FETCH="1",
                  OPENCODE_DISABLE_AUTOUPDATE="1", npm_config_offline="true")
    stub.tool_command = "touch bash-ran.marker"  # relative: opencode's bash runs in the project
    ap.define("reviewer", BODY)
    ap.config(f'[defaults]\nrunner = "opencode"\n\n[runners.opencode]\n'
              f'model = "{OPENCODE_MODEL}"\n')
    return ap


# --- llm ----------------------------------------------------------------------------------


def llm_user_dir(ap: AgentProject) -> Path:
    return Path(ap.env["LLM_USER_PATH"])


def write_llm_model(ap: AgentProject, base_url: str) -> None:
    (llm_user_dir(ap) / "extra-openai-models.yaml").write_text(
        f"- model_id: {LLM_MODEL}\n  model_name: {LLM_MODEL}\n  api_base: {base_url}\n"
        "  api_key_name: stub\n")


def set_llm_key(ap: AgentProject, key: str | None) -> None:
    """The `stub` key in llm's keys.json; None removes the file."""
    path = llm_user_dir(ap) / "keys.json"
    if key is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(json.dumps({"stub": key}))


def configure_llm(ap: AgentProject, stub: OpenAIChatStub) -> AgentProject:
    """An OpenAI-compatible model in `$LLM_USER_PATH/extra-openai-models.yaml`, its key in
    `$LLM_USER_PATH/keys.json`."""
    ap.env["LLM_USER_PATH"] = str(ap.home / "llm")
    llm_user_dir(ap).mkdir()
    write_llm_model(ap, stub.base_url)
    set_llm_key(ap, GOOD_KEY)
    ap.define("reviewer", BODY)
    ap.config(f'[defaults]\nrunner = "llm"\n\n[runners.llm]\nmodel = "{LLM_MODEL}"\n')
    return ap


# --- the openai runner (no client: the dispatcher's own HTTP client) ----------------------


def configure_openai(ap: AgentProject, stub: OpenAIChatStub) -> AgentProject:
    """The `openai` runner on `stub`, its key from `$STUB_API_KEY`."""
    ap.env["STUB_API_KEY"] = GOOD_KEY
    ap.define("reviewer", BODY)
    ap.config(f'[defaults]\nrunner = "openai"\n\n[runners.openai]\nbase_url = '
              f'"{stub.base_url}"\nmodel = "{OPENAI_MODEL}"\napi_key_env = "STUB_API_KEY"\n')
    return ap
