"""Open-loop traffic against the gRPC gateway, measured at the client.

Every request of a :class:`~andes.workload.Workload` is sent at its arrival time whether or
not earlier ones finished (:mod:`loadgen.openloop`), and every message's receipt time is
recorded. QoE, TTFT and the rest are computed at the client, with :mod:`andes.qoe` and
:mod:`andes.metrics`: what users feel, network and gateway included.
"""

from __future__ import annotations

import grpc

from andes.v1 import generation_pb2, generation_pb2_grpc
from andes.workload import Workload
from loadgen.openloop import (
    CLOCK,
    DriveResult,
    LiveCounts,
    Stop,
    StreamRecord,
    prompt_text,
    run_open_loop,
    synthetic_prompt,
)

__all__ = ["CHANNELS", "DriveResult", "StreamRecord", "drive", "synthetic_prompt"]

CHANNELS = 8
"""Channels to spread streams over: one HTTP/2 connection caps its concurrent streams."""
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
"""Each channel its own connection: grpc-core otherwise shares one subchannel (one TCP
connection) between all channels with the same target and arguments, so ``--channels 16``
would still be a single connection."""


async def _stream(
    stub: generation_pb2_grpc.GenerationServiceStub,
    record: StreamRecord,
    request: generation_pb2.GenerateRequest,
    clock: float,
    metadata: tuple[tuple[str, str], ...],
) -> None:
    try:
        call = stub.Generate(request, metadata=metadata)
        async for message in call:
            record.add_chunk(message.index, len(message.token_ids), CLOCK() - clock)
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
    stop: Stop | None = None,
    counts: LiveCounts | None = None,
) -> DriveResult:
    """Send ``workload`` to the gateway at ``target`` (``host:port``) and wait for every
    stream to end, or for the drain after ``stop``."""
    channels = [
        grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        for _ in range(channel_count)
    ]
    stubs = [generation_pb2_grpc.GenerationServiceStub(c) for c in channels]  # type: ignore[no-untyped-call]
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    async def stream(record: StreamRecord, clock: float) -> None:
        request = generation_pb2.GenerateRequest(
            request_id=record.request_id,
            prompt=prompt_text(workload, record.index),
            max_tokens=record.max_tokens,
            # The workload fixes output lengths: a real model's end-of-sequence must not.
            sampling=generation_pb2.SamplingParams(ignore_eos=True),
            qoe=generation_pb2.QoESpec(ttft_s=record.ttft_s, tds=record.tds),
        )
        await _stream(stubs[record.index % channel_count], record, request, clock, metadata)

    try:
        return await run_open_loop(workload, stream, run_id=run_id, stop=stop, counts=counts)
    finally:
        for channel in channels:
            await channel.close()
