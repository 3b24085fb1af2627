"""Short Redis commands of concurrent requests, sent together in one pipelined round trip.

Every request makes the gateway write its payload when it arrives and set its expiry when it
ends. One command each costs a connection taken from the pool and given back, a round trip
and its wake-ups; a burst of arrivals pays that per request. Here one pipeline is in flight
at a time and the commands queued meanwhile leave together when it returns
(:mod:`gateway.batching`): a lone command goes at once, a burst's in a few round trips. Only
for commands Redis answers at once (never a blocking read: the commands behind it would wait
for it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from gateway.batching import InFlightBatches

MAX_COMMANDS = 512
"""Commands per pipeline at most."""

QueueCommand = Callable[[Pipeline], object]
"""Queues one command on the pipeline it is given (``lambda pipe: pipe.expire(key, 60)``)."""


class CommandBatch:
    """Runs commands through pipelines, one in flight at a time."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._batches: InFlightBatches[QueueCommand] = InFlightBatches(
            self._execute, MAX_COMMANDS)

    async def run(self, queue_command: QueueCommand) -> Any:
        """The command's reply; its error (a RedisError) raised as it would be alone. A caller
        cancelled before its command left takes it out of the batch."""
        return await self._batches.enqueue(queue_command)

    async def _execute(self, commands: list[QueueCommand]) -> list[Any]:
        pipe = self._redis.pipeline(transaction=False)
        for queue_command in commands:
            queue_command(pipe)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies
