"""The hostile corpus (tests/corpus/): every file validates and runs cleanly, or is refused.

Each entry is a task file `tests/corpus/<name>.yaml` (with `<name>.toml` as its
`.aiwg/dispatch.toml` when there is one, else `_default.toml`), or one built by
`tests/corpus/generated.py`. Its header says what it attacks and what must happen:

    # attacks: <what it attacks>
    # expect: ok | fails | refused | run-refused
    # error-line: N (at: <text on that line>)      the task file's line N is reported
    # config-error-line: N (at: <text>)            the config's line N is reported
    # no-line: <why>                               refused where no line exists
    # setup: mkdir|file|fifo <path> | symlink <path> -> <target>   before the run
    # config: none                                 no .aiwg/dispatch.toml at all
    # fails: <why>                                 (expect: fails) why a task fails
    # why: <why>                                   (expect: run-refused) why not earlier

For each entry the real CLI runs `validate NAME.yaml` and `run NAME.yaml` (two test
items, so xdist spreads them) in a fresh project holding only that file and its
config, with its own HOME and TMPDIR:

* `ok`: validate exits 0; run exits 0 and writes its report.
* `fails`: validate exits 0; run exits 1 (a task fails by design) and writes its report.
* `refused`: both exit 2 with `NAME.yaml:LINE:` (or `.aiwg/dispatch.toml:LINE:`) on
  every diagnostic — `NAME.yaml:` alone only for `no-line` entries — and nothing in
  the project, HOME or TMPDIR changes (compared file by file, directories included).
* `run-refused`: the file is valid, but the run finds the environment refuses it (an
  output dir the kernel will not create): validate exits 0, run exits 2 with one
  `parallel-dispatch: error:` line, and nothing changes.

No entry may print a `Traceback`. The CLI runs as `python -m parallel_dispatch`,
forked from a warm interpreter (`corpus/forkserver.py`): ~600 cold starts would
take minutes on 2 cores. `CORPUS_COLD=1` runs every entry as a cold subprocess
instead; `test_forkserver_matches_a_cold_start` keeps the two honest.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from corpus.generated import GENERATED, Generated
from support import cli_env

CORPUS = Path(__file__).parent / "corpus"
DEFAULT_CONFIG = CORPUS / "_default.toml"
CONFIG_DISPLAY = ".aiwg/dispatch.toml"
EXPECTS = ("ok", "fails", "refused", "run-refused")
TIMEOUT = 120.0
"""Per command: generous, the slowest entry (100,000 tasks) takes a few seconds."""


@dataclass(frozen=True)
class Entry:
    name: str
    meta: dict[str, list[str]]
    source: Path | Generated

    @property
    def expect(self) -> str:
        return self.meta["expect"][0]

    def one(self, key: str) -> str | None:
        values = self.meta.get(key)
        return values[0] if values else None

    def line(self, key: str) -> tuple[int, str] | None:
        """`error-line`/`config-error-line`: (line, the text expected on it)."""
        value = self.one(key)
        if value is None:
            return None
        m = re.fullmatch(r"(\d+) \(at: (.*)\)", value)
        assert m, f"{self.name}: malformed {key}: {value!r}"
        return int(m.group(1)), m.group(2)

    @property
    def timeout(self) -> float:
        return self.source.timeout if isinstance(self.source, Generated) else TIMEOUT

    def task_bytes(self) -> bytes:
        return self.source.build() if isinstance(self.source, Generated) else \
            self.source.read_bytes()

    def config_bytes(self) -> bytes | None:
        if self.one("config") == "none":
            return None
        if isinstance(self.source, Generated):
            return self.source.config() if self.source.config else DEFAULT_CONFIG.read_bytes()
        own = self.source.with_suffix(".toml")
        return (own if own.exists() else DEFAULT_CONFIG).read_bytes()


def _text(data: bytes) -> str:
    """The file's text, for its header: UTF-16 by its BOM, else UTF-8 (lossily)."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    return data.decode("utf-8", "replace").lstrip("\ufeff")


def parse_header(data: bytes) -> dict[str, list[str]]:
    meta: dict[str, list[str]] = {}
    for line in _text(data).splitlines():
        if not line.startswith("#"):
            break
        m = re.match(r"#\s*([a-z-]+):\s?(.*)$", line)
        if m:
            meta.setdefault(m.group(1), []).append(m.group(2).strip())
    return meta


def load_entries() -> list[Entry]:
    entries = [Entry(p.stem, parse_header(p.read_bytes()), p)
               for p in sorted(CORPUS.glob("*.yaml"))]
    for g in GENERATED:
        meta = {k: [v] for k, v in g.meta.items()} or parse_header(g.build()[:4096])
        entries.append(Entry(g.name, meta, g))
    return entries


ENTRIES = load_entries()


