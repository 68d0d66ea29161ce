"""Provider-side rate limits a stub enforces per request, answered as the provider does.

A `Limiter` admits or refuses each model call against three limits, any of which may be
off: a **concurrency** limit (requests in flight), **requests per minute** and **tokens
per minute**.  An admitted request is served after `delay_s` (± `jitter`, seeded) and
holds its concurrency slot until its reply is written.  A refused one gets a real 429
with the provider's headers and error body (`openai_headers` / `openai_error`,
`anthropic_headers` / `anthropic_error`).  Successful replies carry the same rate-limit
headers, as both providers send them on every response.

Window model: **continuous replenishment** (a token bucket per per-minute limit), not
fixed windows.  Each bucket holds up to its limit, starts full, and refills at
`limit / window_s` per second; a request takes 1 from the request bucket and its tokens
from the token bucket.  That is what both providers document:

* OpenAI's `x-ratelimit-reset-requests` is "the time until the rate limit (based on
  requests) resets to its initial state" (platform.openai.com/docs/guides/rate-limits),
  and observed values fit a bucket: one request against 5,000 RPM reports `12ms`
  (= 60 s / 5,000; community.openai.com/t/535297).
* Anthropic: "uses the token bucket algorithm ... capacity is continuously replenished
  up to your maximum limit, rather than being reset at fixed intervals"
  (docs.anthropic.com/en/api/rate-limits).

So the headers mean: `remaining` = whole units left now; `reset` = time until the
bucket is full again (`(limit - level) / rate`), which for an exhausted request bucket is
a whole window even though the next request fits after `window_s / limit`.  The 429's
`retry-after` is that shorter wait (whole seconds, rounded up, as OpenAI and Anthropic
send it).  A burst of up to `limit` requests passes at once after an idle spell.

Order of checks: requests, then tokens (a request larger than the whole token limit is
refused for good: OpenAI's "Request too large"), then concurrency.  A request refused
only for concurrency has already been counted against the per-minute limits: OpenAI's
guide says "unsuccessful requests contribute to your per-minute limit, so continuously
resending a request won't work" (`count_rejected=False` turns that off).  A request
refused by a per-minute limit takes nothing, as there is nothing left to take.  The
concurrency 429 is this stub's own: OpenAI documents no concurrency limit, so it uses
the shape of OpenAI's per-minute 429 (`rate_limit_exceeded`, `retry-after`), which every
client reads as a rate limit.

Counted (`stats()`): requests admitted, refused (in all and by reason), served to the
end, the most in flight at once, tokens served, and tokens charged to refused requests.
`log` keeps one `Entry` per request for a benchmark to read.  Thread-safe: the stub
server answers each connection in its own thread.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

Reason = Literal["concurrency", "requests", "tokens", "too_large"]


@dataclass(frozen=True)
class Limits:
    """What the provider allows; None switches a limit off."""

    concurrency: int | None = None
    rpm: int | None = None
    """Requests per window (per minute at the default `window_s`)."""
    tpm: int | None = None
    """Tokens per window."""
    delay_s: float = 0.0
    """How long an admitted request waits before its reply (holding its slot)."""
    jitter: float = 0.0
    """± this fraction of `delay_s`, drawn from `random.Random(seed)`."""
    seed: int = 0
    window_s: float = 60.0
    """The "minute": shrink it (with `delay_s`) for a quick run at the same ratios."""
    count_rejected: bool = True
    """A request refused for concurrency still spends its per-minute allowance."""
    concurrency_retry_after_s: float = 1.0

    def __post_init__(self) -> None:
        for name in ("concurrency", "rpm", "tpm"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"Limits.{name} must be at least 1 (or None for no limit), "
                                 f"not {value}")
        if self.window_s <= 0 or self.delay_s < 0 or not 0 <= self.jitter < 1:
            raise ValueError("Limits: window_s must be > 0, delay_s >= 0, 0 <= jitter < 1")


@dataclass(frozen=True)
class Window:
    """One per-minute limit as the headers state it, just after this request."""

    limit: int
    remaining: int
    reset_s: float
    """Seconds until the bucket is full again."""


@dataclass(frozen=True)
class Verdict:
    """The limiter's answer to one request."""

    admitted: bool
    reason: Reason | None
    retry_after_s: float | None
    """When a retry can pass (None: never, the request is too large)."""
    requests: Window | None
    tokens: Window | None
    tokens_asked: int
    concurrency: int | None
    delay_s: float
    index: int
    """The request's place in `Limiter.log`."""


