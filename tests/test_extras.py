"""The optional extras (issue 9 §21): the daemon and the Action are extras, the core
is not, and a missing extra is one clear line and exit 2, never a traceback.

"Missing" is made real in a subprocess: a meta-path finder placed first raises
ModuleNotFoundError for the blocked distributions, exactly as an interpreter without
them would, while the rest of the test venv stays as it is.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent

RUN_CLI_WITHOUT = textwrap.dedent("""\
    import importlib.abc, runpy, sys

    class Uninstalled(importlib.abc.MetaPathFinder):
        def __init__(self, names):
            self.names = set(names)

        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in self.names:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Uninstalled(sys.argv[1].split(",")))
    sys.argv = ["parallel-dispatch", *sys.argv[2:]]
    runpy.run_module("parallel_dispatch", run_name="__main__", alter_sys=True)
""")


def cli_without(blocked: str, *argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`parallel-dispatch ARGV` in an interpreter where `blocked` is not installed."""
    return subprocess.run([sys.executable, "-c", RUN_CLI_WITHOUT, blocked, *argv],
                          cwd=cwd, capture_output=True, text=True, timeout=60, check=False,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize(("blocked", "argv", "extra"), [
    ("watchfiles", ("watch", "."), "daemon"),
    ("github", ("action",), "action"),
    ("requests", ("action",), "action"),
])
def test_a_missing_extra_is_one_line_naming_it(tmp_path: Path, blocked: str,
                                               argv: tuple[str, ...], extra: str) -> None:
    (tmp_path / ".aiwg" / "tasks").mkdir(parents=True)
    proc = cli_without(blocked, *argv, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"needs the '{extra}' extra" in proc.stderr
    assert f"No module named '{blocked}'" in proc.stderr
    assert proc.stderr.rstrip().endswith(f"pip install 'parallel-dispatch[{extra}]'")
    assert list((tmp_path / ".aiwg").rglob("*")) == [tmp_path / ".aiwg" / "tasks"]


def test_an_import_error_of_anything_else_is_not_blamed_on_an_extra(tmp_path: Path) -> None:
    """A broken core module is a bug to see in full, not advice to install an extra."""
    (tmp_path / ".aiwg" / "tasks").mkdir(parents=True)
    proc = cli_without("trio", "watch", ".", cwd=tmp_path)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr
    assert "extra" not in proc.stderr


def test_the_core_commands_need_no_extra(tmp_path: Path) -> None:
    """README step 1 on a plain install: run, validate and plan without either extra."""
    (tmp_path / "t.yaml").write_text(textwrap.dedent("""\
        tasks:
          - {id: a, agent: shell, prompt: 'echo hello', output: a.txt}
          - {id: b, agent: shell, prompt: 'cat', output: b.txt, dependencies: [a]}
    """))
    blocked = "watchfiles,github,requests"
    for argv in (("validate", "t.yaml"), ("plan", "t.yaml"), ("-q", "t.yaml")):
        proc = cli_without(blocked, *argv, cwd=tmp_path)
        assert proc.returncode == 0, (argv, proc.stderr)
        assert "extra" not in proc.stderr
    outputs = tmp_path / ".aiwg" / "working"
    assert (outputs / "a.txt").read_text() == "hello\n"
    assert (outputs / "dispatch-report.json").is_file()


def test_doctor_lists_the_extras(tmp_path: Path) -> None:
    (tmp_path / ".git").mkdir()
    proc = cli_without("watchfiles", "doctor", cwd=tmp_path)
    assert "Traceback" not in proc.stderr
    assert ("· daemon    not installed, so `parallel-dispatch watch` is unavailable: "
            "pip install 'parallel-dispatch[daemon]'") in proc.stdout
    assert "✓ action    `parallel-dispatch action`" in proc.stdout
    assert "problem" not in proc.stdout.split("Extras:")[1].split("\n\n")[0]


def pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() for r in requirements}


def test_extras_split_in_pyproject() -> None:
    project = pyproject()["project"]
    assert isinstance(project, dict)
    extras = project["optional-dependencies"]
    assert not names(project["dependencies"]) & {"watchfiles", "pygithub", "requests"}
    assert names(extras["daemon"]) == {"watchfiles"}
    assert names(extras["action"]) == {"pygithub", "requests"}
    assert names(extras["ray"]) == {"ray"} and "ray" not in names(project["dependencies"])
    assert names(extras["mcp"]) == {"mcp"} and "mcp" not in names(project["dependencies"])
    # `pip install '.[test]'` (README step 2, .ci/run) installs the front ends, Ray and MCP.
    assert "parallel-dispatch[daemon,action,ray,mcp]" in extras["test"]


def test_the_docker_image_and_the_action_install_their_extras() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"pip install [^\n]*'\./\[daemon\]'", dockerfile), dockerfile
    action = yaml.safe_load((ROOT / "action.yml").read_text(encoding="utf-8"))
    install = next(s["run"] for s in action["runs"]["steps"]
                   if s.get("name") == "Install parallel-dispatch")
    assert '"$GITHUB_ACTION_PATH[action]"' in install
