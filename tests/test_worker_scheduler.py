"""The scheduler and sim workers together: real gRPC on 127.0.0.1, real Redis, real time.

The gateway is not part of these tests: they submit through the scheduler's own API and
store payloads in Redis the way a gateway does, then read the token streams back with
``andes.tokenstream``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from andes import tokenstream
from andes.latency import load_profile
from andes.policies import make_policy
from andes.v1 import generation_pb2, scheduler_pb2, scheduler_pb2_grpc
from scheduler_service.scheduler import Scheduler, WorkerSessionHandle
from scheduler_service.server import SchedulerServer
from tests.conftest import free_port
from worker.engine import PlanSpec, TokenRun
from worker.publisher import TokenPublisher
from worker.service import WorkerConfig, WorkerService, build_engine
from worker.session import RegistrationRefusedError
from worker.sim_backend import token_id, token_text
from worker.wire import profile_to_proto

ROOT = Path(__file__).resolve().parent.parent
LENGTH = generation_pb2.FINISH_REASON_LENGTH
CANCELLED = generation_pb2.FINISH_REASON_CANCELLED


class RecordingEngine:
    """A sim engine that remembers the plan versions it applied (same behaviour otherwise)."""

    def __init__(self, config: WorkerConfig) -> None:
        self._inner = build_engine(config)
        self.applied: list[int] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def apply(self, plan: PlanSpec) -> None:
        self.applied.append(plan.version)
        self._inner.apply(plan)


@dataclass
class Cluster:
    redis: Redis
    redis_url: str
    prefix: str
    scheduler: Scheduler
    server: SchedulerServer
    stub: scheduler_pb2_grpc.SchedulerServiceStub
    workers: dict[str, WorkerService] = field(default_factory=dict)
    _stops: dict[str, tuple[asyncio.Event, asyncio.Task[None]]] = field(default_factory=dict)

    async def start_worker(self, worker_id: str, **overrides: object) -> WorkerService:
        config = WorkerConfig(
            worker_id=worker_id, scheduler=self.server.address, redis_url=self.redis_url,
            redis_prefix=self.prefix, **overrides,  # type: ignore[arg-type]
        )
        registered = asyncio.Event()
        service = WorkerService(config, engine=RecordingEngine(config),  # type: ignore[arg-type]
                                on_registered=registered.set)
        stop = asyncio.Event()
        self._stops[worker_id] = (stop, asyncio.create_task(service.run(stop)))
        self.workers[worker_id] = service
        await asyncio.wait_for(registered.wait(), 10)
        return service

    async def stop_worker(self, worker_id: str) -> None:
        stop, task = self._stops.pop(worker_id)
        stop.set()
        await task

    async def submit(self, request_id: str, *, prompt_tokens: int = 64, max_tokens: int = 32,
                     ttft_s: float = 1.0, tds: float = 4.8) -> str:
        payload = tokenstream.payload_key(request_id, self.prefix)
        # What a gateway stores before it submits.
        await self.redis.hset(payload, mapping={"prompt": f"prompt of {request_id}",
                                                "max_tokens": max_tokens})
        reply = await self.stub.Submit(scheduler_pb2.SubmitRequest(
            request_id=request_id, gateway_id="test", prompt_tokens=prompt_tokens,
            max_tokens=max_tokens, qoe=generation_pb2.QoESpec(ttft_s=ttft_s, tds=tds),
            arrival_unix_s=time.time(), payload_key=payload,
            token_stream_key=tokenstream.stream_key(request_id, self.prefix),
        ), timeout=5)
        return str(reply.worker_id)

    async def read_stream(self, request_id: str, timeout_s: float = 15.0,
                          until: Callable[[list[tokenstream.TokenChunk]], bool] | None = None,
                          ) -> list[tokenstream.TokenChunk]:
        """The stream's chunks up to its final entry (or until ``until`` says so)."""
        key = tokenstream.stream_key(request_id, self.prefix)
        chunks: list[tokenstream.TokenChunk] = []
        last = "0-0"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            reply = await self.redis.xread({key: last}, block=200)
            for _, entries in reply:
                for entry_id, fields in entries:
                    last = entry_id
                    chunks.append(tokenstream.decode_chunk(fields))
            if chunks and chunks[-1].finish_reason:
                return chunks
            if until is not None and until(chunks):
                return chunks
        raise AssertionError(f"stream of {request_id} did not finish: {chunks[-3:]}")

    async def wait_for(self, condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached in time")
            await asyncio.sleep(0.02)


@asynccontextmanager
async def cluster(redis_url: str, policy: str = "fcfs", **scheduler_args: float,
                  ) -> AsyncIterator[Cluster]:
    scheduler = Scheduler(make_policy(policy), **scheduler_args)  # type: ignore[arg-type]
    server = SchedulerServer(scheduler, f"127.0.0.1:{free_port()}")
    await server.start()
    redis = Redis.from_url(redis_url)
    channel = grpc.aio.insecure_channel(server.address)
    c = Cluster(redis, redis_url, f"t{uuid.uuid4().hex[:8]}", scheduler, server,
                scheduler_pb2_grpc.SchedulerServiceStub(channel))
    try:
        yield c
    finally:
        for worker_id in list(c._stops):
            await c.stop_worker(worker_id)
        await channel.close()
        await server.stop(0.5)
        await redis.aclose()


def assert_complete(request_id: str, chunks: list[tokenstream.TokenChunk], max_tokens: int,
                    reason: int = LENGTH) -> None:
    """Indices contiguous from 0, the sim's tokens, and one final entry with ``reason``."""
    position = 0
    for chunk in chunks:
        assert chunk.index == position, f"{request_id}: gap or overlap at {position}"
        expected = tuple(token_id(request_id, i) for i in range(position, chunk.end))
        assert chunk.token_ids == expected
        assert chunk.text == "".join(token_text(t) for t in expected)
        position = chunk.end
    assert all(c.finish_reason == 0 for c in chunks[:-1])
    assert chunks[-1].finish_reason == reason
    if reason == LENGTH:
        assert position == max_tokens


def run(coro: object) -> None:
    asyncio.run(asyncio.wait_for(coro, 25))  # type: ignore[arg-type]


# -- tests ---------------------------------------------------------------------------------


def test_publisher_keeps_tokens_while_redis_is_down(redis_url: str) -> None:
    async def scenario() -> None:
        down = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
        up = Redis.from_url(redis_url)
        key = f"pub-{uuid.uuid4().hex[:8]}"
        publisher = TokenPublisher(down)
        publisher.open("r", key, 5)  # resumed: its stream goes on at token 5
        for i in range(5, 8):
            publisher.add(TokenRun("r", i, (i,), f"t{i} "))
            assert await publisher.flush() is None  # Redis unreachable: nothing lost
        publisher.finish("r", LENGTH)
        assert publisher.pending_tokens == 3 and publisher.published("r") == 5
        publisher._redis = up  # Redis is back
        assert await publisher.flush() == ["r"]
        entries = await up.xrange(key)
        assert [tokenstream.decode_chunk(f) for _, f in entries] == [
            tokenstream.TokenChunk(5, (5, 6, 7), "t5 t6 t7 ", LENGTH)  # piled up: one entry
        ]
        assert 0 < await up.ttl(key) <= tokenstream.FINISHED_TTL_S
        assert not publisher.has_pending
        await down.aclose()
        await up.aclose()

    run(scenario())


def test_every_request_streams_all_its_tokens(redis_url: str) -> None:
    async def scenario() -> None:
        async with cluster(redis_url, "fcfs") as c:
            await c.start_worker("w0")
            await c.start_worker("w1")
            lengths = {f"req-{i}": 12 + 5 * i for i in range(8)}
            placed = {rid: await c.submit(rid, max_tokens=n) for rid, n in lengths.items()}
            assert set(placed.values()) == {"w0", "w1"}  # load spread over both
            streams = await asyncio.gather(*(c.read_stream(rid) for rid in lengths))
            for (rid, n), chunks in zip(lengths.items(), streams, strict=True):
                assert_complete(rid, chunks, n)
                ttl = await c.redis.ttl(tokenstream.stream_key(rid, c.prefix))
                assert 0 < ttl <= tokenstream.FINISHED_TTL_S
            # Every finish reached the scheduler; the workers hold nothing.
            await c.wait_for(lambda: not c.scheduler.table.requests)
            for service in c.workers.values():
                assert not service.engine.progress()
                assert service.engine.kv_blocks_free == service.engine.profile.kv_blocks_total

    run(scenario())


def test_submit_rejects_bad_input_and_duplicates(redis_url: str) -> None:
    async def scenario() -> None:
        async with cluster(redis_url) as c:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.submit("nobody-home")
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            await c.start_worker("w0", kv_blocks=64)
            for kwargs, field_name in (
                ({"max_tokens": 0}, "max_tokens"),
                ({"prompt_tokens": 0}, "prompt_tokens"),
                ({"tds": 0.0}, "qoe.tds"),
                ({"prompt_tokens": 2000, "max_tokens": 2000}, "KV capacity"),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await c.submit(f"bad-{field_name}", **kwargs)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert field_name in (err.value.details() or "")
            await c.submit("twice", max_tokens=400)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.submit("twice")
            assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS

    run(scenario())


def _submission(c: Cluster, request_id: str, max_tokens: int = 8) -> scheduler_pb2.SubmitRequest:
    return scheduler_pb2.SubmitRequest(
        request_id=request_id, gateway_id="test", prompt_tokens=16, max_tokens=max_tokens,
        qoe=generation_pb2.QoESpec(ttft_s=1.0, tds=4.8), arrival_unix_s=time.time(),
        payload_key=tokenstream.payload_key(request_id, c.prefix),
        token_stream_key=tokenstream.stream_key(request_id, c.prefix),
    )


def _batch_metric(name: str) -> float:
    return REGISTRY.get_sample_value(f"andes_submit_batch_size_{name}") or 0.0


def test_a_batch_of_submissions_is_placed_in_order_each_with_its_result(redis_url: str) -> None:
    async def scenario() -> None:
        async with cluster(redis_url, "fcfs") as c:
            reply = await c.stub.SubmitBatch(scheduler_pb2.SubmitBatchRequest(
                requests=[_submission(c, "early-1"), _submission(c, "early-2")]), timeout=5)
            assert [r.code for r in reply.results] == [grpc.StatusCode.UNAVAILABLE.value[0]] * 2
            await c.start_worker("w0", kv_blocks=64)
            for rid in ("b-1", "b-2"):
                await c.redis.hset(tokenstream.payload_key(rid, c.prefix),
                                   mapping={"prompt": f"prompt of {rid}", "max_tokens": 8})
            calls, sizes = _batch_metric("count"), _batch_metric("sum")
            reply = await c.stub.SubmitBatch(scheduler_pb2.SubmitBatchRequest(requests=[
                _submission(c, "b-1"), _submission(c, "b-1"), _submission(c, "bad", 0),
                _submission(c, "b-2"),
            ]), timeout=5)
            codes = [grpc.StatusCode.OK, grpc.StatusCode.ALREADY_EXISTS,
                     grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OK]
            assert [r.code for r in reply.results] == [code.value[0] for code in codes]
            assert [r.worker_id for r in reply.results] == ["w0", "", "", "w0"]
            assert "max_tokens" in reply.results[2].message
            assert "already live" in reply.results[1].message
            assert (_batch_metric("count") - calls, _batch_metric("sum") - sizes) == (1, 4)
            # Both reached the worker (as one Assignments message) and ran.
            for rid in ("b-1", "b-2"):
                assert_complete(rid, await c.read_stream(rid), 8)

    run(scenario())


def test_assignments_waiting_in_a_sessions_outbox_travel_together_in_order() -> None:
    async def scenario() -> None:
        handle = WorkerSessionHandle("w", 1)
        assignments = [scheduler_pb2.Assignment(request_id=f"r{i}") for i in range(4)]
        handle.assign(assignments[0])
        handle.assign(assignments[1])
        handle.send(scheduler_pb2.WorkerSessionResponse(
            abort_requests=scheduler_pb2.AbortRequests(request_ids=["r0"])))
        handle.assign(assignments[2])  # after the abort: a message of its own

        def ids(message: scheduler_pb2.WorkerSessionResponse | None) -> list[str]:
            assert message is not None
            return [a.request_id for a in message.assignments.assignments]

        assert ids(await handle.next_message()) == ["r0", "r1"]
        abort = await handle.next_message()
        assert abort is not None and list(abort.abort_requests.request_ids) == ["r0"]
        taken = await handle.next_message()
        handle.assign(assignments[3])  # the writer has the last one: a new message
        assert ids(taken) == ["r2"]
        assert ids(await handle.next_message()) == ["r3"]
        handle.close()
        assert await handle.next_message() is None

    run(scenario())


def test_the_gateways_concurrent_submissions_travel_in_few_calls(redis_url: str) -> None:
    from gateway.scheduler import SchedulerClient, SchedulerError

    async def scenario() -> None:
        async with cluster(redis_url, "fcfs") as c:
            await c.start_worker("w0")
            client = SchedulerClient(c.server.address)
            sample = _submission(c, "x")

            async def store(request_id: str) -> None:
                await c.redis.hset(tokenstream.payload_key(request_id, c.prefix),
                                   mapping={"prompt": "p", "max_tokens": 8})

            async def submit(request_id: str, timeout_s: float = 5.0, *,
                             stored: bool = False) -> str:
                if not stored:
                    await store(request_id)
                return await client.submit(
                    request_id=request_id, gateway_id="test", prompt_tokens=16, max_tokens=8,
                    qoe=sample.qoe, sampling=sample.sampling, arrival_unix_s=time.time(),
                    payload_key=tokenstream.payload_key(request_id, c.prefix),
                    token_stream_key=tokenstream.stream_key(request_id, c.prefix),
                    timeout_s=timeout_s)

            try:
                assert await submit("alone") == "w0"  # nothing waits: it goes at once
                calls, sizes = _batch_metric("count"), _batch_metric("sum")
                ids = [f"many-{i}" for i in range(20)]
                placed = await asyncio.gather(*(submit(rid) for rid in [*ids, "many-0"]),
                                              return_exceptions=True)
                assert placed[:20] == ["w0"] * 20
                duplicate = placed[20]
                assert isinstance(duplicate, SchedulerError)
                assert duplicate.code == grpc.StatusCode.ALREADY_EXISTS
                # The payload writes interleave the calls; at most a few batches carry all 21.
                batches = _batch_metric("count") - calls
                assert _batch_metric("sum") - sizes == 21 and batches < 21
                for rid in ids:
                    assert_complete(rid, await c.read_stream(rid), 8)
                # A caller that stops waiting gets DEADLINE_EXCEEDED; the batch it was in goes
                # on (both submitted in one tick: one call, whose deadline is the patient one's).
                await store("patient")
                await store("impatient")
                patient, impatient = await asyncio.gather(
                    submit("patient", stored=True),
                    submit("impatient", timeout_s=1e-6, stored=True), return_exceptions=True)
                assert patient == "w0"
                assert isinstance(impatient, SchedulerError)
                assert impatient.code == grpc.StatusCode.DEADLINE_EXCEEDED
                for rid in ("patient", "impatient"):
                    assert_complete(rid, await c.read_stream(rid), 8)
            finally:
                await client.close()

    run(scenario())


def test_abort_ends_the_stream_and_frees_kv(redis_url: str) -> None:
    async def scenario() -> None:
        async with cluster(redis_url, "fcfs") as c:
            worker = await c.start_worker("w0")
            total = worker.engine.profile.kv_blocks_total
            await c.submit("long", max_tokens=5000)
            await c.read_stream("long", until=lambda chunks: sum(
                len(x.token_ids) for x in chunks) >= 5)
            assert worker.engine.kv_blocks_free < total
            reply = await c.stub.Abort(
                scheduler_pb2.AbortRequest(request_id="long", reason="test"), timeout=5)
            assert reply.found
            chunks = await c.read_stream("long")
            assert_complete("long", chunks, 5000, reason=CANCELLED)
            assert chunks[-1].end < 5000
            assert not worker.engine.holds("long")
            assert worker.engine.kv_blocks_free == total
            # The next step report tells the scheduler the KV is free again.
            view = c.scheduler.table.workers["w0"]
            await c.wait_for(lambda: view.kv_blocks_free == total)
            again = await c.stub.Abort(scheduler_pb2.AbortRequest(request_id="long"), timeout=5)
            assert not again.found  # idempotent

    run(scenario())


def test_silent_workers_are_dead_and_bad_registrations_refused(redis_url: str) -> None:
    async def scenario() -> None:
        async with cluster(redis_url, worker_timeout_s=0.5) as c:
            profile = load_profile("a100-opt13b")
            registration = scheduler_pb2.Registration(
                worker_id="mute", backend="sim", kv_blocks_total=profile.kv_blocks_total,
                block_size=profile.block_size, max_batch=profile.max_batch,
                max_batched_tokens=profile.max_batched_tokens,
                profile=profile_to_proto(profile),
            )
            call = c.stub.WorkerSession()
            await call.write(scheduler_pb2.WorkerSessionRequest(registration=registration))
            assert "andes-session" in dict(await call.initial_metadata() or ())
            assert "mute" in c.scheduler.sessions
            # No step report, no heartbeat: the scheduler gives up on it and ends the stream.
            assert await asyncio.wait_for(call.read(), 5) is grpc.aio.EOF
            assert "mute" not in c.scheduler.sessions
            assert not c.scheduler.table.workers["mute"].live

            registration.profile.block_size = 0
            bad = c.stub.WorkerSession()
            await bad.write(scheduler_pb2.WorkerSessionRequest(registration=registration))
            assert await bad.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "block_size" in (await bad.details() or "")

    run(scenario())


def test_worker_with_an_impossible_profile_stops(redis_url: str, tmp_path: Path) -> None:
    free = dataclasses.replace(load_profile("a100-opt13b"), name="free", step_overhead_s=0.0,
                               weights_read_s=0.0, kv_read_s_per_token=0.0,
                               compute_s_per_token=0.0)
    path = tmp_path / "free.json"
    path.write_text(json.dumps(free.to_json()))

    async def scenario() -> None:
        async with cluster(redis_url) as c:
            config = WorkerConfig("free", c.server.address, redis_url, profile=str(path))
            with pytest.raises(RegistrationRefusedError, match="positive"):
                await WorkerService(config).run(asyncio.Event())
            assert "free" not in c.scheduler.sessions

    run(scenario())


def test_delivery_reports_reach_the_planner(redis_url: str) -> None:
    async def scenario() -> None:
        async with cluster(redis_url, "andes") as c:
            await c.start_worker("w0")
            await c.submit("watched", max_tokens=400)
            await c.read_stream("watched", until=lambda chunks: len(chunks) >= 3)
            sent = time.time()

            async def batches() -> AsyncIterator[scheduler_pb2.ReportDeliveryRequest]:
                yield scheduler_pb2.ReportDeliveryRequest(gateway_id="g", sent_unix_s=sent,
                                                          progress=[
                    scheduler_pb2.DeliveryProgress(request_id="watched", delivered_tokens=2,
                                                   digest_max_s=0.4, delay_sum_s=0.0,
                                                   arrival_unix_s=sent - 1),
                    scheduler_pb2.DeliveryProgress(request_id="unknown", delivered_tokens=1),
                ])

            reply = await c.stub.ReportDelivery(batches(), timeout=5)
            assert reply.entries_received == 2
            entry = c.scheduler.table.requests["watched"]
            assert entry.has_delivery and entry.delivered_tokens == 2
            await c.stub.Abort(scheduler_pb2.AbortRequest(request_id="watched"), timeout=5)

    run(scenario())


def _round_trips() -> float:
    """Plans whose round trip the scheduler measured (``andes_plan_round_trip_seconds``)."""
    return REGISTRY.get_sample_value("andes_plan_round_trip_seconds_count") or 0.0


def test_andes_plans_a_tiny_kv_budget(redis_url: str) -> None:
    async def scenario() -> None:
        measured_before = _round_trips()
        async with cluster(redis_url, "andes", plan_interval_s=0.02) as c:
            # 24 blocks of 16 tokens: two or three of these requests fit at a time.
            worker = await c.start_worker("w0", kv_blocks=24)
            lengths = {f"kv-{i}": 20 + 4 * i for i in range(6)}
            for rid, n in lengths.items():
                await c.submit(rid, prompt_tokens=100, max_tokens=n, tds=8.0)
            streams = await asyncio.gather(*(c.read_stream(rid) for rid in lengths))
            for (rid, n), chunks in zip(lengths.items(), streams, strict=True):
                assert_complete(rid, chunks, n)
            applied = worker.engine.applied  # type: ignore[attr-defined]
            assert len(applied) >= 2
            assert applied == sorted(set(applied))  # strictly increasing versions
            assert worker.loop.plan_version == applied[-1]
            view = c.scheduler.table.workers["w0"]
            await c.wait_for(lambda: view.plan_version_applied == view.plan_version_sent)
            assert view.plan_version_sent == applied[-1] == c.scheduler.plans_sent
            # Every applied plan's round trip (snapshot -> applied) measured once; plans
            # superseded before the worker applied them are not.
            await c.wait_for(lambda: _round_trips() - measured_before == len(applied))
            assert worker.loop.plan_applied_unix_s > 0

    run(scenario())


def test_an_arrival_at_a_worker_with_room_is_planned_at_once(redis_url: str) -> None:
    """The plan cadence (an hour here) holds back re-planning, not arrivals a worker has room
    for: the second request is admitted while the first runs."""
    async def scenario() -> None:
        async with cluster(redis_url, "fcfs", plan_interval_s=3600.0,
                           replan_after_s=3600.0) as c:
            worker = await c.start_worker("w0")
            await c.submit("first", max_tokens=400)
            await c.read_stream("first", until=lambda chunks: len(chunks) >= 1)
            await c.submit("second", max_tokens=8)
            assert_complete("second", await c.read_stream("second"), 8)
            assert len(worker.engine.applied) == 2  # type: ignore[attr-defined]
            await c.stub.Abort(scheduler_pb2.AbortRequest(request_id="first"), timeout=5)

    run(scenario())


def test_dead_workers_requests_resume_elsewhere(redis_url: str) -> None:
    async def scenario() -> None:
        async with cluster(redis_url, "fcfs", reassign_grace_s=0.3) as c:
            await c.start_worker("w0")
            await c.submit("moving", max_tokens=120)
            await c.read_stream("moving", until=lambda chunks: len(chunks) >= 10)
            await c.start_worker("w1")
            await c.stop_worker("w0")  # its session ends: dead, then the grace passes
            entry = c.scheduler.table.requests["moving"]
            await c.wait_for(lambda: entry.worker_id == "w1")
            assert 0 < entry.resume_from_tokens < 120
            chunks = await c.read_stream("moving")
            assert_complete("moving", chunks, 120)  # w1 went on exactly where w0 stopped
            await c.wait_for(lambda: not c.scheduler.table.requests)

    run(scenario())


def test_worker_survives_a_scheduler_restart(redis_url: str) -> None:
    async def scenario() -> None:
        async with cluster(redis_url, "fcfs") as c:
            worker = await c.start_worker("w0")
            await c.submit("survivor", max_tokens=300)
            await c.read_stream("survivor", until=lambda chunks: len(chunks) >= 5)
            address = c.server.address
            await c.server.stop(0.2)
            # The worker keeps executing its last plan while the scheduler is away.
            before = worker.loop.step_count
            await asyncio.sleep(0.5)
            assert worker.loop.step_count > before
            replacement = Scheduler(make_policy("fcfs"))
            c.server = SchedulerServer(replacement, address)
            c.scheduler = replacement
            await c.server.start()
            await c.wait_for(lambda: worker.session.registrations == 2, timeout_s=10)
            # The new scheduler adopted what the worker listed in its registration.
            assert "survivor" in replacement.table.requests
            assert_complete("survivor", await c.read_stream("survivor"), 300)
            await c.wait_for(lambda: not replacement.table.requests)

    run(scenario())


def test_command_line_services(redis_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ANDES_REDIS_URL": redis_url}
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        return proc

    try:
        scheduler_metrics, worker_metrics = free_port(), free_port()
        scheduler = start("scheduler_service", "--listen", f"127.0.0.1:{port}",
                          "--policy", "andes", "--plan-interval-ms", "20",
                          "--metrics-port", str(scheduler_metrics))
        assert scheduler.stdout is not None
        assert scheduler.stdout.readline().strip() == f"READY scheduler 127.0.0.1:{port}"
        worker = start("worker", "--backend", "sim", "--profile", "a100-opt13b",
                       "--worker-id", "cli-w0", "--scheduler", f"127.0.0.1:{port}",
                       "--kv-blocks", "32", "--redis-prefix", "cli",
                       "--metrics-port", str(worker_metrics))
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == "READY worker cli-w0"
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(
                service="andes.v1.SchedulerService"), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.SERVING

        async def traffic() -> None:
            redis = Redis.from_url(redis_url)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
                c = Cluster(redis, redis_url, "cli", None, None, stub)  # type: ignore[arg-type]
                ids = [f"cli-{uuid.uuid4().hex[:6]}-{i}" for i in range(4)]
                for rid in ids:
                    assert await c.submit(rid, prompt_tokens=80, max_tokens=25) == "cli-w0"
                for rid in ids:
                    assert_complete(rid, await c.read_stream(rid), 25)
            await redis.aclose()

        run(traffic())
        scraped = {
            name: urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics", timeout=5).read()
            for name, p in (("scheduler", scheduler_metrics), ("worker", worker_metrics))
        }
        for metric in (b"andes_queue_length", b"andes_plan_latency_seconds_count",
                       b'andes_preemptions_total{cause="planned"}',
                       b'andes_preemptions_total{cause="forced"}',
                       b'andes_kv_blocks{kind="used",worker="cli-w0"}', b"andes_workers_live 1"):
            assert metric in scraped["scheduler"], metric
        # Every applied plan was timed twice: received (delivery) and applied (round trip).
        delivered = _sample(scraped["scheduler"], "andes_plan_delivery_seconds")
        round_trip = _sample(scraped["scheduler"], "andes_plan_round_trip_seconds")
        assert round_trip["count"] >= 1 and delivered["count"] == round_trip["count"]
        assert delivered["sum"] <= round_trip["sum"]
        for metric in (b"andes_step_seconds_count", b"andes_tokens_generated_total 100",
                       b"andes_kv_blocks_used"):
            assert metric in scraped["worker"], metric
        for proc in (worker, scheduler):
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _sample(exposition: bytes, histogram: str) -> dict[str, float]:
    """A histogram's ``_count`` and ``_sum`` from a Prometheus text exposition."""
    values = {}
    for line in exposition.decode().splitlines():
        for part in ("count", "sum"):
            if line.startswith(f"{histogram}_{part} "):
                values[part] = float(line.split()[1])
    return values