@dataclass
class Entry:
    """One request as the limiter saw it; times on the limiter's clock."""

    t: float
    tokens: int
    reason: Reason | None
    """None when admitted."""
    charged: int = 0
    """Tokens taken from the per-minute allowance (a refused request's too, see above)."""
    t_end: float | None = None
    served: bool = False
    """Admitted and its reply written to the end."""


class _Bucket:
    """Continuous replenishment: `level` refills at `limit / window_s` per second."""

    def __init__(self, limit: int, window_s: float, now: float) -> None:
        self.limit = limit
        self.rate = limit / window_s
        self.level = float(limit)
        self.t = now

    def refill(self, now: float) -> None:
        self.level = min(float(self.limit), self.level + (now - self.t) * self.rate)
        self.t = now

    def wait_for(self, n: int) -> float:
        return max(0.0, (n - self.level) / self.rate)

    def window(self) -> Window:
        return Window(self.limit, max(0, math.floor(self.level + 1e-9)),
                      (self.limit - self.level) / self.rate)


@dataclass
class Limiter:
    """Admits requests against `limits`; `clock` is injectable for unit tests."""

    limits: Limits
    clock: Callable[[], float] = time.monotonic
    log: list[Entry] = field(default_factory=list)

    def __post_init__(self) -> None:
        now = self.clock()
        lim = self.limits
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._woken = threading.Event()
        self._rng = random.Random(lim.seed)
        self._requests = _Bucket(lim.rpm, lim.window_s, now) if lim.rpm else None
        self._tokens = _Bucket(lim.tpm, lim.window_s, now) if lim.tpm else None
        self.in_flight = 0
        self.max_in_flight = 0

    # -- admission ---------------------------------------------------------------------
    def arrive(self, tokens: int) -> Verdict:
        """Decide on one request that will cost `tokens`; an admitted one must `finish`."""
        lim = self.limits
        with self._lock:
            now = self.clock()
            for bucket in (self._requests, self._tokens):
                if bucket is not None:
                    bucket.refill(now)
            reason: Reason | None = None
            wait: float | None = None
            charge = False
            if self._requests is not None and self._requests.level < 1:
                reason, wait = "requests", self._requests.wait_for(1)
            elif self._tokens is not None and tokens > self._tokens.limit:
                reason = "too_large"
            elif self._tokens is not None and self._tokens.level < tokens:
                reason, wait = "tokens", self._tokens.wait_for(tokens)
            elif lim.concurrency is not None and self.in_flight >= lim.concurrency:
                reason, wait = "concurrency", lim.concurrency_retry_after_s
                charge = lim.count_rejected
            else:
                charge = True
            if charge:
                if self._requests is not None:
                    self._requests.level -= 1
                if self._tokens is not None:
                    self._tokens.level -= tokens
            if reason is None:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                self._changed.notify_all()
            delay = lim.delay_s * (1 + lim.jitter * (2 * self._rng.random() - 1))
            self.log.append(Entry(now, tokens, reason, tokens if charge else 0,
                                  None if reason is None else now))
            return Verdict(
                admitted=reason is None, reason=reason, retry_after_s=wait,
                requests=self._requests.window() if self._requests else None,
                tokens=self._tokens.window() if self._tokens else None,
                tokens_asked=tokens, concurrency=lim.concurrency,
                delay_s=delay if reason is None else 0.0, index=len(self.log) - 1)

    def finish(self, verdict: Verdict, served: bool) -> None:
        """An admitted request's reply ended (`served`: written to the end)."""
        with self._lock:
            self.in_flight -= 1
            entry = self.log[verdict.index]
            entry.t_end = self.clock()
            entry.served = served
            self._changed.notify_all()

    def sleep(self, seconds: float) -> None:
        """An admitted request's delay; `wake()` cuts it short."""
        self._woken.wait(seconds)

    def wake(self) -> None:
        """End every delay now and skip later ones: a test holds requests in flight with
        a long `delay_s`, then lets them all answer."""
        self._woken.set()

    def wait_in_flight(self, n: int, timeout: float = 30.0) -> bool:
        """Block until exactly `n` requests are in flight (False after `timeout`)."""
        with self._changed:
            return self._changed.wait_for(lambda: self.in_flight == n, timeout)

    @contextmanager
    def request(self, tokens: int) -> Iterator[Verdict]:
        """`arrive`, and `finish` an admitted request when the block ends; the block
        sleeps `delay_s` itself (`serve` does), so a test can hold a slot as it likes."""
        verdict = self.arrive(tokens)
        if not verdict.admitted:
            yield verdict
            return
        served = False
        try:
            yield verdict
            served = True
        finally:
            self.finish(verdict, served)

    # -- counts ------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        with self._lock:
            refused: dict[str, int] = {}
            for e in self.log:
                if e.reason is not None:
                    refused[e.reason] = refused.get(e.reason, 0) + 1
            return {
                "requests": len(self.log),
                "admitted": sum(1 for e in self.log if e.reason is None),
                "rejected": sum(refused.values()),
                "rejected_by_reason": refused,
                "served": sum(1 for e in self.log if e.served),
                "max_in_flight": self.max_in_flight,
                "tokens_served": sum(e.tokens for e in self.log if e.served),
                "tokens_charged_to_rejected": sum(e.charged for e in self.log
                                                  if e.reason is not None),
            }


