"""Provider adapters read their own response headers: request ids and rate-limit levels.

The rate-limit cases run the way the client does: the adapter translates a response's
headers (``rate_limit_levels``), then the limiter applies the neutral levels (``update``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone

import httpx2
import pytest
import trio
import trio.testing

from trio_llm._ratelimit import RateLimit, RateLimiter, RateLimitLevel, RateLimitLevels
from trio_llm.batch._runner import _wrong_provider
from trio_llm.providers._anthropic import AnthropicProvider
from trio_llm.providers._base import Provider
from trio_llm.providers._headers import parse_go_duration, parse_rfc3339_delay, prefixed
from trio_llm.providers._openai import OpenAIProvider

OPENAI = OpenAIProvider()
ANTHROPIC = AnthropicProvider()
PROVIDERS: tuple[Provider, ...] = (OPENAI, ANTHROPIC)


def feed(provider: Provider, limiter: RateLimiter, headers: Mapping[str, str]) -> None:
    """Apply a response's headers as the client does: the adapter reads, the limiter updates."""
    limiter.update(provider.rate_limit_levels(headers))


# --- header values ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("12ms", 0.012),
        ("1m30.5s", 90.5),
        ("0s", 0.0),
        ("0", 0.0),
        ("2h0m0s", 7200.0),
        ("250us", 250e-6),
        ("250µs", 250e-6),
        ("250μs", 250e-6),
        ("3ns", 3e-9),
        (".5s", 0.5),
        ("1.5", 1.5),
        (" 7s ", 7.0),
    ],
)
def test_go_durations_parse(text: str, seconds: float) -> None:
    """Go-style durations (and plain seconds) convert to seconds."""
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "s", "abc", "1x", "-1s", "1s2", "1s 2m", "1e3s", "nan", "9" * 400, "9" * 400 + "h"]
)
def test_malformed_durations_are_rejected(text: str) -> None:
    """Anything that is not a finite Go duration gives None."""
    assert parse_go_duration(text) is None


def test_rfc3339_resets_convert_with_the_wall_clock() -> None:
    """Anthropic's RFC 3339 reset times become seconds from now, in any zone format."""
    soon = datetime.now(timezone.utc) + timedelta(seconds=30)
    stamp = soon.strftime("%Y-%m-%dT%H:%M:%S")
    offset = soon.astimezone(timezone(timedelta(hours=5, minutes=30)))
    for text in (
        f"{stamp}Z",
        f"{stamp}.5Z",
        f"{stamp}.123456789z",
        f"{stamp}+00:00",
        f"{stamp}",
        offset.strftime("%Y-%m-%dT%H:%M:%S+05:30"),
        offset.strftime("%Y-%m-%dT%H:%M:%S+0530"),
    ):
        delay = parse_rfc3339_delay(text)
        assert delay is not None
        assert 28 <= delay <= 31, text
    assert parse_rfc3339_delay("2001-01-01T00:00:00Z") == 0.0
    assert parse_rfc3339_delay("2024-13-45T00:00:00Z") is None
    assert parse_rfc3339_delay("tomorrow") is None
    assert parse_rfc3339_delay("45s") == 45.0


def test_rfc3339_extremes_do_not_overflow() -> None:
    """Times at the ends of the calendar, with an offset, convert without raising."""
    assert parse_rfc3339_delay("0001-01-01T00:00:00+05:00") == 0.0
    delay = parse_rfc3339_delay("9999-12-31T23:59:59-05:00")
    assert delay is not None
    assert delay > 7e10


async def test_remaining_lowers_the_bucket_but_never_raises_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """x-ratelimit-remaining-* caps the local level; a higher value changes nothing."""
    limiter = RateLimiter(RateLimit(requests_per_minute=60, tokens_per_minute=10_000))
    feed(
        OPENAI,
        limiter,
        {"X-RateLimit-Remaining-Requests": "10", "x-ratelimit-remaining-tokens": "4000"},
    )
    stats = limiter.statistics()
    assert (stats.requests_available, stats.tokens_available) == (10, 4000)
    feed(
        OPENAI,
        limiter,
        {"x-ratelimit-remaining-requests": "59", "x-ratelimit-remaining-tokens": "9000"},
    )
    stats = limiter.statistics()
    assert (stats.requests_available, stats.tokens_available) == (10, 4000)


