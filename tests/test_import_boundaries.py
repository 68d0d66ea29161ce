"""The package's shape, enforced: which module may import which (docs/architecture.md).

* The core (the flat modules and `runners/`) never imports a front end (`cli/`,
  `service/`, `github/`): the scheduler, the runners and the reports must work the
  same whoever drives them.
* Front ends do not import each other: each talks to the core.  The one exception is
  the CLI *launching* the others for `parallel-dispatch watch` and `... action`, and
  only from inside the function that runs that subcommand (not at import time).
* Validating a task file imports no execution machinery: no runner, process handling,
  HTTP, file watching or trio (`presets.py` holds what validation needs).

An AST walk rather than import-linter: these three rules are twenty lines here, need
no configuration language and no extra test dependency, and the walk also tells
module-level imports from those inside a function, which the second rule needs.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import parallel_dispatch

PACKAGE = Path(parallel_dispatch.__file__).parent
FRONT_ENDS = ("cli", "service", "github", "assistant")
LAUNCHES = {
    ("parallel_dispatch.cli.main", "parallel_dispatch.service.daemon"),  # `watch`
    ("parallel_dispatch.cli.main", "parallel_dispatch.github.action"),  # `action`
    ("parallel_dispatch.cli.main", "parallel_dispatch.service.webpage"),  # `serve`, `--http`
    ("parallel_dispatch.cli.main", "parallel_dispatch.assistant.mcp_server"),  # `mcp`
    ("parallel_dispatch.cli.main", "parallel_dispatch.assistant.claude_init"),  # `init --claude`
}
"""Front end → front end imports allowed, each only inside a function."""
ENTRY_POINTS = {"parallel_dispatch.__main__"}
"""`python -m parallel_dispatch`: above every front end, as the console script is."""


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    lazy: bool
    """Inside a function: runs when called, not when the module is imported."""


def module_name(path: Path, root: Path = PACKAGE) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(source: str, name: str, is_package: bool) -> list[Edge]:
    """Every `parallel_dispatch` module `source` imports, relative imports resolved."""
    tree = ast.parse(source)
    here = name.split(".") if is_package else name.split(".")[:-1]
    edges: list[Edge] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                edges.extend(Edge(name, a.name, child.lineno, inner) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = here[:len(here) - child.level + 1]
                    target = ".".join([*base, *([child.module] if child.module else [])])
                else:
                    target = child.module or ""
                if child.module is None:  # `from . import x`: x is a module here
                    edges.extend(Edge(name, f"{target}.{a.name}", child.lineno, inner)
                                 for a in child.names)
                else:
                    edges.append(Edge(name, target, child.lineno, inner))
            visit(child, inner)

    visit(tree, False)
    return [e for e in edges if e.target.split(".")[0] == "parallel_dispatch"]


def package_edges() -> list[Edge]:
    edges = []
    for path in sorted(PACKAGE.rglob("*.py")):
        edges += imports(path.read_text(encoding="utf-8"), module_name(path),
                         path.name == "__init__.py")
    return edges


def front_end(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in FRONT_ENDS else None


def violations(edges: list[Edge]) -> list[str]:
    found = []
    for e in edges:
        src, dst = front_end(e.source), front_end(e.target)
        if dst is None or src == dst or e.source in ENTRY_POINTS:
            continue
        where = f"{e.source} (line {e.line}) imports {e.target}"
        if src is None:
            found.append(f"{where}: the core must not import a front end")
        elif (e.source, e.target) not in LAUNCHES:
            found.append(f"{where}: front ends talk to each other only through the core")
        elif not e.lazy:
            found.append(f"{where}: a launched front end is imported inside the function "
                         "that runs its subcommand, never at import time")
    return found


def test_the_core_imports_no_front_end_and_front_ends_only_the_core() -> None:
    edges = package_edges()
    assert len(edges) > 100  # the walk saw the package's imports at all
    assert violations(edges) == []


def test_every_launch_exception_is_still_used() -> None:
    """An allowance nobody needs any more is removed, not left open."""
    used = {(e.source, e.target) for e in package_edges()}
    assert used >= LAUNCHES


def test_the_checker_catches_each_kind_of_violation() -> None:
    core = imports("from .cli import main\nfrom .service.daemon import run_daemon\n",
                   "parallel_dispatch.scheduler", False)
    sideways = imports("from ..service import watcher\n", "parallel_dispatch.github.action",
                       False)
    eager = imports("from ..github.action import main\n", "parallel_dispatch.cli.main", False)
    lazy = imports("def f():\n    from ..github.action import main\n",
                   "parallel_dispatch.cli.main", False)
    assert [e.target for e in core] == ["parallel_dispatch.cli",
                                        "parallel_dispatch.service.daemon"]
    assert len(violations(core)) == 2
    assert sideways[0].target == "parallel_dispatch.service"
    assert "only through the core" in violations(sideways)[0]
    assert "inside the function" in violations(eager)[0]
    assert violations(lazy) == []


def test_public_api_names_are_all_exported() -> None:
    """`__init__` resolves its names lazily: each must exist where it points."""
    for name in parallel_dispatch.__all__:
        assert getattr(parallel_dispatch, name) is not None, name
    assert set(parallel_dispatch.__all__) == {*parallel_dispatch._EXPORTS, "__version__"}


EXECUTION = ("parallel_dispatch.runners", "parallel_dispatch.process", "parallel_dispatch.orphans",
             "parallel_dispatch.outputs", "parallel_dispatch.scheduler", "parallel_dispatch.api",
             "parallel_dispatch.cli", "parallel_dispatch.service", "parallel_dispatch.github",
             "trio", "httpx", "github", "watchfiles")


def test_validating_a_file_imports_no_execution_machinery(tmp_path: Path) -> None:
    (tmp_path / ".aiwg").mkdir()
    (tmp_path / ".aiwg" / "dispatch.toml").write_text(textwrap.dedent("""\
        [defaults]
        runner = "codex"
        [agents.local]
        runner = "openai"
        model = "llama3"
    """))
    agents = tmp_path / ".claude" / "agents"
    agents.mkdir(parents=True)
    (agents / "reviewer.md").write_text(
        "---\nname: reviewer\ndescription: reviews\nmodel: sonnet\n---\nReview it.\n")
    (tmp_path / "t.yaml").write_text(textwrap.dedent("""\
        tasks:
          - {id: a, agent: shell, prompt: 'echo a', output: a.txt}
          - {id: b, agent: reviewer, prompt: review, output: b.md, dependencies: [a]}
          - {id: c, agent: local, prompt: summarise, output: c.md, dependencies: [b]}
    """))
    code = textwrap.dedent("""\
        import json, sys
        from parallel_dispatch.loader import load_spec
        spec = load_spec(sys.argv[1])
        notes = [n for a in spec.agents for n in a.notes]
        print(json.dumps({"tasks": len(spec.tasks), "notes": notes,
                          "modules": sorted(sys.modules)}))
    """)
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "t.yaml")],
                          capture_output=True, text=True, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["tasks"] == 3
    # the preset facts were consulted: codex is not handed a Claude model name
    assert any("not a model for the codex runner" in n for n in out["notes"])
    loaded = [m for m in out["modules"]
              if any(m == x or m.startswith(x + ".") for x in EXECUTION)]
    assert loaded == []


def test_version_and_help_import_nothing_they_do_not_use() -> None:
    """`--version` and `--help` cost an interpreter start (issue 9 §23): argparse and
    the CLI module, none of the core, pydantic, PyYAML or trio."""
    code = textwrap.dedent("""\
        import json, sys
        from parallel_dispatch.cli import main
        code = main(sys.argv[1:])
        print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
    """)
    for flag in ("--version", "--help"):
        proc = subprocess.run([sys.executable, "-c", code, flag], capture_output=True,
                              text=True, check=False)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout.splitlines()[-1])
        assert out["code"] == 0
        ours = [m for m in out["modules"] if m.split(".")[0] == "parallel_dispatch"]
        assert ours == ["parallel_dispatch", "parallel_dispatch.cli",
                        "parallel_dispatch.cli.main"], flag
        heavy = [m for m in out["modules"] if m.split(".")[0] in
                 ("trio", "pydantic", "pydantic_core", "yaml", "httpx", "watchfiles", "github")]
        assert heavy == [], flag
