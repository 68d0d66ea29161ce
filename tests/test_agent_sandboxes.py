"""Agents' own sandboxes inside the shipped units, run by a real systemd.

codex's shell tool and Claude Code's sandbox (`sandbox.enabled`) both build a bubblewrap
sandbox: a user namespace with mount, pid and network namespaces inside, the `mount`,
`umount2`, `pivot_root` and `capset` calls, a netlink socket (loopback), and (codex)
`seccomp(2)`. The units forbid all of that, so under them every command such an agent
runs fails; `systemd/agent-sandboxes.conf` allows exactly that. Each test runs the real
agent CLI, talking to a local API stub whose model asks for one shell command, as the
ExecStart of the shipped unit (plus, or not, the drop-in) and checks what the command
did: under the unit as shipped it never runs; with the drop-in it writes inside the
agent's workspace and is refused outside it, which only the agent's sandbox can do (the
unit lets the service write the whole project). The last test runs parallel-dispatch
itself, with the codex preset, under the template.

No systemd runs as PID 1 here, so the tests start a private systemd *user* manager as
root. It applies the same execution sandbox (namespaces, seccomp, capabilities) that
PID 1 applies to a system unit. It runs in its own mount namespace (with a /run that says
"booted with systemd") and its own cgroup v2 subtree: /sys/fs/cgroup is the cgroup2
hierarchy alone in that namespace, so the manager never sees or moves a process outside
its subtree. The units run as `nobody` (the template's `parallel-dispatch` user need not
exist; a user unit runs as its user, never root) with the project outside /tmp (the
units' PrivateTmp= would hide it).

Needs root, systemd, util-linux's unshare, a cgroup2 hierarchy, the pinned agent CLIs
(tests/clients/install.sh) and, for Claude Code, Debian's `bubblewrap` and `socat`.
CI installs them (.ci/run); anything missing fails the test with what to install.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from stubs.anthropic import AnthropicStub
from stubs.anthropic import env as anthropic_env
from stubs.openai_responses import ResponsesStub

REPO = Path(__file__).resolve().parents[1]
UNIT_DIR = REPO / "systemd"
DROPIN = UNIT_DIR / "agent-sandboxes.conf"
CLIENT_BIN = REPO / "tests" / "clients" / "node_modules" / ".bin"
TEMPLATE = "parallel-dispatch@.service"
PLAIN = "parallel-dispatch.service"
RUN_AS = "nobody"
START_TIMEOUT_S = 60.0
UNIT_TIMEOUT_S = 240
MODEL_CLAUDE = "claude-sonnet-4-5"
MODEL_CODEX = "gpt-5.1-codex"
NO_NAMESPACE = re.compile(r"^bwrap: No permissions to create (a )?new namespace", re.M)
"""bubblewrap's refusal (Debian's 0.8.0 says "new namespace", codex's own "a new one")."""


# --- the private systemd user manager -----------------------------------------------------

LAUNCHER = r"""
import os, stat, subprocess, sys
cgroup2, name, systemd = sys.argv[1:4]
own = os.path.join(cgroup2, name)
os.mkdir(own)
with open(os.path.join(own, "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))
if cgroup2 != "/sys/fs/cgroup":
    subprocess.run(["mount", "--bind", cgroup2, "/sys/fs/cgroup"], check=True)
kind = subprocess.run(["stat", "-f", "-c", "%T", "/sys/fs/cgroup"], check=True,
                      capture_output=True, text=True).stdout.strip()
if kind != "cgroup2fs":
    sys.exit(f"/sys/fs/cgroup is {kind}, not cgroup2: not starting a manager")
subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run"], check=True)
os.makedirs("/run/systemd/system")
# What PID 1 creates at boot and the sandboxing code masks files with, as root.
nodes = "/run/systemd/inaccessible"
os.makedirs(nodes)
os.mkdir(nodes + "/dir", 0)
os.close(os.open(nodes + "/reg", os.O_CREAT | os.O_WRONLY, 0))
os.mkfifo(nodes + "/fifo", 0)
os.mknod(nodes + "/sock", stat.S_IFSOCK)
os.mknod(nodes + "/chr", stat.S_IFCHR, os.makedev(0, 0))
os.mknod(nodes + "/blk", stat.S_IFBLK, os.makedev(0, 0))
for node in os.listdir(nodes):
    os.chmod(nodes + "/" + node, 0)
os.execv(systemd, [systemd, "--user"])
"""
"""Runs inside `unshare --mount --propagation private`: the manager's own cgroup, a
cgroup2-only /sys/fs/cgroup (so it cannot touch the cgroup v1 hierarchies, where a
manager at a root cgroup would move every process on the machine into its init.scope),
the /run/systemd/system that `systemd --user` insists on, and the inaccessible nodes PID 1
makes at boot (a unit's sandbox masks paths with them)."""


