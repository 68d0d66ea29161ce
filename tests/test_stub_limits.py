"""The rate-limited stub provider (tests/stubs/limits.py) over real HTTP on 127.0.0.1.

Each limit is tested through the stubs' sockets: requests beyond it get a 429 with the
provider's headers and body, and pass again once the bucket has refilled.  The
limiter's clock is a fake one the test advances (so "after the reset" costs no real
minute); requests are held in flight with a long delay and released with `wake()`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from parallel_dispatch.fmt import duration_s
from stubs.anthropic import KEY, AnthropicStub
from stubs.limits import Limiter, Limits, go_duration
from stubs.openai_chat import COMPLETION_TOKENS, PROMPT_TOKENS, OpenAIChatStub

PER_CALL = PROMPT_TOKENS + COMPLETION_TOKENS
HOLD_S = 600.0
"""A delay no test waits out: held requests are released with `wake()`."""


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def chat() -> Iterator[OpenAIChatStub]:
    with OpenAIChatStub.running() as stub:
        yield stub


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False, timeout=30) as client:
        yield client


def limit(stub: OpenAIChatStub | AnthropicStub, clock: FakeClock, **kw: Any) -> Limiter:
    stub.limiter = Limiter(Limits(**kw), clock=clock)
    return stub.limiter


def complete(http: httpx.Client, stub: OpenAIChatStub, stream: bool = False) -> httpx.Response:
    return http.post(stub.base_url + "/chat/completions",
                     json={"model": "stub-model", "stream": stream,
                           "messages": [{"role": "user", "content": "hi"}]})


def in_background(stub: OpenAIChatStub) -> tuple[threading.Thread, list[httpx.Response]]:
    """A completion request on its own connection and thread; its response lands in the
    list."""
    out: list[httpx.Response] = []

    def call() -> None:
        with httpx.Client(trust_env=False, timeout=60) as client:
            out.append(complete(client, stub))

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread, out


# --- OpenAI: requests per minute ------------------------------------------------------


def test_requests_per_minute_refused_with_openai_headers_then_admitted_after_reset(
        chat: OpenAIChatStub, http: httpx.Client, clock: FakeClock) -> None:
    limiter = limit(chat, clock, rpm=3)
    for left in (2, 1, 0):
        resp = complete(http, chat)
        assert resp.status_code == 200
        assert resp.json()["choices"][0]["message"]["content"]
        assert resp.headers["x-ratelimit-limit-requests"] == "3"
        assert resp.headers["x-ratelimit-remaining-requests"] == str(left)
        assert "retry-after" not in resp.headers
    # the bucket refills 3 per 60 s: full again after (3 - 0) / (3/60) = 60 s
    assert resp.headers["x-ratelimit-reset-requests"] == "1m0s"

    refused = complete(http, chat)
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "20"  # one request back after 60/3 s
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"] == "1m0s"
    assert refused.headers["x-request-id"].startswith("req_")
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    assert error["param"] is None
    assert error["message"].startswith(
        "Rate limit reached for stub-model in organization org-stub on requests per min "
        "(RPM): Limit 3, Used 3, Requested 1. Please try again in 20s. Visit ")

    clock.now += 19.9
    assert complete(http, chat).status_code == 429  # not yet
    clock.now += 0.1
    again = complete(http, chat)
    assert again.status_code == 200
    assert again.headers["x-ratelimit-remaining-requests"] == "0"
    stats = limiter.stats()
    assert stats["admitted"] == stats["served"] == 4
    assert stats["rejected_by_reason"] == {"requests": 2}
    assert stats["tokens_served"] == 4 * PER_CALL
    assert stats["tokens_charged_to_rejected"] == 0


def test_streamed_replies_carry_the_headers_too(chat: OpenAIChatStub, http: httpx.Client,
                                                clock: FakeClock) -> None:
    limit(chat, clock, rpm=10, tpm=100_000)
    resp = complete(http, chat, stream=True)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "text/event-stream"
    assert "data: [DONE]" in resp.text
    assert resp.headers["x-ratelimit-remaining-requests"] == "9"
    assert resp.headers["x-ratelimit-remaining-tokens"] == str(100_000 - PER_CALL)
    # 1,234 tokens back at 100,000 per 60 s: 0.7404 s
    assert resp.headers["x-ratelimit-reset-tokens"] == "740ms"
    assert resp.headers["x-ratelimit-reset-requests"] == "6s"


# --- OpenAI: tokens per minute --------------------------------------------------------


def test_tokens_per_minute_refused_then_admitted(chat: OpenAIChatStub, http: httpx.Client,
                                                 clock: FakeClock) -> None:
    limiter = limit(chat, clock, tpm=2 * PER_CALL + 100)
    assert complete(http, chat).status_code == 200
    assert complete(http, chat).status_code == 200
    refused = complete(http, chat)
    assert refused.status_code == 429
    assert refused.headers["x-ratelimit-remaining-tokens"] == "100"
    assert "x-ratelimit-limit-requests" not in refused.headers  # no request limit set
    # 1,134 tokens missing at 2,568 per 60 s: 26.5 s, so retry-after 27
    assert refused.headers["retry-after"] == "27"
    assert duration_s(refused.headers["x-ratelimit-reset-tokens"]) == pytest.approx(57.66,
                                                                                    abs=0.01)
    error = refused.json()["error"]
    assert error["type"] == "tokens" and error["code"] == "rate_limit_exceeded"
    assert (f"on tokens per min (TPM): Limit {2 * PER_CALL + 100}, Used {2 * PER_CALL}, "
            f"Requested {PER_CALL}. Please try again in 26.495s.") in error["message"]
    clock.now += 26.5
    assert complete(http, chat).status_code == 200
    assert limiter.stats()["rejected_by_reason"] == {"tokens": 1}


def test_a_request_larger_than_the_token_limit_is_refused_without_a_retry_time(
        chat: OpenAIChatStub, http: httpx.Client, clock: FakeClock) -> None:
    limit(chat, clock, tpm=1000)
    refused = complete(http, chat)
    assert refused.status_code == 429
    assert "retry-after" not in refused.headers
    message = refused.json()["error"]["message"]
    assert f"Request too large for stub-model in organization org-stub on tokens per min " \
        f"(TPM): Limit 1000, Requested {PER_CALL}." in message


# --- concurrency ----------------------------------------------------------------------


def test_concurrency_limit_refuses_while_full_and_counts_against_the_minute(
        chat: OpenAIChatStub, http: httpx.Client, clock: FakeClock) -> None:
    limiter = limit(chat, clock, concurrency=2, rpm=4, delay_s=HOLD_S)
    held = [in_background(chat) for _ in range(2)]
    assert limiter.wait_in_flight(2), "the two held requests never arrived"

    refused = complete(http, chat)
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    # the refused request spent its per-minute allowance (OpenAI: unsuccessful requests
    # count), so 4 - 3 are left
    assert refused.headers["x-ratelimit-remaining-requests"] == "1"
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert error["message"].startswith("Too many concurrent requests for stub-model in "
                                       "organization org-stub: Limit 2, In flight 2. Please "
                                       "try again in 1s.")
    limiter.wake()
    for thread, out in held:
        thread.join(30)
        assert out and out[0].status_code == 200
    assert limiter.wait_in_flight(0)
    assert complete(http, chat).status_code == 200  # the last request of the minute
    assert complete(http, chat).status_code == 429
    stats = limiter.stats()
    assert stats["max_in_flight"] == 2
    assert stats["rejected_by_reason"] == {"concurrency": 1, "requests": 1}
    assert stats["tokens_charged_to_rejected"] == PER_CALL


def test_refused_requests_can_be_left_uncounted(chat: OpenAIChatStub, http: httpx.Client,
                                                clock: FakeClock) -> None:
    limiter = limit(chat, clock, concurrency=1, rpm=4, delay_s=HOLD_S, count_rejected=False)
    thread, out = in_background(chat)
    assert limiter.wait_in_flight(1)
    refused = complete(http, chat)
    assert refused.status_code == 429
    assert refused.headers["x-ratelimit-remaining-requests"] == "3"
    limiter.wake()
    thread.join(30)
    assert out[0].status_code == 200


def test_title_and_model_list_requests_are_not_limited(chat: OpenAIChatStub,
                                                       http: httpx.Client,
                                                       clock: FakeClock) -> None:
    limiter = limit(chat, clock, rpm=1)
    assert complete(http, chat).status_code == 200
    assert http.get(chat.base_url + "/models").status_code == 200
    title = http.post(chat.base_url + "/chat/completions", json={
        "model": "stub-model", "messages": [
            {"role": "system", "content": "Generate a title for this conversation"},
            {"role": "user", "content": "hi"}]})
    assert title.status_code == 200
    assert limiter.stats()["requests"] == 1


# --- Anthropic ------------------------------------------------------------------------


def test_anthropic_headers_and_429(http: httpx.Client, clock: FakeClock) -> None:
    with AnthropicStub.running() as stub:
        limiter = limit(stub, clock, rpm=2, tpm=50_000)
        tokens = stub.input_tokens + stub.output_tokens

        def call() -> httpx.Response:
            return http.post(stub.origin + "/v1/messages", headers={"x-api-key": KEY},
                             json={"model": "claude-sonnet-4-5", "max_tokens": 100,
                                   "messages": [{"role": "user", "content": "hi"}]})

        before = datetime.now(UTC).replace(microsecond=0)
        ok = call()
        assert ok.status_code == 200 and ok.json()["type"] == "message"
        assert ok.headers["anthropic-ratelimit-requests-limit"] == "2"
        assert ok.headers["anthropic-ratelimit-requests-remaining"] == "1"
        assert ok.headers["anthropic-ratelimit-tokens-remaining"] == str(50_000 - tokens)
        reset = datetime.strptime(ok.headers["anthropic-ratelimit-requests-reset"],
                                  "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        assert 30 <= (reset - before).total_seconds() <= 32  # one request back in 30 s
        assert call().status_code == 200
        refused = call()
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "30"
        assert refused.headers["x-should-retry"] == "true"
        assert refused.headers["anthropic-ratelimit-requests-remaining"] == "0"
        body = refused.json()
        assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
        assert "of 2 requests per minute" in body["error"]["message"]
        assert body["request_id"] == refused.headers["request-id"]
        clock.now += 30
        assert call().status_code == 200
        assert limiter.stats()["rejected"] == 1


# --- formats --------------------------------------------------------------------------


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (0.0004, "0s"), (0.012, "12ms"), (0.12, "120ms"), (1, "1s"), (8.64, "8.64s"),
    (62.64, "1m2.64s"), (360, "6m0s"), (3723.5, "1h2m3.5s"), (3600, "1h0m0s")])
def test_go_durations_as_openai_writes_them(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text
    assert duration_s(text) == pytest.approx(round(seconds, 3))  # what our runners read


def test_bad_limits_are_refused_with_the_field_named() -> None:
    with pytest.raises(ValueError, match=r"Limits\.rpm must be at least 1"):
        Limits(rpm=0)
