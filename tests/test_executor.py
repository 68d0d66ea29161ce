"""The executor seam without a cluster: the worker's half of a remote attempt
(`remote.attempt`, the shepherd) run here as real processes, path mapping, shipping and
returning files, the `[executor]` config and `--executor`.

The same code runs inside a Ray worker in tests/ray/ (which needs root and a private
network namespace); here it runs in the test process, so every case is cheap.
"""

from __future__ import annotations

import ast
import io
import os
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import parallel_dispatch
from parallel_dispatch import remote
from parallel_dispatch.config import load_config
from parallel_dispatch.errors import ConfigError
from parallel_dispatch.executor import LocalExecutor, valid_choice
from parallel_dispatch.runners import RunnerSet


def _survivors(marker: str) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmd and state not in ("Z", "X"):
            out.append(int(entry))
    return out


def _gone(marker: str, within: float = 30) -> bool:
    deadline = time.monotonic() + within
    while _survivors(marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _req(argv: list[str], cwd: Path, **extra: Any) -> dict[str, Any]:
    req: dict[str, Any] = {"argv": argv, "cwd": str(cwd), "env": dict(os.environ),
                           "stdin": b"", "grace": 1.0, "deadline_s": None, "root": str(cwd),
                           "sends": [], "returns": [], "tree": None, "label": "t#1"}
    req.update(extra)
    return req


def _drain(gen: Iterator[tuple[str, Any]]) -> tuple[bytes, bytes, dict[str, Any]]:
    out, err, status = b"", b"", {}
    for kind, data in gen:
        if kind == "out":
            out += data
        elif kind == "err":
            err += data
        else:
            status = data
    return out, err, status


def test_an_attempt_streams_both_streams_and_its_exit_code(tmp_path: Path) -> None:
    req = _req(["bash", "-c", "echo out; echo err >&2; head -c 600000 /dev/zero; exit 3"],
               tmp_path)
    out, err, status = _drain(remote.attempt(req, None, "shared"))
    assert out.startswith(b"out\n") and len(out) == 4 + 600000  # > one chunk: streamed
    assert err == b"err\n"
    assert status["code"] == 3 and status["survivors"] == []


def test_the_prompt_reaches_the_agent_on_stdin(tmp_path: Path) -> None:
    req = _req(["cat"], tmp_path, stdin="naïve prompt\n".encode())
    out, _, status = _drain(remote.attempt(req, None, "shared"))
    assert (out, status["code"]) == ("naïve prompt\n".encode(), 0)


def test_a_command_that_cannot_start_is_a_spawn_error(tmp_path: Path) -> None:
    _, _, status = _drain(remote.attempt(_req([str(tmp_path / "nope")], tmp_path), None,
                                         "shared"))
    assert status["spawn_error"][0] == 2  # ENOENT: the driver raises it as an OSError


def test_closing_the_stream_kills_the_agent_and_its_tools(tmp_path: Path) -> None:
    """What a cancelled or dead Ray worker does: its end of `life` closes; the detached
    shepherd kills the agent's group (the agent runs in its own session, so nothing
    else would)."""
    mark = f"PDX{uuid.uuid4().hex[:8]}"
    req = _req(["bash", "-c", f"(exec -a {mark}-tool sleep 300) & echo started; "
                              f"exec -a {mark}-agent sleep 300"], tmp_path)
    gen = remote.attempt(req, None, "shared")
    assert next(gen) == ("out", b"started\n")
    deadline = time.monotonic() + 30
    while len(_survivors(mark)) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    gen.close()
    assert _gone(mark), f"left alive: {_survivors(mark)}"


def test_the_shepherd_enforces_its_own_deadline(tmp_path: Path) -> None:
    """A driver that vanished cancels nothing: the shepherd's backstop kills the agent."""
    mark = f"PDB{uuid.uuid4().hex[:8]}"
    request = {"argv": ["bash", "-c", f"exec -a {mark} sleep 300"], "cwd": str(tmp_path),
               "env": dict(os.environ), "stdin": "", "grace": 0.5, "backstop_s": 1.0}
    gen = remote._run_shepherd(request, 0.5)
    with pytest.raises(StopIteration) as ended:
        while True:
            next(gen)
    assert ended.value.value == {"code": -1, "cause": "deadline"}
    assert _gone(mark)


def test_path_map_matches_whole_components_longest_first() -> None:
    paths = remote.PathMap({"/p": "/n/p", "/p/.aiwg/working/x": "/n/s0"})
    assert paths("/p") == "/n/p"
    assert paths("/p/src/a.py") == "/n/p/src/a.py"
    assert paths("/pq/a") == "/pq/a"
    assert paths("/p/.aiwg/working/x/out.md") == "/n/s0/out.md"
    assert paths("--file=/p/a and /p") == "--file=/n/p/a and /n/p"
    assert remote.PathMap({})("/p") == "/p"


def _worktree(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "a.txt").write_text("one\n")
    (path / ".git").write_text("gitdir: /somewhere/else\n")  # a worktree's .git is a file
    return path


def test_working_dir_mode_runs_in_a_private_copy_with_shipped_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The node's copy of the upload is the worker's cwd; the attempt copies it, unpacks
    the dependency output, staging folder and worktree the driver sent, rewrites the
    driver's paths, and brings back the staging folder and the worktree's changes."""
    node_copy = tmp_path / "ray_pkg"
    node_copy.mkdir()
    (node_copy / "notes.txt").write_text("project file\n")
    driver = tmp_path / "driver"
    dep = driver / ".aiwg/working/dep.md"
    dep.parent.mkdir(parents=True)
    dep.write_text("dependency output\n")
    staging = driver / ".aiwg/working/.staging/t"
    staging.mkdir(parents=True)
    (staging / "script.sh").write_text("echo from the staging folder\n")
    tree = _worktree(driver / ".aiwg/worktrees/run/t")
    script = (f'cat notes.txt; cat "{dep}"; sh "{staging}/script.sh"; pwd > "{staging}/pwd";'
              f' echo out > "{staging}/out.md"; cd "{tree}" && echo two >> a.txt'
              f' && echo new > b.txt; echo scribble > "{driver}/notes.txt"')
    req = _req(["bash", "-c", script], driver, root=str(driver), sends=[str(dep), str(staging)],
               returns=[str(staging)], tree=str(tree))
    blob = remote.pack(req["sends"], req["tree"])
    monkeypatch.chdir(node_copy)
    out, err, status = _drain(remote.attempt(req, blob, "working_dir", str(tmp_path)))
    assert status["code"] == 0, err
    assert out == b"project file\ndependency output\nfrom the staging folder\n"
    assert (node_copy / "notes.txt").read_text() == "project file\n"  # never run in it
    back = tmp_path / "back"
    remote.unpack_returns(status["returns"], [str(back)])
    assert (back / "out.md").read_text() == "out\n"
    ran_in = (back / "pwd").read_text().strip()
    assert ran_in.startswith(str(tmp_path / "pd-t_1-")) and ran_in.endswith("/p")
    assert not Path(ran_in).exists()  # the private copy is gone
    patch = status["patch"].decode()
    assert "+two" in patch and "b/b.txt" in patch and ".git" not in patch.split("diff")[0]
    subprocess.run(["git", "init", "-q", str(back / "w")], check=True)
    (back / "w" / "a.txt").write_text("one\n")
    subprocess.run(["git", "apply", "-"], cwd=back / "w", input=status["patch"], check=True)
    assert (back / "w" / "a.txt").read_text() == "one\ntwo\n"


def test_only_files_and_folders_come_back(tmp_path: Path) -> None:
    """A worker cannot make the driver write outside the staging folder: links are not
    returned, and a member that climbs out is refused."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    (src / "link").symlink_to("/etc/passwd")
    blob = remote._strip_links(remote.pack([str(src)]))
    dest = tmp_path / "dest"
    remote.unpack_returns(blob or b"", [str(dest)])
    assert sorted(p.name for p in dest.iterdir()) == ["f"]
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as tar:
        info = tarfile.TarInfo("0/../../escaped")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(tarfile.OutsideDestinationError):
        remote.unpack_returns(evil.getvalue(), [str(dest)])
    assert not (tmp_path / "escaped").exists()


def _config(tmp_path: Path, text: str) -> Path:
    (tmp_path / ".aiwg").mkdir(exist_ok=True)
    (tmp_path / ".aiwg" / "dispatch.toml").write_text(text)
    return tmp_path


@pytest.mark.parametrize(("text", "line", "message"), [
    ('[executor]\nworkspace = "nfs"\n', 1, "workspace must be"),
    ('[executor]\nkind = "k8s"\n', 2, "kind"),
    ('[executor]\nforward_env = ["OK", "NOT OK"]\n', 2, "not an environment variable"),
    ('[agents.a]\ncommand = ["x"]\nresources = { gpu = 0 }\n', 3, "greater than 0"),
])
def test_executor_config_errors_name_the_line(tmp_path: Path, text: str, line: int,
                                              message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(_config(tmp_path, text))
    d = caught.value.diagnostics[0]
    assert d.line == line and message in d.message, d.format()


def test_resources_keep_their_config_line_for_errors_found_on_the_cluster(
        tmp_path: Path) -> None:
    config = load_config(_config(tmp_path, (
        '[executor]\nkind = "ray"\nresources = { agent_slot = 1 }\n\n'
        '[agents.a]\ncommand = ["x"]\nresources = { claude_cli = 1 }\n')))
    assert config.executor.kind == "ray"
    assert dict(config.executor.resources) == {"agent_slot": 1.0}
    assert config.lines == {"executor.resources": 3, "agents.a.resources": 7}


def test_executor_choices() -> None:
    for good in ("local", "ray", "ray:127.0.0.1:6379", "ray://head:10001", "ray:[::1]:1"):
        assert valid_choice(good), good
    for bad in ("k8s", "ray:", "ray:host", "ray:host:0", "ray://host:99999", "ray:host:x"):
        assert not valid_choice(bad), bad
    assert isinstance(RunnerSet().executor, LocalExecutor)


def test_a_bad_executor_flag_is_a_usage_error(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "parallel_dispatch", "x.yaml", "--executor",
                           "k8s"], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "expected local, ray or ray:HOST:PORT, got 'k8s'" in proc.stderr


def test_only_the_ray_executor_imports_ray_and_only_on_demand() -> None:
    """`ray` (optional, 0.4 s to import) stays out of every other module, and the module
    that imports it is itself imported only inside the functions that need it."""
    package = Path(parallel_dispatch.__file__).parent
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "ray" or n.startswith("ray.") for n in names):
                assert path.name == "ray_executor.py", f"{path} imports ray"
    code = ("import sys, parallel_dispatch.cli.main, parallel_dispatch.api, "
            "parallel_dispatch.service.daemon, parallel_dispatch.executor; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.endswith('ray_executor')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert proc.stdout.strip() == "[]"


def test_ray_client_addresses_are_refused_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text("name: x\ntasks:\n  - id: a\n    agent: shell\n"
                                     "    output: a.md\n    prompt: 'echo hi'\n")
    proc = subprocess.run([sys.executable, "-m", "parallel_dispatch", "t.yaml", "--executor",
                           "ray://127.0.0.1:10001"], capture_output=True, text=True,
                          cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Ray Client (ray://) is not supported" in proc.stderr
    assert "--executor ray:HOST:6379" in proc.stderr and "Traceback" not in proc.stderr


def test_a_descendant_that_left_the_group_dies_with_the_attempt(tmp_path: Path) -> None:
    """`setsid` takes a process out of the agent's group; the attempt's marker in its
    environment still finds it when the agent ends."""
    mark = f"PDS{uuid.uuid4().hex[:8]}"
    req = _req(["bash", "-c", f"setsid bash -c 'exec -a {mark} sleep 300' >/dev/null 2>&1 & "
                              f"until pgrep -f {mark} >/dev/null; do sleep 0.05; done; "
                              "echo leaving"], tmp_path)
    out, _, status = _drain(remote.attempt(req, None, "shared"))
    assert (out, status["code"], status["survivors"]) == (b"leaving\n", 0, [])
    assert _gone(mark, within=5), f"escaped: {_survivors(mark)}"