def _cgroup2_mount() -> str | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        if post.split(" ", 1)[0] == "cgroup2":
            return pre.split(" ")[4]
    return None


def _systemd_binary() -> str | None:
    for path in ("/usr/lib/systemd/systemd", "/lib/systemd/systemd"):
        if os.access(path, os.X_OK):
            return path
    return None


def _missing_prerequisite() -> str | None:
    """What this machine lacks to run the tests, with what to do about it."""
    if os.geteuid() != 0:
        return "the agent-sandbox tests start a systemd manager and need root (CI runs as root)"
    if _systemd_binary() is None or shutil.which("systemctl") is None:
        return "systemd is not installed: apt-get install systemd"
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "unshare/mount are missing: apt-get install util-linux mount"
    if _cgroup2_mount() is None:
        return "no cgroup2 hierarchy is mounted; the systemd manager needs one"
    for exe in ("codex", "claude"):
        if not os.access(CLIENT_BIN / exe, os.X_OK):
            return f"the real '{exe}' client is not installed: bash tests/clients/install.sh"
    if shutil.which("node") is None:
        return "node is not on PATH (the codex wrapper is a node script)"
    try:
        pwd.getpwnam(RUN_AS)
    except KeyError:
        return f"there is no user '{RUN_AS}' to run the units as"
    return None


