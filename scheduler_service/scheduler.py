"""The scheduler's event handling: submissions, aborts, deliveries, worker sessions, plans.

Everything runs on one asyncio loop and touches the table synchronously, so handlers need no
locks. Each worker session owns an outbox (what the gRPC handler writes to the worker) and a
planner task with the plan cadence:

* after an event on the worker (submission, finish, forced preemption, delivery report) a
  plan follows at once, but no sooner than ``plan_interval_s`` after the previous one (unless
  the event is an arrival at a worker with room for all its requests, where there is nothing
  to arbitrate: :func:`~andes.policies.room_for_everyone`);
* without events, a plan at least every ``replan_after_s`` (QoE predictions drift with time);
* while the worker has not yet applied the plan last sent (its step reports echo the
  version), no new plan: it would be computed from a view that does not reflect the previous
  decisions (unless the plan seems lost: ``replan_after_s``).

Plans go out versioned and are sticky on the worker, which never waits for them.

Failures: a worker whose session ends, or that is silent for ``worker_timeout_s``, is dead;
its requests stay orphaned for ``reassign_grace_s`` (a worker that reconnects in time keeps
them, it kept running them meanwhile), then move to live workers and resume, by recompute,
at the last token their old worker published.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from andes.policies import Policy, room_for_everyone
from andes.v1 import generation_pb2, scheduler_pb2
from scheduler_service import metrics
from scheduler_service.convert import plan_to_proto, profile_from_proto
from scheduler_service.placement import (
    NoLiveWorkerError,
    PlacementError,
    QueuesFullError,
    TooLargeError,
    WorkerLoad,
    choose_worker,
)
from scheduler_service.planner import Planner, has_actions
from scheduler_service.table import RequestEntry, RequestMeta, SchedulerTable

log = logging.getLogger(__name__)

MAX_REQUEST_ID_CHARS = 256

Outgoing = scheduler_pb2.WorkerSessionResponse


class RejectedError(Exception):
    """A request the scheduler refuses, with the gRPC status to answer."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(eq=False)
class WorkerSessionHandle:
    """One open worker session: its outbox and its planner's state."""

    worker_id: str
    session_id: int
    outbox: asyncio.Queue[Outgoing | None] = field(default_factory=asyncio.Queue)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    dirty: bool = True
    arrival_fits: bool = False
    """A request arrived while the worker had room for all of its requests: the next plan
    need not wait for ``plan_interval_s``."""
    synced: bool = False
    """Whether the session's first step report arrived (the plan version is known)."""
    missing: list[str] = field(default_factory=list)
    last_plan_s: float = -math.inf
    last_sent_s: float = -math.inf
    snapshot_unix_s: dict[int, float] = field(default_factory=dict)
    """Plans sent and not yet applied: version -> when its snapshot was taken (wall clock)."""
    closed: bool = False
    task: asyncio.Task[None] | None = None
    open_assignments: Outgoing | None = None
    """The outbox's last message while it carries assignments and waits to be written: the
    next assignment joins it (one message for a burst's assignments, still in order)."""

    def send(self, message: Outgoing) -> None:
        if not self.closed:
            self.open_assignments = None  # an assignment after it must not overtake it
            self.outbox.put_nowait(message)

    def assign(self, assignment: scheduler_pb2.Assignment) -> None:
        """Send ``assignment``: with the assignments waiting to be written, if the last
        message waiting is theirs."""
        if self.closed:
            return
        if self.open_assignments is not None:
            self.open_assignments.assignments.assignments.append(assignment)
            return
        batch = Outgoing(assignments=scheduler_pb2.Assignments(assignments=[assignment]))
        self.open_assignments = batch
        self.outbox.put_nowait(batch)

    async def next_message(self) -> Outgoing | None:
        """The outbox's next message for the session's writer (None: end the stream); an
        assignments message taken takes no more assignments."""
        message = await self.outbox.get()
        if message is self.open_assignments:
            self.open_assignments = None
        return message

    def close(self) -> None:
        """Make the session's gRPC handler end the stream."""
        if not self.closed:
            self.closed = True
            self.outbox.put_nowait(None)
        self.wake.set()


