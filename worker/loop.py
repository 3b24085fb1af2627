"""The worker's iteration loop: drain messages, apply the plan, step, publish, report.

One pass is one iteration boundary plus (when there is work) one iteration:

1. drain everything the scheduler sent: new requests, aborts (KV freed at once, the stream
   gets a CANCELLED final entry) and plans - only the newest plan counts, and only if its
   version is above the one applied (plans are sticky: without a new one the engine keeps
   its batch);
2. if the engine has work, run one step and *wait out its duration*: the emulated
   accelerator takes real time, so token timing, QoE and the planner's view are real;
3. publish the iteration's tokens to Redis in one pipelined round trip;
4. send the step report.

The loop never waits for a plan; with nothing to do it blocks on the inbox.

A real engine (``blocking``) runs on one thread of its own, which also built it. Each call
there also refreshes what the loop needs to know between calls (has work, free KV, held
requests), so a step costs one thread hop; and while the engine computes iteration N, the
loop publishes iteration N-1's tokens, as an accelerator overlaps compute with the host.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from typing import TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError

from andes.policies.base import State
from andes.tokenstream import DEFAULT_PREFIX, TokenChunk, decode_chunk, stream_key
from andes.v1 import generation_pb2, scheduler_pb2
from worker import metrics
from worker.engine import Engine, Finished, PlanSpec, Progress, RequestSpec, StepOutcome
from worker.publisher import TokenPublisher
from worker.session import SchedulerSession
from worker.wire import (
    finished_to_proto,
    plan_from_proto,
    profile_to_proto,
    progress_to_proto,
    spec_from_assignment,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

OVERLAP_LIMIT_S = 0.05
"""How far behind the accelerator's timeline the host may fall and still be caught up."""


