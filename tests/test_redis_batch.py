"""The gateway's batched Redis commands (``gateway/redis_batch.py``) against a real Redis."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from gateway.redis_batch import CommandBatch
from tests.conftest import free_port


class CountingRedis(aioredis.Redis):
    """A real client that counts the pipelines made from it."""

    pipelines = 0

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        self.pipelines += 1
        return super().pipeline(*args, **kwargs)


def test_concurrent_commands_share_pipelines_and_keep_their_own_replies(redis_url: str) -> None:
    async def scenario() -> None:
        client = CountingRedis.from_url(redis_url)
        batch = CommandBatch(client)
        prefix = f"test:batch:{uuid.uuid4().hex[:8]}"
        try:
            await client.hset(f"{prefix}:hash", "f", "v")

            async def incr(i: int) -> Any:
                return await batch.run(lambda pipe: pipe.incrby(f"{prefix}:n{i % 3}", i))

            async def wrong_type() -> Any:  # INCR on a hash: this command fails alone
                return await batch.run(lambda pipe: pipe.incr(f"{prefix}:hash"))

            replies = await asyncio.gather(*(incr(i) for i in range(30)), wrong_type(),
                                           return_exceptions=True)
            assert isinstance(replies[30], ResponseError) and "WRONGTYPE" in str(replies[30])
            # In order: each key's running sum as its commands ran.
            sums = {0: 0, 1: 0, 2: 0}
            for i, reply in enumerate(replies[:30]):
                sums[i % 3] += i
                assert reply == sums[i % 3]
            assert 1 <= client.pipelines < 31
            assert await batch.run(lambda pipe: pipe.get(f"{prefix}:n0")) == str(sums[0]).encode()
        finally:
            await client.delete(f"{prefix}:hash", *(f"{prefix}:n{i}" for i in range(3)))
            await client.aclose()

    asyncio.run(scenario())


def test_a_caller_cancelled_before_its_command_left_takes_it_out(redis_url: str) -> None:
    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_url)
        batch = CommandBatch(client)
        prefix = f"test:batch:{uuid.uuid4().hex[:8]}"
        try:
            kept = asyncio.create_task(batch.run(lambda pipe: pipe.set(f"{prefix}:a", 1)))
            dropped = asyncio.create_task(batch.run(lambda pipe: pipe.set(f"{prefix}:b", 1)))
            await asyncio.sleep(0)  # both queued; the batch has not left yet
            dropped.cancel()
            assert await kept is True
            with pytest.raises(asyncio.CancelledError):
                await dropped
            assert await client.exists(f"{prefix}:a", f"{prefix}:b") == 1
        finally:
            await client.delete(f"{prefix}:a", f"{prefix}:b")
            await client.aclose()

    asyncio.run(scenario())


def test_an_unreachable_redis_fails_every_command_of_the_batch() -> None:
    async def scenario() -> None:
        client = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0",
                                         socket_connect_timeout=0.5)
        batch = CommandBatch(client)
        try:
            replies = await asyncio.gather(
                *(batch.run(lambda pipe: pipe.get("k")) for _ in range(3)),
                return_exceptions=True)
            assert all(isinstance(r, RedisConnectionError) for r in replies)
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_payloads_are_created_once_and_after_redis_lost_its_scripts(redis_url: str) -> None:
    from andes.tokenstream import FINISHED_TTL_S
    from gateway.payload import PayloadStore
    from gateway.validation import ValidRequest

    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_url)
        store = PayloadStore(client, f"test:{uuid.uuid4().hex[:8]}", "gw")
        request = ValidRequest(request_id="r1", id_generated=False, prompt="hi",
                               prompt_token_ids=(), max_tokens=4, ttft_s=1.0, tds=5.0)
        try:
            created = await asyncio.gather(*(store.create(request, 2, 1.0) for _ in range(3)))
            assert sorted(created) == [False, False, True]  # one claim wins, in one batch
            await store.finished("r1")
            assert 0 < await client.ttl(store.payload_key("r1")) <= FINISHED_TTL_S
            await client.script_flush()  # a restarted Redis knows no script
            again = ValidRequest(request_id="r2", id_generated=False, prompt="hi",
                                 prompt_token_ids=(), max_tokens=4, ttft_s=1.0, tds=5.0)
            assert await store.create(again, 2, 1.0) is True
            assert await client.hget(store.payload_key("r2"), "prompt") == b"hi"
        finally:
            await client.delete(store.payload_key("r1"), store.payload_key("r2"))
            await client.aclose()

    asyncio.run(scenario())
