"""Delivery progress, batched onto one long-lived ``ReportDelivery`` stream to the scheduler.

The planner needs each client's buffer of unread tokens (what makes pausing a request safe),
and that follows from the pacer summary of what the client received: delivered tokens ``k``,
running max ``M_k`` and delay sum ``S_k`` (``andes.qoe``). Sending a message per token would
cost the scheduler more than the information is worth; instead the latest summary per request
is kept and the ones that changed go out together every ``interval_s`` (50-100 ms: well under
a token interval at reading speed, so the planner never works from a stale buffer level).

One stream carries everything; when it breaks (scheduler restart) the reporter reconnects with
exponential backoff and re-sends the latest summary of every live request, so the new
scheduler learns all buffers at once. While nothing changes, an empty batch every
``heartbeat_s`` keeps the stream proven alive. Completed requests are dropped after they were
sent once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import grpc

from andes.v1 import scheduler_pb2
from gateway.scheduler import SchedulerClient
from gateway.tasks import cancel_and_wait

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """One request's delivery summary (``andes.v1.DeliveryProgress``)."""

    request_id: str
    delivered_tokens: int
    digest_max_s: float
    delay_sum_s: float
    arrival_unix_s: float
    complete: bool = False

    def to_proto(self) -> scheduler_pb2.DeliveryProgress:
        return scheduler_pb2.DeliveryProgress(
            request_id=self.request_id,
            delivered_tokens=self.delivered_tokens,
            digest_max_s=self.digest_max_s,
            delay_sum_s=self.delay_sum_s,
            arrival_unix_s=self.arrival_unix_s,
            complete=self.complete,
        )


class DeliveryReporter:
    """Collects :class:`Progress` updates and streams them to the scheduler."""

    def __init__(
        self,
        scheduler: SchedulerClient,
        gateway_id: str,
        *,
        interval_s: float = 0.075,
        heartbeat_s: float = 1.0,
        max_backoff_s: float = 5.0,
    ) -> None:
        self._scheduler = scheduler
        self.gateway_id = gateway_id
        self.interval_s = interval_s
        self.heartbeat_s = heartbeat_s
        self.max_backoff_s = max_backoff_s
        self._latest: dict[str, Progress] = {}
        self._dirty: set[str] = set()
        self._closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.batches_sent = 0

    def update(self, progress: Progress) -> None:
        """Record a request's newest summary (it replaces any unsent older one)."""
        previous = self._latest.get(progress.request_id)
        if previous is not None and previous.complete and not progress.complete:
            return  # a late update must not revive a request already reported complete
        self._latest[progress.request_id] = progress
        self._dirty.add(progress.request_id)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="delivery-reporter")

    async def close(self, timeout_s: float = 1.0) -> None:
        """Send what is pending (best effort within ``timeout_s``) and end the stream."""
        self._closing.set()
        if self._task is None:
            return
        await asyncio.wait({self._task}, timeout=timeout_s)
        await cancel_and_wait(self._task)

    def _take_batch(self) -> list[Progress]:
        batch = [self._latest[request_id] for request_id in self._dirty]
        self._dirty.clear()
        for progress in batch:
            if progress.complete:
                del self._latest[progress.request_id]
        return batch

    def _restore(self, batch: list[Progress]) -> None:
        """Put an unsent batch back, unless newer summaries arrived meanwhile."""
        for progress in batch:
            if progress.request_id not in self._latest:
                self._latest[progress.request_id] = progress
                self._dirty.add(progress.request_id)

    async def _run(self) -> None:
        backoff = 0.1
        while not self._closing.is_set():
            call: Any = self._scheduler.report_delivery()
            self._dirty.update(self._latest)  # a new stream (new scheduler?) gets everything
            try:
                await self._stream(call)
                backoff = 0.1
            except asyncio.CancelledError:
                call.cancel()
                raise
            except Exception as err:  # grpc.aio raises several internal types
                reason = await _describe(call, err)
                call.cancel()
                if self._closing.is_set():
                    log.info("delivery stream closed with an error (%s)", reason)
                    return
                log.warning("delivery stream to the scheduler broke (%s); reconnecting in %.1f s",
                            reason, backoff)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), backoff)
                backoff = min(backoff * 2, self.max_backoff_s)

    async def _stream(self, call: Any) -> None:
        last_sent = time.monotonic()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.interval_s)
            closing = self._closing.is_set()
            now = time.monotonic()
            if self._dirty or now - last_sent >= self.heartbeat_s:
                batch = self._take_batch()
                try:
                    await call.write(scheduler_pb2.ReportDeliveryRequest(
                        gateway_id=self.gateway_id,
                        sent_unix_s=time.time(),
                        progress=[p.to_proto() for p in batch],
                    ))
                except BaseException:
                    self._restore(batch)
                    raise
                self.batches_sent += 1
                last_sent = now
            if closing:
                await call.done_writing()
                await call
                return


async def _describe(call: Any, err: BaseException) -> str:
    """The call's status if it has one (write errors only say "RPC already finished")."""
    if isinstance(err, grpc.aio.AioRpcError):
        return f"{err.code().name}: {err.details()}"
    if call.done():
        with contextlib.suppress(Exception):
            return f"{(await call.code()).name}: {await call.details()}"
    return repr(err)
