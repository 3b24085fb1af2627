"""Open-loop traffic against the gRPC gateway, measured at the client.

Every request of a :class:`~andes.workload.Workload` is sent at its arrival time whether or
not earlier ones finished (open loop: the server cannot slow the offered load down), and every
message's receipt time is recorded. QoE, TTFT and the rest are computed here, at the client,
with :mod:`andes.qoe` and :mod:`andes.metrics`: what users feel, network and gateway included.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc
import numpy as np

from andes.metrics import RequestOutcomes
from andes.qoe import qoe
from andes.v1 import generation_pb2, generation_pb2_grpc
from andes.workload import Workload

CHANNELS = 8
"""Channels to spread streams over: one HTTP/2 connection caps its concurrent streams."""


def synthetic_prompt(tokens: int) -> str:
    """A prompt that any of our token counters (words, chars/4) counts as ``tokens`` long."""
    return " ".join(["abc"] * max(tokens, 1))


@dataclass
class StreamRecord:
    """One request as the client saw it. Times are seconds on the run's clock."""

    index: int
    request_id: str
    sent_s: float
    ttft_s: float
    tds: float
    token_times: list[float] = field(default_factory=list)
    """Receipt time of every token (a message of k tokens gives k equal entries)."""
    messages: list[tuple[int, int, float]] = field(default_factory=list)
    """(index of the first token, token count, receipt time on the wall clock) per message:
    comparable with Redis stream entry IDs, which are the same machine's wall clock."""
    indices_ok: bool = True
    """Token indices arrived contiguous from 0, nothing duplicated or missing."""
    finish_reason: int = 0
    error: str = ""
    """The gRPC status code's name if the stream failed."""
    error_detail: str = ""

    @property
    def qoe(self) -> float:
        return qoe([t - self.sent_s for t in self.token_times], self.ttft_s, self.tds)


@dataclass
class DriveResult:
    records: list[StreamRecord]
    send_lag_s: np.ndarray
    """Actual minus intended send time of every request: the client's own scheduling lag."""

    def outcomes(self) -> RequestOutcomes:
        done = [r for r in self.records if r.token_times and not r.error]
        return RequestOutcomes(
            arrival_s=np.array([r.sent_s for r in done]),
            first_token_s=np.array([r.token_times[0] for r in done]),
            finish_s=np.array([r.token_times[-1] for r in done]),
            output_tokens=np.array([len(r.token_times) for r in done], dtype=np.float64),
            qoe=np.array([r.qoe for r in done]),
            preemptions=np.zeros(len(done)),
        )

    @property
    def errors(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for record in self.records:
            if record.error:
                counts[record.error] = counts.get(record.error, 0) + 1
        return counts


async def _stream(
    stub: generation_pb2_grpc.GenerationServiceStub,
    record: StreamRecord,
    request: generation_pb2.GenerateRequest,
    clock: float,
    metadata: tuple[tuple[str, str], ...],
) -> None:
    expected = 0
    try:
        call = stub.Generate(request, metadata=metadata)
        async for message in call:
            now = time.perf_counter() - clock
            record.messages.append((message.index, len(message.token_ids), time.time()))
            if message.index != expected:
                record.indices_ok = False
            expected = message.index + len(message.token_ids)
            record.token_times.extend([now] * len(message.token_ids))
            if message.finish_reason:
                record.finish_reason = message.finish_reason
    except grpc.aio.AioRpcError as err:
        record.error = err.code().name
        record.error_detail = err.details() or ""


async def drive(
    target: str,
    workload: Workload,
    *,
    run_id: str = "run",
    api_key: str | None = None,
    channel_count: int = CHANNELS,
) -> DriveResult:
    """Send ``workload`` to the gateway at ``target`` and wait for every stream to end."""
    channels = [grpc.aio.insecure_channel(target) for _ in range(channel_count)]
    stubs = [generation_pb2_grpc.GenerationServiceStub(c) for c in channels]  # type: ignore[no-untyped-call]
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
    records: list[StreamRecord] = []
    tasks: list[asyncio.Task[None]] = []
    lags = np.zeros(len(workload))
    clock = time.perf_counter()
    try:
        for i in range(len(workload)):
            intended = float(workload.arrival_s[i])
            delay = intended - (time.perf_counter() - clock)
            if delay > 0:
                await asyncio.sleep(delay)
            sent = time.perf_counter() - clock
            lags[i] = sent - intended
            record = StreamRecord(
                index=i,
                request_id=f"{run_id}-{i}",
                sent_s=sent,
                ttft_s=float(workload.ttft_s[i]),
                tds=float(workload.tds[i]),
            )
            request = generation_pb2.GenerateRequest(
                request_id=record.request_id,
                prompt=synthetic_prompt(int(workload.prompt_tokens[i])),
                max_tokens=int(workload.output_tokens[i]),
                # The workload fixes output lengths: a real model's end-of-sequence must not.
                sampling=generation_pb2.SamplingParams(ignore_eos=True),
                qoe=generation_pb2.QoESpec(ttft_s=record.ttft_s, tds=record.tds),
            )
            records.append(record)
            tasks.append(
                asyncio.create_task(
                    _stream(stubs[i % channel_count], record, request, clock, metadata)
                )
            )
        await asyncio.gather(*tasks)
    finally:
        for channel in channels:
            await channel.close()
    return DriveResult(records=records, send_lag_s=lags)
