"""A token bucket per key: how much one requester may draw per second.

A device asking for chunks faster than it could consume them is either broken or hostile; without
a bound, one requester can keep the holder reading and publishing chunks at disk and network speed
and starve everyone else. Each key (a device id) has a bucket that refills at ``rate_per_s`` up to
``burst``; a request of ``cost`` is allowed when the bucket holds that much, which it then spends.
With ``cost`` the chunk's bytes, ``rate_per_s`` is bytes per second and ``burst`` the most one
requester can draw at once (at least a window of chunks). A holder that refuses what the bucket
cannot pay for polices; the aggregator shapes instead: it keeps one such request per device and
serves it once the bucket has refilled, so an honest pull faster than the rate is paced, not
refused, and only a second ask meanwhile is (``cloud_aggregator/service.py``).

Memory is bounded: beyond ``max_keys`` the least recently seen key is forgotten, and comes back with
a full bucket. Keys should therefore be authenticated identities (registered device ids), which an
attacker cannot mint by the thousand to reset its own bucket.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from devft_edge.errors import raise_if


class RateLimiter:
    """Token buckets keyed by requester; time is injectable (``now``) for tests."""

    def __init__(self, rate_per_s: float, burst: float, max_keys: int = 4096) -> None:
        """Raises :class:`~devft_edge.errors.ConfigError` listing every non-positive argument."""
        raise_if(
            [
                f"{name} must be > 0, got {value}"
                for name, value in (("rate_per_s", rate_per_s), ("burst", burst), ("max_keys", max_keys))
                if not value > 0  # also catches NaN
            ]
        )
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        """key -> (tokens, time they were counted), least recently seen first."""

    def __len__(self) -> int:
        """Keys tracked now (at most ``max_keys``)."""
        return len(self._buckets)

    def allow(self, key: str, cost: float = 1.0, now: float | None = None) -> bool:
        """Spend ``cost`` from ``key``'s bucket if it holds that much; whether it did.

        A refused request spends nothing, so a requester that backs off gets through once its
        bucket has refilled; a ``cost`` above ``burst`` is never allowed. ``now`` defaults to
        :func:`time.monotonic`; a clock that goes backwards refills nothing.

        Raises:
            ConfigError: ``cost`` is negative (it would fill the bucket).
        """
        raise_if([] if cost >= 0 else [f"cost must be >= 0, got {cost}"])
        clock = time.monotonic() if now is None else now
        tokens, then = self._buckets.pop(key, (self.burst, clock))
        tokens = min(self.burst, tokens + max(0.0, clock - then) * self.rate_per_s)
        allowed = cost <= tokens
        if allowed:
            tokens -= cost
        self._buckets[key] = (tokens, max(clock, then))
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return allowed