def assignment_for(entry: RequestEntry, *, moved: bool = False) -> scheduler_pb2.Assignment:
    meta = entry.meta
    return scheduler_pb2.Assignment(
        request_id=meta.request_id,
        payload_key=meta.payload_key,
        token_stream_key=meta.token_stream_key,
        prompt_tokens=meta.prompt_tokens,
        max_tokens=meta.max_tokens,
        sampling=meta.sampling,
        qoe=generation_pb2.QoESpec(ttft_s=meta.ttft_s, tds=meta.tds),
        arrival_unix_s=meta.arrival_s,
        resume_from_tokens=entry.resume_from_tokens,
        moved=moved,
    )


def _abort_message(request_ids: list[str], *, moved: bool = False) -> Outgoing:
    return Outgoing(
        abort_requests=scheduler_pb2.AbortRequests(request_ids=request_ids, moved=moved)
    )


def _positive_finite(value: float) -> bool:
    return math.isfinite(value) and value > 0


def validate_submit(request: scheduler_pb2.SubmitRequest, now_s: float) -> RequestMeta:
    """The request's metadata, or RejectedError(INVALID_ARGUMENT) naming the bad field."""
    bad = grpc.StatusCode.INVALID_ARGUMENT
    if not request.request_id:
        raise RejectedError(bad, "request_id is required")
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise RejectedError(bad, f"request_id is longer than {MAX_REQUEST_ID_CHARS} characters")
    if request.prompt_tokens <= 0:
        raise RejectedError(bad, "prompt_tokens must be positive")
    if request.max_tokens <= 0:
        raise RejectedError(bad, "max_tokens must be positive")
    if not _positive_finite(request.qoe.ttft_s):
        raise RejectedError(bad, "qoe.ttft_s must be a positive number of seconds")
    if not _positive_finite(request.qoe.tds):
        raise RejectedError(bad, "qoe.tds must be a positive number of tokens/s")
    if not request.token_stream_key:
        raise RejectedError(bad, "token_stream_key is required")
    arrival = request.arrival_unix_s
    if not math.isfinite(arrival) or arrival < 0:
        raise RejectedError(bad, "arrival_unix_s must be a finite Unix time")
    return RequestMeta(
        request_id=request.request_id,
        prompt_tokens=request.prompt_tokens,
        max_tokens=request.max_tokens,
        ttft_s=request.qoe.ttft_s,
        tds=request.qoe.tds,
        arrival_s=min(arrival, now_s) if arrival > 0 else now_s,
        gateway_id=request.gateway_id,
        payload_key=request.payload_key,
        token_stream_key=request.token_stream_key,
        sampling=request.sampling if request.HasField("sampling") else None,
    )


