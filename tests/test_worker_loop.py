"""The worker loop's step reports: a report lists only the held requests that changed since
the last one, found without rebuilding every held request's entry (a thousand queued
requests would cost a millisecond per iteration). The scheduler applies each report to its
table, so what matters is that the reports, applied in order, always add up to the truth."""

from __future__ import annotations

import asyncio
import time
import uuid

from hypothesis import example, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from andes.latency import load_profile
from worker.engine import PlanSpec, RequestSpec
from worker.loop import WorkerLoop
from worker.publisher import TokenPublisher
from worker.sim_backend import SimBackend
from worker.wire import state_to_proto

_OPS = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(0, 2)),
    st.tuples(st.just("admit"), st.integers(0, 2)),
    st.tuples(st.just("preempt"), st.integers(0, 2)),
    st.tuples(st.just("step"), st.just(0)),
    st.tuples(st.just("cancel"), st.integers(0, 2)),
    st.tuples(st.just("publish"), st.integers(0, 1)),
    st.tuples(st.just("report"), st.just(0)),
), min_size=1, max_size=50)


@settings(max_examples=200, deadline=None)
@given(ops=_OPS)
# A token is reported as generated only once it is in Redis: the report after the publish
# must carry it, though the engine's view of the request did not change since the last one.
@example(ops=[("add", 0), ("admit", 0), ("step", 0), ("report", 0), ("publish", 0),
              ("report", 0)])
def test_reports_of_changes_add_up_to_every_held_request(redis_url: str,
                                                         ops: list[tuple[str, int]]) -> None:
    async def scenario() -> None:
        redis = Redis.from_url(redis_url)
        engine = SimBackend(load_profile("a100-opt13b"), kv_blocks=12, max_batch=4)
        publisher = TokenPublisher(redis, interval_s=0.05)
        loop = WorkerLoop(engine, worker_id="w", publisher=publisher, redis=redis)
        run_id = uuid.uuid4().hex[:8]
        scheduler_view: dict[str, tuple[int, int, int]] = {}
        version = 0
        for op, arg in ops:
            rid = f"{run_id}-{arg}"
            if op == "add" and not engine.holds(rid):
                engine.add([RequestSpec(rid, 40, 30, time.time(), 1.0, 10.0, "", f"pub-{rid}")])
                publisher.open(rid, f"pub-{rid}", 0)
            elif op in ("admit", "preempt") and engine.holds(rid):
                version += 1
                engine.apply(PlanSpec(version, **{op: (rid,)}))
            elif op == "step" and engine.has_work():
                outcome = engine.step(time.time())
                loop._absorb(outcome, outcome.start_s, outcome.duration_s)
            elif op == "cancel" and engine.holds(rid):
                for done in engine.cancel((rid,)):
                    loop._finish(done)
            elif op == "publish":
                await loop._publish(force=bool(arg))
            elif op == "report":
                for entry in loop.status_report(changed_only=True).requests:
                    scheduler_view[entry.request_id] = (
                        entry.generated_tokens, entry.state, entry.kv_blocks)
                truth = {
                    p.request_id: (min(p.generated_tokens, publisher.published(p.request_id)),
                                   state_to_proto(p.state), p.kv_blocks)
                    for p in engine.progress()
                }
                assert {r: scheduler_view.get(r) for r in truth} == truth
        await redis.aclose()

    asyncio.run(scenario())



def test_progress_alone_waits_for_the_report_interval_and_nothing_else_does(
        redis_url: str) -> None:
    async def scenario() -> None:
        redis = Redis.from_url(redis_url)
        engine = SimBackend(load_profile("a100-opt13b"))
        loop = WorkerLoop(engine, worker_id="w", publisher=TokenPublisher(redis), redis=redis,
                          report_interval_s=60.0)
        rid = f"{uuid.uuid4().hex[:8]}"
        engine.add([RequestSpec(rid, 40, 30, time.time(), 1.0, 10.0, "", f"pub-{rid}")])
        loop.publisher.open(rid, f"pub-{rid}", 0)
        engine.apply(PlanSpec(1, admit=(rid,)))
        assert not loop._report_may_wait(steps_again=True), "nothing reported yet"
        loop._plan_version_reported = loop.plan_version
        loop._last_report_at = time.monotonic()
        outcome = engine.step(time.time())
        loop._absorb(outcome, outcome.start_s, outcome.duration_s)
        assert loop._report_may_wait(steps_again=True), "tokens made: may wait"
        assert not loop._report_may_wait(steps_again=False), "the engine goes idle"
        loop.plan_version = 2
        assert not loop._report_may_wait(steps_again=True), "a plan was applied"
        loop._plan_version_reported = 2
        loop._forced.append(rid)
        assert not loop._report_may_wait(steps_again=True), "a forced preemption"
        loop._forced.clear()
        for done in engine.cancel((rid,)):
            loop._finish(done)
        await loop._publish()
        assert not loop._report_may_wait(steps_again=True), "a request ended"
        await redis.aclose()

    asyncio.run(scenario())
