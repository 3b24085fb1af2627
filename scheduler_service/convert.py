"""Conversions between ``andes.v1`` messages and the core's values, stated once.

The wire names requests by string and states by ``RequestState`` (``State`` + 1); the planner
uses integer ids and :class:`andes.policies.base.State`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

from andes.latency import LatencyProfile
from andes.policies.base import Plan, PreemptionMode, State
from andes.v1 import scheduler_pb2


def state_from_proto(value: int) -> State:
    """``RequestState`` -> ``State``; ValueError for UNSPECIFIED or unknown values."""
    if not 1 <= value <= len(State):
        raise ValueError(f"invalid request state {value}")
    return State(value - 1)


def profile_from_proto(message: scheduler_pb2.LatencyProfile) -> LatencyProfile:
    """The registered latency model; ValueError if it is incomplete or inconsistent."""
    try:
        provenance = json.loads(message.provenance_json) if message.provenance_json else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"profile.provenance_json is not JSON: {err}") from err
    if not isinstance(provenance, dict):
        raise ValueError("profile.provenance_json must be a JSON object")
    profile = LatencyProfile(
        name=message.name or "registered",
        step_overhead_s=message.step_overhead_s,
        weights_read_s=message.weights_read_s,
        kv_read_s_per_token=message.kv_read_s_per_token,
        compute_s_per_token=message.compute_s_per_token,
        swap_s_per_token=message.swap_s_per_token,
        block_size=message.block_size,
        kv_blocks_total=message.kv_blocks_total,
        max_batch=message.max_batch,
        max_batched_tokens=message.max_batched_tokens,
        prefill_s_per_token=(
            message.prefill_s_per_token if message.HasField("prefill_s_per_token") else None
        ),
        attention_s_per_token=message.attention_s_per_token,
        provenance=provenance,
    )
    profile.validate()
    if profile.iteration_time(1.0, 1.0) <= 0 or not math.isfinite(profile.iteration_time(1, 1)):
        raise ValueError("profile: an iteration must take a positive, finite time")
    return profile


def plan_to_proto(plan: Plan, name_of: Callable[[int], str], version: int) -> scheduler_pb2.Plan:
    mode = (
        scheduler_pb2.PREEMPTION_MODE_SWAP
        if plan.preemption_mode == PreemptionMode.SWAP
        else scheduler_pb2.PREEMPTION_MODE_RECOMPUTE
    )
    return scheduler_pb2.Plan(
        plan_version=version,
        preempt=[name_of(i) for i in plan.preempt],
        pause=[name_of(i) for i in plan.pause],
        resume=[name_of(i) for i in plan.resume],
        admit=[name_of(i) for i in plan.admit],
        preemption_mode=mode,
    )