def serve(limiter: Limiter, tokens: int, refuse: Callable[[Verdict], None],
          answer: Callable[[Verdict], None]) -> None:
    """What a stub's handler does with a limited request: refuse it, or wait the delay
    (holding the slot) and answer it.  The slot is given back before the answer is sent,
    as a provider's is once the answer is ready: a client that reads the answer and sends
    its next request at once must find the slot free, or a busy machine (this thread not
    yet back from writing) turns the stub's own bookkeeping into a spurious 429."""
    with limiter.request(tokens) as verdict:
        if not verdict.admitted:
            refuse(verdict)
            return
        if verdict.delay_s:
            limiter.sleep(verdict.delay_s)
    answer(verdict)


# -- OpenAI ----------------------------------------------------------------------------
def go_duration(seconds: float) -> str:
    """OpenAI's reset format, Go's `time.Duration.String()` at millisecond precision:
    `0s`, `120ms`, `1s`, `8.64s`, `6m0s`, `1h2m3.5s`."""
    ms = max(0, round(seconds * 1000))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if h:
        return f"{h}h{m}m{s}s"
    return f"{m}m{s}s" if m else f"{s}s"


def retry_after(verdict: Verdict) -> str | None:
    """`retry-after` in whole seconds, rounded up (at least 1), as both providers send."""
    if verdict.retry_after_s is None:
        return None
    return str(max(1, math.ceil(verdict.retry_after_s - 1e-9)))


