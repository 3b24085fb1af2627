"""One call in flight at a time; what is queued meanwhile leaves together in the next call.

A gateway makes the same short call for every request (write its payload, submit it, expire
its payload): one call each costs a round trip, its wake-ups and, at the far end, a request to
handle, paid per request in a burst. Batched this way, a lone item still leaves at once and a
burst's items leave in a few calls. Used by :class:`gateway.redis_batch.CommandBatch` and by
the scheduler client's submissions.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")

SendBatch = Callable[[list[Item]], Awaitable[Sequence[Any]]]
"""Sends items in one call: one reply per item, in order, an exception for an item that
failed alone; raising fails every item of the call."""


class InFlightBatches(Generic[Item]):
    """Items sent by ``send``, at most ``max_items`` a call, one call in flight at a time."""

    def __init__(self, send: SendBatch[Item], max_items: int) -> None:
        self._send = send
        self._max_items = max_items
        self._queued: list[tuple[Item, asyncio.Future[Any]]] = []
        self._sender: asyncio.Task[None] | None = None

    def enqueue(self, item: Item) -> asyncio.Future[Any]:
        """The future of ``item``'s reply. Cancelling it before its call left takes the item
        out of the call."""
        result: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # Its reply may come after its caller stopped waiting: nobody else would read it.
        result.add_done_callback(_retrieved)
        self._queued.append((item, result))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_queued())
        return result

    async def _send_queued(self) -> None:
        try:
            while self._queued:
                batch = [(i, r) for i, r in self._queued[:self._max_items] if not r.done()]
                del self._queued[:self._max_items]
                if batch:
                    await self._send_batch(batch)
        except BaseException:  # cancelled (the gateway stops): nobody will send the rest
            for _, result in self._queued:
                result.cancel()
            self._queued.clear()
            raise
        finally:
            self._sender = None

    async def _send_batch(self, batch: list[tuple[Item, asyncio.Future[Any]]]) -> None:
        try:
            replies: Sequence[Any] = await self._send([item for item, _ in batch])
        except Exception as err:  # the call failed: every item shares its fate
            replies = [err] * len(batch)
        except BaseException:
            for _, result in batch:
                result.cancel()
            raise
        for (_, result), reply in zip(batch, replies, strict=True):
            if result.done():
                continue
            if isinstance(reply, Exception):
                result.set_exception(reply)
            else:
                result.set_result(reply)


def _retrieved(result: asyncio.Future[Any]) -> None:
    if not result.cancelled():
        result.exception()
