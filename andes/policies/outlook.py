"""Predicted QoE of every request if served at each candidate batch size, or if not served.

This is the input of the QoE-aware policies (``andes``, ``andes-exact``, ``lqf``): the same
predictor (:func:`andes.qoe.predict_qoe`) evaluated on a snapshot, vectorized over requests
and batch-size candidates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from andes.policies.base import FloatArray, IntArray, Snapshot, State, blocks_for, in_states
from andes.qoe import predict_qoe


@dataclass(frozen=True)
class Outlook:
    batch_sizes: IntArray
    """Candidate batch sizes, ascending (C of them)."""
    token_latency: FloatArray
    """Seconds per token of a running request at each candidate (C)."""
    q_serve: FloatArray
    """Predicted QoE at the horizon if served at each candidate (C x N)."""
    q_wait: FloatArray
    """Predicted QoE at the horizon if not served (N)."""
    kv_weight: IntArray
    """KV blocks each request needs to run (N)."""
    start_delay: FloatArray
    """Seconds before a request's next token even if served now: prefill, recompute, swap-in."""


def start_delays(snapshot: Snapshot) -> FloatArray:
    """What serving a request now costs before its next token, by state."""
    table = snapshot.requests
    profile = snapshot.profile
    context = table.context_tokens.astype(np.float64)
    needs_prefill = in_states(table.state, (State.WAITING, State.QUEUED, State.PREEMPTED))
    swapped = table.state == State.SWAPPED
    return np.where(
        needs_prefill,
        profile.prefill_per_token_s * context,
        np.where(swapped, profile.swap_s_per_token * context, 0.0),
    )


def token_latencies(snapshot: Snapshot, batch_sizes: IntArray) -> FloatArray:
    """Per-token latency of a steady decode batch of each size, at the snapshot's mean context."""
    context = snapshot.requests.context_tokens
    mean_context = float(context.mean()) if context.size else 0.0
    return np.asarray(
        snapshot.profile.token_latency(batch_sizes.astype(np.float64), mean_context)
    )


def make_outlook(snapshot: Snapshot, batch_sizes: IntArray, horizon_s: float) -> Outlook:
    table = snapshot.requests
    now = snapshot.now_s - table.arrival_s
    delays = start_delays(snapshot)
    latency = token_latencies(snapshot, batch_sizes)
    common: dict[str, Any] = {
        "now": now,
        "horizon": horizon_s,
        "ttft": table.ttft_s,
        "tds": table.tds,
        "count": table.generated_tokens,
        "digest_max": table.digest_max,
        "delay_sum": table.delay_sum,
        "max_count": table.max_tokens,
    }
    q_serve = predict_qoe(
        **common,
        token_latency=latency[:, None],
        start_delay=delays[None, :],
        served=True,
    )
    q_wait = predict_qoe(**common, token_latency=1.0, served=False)
    return Outlook(
        batch_sizes=batch_sizes,
        token_latency=latency,
        q_serve=np.atleast_2d(q_serve),
        q_wait=q_wait,
        kv_weight=blocks_for(table.context_tokens, snapshot.block_size),
        start_delay=delays,
    )
