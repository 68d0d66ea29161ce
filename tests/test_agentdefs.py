"""Agent definitions: discovery order, name folding, frontmatter, and bad files."""

from __future__ import annotations

from pathlib import Path

import pytest

from parallel_dispatch import agentdefs
from parallel_dispatch.agentdefs import AgentDefinitionError, fold, suggest
from parallel_dispatch.errors import DispatchError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def agent_md(name: str | None = None, body: str = "You are helpful.", **front: str) -> str:
    lines = ["---"]
    if name is not None:
        lines.append(f"name: {name}")
    lines += [f"{key}: {value}" for key, value in front.items()]
    lines += ["---", body, ""]
    return "\n".join(lines)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    return root


@pytest.fixture
def home(tmp_path: Path) -> Path:
    root = tmp_path / "home"
    root.mkdir()
    return root


# --- folding ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["security-architect", "Security Architect", "security_architect", "  SECURITY--Architect "],
)
def test_fold_treats_case_spaces_hyphens_and_underscores_alike(name: str) -> None:
    assert fold(name) == "security-architect"


def test_fold_keeps_other_characters() -> None:
    assert fold("api.v2 Reviewer") == "api.v2-reviewer"


# --- parsing ---------------------------------------------------------------------------------


def test_full_definition_is_parsed(project: Path) -> None:
    path = write(
        project / ".claude/agents/security-architect.md",
        "---\n"
        "name: security-architect\n"
        "description: Reviews designs for security flaws\n"
        "model: opus\n"
        "tools: Read, Grep, Glob\n"
        "color: red\n"
        "---\n"
        "You are a security architect.\n"
        "\n"
        "Focus on authentication.\n",
    )
    definition = agentdefs.parse_file(path)
    assert definition.name == "security-architect"
    assert definition.description == "Reviews designs for security flaws"
    assert definition.model == "opus"
    assert definition.tools == ("Read", "Grep", "Glob")
    assert definition.system_prompt == "You are a security architect.\n\nFocus on authentication."
    assert definition.path == path
    assert definition.extra == {"color": "red"}
    assert definition.key == "security-architect"


def test_tools_as_yaml_list(project: Path) -> None:
    path = write(
        project / "a.md", "---\nname: a\ntools:\n  - Read\n  - Bash(git diff:*)\n---\nbody\n"
    )
    assert agentdefs.parse_file(path).tools == ("Read", "Bash(git diff:*)")


def test_tools_string_splits_only_top_level_commas(project: Path) -> None:
    text = agent_md("a", tools='"Read, Bash(git log:*, git diff:*), Edit,"')
    definition = agentdefs.parse_file(write(project / "a.md", text))
    assert definition.tools == ("Read", "Bash(git log:*, git diff:*)", "Edit")


def test_opencode_style_tool_map_keeps_enabled_tools(project: Path) -> None:
    path = write(
        project / "a.md", "---\ntools:\n  write: false\n  bash: true\n  read: true\n---\nbody\n"
    )
    assert agentdefs.parse_file(path).tools == ("bash", "read")


def test_missing_optional_fields_and_name_from_file_stem(project: Path) -> None:
    definition = agentdefs.parse_file(write(project / "code-reviewer.md", "---\n---\nReview.\n"))
    assert definition.name == "code-reviewer"
    assert (definition.description, definition.model, definition.tools) == ("", None, ())
    assert definition.system_prompt == "Review."


def test_model_inherit_means_no_override(project: Path) -> None:
    path = write(project / "a.md", agent_md("a", model="inherit"))
    assert agentdefs.parse_file(path).model is None


def test_crlf_and_bom_are_accepted(project: Path) -> None:
    path = project / "a.md"
    path.write_bytes(b"\xef\xbb\xbf---\r\nname: A Agent\r\n---\r\nLine one\r\nLine two\r\n")
    definition = agentdefs.parse_file(path)
    assert definition.name == "A Agent"
    assert definition.system_prompt == "Line one\nLine two"


def test_body_keeps_markdown_and_later_rules(project: Path) -> None:
    body = "# Role\n\nText\n\n---\n\nMore after a horizontal rule."
    definition = agentdefs.parse_file(write(project / "a.md", agent_md("a", body=body)))
    assert definition.system_prompt == body


# --- discovery order -------------------------------------------------------------------------


def test_search_order(project: Path, home: Path) -> None:
    dirs = agentdefs.search_dirs(project, home)
    assert dirs == [
        project / ".aiwg/agents",
        project / ".claude/agents",
        project / ".codex/agents",
        project / ".opencode/agent",
        project / ".cursor/agents",
        home / ".claude/agents",
    ]


