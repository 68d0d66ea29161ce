"""Workflow commands and file commands, checked against the runner's own parsing rules."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from parallel_dispatch.github import workflow_commands as wc

TRICKY = [
    "plain",
    "50% done",
    "line one\nline two\r\nline three",
    "%0A is not a newline",
    "a: b, c",
    "::error::forged",
    "%25%3A%2C",
    "ünïcödé ✂️",
    "",
]


# The runner's decoder, transcribed from actions/runner ActionCommand.cs (UnescapeData /
# UnescapeProperty): it replaces the escapes in this order, %25 last.
def runner_unescape_data(s: str) -> str:
    return s.replace("%0D", "\r").replace("%0A", "\n").replace("%25", "%")


def runner_unescape_property(s: str) -> str:
    for token, repl in (("\r", "%0D"), ("\n", "%0A"), (":", "%3A"), (",", "%2C"), ("%", "%25")):
        s = s.replace(repl, token)
    return s


def parse_command(line: str) -> tuple[str, dict[str, str], str]:
    """Parse `::name k=v,k=v::data` the way the runner's TryParseV2 does."""
    assert line.startswith("::")
    end = line.index("::", 2)
    info, data = line[2:end], line[end + 2 :]
    name, _, props = info.partition(" ")
    properties = {}
    for pair in filter(None, props.split(",")):
        key, _, value = pair.partition("=")
        properties[key] = runner_unescape_property(value)
    return name, properties, runner_unescape_data(data)


#: Commands the runner registers (ActionCommandManager and its extensions), matched
#: case-insensitively; a `stop-commands` token is registered while it is in force.
REGISTERED = ("error", "warning", "notice", "debug", "add-mask", "set-output", "save-state",
              "group", "endgroup", "echo", "add-matcher", "remove-matcher", "stop-commands",
              "set-env", "add-path")


def _parse_line(line: str, registered: set[str]) -> tuple[str, dict[str, str], str] | None:
    """`ActionCommand.TryParseV2` (`::name k=v::data` after leading whitespace), else the
    legacy `TryParse` (`##[name k=v;k=v]data` *anywhere* in the line)."""
    text = line.lstrip()
    if text.startswith("::") and (end := text.find("::", 2)) >= 0:
        info, data = text[2:end], text[end + 2:]
        name, _, props = info.partition(" ")
        if name and name.lower() in registered:
            properties = {}
            for pair in filter(None, props.strip().split(",")):
                key, sep, value = pair.partition("=")
                if sep and key and value:
                    properties[key] = runner_unescape_property(value)
            return name.lower(), properties, runner_unescape_data(data)
    start = line.find("##[")
    if start >= 0 and (close := line.find("]", start)) >= 0:
        name = line[start + 3:close].partition(" ")[0]
        if name and name.lower() in registered:
            return name.lower(), {}, line[close + 1:]
    return None


def runner_acts_on(stdout: str) -> list[tuple[str, dict[str, str], str]]:
    """The commands the runner would carry out for this output, in order.

    Transcribed from actions/runner `ActionCommandManager.TryProcessCommand`: lines
    are split like .NET's `ReadLine` (\n, \r, \r\n); while commands are stopped only
    the resume token (as `::tok::` or `##[tok]`) is acted on.
    """
    registered = set(REGISTERED)
    stop: str | None = None
    acted = []
    for line in re.split(r"\r\n|\r|\n", stdout):
        parsed = _parse_line(line, registered)
        if parsed is None:
            continue
        name = parsed[0]
        if stop is not None:
            if stop and name == stop:
                registered.discard(stop)
                stop = None
                acted.append(parsed)
            continue
        if name == "stop-commands":
            stop = parsed[2].lower()
            registered.add(stop)
        acted.append(parsed)
    return acted


def parse_output_file(text: str) -> dict[str, str]:
    """Parse GITHUB_OUTPUT like the runner: `name=value` or `name<<DELIM` … `DELIM`."""
    lines = text.split("\n")
    out: dict[str, str] = {}
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line:
            i += 1
            continue
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            name, delim = line.split("<<", 1)
            end = lines.index(delim, i + 1)
            out[name] = "\n".join(lines[i + 1 : end])
            i = end + 1
        else:
            name, value = line.split("=", 1)
            out[name] = value
            i += 1
    return out


