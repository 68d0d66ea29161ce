"""What an agent is doing while it runs: its live event stream, as the dispatcher sees it.

Runner presets read the agent CLI's output line by line as it arrives and turn the
lines that matter into `AgentEvent`s (an API retry, a tool call, a rate limit, bad
credentials).  `Activity` is the per-attempt meeting point: the scheduler arms the
idle deadline on it, progress shows its latest event, and a timeout's error quotes it,
so a provider problem never hides behind "timed out".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import trio

Cause = Literal["auth", "unreachable", "rate_limit", "quota", "overloaded", "server",
                "bad_request", "worker_lost"]
"""Why the provider could not be used: the task ends `provider_error`, not `failed`."""

CAUSES: dict[str, str] = {
    "auth": "bad credentials",
    "unreachable": "provider unreachable",
    "rate_limit": "rate limited",
    "quota": "usage quota exhausted",
    "overloaded": "provider overloaded",
    "server": "provider server error",
    "bad_request": "request rejected by the provider",
    "worker_lost": "the cluster node or worker running it was lost",
}
"""How each cause is named in errors, reports and progress."""

EventKind = Literal["progress", "tool", "tokens", "retry", "error"]


@dataclass(frozen=True)
class AgentEvent:
    """One thing an agent's stream said, summarised for a human in one line."""

    text: str
    kind: EventKind = "progress"
    cause: Cause | None = None
    """Set when the event blames the provider (an API retry after a 401, a 529...)."""
    fatal: bool = False
    """Nothing later can change the outcome (bad credentials): stop the agent now."""
    retry_after: float | None = None
    """Seconds the provider asked to wait, when it said."""


class Activity:
    """The live state of one attempt.

    `saw_output` is called for every line an agent prints, `event` for the lines a
    preset understood.  When the scheduler armed an idle deadline, each line pushes
    that cancel scope's deadline forward: silence for `idle_s` cancels the attempt.
    """

    def __init__(self, on_event: Callable[[AgentEvent], None] | None = None) -> None:
        self.on_event = on_event
        self.last_event: AgentEvent | None = None
        self.last_event_at: float | None = None
        self.last_output_at: float | None = None
        self.fatal: AgentEvent | None = None
        self.node: str | None = None
        """The cluster node the attempt runs on, once known (None: this machine)."""
        self.on_start: Callable[[], None] | None = None
        """Called when the attempt really starts on a cluster node (`ran_on`): until
        then it may have waited in the cluster's queue."""
        self._idle_scope: trio.CancelScope | None = None
        self._idle_s = 0.0

    def ran_on(self, node: str) -> None:
        """The attempt started on `node`: the time it queued there is not the agent's."""
        self.node = node
        self.saw_output()
        if self.on_start is not None:
            self.on_start()

    def arm_idle(self, scope: trio.CancelScope, idle_s: float) -> None:
        """Cancel `scope` once the agent has printed nothing for `idle_s` seconds."""
        self._idle_scope = scope
        self._idle_s = idle_s
        scope.deadline = trio.current_time() + idle_s

    @property
    def idle_s(self) -> float | None:
        """The armed idle limit, if any (runners that cannot see lines poll instead)."""
        return self._idle_s if self._idle_scope is not None else None

    def saw_output(self) -> None:
        now = trio.current_time()
        self.last_output_at = now
        if self._idle_scope is not None:
            self._idle_scope.deadline = now + self._idle_s

    def event(self, ev: AgentEvent) -> None:
        self.saw_output()
        self.last_event = ev
        self.last_event_at = self.last_output_at
        if ev.fatal and self.fatal is None:
            self.fatal = ev
        if self.on_event is not None:
            self.on_event(ev)

    def describe_last(self) -> str | None:
        """'last event 3 s ago: API retry 7/10, connection refused', or None."""
        if self.last_event is None or self.last_event_at is None:
            return None
        ago = max(0.0, trio.current_time() - self.last_event_at)
        return f"last event {ago:.0f} s ago: {self.last_event.text}"
