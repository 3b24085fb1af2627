"""Where a new request goes: the live worker with the least load, weighted by KV pressure.

Load is the number of unfinished requests, inflated by how much of the worker's KV they need
(a worker whose requests fill its KV will preempt sooner); ties go to the worker with more
free KV, then to the lower id (deterministic). Dead workers, workers whose queue is full and
workers whose KV could never hold the request are skipped. Pure: the table supplies loads.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from andes.policies.base import blocks_for


@dataclass(frozen=True)
class WorkerLoad:
    worker_id: str
    live: bool
    unfinished: int
    """Requests placed on it and not finished."""
    kv_demand: int
    """KV blocks its unfinished requests need to run (held or not)."""
    kv_blocks_free: int
    kv_blocks_total: int
    block_size: int


class PlacementError(Exception):
    """No worker can take the request; the subclass says why."""


class NoLiveWorkerError(PlacementError):
    pass


class QueuesFullError(PlacementError):
    pass


class TooLargeError(PlacementError):
    pass


def blocks_needed(prompt_tokens: int, max_tokens: int, block_size: int) -> int:
    """KV blocks the request holds at its last decode step (the most it ever needs)."""
    return int(blocks_for(prompt_tokens + max_tokens - 1, block_size))


def load_score(load: WorkerLoad) -> tuple[float, int, str]:
    pressure = min(load.kv_demand / load.kv_blocks_total, 1.0) if load.kv_blocks_total else 1.0
    return (load.unfinished * (1.0 + pressure), -load.kv_blocks_free, load.worker_id)


def choose_worker(
    loads: Iterable[WorkerLoad],
    *,
    prompt_tokens: int,
    max_tokens: int,
    max_queue: int | None = None,
) -> str:
    """The id of the worker to place the request on; raises a :class:`PlacementError`."""
    live = [w for w in loads if w.live]
    if not live:
        raise NoLiveWorkerError("no worker is registered")
    fits = [
        w for w in live
        if blocks_needed(prompt_tokens, max_tokens, w.block_size) <= w.kv_blocks_total
    ]
    if not fits:
        biggest = max(w.kv_blocks_total * w.block_size for w in live)
        raise TooLargeError(
            f"prompt_tokens + max_tokens = {prompt_tokens + max_tokens} exceeds the largest "
            f"worker's KV capacity of {biggest} tokens"
        )
    open_ = [w for w in fits if max_queue is None or w.unfinished < max_queue]
    if not open_:
        raise QueuesFullError("every worker's queue is full")
    return min(open_, key=load_score).worker_id