@pytest.mark.parametrize(
    ("winner", "loser"),
    [
        (".aiwg/agents", ".claude/agents"),
        (".claude/agents", ".codex/agents"),
        (".codex/agents", ".opencode/agent"),
        (".opencode/agent", ".cursor/agents"),
    ],
)
def test_earlier_folder_wins(project: Path, home: Path, winner: str, loser: str) -> None:
    write(project / loser / "reviewer.md", agent_md("reviewer", body="from loser"))
    write(project / winner / "reviewer.md", agent_md("reviewer", body="from winner"))
    found = agentdefs.scan(project, home)
    assert found.get("reviewer").system_prompt == "from winner"
    assert [d.system_prompt for d in found.shadowed] == ["from loser"]


def test_project_beats_home_and_home_fills_gaps(project: Path, home: Path) -> None:
    write(home / ".claude/agents/reviewer.md", agent_md("reviewer", body="home"))
    write(home / ".claude/agents/personal.md", agent_md("personal", body="mine"))
    write(project / ".cursor/agents/reviewer.md", agent_md("reviewer", body="project"))
    found = agentdefs.discover(project, home)
    assert list(found) == ["reviewer", "personal"]
    assert found["reviewer"].system_prompt == "project"
    assert found["personal"].system_prompt == "mine"


def test_home_defaults_to_HOME(project: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(home))
    write(home / ".claude/agents/personal.md", agent_md("personal"))
    assert agentdefs.find("personal", project) is not None


def test_project_that_is_home_is_searched_once(home: Path) -> None:
    write(home / ".claude/agents/a.md", agent_md("a"))
    found = agentdefs.scan(home, home)
    assert found.shadowed == ()
    assert len(found.searched) == 5


def test_files_are_read_in_name_order_and_non_agents_skipped(project: Path, home: Path) -> None:
    folder = project / ".claude/agents"
    write(folder / "b.md", agent_md("same", body="b"))
    write(folder / "a.md", agent_md("same", body="a"))
    write(folder / "README.md", "# Our agents\n")
    write(folder / "notes.txt", "not an agent")
    write(folder / "nested/deep.md", agent_md("deep"))
    found = agentdefs.scan(project, home)
    assert found.get("same").system_prompt == "a"
    assert found.errors == ()
    assert found.get("deep") is None
    assert found.names() == ["same"]


# --- resolving agent: X ------------------------------------------------------------------------


def test_find_by_frontmatter_name_or_file_stem(project: Path, home: Path) -> None:
    write(project / ".claude/agents/sec.md", agent_md("Security Architect"))
    for name in ("Security Architect", "security-architect", "SECURITY_ARCHITECT", "sec"):
        found = agentdefs.find(name, project, home)
        assert found is not None and found.name == "Security Architect", name
    assert agentdefs.find("architect", project, home) is None


def test_discover_keys_are_folded_names(project: Path, home: Path) -> None:
    write(project / ".aiwg/agents/sec.md", agent_md("Security Architect"))
    write(project / ".claude/agents/test_writer.md", "---\ndescription: tests\n---\nWrite.\n")
    assert list(agentdefs.discover(project, home)) == ["security-architect", "test-writer"]


def test_a_name_beats_a_later_stem(project: Path, home: Path) -> None:
    write(project / ".aiwg/agents/x.md", agent_md("reviewer", body="by name"))
    write(project / ".claude/agents/reviewer.md", agent_md("other", body="by stem"))
    found = agentdefs.scan(project, home)
    assert found.get("reviewer").system_prompt == "by name"
    assert found.get("other").system_prompt == "by stem"


# --- did you mean ------------------------------------------------------------------------------


def test_suggest_finds_close_names() -> None:
    known = ["security-architect", "test-writer", "Code Reviewer"]
    assert suggest("securty-architect", known) == "security-architect"
    assert suggest("code_reviewr", known) == "Code Reviewer"
    assert suggest("Test Writer", known) == "test-writer"
    assert suggest("database-admin", known) is None
    assert suggest("anything", []) is None


def test_unknown_message_lists_known_agents_and_bad_files(project: Path, home: Path) -> None:
    write(project / ".claude/agents/security-architect.md", agent_md("security-architect"))
    bad = write(project / ".claude/agents/broken.md", "---\nname: [unclosed\n---\nx\n")
    message = agentdefs.scan(project, home).unknown_message("securty-architect", ["shell"])
    assert "unknown agent 'securty-architect'" in message
    assert "did you mean 'security-architect'?" in message
    assert "known agents: security-architect, shell" in message
    assert str(bad) in message


# --- malformed files -------------------------------------------------------------------------

