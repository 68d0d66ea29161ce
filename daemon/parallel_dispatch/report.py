"""`dispatch-report.md` and `dispatch-report.json`: the same facts, two audiences.

The Markdown keeps the reference's sections and layout (Summary, Execution
Timeline, Task Details, Outputs) and adds counts, attempts, failure logs and a
Mermaid gantt chart.  The JSON is the machine contract described in
docs/architecture.md (schema_version 1).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import costs, fanout, quota
from .atomic import write_text
from .events import CAUSES
from .fmt import fmt_duration, now_iso, rel_path
from .output_schema import MISMATCH
from .result import MARKS, OK, PROBLEMS, RunResult, RunStatus, TaskRecord, TaskStatus

REPORT_MD = "dispatch-report.md"
REPORT_JSON = "dispatch-report.json"
LOG_TAIL_LINES = 20
SCHEMA_VERSION = 1



def log_tail(path: Path, lines: int = LOG_TAIL_LINES, max_bytes: int = 64 * 1024) -> list[str]:
    """Last lines of a log without reading a huge file whole."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError:
        return []
    text = data.decode("utf-8", errors="replace").splitlines()
    return [line for line in text if not line.startswith("=== ")][-lines:]


def waves(result: RunResult) -> list[dict[str, Any]]:
    out = []
    for n, members in enumerate(result.spec.graph.waves(), start=1):
        recs = [result.records[i] for i in members]
        starts = [r.start_s for r in recs if r.start_s is not None]
        ends = [r.end_s for r in recs if r.end_s is not None]
        start = min(starts) if starts else None
        end = max(ends) if ends else None
        out.append({
            "wave": n,
            "tasks": [r.id for r in recs],
            "start_s": _round(start),
            "end_s": _round(end),
            "duration_s": _round(end - start) if start is not None and end is not None else None,
            "status": _wave_status(recs),
        })
    return out


def _wave_status(recs: Iterable[TaskRecord]) -> str:
    """A wave's status: a task status, or `partial` (some tasks ran, others were skipped)."""
    statuses = {r.status for r in recs}
    if statuses <= {TaskStatus.SUCCEEDED, TaskStatus.CACHED}:
        return TaskStatus.SUCCEEDED
    if statuses <= {TaskStatus.PLANNED}:
        return TaskStatus.PLANNED
    if statuses & set(PROBLEMS):
        return TaskStatus.FAILED
    if TaskStatus.CANCELLED in statuses:
        return TaskStatus.CANCELLED
    return "partial"


def _status_cell(status: str) -> str:
    """A task's status in the Markdown tables: its mark, and its name unless the mark
    says it all (✓, ✗, …)."""
    mark = MARKS.get(status)
    if mark is None or status == TaskStatus.RUNNING:
        return status
    if status in (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.PENDING):
        return mark
    return f"{mark} {TaskStatus(status).label}"


_WAVE_MARKS = {s: MARKS[s] for s in (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.PLANNED)}
"""A wave's cell shows a mark for these, else its status in words (`partial`)."""


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def to_json(result: RunResult) -> dict[str, Any]:
    spec = result.spec
    tasks = []
    for r in result.records:
        entry: dict[str, Any] = {
            "id": r.id,
            "agent": r.agent,
            "status": r.status,
            "attempts": r.attempts,
            "wave": r.wave,
            "start_s": _round(r.start_s),
            "end_s": _round(r.end_s),
            "duration_s": _round(r.busy_s) if r.start_s is not None else None,
            "output": r.output,
            "output_path": str(r.output_path),
            "log_path": str(r.log_path),
            "exit_code": r.exit_code,
            "error": r.error,
            "reason": r.reason,
            "cause": r.cause,
            "last_event": r.last_event,
            "log_tail": log_tail(r.log_path) if r.status in PROBLEMS else [],
        }
        entry.update({**costs.EMPTY, **r.metrics})
        if spec.isolation(r.index) == "worktree":  # only then: other reports as before
            entry["changes"] = r.changes
        if spec.tasks[r.index].output_schema is not None:  # only then: others as before
            entry["schema"] = _schema_entry(r)
        if r.nodes:  # only then: reports of local runs read as before
            entry["nodes"] = list(r.nodes)
        if r.quota_waits:  # only then: reports of runs never limited read as before
            entry["quota_waits"] = r.quota_waits
            entry["quota_wait_s"] = round(r.quota_wait_s, 3)
        tasks.append(entry)
    data: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "name": spec.name,
        "description": spec.description,
        "task_file": spec.display,
        "run_id": result.run_id,
        "started_at": result.started_at,
        "finished_at": result.finished_at,
        "status": result.status,
        "dry_run": result.dry_run,
        "settings": spec.settings.to_json(),
        "summary": {
            "total": len(result.records),
            "succeeded": result.count(TaskStatus.SUCCEEDED),
            "failed": result.count(TaskStatus.FAILED),
            "timed_out": result.count(TaskStatus.TIMEOUT),
            "provider_errors": result.count(TaskStatus.PROVIDER_ERROR),
            "stalled": result.count(TaskStatus.STALLED),
            "skipped": result.count(TaskStatus.SKIPPED),
            "cancelled": result.count(TaskStatus.CANCELLED),
            "cached": result.count(TaskStatus.CACHED),
            "total_time_s": round(result.wall_s, 3),
            "work_time_s": round(result.work_s, 3),
            "parallel_efficiency": (None if result.efficiency is None
                                    else round(result.efficiency, 4)),
            **costs.totals(tasks),
        },
        "notes": list(result.notes),
        "critical_path": result.critical_path,
        "waves": waves(result),
        "tasks": tasks,
    }
    if result.base_commit is not None:
        data["base_commit"] = result.base_commit
    if result.merge is not None:  # only with `merge: apply | branch`
        data["summary"]["conflicts"] = result.count(TaskStatus.CONFLICT)
        data["summary"]["merge_failed"] = result.count(TaskStatus.MERGE_FAILED)
        data["merge"] = result.merge
    if spec.foreach:  # only then: reports without fan-outs read as before
        data["foreach"] = {g: list(members) for g, members in spec.foreach.items()}
    if result.pools:
        data["summary"]["waited_for_quota"] = sum(1 for t in tasks if t.get("quota_waits"))
        data["pools"] = result.pools
    return data


def to_markdown(result: RunResult, data: dict[str, Any] | None = None) -> str:
    data = data or to_json(result)
    s = data["summary"]
    root = result.spec.root
    lines = ["# Parallel Dispatch Report", ""]
    if result.spec.name:
        lines += [f"**{result.spec.name}**" + (f" — {result.spec.description}"
                                              if result.spec.description else ""), ""]
    lines += [
        "## Summary",
        f"- **Total Tasks**: {s['total']}",
        f"- **Succeeded**: {s['succeeded']}",
        f"- **Failed**: {s['failed']}",
        f"- **Total Time**: {fmt_duration(s['total_time_s'])}",
        f"- **Parallel Efficiency**: {_efficiency(s['parallel_efficiency'])}",
        f"- **Timed out**: {s['timed_out']}",
        f"- **Provider errors**: {s['provider_errors']}",
        f"- **Stalled**: {s['stalled']}",
        f"- **Skipped**: {s['skipped']}",
        f"- **Cancelled**: {s['cancelled']}",
        f"- **Cached**: {s['cached']}",
        f"- **Status**: {data['status']}" + (" (dry run)" if data["dry_run"] else ""),
        f"- **Run**: `{data['run_id']}` · max_parallel {data['settings']['max_parallel']} · "
        f"on_failure {data['settings']['on_failure']}",
        "",
        "## Execution Timeline",
        "",
        "| Wave | Tasks | Duration | Status |",
        "|------|-------|----------|--------|",
    ]
    member_of = _fan_out_of(data)
    for w in data["waves"]:
        mark = _WAVE_MARKS.get(w["status"], w["status"])
        lines.append(f"| {w['wave']} | {', '.join(_wave_names(w['tasks'], member_of))} | "
                     f"{fmt_duration(w['duration_s'])} | {mark} |")
    if data["critical_path"]:
        lines += ["", f"Critical path: {' → '.join(data['critical_path'])}"]
    lines += [
        "",
        "## Task Details",
        "",
        "| Task | Agent | Duration | Status | Attempts | Output |",
        "|------|-------|----------|--------|----------|--------|",
    ]
    groups: dict[str, list[str]] = data.get("foreach", {})
    by_id = {t["id"]: t for t in data["tasks"]}
    for tid, members in fanout.grouped(list(by_id), groups):
        if members:  # a fan-out: a header, then its first tasks (all in the JSON report)
            lines.append(_group_row(tid, [by_id[m] for m in members], by_id.get(tid)))
            shown, more = fanout.collapsed(members)
            lines += [_task_row(by_id[m]) for m in shown]
            if more:
                lines.append(f"| … {more:,} more of {tid} (dispatch-report.json) | | | | | |")
        else:
            lines.append(_task_row(by_id[tid]))
    lines += costs.markdown(data)
    lines += quota.markdown(data)
    lines += _nodes_markdown(data)
    if data["notes"]:
        at = lines.index("## Execution Timeline")
        lines[at:at] = [*costs.notes_markdown(data["notes"]), ""]
    problems = [t for t in data["tasks"]
                if t["status"] not in OK]
    if problems:
        lines += ["", "## Problems", ""]
        for t in problems:
            why = t["reason"] or t["error"] or t["status"]
            cause = f" ({CAUSES.get(t['cause'], t['cause'])})" if t.get("cause") else ""
            lines.append(f"### {t['id']} — {t['status']}{cause}")
            lines.append("")
            lines.append(_md_escape_line(why))
            if t["log_tail"]:
                lines += ["", f"Last lines of `{rel_path(Path(t['log_path']), root)}`:", "",
                          "```text", *t["log_tail"], "```"]
            lines.append("")
    lines += _changes_markdown(data)
    lines += _merge_markdown(data)
    lines += ["", "## Outputs"]
    outs = [t for t in data["tasks"] if t["status"] in (TaskStatus.SUCCEEDED, TaskStatus.CACHED)
            and not groups.get(t["id"])]  # (a `from:` fan-out's join writes nothing)
    for t in outs:
        slash = "/" if t["output"].endswith("/") else ""
        lines.append(f"- {rel_path(Path(t['output_path']), root)}{slash}")
    if not outs:
        lines.append("- (none)")
    gantt = _gantt(data)
    if gantt:
        lines += ["", "## Timeline chart", "", *gantt]
    return "\n".join(lines) + "\n"


