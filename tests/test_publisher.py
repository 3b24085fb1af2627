"""The worker's token publisher with a publish interval, against a real Redis: first tokens and
final entries go out at once, the rest wait until the oldest waiting token is an interval old,
and whatever the interval the stream holds every token once, in order."""

from __future__ import annotations

import asyncio
import itertools
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from andes import tokenstream
from andes.v1.generation_pb2 import FINISH_REASON_LENGTH as LENGTH
from worker.engine import TokenRun
from worker.publisher import TokenPublisher


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def _entries(redis: Redis, key: str) -> list[tokenstream.TokenChunk]:
    return [tokenstream.decode_chunk(fields) for _, fields in await redis.xrange(key)]


def test_interval_batches_tokens_but_never_delays_the_first_or_the_last(redis_url: str) -> None:
    async def scenario() -> None:
        redis = Redis.from_url(redis_url)
        clock = Clock()
        key = f"pub-{uuid.uuid4().hex[:8]}"
        publisher = TokenPublisher(redis, interval_s=0.05, clock=clock)
        publisher.open("r", key, 0)
        publisher.add(TokenRun("r", 0, (10,), "a"))
        assert await publisher.flush() == []  # the first token: out at once
        assert publisher.published("r") == 1
        for i in range(1, 4):  # three more iterations within the interval: they wait
            clock.now += 0.01
            publisher.add(TokenRun("r", i, (10 + i,), "b"))
            assert await publisher.flush() == []
        assert publisher.published("r") == 1 and publisher.pending_tokens == 3
        clock.now += 0.03  # the oldest waiting token is now 0.05 s old
        publisher.add(TokenRun("r", 4, (14,), "c"))
        assert await publisher.flush() == []
        assert publisher.published("r") == 5
        publisher.add(TokenRun("r", 5, (15,), "d"))
        publisher.finish("r", LENGTH)  # the final entry never waits
        assert await publisher.flush() == ["r"]
        assert await _entries(redis, key) == [
            tokenstream.TokenChunk(0, (10,), "a", 0),
            tokenstream.TokenChunk(1, (11, 12, 13, 14), "bbbc", 0),
            tokenstream.TokenChunk(5, (15,), "d", LENGTH),
        ]
        await redis.aclose()

    asyncio.run(scenario())


def test_force_writes_everything_waiting(redis_url: str) -> None:
    async def scenario() -> None:
        redis = Redis.from_url(redis_url)
        key = f"pub-{uuid.uuid4().hex[:8]}"
        publisher = TokenPublisher(redis, interval_s=10.0, clock=Clock())
        publisher.open("r", key, 7)  # moved here: its first entry from this worker is at 7
        publisher.add(TokenRun("r", 7, (1,), "x"))
        await publisher.flush()
        publisher.add(TokenRun("r", 8, (2, 3), "yz"))
        await publisher.flush()
        assert publisher.pending_tokens == 2
        await publisher.flush(force=True)
        assert publisher.pending_tokens == 0 and publisher.published("r") == 10
        assert [c.index for c in await _entries(redis, key)] == [7, 8]
        await redis.aclose()

    asyncio.run(scenario())


def test_a_negative_interval_is_refused(redis_url: str) -> None:
    with pytest.raises(ValueError, match="interval"):
        TokenPublisher(Redis.from_url(redis_url), interval_s=-1.0)


@settings(max_examples=30, deadline=None)
@given(
    interval_s=st.sampled_from([0.0, 0.01, 0.05, 1.0]),
    steps=st.lists(st.tuples(st.integers(1, 3), st.floats(0.0, 0.04), st.booleans()),
                   min_size=1, max_size=40),
)
def test_any_interval_publishes_every_token_once_in_order(
    redis_url: str, interval_s: float, steps: list[tuple[int, float, bool]]
) -> None:
    async def scenario() -> None:
        redis = Redis.from_url(redis_url)
        clock = Clock()
        key = f"pub-{uuid.uuid4().hex[:8]}"
        publisher = TokenPublisher(redis, interval_s=interval_s, clock=clock)
        publisher.open("r", key, 0)
        made = 0
        for count, elapsed, flush in steps:
            publisher.add(TokenRun("r", made, tuple(range(made, made + count)), "t" * count))
            made += count
            clock.now += elapsed
            if flush:
                await publisher.flush()
        publisher.finish("r", LENGTH)
        assert await publisher.flush() == ["r"]
        chunks = await _entries(redis, key)
        assert [t for c in chunks for t in c.token_ids] == list(range(made))
        assert all(a.end == b.index for a, b in itertools.pairwise(chunks))
        assert "".join(c.text for c in chunks) == "t" * made
        await redis.aclose()

    asyncio.run(scenario())
