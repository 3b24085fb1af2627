"""A client process that opens many Generate streams at once and reports how each ended.

``python -m tests.burst_client TARGET STREAMS CHANNELS MAX_TOKENS`` prints one JSON object:
``{"ok": n, "statuses": {code: n}, "details": {"code: details": n}, "broken": n}``, where
``broken`` counts completed streams whose token indices were not contiguous from 0 up to
``MAX_TOKENS``. Used by :mod:`tests.test_gateway_burst`: the burst must come from another
process, as it does in production, so that the gateway's event loop is not also the client's.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter

import grpc

from andes.v1 import generation_pb2, generation_pb2_grpc


async def burst(
    target: str, streams: int, channel_count: int, max_tokens: int
) -> dict[str, object]:
    # A local subchannel pool per channel: each channel its own connection (channels with the
    # same target and arguments otherwise share one).
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(channel_count)
    ]
    stubs = [generation_pb2_grpc.GenerationServiceStub(c) for c in channels]  # type: ignore[no-untyped-call]
    statuses: Counter[str] = Counter()
    details: Counter[str] = Counter()
    broken = 0
    ready = asyncio.Event()

    async def one(i: int) -> None:
        nonlocal broken
        await ready.wait()
        request = generation_pb2.GenerateRequest(
            request_id=f"burst-{i}", prompt="hello there", max_tokens=max_tokens,
            sampling=generation_pb2.SamplingParams(ignore_eos=True),
        )
        position = 0
        contiguous = True
        try:
            async for message in stubs[i % channel_count].Generate(request):
                contiguous &= message.index == position
                position += len(message.token_ids)
        except grpc.aio.AioRpcError as err:
            statuses[err.code().name] += 1
            details[f"{err.code().name}: {err.details()}"] += 1
            return
        statuses["OK"] += 1
        if not contiguous or position != max_tokens:
            broken += 1

    for channel in channels:
        await channel.channel_ready()
    tasks = [asyncio.create_task(one(i)) for i in range(streams)]
    await asyncio.sleep(0)
    ready.set()  # every stream starts in the same loop iteration
    await asyncio.gather(*tasks)
    for channel in channels:
        await channel.close()
    return {"ok": statuses["OK"], "statuses": dict(statuses), "details": dict(details),
            "broken": broken}


def main() -> None:
    target, streams, channel_count, max_tokens = sys.argv[1:5]
    result = asyncio.run(burst(target, int(streams), int(channel_count), int(max_tokens)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
