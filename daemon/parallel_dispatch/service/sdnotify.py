"""sd_notify(3) written in-house: readiness, status and watchdog messages to systemd.

The protocol is one datagram per message, sent to the AF_UNIX socket named by
``$NOTIFY_SOCKET``; a name starting with ``@`` is a Linux abstract-namespace socket.
The payload is newline-separated ``KEY=VALUE`` assignments. systemd learns the sender's
PID from the kernel's SCM_CREDENTIALS, which is why ``NotifyAccess=main`` only accepts
messages sent by the daemon's own main process.

Followed: the sd_notify(3) and sd_watchdog_enabled(3) manual pages of systemd 258
(freedesktop.org "man/258"); the units are checked with systemd 252, which Debian 12
ships. Notes from those pages:

* ``RELOADING=1`` must be followed by ``READY=1`` once the reload is done. Since
  systemd 253, ``Type=notify-reload`` also requires ``MONOTONIC_USEC=`` (CLOCK_MONOTONIC
  in microseconds) in the same message; older managers ignore the field, so it is
  always sent.
* The watchdog is on when ``$WATCHDOG_USEC`` is set and ``$WATCHDOG_PID`` is unset or
  our PID; ping ``WATCHDOG=1`` at half that interval.
* Newer systemd also accepts ``vsock:`` addresses (a manager outside a virtual
  machine). They are not supported here; such a ``$NOTIFY_SOCKET`` is logged and
  ignored.

Agents must not inherit ``NOTIFY_SOCKET``: with ``NotifyAccess=all`` they could change
the service's state, and a child that sees ``WATCHDOG_USEC`` without ``WATCHDOG_PID``
would think the watchdog is its own. ``clean_child_env`` removes these variables.

Without ``$NOTIFY_SOCKET`` (not run by systemd, or ``Type=simple``) every call is a
no-op that returns False, so the daemon calls the notifier unconditionally.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

import trio

__all__ = [
    "NOTIFY_ENV_KEYS",
    "Notifier",
    "clean_child_env",
    "watchdog_interval",
    "watchdog_loop",
]

log = logging.getLogger(__name__)

#: Variables that systemd sets for the main process only; never pass them to agents.
NOTIFY_ENV_KEYS: tuple[str, ...] = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _socket_address(raw: str) -> bytes | None:
    """Turn ``$NOTIFY_SOCKET`` into a sockaddr_un path, or None if unsupported.

    ``@name`` is the abstract namespace: the kernel wants a leading NUL byte instead.
    """
    if raw.startswith("@") and len(raw) > 1:
        return b"\0" + os.fsencode(raw[1:])
    if raw.startswith("/"):
        return os.fsencode(raw)
    return None


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``), or None if off.

    Like sd_watchdog_enabled(3): a ``$WATCHDOG_PID`` naming another process means the
    watchdog belongs to that process (our parent, say), not to us.
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid_text = env.get("WATCHDOG_PID")
    if pid_text:
        try:
            if int(pid_text) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000


def clean_child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Copy of ``env`` (default: ``os.environ``) without the systemd notify variables.

    Use it for every agent's environment, so that an agent can neither send state
    changes for the daemon's unit nor mistake the daemon's watchdog for its own.
    """
    source = os.environ if env is None else env
    return {key: value for key, value in source.items() if key not in NOTIFY_ENV_KEYS}


class Notifier:
    """Sends sd_notify messages for the daemon's main process.

    The environment is read once, at construction, so that ``unset_environment=True``
    (which removes the variables from ``os.environ``, like sd_notify's flag of that
    name) still leaves a working notifier. Sends never raise and never block: a lost
    status line must not take the daemon down, and the trio loop must not stall on a
    full socket buffer. Each method returns True if the datagram was sent.
    """

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        *,
        unset_environment: bool = False,
    ) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self._raw_address = raw
        self._address = _socket_address(raw) if raw else None
        if raw and self._address is None:
            log.warning("NOTIFY_SOCKET=%r is not an AF_UNIX socket; not notifying", raw)
        self._watchdog_interval = watchdog_interval(env)
        self._sock: socket.socket | None = None
        self._warned: set[int] = set()
        if unset_environment:
            for key in NOTIFY_ENV_KEYS:
                os.environ.pop(key, None)

    @property
    def enabled(self) -> bool:
        """True when there is a socket to notify."""
        return self._address is not None

    @property
    def address(self) -> str:
        """``$NOTIFY_SOCKET`` as it was given (empty when not enabled)."""
        return self._raw_address if self.enabled else ""

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings, or None when systemd expects none."""
        return self._watchdog_interval if self.enabled else None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments as one datagram."""
        if self._address is None:
            return False
        payload = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(payload, self._address)
        except OSError as exc:
            # Warn once per errno: a missing socket would otherwise log every ping.
            key = exc.errno or 0
            if key not in self._warned:
                self._warned.add(key)
                log.warning("sd_notify to %s failed: %s", self._raw_address, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Startup (or a reload) is complete: ``READY=1``."""
        if status is None:
            return self.notify("READY=1")
        return self.notify("READY=1", _status_line(status))

    def status(self, text: str) -> bool:
        """Free-form one-line status shown by ``systemctl status``."""
        return self.notify(_status_line(text))

    def watchdog(self) -> bool:
        """Watchdog keep-alive ping: ``WATCHDOG=1``."""
        return self.notify("WATCHDOG=1")

    def reloading(self) -> bool:
        """A configuration reload starts; send ``ready()`` when it is done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        """Shutdown has begun: ``STOPPING=1``."""
        return self.notify("STOPPING=1")

    def close(self) -> None:
        """Close the socket; a later send opens a new one."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _status_line(text: str) -> str:
    """``STATUS=`` with newlines flattened: a newline would start a new assignment."""
    return "STATUS=" + " ".join(text.splitlines())


async def watchdog_loop(notifier: Notifier) -> None:
    """Ping ``WATCHDOG=1`` every half ``$WATCHDOG_USEC`` until cancelled.

    Returns at once when systemd expects no pings, so it can always be started in the
    daemon's nursery. Because it runs on the trio loop, a blocked loop stops the pings
    and systemd restarts the daemon, which is the point.
    """
    interval = notifier.watchdog_interval()
    if interval is None:
        return
    while True:
        notifier.watchdog()
        await trio.sleep(interval)
