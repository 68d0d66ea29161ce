"""sd_notify against real AF_UNIX datagram sockets, as systemd's manager would see it.

The receiving side sets SO_PASSCRED, like systemd does, so the tests also check the
sender PID that ``NotifyAccess=main`` relies on. Every wait has a generous timeout and
no test asserts how fast anything happens.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from parallel_dispatch.service.sdnotify import (
    NOTIFY_ENV_KEYS,
    Notifier,
    clean_child_env,
    watchdog_interval,
    watchdog_loop,
)

RECV_TIMEOUT_S = 30.0
PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "daemon"
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class Receiver:
    """The manager's end: a bound datagram socket that reports sender credentials."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def recv(self) -> tuple[str, int]:
        """Next message and the PID the kernel says sent it."""
        data, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
        pid = -1
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _UCRED.unpack(payload[: _UCRED.size])[0]
        return data.decode(), pid

    def recv_all(self, count: int) -> list[str]:
        return [self.recv()[0] for _ in range(count)]

    def assert_empty(self) -> None:
        self.sock.setblocking(False)
        try:
            with pytest.raises(BlockingIOError):
                self.sock.recv(4096)
        finally:
            self.sock.settimeout(RECV_TIMEOUT_S)


def _bind(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.bind(address)
    sock.settimeout(RECV_TIMEOUT_S)
    return sock


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    """A path socket; falls back to a short dir if tmp_path exceeds sun_path's 108 bytes."""
    short_dir = None
    path = tmp_path / "notify.sock"
    if len(os.fsencode(path)) >= 100:
        short_dir = tempfile.mkdtemp(prefix="pd-sd-")
        path = Path(short_dir) / "notify.sock"
    sock = _bind(str(path))
    try:
        yield Receiver(sock, str(path))
    finally:
        sock.close()
        path.unlink(missing_ok=True)
        if short_dir:
            os.rmdir(short_dir)


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    name = f"parallel-dispatch-test-{uuid.uuid4().hex}"
    sock = _bind(b"\0" + name.encode())
    try:
        yield Receiver(sock, "@" + name)
    finally:
        sock.close()


def test_messages_arrive_in_order_with_content(receiver: Receiver) -> None:
    with Notifier({"NOTIFY_SOCKET": receiver.env_value}) as notifier:
        assert notifier.enabled
        assert notifier.ready(status="watching .aiwg/tasks")
        assert notifier.status("running 2, queued 3")
        assert notifier.watchdog()
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert notifier.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert notifier.ready()
        assert notifier.stopping()

    messages = receiver.recv_all(6)
    assert messages[0] == "READY=1\nSTATUS=watching .aiwg/tasks"
    assert messages[1] == "STATUS=running 2, queued 3"
    assert messages[2] == "WATCHDOG=1"
    reload_lines = messages[3].split("\n")
    assert reload_lines[0] == "RELOADING=1"
    key, _, value = reload_lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after, "MONOTONIC_USEC must be CLOCK_MONOTONIC in µs"
    assert len(reload_lines) == 2
    assert messages[4:] == ["READY=1", "STOPPING=1"]
    receiver.assert_empty()


def test_sender_is_the_calling_process(receiver: Receiver) -> None:
    """NotifyAccess=main accepts only the main PID; the kernel must report ours."""
    Notifier({"NOTIFY_SOCKET": receiver.env_value}).ready()
    message, pid = receiver.recv()
    assert message == "READY=1"
    assert pid == os.getpid()


def test_status_cannot_inject_assignments(receiver: Receiver) -> None:
    Notifier({"NOTIFY_SOCKET": receiver.env_value}).status("line one\nREADY=1\r\nthree")
    assert receiver.recv()[0] == "STATUS=line one READY=1 three"


def test_abstract_socket(abstract_receiver: Receiver) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": abstract_receiver.env_value})
    assert notifier.address == abstract_receiver.env_value
    assert notifier.ready()
    assert notifier.stopping()
    assert abstract_receiver.recv_all(2) == ["READY=1", "STOPPING=1"]


def test_real_subprocess_notifies_from_its_own_pid(receiver: Receiver) -> None:
    """Cross-process, as under systemd: the child finds the socket in its environment."""
    script = textwrap.dedent(
        """
        from parallel_dispatch.service.sdnotify import Notifier
        n = Notifier(unset_environment=True)
        import os
        assert "NOTIFY_SOCKET" not in os.environ
        assert n.ready(status="child up")
        assert n.reloading()
        assert n.ready()
        assert n.stopping()
        """
    )
    env = clean_child_env()
    env["NOTIFY_SOCKET"] = receiver.env_value
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        received = [receiver.recv() for _ in range(4)]
    finally:
        returncode = proc.wait(timeout=RECV_TIMEOUT_S)
    assert returncode == 0
    assert [pid for _, pid in received] == [proc.pid] * 4
    messages = [message for message, _ in received]
    assert messages[0] == "READY=1\nSTATUS=child up"
    assert messages[1].startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert messages[2:] == ["READY=1", "STOPPING=1"]


def test_unset_socket_is_a_noop() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.address == ""
    assert notifier.watchdog_interval() is None
    assert not notifier.ready()
    assert not notifier.status("x")
    assert not notifier.watchdog()
    assert not notifier.reloading()
    assert not notifier.stopping()


@pytest.mark.parametrize("value", ["vsock:2:1234", "relative/path"])
def test_unsupported_address_is_a_noop(value: str) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": value})
    assert not notifier.enabled
    assert not notifier.ready()


def test_missing_socket_does_not_raise(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.enabled
    assert not notifier.ready()
    assert not notifier.watchdog()


def test_unset_environment_clears_os_environ(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.env_value)
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = Notifier(unset_environment=True)
    for key in NOTIFY_ENV_KEYS:
        assert key not in os.environ
    assert notifier.watchdog_interval() == 2.0
    assert notifier.ready()
    assert receiver.recv()[0] == "READY=1"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "2000000"}, 1.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "nope"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env) == expected
    with_socket = Notifier({"NOTIFY_SOCKET": "/run/systemd/notify", **env})
    assert with_socket.watchdog_interval() == expected


