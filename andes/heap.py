"""Garbage-collector settings for the long-running processes: gateway, scheduler, workers and
the load generator.

CPython's defaults (a young collection every 700 net allocations, a full one every 100 young
ones) suit short scripts. A gateway streaming to 2,000 clients holds some 300,000 container
objects (each stream's coroutines, futures and queued chunks) and allocates tens of thousands
a second. Measured with ``python -m benchmarks.delivery`` (2,000 streams): the collector took a
quarter of the gateway's CPU (5.2 of 20.8 s, 2,067 young and 17 full collections) and each full
collection stopped its event loop for about 150 ms, which every stream's latency feels. Almost
all of that work finds nothing: what a service allocates per token is freed by reference
counting, and the collector is only needed for the rare reference cycle (an exception and its
traceback, for instance).

:func:`settle_heap` freezes what start-up built (modules, classes, connections, configuration:
objects that live as long as the process, so no collection needs to look at them again) and
makes young collections :data:`YOUNG_THRESHOLD` / 700 times rarer; the older generations
follow, since they count young collections. Cyclic garbage waits longer to be freed, at most
the objects of :data:`YOUNG_THRESHOLD` net allocations per generation.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 20_000
"""Net allocations of container objects between two young collections (CPython: 700)."""


def settle_heap() -> None:
    """Collect, freeze what is left, and raise the young threshold: call once start-up is done."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