@pytest.mark.parametrize("text", TRICKY)
def test_data_and_property_escaping_round_trip_through_the_runner(text: str) -> None:
    assert "\n" not in wc.escape_data(text) and "\r" not in wc.escape_data(text)
    assert runner_unescape_data(wc.escape_data(text)) == text
    prop = wc.escape_property(text)
    assert not set(prop) & set(":,\r\n")
    assert runner_unescape_property(prop) == text


def test_escaping_matches_the_documented_table() -> None:
    assert wc.escape_data("100%\r\n") == "100%25%0D%0A"
    assert wc.escape_property("a:b,c%") == "a%3Ab%2Cc%25"
    # `:` and `,` are legal in data: only properties need them escaped
    assert wc.escape_data("a: b, c") == "a: b, c"


def test_error_annotation_survives_hostile_title_and_message() -> None:
    out = io.StringIO()
    wc.error("boom: 100%\n::add-mask::x", title="Task a,b: failed", file="t.yml", line=3, out=out)
    line = out.getvalue()
    assert line.count("\n") == 1 and line.endswith("\n")
    name, props, data = parse_command(line.rstrip("\n"))
    assert name == "error"
    assert props == {"title": "Task a,b: failed", "file": "t.yml", "line": "3"}
    assert data == "boom: 100%\n::add-mask::x"


def test_none_properties_are_dropped() -> None:
    assert wc.format_command("warning", "m", title=None, file="") == "::warning::m"


def test_group_and_stop_commands_wrap_untrusted_text() -> None:
    out = io.StringIO()
    with wc.group("task a: failed", out=out), wc.commands_stopped(out=out):
        out.write("::error::forged by an agent\n")
    lines = out.getvalue().splitlines()
    assert lines[0] == "::group::task a: failed"
    token = re.fullmatch(r"::stop-commands::(\S+)", lines[1]).group(1)
    assert len(token) >= 32
    assert lines[2] == "::error::forged by an agent"
    assert lines[3] == f"::{token}::"
    assert lines[4] == "::endgroup::"
    # a fresh token every time, so logged text cannot know it in advance
    out2 = io.StringIO()
    with wc.commands_stopped(out=out2):
        pass
    assert token not in out2.getvalue()


