"""The worker's Prometheus metrics (``andes_*``), served on ``--metrics-port`` when given.

Module-level singletons: prometheus_client registers a name once per process.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

STEP_SECONDS = Histogram(
    "andes_step_seconds",
    "Wall-clock duration of one engine iteration (the measured token latency).",
    buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5),
)
TOKENS_GENERATED = Counter(
    "andes_tokens_generated",
    "Output tokens the engine generated.",
)
KV_BLOCKS_USED = Gauge(
    "andes_kv_blocks_used",
    "KV cache blocks held by requests on this worker's accelerator.",
)
FORCED_PREEMPTIONS = Counter(
    "andes_engine_preemptions",
    "Requests the engine preempted by itself (KV ran out), each reported to the scheduler.",
)