class WorkerLoop:
    """Drives one engine in real time on behalf of the scheduler."""

    def __init__(
        self,
        engine: Engine,
        *,
        worker_id: str,
        publisher: TokenPublisher,
        redis: Redis,
        redis_prefix: str = DEFAULT_PREFIX,
        retry_s: float = 0.2,
        max_pending_tokens: int = 1 << 16,
        engine_thread: ThreadPoolExecutor | None = None,
        report_interval_s: float = 0.0,
    ) -> None:
        self.engine = engine
        self.worker_id = worker_id
        self.publisher = publisher
        self._redis = redis
        self._prefix = redis_prefix
        self._retry_s = retry_s
        self._max_pending_tokens = max_pending_tokens
        if report_interval_s < 0:
            raise ValueError(f"report interval must be >= 0, got {report_interval_s}")
        self._report_interval_s = report_interval_s
        self._last_report_at = 0.0
        """When the last step report left (monotonic clock)."""
        self._plan_version_reported = -1
        """The plan version the last step report carried (-1: none sent yet)."""
        self.session: SchedulerSession | None = None
        self.step_count = 0
        self.plan_version = 0
        """Version of the latest plan applied (0: none yet)."""
        self.plan_applied_unix_s = 0.0
        self.plan_received_unix_s = 0.0
        """When that plan was applied, wall clock (0: none yet); reported so the scheduler
        can measure the plan round trip."""
        self._plan: PlanSpec | None = None
        self._finishing: dict[str, Finished] = {}
        """Finished in the engine; their final stream entry is not in Redis yet."""
        self._accelerator_free_at = 0.0
        self._reportable: list[Finished] = []
        self._report_pending = False
        """Something changed since the last report; a blocking engine's next step carries the
        report out (it is built while the engine computes), else it goes out at once."""
        self._forced: list[str] = []
        self._progress: list[Progress] = []
        self._assigned: dict[str, RequestSpec] = {}
        """Requests added to a blocking engine since ``_progress`` was taken."""
        self._reported: dict[str, tuple[int, int, int]] = {}
        """What the last report said of each request: (generated, state, kv blocks)."""
        self._progress_seen: dict[str, Progress] = {}
        """The engine's view of each held request that the last report was built from."""
        self._last_step = (time.time(), 0.0)
        self._scheduled_tokens = 0
        self._executor = engine_thread
        if engine.blocking and engine_thread is None:
            raise ValueError("a blocking engine needs its engine thread (engine_thread)")
        self._has_work = False
        """The engine's ``has_work()`` after the last call into it."""
        self._kv_blocks_free = engine.kv_blocks_free

    def attach(self, session: SchedulerSession) -> None:
        self.session = session

    # -- engine calls: on one thread for blocking engines ----------------------------------

    async def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` against the engine, then note the engine's state in the same go."""
        if self._executor is None:
            return self._then_note_state(fn)
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, partial(self._then_note_state, fn)
        )

    def _then_note_state(self, fn: Callable[[], T]) -> T:
        result = fn()
        self._has_work = self.engine.has_work()
        self._kv_blocks_free = self.engine.kv_blocks_free
        return result

    def _step_and_progress(self, start: float) -> tuple[StepOutcome, list[Progress]]:
        """A blocking engine's step with the held requests after it: one thread hop."""
        return self.engine.step(start), self.engine.progress()

    # -- what the session sends ----------------------------------------------------------

    def registration(self) -> scheduler_pb2.Registration:
        profile = self.engine.profile
        return scheduler_pb2.Registration(
            worker_id=self.worker_id,
            backend=self.engine.backend,
            model=self.engine.model,
            kv_blocks_total=profile.kv_blocks_total,
            block_size=profile.block_size,
            max_batch=profile.max_batch,
            max_batched_tokens=profile.max_batched_tokens,
            profile=profile_to_proto(profile),
            requests=self._progress_protos(),
        )

    def _progress_protos(self, *, changed_only: bool = False
                         ) -> list[scheduler_pb2.RequestProgress]:
        """Held requests as the scheduler sees them; ``changed_only``: those that changed
        since the last report (a step report need not repeat a thousand waiting requests)."""
        if self._executor is None:
            self._progress = self.engine.progress()
        protos = []
        reported: dict[str, tuple[int, int, int]] = {}
        last_seen = self._progress_seen
        last_reported = self._reported
        published = self.publisher.published
        moved = self.publisher.take_published_moved()
        for p in self._progress:
            rid = p.request_id
            # Unchanged since the last report, in the engine and in Redis: the common case
            # for every queued request, skipped without building anything.
            if changed_only and last_seen.get(rid) == p and rid not in moved:
                reported[rid] = last_reported[rid]
                continue
            # Report only what is safely in Redis: a request resumed elsewhere starts there.
            generated = min(p.generated_tokens, published(rid))
            reported[rid] = key = (generated, int(p.state), p.kv_blocks)
            if not changed_only or last_reported.get(rid) != key:
                protos.append(progress_to_proto(p, generated))
        self._progress_seen = {p.request_id: p for p in self._progress}
        # A registration must list every held request, even one added since the last step
        # (else the scheduler would place it again); a blocking engine's view is the last
        # step's, so requests assigned after it are listed as they arrived: waiting.
        for rid, spec in self._assigned.items():
            if rid not in reported:
                reported[rid] = key = (spec.resume_from_tokens, int(State.WAITING), 0)
                if not changed_only or self._reported.get(rid) != key:
                    protos.append(progress_to_proto(
                        Progress(rid, spec.resume_from_tokens, State.WAITING, 0),
                        spec.resume_from_tokens,
                    ))
        self._reported = reported
        return protos

    def status_report(self, *, changed_only: bool = False) -> scheduler_pb2.StepReport:
        """A report of the current state (complete for the first report of every session)."""
        start, duration = self._last_step
        return scheduler_pb2.StepReport(
            step=self.step_count,
            start_unix_s=start,
            duration_s=duration,
            requests=self._progress_protos(changed_only=changed_only),
            kv_blocks_free=self._kv_blocks_free,
            kv_blocks_total=self.engine.profile.kv_blocks_total,
            plan_version=self.plan_version,
            scheduled_tokens=self._scheduled_tokens,
            plan_applied_unix_s=self.plan_applied_unix_s,
            plan_received_unix_s=self.plan_received_unix_s,
        )

    # -- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        if self.session is None:
            raise RuntimeError("attach a session before running the loop")
        try:
            while True:
                first = await self._wait_for_work()
                changed = await self._drain(first)
                if self._plan is not None:
                    plan, self._plan = self._plan, None
                    await self._call(partial(self.engine.apply, plan))
                    self.plan_version = plan.version
                    self.plan_applied_unix_s = time.time()
                    self.plan_received_unix_s = self.session.take_plan_received(plan.version)
                    changed = True
                stepped = not self._backlogged and self._has_work
                if stepped and self.engine.blocking:
                    published = await self._iterate_overlapped()
                else:
                    if stepped:
                        await self._iterate()
                    published = await self._publish(force=not self._has_work)
                self._report_pending |= stepped or changed or published
                if self._report_pending and not self._steps_next and not self._report_may_wait(
                        steps_again=self._has_work and not self._backlogged):
                    await self._report(stepped=stepped)
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def _steps_next(self) -> bool:
        """A blocking engine steps in the next round: it will carry a pending report."""
        return self.engine.blocking and self._has_work and not self._backlogged

    @property
    def _backlogged(self) -> bool:
        """Too many tokens wait for Redis: stop generating until they are out."""
        return self.publisher.pending_tokens >= self._max_pending_tokens

    async def _wait_for_work(self) -> scheduler_pb2.WorkerSessionResponse | None:
        """The first message to handle, or None when the engine (or Redis) has work."""
        assert self.session is not None
        inbox = self.session.inbox
        if not self._backlogged and self._has_work:
            return None
        if self.publisher.has_pending:
            # Redis is failing: retry the flush now and then, but react to messages at once.
            try:
                return await asyncio.wait_for(inbox.get(), timeout=self._retry_s)
            except TimeoutError:
                return None
        return await inbox.get()

    async def _drain(self, first: scheduler_pb2.WorkerSessionResponse | None) -> bool:
        assert self.session is not None
        messages = [] if first is None else [first]
        while not self.session.inbox.empty():
            messages.append(self.session.inbox.get_nowait())
        # Consecutive assignments go to the engine together (a burst's requests cost one
        # payload round trip and one engine call); an abort after them sees them held.
        assignments: list[scheduler_pb2.Assignment] = []
        for msg in messages:
            kind = msg.WhichOneof("message")
            if kind == "assignments":
                assignments.extend(msg.assignments.assignments)
                continue
            if assignments:
                await self._assign(assignments)
                assignments = []
            if kind == "plan":
                newest = self._plan.version if self._plan else self.plan_version
                if msg.plan.plan_version > newest:
                    self._plan = plan_from_proto(msg.plan)
            elif kind == "abort_requests":
                aborted = msg.abort_requests
                await self._abort(tuple(aborted.request_ids), moved=aborted.moved)
        if assignments:
            await self._assign(assignments)
        return bool(messages)

    async def _assign(self, assignments: list[scheduler_pb2.Assignment]) -> None:
        """Hold newly assigned requests (one already held or finishing here is left alone):
        with one engine call for all of them, and for an engine that needs the payloads,
        one Redis round trip to read them: taken one at a time, a burst of a hundred
        requests kept an engine in another process idle for two hundred round trips."""
        specs: dict[str, tuple[RequestSpec, bool]] = {}
        for assignment in assignments:
            spec = spec_from_assignment(assignment)
            if not spec.token_stream_key:
                spec = replace(spec, token_stream_key=stream_key(spec.request_id, self._prefix))
            if spec.request_id not in self._finishing:
                specs.setdefault(spec.request_id, (spec, assignment.moved))
        held = await self._call(partial(_held, self.engine, tuple(specs)))
        startable = []
        for rid, (assigned, moved) in specs.items():
            if rid in held:
                continue
            resumed = await self._resume_point(assigned) if moved else assigned
            if resumed is None:
                continue
            start = resumed.resume_from_tokens
            self.publisher.open(rid, resumed.token_stream_key, start)
            if start >= resumed.max_tokens:  # moved here after its last token
                self._finish(Finished(rid, generation_pb2.FINISH_REASON_LENGTH, start))
            else:
                startable.append(resumed)
        if self.engine.needs_payload:
            startable = await self._with_payloads(startable)
        if not startable:
            return
        refused = await self._call(partial(self.engine.add, startable))
        for done in refused:
            self._finish(done)
        if self._executor is not None:
            gone = {done.request_id for done in refused}
            self._assigned.update((s.request_id, s) for s in startable
                                  if s.request_id not in gone)

    async def _resume_point(self, spec: RequestSpec) -> RequestSpec | None:
        """A request moved here from a worker that died: it resumes where its stream ends
        (None: the stream has its final entry, the request ended before its worker died)."""
        end = await self._stream_end(spec.token_stream_key)
        if end is not None and end.finish_reason:
            self._reportable.append(Finished(spec.request_id, end.finish_reason, end.end))
            self._report_pending = True
            return None
        if end is not None and end.end > spec.resume_from_tokens:
            return replace(spec, resume_from_tokens=end.end)
        return spec

    async def _with_payloads(self, specs: list[RequestSpec]) -> list[RequestSpec]:
        """The specs with their payloads (and a resumed request's published tokens), read in
        one pipelined round trip; a request whose payload is gone (or unreadable) ends with
        ERROR."""
        if not specs:
            return []
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for spec in specs:
                    pipe.hgetall(spec.payload_key)
                payloads = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as err:
            log.error("cannot read the payloads of %d requests: %s", len(specs), err)
            payloads = [{}] * len(specs)
        ready = []
        for spec, payload in zip(specs, payloads, strict=True):
            if isinstance(payload, Exception):
                log.error("request %s: cannot read its payload: %s", spec.request_id, payload)
                payload = {}
            if not payload:
                self._finish(Finished(spec.request_id, generation_pb2.FINISH_REASON_ERROR,
                                      spec.resume_from_tokens))
                continue
            spec = replace(spec, payload={_bytes(k): _bytes(v) for k, v in payload.items()})
            if spec.resume_from_tokens:
                token_ids, text = await self._published(spec)
                spec = replace(spec, generated_token_ids=token_ids, generated_text=text)
            ready.append(spec)
        return ready

    async def _stream_end(self, key: str) -> TokenChunk | None:
        """The last entry of a token stream (None: empty, or Redis failed: then the
        scheduler's resume index stands, and the publisher's conditional appends skip what
        the stream already holds)."""
        try:
            entries = await self._redis.xrevrange(key, count=1)
        except (RedisError, OSError) as err:
            log.warning("cannot read the end of %s: %s", key, err)
            return None
        if not entries:
            return None
        _, fields = entries[0]
        try:
            return decode_chunk({_bytes(k): _bytes(v) for k, v in (fields or {}).items()})
        except ValueError as err:
            log.warning("the last entry of %s is malformed: %s", key, err)
            return None

    async def _published(self, spec: RequestSpec) -> tuple[tuple[int, ...], str]:
        """The first ``resume_from_tokens`` tokens of the response and their text, read back
        from Redis (the resume point is the end of an entry: workers report only what they
        have published)."""
        tokens: list[int] = []
        texts: list[str] = []
        try:
            entries = await self._redis.xrange(spec.token_stream_key)
        except (RedisError, OSError) as err:
            log.error("request %s: cannot read its token stream: %s", spec.request_id, err)
            entries = []
        for _, fields in entries or ():
            chunk = decode_chunk({_bytes(k): _bytes(v) for k, v in (fields or {}).items()})
            wanted = spec.resume_from_tokens - len(tokens)
            if chunk.index == len(tokens) and wanted > 0:
                tokens.extend(chunk.token_ids[:wanted])
                if len(chunk.token_ids) <= wanted:
                    texts.append(chunk.text)
        return tuple(tokens), "".join(texts)

    async def _abort(self, request_ids: tuple[str, ...], *, moved: bool = False) -> None:
        """Free the requests' KV. A cancelled request's stream gets its final entry; a moved
        one's stream is the new worker's now, so it gets nothing more from this worker (not
        even tokens made before the abort: the new worker makes them again, identically for
        greedy decoding, and readers take each index once)."""
        for done in await self._call(partial(self.engine.cancel, request_ids)):
            if moved:
                self.publisher.forget(done.request_id)
            else:
                self._finish(done)

    def _finish(self, done: Finished) -> None:
        self.publisher.finish(done.request_id, done.reason)
        self._finishing[done.request_id] = done

    async def _iterate(self) -> None:
        now = time.time()
        # An accelerator starts its next step as soon as the last one ends, while the host
        # publishes and reports the last one's tokens; only after idling does it start "now".
        # Without this overlap every step would also pay this process's own overhead.
        behind = now - self._accelerator_free_at
        start = self._accelerator_free_at if 0.0 <= behind < OVERLAP_LIMIT_S else now
        outcome = await self._call(partial(self.engine.step, start))
        end = start + outcome.duration_s
        self._accelerator_free_at = end
        # The accelerator's time: an emulated one must take it for real.
        delay = end - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        self._absorb(outcome, start, end - start)

    async def _iterate_overlapped(self) -> bool:
        """One step of a real engine, publishing the previous step's tokens meanwhile."""
        step = asyncio.ensure_future(self._call(partial(self._step_and_progress, time.time())))
        try:
            published = await self._publish()
            self._report_pending |= published
            # The previous round's, as of the previous step (this step follows it at once).
            if self._report_pending and not self._report_may_wait(steps_again=True):
                await self._report(stepped=True)
        finally:
            outcome, self._progress = await step
            self._assigned.clear()
        # Only now: the publisher must not take tokens while a flush is on its way.
        if outcome.idle:
            for done in outcome.finished:  # added, and refused by the engine
                self._finish(done)
        else:
            self._absorb(outcome, outcome.start_s, outcome.duration_s)
        if not self._has_work:  # nothing to overlap the last tokens with
            published = await self._publish(force=True) or published
        return published

    def _absorb(self, outcome: StepOutcome, start: float, elapsed: float) -> None:
        """Hand an iteration's tokens and endings to the publisher and the next report."""
        tokens = 0
        for run in outcome.tokens:
            self.publisher.add(run)
            tokens += len(run.token_ids)
        for done in outcome.finished:
            self._finish(done)
        self._forced.extend(outcome.forced_preemptions)
        metrics.FORCED_PREEMPTIONS.inc(len(outcome.forced_preemptions))
        self.step_count += 1
        self._last_step = (start, elapsed)
        self._scheduled_tokens = outcome.scheduled_tokens
        metrics.STEP_SECONDS.observe(elapsed)
        metrics.TOKENS_GENERATED.inc(tokens)

    async def _publish(self, *, force: bool = False) -> bool:
        """Flush the tokens that are due (all of them with ``force``: the engine is idle, so
        none would be written later); whether some request's final entry went out."""
        done = await self.publisher.flush(force=force)
        if not done:
            return False
        # A stream dropped as no longer this worker's is done too, finishing or not.
        self._reportable.extend(f for rid in done if (f := self._finishing.pop(rid, None)))
        return True

    def _report_may_wait(self, *, steps_again: bool) -> bool:
        """Whether a pending report may wait for a later step: it holds only the progress of
        running requests (tokens made, KV grown), the engine steps again at once, and the
        last report left less than the report interval ago. Endings, forced preemptions and
        applied plans never wait (the planner acts on them), nor does anything when the
        engine goes idle. On a small model's millisecond steps this saves a gRPC message and
        the scheduler's work on it for most steps."""
        if not steps_again or self._reportable or self._forced:
            return False
        if self.plan_version != self._plan_version_reported:
            return False
        return time.monotonic() - self._last_report_at < self._report_interval_s

    async def _report(self, *, stepped: bool) -> None:
        assert self.session is not None
        if self._executor is not None and not stepped:
            self._progress = await self._call(self.engine.progress)
            self._assigned.clear()
        self._report_pending = False
        report = self.status_report(changed_only=True)
        report.finished.extend(finished_to_proto(f) for f in self._reportable)
        report.forced_preemptions.extend(self._forced)
        self._reportable.clear()
        self._forced.clear()
        metrics.KV_BLOCKS_USED.set(report.kv_blocks_total - report.kv_blocks_free)
        self.session.send_report(report)
        self._last_report_at = time.monotonic()
        self._plan_version_reported = self.plan_version


def _held(engine: Engine, request_ids: tuple[str, ...]) -> set[str]:
    return {rid for rid in request_ids if engine.holds(rid)}


def _bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value