async def test_exhausted_server_holds_the_next_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """remaining 0 with a long reset delays the next request to the server's pace."""
    limiter = RateLimiter(RateLimit(requests_per_minute=10))
    feed(
        OPENAI,
        limiter,
        {
            "x-ratelimit-limit-requests": "10",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "10m0s",
        },
    )
    await limiter.acquire(0)
    assert trio.current_time() == pytest.approx(60.0)
    # A per-minute server gives nothing to correct: the refill already matches it.
    feed(
        OPENAI,
        limiter,
        {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1m0s"},
    )
    await limiter.acquire(0)
    assert trio.current_time() == pytest.approx(66.0)


async def test_anthropic_headers_correct_the_buckets(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """anthropic-ratelimit-* headers teach limits, lower levels and honour resets."""
    limiter = RateLimiter()
    reset = (datetime.now(timezone.utc) + timedelta(seconds=120)).isoformat()
    feed(
        ANTHROPIC,
        limiter,
        {
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": "0",
            "anthropic-ratelimit-requests-reset": reset.replace("+00:00", "Z"),
            "anthropic-ratelimit-input-tokens-limit": "40000",
            "anthropic-ratelimit-input-tokens-remaining": "39000",
            "anthropic-ratelimit-output-tokens-limit": "8000",
            "anthropic-ratelimit-output-tokens-remaining": "7000",
        },
    )
    stats = limiter.statistics()
    assert (stats.requests_per_minute, stats.tokens_per_minute) == (50, 8000)
    assert stats.tokens_available == 7000
    # The server refills 50 requests in 120 s: the next one is due in 2.4 s.
    await limiter.acquire(0)
    assert trio.current_time() == pytest.approx(2.4, abs=0.05)


async def test_anthropic_tokens_group_wins_over_input_and_output(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The combined anthropic tokens group is used when the server sends it."""
    limiter = RateLimiter()
    feed(
        ANTHROPIC,
        limiter,
        {
            "anthropic-ratelimit-tokens-limit": "100000",
            "anthropic-ratelimit-tokens-remaining": "90000",
            "anthropic-ratelimit-output-tokens-remaining": "5",
        },
    )
    stats = limiter.statistics()
    assert (stats.tokens_per_minute, stats.tokens_available) == (100_000, 90_000)


async def test_anthropic_input_tokens_can_be_the_tighter_group(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Without a combined group, whichever of input and output has less remaining counts."""
    limiter = RateLimiter()
    feed(
        ANTHROPIC,
        limiter,
        {
            "anthropic-ratelimit-input-tokens-limit": "40000",
            "anthropic-ratelimit-input-tokens-remaining": "1000",
            "anthropic-ratelimit-output-tokens-limit": "8000",
            "anthropic-ratelimit-output-tokens-remaining": "7000",
        },
    )
    stats = limiter.statistics()
    assert (stats.tokens_per_minute, stats.tokens_available) == (40_000, 1000)


async def test_malformed_headers_are_ignored(autojump_clock: trio.testing.MockClock) -> None:
    """Unparseable rate-limit headers change nothing and never raise."""
    limiter = RateLimiter(RateLimit(requests_per_minute=60, tokens_per_minute=600))
    before = limiter.statistics()
    headers = {
        "x-ratelimit-limit-requests": "-5",
        "x-ratelimit-remaining-requests": "lots",
        "x-ratelimit-reset-requests": "soon",
        "x-ratelimit-limit-tokens": "0",
        "x-ratelimit-remaining-tokens": "nan",
        "x-ratelimit-reset-tokens": "1y",
        "anthropic-ratelimit-requests-limit": "inf",
        "anthropic-ratelimit-requests-remaining": "",
        "anthropic-ratelimit-requests-reset": "2024-13-45T00:00:00Z",
        "anthropic-ratelimit-tokens-remaining": "-1",
    }
    for provider in PROVIDERS:
        feed(provider, limiter, headers)
        feed(provider, limiter, {"content-type": "application/json"})
    assert limiter.statistics() == before


async def test_limits_are_learned_from_headers(autojump_clock: trio.testing.MockClock) -> None:
    """With no configured limit, the server's x-ratelimit-limit-* becomes the limit."""
    limiter = RateLimiter()
    feed(
        OPENAI,
        limiter,
        {
            "x-ratelimit-limit-requests": "120",
            "x-ratelimit-remaining-requests": "119",
            "x-ratelimit-limit-tokens": "6000",
        },
    )
    stats = limiter.statistics()
    assert (stats.requests_per_minute, stats.requests_available) == (120, 119)
    assert (stats.tokens_per_minute, stats.tokens_available) == (6000, 6000)
    for _ in range(119):
        await limiter.acquire(1)
    assert trio.current_time() == 0
    await limiter.acquire(1)
    assert trio.current_time() == pytest.approx(0.5)


async def test_a_limit_learned_mid_burst_counts_what_is_in_flight(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Requests taken before the limit was known, and not yet settled, count against it.

    An adaptive client sends its first burst with no limit; the first response teaches it
    the limit, and the rest of the burst (still in flight) must not be forgotten. The
    client applies a response's headers first, then settles its reservation.
    """
    limiter = RateLimiter()
    burst = [await limiter.acquire(100) for _ in range(10)]
    feed(
        OPENAI,
        limiter,
        {
            "x-ratelimit-limit-requests": "100",
            "x-ratelimit-remaining-requests": "99",
            "x-ratelimit-limit-tokens": "10000",
            "x-ratelimit-remaining-tokens": "9960",
        },
    )
    burst[0].reconcile(40)
    stats = limiter.statistics()
    assert stats.requests_available == 90  # 100, less the 10 in flight
    assert stats.tokens_available == 9000 + 60  # less their estimates; one came back
    burst[1].reconcile(40)
    burst[2].refund()
    burst[3].keep()  # answered without usage: the estimate stays charged
    stats = limiter.statistics()
    assert stats.requests_available == 91
    assert stats.tokens_available == 9060 + 60 + 100
    # Once known, the limit is not relearned: settling no longer matters to it.
    feed(OPENAI, limiter, {"x-ratelimit-limit-requests": "100"})
    assert limiter.statistics().requests_available == 91
    assert limiter._in_flight_requests == 6


async def test_a_limit_learned_mid_burst_starts_no_lower_than_empty(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """More in flight than the whole limit: the bucket starts empty, not deep in debt."""
    limiter = RateLimiter()
    for _ in range(50):
        await limiter.acquire(1)
    feed(OPENAI, limiter, {"x-ratelimit-limit-requests": "20"})
    assert limiter.statistics().requests_available == 0
    start = trio.current_time()
    await limiter.acquire(1)
    assert trio.current_time() - start == pytest.approx(3.0)  # one request at 20/min


async def test_anthropic_token_limits_ignore_what_is_in_flight(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Anthropic's token limits are per direction: total estimates in flight do not count."""
    limiter = RateLimiter()
    for _ in range(5):
        await limiter.acquire(2300)
    feed(
        ANTHROPIC,
        limiter,
        {
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": "49",
            "anthropic-ratelimit-output-tokens-limit": "10000",
            "anthropic-ratelimit-output-tokens-remaining": "9990",
        },
    )
    stats = limiter.statistics()
    assert stats.requests_available == 45
    assert stats.tokens_available == 9990


async def test_the_lower_of_configured_and_server_limit_holds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A configured limit is kept below the server's and lowered above it."""
    below = RateLimiter(RateLimit(requests_per_minute=60))
    feed(OPENAI, below, {"x-ratelimit-limit-requests": "600"})
    assert below.statistics().requests_per_minute == 60
    above = RateLimiter(RateLimit(requests_per_minute=600))
    feed(OPENAI, above, {"x-ratelimit-limit-requests": "30"})
    stats = above.statistics()
    assert (stats.requests_per_minute, stats.requests_available) == (30, 30)


async def test_a_raised_limit_wakes_the_waiting_head(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A waiter recomputes its wait when the server raises the limit."""
    limiter = RateLimiter()
    feed(
        OPENAI, limiter, {"x-ratelimit-limit-requests": "6", "x-ratelimit-remaining-requests": "0"}
    )
    granted: list[float] = []

    async def acquire_one() -> None:
        await limiter.acquire(0)
        granted.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(acquire_one)
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(1)
        feed(OPENAI, limiter, {"x-ratelimit-limit-requests": "600"})
    assert granted == pytest.approx([1.09])


def test_wall_clock_is_used_for_anthropic_resets() -> None:
    """The reset delay follows time.time(), not trio's clock."""
    later = datetime.fromtimestamp(time.time() + 600, tz=timezone.utc)
    delay = parse_rfc3339_delay(later.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
    assert delay == pytest.approx(600, abs=1)


# --- levels --------------------------------------------------------------------------------


def test_headers_are_matched_whatever_their_case() -> None:
    """prefixed() finds names in any case, keyed by the lower-cased rest."""
    headers = {"X-RateLimit-Limit-Requests": "5", "content-type": "text/plain"}
    assert prefixed(headers, "x-ratelimit-") == {"limit-requests": "5"}


def test_openai_levels() -> None:
    """OpenAI's x-ratelimit-* headers become both levels, with Go-duration resets."""
    headers = httpx2.Headers(
        {
            "X-RateLimit-Limit-Requests": "500",
            "x-ratelimit-remaining-requests": "499",
            "x-ratelimit-reset-requests": "120ms",
            "x-ratelimit-limit-tokens": "30000",
            "x-ratelimit-remaining-tokens": "29000",
            "x-ratelimit-reset-tokens": "1m30.5s",
        }
    )
    assert OPENAI.rate_limit_levels(headers) == RateLimitLevels(
        requests=RateLimitLevel(limit=500, remaining=499, reset_seconds=0.12),
        tokens=RateLimitLevel(limit=30_000, remaining=29_000, reset_seconds=90.5),
    )


def test_anthropic_levels_are_per_direction() -> None:
    """Anthropic's levels mark their token limits as per direction; resets use the wall clock."""
    reset = (datetime.now(timezone.utc) + timedelta(seconds=60)).isoformat()
    levels = ANTHROPIC.rate_limit_levels(
        {
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": "49",
            "anthropic-ratelimit-requests-reset": reset,
            "anthropic-ratelimit-output-tokens-limit": "8000",
        }
    )
    assert levels is not None
    assert levels.tokens_per_direction
    assert (levels.requests.limit, levels.requests.remaining) == (50, 49)
    assert levels.requests.reset_seconds == pytest.approx(60, abs=2)
    assert levels.tokens == RateLimitLevel(limit=8000)


@pytest.mark.parametrize(
    ("provider", "foreign"),
    [
        (OPENAI, {"anthropic-ratelimit-requests-limit": "50"}),
        (ANTHROPIC, {"x-ratelimit-limit-requests": "50"}),
    ],
)
def test_no_levels_without_the_providers_own_headers(
    provider: Provider, foreign: dict[str, str]
) -> None:
    """An adapter reports None for a response without its rate-limit headers."""
    assert provider.rate_limit_levels({}) is None
    assert provider.rate_limit_levels({"content-type": "application/json"}) is None
    assert provider.rate_limit_levels(foreign) is None


# --- request ids ---------------------------------------------------------------------------


def test_openai_request_id() -> None:
    """OpenAI's request id is x-request-id; other headers are not it."""
    assert OPENAI.request_id({"x-request-id": "req_1"}) == "req_1"
    assert OPENAI.request_id(httpx2.Headers({"X-Request-Id": "req_2"})) == "req_2"
    assert OPENAI.request_id({"request-id": "req_3"}) is None
    assert OPENAI.request_id({"x-request-id": ""}) is None


def test_anthropic_request_id() -> None:
    """Anthropic's request id is request-id, or x-request-id when a proxy sends that."""
    assert ANTHROPIC.request_id({"request-id": "req_1", "x-request-id": "proxy"}) == "req_1"
    assert ANTHROPIC.request_id({"x-request-id": "proxy"}) == "proxy"
    assert ANTHROPIC.request_id(httpx2.Headers({"Request-Id": "req_2"})) == "req_2"
    assert ANTHROPIC.request_id({}) is None


# --- batch urls ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "openai", "anthropic"),
    [
        ("/v1/chat/completions", True, True),
        ("/v1/embeddings", True, False),
        ("/v1/messages", False, True),
        ("/v1/completions", False, False),
    ],
)
def test_accepts_batch_url(url: str, openai: bool, anthropic: bool) -> None:
    """Each adapter accepts the batch endpoints it can send: chat both, the rest one each."""
    assert OPENAI.accepts_batch_url(url) is openai
    assert ANTHROPIC.accepts_batch_url(url) is anthropic


def test_a_refused_batch_url_names_the_provider_it_needs() -> None:
    """The batch runner's refusal names the provider(s) whose adapter accepts the url."""
    assert _wrong_provider("/v1/messages") == (
        "/v1/messages lines need a client opened with provider='anthropic'"
    )
    assert _wrong_provider("/v1/embeddings") == (
        "/v1/embeddings lines need a client opened with provider='openai'"
    )