BAD_FILES = {
    "no-frontmatter.md": ("Just a prompt.\n", 1, "no YAML frontmatter"),
    "unclosed.md": ("---\nname: x\nbody without end\n", 1, "not closed"),
    "bad-yaml.md": ("---\nname: ok\ndescription: [oops\n---\nbody\n", 3, "invalid YAML"),
    "colon.md": ("---\nname: a\ndescription: a: b\nmodel: m\n---\nx\n", 3, "invalid YAML"),
    "list.md": ("---\n- a\n- b\n---\nbody\n", 2, "must be a mapping"),
    "tools-type.md": ("---\nname: t\ntools: 42\n---\nbody\n", 3, "'tools' must be"),
    "tool-item.md": ("---\nname: t\ntools:\n  - Read\n  - 3\n---\nb\n", 3, "entries must be"),
    "name-type.md": ("---\nname:\n  nested: true\n---\nbody\n", 2, "'name' must be a string"),
    "dup.md": ("---\nname: a\nmodel: x\nname: b\n---\nbody\n", 4, "duplicate key 'name'"),
    "empty-name.md": ("---\nname: '  '\n---\nbody\n", 2, "'name' is empty"),
}


@pytest.mark.parametrize("filename", sorted(BAD_FILES))
def test_malformed_file_error_names_file_and_line(project: Path, filename: str) -> None:
    text, line, needle = BAD_FILES[filename]
    path = write(project / filename, text)
    with pytest.raises(AgentDefinitionError) as caught:
        agentdefs.parse_file(path)
    error = caught.value
    assert error.path == path
    assert error.line == line
    assert needle in error.message
    assert str(error).startswith(f"{path}:{line}: error: ")
    diagnostic = error.to_diagnostic()
    assert (diagnostic.file, diagnostic.line) == (str(path), line)


def test_invalid_utf8_is_an_error_not_a_crash(project: Path) -> None:
    path = project / "binary.md"
    path.write_bytes(b"---\nname: \xff\xfe\n---\n")
    with pytest.raises(AgentDefinitionError, match="not valid UTF-8"):
        agentdefs.parse_file(path)


def test_bad_files_do_not_hide_good_ones(project: Path, home: Path) -> None:
    folder = project / ".claude/agents"
    for filename, (text, _line, _needle) in BAD_FILES.items():
        write(folder / filename, text)
    write(folder / "good.md", agent_md("good"))
    (folder / "binary.md").write_bytes(b"\xff\xfe\x00")
    found = agentdefs.scan(project, home)
    assert found.names() == ["good"]
    not_agents = {"no-frontmatter.md"}  # skipped, not an error: see the tests below
    assert sorted(e.path.name for e in found.errors) == sorted(
        [*(set(BAD_FILES) - not_agents), "binary.md"])
    assert [s.path.name for s in found.skipped] == ["no-frontmatter.md"]
    assert agentdefs.find("good", project, home) is not None
    assert agentdefs.discover(project, home).keys() == {"good"}


def test_error_is_a_dispatch_error() -> None:
    assert issubclass(AgentDefinitionError, DispatchError)
    error = AgentDefinitionError(Path("x.md"), None, "cannot read")
    assert str(error) == "x.md: error: cannot read"


# --- files that are not agents ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["<AGENT_NAME>", "{{ name }}", "${AGENT}", "<Name> Reviewer"])
def test_a_template_is_skipped_not_listed(project: Path, home: Path, name: str) -> None:
    write(project / ".claude/agents/agent-template.md",
          f"---\nname: {name!r}\ndescription: <DESCRIPTION>\nmodel: <MODEL>\n---\nbody\n")
    write(project / ".claude/agents/real.md", agent_md("real"))
    found = agentdefs.scan(project, home)
    assert found.names() == ["real"] and found.errors == ()
    [skipped] = found.skipped
    assert skipped.reason == agentdefs.TEMPLATE
    assert skipped.note() == f"skipped: template (placeholder name {name!r})"
    assert agentdefs.find("agent-template", project, home) is None
    with pytest.raises(agentdefs.NotAnAgentFile, match="is a placeholder"):
        agentdefs.parse_file(project / ".claude/agents/agent-template.md")


def test_names_with_angle_free_text_are_not_templates() -> None:
    for name in ("Security Architect", "a<b", "C++ <=> Rust", "ToolSmith (Dynamic)"):
        assert not agentdefs.is_placeholder(name), name
    assert agentdefs.is_placeholder("<AGENT_NAME>")
    assert agentdefs.is_placeholder("<MODEL:sonnet | opus>")


def test_files_without_frontmatter_are_skipped_and_named_when_asked_for(
        project: Path, home: Path) -> None:
    write(project / ".claude/agents/openai-compat.md", "# OpenAI/Codex Agent Compatibility\n")
    found = agentdefs.scan(project, home)
    assert found.names() == [] and found.errors == ()
    assert [(s.path.name, s.reason) for s in found.skipped] == [
        ("openai-compat.md", agentdefs.NO_FRONTMATTER)]
    message = found.unknown_message("openai-compat")
    assert "openai-compat.md is not an agent definition (skipped: no frontmatter" in message