class Scheduler:
    """The cluster view and its event handlers (no gRPC transport here)."""

    def __init__(
        self,
        policy: Policy,
        *,
        plan_interval_s: float = 0.05,
        replan_after_s: float = 1.0,
        worker_timeout_s: float = 1.5,
        reassign_grace_s: float = 1.0,
        max_queue_per_worker: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.planner = Planner(policy)
        self.plan_interval_s = plan_interval_s
        self.replan_after_s = replan_after_s
        self.worker_timeout_s = worker_timeout_s
        self.reassign_grace_s = reassign_grace_s
        self.max_queue_per_worker = max_queue_per_worker
        self.clock = clock
        self.table = SchedulerTable()
        # Counted when scraped: the count walks every request, too much to redo per event.
        metrics.QUEUE_LENGTH.set_function(self.table.queue_length)
        self.sessions: dict[str, WorkerSessionHandle] = {}
        self.draining = False
        self.plans_sent = 0
        self._session_ids = itertools.count(1)
        self._watchdog: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._watchdog = asyncio.create_task(self._watch(), name="watchdog")

    async def stop(self) -> None:
        """Drain: refuse new requests and end every worker session."""
        self.draining = True
        for handle in list(self.sessions.values()):
            handle.close()
        tasks = [h.task for h in self.sessions.values() if h.task is not None]
        if self._watchdog is not None:
            tasks.append(self._watchdog)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    # -- gateway API ---------------------------------------------------------------------

    def submit(self, request: scheduler_pb2.SubmitRequest) -> str:
        """Place a request and hand it to its worker; the worker's id."""
        if self.draining:
            raise RejectedError(grpc.StatusCode.UNAVAILABLE, "the scheduler is draining")
        meta = validate_submit(request, self.clock())
        if meta.request_id in self.table.requests:
            raise RejectedError(
                grpc.StatusCode.ALREADY_EXISTS, f"request {meta.request_id!r} is already live"
            )
        try:
            worker_id = self._place(meta.prompt_tokens, meta.max_tokens, limit_queue=True)
        except NoLiveWorkerError as err:
            raise RejectedError(grpc.StatusCode.UNAVAILABLE, str(err)) from err
        except QueuesFullError as err:
            raise RejectedError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err)) from err
        except TooLargeError as err:
            raise RejectedError(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from err
        entry = self.table.add(meta, worker_id)
        self.sessions[worker_id].assign(assignment_for(entry))
        self._arrived(worker_id)
        return worker_id

    def abort(self, request_id: str) -> bool:
        """Stop a request; whether it was live. Idempotent."""
        entry = self.table.remove(request_id)
        if entry is None:
            return False
        handle = self.sessions.get(entry.worker_id)
        if handle is not None:
            handle.send(_abort_message([request_id]))
            self._mark_dirty(entry.worker_id)
        return True

    def report_delivery(self, message: scheduler_pb2.ReportDeliveryRequest) -> int:
        """Record a gateway's delivery batch; how many entries it had."""
        touched: set[str] = set()
        for progress in message.progress:
            entry = self.table.apply_delivery(progress)
            if entry is not None:
                touched.add(entry.worker_id)
        for worker_id in touched:
            self._mark_dirty(worker_id)
        return len(message.progress)

    def _loads(self) -> list[WorkerLoad]:
        return [
            WorkerLoad(
                worker_id=w.worker_id,
                live=w.live and w.worker_id in self.sessions,
                unfinished=len(w.requests),
                kv_demand=self.table.kv_demand(w.worker_id),
                kv_blocks_free=w.kv_blocks_free,
                kv_blocks_total=w.kv_blocks_total,
                block_size=w.block_size,
            )
            for w in self.table.workers.values()
        ]

    def _place(self, prompt_tokens: int, max_tokens: int, *, limit_queue: bool) -> str:
        return choose_worker(
            self._loads(),
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            max_queue=self.max_queue_per_worker if limit_queue else None,
        )

    # -- worker sessions -----------------------------------------------------------------

    def open_session(self, registration: scheduler_pb2.Registration) -> WorkerSessionHandle:
        """Accept a (re)registering worker; raises RejectedError for a bad registration."""
        bad = grpc.StatusCode.INVALID_ARGUMENT
        if self.draining:
            raise RejectedError(grpc.StatusCode.UNAVAILABLE, "the scheduler is draining")
        if not registration.worker_id:
            raise RejectedError(bad, "registration.worker_id is required")
        if not registration.HasField("profile"):
            raise RejectedError(bad, "registration.profile is required")
        try:
            profile = profile_from_proto(registration.profile)
        except ValueError as err:
            raise RejectedError(bad, f"registration.profile: {err}") from err
        worker_id = registration.worker_id
        previous = self.sessions.pop(worker_id, None)
        if previous is not None:
            log.info("worker %s registered again: replacing its old session", worker_id)
            self._end(previous)
        handle = WorkerSessionHandle(worker_id, next(self._session_ids))
        now = self.clock()
        self.table.register_worker(registration, profile, handle.session_id, now)
        stale, handle.missing = self.table.apply_registration(
            worker_id, registration.requests, now
        )
        if stale:
            handle.send(_abort_message(stale, moved=True))
        self.sessions[worker_id] = handle
        handle.task = asyncio.create_task(self._plan_loop(handle), name=f"plan-{worker_id}")
        metrics.WORKERS_LIVE.set(len(self.sessions))
        log.info("worker %s registered (session %d, %d KV blocks, backend %s)", worker_id,
                 handle.session_id, registration.kv_blocks_total, registration.backend)
        return handle

    def on_message(
        self, handle: WorkerSessionHandle, message: scheduler_pb2.WorkerSessionRequest
    ) -> None:
        if handle.closed:
            return
        view = self.table.workers[handle.worker_id]
        now = self.clock()
        view.last_seen = now
        kind = message.WhichOneof("message")
        if kind == "step_report":
            self._on_report(handle, message.step_report, now)
        elif kind == "registration":
            log.warning("worker %s sent a second registration; ignored", handle.worker_id)

    def _on_report(
        self, handle: WorkerSessionHandle, report: scheduler_pb2.StepReport, now: float
    ) -> None:
        worker_id = handle.worker_id
        self._note_plan_applied(handle, report)
        effects = self.table.apply_report(worker_id, report, now)
        if effects.stale:
            handle.send(_abort_message(effects.stale, moved=True))
        if not handle.synced:
            handle.synced = True
            held = {p.request_id for p in report.requests}
            view = self.table.workers[worker_id]
            lost = [view.requests[r] for r in handle.missing
                    if r in view.requests and r not in held]
            handle.missing = []
            for entry in lost:
                log.warning("worker %s lost request %s; placing it again", worker_id,
                            entry.request_id)
                self._reassign(entry)
            handle.wake.set()
        if effects.forced:
            metrics.PREEMPTIONS.labels(cause="forced").inc(len(effects.forced))
        if effects.finished or effects.forced:
            self._mark_dirty(worker_id)
        view = self.table.workers[worker_id]
        if view.plan_version_applied >= view.plan_version_sent and handle.dirty:
            handle.wake.set()
        metrics.KV_BLOCKS.labels(worker=worker_id, kind="used").set(
            view.kv_blocks_total - view.kv_blocks_free
        )
        metrics.KV_BLOCKS.labels(worker=worker_id, kind="total").set(view.kv_blocks_total)

    @staticmethod
    def _note_plan_applied(handle: WorkerSessionHandle, report: scheduler_pb2.StepReport) -> None:
        """The plan round trip of the plan the report says was applied, and its delivery part
        (once per plan; plans superseded before the worker got to them are dropped
        unmeasured)."""
        pending = handle.snapshot_unix_s
        if not pending:
            return
        taken = pending.pop(report.plan_version, None)
        if taken is not None and report.plan_applied_unix_s:  # 0: a worker that does not say
            metrics.PLAN_ROUND_TRIP.observe(max(report.plan_applied_unix_s - taken, 0.0))
            if report.plan_received_unix_s:
                metrics.PLAN_DELIVERY.observe(max(report.plan_received_unix_s - taken, 0.0))
        for version in [v for v in pending if v < report.plan_version]:
            del pending[version]

    def close_session(self, handle: WorkerSessionHandle) -> None:
        """The session's stream ended (or was ended): its worker is dead unless replaced."""
        if self.sessions.get(handle.worker_id) is handle:
            del self.sessions[handle.worker_id]
            self._end(handle)
            orphans = self.table.mark_dead(handle.worker_id, self.clock())
            log.warning("worker %s is gone; %d requests orphaned", handle.worker_id,
                        len(orphans))
            metrics.WORKERS_LIVE.set(len(self.sessions))
        else:
            self._end(handle)

    def _end(self, handle: WorkerSessionHandle) -> None:
        handle.close()
        if handle.task is not None and handle.task is not asyncio.current_task():
            handle.task.cancel()

    # -- failures ------------------------------------------------------------------------

    async def _watch(self) -> None:
        """Declare silent workers dead and move orphans once their grace has passed."""
        period = min(self.worker_timeout_s, self.reassign_grace_s, 1.0) / 4
        while True:
            await asyncio.sleep(period)
            now = self.clock()
            for handle in list(self.sessions.values()):
                view = self.table.workers[handle.worker_id]
                if now - view.last_seen > self.worker_timeout_s:
                    log.warning("worker %s silent for %.1f s: dead", handle.worker_id,
                                now - view.last_seen)
                    self.close_session(handle)
            for entry in self.table.orphans():
                if entry.orphaned_at is not None and (
                    now - entry.orphaned_at >= self.reassign_grace_s
                ):
                    self._reassign(entry)

    def _reassign(self, entry: RequestEntry) -> None:
        """Place a request elsewhere; it resumes at the tokens its stream already holds."""
        try:
            worker_id = self._place(
                entry.meta.prompt_tokens, entry.meta.max_tokens, limit_queue=False
            )
        except PlacementError:
            if entry.orphaned_at is None:
                entry.orphaned_at = self.clock()
            return  # stays an orphan until a worker can take it
        self.table.move(entry, worker_id)
        self.sessions[worker_id].assign(assignment_for(entry, moved=True))
        self._arrived(worker_id)
        log.info("request %s moved to worker %s at token %d", entry.request_id, worker_id,
                 entry.resume_from_tokens)

    # -- planning ------------------------------------------------------------------------

    def _mark_dirty(self, worker_id: str) -> None:
        handle = self.sessions.get(worker_id)
        if handle is not None:
            handle.dirty = True
            handle.wake.set()

    def _arrived(self, worker_id: str) -> None:
        """A request was placed on ``worker_id``: plan soon, at once where it has room."""
        view = self.table.workers[worker_id]
        self.sessions[worker_id].arrival_fits = room_for_everyone(
            len(view.requests), view.kv_demand, view.max_batch, view.kv_blocks_total)
        self._mark_dirty(worker_id)

    def _next_plan_at(self, handle: WorkerSessionHandle, now: float) -> float:
        view = self.table.workers[handle.worker_id]
        if not handle.synced:
            return math.inf
        awaiting_ack = view.plan_version_applied < view.plan_version_sent
        if awaiting_ack and now - handle.last_sent_s < self.replan_after_s:
            return handle.last_sent_s + self.replan_after_s  # or when the ack arrives
        if handle.dirty:
            return now if handle.arrival_fits else handle.last_plan_s + self.plan_interval_s
        return handle.last_plan_s + self.replan_after_s

    async def _plan_loop(self, handle: WorkerSessionHandle) -> None:
        while not handle.closed:
            now = time.monotonic()
            due = self._next_plan_at(handle, now)
            if now < due:
                handle.wake.clear()
                timeout = None if math.isinf(due) else due - now
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(handle.wake.wait(), timeout)
                continue
            handle.dirty = handle.arrival_fits = False
            self._plan_once(handle, now)

    def _plan_once(self, handle: WorkerSessionHandle, now: float) -> None:
        started = time.perf_counter()
        handle.last_plan_s = now
        view = self.table.workers[handle.worker_id]
        snapshot_unix_s = time.time()  # the worker stamps its apply on this clock
        snapshot = self.table.snapshot(handle.worker_id, self.clock())
        if len(snapshot.requests) == 0:
            return
        plan = self.planner.plan(snapshot)
        metrics.PLAN_LATENCY.observe(time.perf_counter() - started)
        # A plan that held work back (paced admissions) asks for the next one at the cadence,
        # as the simulator does.
        handle.dirty = handle.dirty or bool(plan.notes.get("deferred", 0.0))
        if not has_actions(plan):
            return
        view.plan_version_sent += 1
        handle.snapshot_unix_s[view.plan_version_sent] = snapshot_unix_s
        handle.send(Outgoing(plan=plan_to_proto(plan, self.table.name_of,
                                                view.plan_version_sent)))
        handle.last_sent_s = now
        self.plans_sent += 1
        if plan.preempt:
            metrics.PREEMPTIONS.labels(cause="planned").inc(len(plan.preempt))
