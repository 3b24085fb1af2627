"""``python -m gateway``: run a gateway until SIGTERM/SIGINT, then drain.

Prints ``READY gateway <host:port>`` (gRPC) on stdout once it serves, then
``READY http <host:port>`` when the HTTP API is on (scripts and tests wait for the first line).
A second signal during the drain stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

import uvloop

from andes.heap import settle_heap
from gateway.config import GatewayConfig, parse_config
from gateway.server import Gateway, StartupError

log = logging.getLogger("gateway")


async def serve(config: GatewayConfig) -> int:
    # Signals are caught before READY: a supervisor may send SIGTERM as soon as it reads it.
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, signalled.set)
    try:
        gateway = Gateway(config)
    except StartupError as err:
        print(f"gateway: error: {err}", file=sys.stderr)
        return 1
    try:
        address = await gateway.start()
    except StartupError as err:
        print(f"gateway: error: {err}", file=sys.stderr)
        await gateway.stop()
        return 1
    settle_heap()
    print(f"READY gateway {address}", flush=True)
    if gateway.http_address:
        print(f"READY http {gateway.http_address}", flush=True)
    await signalled.wait()

    signalled.clear()
    log.info("draining: up to %.1f s for %d streams", config.drain_seconds,
             gateway.service.active_streams)
    await gateway.begin_drain()
    idle = asyncio.create_task(gateway.wait_idle(config.drain_seconds))
    second = asyncio.create_task(signalled.wait())
    await asyncio.wait({idle, second}, return_when=asyncio.FIRST_COMPLETED)
    for task in (idle, second):
        task.cancel()
    await gateway.stop()
    log.info("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return uvloop.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