class UserManager:
    """A private `systemd --user` (as root) whose units live in a private config dir."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.runtime = base / "rt"
        self.config = base / "config"
        self.units = self.config / "systemd" / "user"
        self.log = base / "manager.log"
        self.cgroup2 = _cgroup2_mount() or "/sys/fs/cgroup"
        self.cgroup_name = f"pd-agent-sandbox-test-{os.getpid()}-{int(time.time() * 1000)}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        return {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME": pwd.getpwuid(0).pw_dir, "LANG": "C.UTF-8",
                "XDG_RUNTIME_DIR": str(self.runtime), "XDG_CONFIG_HOME": str(self.config),
                "XDG_DATA_HOME": str(self.base / "data"),
                "XDG_STATE_HOME": str(self.base / "state"),
                "XDG_CACHE_HOME": str(self.base / "cache"),
                "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}

    def systemctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["systemctl", "--user", "--no-pager", *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout, check=False)

    def start(self) -> None:
        self.runtime.mkdir(mode=0o700)
        self.units.mkdir(parents=True)
        systemd = _systemd_binary()
        assert systemd is not None
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--", sys.executable,
                 "-c", LAUNCHER, self.cgroup2, self.cgroup_name, systemd],
                env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        state = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            state = self.systemctl("show", "-P", "SystemState", timeout=10).stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"the private systemd user manager did not start (state {state!r}); "
                    f"its log:\n{self.log.read_text(errors='replace')[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.systemctl("exit", timeout=30)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        own = Path(self.cgroup2) / self.cgroup_name
        if own.is_dir():
            kill = own / "cgroup.kill"  # whatever is left in the manager's subtree: ours
            if kill.exists():
                kill.write_text("1")
            deadline = time.monotonic() + 10
            while own.exists() and time.monotonic() < deadline:
                deepest_first = sorted(own.rglob("*"), key=lambda p: -len(p.parts))
                for d in [*(p for p in deepest_first if p.is_dir()), own]:
                    with contextlib.suppress(OSError):
                        d.rmdir()
                time.sleep(0.1)

    def install(self, unit_file: str, dropins: dict[str, str]) -> None:
        """The shipped unit, unchanged, plus drop-ins (name → text), replacing earlier ones."""
        shutil.copyfile(UNIT_DIR / unit_file, self.units / unit_file)
        d = self.units / f"{unit_file}.d"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        for name, text in dropins.items():
            (d / name).write_text(text)
        reload = self.systemctl("daemon-reload")
        assert reload.returncode == 0, reload.stderr


@pytest.fixture(scope="module")
def manager() -> Iterator[UserManager]:
    missing = _missing_prerequisite()
    if missing:
        pytest.fail(missing)
    base = Path(tempfile.mkdtemp(prefix="pd-um-"))  # short: socket paths go under it
    mgr = UserManager(base)
    try:
        mgr.start()
        yield mgr
    finally:
        mgr.stop()
        shutil.rmtree(base, ignore_errors=True)


# --- one agent run as the unit's ExecStart ---------------------------------------------


def _quote(arg: str, exec_line: bool = True) -> str:
    """One word of ExecStart= (or, not `exec_line`, of Environment=), double-quoted, with
    specifiers (and on ExecStart=, variables) taken literally."""
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return '"' + (escaped.replace("$", "$$") if exec_line else escaped) + '"'


@dataclass
class Place:
    """Where a probe runs. The unit may write all of `project`; the agent's workspace is
    `ws` only, so a refused write to `outside` is the agent's sandbox at work."""

    base: Path
    project: Path
    ws: Path
    home: Path
    out: Path

    @property
    def inside(self) -> Path:
        return self.ws / "inside.marker"

    @property
    def outside(self) -> Path:
        return self.project / "outside.marker"

    @property
    def command(self) -> str:
        """What the model asks the agent to run."""
        return (f"touch {self.inside}; touch {self.outside}; "
                "echo ran-in-$(readlink /proc/self/ns/user)")


@pytest.fixture
def place() -> Iterator[Place]:
    # Not under /tmp (the units' PrivateTmp= hides it) nor /home (the template hides it).
    base = Path(tempfile.mkdtemp(prefix="pd-agent-sandbox-", dir="/var/lib"))
    base.chmod(0o755)
    project = base / "project"
    ws, home, out = project / "ws", project / "home", base / "out"
    for d in (project, ws, home, out):
        d.mkdir(exist_ok=True)
    nobody = pwd.getpwnam(RUN_AS)
    for d in (project, ws, home):
        os.chown(d, nobody.pw_uid, nobody.pw_gid)
    try:
        yield Place(base, project, ws, home, out)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class Ran:
    """How a probe unit ended, and what it printed."""

    status: str
    """The unit's Result (`success`, `exit-code`, `timeout`, …)."""
    detail: str
    """How the main process ended (ExecMainCode=, ExecMainStatus=: 2xx are systemd's own
    start-up failures, e.g. 200/CHDIR)."""
    stdout: str
    stderr: str


def _hidden(*paths: Path) -> list[Path]:
    """Those of `paths` the units hide (ProtectHome=, PrivateTmp=), to bind back in."""
    return [p for p in dict.fromkeys(paths)
            if any(p.is_relative_to(h) for h in ("/home", "/root", "/tmp", "/var/tmp"))]


