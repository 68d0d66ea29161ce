"""The reports, the state file and the progress lines, byte for byte, against a golden copy.

`dispatch-report.json` is the machine contract (docs/architecture.md): a refactoring of
how statuses are named inside the package (the `TaskStatus` enum, one mark table) must
not change one byte of it, nor of the Markdown report, `.dispatch-state.toml` or the
plain progress lines.  Each scenario runs real `shell` agents in process (the provider
error comes from a stand-in runner: no CLI here can produce one), then everything that
differs between runs (times, run id, the temporary folder, pids, fingerprints) is
replaced by a placeholder and the rest compared with tests/golden/report_golden.json.

After an *intended* change of the contract: `PD_UPDATE_GOLDEN=1 pytest tests/test_report_golden.py`
and review the diff of the golden file.
"""

from __future__ import annotations

import io
import json
import os
import re
import textwrap
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from parallel_dispatch.api import run_spec
from parallel_dispatch.loader import load_spec
from parallel_dispatch.progress import PlainProgress
from parallel_dispatch.report import to_json, to_markdown
from parallel_dispatch.result import RunResult
from parallel_dispatch.runners import RunnerSet
from parallel_dispatch.runners.base import Job, Outcome

GOLDEN = Path(__file__).parent / "golden" / "report_golden.json"

MIXED = """\
    name: mixed
    description: every way a task can end
    settings: {max_parallel: 8, retry_backoff: 0.01}
    tasks:
      - {id: ok, agent: shell, prompt: 'echo ok', output: ok.txt}
      - {id: dir, agent: shell, prompt: 'echo d > "$DISPATCH_OUTPUT/d.txt"', output: dir/}
      - {id: after-ok, agent: shell, prompt: 'cat "$DISPATCH_OUTPUT" 2>/dev/null; echo two',
         output: two.txt, dependencies: [ok], inputs: none}
      - {id: fail, agent: shell, prompt: 'echo boom >&2; exit 3', output: fail.txt, retries: 1}
      - {id: after-fail, agent: shell, prompt: 'echo never', output: af.txt,
         dependencies: [fail]}
      - {id: slow, agent: shell, prompt: 'sleep 30', output: slow.txt, timeout: 1000}
      - {id: quiet, agent: shell, prompt: 'sleep 30', output: quiet.txt, idle_timeout: 1000,
         timeout: 60000}
      - {id: leaf, agent: shell, prompt: 'echo leaf', output: leaf.txt,
         dependencies: [after-fail, after-ok]}
"""

STOP = """\
    settings: {on_failure: stop, max_parallel: 4}
    tasks:
      - {id: a, agent: shell, prompt: 'echo bad >&2; exit 1', output: a.txt}
      - {id: b, agent: shell, prompt: 'sleep 30', output: b.txt}
      - {id: c, agent: shell, prompt: 'echo c', output: c.txt, dependencies: [b]}
"""

CHAIN = """\
    tasks:
      - {id: x, agent: shell, prompt: 'echo x', output: x.txt}
      - {id: y, agent: shell, prompt: 'echo y', output: y.txt, dependencies: [x], inputs: none}
"""

PROVIDER = """\
    settings: {max_parallel: 2}
    tasks:
      - {id: good, agent: shell, prompt: p, output: good.txt}
      - {id: refused, agent: shell, prompt: p, output: refused.txt}
      - {id: later, agent: shell, prompt: p, output: later.txt, dependencies: [refused]}
"""


class StandIn:
    """Plays the provider's part: `refused` hits a rate limit, `good` reports its cost."""

    name = "stand-in"

    def describe(self, job: Job) -> str:
        return f"stand-in {job.task.id}"

    async def run(self, job: Job) -> Outcome:
        if job.task.id == "refused":
            return Outcome(ok=False, error="rate limited (HTTP 429: slow down)",
                           cause="rate_limit", retryable=False)
        job.output_path.write_text("fine\n")
        return Outcome(ok=True, exit_code=0,
                       metrics={"cost_usd": 0.25, "input_tokens": 10, "output_tokens": 5,
                                "turns": 1})


