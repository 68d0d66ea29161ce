"""The shipped systemd units: ``systemd-analyze verify`` clean and security exposure ≤ 2.5;
with the agent-sandboxes.conf drop-in, verify clean and exposure ≤ 2.6.

``verify`` exits 0 on a misspelt directive and only prints a warning, so any output at
all fails the test. It also insists that ExecStart's binary exists; when the documented
/usr/local/bin/parallel-dispatch is missing, the unit is verified unmodified together
with a drop-in that points ExecStart at the installed entry point, which is exactly how
docs/systemd.md tells users to run from a virtualenv. No running systemd is needed:
Debian's ``systemd`` package provides systemd-analyze (and ``procps`` the ``kill`` that
ExecReload= names). tests/test_agent_sandboxes.py runs the units for real.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

UNIT_DIR = Path(__file__).resolve().parents[1] / "systemd"
TEMPLATE = "parallel-dispatch@.service"
PLAIN = "parallel-dispatch.service"
INSTANCE = "parallel-dispatch@srv-proj.service"  # systemd-escape --path /srv/proj
SHIPPED_BINARY = "/usr/local/bin/parallel-dispatch"
MAX_EXPOSURE = 2.5
AGENT_SANDBOXES = "agent-sandboxes.conf"
MAX_EXPOSURE_AGENT_SANDBOXES = 2.6
"""What the drop-in measures (2.3 template, 2.6 plain unit): user, mount, pid, network
and IPC namespaces, @mount and capset, AF_NETLINK. Anything more fails."""
TIMEOUT_S = 120

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None,
    reason="systemd-analyze is not installed (apt-get install systemd procps); CI installs it",
)


@dataclass(frozen=True)
class Case:
    """One unit checked in one manager mode."""

    unit_file: str
    load_as: str
    user: bool

    @property
    def id(self) -> str:
        return f"{self.load_as}-{'user' if self.user else 'system'}"


CASES = [
    Case(TEMPLATE, INSTANCE, user=False),
    Case(PLAIN, PLAIN, user=False),
    Case(PLAIN, PLAIN, user=True),
]


def _settings(unit_file: str) -> dict[str, list[str]]:
    """Key → values of the [Service] section, comments skipped."""
    return _sections(unit_file).get("[Service]", {})


def _sections(unit_file: str) -> dict[str, dict[str, list[str]]]:
    """Section → key → values, comments skipped."""
    sections: dict[str, dict[str, list[str]]] = {}
    section = ""
    for raw in (UNIT_DIR / unit_file).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        key, _, value = line.partition("=")
        sections.setdefault(section, {}).setdefault(key, []).append(value)
    return sections


def _entry_point() -> str:
    """An executable that stands in for the documented binary path."""
    for candidate in (
        shutil.which("parallel-dispatch"),
        str(Path(sys.executable).parent / "parallel-dispatch"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return sys.executable


def _stage(
    tmp_path: Path, unit_file: str, text: str | None = None, *dropins: str
) -> Path:
    """Copy a unit (and the template's instance name) into a fresh unit directory, with
    the shipped drop-ins named in `dropins` installed beside it."""
    unit_dir = tmp_path / "units"
    unit_dir.mkdir(exist_ok=True)
    target = unit_dir / unit_file
    target.write_text(text if text is not None else (UNIT_DIR / unit_file).read_text())
    if unit_file == TEMPLATE:
        (unit_dir / INSTANCE).symlink_to(TEMPLATE)
    dropin_dir = unit_dir / f"{unit_file}.d"
    for name in dropins:
        dropin_dir.mkdir(exist_ok=True)
        shutil.copyfile(UNIT_DIR / name, dropin_dir / name)
    if not os.access(SHIPPED_BINARY, os.X_OK):
        exec_start = _settings(unit_file)["ExecStart"][0]
        assert exec_start.startswith(SHIPPED_BINARY + " ")
        args = exec_start.removeprefix(SHIPPED_BINARY)
        dropin_dir.mkdir(exist_ok=True)
        (dropin_dir / "venv.conf").write_text(
            f"[Service]\nExecStart=\nExecStart={_entry_point()}{args}\n"
        )
    return unit_dir


def _analyze(tmp_path: Path, case: Case, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C.UTF-8"}
    with tempfile.TemporaryDirectory(prefix="pd-rt-") as short:
        if case.user:
            # A short path: the user manager's socket units put paths under it into
            # sun_path (108 bytes), which a deep pytest tmp_path overflows.
            env["XDG_RUNTIME_DIR"] = short
        assert ANALYZE is not None
        command = [ANALYZE, *(["--user"] if case.user else []), "--no-pager", *args]
        return subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=TIMEOUT_S, cwd=tmp_path
        )


@needs_analyze
def test_kill_for_execreload_is_installed() -> None:
    """verify resolves ExecReload's bare ``kill``; without it the verify tests fail."""
    assert any(
        os.access(Path(d) / "kill", os.X_OK) for d in ("/usr/local/bin", "/usr/bin", "/bin")
    ), "no kill binary: apt-get install procps"


@pytest.mark.parametrize("unit_file", [TEMPLATE, PLAIN])
def test_required_settings(unit_file: str) -> None:
    s = _settings(unit_file)
    expected = {
        "Type": ["notify"],
        "NotifyAccess": ["main"],
        "Restart": ["on-failure"],
        "ExecReload": ["kill -HUP $MAINPID"],
        "KillMode": ["control-group"],
        "ProtectSystem": ["strict"],
        "NoNewPrivileges": ["yes"],
        "PrivateTmp": ["yes"],
        "CapabilityBoundingSet": [""],
        "RestrictAddressFamilies": ["AF_UNIX AF_INET AF_INET6"],
        "LockPersonality": ["yes"],
        "RestrictNamespaces": ["yes"],
    }
    for key, value in expected.items():
        assert s.get(key) == value, key
    for key in ("WatchdogSec", "TimeoutStopSec", "ReadWritePaths", "ProtectHome"):
        assert s.get(key), f"{key}= missing"
    assert "@system-service" in s["SystemCallFilter"]
    assert [v for v in s["ExecStart"] if v] == s["ExecStart"] and len(s["ExecStart"]) == 1
    assert s["ExecStart"][0].startswith(f"{SHIPPED_BINARY} watch ")
    # V8 (node-based agent CLIs) needs writable+executable memory for its JIT.
    assert s.get("MemoryDenyWriteExecute", ["no"]) == ["no"]


def test_template_uses_the_instance_as_project_directory() -> None:
    s = _settings(TEMPLATE)
    assert s["ExecStart"] == [f"{SHIPPED_BINARY} watch %f"]
    assert s["WorkingDirectory"] == ["%f"]
    assert s["ReadWritePaths"] == ["%f"]


@needs_analyze
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_verify_is_silent(tmp_path: Path, case: Case) -> None:
    unit_dir = _stage(tmp_path, case.unit_file)
    result = _analyze(tmp_path, case, "verify", str(unit_dir / case.load_as))
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, output
    assert output == "", f"systemd-analyze verify printed:\n{output}"


@needs_analyze
def test_verify_check_catches_a_misspelt_directive(tmp_path: Path) -> None:
    """Guards the test above: verify must report the typo even though it exits 0."""
    text = (UNIT_DIR / PLAIN).read_text().replace("\nProtectSystem=", "\nProtectSytem=")
    unit_dir = _stage(tmp_path, PLAIN, text)
    result = _analyze(tmp_path, Case(PLAIN, PLAIN, False), "verify", str(unit_dir / PLAIN))
    assert "ProtectSytem" in result.stdout + result.stderr


def _exposure(tmp_path: Path, case: Case, *dropins: str) -> tuple[float, str]:
    unit_dir = _stage(tmp_path, case.unit_file, None, *dropins)
    result = _analyze(tmp_path, case, "security", "--offline=true", str(unit_dir / case.load_as))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert match, f"no exposure level in:\n{output}"
    print(f"{case.id} {' '.join(dropins)}: exposure {match.group(1)}")
    return float(match.group(1)), output


@needs_analyze
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_security_exposure(tmp_path: Path, case: Case) -> None:
    exposure, output = _exposure(tmp_path, case)
    assert exposure <= MAX_EXPOSURE, output


# --- the agent-sandboxes.conf drop-in ------------------------------------------------------


def test_agent_sandboxes_dropin_allows_exactly_what_bubblewrap_needs() -> None:
    """Each entry is needed (tests/test_agent_sandboxes.py takes each out in turn); this
    keeps anything else from creeping in."""
    sections = _sections(AGENT_SANDBOXES)
    assert list(sections) == ["[Service]"], sections
    assert sections["[Service]"] == {
        "RestrictNamespaces": ["user mnt pid net ipc"],
        "SystemCallFilter": ["capset mount umount2 pivot_root seccomp"],
        "RestrictAddressFamilies": ["AF_NETLINK"],
    }


@needs_analyze
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_verify_is_silent_with_agent_sandboxes(tmp_path: Path, case: Case) -> None:
    unit_dir = _stage(tmp_path, case.unit_file, None, AGENT_SANDBOXES)
    result = _analyze(tmp_path, case, "verify", str(unit_dir / case.load_as))
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, output
    assert output == "", f"systemd-analyze verify printed:\n{output}"


@needs_analyze
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_security_exposure_with_agent_sandboxes(tmp_path: Path, case: Case) -> None:
    exposure, output = _exposure(tmp_path, case, AGENT_SANDBOXES)
    assert exposure <= MAX_EXPOSURE_AGENT_SANDBOXES, output
    # systemd-analyze counts what the drop-in allows: it did take effect.
    for check in ("RestrictNamespaces=~user", "SystemCallFilter=~@mount",
                  "RestrictAddressFamilies=~AF_NETLINK"):
        assert re.search(rf"✗ {re.escape(check)}\s", output), check
