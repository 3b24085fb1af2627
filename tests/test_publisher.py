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


async def _flush_until_done(publisher: TokenPublisher, *request_ids: str) -> None:
    done: set[str] = set()
    for _ in range(4):
        done.update(await publisher.flush() or [])
    assert done == set(request_ids)


def _read_as_a_client(chunks: list[tokenstream.TokenChunk]) -> tuple[list[int], str]:
    """Each index once, with its text, as the gateway's readers take a stream."""
    position, tokens, text = 0, [], ""
    for chunk in chunks:
        part = chunk.after(position)
        if part is None:
            continue
        tokens.extend(part.token_ids)
        text += part.text
        position = part.end
        if part.finish_reason:
            break
    return tokens, text


def test_a_failed_flush_that_partly_landed_is_not_written_twice(redis_url: str) -> None:
    """A pipeline can fail after some of its entries were written (Redis stopped, or a
    command refused mid-pipeline: here one stream's key holds a string). The retry appends
    only what the stream does not hold yet: entries never overlap, the text stays whole."""

    async def scenario() -> None:
        redis = Redis.from_url(redis_url)
        good, bad = (f"pub-{uuid.uuid4().hex[:8]}" for _ in range(2))
        await redis.set(bad, "not a stream")
        publisher = TokenPublisher(redis)
        publisher.open("good", good, 0)
        publisher.open("bad", bad, 0)
        publisher.add(TokenRun("good", 0, (0, 1, 2), "zero one two "))
        publisher.add(TokenRun("bad", 0, (7,), "seven "))
        assert await publisher.flush() is None
        assert [c.token_ids for c in await _entries(redis, good)] == [(0, 1, 2)], "it landed"
        await redis.delete(bad)
        publisher.add(TokenRun("good", 3, (3, 4), "three four "))
        publisher.finish("good", LENGTH)
        publisher.finish("bad", LENGTH)
        await _flush_until_done(publisher, "good", "bad")
        chunks = await _entries(redis, good)
        assert all(a.end == b.index for a, b in itertools.pairwise(chunks)), chunks
        assert _read_as_a_client(chunks) == ([0, 1, 2, 3, 4], "zero one two three four ")
        assert _read_as_a_client(await _entries(redis, bad)) == ([7], "seven ")
        await redis.aclose()

    asyncio.run(scenario())


def test_a_stale_writer_never_overlaps_the_new_one(redis_url: str) -> None:
    """A worker frozen past its timeout wakes up and publishes for a request that moved on:
    its appends land only where the stream ends, so the client still reads every token once
    with its text, whichever writer made it."""

    async def scenario() -> None:
        redis = Redis.from_url(redis_url)
        key = f"pub-{uuid.uuid4().hex[:8]}"
        words = [f"w{i} " for i in range(12)]
        stale, current = TokenPublisher(redis), TokenPublisher(redis)
        stale.open("r", key, 0)
        stale.add(TokenRun("r", 0, (0, 1), "".join(words[0:2])))
        assert await stale.flush() == []
        current.open("r", key, 2)  # moved: resumes where the stream ended
        for i in range(2, 6):
            current.add(TokenRun("r", i, (i,), words[i]))
        assert await current.flush() == []
        for i in range(2, 9):  # the stale one wakes up with tokens of its own
            stale.add(TokenRun("r", i, (i,), words[i]))
        assert await stale.flush() == []
        for i in range(6, 12):
            current.add(TokenRun("r", i, (i,), words[i]))
        current.finish("r", LENGTH)
        await _flush_until_done(current, "r")
        chunks = await _entries(redis, key)
        assert all(a.end == b.index for a, b in itertools.pairwise(chunks)), chunks
        assert _read_as_a_client(chunks) == (list(range(12)), "".join(words))
        await redis.aclose()

    asyncio.run(scenario())


_OPS = st.lists(st.one_of(
    st.tuples(st.just("add"), st.sampled_from("abc"), st.integers(1, 3)),
    st.tuples(st.just("finish"), st.sampled_from("abc"), st.just(0)),
    st.tuples(st.just("forget"), st.sampled_from("abc"), st.just(0)),
    st.tuples(st.just("flush"), st.sampled_from("abc"), st.integers(0, 1)),
    st.tuples(st.just("tick"), st.sampled_from("abc"), st.integers(0, 60)),
    st.tuples(st.just("other writer"), st.sampled_from("abc"), st.integers(-2, 3)),
), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None)
@given(ops=_OPS)
def test_what_waits_is_counted_as_it_changes(redis_url: str,
                                              ops: list[tuple[str, str, int]]) -> None:
    """The publisher keeps its count of waiting tokens, whether anything waits and which
    requests' published index moved as things happen, instead of looking at every request
    held (a thousand queued requests would cost a millisecond per iteration). Whatever the
    sequence of tokens, endings, forgotten requests, flushes, elapsed time and appends by
    another writer, the counts are what the requests' own figures add up to."""

    async def scenario() -> None:
        redis = Redis.from_url(redis_url)
        clock = Clock()
        publisher = TokenPublisher(redis, interval_s=0.05, clock=clock)
        run_id = uuid.uuid4().hex[:8]
        keys = {rid: f"pub-{run_id}-{rid}" for rid in "abc"}
        made = dict.fromkeys("abc", 0)
        ending = dict.fromkeys("abc", False)
        live = set("abc")
        for rid in "abc":
            publisher.open(rid, keys[rid], 0)
        last_published = dict.fromkeys("abc", 0)
        for op, rid, arg in ops:
            if op == "add" and rid in live and not ending[rid]:
                publisher.add(TokenRun(rid, made[rid], tuple(range(made[rid], made[rid] + arg)),
                                       "t" * arg))
                made[rid] += arg
            elif op == "finish" and rid in live:
                publisher.finish(rid, LENGTH)
                ending[rid] = True
            elif op == "forget":
                publisher.forget(rid)
                live.discard(rid)
            elif op == "flush":
                done = await publisher.flush(force=bool(arg))
                live.difference_update(done or [])
            elif op == "tick":
                clock.now += arg / 1000
            elif op == "other writer":  # appends where the stream ends, maybe past ours
                chunks = await _entries(redis, keys[rid])
                end = chunks[-1].end if chunks else 0
                if arg > 0 and not (chunks and chunks[-1].finish_reason):
                    await redis.xadd(keys[rid], tokenstream.encode_chunk(tokenstream.TokenChunk(
                        end, tuple(range(end, end + arg)), "o" * arg)))
            waiting = {r: max(made[r] - publisher.published(r), 0) for r in live}
            assert publisher.pending_tokens == sum(waiting.values())
            assert publisher.has_pending == any(
                waiting[r] or (ending[r] and r in live) for r in live)
            moved = publisher.take_published_moved()
            for r in "abc":
                if publisher.published(r) != last_published[r]:
                    assert r in moved, (r, last_published[r], publisher.published(r))
                last_published[r] = publisher.published(r)
        await redis.aclose()

    asyncio.run(scenario())
