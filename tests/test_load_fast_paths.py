"""The loader's fast paths decide as the full checks do.

The YAML fast path (`_Builder.run_plain`) builds what the full builder (`run`) builds.

Where `run_plain` does not give up, its data must equal `run`'s, types included (1,
1.0 and True compare equal in Python, so the comparison is by type too); where `run`
refuses a document, `run_plain` must give up or raise the same libyaml error.  The
inputs are the loader fuzz test's: YAML token soup, arbitrary text and generated task
files with hostile values (tags, anchors, aliases, duplicate and merge keys...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from parallel_dispatch import yamlsafe
from parallel_dispatch.errors import TaskFileError
from parallel_dispatch.loader import _PLAIN_OUTPUT, _Checker
from parallel_dispatch.yamlsafe import _UNUSUAL, _Builder, parse_yaml
from test_fuzz_loader import BILLION_LAUGHS, encoded, raw_text, task_file, token_soup


def _typed(value: Any) -> Any:
    """`value` with each scalar paired with its type, so that equality sees types."""
    if isinstance(value, dict):
        return {k: _typed(v) for k, v in value.items()}  # keys: always str
    if isinstance(value, list):
        return [_typed(v) for v in value]
    return (type(value).__name__, value if value == value else "nan")


def check_same(data: bytes) -> str:
    """How the fast path fared on `data`, having checked that it agrees with `run`."""
    try:
        expected: Any = _Builder("f.yaml", track=False).run(data)[0]
    except (TaskFileError, yaml.YAMLError, UnicodeDecodeError) as exc:
        expected = exc
    try:
        got = _Builder("f.yaml", track=False).run_plain(data)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        assert type(exc) is type(expected) and str(exc) == str(expected), (exc, expected)
        return "same libyaml error"
    if got is _UNUSUAL:
        return "fast path gave up"
    assert not isinstance(expected, Exception), expected
    assert _typed(got) == _typed(expected)
    return "fast path built it"


SETTINGS = settings(max_examples=300, derandomize=True, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


@SETTINGS
@given(data=st.one_of(token_soup, raw_text))
def test_fast_path_agrees_on_arbitrary_text(data: bytes) -> None:
    event(check_same(data))


@SETTINGS
@given(data=encoded(task_file()))
@example(data=BILLION_LAUGHS.encode())
def test_fast_path_agrees_on_task_files(data: bytes) -> None:
    event(check_same(data))


PLAIN = b"""\
name: x
settings: {max_parallel: 2, timeout_per_task: 1000}
tasks:
  - id: a
    agent: shell
    prompt: "echo 1"
    output: out/a.txt
    retries: 2
  - {id: b, agent: shell, prompt: 'x', output: b/, dependencies: [a], inputs: null}
  - id: c
    prompt: |
      two
      lines
    timeout: 1.5e+3
    flag: yes
    when: 2001-12-14
    empty:
    list: [[], {}, [1, [true]]]
"""


def test_plain_data_takes_the_fast_path() -> None:
    """Task files as people write them are built without `run`."""
    got = _Builder("f.yaml", track=False).run_plain(PLAIN)
    assert got is not _UNUSUAL
    assert _typed(got) == _typed(_Builder("f.yaml", track=False).run(PLAIN)[0])
    assert got["tasks"][2]["flag"] is True and got["tasks"][2]["timeout"] == 1500.0


@pytest.mark.parametrize("text", [
    b"a: &x 1\nb: *x\n",                     # anchor, alias
    b"a: !!str 1\n",                         # a tag
    b"a: ! 1\n",                             # the non-specific tag
    b"a: !!map {}\n",                        # a tag on a container
    b"a: 1\na: 2\n",                         # a duplicate key
    b"<<: {a: 1}\n",                         # a merge key
    b"1: a\n",                               # a non-string key
    b"? [a]\n: b\n",                         # a complex key
    b"a: 1\n---\nb: 2\n",                    # a second document
    b"a: 2001-13-45\n",                      # an invalid implicit timestamp: an error
])
def test_anything_else_goes_through_the_full_builder(text: bytes) -> None:
    assert _Builder("f.yaml", track=False).run_plain(text) is _UNUSUAL
    assert check_same(text) == "fast path gave up"


def test_refusals_keep_their_lines() -> None:
    """What the fast path hands on is still refused with its line."""
    with pytest.raises(TaskFileError) as err:
        parse_yaml(b"tasks:\n  - id: a\n    id: b\n", "f.yaml")
    assert [(d.line, d.message) for d in err.value.diagnostics] == [
        (3, "duplicate key 'id'")]


def test_a_document_over_the_value_budget_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(yamlsafe, "MAX_NODES", 50)  # (5,000,000 plain values: 25 s)
    at_end = b"[" + b"a," * 60 + b"a]"
    at_a_container = b"[" + b"a," * 60 + b"[1]]"
    for text in (at_end, at_a_container):
        assert _Builder("f.yaml", track=False).run_plain(text) is _UNUSUAL
        with pytest.raises(TaskFileError, match="more than 50 values"):
            parse_yaml(text, "f.yaml")
    assert _Builder("f.yaml", track=False).run_plain(b"[" + b"a," * 40 + b"[1]]") != _UNUSUAL


@pytest.mark.parametrize("output, expect", [
    ("a.md", None),
    ("sub/dir/", None),
    ("logs/x.md", "reserved"),
    ("x" * 201, "200 bytes"),
    ("d/" + "x" * 201 + "/a.md", "200 bytes"),
    ("/".join(["d" * 150] * 27), "too long"),
])
@pytest.mark.parametrize("dir_len", [10, 3_980])
def test_plain_outputs_get_the_name_checks(tmp_path: Path, output: str, expect: str | None,
                                           dir_len: int) -> None:
    """A plain output skips only the checks that cannot apply to it: with an output dir
    of 3,980 bytes, even `a.md` makes a path over the limit."""
    assert _PLAIN_OUTPUT.fullmatch(output)
    out_dir = tmp_path / ("o" * (dir_len - len(str(tmp_path)) - 1))
    doc = parse_yaml(f"tasks: [{{id: a, agent: shell, prompt: x, output: {output}}}]\n",
                     "t.yaml")
    checker = _Checker(doc)
    checker.check_outputs(out_dir)
    messages = [d.message for d in checker.diagnostics]
    if dir_len > 3_000 and len(output) + 1 + dir_len > 4_000:
        expect = expect or "too long"
    if expect is None:
        assert messages == []
    else:
        assert len(messages) == 1 and expect in messages[0], messages