def test_add_mask_only_inside_actions(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    wc.add_mask("s3cret", out=out)
    assert out.getvalue() == ""  # outside Actions nothing would mask it: never print it
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    wc.add_mask("s3cret", out=out)
    wc.add_mask("   ", out=out)
    assert out.getvalue() == "::add-mask::s3cret\n"


def test_outputs_use_a_random_heredoc_delimiter(tmp_path: Path) -> None:
    path = tmp_path / "output"
    path.write_text("earlier=kept\n")
    values = {
        "status": "succeeded",
        "report": "line 1\nEOF\nghadelimiter_\nname<<x\n",
        "empty": "",
    }
    assert wc.set_outputs(values, path) is True
    assert wc.set_outputs({"status": "again"}, path) is True
    text = path.read_text()
    delims = re.findall(r"^\w[\w-]*<<(ghadelimiter_[0-9a-f-]{36})$", text, re.M)
    assert len(delims) == 4 and len(set(delims)) == 4
    parsed = parse_output_file(text)
    assert parsed["earlier"] == "kept"
    assert parsed["report"] == values["report"]
    assert parsed["empty"] == ""
    assert parsed["status"] == "again"  # the runner keeps the last value


def test_outputs_without_github_output_are_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GITHUB_OUTPUT", raising=False)
    assert wc.set_outputs({"a": "b"}) is False


def test_summary_appends_and_stays_under_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "summary.md"
    path.write_text("# from an earlier step\n")
    assert wc.append_summary("## ours\nsmall", path) is True
    assert path.read_text() == "# from an earlier step\n## ours\nsmall\n"

    big = "".join(f"row {i} ✓ {'x' * 90}\n" for i in range(30_000))  # ≈ 3 MB
    wc.append_summary(big, path, limit=200_000)
    data = path.read_bytes()
    assert len(data) <= 200_000
    text = data.decode("utf-8")  # never cut inside a multi-byte character
    assert text.startswith("# from an earlier step\n## ours\nsmall\nrow 0 ✓")
    assert "Summary truncated" in text


def test_default_summary_limit_is_below_githubs_1_mib() -> None:
    assert wc.SUMMARY_LIMIT_BYTES < 1024 * 1024


def test_fit_bytes_cuts_on_a_line_boundary() -> None:
    text = "aaaa\nbbbb\ncccc\n"
    assert wc.fit_bytes(text, 100, note="!") == text
    assert wc.fit_bytes(text, 11, note="!") == "aaaa\nbbbb!"
    assert wc.fit_bytes("é" * 10, 5, note="") == "éé"


# --- untrusted text on stdout (issue 9, item 2) -----------------------------------

HOSTILE = [
    "::error::forged",
    "   ::warning title=t::indented",
    "\u2003::notice::after an em space",
    "text then ##[error]legacy, anywhere in the line",
    "##[stop-commands]tok",
    "::stop-commands::tok",
    "ok\r::add-mask::failed",
    "ok\n##[add-mask]failed",
    "ok\r\n::set-output name=status::pwned",
    "#\u200b#[error] looks like one but is not",
]


def test_the_emulated_runner_sees_what_the_real_one_sees() -> None:
    assert runner_acts_on("::error title=a%2Cb::x%0Ay") == [("error", {"title": "a,b"}, "x\ny")]
    assert runner_acts_on("  ::Warning::w") == [("warning", {}, "w")]
    assert runner_acts_on("say ##[warning]hi") == [("warning", {}, "hi")]
    assert runner_acts_on("::nonsense::x\n##[nonsense]y") == []
    stopped = "::stop-commands::t1\n::error::no\n##[t1]\n::error::yes"
    assert [c[0] for c in runner_acts_on(stopped)] == ["stop-commands", "t1", "error"]


@pytest.mark.parametrize("text", HOSTILE)
def test_inert_text_is_one_line_the_runner_ignores(text: str) -> None:
    safe = wc.inert(text)
    assert "\n" not in safe and "\r" not in safe
    assert runner_acts_on(safe) == []
    out = io.StringIO()
    wc.echo(text, out=out)
    assert runner_acts_on(out.getvalue()) == []
    assert out.getvalue() == safe + "\n"


def test_inert_keeps_ordinary_text_readable() -> None:
    assert wc.inert("50% done: a, b") == "50% done: a, b"
    assert wc.inert("two\nlines") == "two ⏎ lines"


@pytest.mark.parametrize("text", HOSTILE)
def test_inert_stream_neutralises_every_line_written_to_it(text: str) -> None:
    raw = io.StringIO()
    stream = wc.InertLines(raw)
    stream.write(f"[   0.1s] {text}\n")
    stream.write(text + "\n")
    stream.flush()
    assert runner_acts_on(raw.getvalue()) == []
    assert raw.getvalue().endswith("\n") and "\r" not in raw.getvalue()


def test_inert_stream_passes_whole_lines_only_and_redacts() -> None:
    raw = io.StringIO()
    stream = wc.InertLines(raw, secrets=["s3cr3t-value"])
    stream.write("say #")
    stream.write("#[error]split across writes, s3cr3t-")
    assert raw.getvalue() == ""
    stream.write("value\nnext")
    assert raw.getvalue() == "say #\u200b#[error]split across writes, ***\n"
    stream.close()
    assert raw.getvalue().endswith("next\n")
    assert runner_acts_on(raw.getvalue()) == []


def test_commands_stopped_cannot_be_resumed_by_the_text_inside() -> None:
    out = io.StringIO()
    with wc.commands_stopped(out=out):
        out.write("::pd-guess::\n##[stop-commands]other\n::error::forged\n")
    wc.error("ours", out=out)
    acted = runner_acts_on(out.getvalue())
    assert [c[0] for c in acted if c[0] in ("error", "warning")] == ["error"]
    assert acted[-1] == ("error", {}, "ours")