def run_in_unit(mgr: UserManager, unit_file: str, dropin: str | None, place: Place,
                argv: list[str], env: dict[str, str], extra: str = "") -> Ran:
    """Run `argv` as the ExecStart of the shipped unit, with `dropin` (the text of
    agent-sandboxes.conf, or None) and `extra` [Service] lines; everything else in the
    unit as shipped except what makes it a one-shot probe run as `nobody` in `place`."""
    group = grp.getgrgid(pwd.getpwnam(RUN_AS).pw_gid).gr_name
    node_dir = str(Path(shutil.which("node") or "/usr/bin/node").parent)
    env = {"PATH": f"{CLIENT_BIN}:{node_dir}:/usr/local/bin:/usr/bin:/bin",
           "HOME": str(place.home), "LANG": "C.UTF-8", **env}
    lines = ["[Service]", "Type=oneshot", "Restart=no", "WatchdogSec=0", "NotifyAccess=none",
             "ExecReload=", "ExecStart=", "ExecStart=" + " ".join(map(_quote, argv)),
             f"TimeoutStartSec={UNIT_TIMEOUT_S}", f"User={RUN_AS}", f"Group={group}",
             "StateDirectory=", "EnvironmentFile=", f"WorkingDirectory={place.ws}",
             f"ReadWritePaths={place.project}",
             f"StandardOutput=truncate:{place.out}/stdout",
             f"StandardError=truncate:{place.out}/stderr"]
    lines += [f"Environment={_quote(f'{k}={v}', exec_line=False)}" for k, v in env.items()]
    lines += [f"BindReadOnlyPaths={path}" for path in _hidden(CLIENT_BIN.parents[1],
                                                              Path(node_dir))]
    dropins = {"zz-probe.conf": "\n".join(lines) + "\n" + extra}
    if dropin is not None:
        dropins["agent-sandboxes.conf"] = dropin
    mgr.install(unit_file, dropins)
    if unit_file == TEMPLATE:
        instance = subprocess.run(["systemd-escape", "--path", str(place.project)],
                                  capture_output=True, text=True, check=True).stdout.strip()
        unit = f"parallel-dispatch@{instance}.service"
    else:
        unit = PLAIN
    mgr.systemctl("reset-failed", unit)
    mgr.systemctl("start", unit, timeout=UNIT_TIMEOUT_S + 30)
    status = mgr.systemctl("show", "-P", "Result", unit).stdout.strip()
    detail = mgr.systemctl("show", "-p", "ExecMainCode,ExecMainStatus,StatusErrno",
                           unit).stdout.split()
    mgr.systemctl("reset-failed", unit)

    def read(name: str) -> str:
        path = place.out / name
        return path.read_text(errors="replace") if path.exists() else ""

    return Ran(status, " ".join(detail), read("stdout"), read("stderr"))


# --- the agents -----------------------------------------------------------------------------


class CommandStub(AnthropicStub):
    """The Anthropic stub, with the Bash command the model asks for set by the test."""

    command = "true"

    def _tool_use(self, tool: str) -> dict[str, Any]:
        return {"type": "tool_use", "id": f"toolu_stub{next(self._ids):06d}", "name": "Bash",
                "input": {"command": self.command, "description": "Probe the sandbox"}}


def run_claude(mgr: UserManager, unit_file: str, dropin: str | None, place: Place) -> str:
    """Claude Code with its sandbox on (and no way around it); returns what the command
    printed, as the stub model quoted it back."""
    if shutil.which("bwrap") is None or shutil.which("socat") is None:
        pytest.fail("Claude Code's sandbox needs bubblewrap and socat on PATH: "
                    "apt-get install bubblewrap socat (CI's .ci/run installs them)")
    settings = place.home / "settings.json"
    settings.write_text(json.dumps({"sandbox": {
        "enabled": True, "failIfUnavailable": True, "allowUnsandboxedCommands": False,
        "autoAllowBashIfSandboxed": True}}))
    with CommandStub.running() as stub:
        stub.command = place.command
        stub.behave("tool:Bash")
        ran = run_in_unit(mgr, unit_file, dropin, place,
                          [str(CLIENT_BIN / "claude"), "-p", "Run the probe.", "--settings",
                           str(settings), "--model", MODEL_CLAUDE, "--output-format", "text"],
                          anthropic_env(stub))
    assert ran.status == "success", (ran.status, ran.detail, ran.stdout, ran.stderr)
    assert "The tool said:" in ran.stdout, (ran.stdout, ran.stderr)
    return ran.stdout