def openai_headers(verdict: Verdict) -> dict[str, str]:
    """`x-ratelimit-{limit,remaining,reset}-{requests,tokens}`, and `retry-after` on a 429."""
    headers: dict[str, str] = {}
    for kind, window in (("requests", verdict.requests), ("tokens", verdict.tokens)):
        if window is not None:
            headers[f"x-ratelimit-limit-{kind}"] = str(window.limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(window.remaining)
            headers[f"x-ratelimit-reset-{kind}"] = go_duration(window.reset_s)
    wait = retry_after(verdict)
    if not verdict.admitted and wait is not None:
        headers["retry-after"] = wait
    return headers


RATE_LIMITS_URL = "https://platform.openai.com/account/rate-limits"


def openai_error(verdict: Verdict, model: str) -> dict[str, Any]:
    """OpenAI's 429 body (`{"error": {"message", "type", "param", "code"}}`), worded as
    OpenAI words its per-minute limits ("Rate limit reached for ... on requests per min
    (RPM): Limit 3, Used 3, Requested 1. Please try again in 20s. ...")."""
    org = f"for {model} in organization org-stub"
    wait = go_duration(verdict.retry_after_s or 0.0)
    req, tok = verdict.requests, verdict.tokens
    if verdict.reason == "requests" and req is not None:
        kind = "requests"
        text = (f"Rate limit reached {org} on requests per min (RPM): Limit {req.limit}, "
                f"Used {req.limit - req.remaining}, Requested 1. Please try again in {wait}.")
    elif verdict.reason == "tokens" and tok is not None:
        kind = "tokens"
        text = (f"Rate limit reached {org} on tokens per min (TPM): Limit {tok.limit}, "
                f"Used {tok.limit - tok.remaining}, Requested {verdict.tokens_asked}. "
                f"Please try again in {wait}.")
    elif verdict.reason == "too_large" and tok is not None:
        kind = "tokens"
        text = (f"Request too large {org} on tokens per min (TPM): Limit {tok.limit}, "
                f"Requested {verdict.tokens_asked}. The input or output tokens must be "
                "reduced in order to run successfully.")
    else:
        kind = "requests"
        text = (f"Too many concurrent requests {org}: Limit {verdict.concurrency}, "
                f"In flight {verdict.concurrency}. Please try again in {wait}.")
    return {"error": {"message": f"{text} Visit {RATE_LIMITS_URL} to learn more.",
                      "type": kind, "param": None, "code": "rate_limit_exceeded"}}


# -- Anthropic -------------------------------------------------------------------------
def rfc3339(seconds_from_now: float, now: datetime | None = None) -> str:
    """Anthropic's reset instants: RFC 3339 in UTC, whole seconds rounded up."""
    base = now or datetime.now(UTC)
    return (base + timedelta(seconds=math.ceil(seconds_from_now))).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def anthropic_headers(verdict: Verdict, now: datetime | None = None) -> dict[str, str]:
    """`anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}`, and `retry-after`
    on a 429.  (The real API also splits tokens into `-input-tokens-*` and
    `-output-tokens-*`; one token limit here, so only the combined family.)"""
    headers: dict[str, str] = {}
    for kind, window in (("requests", verdict.requests), ("tokens", verdict.tokens)):
        if window is not None:
            headers[f"anthropic-ratelimit-{kind}-limit"] = str(window.limit)
            headers[f"anthropic-ratelimit-{kind}-remaining"] = str(window.remaining)
            headers[f"anthropic-ratelimit-{kind}-reset"] = rfc3339(window.reset_s, now)
    wait = retry_after(verdict)
    if not verdict.admitted and wait is not None:
        headers["retry-after"] = wait
    return headers


def anthropic_error(verdict: Verdict) -> dict[str, Any]:
    """Anthropic's 429 body: `{"type": "error", "error": {"type": "rate_limit_error",
    "message"}}` (the caller adds `request_id`)."""
    if verdict.reason == "requests" and verdict.requests is not None:
        what = f"of {verdict.requests.limit} requests per minute"
    elif verdict.reason in ("tokens", "too_large") and verdict.tokens is not None:
        what = f"of {verdict.tokens.limit} tokens per minute"
    else:
        what = f"of {verdict.concurrency} concurrent requests"
    message = (f"This request would exceed the rate limit for your organization {what}. "
               "For details, refer to: https://docs.claude.com/en/api/rate-limits.")
    return {"type": "error", "error": {"type": "rate_limit_error", "message": message}}
