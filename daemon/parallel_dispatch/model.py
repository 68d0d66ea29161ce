"""The task-file format: the reference's keys, plus a few opt-in extensions.

Models forbid unknown keys so that a typo (`dependancies`) is an error instead
of a silently ignored setting.  Field constraints carry the user-facing limits.
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    model_validator,
)

OnFailure = Literal["continue", "stop", "retry"]
InputsMode = Literal["none", "paths", "inline"]
Isolation = Literal["none", "worktree"]
MergeMode = Literal["none", "apply", "branch"]

# Upper bounds: a value past them is a mistake, and would otherwise pass validation
# and fail at run time (a float overflow, a name the file system refuses, a backoff
# that never ends).  README "Limits" lists them.
MAX_TIMEOUT_MS = 30 * 24 * 3600 * 1000
"""30 days: the longest `timeout`/`idle_timeout`; use it for 'practically none'."""
MAX_PARALLEL = 10_000
MAX_QUOTA_WAIT_MS = 7 * 24 * 3600 * 1000
"""A week: the longest usage window a provider resets (codex's weekly allowance)."""
MAX_RETRIES = 100
MAX_BACKOFF_S = 3600.0
"""The base of the exponential backoff; `retry_backoff: .inf` would never retry."""
MAX_ID_CHARS = 200
"""Ids name files (`logs/<id>.log`, `<id>.failed.out`): file names end at 255 bytes."""
MAX_NAME_BYTES = 200
"""Each component of an output path: staging adds up to ~40 bytes to the last one."""
MAX_PATH_BYTES = 4000
"""The output's whole path, under Linux's PATH_MAX (4,096) with room for staging."""
MAX_ARG_BYTES = 128 * 1024 - 1
"""Linux refuses a single argument of 128 KiB or more (MAX_ARG_STRLEN, E2BIG)."""

PositiveMs = Annotated[StrictInt, Field(gt=0, le=MAX_TIMEOUT_MS)]

RESERVED_OUTPUTS = ("dispatch-report.md", "dispatch-report.json", "logs", "changes")
"""Top-level names in the output dir that dispatch writes itself; so is every name
starting with `.dispatch` (state, journal, staging, their temporary files)."""
STAGED_NAME = re.compile(r"^\..+\.\d{8}T\d{6}Z-[0-9a-f]+\.\d+\.partial$")
"""A staged file output (`.<name>.<run id>.<attempt>.partial`), removed after each run."""


def _usable_dir(path: str) -> str:
    """A directory the run could create: no NUL (no system call takes one), and no
    `~user` for a user this machine does not have (it would stay a literal folder)."""
    if "\0" in path:
        raise ValueError("a path cannot hold a NUL character; remove it")
    head = path.split("/", 1)[0]
    if head.startswith("~") and os.path.expanduser(head) == head:
        raise ValueError(f"there is no user {head[1:]!r} here, so {head!r} cannot be "
                         "expanded; give the folder's path")
    return path


def _relative_glob(pattern: str) -> str:
    parts = pattern.split("/")
    if pattern.startswith(("/", "~")) or ".." in parts:
        raise ValueError(f"{pattern!r} must be relative to the project root and stay inside "
                         "it (no leading '/' or '~', no '..')")
    return pattern


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VerifyShell(_Strict):
    """`verify: {shell: "make test"}`: a command line for /bin/sh -c, said explicitly (a
    bare string is refused: an argv list is the default, as for agents)."""

    shell: Annotated[StrictStr, Field(min_length=1)] = Field(
        description="Command line run through /bin/sh -c, like the shell agent's prompt.")


def _verify_shape(value: object) -> object:
    """One clear message per wrong shape, instead of pydantic's per-branch union errors."""
    if isinstance(value, list):
        if not value:
            raise ValueError("an empty command: give the program and its arguments, "
                             "e.g. verify: [make, test]")
        if not all(isinstance(arg, str) for arg in value):
            raise ValueError("every argument must be a string (quote numbers and booleans)")
        return value
    if isinstance(value, dict):
        if set(value) != {"shell"}:
            raise ValueError("a mapping takes one key, shell: verify: {shell: 'make test'}")
        if not isinstance(value["shell"], str) or not value["shell"].strip():
            raise ValueError("verify: {shell: ...} needs a command line (a non-empty string)")
        return value
    raise ValueError("give an argv list (verify: [make, test]), or a command line for the "
                     "shell as verify: {shell: 'make test'}")


Verify = Annotated[list[StrictStr] | VerifyShell, BeforeValidator(_verify_shape)]
"""`verify:` an argv list (no shell) or `{shell: ...}`."""


def _schema_shape(value: object) -> object:
    """One clear message for a wrong shape (the schema itself is checked by the loader)."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str) and value.strip():
        return value
    raise ValueError("give a JSON Schema as a mapping (output_schema: {type: object, ...}), "
                     "or the path of a .json or .yaml schema file relative to the task file")


OutputSchema = Annotated[dict[str, Any] | StrictStr, BeforeValidator(_schema_shape)]
"""`output_schema:` a JSON Schema inline, or a schema file's path (the loader replaces the
path with the parsed schema)."""


class Settings(_Strict):
    """Per-file settings; every field is optional so precedence can fill the gaps."""

    max_parallel: Annotated[StrictInt, Field(ge=1, le=MAX_PARALLEL)] | None = Field(
        None, description="Maximum number of agents running at once.")
    timeout_per_task: PositiveMs | None = Field(
        None, description="Per-task timeout in milliseconds.")
    output_dir: Annotated[StrictStr, AfterValidator(_usable_dir)] | None = Field(
        None, description="Directory for outputs and the report, relative to the project root.")
    on_failure: OnFailure | None = Field(
        None, description="continue: skip dependents; stop: cancel everything; retry: retry, "
        "then continue.")
    max_retries: Annotated[StrictInt, Field(ge=0, le=MAX_RETRIES)] | None = Field(
        None, description="Retries per task under on_failure: retry (default 3).")
    retry_backoff: Annotated[float, Field(ge=0, le=MAX_BACKOFF_S,
                                          allow_inf_nan=False)] | None = Field(
        None, description="Base of the exponential retry backoff, in seconds (default 1).")
    max_cost_usd: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = Field(
        None, description="Budget in USD: once the cost reported by the agents reaches it, "
        "no new task starts (running ones finish).")
    idle_timeout: PositiveMs | None = Field(
        None, description="Milliseconds an agent may print nothing before it is killed as "
        "'stalled' (default: off).")
    max_quota_wait: Annotated[StrictInt, Field(ge=0, le=MAX_QUOTA_WAIT_MS)] | None = Field(
        None, description="Milliseconds a task may wait in all for its provider's rate or "
        "usage limit to reset before it ends as a provider error (default 3600000: 1 h).")
    adaptive_parallel: StrictBool | None = Field(
        None, description="Adapt each runner's pool to the provider's rate limits and wait "
        "for quota resets (default true); false: fixed limits, a rate limit is an ordinary "
        "retryable failure.")
    max_tokens: Annotated[StrictInt, Field(gt=0)] | None = Field(
        None, description="Token budget (input + output) for the run: a task whose expected "
        "tokens would pass it is skipped.")
    warn_cost_usd: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = Field(
        None, description="Print one warning when the run's cost passes this (USD).")
    estimate_cost_usd: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = Field(
        None, description="Cost (USD) reserved for an attempt with no recorded cost, so "
        "parallel starts cannot overshoot max_cost_usd.")
    estimate_tokens: Annotated[StrictInt, Field(ge=0)] | None = Field(
        None, description="Tokens reserved for an attempt with no recorded usage (max_tokens).")
    isolation: Isolation | None = Field(
        None, description="worktree: every task runs in its own git worktree and its changes "
        "are kept as a patch (changes/<id>.patch); none (default): in the project root.")
    merge: MergeMode | None = Field(
        None, description="After the run, join the isolated tasks' patches in dependency "
        "order: none (default: patches only), apply (to the working tree), branch (one commit "
        "per task on dispatch/<name>/<run id>; the working tree is untouched).")
    verify: Verify | None = Field(
        None, description="Command run after each merged task in the merge worktree: an argv "
        "list, or {shell: '...'} for /bin/sh -c; a failure reverts that task (merge_failed).")
    verify_timeout: PositiveMs | None = Field(
        None, description="Milliseconds verify may run before it is killed and counts as "
        "failed (default 600000: 10 min).")


MAX_FOREACH_ITEMS = 100_000
"""The highest `max_items`: each item is a task, and a plan of 100,000 is already slow."""
ForeachItem = StrictStr | dict[StrictStr, StrictStr | StrictInt | float | StrictBool | None]
"""A `foreach: items:` entry: a string, or a small flat mapping (`{item.field}`)."""


class Foreach(_Strict):
    """Fan-out: one task per file, per listed item, or per element of another task's
    output (a JSON array); give exactly one of files, items, from."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              json_schema_extra={"oneOf": [{"required": ["files"]},
                                                           {"required": ["items"]},
                                                           {"required": ["from"]}]})

    files: list[Annotated[StrictStr, Field(min_length=1),
                          AfterValidator(_relative_glob)]] | None = Field(
        None, description="Globs relative to the project root (recursive '**' allowed): one "
        "task per matched file, in sorted order; {path} and {stem} name it.")
    exclude: list[Annotated[StrictStr, Field(min_length=1),
                            AfterValidator(_relative_glob)]] = Field(
        default_factory=list, description="Globs of files left out of 'files'.")
    items: list[ForeachItem] | None = Field(
        None, description="One task per item: strings, or mappings ({item.field}; a 'key' "
        "field names the task, else its position).")
    from_: Annotated[StrictStr, Field(min_length=1)] | None = Field(
        None, alias="from", description="Id of a task whose output is a JSON array: one task "
        "per element, expanded when that task succeeds.")
    max_items: Annotated[StrictInt, Field(ge=1, le=MAX_FOREACH_ITEMS)] = Field(
        500, description="Refuse an expansion of more items than this (default 500).")

    @model_validator(mode="after")
    def _one_source(self) -> Foreach:
        given = [k for k, v in (("files", self.files), ("items", self.items),
                                ("from", self.from_)) if v is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of files:, items: or from: (got "
                             f"{', '.join(given) or 'none'})")
        if self.exclude and self.files is None:
            raise ValueError("exclude: applies to files: only")
        for n, item in enumerate(self.items or ()):
            texts = [item] if isinstance(item, str) else \
                [str(k) for k in item] + [v for v in item.values() if isinstance(v, str)]
            if any("\0" in t for t in texts):
                raise ValueError(f"item {n} holds a NUL character, which no agent can be "
                                 "given in a prompt or argument; remove it")
        return self


class Task(_Strict):
    """One agent invocation and the file or directory it produces."""

    id: Annotated[StrictStr, Field(min_length=1, max_length=MAX_ID_CHARS,
                                   pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")] = Field(
        description="Unique task id: letters, digits, '.', '_' and '-'.")
    agent: Annotated[StrictStr, Field(min_length=1)] = Field(
        description="Agent name, resolved through .aiwg/dispatch.toml (or the built-in 'shell').")
    prompt: StrictStr = Field(description="The prompt, sent on stdin unless the agent says 'arg'.")
    output: Annotated[StrictStr, Field(min_length=1)] = Field(
        description="Output path relative to output_dir; a trailing '/' makes it a directory.")
    dependencies: list[StrictStr] = Field(
        default_factory=list, description="Ids of tasks that must succeed first.")
    timeout: PositiveMs | None = Field(
        None, description="This task's timeout in milliseconds (overrides every other setting).")
    idle_timeout: PositiveMs | None = Field(
        None, description="Milliseconds this task's agent may print nothing before it is "
        "killed as 'stalled' (overrides settings).")
    retries: Annotated[StrictInt, Field(ge=0, le=MAX_RETRIES)] | None = Field(
        None, description="Retries for this task, under any on_failure policy.")
    inputs: InputsMode | None = Field(
        None, description="How dependency outputs are appended to the prompt "
        "(default inline; 'none' for the shell agent).")
    isolation: Isolation | None = Field(
        None, description="worktree: run in a fresh git worktree of the run's base commit plus "
        "the dependencies' changes, and keep this task's changes as changes/<id>.patch "
        "(overrides settings).")
    writes: list[Annotated[StrictStr, Field(min_length=1),
                           AfterValidator(_relative_glob)]] = Field(
        default_factory=list, description="Globs (relative to the project root; a trailing "
        "'/' covers a whole folder) of files this task changes in the shared tree: two "
        "tasks whose writes overlap never run at the same time.")
    files: list[Annotated[StrictStr, Field(min_length=1),
                          AfterValidator(_relative_glob)]] = Field(
        default_factory=list, description="Globs (relative to the project root) of files this "
        "task reads; their contents join its fingerprint and the daemon re-runs it when they "
        "change.")
    max_cost_usd: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = Field(
        None, description="This task's budget in USD over all its attempts (claude enforces "
        "it itself; for others it stops retries).")
    max_tokens: Annotated[StrictInt, Field(gt=0)] | None = Field(
        None, description="This task's token budget (input + output) over all its attempts; "
        "reaching it stops retries.")
    output_schema: OutputSchema | None = Field(
        None, description="A JSON Schema (Draft 2020-12) the answer must match, inline or "
        "as a .json/.yaml file relative to the task file: the output is JSON only "
        "(pretty-printed, sorted keys); a mismatch fails the attempt and a retry is told "
        "why.")
    foreach: Foreach | None = Field(
        None, description="Fan out: one task per file, item or element of another task's "
        "output, with ids '<id>[<key>]' and {item}, {item.field}, {path}, {stem} replaced in "
        "prompt and output; dependents wait for all of them.")

    @property
    def is_directory(self) -> bool:
        return self.output.endswith("/")


class TaskFile(_Strict):
    """A whole task file, as in AIWG's /parallel-dispatch reference."""

    name: StrictStr | None = Field(None, description="Name of the dispatch (default: file stem).")
    description: StrictStr | None = None
    tasks: list[Task] = Field(min_length=1, description="The tasks; order breaks priority ties.")
    settings: Settings = Field(default_factory=Settings)


def task_file_schema() -> dict[str, object]:
    """JSON Schema for editors (yaml-language-server, VS Code)."""
    schema = TaskFile.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "parallel-dispatch task file"
    return schema
