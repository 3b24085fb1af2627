"""What one server-streaming gRPC message costs in Python, with nothing else around it.

The floor under the gateway's delivery path (``benchmarks/delivery.py``): a grpc.aio server
on uvloop (as the gateway runs) streams ``--messages`` GenerateResponse messages, one every
``--period-ms``, to each of ``--streams`` concurrent calls of a grpc.aio client in another
process (16 channels, as the load generator opens). Each side's CPU time (its process, all
threads: grpc-core's poller threads do much of the work) over the messages delivered gives
microseconds of CPU per message. Three ways of writing are compared: ``context.write`` of a
message (what the gateway does), an async generator that yields messages, and
``context.write`` of bytes serialized beforehand (no serializer in the write).

The gateway, the client and Redis share this machine's two cores with the rest of the
cluster, so whatever these costs come to at a given message rate is CPU the delivery path
cannot have for anything else. Writes benchmarks/results/grpc_messages.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import statistics
import time
from collections.abc import AsyncIterator, Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import uvloop

from andes.v1 import generation_pb2
from gateway.server import pending_call_options

RESULTS = Path(__file__).resolve().parent / "results" / "grpc_messages.json"
METHOD = "/andes.v1.GenerationService/Generate"
MODES = ("write", "yield", "bytes")


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _message(index: int) -> generation_pb2.GenerateResponse:
    """A typical delivery: six tokens and their text."""
    return generation_pb2.GenerateResponse(
        request_id="req-000123", index=index, token_ids=[11, 12, 13, 14, 15, 16],
        text=" the quick brown fox",
    )


def _handler(mode: str, messages: int, period_s: float) -> Callable[..., Any]:
    async def write(request: Any, context: Any) -> None:
        for i in range(messages):
            message = _message(i)
            await context.write(message.SerializeToString() if mode == "bytes" else message)
            await asyncio.sleep(period_s)

    async def generate(request: Any, context: Any) -> AsyncIterator[Any]:
        for i in range(messages):
            yield _message(i)
            await asyncio.sleep(period_s)

    return generate if mode == "yield" else write


async def _serve(mode: str, messages: int, period_s: float, streams: int,
                 conn: Connection) -> None:
    # The gateway's room for calls not yet accepted: a burst must not be dropped by grpc-core.
    server = grpc.aio.server(options=pending_call_options(streams))
    serializer = ((lambda raw: raw) if mode == "bytes"
                  else generation_pb2.GenerateResponse.SerializeToString)
    handlers = {"Generate": grpc.unary_stream_rpc_method_handler(
        _handler(mode, messages, period_s),
        request_deserializer=generation_pb2.GenerateRequest.FromString,
        response_serializer=serializer,
    )}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("andes.v1.GenerationService", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    conn.send(port)
    started = _cpu_s()
    await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # the client is done
    conn.send(_cpu_s() - started)
    await server.stop(0)


def _server_process(mode: str, messages: int, period_s: float, streams: int,
                    conn: Connection) -> None:
    uvloop.run(_serve(mode, messages, period_s, streams, conn))


async def _client(port: int, streams: int, channels: int) -> tuple[int, float, float]:
    pool = [grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                      options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(channels)]
    calls = [channel.unary_stream(
        METHOD, request_serializer=generation_pb2.GenerateRequest.SerializeToString,
        response_deserializer=generation_pb2.GenerateResponse.FromString) for channel in pool]

    async def one(k: int) -> int:
        received = 0
        request = generation_pb2.GenerateRequest(request_id=str(k), prompt="x", max_tokens=8)
        async for _ in calls[k % channels](request):
            received += 1
        return received

    cpu, wall = _cpu_s(), time.perf_counter()
    received = await asyncio.gather(*(one(k) for k in range(streams)))
    wall, cpu = time.perf_counter() - wall, _cpu_s() - cpu
    for channel in pool:
        await channel.close()
    return sum(received), wall, cpu


def measure(mode: str, args: argparse.Namespace) -> dict[str, float]:
    parent, child = multiprocessing.get_context("spawn").Pipe()
    server = multiprocessing.get_context("spawn").Process(
        target=_server_process,
        args=(mode, args.messages, args.period_ms / 1000, args.streams, child))
    server.start()
    port = parent.recv()
    received, wall, client_cpu = uvloop.run(_client(port, args.streams, args.channels))
    parent.send("done")
    server_cpu = parent.recv()
    server.join()
    if received != args.streams * args.messages:
        raise RuntimeError(f"{mode}: {received} of {args.streams * args.messages} messages")
    return {
        "messages_per_s": received / wall,
        "server_cpu_us_per_message": 1e6 * server_cpu / received,
        "client_cpu_us_per_message": 1e6 * client_cpu / received,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--messages", type=int, default=50, help="per stream")
    parser.add_argument("--period-ms", type=float, default=50.0,
                        help="the server's pause between two messages of a stream")
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode in MODES:  # interleaved: drift in machine speed hits every mode alike
            runs[mode].append(measure(mode, args))
    medians = {mode: {key: statistics.median(run[key] for run in runs[mode])
                      for key in runs[mode][0]} for mode in MODES}
    for mode, figures in medians.items():
        print(f"{mode:>5}: {figures['messages_per_s']:,.0f} messages/s, CPU per message: "
              f"server {figures['server_cpu_us_per_message']:.1f} us, "
              f"client {figures['client_cpu_us_per_message']:.1f} us")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "command": "python benchmarks/grpc_messages.py",
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "cpu_cores": len(os.sched_getaffinity(0)),
        "medians": medians,
        "runs": runs,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