def test_the_corpus_is_big_and_every_entry_says_what_it_attacks() -> None:
    assert len(ENTRIES) >= 120, len(ENTRIES)
    assert len({e.name for e in ENTRIES}) == len(ENTRIES)
    for e in ENTRIES:
        assert e.one("attacks"), f"{e.name}: no '# attacks:' line"
        assert e.expect in EXPECTS, f"{e.name}: expect {e.expect!r}"
        if e.expect == "fails":
            assert e.one("fails"), f"{e.name}: say why a task fails ('# fails:')"
        if e.expect == "run-refused":
            assert e.one("why"), f"{e.name}: say why validation cannot see it ('# why:')"
    configs = {p.stem for p in CORPUS.glob("*.toml")} - {"_default"}
    assert configs <= {e.name for e in ENTRIES}, "a config without its task file"
    counts = {x: sum(e.expect == x for e in ENTRIES) for x in EXPECTS}
    assert counts["ok"] >= 20 and counts["refused"] >= 100, counts


def test_error_lines_point_at_the_text_they_name() -> None:
    """Keeps `error-line` honest when someone edits an entry's header or body."""
    for e in ENTRIES:
        for key, data in (("error-line", e.task_bytes), ("config-error-line", e.config_bytes)):
            where = e.line(key)
            if where is None:
                continue
            raw = data()
            assert raw is not None, e.name
            lines = _text(raw).splitlines() or [""]
            number, marker = where
            assert number <= len(lines), (e.name, key)
            if marker != "(blank)":  # (NULs out: a body in UTF-16 without its BOM)
                line = lines[number - 1].replace("\0", "")
                assert marker in line, (e.name, key, line[:80])


# -- running the CLI ---------------------------------------------------------------
@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str
    timed_out: bool = False

    @property
    def shown(self) -> str:
        return f"exit {self.rc}\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n" \
               f"{self.stderr[-3000:]}"


@dataclass
class ForkServer:
    """One warm `python -m parallel_dispatch` per xdist worker (see corpus/forkserver.py)."""

    proc: subprocess.Popen[str]
    capture: Path
    n: int = 0

    def __call__(self, argv: list[str], cwd: Path, env: dict[str, str],
                 timeout: float) -> Result:
        self.n += 1
        out, err = self.capture / f"{self.n}.out", self.capture / f"{self.n}.err"
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"argv": argv, "cwd": str(cwd), "env": env,
                                          "stdout": str(out), "stderr": str(err),
                                          "timeout": timeout}) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        result = Result(reply["rc"], _read(out), _read(err), reply["timed_out"])
        out.unlink()
        err.unlink()
        return result


def _read(path: Path) -> str:
    return path.read_bytes().decode("utf-8", "replace")


