"""Short Redis commands of concurrent requests, sent together in one pipelined round trip.

Every request makes the gateway write its payload when it arrives and set its expiry when it
ends. One command each costs a connection taken from the pool and given back, a round trip
and its wake-ups; a burst of arrivals pays that per request. Here one pipeline is in flight
at a time and the commands queued meanwhile leave together when it returns: a lone command
goes at once, a burst's in a few round trips. Only for commands Redis answers at once (never
a blocking read: the commands behind it would wait for it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

MAX_COMMANDS = 512
"""Commands per pipeline at most."""

QueueCommand = Callable[[Pipeline], object]
"""Queues one command on the pipeline it is given (``lambda pipe: pipe.expire(key, 60)``)."""


class CommandBatch:
    """Runs commands through pipelines, one in flight at a time."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._queued: list[tuple[QueueCommand, asyncio.Future[Any]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def run(self, queue_command: QueueCommand) -> Any:
        """The command's reply; its error (a RedisError) raised as it would be alone. A caller
        cancelled before its command left takes it out of the batch."""
        result: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queued.append((queue_command, result))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send())
        return await result

    async def _send(self) -> None:
        try:
            while self._queued:
                batch = [(q, r) for q, r in self._queued[:MAX_COMMANDS] if not r.done()]
                del self._queued[:MAX_COMMANDS]
                if batch:
                    await self._send_batch(batch)
        except BaseException:  # cancelled (the gateway stops): nobody will send the rest
            for _, result in self._queued:
                result.cancel()
            self._queued.clear()
            raise
        finally:
            self._sender = None

    async def _send_batch(self, batch: list[tuple[QueueCommand, asyncio.Future[Any]]]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for queue_command, _ in batch:
            queue_command(pipe)
        try:
            replies = await pipe.execute(raise_on_error=False)
        except BaseException as err:  # the connection failed: every command shares its fate
            for _, result in batch:
                if not result.done():
                    if isinstance(err, Exception):
                        result.set_exception(err)
                    else:
                        result.cancel()
            if not isinstance(err, Exception):
                raise
            return
        for (_, result), reply in zip(batch, replies, strict=True):
            if result.done():
                continue
            if isinstance(reply, Exception):
                result.set_exception(reply)
            else:
                result.set_result(reply)