def _schema_entry(r: TaskRecord) -> dict[str, Any]:
    """`output_schema`'s verdict: ok once the output matched (cached outputs matched when
    they were made); else the mismatch that ended the task (None when it failed for another
    reason, before any answer was checked)."""
    if r.ok and r.status != TaskStatus.PLANNED:
        return {"ok": True, "error": None}
    error = r.error or ""
    at = error.find(MISMATCH)
    reason = error[at + len(MISMATCH):].lstrip(": ") if at >= 0 else ""
    return {"ok": False, "error": reason or None}


def _schema_cell(schema: dict[str, Any] | None) -> str:
    """" · schema ✓" / " · schema ✗ <first error>" after a status, for checked tasks."""
    if schema is None or (not schema["ok"] and schema["error"] is None):
        return ""
    if schema["ok"]:
        return " · schema ✓"
    first = str(schema["error"]).split("; ", 1)[0]
    return f" · schema ✗ {_md_escape_line(first)}".replace("|", "\\|")


def _task_row(t: dict[str, Any]) -> str:
    waited = (f" (waited {t['quota_waits']}× for quota, {fmt_duration(t['quota_wait_s'])})"
              if t.get("quota_waits") else "")
    checked = _schema_cell(t.get("schema"))
    return (f"| {t['id']} | {t['agent']} | {fmt_duration(t['duration_s'])} | "
            f"{_status_cell(t['status'])}{waited}{checked} | {t['attempts']} | "
            f"{t['output']} |")


def _group_row(gid: str, members: list[dict[str, Any]], join: dict[str, Any] | None) -> str:
    """A fan-out's line: how many of its tasks ended how."""
    counts: dict[str, int] = {}
    for t in members:
        counts[t["status"]] = counts.get(t["status"], 0) + 1
    text = " · ".join(f"{n} {_status_cell(st)}" for st, n in counts.items())
    agent = members[0]["agent"]
    output = join["output"] if join is not None else ""
    return f"| **{gid}** (foreach, {len(members):,}) | {agent} | | {text} | | {output} |"


