"""Token buckets per requester (devft_edge.ratelimit): hand-computed refills on an injected clock."""

from __future__ import annotations

import pytest

from devft_edge.errors import ConfigError
from devft_edge.ratelimit import RateLimiter


def test_a_burst_is_allowed_then_the_rate():
    limiter = RateLimiter(rate_per_s=2.0, burst=3.0)
    assert [limiter.allow("pi-1", now=0.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("pi-1", now=0.4) is False  # 0.8 tokens
    assert limiter.allow("pi-1", now=0.5) is True  # 1.0 token
    assert [limiter.allow("pi-1", now=10.0) for _ in range(4)] == [True, True, True, False]  # refills to burst only


def test_costs_are_bytes_and_a_refused_request_spends_nothing():
    chunk = 96 * 1024
    limiter = RateLimiter(rate_per_s=10 * chunk, burst=64 * chunk)
    assert all(limiter.allow("pi-1", cost=chunk, now=0.0) for _ in range(64))  # one window at once
    assert limiter.allow("pi-1", cost=chunk, now=0.0) is False
    assert limiter.allow("pi-1", cost=2 * chunk, now=0.15) is False  # 1.5 chunks refilled, none spent
    assert limiter.allow("pi-1", cost=chunk, now=0.15) is True
    assert limiter.allow("pi-1", cost=65 * chunk, now=1e6) is False  # more than a full bucket: never
    assert limiter.allow("pi-1", cost=0.0, now=0.0) is True


def test_keys_have_their_own_buckets():
    limiter = RateLimiter(rate_per_s=1.0, burst=1.0)
    assert limiter.allow("greedy", now=0.0) and not limiter.allow("greedy", now=0.0)
    assert limiter.allow("honest", now=0.0)


def test_a_clock_going_backwards_refills_nothing():
    limiter = RateLimiter(rate_per_s=1.0, burst=1.0)
    assert limiter.allow("pi-1", now=100.0)
    assert not limiter.allow("pi-1", now=50.0)
    assert not limiter.allow("pi-1", now=100.5)  # half a token since 100, not 50.5 tokens since 50
    assert limiter.allow("pi-1", now=101.0)


def test_memory_is_bounded_by_forgetting_the_least_recently_seen_key():
    limiter = RateLimiter(rate_per_s=1.0, burst=1.0, max_keys=3)
    for key in ("a", "b", "c"):
        assert limiter.allow(key, now=0.0)
    assert not limiter.allow("a", now=0.0)  # "a" is now the most recently seen
    for i in range(1000):
        limiter.allow(f"ghost-{i}", now=0.0)
        assert len(limiter) <= 3
    limiter = RateLimiter(rate_per_s=1.0, burst=1.0, max_keys=3)
    for key in ("a", "b", "c", "a", "d"):  # "d" pushes out "b", the least recently seen
        limiter.allow(key, now=0.0)
    assert not limiter.allow("a", now=0.0) and not limiter.allow("c", now=0.0)
    assert limiter.allow("b", now=0.0)  # forgotten, so back with a full bucket


def test_the_default_clock_is_monotonic_time():
    limiter = RateLimiter(rate_per_s=1e-9, burst=1.0)
    assert limiter.allow("pi-1") and not limiter.allow("pi-1")


@pytest.mark.parametrize(
    "rate,burst,keys,problems",
    [(0.0, 1.0, 1, 1), (1.0, -1.0, 1, 1), (1.0, 1.0, 0, 1), (-1.0, 0.0, 0, 3), (float("nan"), 1.0, 1, 1)],
)
def test_non_positive_arguments_are_config_errors_listing_each(rate, burst, keys, problems):
    with pytest.raises(ConfigError) as error:
        RateLimiter(rate_per_s=rate, burst=burst, max_keys=keys)
    assert len(error.value.problems) == problems


@pytest.mark.parametrize("cost", [-1.0, float("nan")])
def test_a_negative_cost_is_a_config_error(cost):
    with pytest.raises(ConfigError):
        RateLimiter(rate_per_s=1.0, burst=1.0).allow("pi-1", cost=cost, now=0.0)
