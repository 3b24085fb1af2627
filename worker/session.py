"""The worker's end of ``SchedulerService.WorkerSession``: register, report, receive, reconnect.

The session is the only thing that talks to the scheduler. It registers (the scheduler
acknowledges with the ``andes-session`` initial-metadata key), then forwards the loop's step
reports and sends a heartbeat whenever nothing else went out for ``heartbeat_s``. Whatever
the scheduler sends (assignments, plans, aborts) lands in :attr:`inbox` for the loop to drain
at its next iteration boundary: the loop never waits for the scheduler.

When the scheduler goes away the session reconnects with exponential backoff while the loop
keeps executing its last plan. Step reports made meanwhile are dropped (each one lists every
held request, so the next one supersedes them) except for their finished requests, which the
scheduler must not miss: those, and the ones sent just before the break (they may have been
lost in flight), ride on the report that follows the new registration. The scheduler ignores
finishes it already knows.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import grpc

from andes.tls import ChannelCredentials, aio_channel
from andes.v1 import scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger(__name__)

SESSION_METADATA_KEY = "andes-session"
"""Initial-metadata key the scheduler sends once it accepted a registration."""

Message = scheduler_pb2.WorkerSessionRequest


class RegistrationRefusedError(Exception):
    """The scheduler rejected the registration as invalid: retrying cannot help."""


async def cancel_and_wait(*tasks: asyncio.Future[Any]) -> None:
    """Cancel tasks and wait until they are done, without hiding our own cancellation."""
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)


class SchedulerSession:
    """A self-healing bidirectional session with the scheduler (over TLS when given
    ``credentials``)."""

    def __init__(
        self,
        target: str,
        *,
        registration: Callable[[], scheduler_pb2.Registration],
        sync_report: Callable[[], scheduler_pb2.StepReport],
        heartbeat_s: float = 0.5,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 2.0,
        resend_window_s: float = 5.0,
        on_registered: Callable[[], None] | None = None,
        credentials: ChannelCredentials | None = None,
    ) -> None:
        self._target = target
        self._credentials = credentials
        self._registration = registration
        self._sync_report = sync_report
        self._heartbeat_s = heartbeat_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._resend_window_s = resend_window_s
        self._on_registered = on_registered
        self.inbox: asyncio.Queue[scheduler_pb2.WorkerSessionResponse] = asyncio.Queue()
        self.plan_received_unix_s: dict[int, float] = {}
        """When each plan in the inbox arrived, by version (the loop takes them out)."""
        self.connected = asyncio.Event()
        self.registrations = 0
        """How many sessions the scheduler accepted so far (1 after the first)."""
        self._outbox: asyncio.Queue[Message] | None = None
        self._last_sent = 0.0
        self._recent: deque[tuple[float, scheduler_pb2.FinishedRequest]] = deque()
        self._unsent: list[scheduler_pb2.FinishedRequest] = []
        self._unreachable_logged = False

    # -- what the loop calls -------------------------------------------------------------

    def take_plan_received(self, version: int) -> float:
        """When plan ``version`` arrived (0.0 if unknown), forgetting it and the older plans
        it superseded."""
        received = self.plan_received_unix_s.pop(version, 0.0)
        for older in [v for v in self.plan_received_unix_s if v < version]:
            del self.plan_received_unix_s[older]
        return received

    def send_report(self, report: scheduler_pb2.StepReport) -> None:
        """Queue a step report (never blocks); keeps its finishes if it cannot go out now."""
        if self._outbox is None:
            self._unsent.extend(report.finished)
            return
        now = time.monotonic()
        self._recent.extend((now, f) for f in report.finished)
        while self._recent and now - self._recent[0][0] > self._resend_window_s:
            self._recent.popleft()
        self._outbox.put_nowait(Message(step_report=report))

    # -- the session ---------------------------------------------------------------------

    async def run(self) -> None:
        """Keep a session open until cancelled."""
        backoff = self._backoff_initial_s
        async with aio_channel(self._target, self._credentials) as channel:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)  # type: ignore[no-untyped-call]
            while True:
                if await self._session(stub):
                    backoff = self._backoff_initial_s
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2.0, self._backoff_max_s)

    def _resend(self) -> list[scheduler_pb2.FinishedRequest]:
        """Finishes the scheduler may have missed: unsent ones and the last ones sent."""
        finished = {f.request_id: f for _, f in self._recent}
        finished.update((f.request_id, f) for f in self._unsent)
        return list(finished.values())

    async def _session(self, stub: scheduler_pb2_grpc.SchedulerServiceStub) -> bool:
        """One session, from registration to its end; whether the scheduler accepted it."""
        call = stub.WorkerSession()
        try:
            await call.write(Message(registration=self._registration()))
            metadata = await call.initial_metadata()
            if metadata is None or SESSION_METADATA_KEY not in dict(metadata):
                code, details = await call.code(), await call.details()
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise RegistrationRefusedError(f"scheduler refused the worker: {details}")
                log.warning("scheduler refused the registration: %s %s", code, details)
                return False
            sync = self._sync_report()
            resent = self._resend()
            sync.finished.extend(resent)
            await call.write(Message(step_report=sync))
            # Sent again; kept for the resend window in case this session breaks at once.
            now = time.monotonic()
            self._unsent.clear()
            self._recent = deque((now, f) for f in resent)
            outbox: asyncio.Queue[Message] = asyncio.Queue()
            self._outbox = outbox
            self._last_sent = time.monotonic()
            self.registrations += 1
            self._unreachable_logged = False
            self.connected.set()
            log.info("registered with the scheduler at %s", self._target)
            if self._on_registered is not None:
                self._on_registered()
            await self._pump(call, outbox)
            return True
        except RegistrationRefusedError:
            raise
        except Exception as err:  # a broken session of any kind: reconnect
            if self._outbox is not None:
                log.info("scheduler session failed: %s", err)
            elif not self._unreachable_logged:
                self._unreachable_logged = True
                log.warning("cannot reach the scheduler at %s (retrying): %s", self._target, err)
            return self._outbox is not None
        finally:
            outbox_left = self._outbox
            self._outbox = None
            self.connected.clear()
            if outbox_left is not None:
                # Reports still queued never reached the scheduler: keep their finishes.
                while not outbox_left.empty():
                    msg = outbox_left.get_nowait()
                    self._unsent.extend(msg.step_report.finished)
            call.cancel()

    async def _pump(
        self,
        call: grpc.aio.StreamStreamCall[Message, scheduler_pb2.WorkerSessionResponse],
        outbox: asyncio.Queue[Message],
    ) -> None:
        tasks = [
            asyncio.create_task(self._read(call)),
            asyncio.create_task(self._write(call, outbox)),
            asyncio.create_task(self._heartbeat(outbox)),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait(*tasks)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.info("scheduler session ended: %s", task.exception())
            else:
                log.info("scheduler closed the session")

    async def _read(
        self, call: grpc.aio.StreamStreamCall[Message, scheduler_pb2.WorkerSessionResponse]
    ) -> None:
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF:
                return
            if msg.WhichOneof("message") == "plan":
                self.plan_received_unix_s[msg.plan.plan_version] = time.time()
            self.inbox.put_nowait(msg)

    async def _write(
        self,
        call: grpc.aio.StreamStreamCall[Message, scheduler_pb2.WorkerSessionResponse],
        outbox: asyncio.Queue[Message],
    ) -> None:
        while True:
            msg = await outbox.get()
            try:
                await call.write(msg)
            except BaseException:
                # Not written: its finishes must survive into the next session.
                self._unsent.extend(msg.step_report.finished)
                raise
            self._last_sent = time.monotonic()

    async def _heartbeat(self, outbox: asyncio.Queue[Message]) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_s / 2)
            if time.monotonic() - self._last_sent >= self._heartbeat_s and outbox.empty():
                outbox.put_nowait(
                    Message(heartbeat=scheduler_pb2.Heartbeat(sent_unix_s=time.time()))
                )