def _changes_markdown(data: dict[str, Any]) -> list[str]:
    """Isolated tasks' changes: files, lines +/-, and the patch (relative to the report)."""
    isolated = [t for t in data["tasks"] if "changes" in t]
    if not isolated:
        return []
    lines = ["", "## Changes", "", f"Base commit: `{data.get('base_commit')}`", "",
             "| Task | Files | Lines | Patch |", "|------|-------|-------|-------|"]
    for t in isolated:
        c = t["changes"]
        if c is None:
            lines.append(f"| {t['id']} | — | — | (not captured: {t['status']}) |")
        elif c["patch"] is None:
            lines.append(f"| {t['id']} | — | — | no changes |")
        else:
            shown = ", ".join("`" + _md_escape_line(f).replace("|", "\\|") + "`"
                              for f in c["files"][:MAX_FILES_SHOWN])
            more = len(c["files"]) - MAX_FILES_SHOWN
            if more > 0:
                shown += f" and {more} more"
            lines.append(f"| {t['id']} | {shown} | +{c['added']} −{c['removed']} | "
                         f"[{c['patch']}]({c['patch']}) |")
    return lines


def _merge_markdown(data: dict[str, Any]) -> list[str]:
    """What the merge queue did: the branch and its commits, or what was applied;
    conflicts with their files; verify failures."""
    merge = data.get("merge")
    if merge is None:
        return []
    lines = ["", "## Merge", "", f"Mode: {merge['mode']}" + (
        f" · branch `{merge['branch']}`" if merge.get("branch") else "")]
    if merge.get("stopped"):
        lines += ["", f"Stopped: {_md_escape_line(merge['stopped'])}"]
    reran = {r["task"] for r in merge.get("reruns", []) if r["result"] == "merged"}
    rows = [(c["task"], f"commit `{c['sha'][:12]}`"
             + (" (re-run after a merge conflict)" if c["task"] in reran else ""))
            for c in merge["commits"]]
    rows += [(t, "applied to the working tree") for t in merge.get("applied", [])]
    rows += [(t, "nothing left to merge") for t in merge["unchanged"]]
    rows += [(c["task"], f"{MARKS[TaskStatus.CONFLICT]} conflict"
              + (f": {', '.join(f'`{f}`' for f in c['files'])}" if c["files"] else ""))
             for c in merge["conflicts"]]
    verify = merge.get("verify")
    if verify is not None:
        rows += [(f["task"], f"{MARKS[TaskStatus.MERGE_FAILED]} verify "
                  + ("timed out" if f["timed_out"] else f"failed (exit {f['exit_code']})")
                  + ", reverted") for f in verify["failed"]]
    if not rows:
        lines += ["", "Nothing to merge: no isolated task changed files."]
        return lines
    lines += ["", "| Task | Result |", "|------|--------|"]
    lines += [f"| {task} | {_md_escape_line(text)} |" for task, text in rows]
    return lines


MAX_FILES_SHOWN = 20
"""Files named per task in the Markdown report; the JSON report lists them all."""


def _efficiency(value: float | None) -> str:
    """A percentage; an interrupted run has none (see `RunResult.efficiency`)."""
    return "– (run interrupted: not measured)" if value is None else f"{round(100 * value)}%"


def _md_escape_line(text: str) -> str:
    return text.replace("\n", " ").strip()


def _gantt_rows(rows: list[dict[str, Any]], data: dict[str, Any]) -> list[dict[str, Any]]:
    """The chart's rows: a long fan-out's first items, then one bar for the rest."""
    member_of = _fan_out_of(data)
    shown: dict[str, int] = {}
    rest: dict[str, list[dict[str, Any]]] = {}
    out: list[dict[str, Any]] = []
    for t in rows:
        group = member_of.get(t["id"])
        if group is not None and shown.get(group, 0) >= fanout.COLLAPSE_AFTER:
            rest.setdefault(group, []).append(t)
            continue
        if group is not None:
            shown[group] = shown.get(group, 0) + 1
        out.append(t)
    for group, more in rest.items():
        worst = next((t for t in more if t["status"] in PROBLEMS), more[0])
        out.append({**more[0], "id": f"{group} … {len(more)} more",
                    "start_s": min(t["start_s"] for t in more),
                    "end_s": max(t["end_s"] for t in more), "status": worst["status"]})
    return out


def _fan_out_of(data: dict[str, Any]) -> dict[str, str]:
    """Item task id → its fan-out's id, for fan-outs too long to list in full."""
    groups: dict[str, list[str]] = data.get("foreach", {})
    return {m: g for g, members in groups.items() if fanout.collapsed(members)[1]
            for m in members}


