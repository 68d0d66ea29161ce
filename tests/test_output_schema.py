"""`output_schema` (issue 14 §1): the schema checked at load time with file:line errors,
passed natively to the clients that take one (the real claude, codex and llm against
their stubs, the openai runner's request body), appended to other agents' prompts, and
the answer validated: a mismatch fails the attempt and the retry's prompt says why."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from contract.clients import (
    configure_claude,
    configure_codex,
    configure_llm,
    configure_openai,
    configure_opencode,
)
from contract.common import client, new_project
from preset_support import AgentProject
from stubs.anthropic import AnthropicStub
from stubs.openai_chat import OpenAIChatStub
from stubs.openai_responses import ResponsesStub
from support import Project

SCHEMA = {"type": "object", "required": ["verdict", "count"],
          "properties": {"verdict": {"type": "string"}, "count": {"type": "integer"}}}
ANSWER = '{"verdict": "ok", "count": 2}'
CANONICAL = '{\n  "count": 2,\n  "verdict": "ok"\n}\n'
"""The output file: the answer pretty-printed with sorted keys."""


def schema_task(ap: AgentProject, agent: str = "reviewer") -> None:
    ap.tasks(f"""\
        tasks:
          - id: a
            agent: {agent}
            prompt: Review the login flow
            output: a.json
            output_schema: {json.dumps(SCHEMA)}
    """)


def ran_ok(ap: AgentProject) -> dict[str, Any]:
    proc = ap.run("t.yaml")
    assert proc.returncode == 0, proc.stderr
    assert ap.output("a.json") == CANONICAL
    task = ap.task("a")
    assert task["schema"] == {"ok": True, "error": None}
    return task


# --- native: the real clients, each on its stub ----------------------------------------------


@pytest.fixture
def ap(tmp_path: Path) -> AgentProject:
    return new_project(tmp_path)


def test_claude_gets_json_schema_and_its_structured_output_is_the_answer(
        ap: AgentProject, tmp_path: Path) -> None:
    client("claude")
    with AnthropicStub.running(text=ANSWER) as stub:
        stub.behave("tool:StructuredOutput")  # the model answers through the tool
        configure_claude(ap, stub)
        schema_task(ap)
        task = ran_ok(ap)
        first = stub.messages()[0]
        (tool,) = [t for t in first.body["tools"] if t.get("name") == "StructuredOutput"]
        assert tool["input_schema"] == SCHEMA
    log = Path(task["log_path"]).read_text()
    assert "--json-schema" in log and '"structured_output"' in log
    # claude enforces the schema itself: the prompt carries no copy of it
    assert "Answer with JSON only" not in json.dumps(first.body["messages"])


def test_codex_gets_output_schema_file(ap: AgentProject) -> None:
    client("codex")
    with ResponsesStub.running(text=ANSWER) as stub:
        configure_codex(ap, stub)
        schema_task(ap)
        ran_ok(ap)
        (call,) = stub.model_calls()
    fmt = call.body["text"]["format"]
    assert fmt["type"] == "json_schema" and fmt["schema"]["properties"] == SCHEMA["properties"]
    log = Path(ap.task("a")["log_path"]).read_text()
    assert "'--output-schema'" in log and "output-schema.json" in log


def test_llm_gets_schema(ap: AgentProject) -> None:
    """A model declared with `supports_schema: true` (extra-openai-models.yaml) is given
    `--schema`: llm sends it as `response_format`."""
    client("llm")
    with OpenAIChatStub.running(text=ANSWER) as stub:
        configure_llm(ap, stub)
        models = Path(ap.env["LLM_USER_PATH"]) / "extra-openai-models.yaml"
        models.write_text(models.read_text() + "  supports_schema: true\n")
        schema_task(ap)
        ran_ok(ap)
        (call,) = stub.model_calls()
    fmt = call.body["response_format"]
    assert fmt["type"] == "json_schema"
    assert fmt["json_schema"]["schema"]["properties"] == SCHEMA["properties"]
    assert "Answer with JSON only" not in json.dumps(call.body["messages"])


def test_llm_model_without_schema_support_gets_it_in_the_prompt(ap: AgentProject) -> None:
    """llm refuses `--schema` for a model that cannot take one ("does not support
    schemas"): the same attempt runs again with the schema in the prompt."""
    client("llm")
    with OpenAIChatStub.running(text=f"Here:\n```json\n{ANSWER}\n```") as stub:
        configure_llm(ap, stub)
        schema_task(ap)
        task = ran_ok(ap)
        (call,) = stub.model_calls()
    assert "response_format" not in call.body
    user = json.dumps(call.body["messages"])
    assert "Answer with JSON only" in user and "verdict" in user
    assert task["attempts"] == 1


def test_opencode_is_told_the_schema_in_the_prompt_and_its_answer_is_checked(
        ap: AgentProject) -> None:
    """opencode has no schema flag: the schema goes into the prompt, and the answer,
    fenced in prose as a model may give it, is validated and rewritten."""
    client("opencode")
    with OpenAIChatStub.running(text=f"Here it is:\n```json\n{ANSWER}\n```\nDone.") as stub:
        configure_opencode(ap, stub)
        schema_task(ap)
        ran_ok(ap)
        told = [c for c in stub.model_calls() if "Answer with JSON only" in json.dumps(c.body)]
    assert told and '\\"verdict\\"' in json.dumps(told[0].body), told


def test_openai_runner_sends_response_format(ap: AgentProject) -> None:
    with OpenAIChatStub.running(text=ANSWER) as stub:
        configure_openai(ap, stub)
        schema_task(ap)
        ran_ok(ap)
        (call,) = stub.model_calls()
    assert call.body["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "output", "schema": SCHEMA}}
    user = call.body["messages"][-1]["content"]
    assert "Answer with JSON only" not in user


# --- appended to the prompt: a command agent, mismatch, retry ----------------------------------

ANSWERER = """\
cat > "$DISPATCH_PROJECT/prompt.$DISPATCH_TASK_ID.$DISPATCH_ATTEMPT.txt"
if [ "$DISPATCH_ATTEMPT" = 1 ]; then
  echo '{"verdict": 3}'
else
  printf 'Here it is:\\n```json\\n{"verdict": "ok", "count": 2}\\n```\\n'
fi
"""
"""Answers wrong the first time, then right inside prose and a fence; keeps each prompt."""


@pytest.fixture
def answerer(project: Project) -> Iterator[Project]:
    project.write("answer.sh", ANSWERER)
    project.write(".aiwg/dispatch.toml", '[agents.answerer]\ncommand = ["sh", "answer.sh"]\n')
    yield project


def test_mismatch_fails_the_attempt_and_the_retry_is_told_why(answerer: Project) -> None:
    answerer.write("schemas/review.json", json.dumps(SCHEMA, indent=2))
    answerer.write("t.yaml", textwrap.dedent("""\
        tasks:
          - {id: a, agent: answerer, prompt: Review it., output: a.json, retries: 1,
             output_schema: schemas/review.json}
          - {id: b, agent: answerer, prompt: Summarise., output: b.json, dependencies: [a]}
        settings: {retry_backoff: 0}
    """))
    proc = answerer.run("t.yaml")
    assert proc.returncode == 0, proc.stderr
    assert "output does not match output_schema" in proc.stderr
    out = answerer.root / ".aiwg/working"
    assert (out / "a.json").read_text() == CANONICAL  # the fenced JSON, canonical
    first = (answerer.root / "prompt.a.1.txt").read_text()
    second = (answerer.root / "prompt.a.2.txt").read_text()
    assert first.startswith("Review it.")
    assert "Answer with JSON only" in first and '"verdict"' in first
    assert "previous answer" not in first
    assert "Your previous answer did not match the schema:" in second
    assert "- $.verdict: 3 is not of type 'string'" in second
    assert "- $: 'count' is a required property" in second
    # the dependent gets the checked JSON inline, fenced as JSON
    assert "```json\n" + CANONICAL in (answerer.root / "prompt.b.1.txt").read_text()
    report = answerer.report()
    a = next(t for t in report["tasks"] if t["id"] == "a")
    assert a["attempts"] == 2 and a["schema"] == {"ok": True, "error": None}
    assert all("schema" not in t for t in report["tasks"] if t["id"] == "b")
    md = (out / "dispatch-report.md").read_text()
    assert "| a | answerer |" in md and "schema ✓" in md
    # the rejected answer is kept for reading
    assert (out / "logs/a.failed.out").read_text() == '{"verdict": 3}\n'


def test_mismatch_without_retries_fails_and_the_reports_say_why(answerer: Project) -> None:
    answerer.write("t.yaml", textwrap.dedent(f"""\
        tasks:
          - id: a
            agent: answerer
            prompt: Review it.
            output: a.json
            output_schema: {json.dumps(SCHEMA)}
    """))
    proc = answerer.run("t.yaml")
    assert proc.returncode == 1
    out = answerer.root / ".aiwg/working"
    assert not (out / "a.json").exists()  # a wrong answer is never promoted
    (a,) = answerer.report()["tasks"]
    assert a["status"] == "failed"
    assert a["schema"]["ok"] is False
    assert a["schema"]["error"].startswith("$.verdict: 3 is not of type 'string'")
    md = (out / "dispatch-report.md").read_text()
    assert "schema ✗ $.verdict: 3 is not of type 'string'" in md


def test_shell_agent_answer_is_checked_and_gets_the_schema_file(project: Project) -> None:
    """The shell agent's prompt is a script: nothing is appended; $DISPATCH_OUTPUT_SCHEMA
    names the schema as a file."""
    project.write("t.yaml", textwrap.dedent(f"""\
        tasks:
          - id: a
            agent: shell
            prompt: |
              cp "$DISPATCH_OUTPUT_SCHEMA" "$DISPATCH_PROJECT/seen-schema.json"
              echo '{ANSWER}'
            output: a.json
            output_schema: {json.dumps(SCHEMA)}
    """))
    proc = project.run("t.yaml")
    assert proc.returncode == 0, proc.stderr
    assert (project.root / ".aiwg/working/a.json").read_text() == CANONICAL
    assert json.loads((project.root / "seen-schema.json").read_text()) == SCHEMA


# --- validation --------------------------------------------------------------------------------


def test_invalid_schemas_exit_2_with_file_and_line(project: Project) -> None:
    project.write("schemas/bad.json", '{\n  "type": "object",\n  "properties": {"x": '
                                      '{"minimum": "no"}}\n}\n')
    project.write("schemas/broken.json", '{\n  "type": "object",\n  "properties": {"x": 1\n')
    project.write("t.yaml", textwrap.dedent("""\
        tasks:
          - id: inline
            agent: shell
            prompt: echo 1
            output: a.json
            output_schema:
              type: object
              properties:
                x: {type: intger}
          - {id: missing, agent: shell, prompt: echo 1, output: b.json,
             output_schema: schemas/nope.json}
          - {id: invalid, agent: shell, prompt: echo 1, output: c.json,
             output_schema: schemas/bad.json}
          - {id: broken, agent: shell, prompt: echo 1, output: d.json,
             output_schema: schemas/broken.json}
          - {id: folder, agent: shell, prompt: echo 1, output: e/, output_schema: {}}
          - {id: shape, agent: shell, prompt: echo 1, output: f.json, output_schema: [1]}
    """))
    proc = project.run("validate", "t.yaml")
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    assert ("t.yaml:9:19: error: task 'inline': output_schema: not a valid JSON Schema at "
            "properties/x/type:") in err
    assert "t.yaml:11:" in err and "task 'missing': output_schema: schemas/nope.json: file " \
        "not found" in err
    assert ("t.yaml:13:" in err and "task 'invalid': output_schema: schemas/bad.json:3: not a "
            "valid JSON Schema at properties/x/minimum: 'no' is not of type 'number'") in err
    assert "task 'broken': output_schema: schemas/broken.json:3: invalid YAML" in err
    assert "t.yaml:16:" in err and "task 'folder': output_schema needs a file output" in err
    assert "t.yaml:17:" in err and "task 'shape': 'output_schema': give a JSON Schema" in err
    assert "6 errors in t.yaml" in err


def test_schema_file_outside_the_project_is_refused(
        project: Project, tmp_path_factory: pytest.TempPathFactory) -> None:
    outside = tmp_path_factory.mktemp("elsewhere") / "schema.json"
    outside.write_text(json.dumps(SCHEMA))
    project.write("t.yaml", "tasks:\n  - {id: a, agent: shell, prompt: echo 1, output: a.json,"
                            f" output_schema: {outside}}}\n")
    proc = project.run("validate", "t.yaml")
    assert proc.returncode == 2
    assert "t.yaml:2:" in proc.stderr and "outside the project" in proc.stderr


def test_editor_schema_covers_output_schema(project: Project) -> None:
    proc = project.run("schema")
    assert proc.returncode == 0, proc.stderr
    prop = json.loads(proc.stdout)["$defs"]["Task"]["properties"]["output_schema"]
    assert {"type": "object", "additionalProperties": True} in prop["anyOf"]
    assert {"type": "string"} in prop["anyOf"]


def test_lenient_parsing_only_for_agents_told_in_the_prompt() -> None:
    from parallel_dispatch.output_schema import check_answer

    prose = 'Sure!\n```json\n{"verdict": "ok", "count": 2}\n```\nAnything else?'
    assert check_answer(prose, SCHEMA, lenient=True) == (CANONICAL, [])
    text, errors = check_answer(prose, SCHEMA, lenient=False)
    assert text is None and errors[0].startswith("$: the answer is not JSON")
    assert check_answer("", SCHEMA, lenient=True)[1] == ["$: the answer is empty"]


def test_a_local_ref_to_nothing_is_an_error_before_any_agent_runs(project: Project) -> None:
    """Without this check the schema loads, the agent runs (and is paid), and only its
    answer's check finds the dangling pointer."""
    project.write("t.yaml", textwrap.dedent("""\
        tasks:
          - id: dangling
            agent: shell
            prompt: echo 1
            output: a.json
            output_schema:
              type: object
              properties:
                x: {$ref: "#/$defs/nope"}
    """))
    proc = project.run("validate", "t.yaml")
    assert proc.returncode == 2, proc.stderr
    assert "t.yaml:9:" in proc.stderr, proc.stderr
    assert "$ref '#/$defs/nope' at properties/x/$ref points at nothing" in proc.stderr