def run_codex(mgr: UserManager, unit_file: str, dropin: str | None, place: Place,
              extra: str = "") -> str:
    """`codex exec --sandbox workspace-write`; returns what its shell calls printed (or
    the error codex reported for them), "" when none completed."""
    codex_home = place.home / ".codex"
    with ResponsesStub.running(tool_command=place.command) as stub:
        codex_home.mkdir(exist_ok=True)
        (codex_home / "config.toml").write_text(
            f'model = "{MODEL_CODEX}"\nmodel_provider = "stub"\n\n[model_providers.stub]\n'
            f'name = "Responses stub"\nbase_url = "{stub.base_url}"\n'
            'env_key = "STUB_API_KEY"\nwire_api = "responses"\n')
        shutil.chown(codex_home, RUN_AS)
        stub.behave("tool:Bash")
        ran = run_in_unit(mgr, unit_file, dropin, place,
                          [str(CLIENT_BIN / "codex"), "exec", "--json", "--skip-git-repo-check",
                           "--sandbox", "workspace-write", "-C", str(place.ws), "Run the probe."],
                          {"CODEX_HOME": str(codex_home), "STUB_API_KEY": "sk-stub"}, extra)
    assert ran.status == "success", (ran.status, ran.detail, ran.stdout, ran.stderr)
    events = [json.loads(line) for line in ran.stdout.splitlines() if line.startswith("{")]
    assert any(e.get("type") == "turn.completed" for e in events), (ran.stdout, ran.stderr)
    calls = [e["item"] for e in events if e.get("type") == "item.completed"
             and e.get("item", {}).get("type") == "command_execution"]
    return "\n".join(str(c.get("aggregated_output", "")) for c in calls)


def run_codex_bundled_bwrap(mgr: UserManager, unit_file: str, dropin: str | None,
                            place: Place) -> str:
    """codex with its own bubblewrap (codex-resources/bwrap): the system one, which it
    prefers, is made inaccessible. On a machine without bubblewrap this is plain codex."""
    system = shutil.which("bwrap")
    hide = f"InaccessiblePaths={Path(system).resolve()}\n" if system else ""
    return run_codex(mgr, unit_file, dropin, place, hide)


Agent = Callable[[UserManager, str, str | None, Place], str]
AGENTS: dict[str, Agent] = {"claude": run_claude, "codex": run_codex,
                            "codex-bundled-bwrap": run_codex_bundled_bwrap}
UNITS = {"template": TEMPLATE, "plain": PLAIN}
CASES = [pytest.param(u, a, id=f"{u}-{a}") for u in UNITS for a in ("claude", "codex")]


@pytest.mark.parametrize(("unit", "agent"), CASES)
def test_shipped_unit_stops_the_agents_sandbox(
        manager: UserManager, place: Place, unit: str, agent: str) -> None:
    """Under the unit as shipped, bubblewrap cannot create its namespaces: the agent's
    command never runs, though the agent itself carries on and exits 0."""
    output = AGENTS[agent](manager, UNITS[unit], None, place)
    print(f"{unit}/{agent} without the drop-in: {output!r}")
    assert not place.inside.exists() and not place.outside.exists()
    assert "ran-in-" not in output
    assert NO_NAMESPACE.search(output), output


@pytest.mark.parametrize(("unit", "agent"), [
    *CASES, pytest.param("template", "codex-bundled-bwrap", id="template-codex-bundled-bwrap")])
def test_dropin_lets_the_agents_sandbox_work(
        manager: UserManager, place: Place, unit: str, agent: str) -> None:
    """With agent-sandboxes.conf the command runs in the agent's own sandbox: it may write
    the agent's workspace and is refused the rest of the project, which the unit allows."""
    output = AGENTS[agent](manager, UNITS[unit], DROPIN.read_text(), place)
    print(f"{unit}/{agent} with the drop-in: {output!r}")
    assert "ran-in-user:[" in output, output
    assert place.inside.exists(), output
    assert not place.outside.exists(), output
    assert f"cannot touch '{place.outside}': Read-only file system" in output, output


def _dropin_without(key: str) -> str:
    text = DROPIN.read_text()
    assert f"\n{key}=" in text
    return "".join(line for line in text.splitlines(keepends=True)
                   if not line.startswith(f"{key}="))