def test_clean_child_env_removes_only_notify_variables() -> None:
    env = {
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "60000000",
        "WATCHDOG_PID": "42",
        "PATH": "/usr/bin",
        "DISPATCH_RUN_ID": "r1",
    }
    cleaned = clean_child_env(env)
    assert cleaned == {"PATH": "/usr/bin", "DISPATCH_RUN_ID": "r1"}
    assert "NOTIFY_SOCKET" in env, "the input mapping must not be modified"


def test_clean_child_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "@x")
    monkeypatch.setenv("PD_TEST_KEEP", "1")
    cleaned = clean_child_env()
    assert "NOTIFY_SOCKET" not in cleaned
    assert cleaned["PD_TEST_KEEP"] == "1"


def test_watchdog_loop_pings_until_cancelled(receiver: Receiver) -> None:
    # 0.2 s watchdog -> a ping every 0.1 s; only the count matters, not the pace.
    notifier = Notifier({"NOTIFY_SOCKET": receiver.env_value, "WATCHDOG_USEC": "200000"})
    receiver.sock.setblocking(False)
    trio_sock = trio.socket.from_stdlib_socket(receiver.sock)

    async def main() -> list[bytes]:
        pings: list[bytes] = []
        with trio.fail_after(RECV_TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watchdog_loop, notifier)
                while len(pings) < 3:
                    pings.append(await trio_sock.recv(4096))
                nursery.cancel_scope.cancel()
        return pings

    assert trio.run(main) == [b"WATCHDOG=1"] * 3


def test_watchdog_loop_returns_without_watchdog(receiver: Receiver) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": receiver.env_value})

    async def main() -> None:
        with trio.fail_after(RECV_TIMEOUT_S):
            await watchdog_loop(notifier)

    trio.run(main)
    receiver.assert_empty()
