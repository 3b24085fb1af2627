"""Conversions between the ``andes.v1`` session messages and the engine interface's values.

Kept apart from the loop so the mapping (states shifted by one, preemption modes, profiles
field for field) is stated once and tested on its own.
"""

from __future__ import annotations

import json

from andes.latency import LatencyProfile
from andes.policies.base import PreemptionMode, State
from andes.v1 import scheduler_pb2
from worker.engine import Finished, PlanSpec, Progress, RequestSpec


def profile_to_proto(profile: LatencyProfile) -> scheduler_pb2.LatencyProfile:
    return scheduler_pb2.LatencyProfile(
        name=profile.name,
        step_overhead_s=profile.step_overhead_s,
        weights_read_s=profile.weights_read_s,
        kv_read_s_per_token=profile.kv_read_s_per_token,
        compute_s_per_token=profile.compute_s_per_token,
        swap_s_per_token=profile.swap_s_per_token,
        block_size=profile.block_size,
        kv_blocks_total=profile.kv_blocks_total,
        max_batch=profile.max_batch,
        max_batched_tokens=profile.max_batched_tokens,
        provenance_json=json.dumps(profile.provenance),
        prefill_s_per_token=profile.prefill_s_per_token,
        attention_s_per_token=profile.attention_s_per_token,
    )


def state_to_proto(state: State) -> int:
    """``RequestState`` is ``State`` shifted by one (0 is UNSPECIFIED)."""
    return int(state) + 1


def progress_to_proto(progress: Progress, generated: int) -> scheduler_pb2.RequestProgress:
    return scheduler_pb2.RequestProgress(
        request_id=progress.request_id,
        generated_tokens=generated,
        state=state_to_proto(progress.state),  # type: ignore[arg-type]
        kv_blocks=progress.kv_blocks,
    )


def finished_to_proto(finished: Finished) -> scheduler_pb2.FinishedRequest:
    return scheduler_pb2.FinishedRequest(
        request_id=finished.request_id,
        finish_reason=finished.reason,  # type: ignore[arg-type]
        generated_tokens=finished.generated_tokens,
    )


def spec_from_assignment(assignment: scheduler_pb2.Assignment) -> RequestSpec:
    return RequestSpec(
        request_id=assignment.request_id,
        prompt_tokens=assignment.prompt_tokens,
        max_tokens=assignment.max_tokens,
        arrival_unix_s=assignment.arrival_unix_s,
        ttft_s=assignment.qoe.ttft_s,
        tds=assignment.qoe.tds,
        payload_key=assignment.payload_key,
        token_stream_key=assignment.token_stream_key,
        resume_from_tokens=assignment.resume_from_tokens,
    )


def plan_from_proto(plan: scheduler_pb2.Plan) -> PlanSpec:
    mode = (
        PreemptionMode.SWAP
        if plan.preemption_mode == scheduler_pb2.PREEMPTION_MODE_SWAP
        else PreemptionMode.RECOMPUTE
    )
    return PlanSpec(
        version=plan.plan_version,
        preempt=tuple(plan.preempt),
        pause=tuple(plan.pause),
        resume=tuple(plan.resume),
        admit=tuple(plan.admit),
        preemption_mode=mode,
    )