def _wave_names(ids: list[str], member_of: dict[str, str]) -> list[str]:
    """A wave's task ids, a long fan-out's items as one entry: `review (500 tasks)`."""
    out: list[str] = []
    counts: dict[str, int] = {}
    for tid in ids:
        group = member_of.get(tid)
        if group is None:
            out.append(tid)
            continue
        if group not in counts:
            out.append(group)
        counts[group] = counts.get(group, 0) + 1
    return [f"{n} ({counts[n]} tasks)" if n in counts else n for n in out]


def _mermaid_text(text: str) -> str:
    """A node's name as a section title: Mermaid ends it at a colon or hash."""
    return re.sub(r"[:#;]", " ", text)


def _nodes_markdown(data: dict[str, Any]) -> list[str]:
    """Which node ran which attempts (runs on a Ray cluster only)."""
    per: dict[str, list[str]] = {}
    for t in data["tasks"]:
        for n, node in enumerate(t.get("nodes") or (), start=1):
            per.setdefault(node, []).append(t["id"] if len(t["nodes"]) == 1
                                            else f"{t['id']} (attempt {n})")
    if not per:
        return []
    lines = ["", "## Nodes", "", "| Node | Attempts | Tasks |", "|------|----------|-------|"]
    for node in sorted(per):
        lines.append(f"| {_md_escape_line(node)} | {len(per[node])} | "
                     f"{', '.join(per[node])} |")
    return lines


def _gantt(data: dict[str, Any]) -> list[str]:
    rows = [t for t in data["tasks"] if t["start_s"] is not None and t["end_s"] is not None
            and t["status"] != TaskStatus.CACHED]
    rows = _gantt_rows(rows, data)
    if not rows:
        return []
    out = ["```mermaid", "gantt", "    title Dispatch timeline (seconds from start)",
           "    dateFormat x", "    axisFormat %M:%S"]
    # On a cluster the chart groups by node (where each task last ran), else by wave.
    by_node = any(t.get("nodes") for t in rows)
    groups: dict[Any, list[dict[str, Any]]] = {}
    for t in rows:
        key = (t.get("nodes") or ["this machine"])[-1] if by_node else t["wave"]
        groups.setdefault(key, []).append(t)
    tag = {TaskStatus.SUCCEEDED: "done", TaskStatus.CANCELLED: "crit",
           **{p: "crit" for p in PROBLEMS}}
    for key in sorted(groups):
        out.append(f"    section {'Node ' + _mermaid_text(key) if by_node else f'Wave {key}'}")
        for t in groups[key]:
            start = int(t["start_s"] * 1000)
            end = max(start + 1, int(t["end_s"] * 1000))
            status = tag.get(t["status"], "active")
            out.append(f"    {t['id']} :{status}, {start}, {end}")
    out.append("```")
    return out


def write_reports(result: RunResult) -> tuple[Path, Path]:
    """Write both reports atomically into the output dir; returns their paths."""
    out_dir = result.spec.settings.output_dir
    data = to_json(result)
    result.report = data
    md_path = out_dir / REPORT_MD
    json_path = out_dir / REPORT_JSON
    # The Markdown first: whoever waits for the JSON (the machine contract) finds both.
    write_text(md_path, to_markdown(result, data))
    write_text(json_path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    result.report_md_path, result.report_json_path = md_path, json_path
    return md_path, json_path


def write_error_report(output_dir: Path, task_file: str, diagnostics: list[Any],
                       crashed: bool = False) -> Path:
    """Where a run's report would go, say why the file could not run (daemon).

    `crashed`: the file was valid but its run failed partway (an unwritable output dir,
    a full disk): outputs finished before that are kept, so "nothing was run" would lie.
    """
    data = {
        "schema_version": SCHEMA_VERSION,
        "task_file": task_file,
        "status": RunStatus.ERROR if crashed else RunStatus.INVALID,
        "checked_at": now_iso(),
        "errors": [d.to_json() for d in diagnostics],
    }
    headline = (f"**Could not run**: `{task_file}` — the run stopped; outputs finished "
                "before that are kept. Fix this and save the file again:" if crashed else
                f"**Invalid task file**: `{task_file}` — nothing was run. Fix these errors "
                "and save the file again:")
    lines = ["# Parallel Dispatch Report", "", headline, "", "```text",
             *(d.format() for d in diagnostics), "```", ""]
    md = output_dir / REPORT_MD
    write_text(md, "\n".join(lines))
    write_text(output_dir / REPORT_JSON, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return md