def cold(argv: list[str], cwd: Path, env: dict[str, str], timeout: float) -> Result:
    try:
        proc = subprocess.run([sys.executable, "-m", "parallel_dispatch", *argv], cwd=cwd,
                              env=env, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return Result(-1, _b(exc.stdout), _b(exc.stderr), timed_out=True)
    return Result(proc.returncode, _b(proc.stdout), _b(proc.stderr))


def _b(data: bytes | str | None) -> str:
    if isinstance(data, bytes):
        return data.decode("utf-8", "replace")
    return data or ""


@pytest.fixture(scope="session")
def forkserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    capture = tmp_path_factory.mktemp("corpus-capture")
    proc = subprocess.Popen([sys.executable, str(CORPUS / "forkserver.py")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=cli_env())
    assert proc.stdout is not None and json.loads(proc.stdout.readline()) == {"ready": True}
    try:
        yield ForkServer(proc, capture)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)


@pytest.fixture
def cli(forkserver: ForkServer) -> Any:
    return cold if os.environ.get("CORPUS_COLD") else forkserver


# -- a project per entry -----------------------------------------------------------
@dataclass
class Sandbox:
    """The entry's project, with a HOME and TMPDIR of its own: all of it is watched."""

    top: Path
    project: Path = field(init=False)

    def __post_init__(self) -> None:
        self.project = self.top / "project"
        for d in (self.project / ".aiwg", self.top / "home", self.top / "tmp"):
            d.mkdir(parents=True)

    @property
    def env(self) -> dict[str, str]:
        env = cli_env()
        for name in list(env):
            if name.startswith(("DISPATCH_", "GITHUB_", "INPUT_", "RUNNER_")):
                del env[name]
        env.update(HOME=str(self.top / "home"), TMPDIR=str(self.top / "tmp"),
                   PYTHONDONTWRITEBYTECODE="1")
        return env

    def setup(self, entry: Entry) -> str:
        name = f"{entry.name}.yaml"
        (self.project / name).write_bytes(entry.task_bytes())
        config = entry.config_bytes()
        if config is not None:
            (self.project / CONFIG_DISPLAY).write_bytes(config)
        for step in entry.meta.get("setup", []):
            kind, _, rest = step.partition(" ")
            if kind == "symlink":
                link, _, target = rest.partition(" -> ")
                path = self.project / link
                path.parent.mkdir(parents=True, exist_ok=True)
                path.symlink_to(target)
                continue
            path = self.project / rest
            path.parent.mkdir(parents=True, exist_ok=True)
            if kind == "mkdir":
                path.mkdir()
            elif kind == "file":
                path.write_text("not yours\n")
            elif kind == "fifo":
                os.mkfifo(path)
            else:
                raise AssertionError(f"{entry.name}: unknown setup {step!r}")
        return name

    def tree(self) -> dict[str, tuple[Any, ...]]:
        """Every path under `top`: kind, size, mtime, link target (symlinks not followed)."""
        found: dict[str, tuple[Any, ...]] = {}
        for dirpath, dirnames, filenames in os.walk(self.top):
            for n in (*dirnames, *filenames):
                p = os.path.join(dirpath, n)
                st = os.lstat(p)
                link = os.readlink(p) if os.path.islink(p) else None
                found[os.path.relpath(p, self.top)] = (st.st_mode, st.st_size, st.st_mtime_ns,
                                                       link)
        root = os.lstat(self.top)
        found["."] = (root.st_mode, root.st_mtime_ns)
        return found


DIAGNOSTIC = re.compile(r"^(?P<file>.+?):(?:(?P<line>\d+):(?:\d+:)?)? error: ", re.MULTILINE)


def assert_refused(entry: Entry, name: str, out: Result) -> None:
    """Exit 2, every diagnostic located as the entry says, the summary line."""
    assert out.rc == 2, out.shown
    found = [(m.group("file"), m.group("line")) for m in DIAGNOSTIC.finditer(out.stderr)]
    assert found, f"no diagnostics\n{out.shown}"
    assert {f for f, _ in found} <= {name, CONFIG_DISPLAY}, out.shown
    if entry.one("no-line") is None:
        unlocated = [f for f, line in found if line is None]
        assert not unlocated, f"diagnostics without a line\n{out.shown}"
    for key, file in (("error-line", name), ("config-error-line", CONFIG_DISPLAY)):
        where = entry.line(key)
        if where is not None:
            assert (file, str(where[0])) in found, f"expected {file}:{where[0]}:\n{out.shown}"
    assert "nothing was run" in out.stderr, out.shown


def report_of(out: Result) -> dict[str, Any]:
    m = re.search(r"^report: (.+)$", out.stdout, re.MULTILINE)
    assert m, f"no report path printed\n{out.shown}"
    md = Path(m.group(1))
    assert md.is_file(), out.shown
    report: dict[str, Any] = json.loads(md.with_suffix(".json").read_text())
    return report


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_corpus_entry(entry: Entry, command: str, cli: Any, tmp_path: Path) -> None:
    box = Sandbox(tmp_path)
    name = box.setup(entry)
    before = box.tree()
    out: Result = cli([command, name], box.project, box.env, entry.timeout)
    assert not out.timed_out, f"{command} took over {entry.timeout:.0f} s\n{out.shown}"
    assert "Traceback" not in out.stdout + out.stderr, out.shown
    expect = entry.expect
    if expect == "refused":
        assert_refused(entry, name, out)
    elif command == "validate":
        assert out.rc == 0, out.shown
        assert out.stdout.startswith(f"{name}: OK"), out.shown
    elif expect == "run-refused":
        assert out.rc == 2, out.shown
        assert re.search(r"^parallel-dispatch: error: .+; ", out.stderr, re.MULTILINE), out.shown
    else:
        assert out.rc == (0 if expect == "ok" else 1), out.shown
        status = report_of(out)["status"]
        assert (status == "succeeded") == (expect == "ok"), (status, out.shown)
    if expect == "refused" or command == "validate" or expect == "run-refused":
        after = box.tree()
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        assert not changed, f"{command} changed {changed[:10]}\n{out.shown}"


def test_forkserver_matches_a_cold_start(forkserver: ForkServer, tmp_path: Path) -> None:
    """The same entries through `python -m parallel_dispatch` give the same exits and text."""
    picks = [e for e in ENTRIES if e.name in ("ok_diamond", "cyc_two", "tag_empty_int",
                                              "cfg_not_utf8", "run_failing_task")]
    assert len(picks) == 5
    for e in picks:
        for command in ("validate", "run"):
            results = []
            for runner in (forkserver, cold):
                box = Sandbox(tmp_path / f"{e.name}-{command}-{len(results)}")
                name = box.setup(e)
                out = runner([command, name], box.project, box.env, TIMEOUT)
                results.append((out.rc, _stable(out.stderr, box.top), _stable(out.stdout,
                                                                                box.top)))
            assert results[0] == results[1], (e.name, command, results)


def _stable(text: str, top: Path) -> str:
    """Output with what differs between two runs (paths, times, run ids) taken out."""
    text = text.replace(str(top), "<top>")
    text = re.sub(r"\[\s*[\d.]+s\]|\d+\.\d+s|\d{8}T\d{6}Z-[0-9a-f]+|\[\d+/\d+\]", "<t>",
                  text)
    return "\n".join(sorted(text.splitlines()))  # concurrent tasks finish in any order
