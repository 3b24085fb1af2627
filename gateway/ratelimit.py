"""Per-API-key admission limits: a request rate (token bucket) and concurrent streams.

Each key (its ``name`` in the key file, :mod:`gateway.auth`) gets one :class:`TokenBucket`
refilled at ``rate`` requests per second up to ``burst`` requests, and a count of its streams in
progress capped at ``max_streams``. A generation request (gRPC Generate, HTTP completion) takes
one token from its key's bucket when it is admitted; a request refused for its stream count or
by the gateway-wide ``--max-streams`` takes none, so a client held back by one limit does not
also drain the other. Without API keys every client is the one key :data:`ANONYMOUS_KEY`, so
the limits then cap the gateway's whole traffic.

Everything here is pure bookkeeping over an injectable clock (no I/O, no asyncio): the gateway
turns a :class:`Refusal` into RESOURCE_EXHAUSTED (HTTP 429 with ``Retry-After``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Clock = Callable[[], float]
"""Seconds on a clock that never goes back (``time.monotonic``; a fake one in tests)."""

ANONYMOUS_KEY = "anonymous"
"""The key name every client shares when the gateway runs without API keys."""

EPSILON = 1e-9
"""Slack for float rounding: a caller that waited exactly the advertised time is admitted."""

LimitName = Literal["rate", "streams"]
"""The ``limit`` label of ``andes_gateway_rate_limited_total``."""


@dataclass(frozen=True)
class KeyLimits:
    """One key's limits; 0 means unlimited (``burst`` 0: one second of ``rate``, at least 1)."""

    rate: float = 0.0
    """Generation requests per second, sustained."""
    burst: float = 0.0
    """Requests admitted at once after an idle spell (the bucket's size)."""
    max_streams: int = 0
    """Generation streams in progress at once."""

    def __post_init__(self) -> None:
        for name, value in (("rate", self.rate), ("burst", self.burst),
                            ("max_streams", self.max_streams)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if 0 < self.burst < 1:
            raise ValueError(f"burst must be 0 or >= 1 (a request takes one token), "
                             f"got {self.burst!r}")
        if self.max_streams != int(self.max_streams):
            raise ValueError(f"max_streams must be a whole number, got {self.max_streams!r}")

    @property
    def bucket_size(self) -> float:
        """The burst in effect: as configured, or one second of ``rate`` (at least 1)."""
        return self.burst if self.burst else max(1.0, self.rate)


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; starts full.

    Over any window of ``t`` seconds it hands out at most ``burst + rate * t`` tokens, and its
    level is never negative: a request that does not fit takes nothing and is told how long to
    wait instead.
    """

    def __init__(self, rate: float, burst: float, clock: Clock = time.monotonic) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be a finite number > 0, got {rate!r}")
        if not (math.isfinite(burst) and burst >= 1):
            raise ValueError(f"burst must be a finite number >= 1, got {burst!r}")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._updated = clock()

    @property
    def tokens(self) -> float:
        """The level now, in [0, burst]."""
        self._refill()
        return self._tokens

    def take(self, cost: float = 1.0) -> float:
        """Take ``cost`` tokens if the bucket holds them: 0.0. Otherwise take nothing and return
        the seconds until it will (``inf`` if ``cost`` exceeds the burst: never)."""
        self._refill()
        if self._tokens + EPSILON >= cost:
            self._tokens = max(0.0, self._tokens - cost)
            return 0.0
        if cost > self.burst:
            return math.inf
        return (cost - self._tokens) / self.rate

    def _refill(self) -> None:
        now = self._clock()
        elapsed = now - self._updated
        if elapsed > 0:  # a clock that went back refills nothing (and moves no reference)
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
            self._updated = now


@dataclass(frozen=True)
class Refusal:
    """Why a key's request was not admitted."""

    limit: LimitName
    message: str
    retry_after_s: float | None = None
    """When the rate limit will admit it (None: unknown, a stream must end first)."""


class KeyLimiter:
    """Buckets and stream counts by key name (the key file bounds how many names there are).

    :meth:`admit` a request, then :meth:`release` it exactly once when its stream ends, for
    whatever reason: the service does this in a ``finally``.
    """

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._streams: dict[str, int] = {}

    def streams(self, key: str) -> int:
        """``key``'s streams in progress."""
        return self._streams.get(key, 0)

    def admit(self, key: str, limits: KeyLimits) -> Refusal | None:
        """Count a new stream of ``key`` (None), or say which limit refuses it (nothing
        counted or taken then)."""
        streams = self._streams.get(key, 0)
        if limits.max_streams and streams >= limits.max_streams:
            return Refusal("streams", f"API key {key!r} is at its concurrent-stream limit "
                                      f"({limits.max_streams} streams): retry when one ends")
        if limits.rate:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = TokenBucket(limits.rate, limits.bucket_size, self._clock)
                self._buckets[key] = bucket
            wait_s = bucket.take()
            if wait_s:
                return Refusal("rate", f"API key {key!r} is over its rate limit ({limits.rate:g} "
                                       f"requests/s, burst {limits.bucket_size:g}): retry in "
                                       f"{retry_after_seconds(wait_s)} s", retry_after_s=wait_s)
        self._streams[key] = streams + 1
        return None

    def release(self, key: str) -> None:
        """One stream of ``key`` ended."""
        left = self._streams.get(key, 0) - 1
        if left > 0:
            self._streams[key] = left
        else:
            self._streams.pop(key, None)


def retry_after_seconds(wait_s: float) -> int:
    """A wait as ``Retry-After`` states it: whole seconds, rounded up, at least 1."""
    if not math.isfinite(wait_s):
        return 3600  # never, for this limit: a long wait rather than a busy retry loop
    return max(1, math.ceil(wait_s))