def _run(root: Path, name: str, text: str, *, dry_run: bool = False, reuse: bool = False,
         runner: Any = None, cancel_after: float | None = None) -> tuple[RunResult, str]:
    path = root / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    spec = load_spec(path)
    out = io.StringIO()

    async def main() -> RunResult:
        kw: dict[str, Any] = {"dry_run": dry_run, "reuse": reuse, "progress": PlainProgress(out),
                              "runner": runner or RunnerSet(grace=0.5)}
        if cancel_after is None:
            return await run_spec(spec, **kw)
        holder: list[RunResult] = []

        async def keep() -> None:
            holder.append(await run_spec(spec, **kw))

        with trio.move_on_after(cancel_after):
            await keep()
        # run_spec settles and reports in its `finally`; its result is the report's
        data = json.loads((spec.settings.output_dir / "dispatch-report.json").read_text())
        return _Reported(data)  # type: ignore[return-value]

    result = trio.run(main)
    return result, out.getvalue()


class _Reported:
    """What a run cancelled from outside left: only its report."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.report = data
        self.dry_run = False


TIMES = {"start_s", "end_s", "duration_s", "total_time_s", "work_time_s",
         "parallel_efficiency", "started_at", "finished_at", "run_id", "finished_run",
         "pid", "fingerprint", "output_stamp"}


def _scrub(value: Any, subst: Callable[[str], str], key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _scrub(v, subst, k) for k, v in value.items()}
    if isinstance(value, list):
        if key == "output_stamp":
            return "<var>"
        return [_scrub(v, subst) for v in value]
    if key in TIMES and value is not None:
        return "<var>"
    if isinstance(value, str):
        return subst(value)
    return value


JSON_VALUE = re.compile(r'^(\s*)"(\w+)": (.*?)(,?)$')
TOML_VALUE = re.compile(r"^(\w+) = (.*)$")
RUN_ID = re.compile(r"\b\d{8}T\d{6}Z-[0-9a-f]{6}\b")


def _subst(root: Path) -> Callable[[str], str]:
    def sub(text: str) -> str:
        return RUN_ID.sub("<run_id>", text.replace(str(root), "<root>"))
    return sub


DURATION = re.compile(r"\b\d+(?:\.\d+)?(?:ms|s)\b|\b\d+m \d+\.\d+s")
GANTT = re.compile(r"(:\w+), \d+, \d+$")
CLOCK = re.compile(r"^\[\s*\d+\.\d+s\] ")
COUNTER = re.compile(r"  \[\d+/(\d+)\]$")
STAMP = re.compile(r"^=== \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ")
PERCENT = re.compile(r"\*\*Parallel Efficiency\*\*: \d+%")


def _scrub_text(text: str, sub: Callable[[str], str]) -> list[str]:
    lines = []
    for line in sub(text).splitlines():
        line = CLOCK.sub("[t] ", line)
        line = STAMP.sub("=== <stamp> ", line)
        line = GANTT.sub(r"\1, <t>, <t>", line)
        line = COUNTER.sub(r"  [n/\1]", line)
        line = PERCENT.sub("**Parallel Efficiency**: <p>%", line)
        lines.append(DURATION.sub("<d>", line))
    return lines


def _toml_sections(lines: list[str]) -> list[list[str]]:
    """The state file's text, run-specific values replaced; its sections sorted, since
    tasks enter it in the order they finish."""
    sections: list[list[str]] = [[]]
    in_array = False
    for line in lines:
        if in_array:
            in_array = line != "]"
            continue
        if not line:
            sections.append([])
            continue
        m = TOML_VALUE.match(line)
        if m and m[1] in TIMES:
            in_array = m[2] == "["
            line = f"{m[1]} = <var>"
        sections[-1].append(line)
    return sorted(sections)


def _snapshot(root: Path, result: Any, progress: str) -> dict[str, Any]:
    out_dir = root / ".aiwg" / "working"
    if result.dry_run:
        data = to_json(result)
        json_text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
        md = to_markdown(result, data)
    else:
        json_text = (out_dir / "dispatch-report.json").read_text()
        data = json.loads(json_text)
        md = (out_dir / "dispatch-report.md").read_text()
        if hasattr(result, "report") and not isinstance(result, _Reported):
            assert result.report == data  # what the API returns is what was written
    sub = _subst(root)
    snap: dict[str, Any] = {
        "report_json": _scrub(data, sub),
        # and its text, for the order of keys and the layout: byte-identical is the promise
        "report_json_text": [JSON_VALUE.sub(lambda m: f"{m[1]}\"{m[2]}\": <var>{m[4]}"
                                            if m[2] in TIMES and m[3] != "null" else m[0], line)
                             for line in _scrub_text(json_text, sub)],
        "report_md": _scrub_text(md, sub),
        # The order of simultaneous finishes is the scheduler's business, not the contract.
        "progress": sorted(_scrub_text(progress, sub)),
    }
    state = out_dir / ".dispatch-state.toml"
    if state.exists() and not result.dry_run:
        text = state.read_text()
        snap["state"] = _scrub(tomllib.loads(text), sub)
        snap["state_toml"] = _toml_sections(_scrub_text(text, sub))
    if out_dir.exists():  # outputs, logs (their headers too), kept partial outputs
        snap["files"] = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*"))
        snap["logs"] = {p.name: _scrub_text(p.read_text(), sub)
                        for p in sorted((out_dir / "logs").glob("*.log"))}
    return snap


def _scenarios(project_root: Path) -> dict[str, Any]:
    got: dict[str, Any] = {}

    def fresh(name: str) -> Path:
        root = project_root / name
        (root / ".aiwg").mkdir(parents=True)
        return root

    root = fresh("mixed")
    got["mixed"] = _snapshot(root, *_run(root, "mixed", MIXED))
    root = fresh("dry")
    got["dry_run"] = _snapshot(root, *_run(root, "mixed", MIXED, dry_run=True))
    root = fresh("stop")
    got["stop"] = _snapshot(root, *_run(root, "stop", STOP))
    root = fresh("chain")
    _run(root, "chain", CHAIN)
    got["cached"] = _snapshot(root, *_run(root, "chain", CHAIN, reuse=True))
    root = fresh("provider")
    got["provider_error"] = _snapshot(root, *_run(root, "provider", PROVIDER, runner=StandIn()))
    root = fresh("cancelled")
    got["cancelled_from_outside"] = _snapshot(root, *_run(root, "stop", STOP.replace(
        "echo bad >&2; exit 1", "sleep 30"), cancel_after=1.0))
    return got


def test_reports_state_and_progress_match_the_golden_copy(tmp_path: Path) -> None:
    got = _scenarios(tmp_path)
    if os.environ.get("PD_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1, ensure_ascii=False, sort_keys=True) + "\n")
        pytest.skip("golden copy rewritten; review its diff")
    want = json.loads(GOLDEN.read_text())
    for name in want:
        assert got[name] == want[name], f"scenario {name!r} differs from {GOLDEN.name}"
    assert set(got) == set(want)


def test_the_golden_copy_covers_every_task_status() -> None:
    """So that a status the enum grows is added to the scenarios, not silently untested."""
    want = json.loads(GOLDEN.read_text())
    seen = {t["status"] for s in want.values() for t in s["report_json"]["tasks"]}
    runs = {s["report_json"]["status"] for s in want.values()}
    assert seen == {"succeeded", "cached", "failed", "timeout", "provider_error", "stalled",
                    "skipped", "cancelled", "planned"}
    assert runs == {"succeeded", "failed", "interrupted"}
