"""Issue 9, items 11–14: files that passed `validate` and then failed at run time.

Each is now refused at validation with file:line and what to do, or works at run time.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from parallel_dispatch import TaskFileError, load_spec
from support import Project, cli_env, symlink_loops


def errors_of(path: Path, **kw: object) -> list[str]:
    with pytest.raises(TaskFileError) as info:
        load_spec(path, **kw)  # type: ignore[arg-type]
    return [d.format() for d in info.value.diagnostics]


def one_error(path: Path, **kw: object) -> str:
    errs = errors_of(path, **kw)
    assert len(errs) == 1, errs
    return errs[0]


def task(extra: str = "", *, output: str = "a.txt", prompt: str = "true",
         agent: str = "shell", tid: str = "a") -> str:
    lines = [f"  - id: {json.dumps(tid)}", f"    agent: {agent}",
             f"    prompt: {json.dumps(prompt)}", f"    output: {json.dumps(output)}"]
    body = "\n".join(lines) + "\n" + textwrap.indent(textwrap.dedent(extra), "    ")
    return "tasks:\n" + body


# -- item 12: an explicit tag on an empty value ---------------------------------------------
@pytest.mark.parametrize("tag", ["int", "float", "bool", "timestamp"])
def test_tag_on_an_empty_value_is_a_located_error(project: Project, tag: str) -> None:
    f = project.write("t.yaml", task(f"timeout: !!{tag}\n"))
    err = one_error(f)
    assert err.startswith(f"{f}:6:"), err
    assert f"invalid {tag} value ''" in err


@pytest.mark.parametrize("value", ["!!int 0x", "!!float .", "!!bool maybe",
                                   "!!timestamp 2020-13-45", "!!int " + "9" * 5000])
def test_malformed_tagged_values_are_located_errors(project: Project, value: str) -> None:
    f = project.write("t.yaml", task(f"timeout: {value}\n"))
    assert one_error(f).startswith(f"{f}:6:")


def test_tagged_values_give_no_traceback_in_the_cli(project: Project) -> None:
    project.write("t.yaml", task("timeout: !!int\n"))
    proc = project.run("validate", "t.yaml")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "t.yaml:6:" in proc.stderr


# -- item 11: limits that validation now enforces ---------------------------------------------
BIG = "1" + "0" * 400


@pytest.mark.parametrize("key", ["timeout", "idle_timeout"])
def test_absurd_task_timeouts_are_refused(project: Project, key: str) -> None:
    f = project.write("t.yaml", task(f"{key}: {BIG}\n"))
    err = one_error(f)
    assert f"{f}:6:" in err and "30 days" in err and len(err) < 300, err


@pytest.mark.parametrize("key", ["timeout_per_task", "idle_timeout"])
def test_absurd_settings_timeouts_are_refused(project: Project, key: str) -> None:
    f = project.write("t.yaml", f"settings:\n  {key}: {BIG}\n" + task())
    assert "30 days" in one_error(f)


def test_absurd_timeout_flag_is_refused(project: Project) -> None:
    f = project.write("t.yaml", task())
    err = one_error(f, overrides={"timeout_per_task": 10**400})
    assert "--timeout" in err and "30 days" in err


@pytest.mark.parametrize("value", [".inf", ".nan", "100000"])
def test_retry_backoff_must_be_finite_and_bounded(project: Project, value: str) -> None:
    f = project.write("t.yaml", f"settings:\n  retry_backoff: {value}\n" + task())
    err = one_error(f)
    assert f"{f}:2:" in err and "retry_backoff" in err


def test_max_cost_must_be_finite(project: Project) -> None:
    f = project.write("t.yaml", "settings:\n  max_cost_usd: .inf\n" + task())
    assert "max_cost_usd" in one_error(f)


@pytest.mark.parametrize("key,value", [("max_parallel", BIG), ("max_retries", "100000")])
def test_absurd_counts_are_refused(project: Project, key: str, value: str) -> None:
    f = project.write("t.yaml", f"settings:\n  {key}: {value}\n" + task())
    err = one_error(f)
    assert f"{f}:2:" in err and "≤" in err and len(err) < 300, err


def test_long_task_id_is_refused(project: Project) -> None:
    f = project.write("t.yaml", task(tid="a" * 300))
    err = one_error(f)
    assert f"{f}:2:" in err and "200" in err


@pytest.mark.parametrize("output", ["d/" + "x" * 256 + ".md", "x" * 230 + "/a.md",
                                    "é" * 130 + ".md"])
def test_long_output_component_is_refused(project: Project, output: str) -> None:
    f = project.write("t.yaml", task(output=output))
    err = one_error(f)
    assert f"{f}:5:" in err and "200 bytes" in err


def test_overlong_output_path_is_refused(project: Project) -> None:
    deep = "/".join(["d" * 150] * 30) + "/a.md"  # 4,500 bytes
    f = project.write("t.yaml", task(output=deep))
    assert "too long" in one_error(f)


@pytest.mark.parametrize("char", ["\x00", "\n", "\x1b"])
def test_control_character_in_output_is_refused(project: Project, char: str) -> None:
    f = project.write("t.yaml", task(output=f"a{char}b.md"))
    err = one_error(f)
    assert f"{f}:5:" in err and "control character" in err


def test_nul_in_an_argument_prompt_is_refused(project: Project) -> None:
    f = project.write("t.yaml", task(prompt="echo a\x00b"))
    err = one_error(f)
    assert f"{f}:4:" in err and "NUL" in err


def test_long_prompt_for_an_argument_agent_is_refused(project: Project) -> None:
    project.write(".aiwg/dispatch.toml", """\
        [agents.argy]
        command = ["echo"]
        prompt = "arg"
    """)
    f = project.write("t.yaml", task(agent="argy", prompt="x" * 200_000))
    err = one_error(f)
    assert f"{f}:4:" in err and "prompt = \"stdin\"" in err


@pytest.mark.parametrize("env", ['{ "A=B" = "x" }', '{ "" = "x" }', '{ A = "x\\u0000y" }',
                                 '{ "A\\u0000" = "x" }'])
def test_bad_config_env_is_refused(project: Project, env: str) -> None:
    project.write(".aiwg/dispatch.toml", f"""\
        [agents.e]
        command = ["cat"]
        env = {env}
    """)
    f = project.write("t.yaml", task(agent="e"))
    err = one_error(f)
    assert "[agents.e]" in err and "env" in err, err


def test_long_shell_script_runs(project: Project) -> None:
    """A shell prompt over 128 KiB (Linux's limit for one argument) still runs."""
    script = "".join(f": line {i} {'x' * 60}\n" for i in range(3000)) + "echo ran $0\n"
    assert len(script) > 200_000
    project.write("t.yaml", task(prompt=script))
    proc = project.run("t.yaml")
    assert proc.returncode == 0, proc.stderr
    assert (project.root / ".aiwg/working/a.txt").read_text().startswith("ran ")


# -- item 14: reserved names, stale staging, device files, descriptors ------------------------
@pytest.mark.parametrize("output", [".dispatch-journal.jsonl", ".dispatch-state.toml",
                                    ".dispatch-state.toml.abc.tmp", "dispatch-report.json",
                                    "logs/x.md", ".dispatch/staging/x",
                                    "sub/.a.md.20260101T000000Z-abcdef.1.partial"])
def test_reserved_output_names_are_refused(project: Project, output: str) -> None:
    f = project.write("t.yaml", task(output=output))
    err = one_error(f)
    assert f"{f}:5:" in err and "reserved" in err


def test_staging_of_a_crashed_run_is_cleaned_at_the_next_start(project: Project) -> None:
    out = project.root / ".aiwg/working"
    stale = out / ".dispatch/staging/20250101T000000Z-dead00/a.1"
    stale.mkdir(parents=True)
    (stale / "big.bin").write_bytes(b"x" * 1000)
    project.write("t.yaml", task())
    assert project.run("t.yaml").returncode == 0
    assert not (out / ".dispatch").exists()


def test_staging_of_a_live_run_is_kept(project: Project) -> None:
    """Another dispatcher still running on the same output dir keeps its staging."""
    out = project.root / ".aiwg/working"
    live = out / ".dispatch/staging/20250101T000000Z-a11ve0/a.1"
    live.mkdir(parents=True)
    out.joinpath(".dispatch-state.toml").write_text(
        f'version = 1\n[last_run]\nrun_id = "20250101T000000Z-a11ve0"\nstatus = "running"\n'
        f"pid = {os.getppid()}\n")
    project.write("t.yaml", task())
    assert project.run("t.yaml").returncode == 0
    assert live.is_dir()


@pytest.mark.parametrize("target", ["/dev/zero", "/dev/null", "fifo"])
def test_device_task_file_is_refused(project: Project, target: str) -> None:
    """`/dev/zero` reports size 0 and never ends; a FIFO without a writer never answers."""
    path = Path(target)
    if target == "fifo":
        path = project.root / "t.yaml"
        os.mkfifo(path)
    err = one_error(path, cwd=project.root)
    assert "not a regular file" in err


def test_directory_task_file_is_refused(project: Project) -> None:
    (project.root / "t.yaml").mkdir()
    assert "directory" in one_error(project.root / "t.yaml")


def test_proc_file_is_read_with_a_hard_cap(project: Project) -> None:
    """/proc files report size 0: the cap applies to what is read, not to st_size."""
    err = one_error(Path("/proc/self/maps"))
    assert "invalid YAML" in err or "mapping" in err or "tasks" in err


def test_few_file_descriptors_lower_parallelism_instead_of_failing(project: Project) -> None:
    """With `ulimit -n 64`, 64 agents at once fail with EMFILE: run fewer, and say so."""
    n = 80
    project.write("t.yaml", "settings: {max_parallel: 64}\ntasks:\n" + "".join(
        f"  - {{id: t{i}, agent: shell, prompt: 'sleep 0.3; echo {i}', output: o/t{i}.txt}}\n"
        for i in range(n)))
    proc = subprocess.run(
        ["/bin/sh", "-c", f"ulimit -n 64 && exec {sys.executable} -m parallel_dispatch t.yaml"],
        cwd=project.root, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = project.report()
    assert report["summary"]["succeeded"] == n  # type: ignore[index]
    assert any("ulimit -n" in note for note in report["notes"])  # type: ignore[union-attr]


# -- item 13: a read-only or full output directory ------------------------------------------
@contextlib.contextmanager
def tmpfs(where: Path, size: str, *, read_only: bool = False) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def can_mount() -> bool:
    return os.geteuid() == 0 and sys.platform.startswith("linux")


@pytest.mark.skipif(not can_mount(), reason="needs root to mount a tmpfs")
def test_read_only_output_dir_is_a_clear_error(project: Project) -> None:
    with tmpfs(project.root / "ro", "1m", read_only=True):
        project.write("t.yaml", "settings: {output_dir: ro}\n" + task())
        proc = project.run("t.yaml")
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert "ro" in proc.stderr and "Read-only file system" in proc.stderr


def test_unwritable_output_dir_is_a_clear_error(project: Project) -> None:
    project.write("t.yaml", "settings: {output_dir: /proc/self/x}\n" + task())
    proc = project.run("t.yaml")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "/proc/self/x" in proc.stderr


@pytest.mark.skipif(not can_mount(), reason="needs root to mount a tmpfs")
def test_full_output_dir_still_gets_a_report_and_is_not_kept_full(project: Project) -> None:
    with tmpfs(project.root / "full", "2m") as mnt:
        project.write("t.yaml", "settings: {output_dir: full}\n" + task(
            prompt="head -c 10000000 /dev/zero", output="huge.bin") + task(
            prompt="echo small", output="small.txt", tid="b").replace("tasks:\n", ""))
        proc = project.run("t.yaml")
        assert "Traceback" not in proc.stderr, proc.stderr
        assert proc.returncode == 1, proc.stderr
        report = json.loads((mnt / "dispatch-report.json").read_text())
        st = {t["id"]: t for t in report["tasks"]}
        assert st["a"]["status"] == "failed"
        assert st["b"]["status"] in ("succeeded", "failed")
        assert "No space left" in (st["a"]["error"] or "") or "full" in (st["a"]["error"] or "")
        free = os.statvfs(mnt)
        assert free.f_bavail * free.f_frsize > 1_000_000  # the partial output was dropped
        assert not (mnt / "huge.bin").exists()


@pytest.mark.skipif(not can_mount(), reason="needs root to mount a tmpfs")
def test_report_goes_elsewhere_when_the_output_dir_stays_full(project: Project,
                                                              tmp_path: Path) -> None:
    """Something else fills the disk: the report goes to the temp dir, and we say where."""
    with tmpfs(project.root / "full", "1m") as mnt:
        project.write("t.yaml", "settings: {output_dir: full}\n" + task(
            prompt=f"head -c 2000000 /dev/zero > {mnt}/filler; echo hi"))
        proc = project.run("t.yaml")
        assert "Traceback" not in proc.stderr, proc.stderr
        where = [line for line in proc.stdout.splitlines() if line.startswith("report: ")]
        assert where, proc.stdout + proc.stderr
        path = Path(where[0].removeprefix("report: "))
        assert path.exists() and not str(path).startswith(str(mnt))
        assert "No space left" in path.read_text()
        with contextlib.suppress(OSError):
            for p in path.parent.iterdir():
                p.unlink()
            path.parent.rmdir()


def test_a_symlink_loop_under_a_tasks_files_glob_is_not_followed(project: Project) -> None:
    """A task's `files:` glob is hashed into its fingerprint at run time; `glob` followed
    symlinked folders, so links back up the tree made the run hang before any task."""
    symlink_loops(project.root)
    project.write("t.yaml", """\
        tasks:
          - id: r
            agent: shell
            prompt: "true"
            output: r.txt
            files: ["src/**/*.py"]
    """)
    first = project.run("t.yaml", "--resume", timeout=60)
    assert first.returncode == 0, first.stderr
    again = project.run("t.yaml", "--resume", timeout=60)
    assert "1 cached" in again.stderr, again.stderr
    (project.root / "src/x/a.py").write_text("a = 2\n")  # the file is still hashed
    edited = project.run("t.yaml", "--resume", timeout=60)
    assert "1 succeeded" in edited.stderr, edited.stderr
