"""`output_schema`: a task's answer is JSON that must match a JSON Schema.

Three moments (README "Checked outputs: output_schema"):

* loading (loader.py): the schema itself is checked (Draft 2020-12 unless its `$schema`
  names another draft), inline or from a file relative to the task file; the loader puts
  the parsed schema in the task, so runners, fingerprints and fan-outs carry the schema,
  not its path;
* prompting (`prompt_note`): runners whose client constrains the answer itself (claude
  `--json-schema`, codex `--output-schema`, llm `--schema`, the OpenAI runner's
  `response_format`) are given the schema natively; every other agent gets it appended to
  its prompt with an instruction to answer with JSON only.  A retry after a mismatch adds
  the errors ("Your previous answer did not match the schema: ...");
* checking (`check_output`, called by `AttemptRunner.run` before promoting): the staged
  output is parsed and validated; a mismatch fails the attempt (retryable) with the first
  errors quoted; a match is rewritten as pretty-printed JSON with sorted keys.

`jsonschema` is imported only when a task has a schema: other files load without it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jsonschema.protocols import Validator

MISMATCH = "output does not match output_schema"
"""How a mismatch error starts (after the runner's prefix): the report finds it by this."""
SCHEMA_FILE = "output-schema.json"
"""The schema as a file in the attempt's staging folder (codex `--output-schema`,
`$DISPATCH_OUTPUT_SCHEMA`)."""
SHOWN_ERRORS = 3
"""Validation errors quoted in a failed attempt's error and the retry's prompt."""
MAX_OUTPUT_BYTES = 16 * 2**20
"""An answer larger than this is not parsed: no schema-checked result is that big."""


class SchemaUnusable(Exception):
    """The schema could not be applied (an unresolvable `$ref`): no retry can help."""


def validator(schema: Mapping[str, Any]) -> Validator:
    """The validator for `schema`: its `$schema` draft, else Draft 2020-12."""
    from jsonschema.validators import Draft202012Validator, validator_for

    cls = validator_for(schema, default=Draft202012Validator)
    return cls(schema)


def schema_problems(schema: Any) -> list[tuple[tuple[str | int, ...], str]]:
    """What is wrong with `schema` as a JSON Schema: (path inside it, message) pairs,
    the most relevant first; empty when it is a usable schema."""
    if not isinstance(schema, dict):
        return [((), f"a JSON Schema must be a mapping (got {type(schema).__name__})")]
    from jsonschema.exceptions import best_match
    from jsonschema.validators import Draft202012Validator, validator_for

    try:
        cls = validator_for(schema, default=Draft202012Validator)
    except Exception as exc:  # an unknown `$schema` URI
        return [(("$schema",), f"unknown $schema: {exc}")]
    errors = list(cls(cls.META_SCHEMA).iter_errors(schema))
    if not errors:
        return _dangling_refs(schema)
    first = best_match(errors)
    where = tuple(first.path)
    path = "/".join(str(p) for p in where)
    return [(where, f"not a valid JSON Schema{f' at {path}' if path else ''}: "
                    f"{_clip(first.message)}")]


def _dangling_refs(schema: dict[str, Any]) -> list[tuple[tuple[str | int, ...], str]]:
    """A local `$ref` ("#/…") that points at nothing: found now, not after an agent's
    paid attempt (remote references are never fetched; they fail at run time)."""
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    base = "urn:parallel-dispatch:output-schema"
    resource = Resource.from_contents(schema, default_specification=DRAFT202012)
    resolver = Registry().with_resource(base, resource).resolver(base_uri=base)
    for where, ref in _local_refs(schema, ()):
        try:
            resolver.lookup(ref)
        except Exception:
            path = "/".join(str(p) for p in where)
            return [(where, f"$ref {ref!r}{f' at {path}' if path else ''} points at nothing "
                            "in this schema; fix the pointer or add the definition")]
    return []


def _local_refs(node: Any, where: tuple[str | int, ...]
                ) -> list[tuple[tuple[str | int, ...], str]]:
    """Every `$ref` starting with `#`, with its path inside the schema."""
    out: list[tuple[tuple[str | int, ...], str]] = []
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            out.append(((*where, "$ref"), ref))
        for key, value in node.items():
            if key not in ("const", "enum", "examples", "default"):
                out += _local_refs(value, (*where, key))
    elif isinstance(node, list):
        for n, value in enumerate(node):
            out += _local_refs(value, (*where, n))
    return out


def parse_answer(text: str, lenient: bool) -> Any:
    """The JSON an agent answered.  `lenient` (agents told in the prompt, whose clients
    do not enforce the format): also the last ```json (or ```) fenced block that parses,
    else the span from the first `{`/`[` to the last `}`/`]`.  Raises ValueError."""
    stripped = text.strip()
    if not stripped:
        raise ValueError("the answer is empty")
    try:
        return json.loads(stripped)
    except ValueError as exc:
        error = exc
    if lenient:
        for block in reversed(_FENCED.findall(stripped)):
            try:
                return json.loads(block)
            except ValueError:
                continue
        starts = [i for i in (stripped.find("{"), stripped.find("[")) if i >= 0]
        end = max(stripped.rfind("}"), stripped.rfind("]"))
        if starts and end > min(starts):
            try:
                return json.loads(stripped[min(starts):end + 1])
            except ValueError:
                pass
    raise ValueError(f"the answer is not JSON ({error}); it starts "
                     f"{_clip(stripped, 60)!r}")


_FENCED = re.compile(r"```(?:json|JSON)?[ \t]*\n(.*?)\n[ \t]*```", re.DOTALL)


def mismatches(value: Any, schema: Mapping[str, Any]) -> list[str]:
    """The first `SHOWN_ERRORS` ways `value` does not match, each with its JSON path."""
    from jsonschema.exceptions import relevance

    errors = sorted(validator(schema).iter_errors(value), key=relevance)
    shown = []
    for err in errors[:SHOWN_ERRORS]:
        shown.append(f"{err.json_path}: {_clip(err.message)}")
    if len(errors) > SHOWN_ERRORS:
        shown.append(f"… and {len(errors) - SHOWN_ERRORS} more")
    return shown


def canonical(value: Any) -> str:
    """The output file's text: pretty-printed, keys sorted, so reruns diff cleanly."""
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def schema_text(schema: Mapping[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False)


def prompt_note(schema: Mapping[str, Any], native: bool, previous: Iterable[str] = ()) -> str:
    """What is appended to the prompt: the schema and the instruction (unless the client
    enforces the schema itself), and a retry's reasons.  Empty when nothing is to say."""
    parts = []
    if not native:
        parts.append("## Answer format\n\nAnswer with JSON only: one JSON value that matches "
                     "this JSON Schema, with no prose and no code fence around it.\n\n"
                     f"```json\n{schema_text(schema)}\n```")
    errors = list(previous)
    if errors:
        listed = "\n".join(f"- {e}" for e in errors)
        parts.append(f"Your previous answer did not match the schema:\n{listed}\n\n"
                     "Answer again, matching the schema exactly.")
    return "\n\n---\n\n" + "\n\n".join(parts) if parts else ""


def check_answer(text: str, schema: Mapping[str, Any], lenient: bool
                 ) -> tuple[str | None, list[str]]:
    """(the output's canonical text, []) when `text` matches; else (None, the errors).
    Raises `SchemaUnusable` when the schema cannot be applied."""
    try:
        value = parse_answer(text, lenient)
    except ValueError as exc:
        return None, [f"$: {exc}"]
    try:
        errors = mismatches(value, schema)
    except RecursionError:  # `$ref`s that lead back to themselves without a check between
        raise SchemaUnusable("the schema cannot be applied: it recurses without end (a $ref "
                             "that leads back to itself?)") from None
    except Exception as exc:  # an unresolvable $ref: the schema, not the answer, is wrong
        raise SchemaUnusable(f"the schema cannot be applied: {_clip(str(exc))}") from None
    return (None, errors) if errors else (canonical(value), [])


def _clip(text: str, n: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 1] + "…"