@pytest.mark.parametrize(("key", "symptom"), [
    ("RestrictNamespaces", NO_NAMESPACE.pattern),
    ("RestrictAddressFamilies", "bwrap: loopback: Failed to create NETLINK_ROUTE socket"),
    ("SystemCallFilter", None),
])
def test_every_setting_of_the_dropin_is_needed(
        manager: UserManager, place: Place, key: str, symptom: str | None) -> None:
    """Take one setting out and codex's command no longer runs. Without the system calls
    (namespaces allowed) bubblewrap's child waits for a parent that died of EPERM: the
    command hangs until codex gives up on it and reports nothing."""
    output = run_codex(manager, TEMPLATE, _dropin_without(key), place)
    print(f"without {key}=: {output!r}")
    assert not place.inside.exists() and "ran-in-" not in output
    if symptom is None:
        assert output == ""
    else:
        assert re.search(symptom, output, re.M), output


def test_the_codex_preset_under_the_template(manager: UserManager, place: Place) -> None:
    """What a user sees: parallel-dispatch runs a codex agent (the preset's
    `--sandbox read-only`) whose model reads a file through its shell. Under the template
    as shipped the read fails with bubblewrap's error and the task is still `succeeded`;
    with the drop-in the agent reads the file."""
    import parallel_dispatch

    ws = place.ws
    (ws / ".aiwg").mkdir()
    (ws / ".aiwg" / "dispatch.toml").write_text('[defaults]\nrunner = "codex"\n')
    agents = ws / ".claude" / "agents"
    agents.mkdir(parents=True)
    (agents / "reader.md").write_text(f"---\nname: reader\nmodel: {MODEL_CODEX}\n---\nRead.\n")
    (ws / "t.yaml").write_text("tasks:\n  - id: a\n    agent: reader\n"
                               "    prompt: Read the notes\n    output: a.md\n")
    (ws / "notes.txt").write_text("the notes\n")
    codex_home = place.home / ".codex"
    codex_home.mkdir()
    python = Path(sys.executable)
    visible = "".join(f"BindReadOnlyPaths={p}\n" for p in _hidden(
        Path(sys.prefix), Path(sys.base_prefix), Path(parallel_dispatch.__file__).parents[1]))
    outputs = {}
    for dropin in (None, DROPIN.read_text()):
        shutil.rmtree(ws / ".aiwg" / "working", ignore_errors=True)
        with ResponsesStub.running(tool_command=f"cat {ws / 'notes.txt'}") as stub:
            (codex_home / "config.toml").write_text(
                f'model = "{MODEL_CODEX}"\nmodel_provider = "stub"\n\n'
                f'[model_providers.stub]\nname = "Responses stub"\n'
                f'base_url = "{stub.base_url}"\nenv_key = "STUB_API_KEY"\n'
                'wire_api = "responses"\n')
            for path in [ws, *ws.rglob("*"), codex_home, *codex_home.rglob("*")]:
                shutil.chown(path, RUN_AS)
            stub.behave("tool:Bash")
            ran = run_in_unit(manager, TEMPLATE, dropin, place,
                              [str(python), "-m", "parallel_dispatch", "t.yaml"],
                              {"CODEX_HOME": str(codex_home), "STUB_API_KEY": "sk-stub"},
                              visible)
        assert ran.status == "success", (ran.status, ran.detail, ran.stdout, ran.stderr)
        report = json.loads((ws / ".aiwg" / "working" / "dispatch-report.json").read_text())
        assert [t["status"] for t in report["tasks"]] == ["succeeded"], report
        events = [json.loads(line) for log in (ws / ".aiwg" / "working").rglob("*.log")
                  for line in log.read_text().splitlines() if line.startswith("{")]
        (call,) = [e["item"] for e in events if e.get("type") == "item.completed"
                   and e.get("item", {}).get("type") == "command_execution"]
        outputs[dropin is not None] = call["aggregated_output"]
    print(outputs)
    assert NO_NAMESPACE.match(outputs[False]), outputs
    assert outputs[True] == "the notes\n"
