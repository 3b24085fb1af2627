"""The scheduler's Prometheus metrics (``andes_*``), served on ``--metrics-port`` when given.

Module-level singletons: prometheus_client registers a name once per process.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

QUEUE_LENGTH = Gauge(
    "andes_queue_length",
    "Live requests waiting to run: placed but holding no KV, or orphaned by a dead worker.",
)
PLAN_LATENCY = Histogram(
    "andes_plan_latency_seconds",
    "Time to compute one worker's plan (snapshot and policy).",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)
PLAN_TRIP_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1,
                     0.25, 0.5, 1.0)
"""Seconds, for a plan's way from its snapshot to its worker (delivered, or applied)."""
PLAN_DELIVERY = Histogram(
    "andes_plan_delivery_seconds",
    "From the snapshot a plan was computed from to its worker's session receiving it (planning "
    "and sending; the round trip adds the wait for the worker's next iteration boundary). "
    "Wall clocks as for andes_plan_round_trip_seconds.",
    buckets=PLAN_TRIP_BUCKETS,
)
PLAN_ROUND_TRIP = Histogram(
    "andes_plan_round_trip_seconds",
    "From the snapshot a plan was computed from to its worker applying it (planning, "
    "sending, and the wait for the worker's next iteration boundary). The scheduler's and "
    "the worker's wall clocks: exact on one machine, as good as their sync otherwise.",
    buckets=PLAN_TRIP_BUCKETS,
)
SUBMIT_BATCH_SIZE = Histogram(
    "andes_submit_batch_size",
    "Requests per SubmitBatch call from a gateway (its concurrent submissions travel together).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
PREEMPTIONS = Counter(
    "andes_preemptions",
    "Preemptions: planned (in a plan sent to a worker) or forced (the engine ran out of KV).",
    ["cause"],
)
KV_BLOCKS = Gauge(
    "andes_kv_blocks",
    "KV cache blocks per worker, as its latest step report says.",
    ["worker", "kind"],
)
WORKERS_LIVE = Gauge("andes_workers_live", "Workers with an open, responsive session.")

for _cause in ("planned", "forced"):
    PREEMPTIONS.labels(cause=_cause)  # export both series from the start, at zero
