"""Realistic planner inputs, and the benchmark that times a policy on them.

A planner's cost depends on how many requests it sees and on whether its full solver runs,
which Andes does only under memory or latency pressure. A snapshot written by hand would have
to invent pacer summaries and KV footprints that agree with each other; instead a real
:class:`~andes.sim.engine.SimEngine` is driven by the Andes policy, with ShareGPT-like requests
of the reading mix arriving far faster than it serves them, until it holds the wanted number
of unfinished requests. Every field is then what the simulator itself would plan on: as many
requests RUNNING as fill the KV, some PREEMPTED part-way through their answers, the rest
WAITING since they arrived.
"""

from __future__ import annotations

import math
import statistics
import time

import numpy as np

from andes.latency import load_profile
from andes.policies import AndesPolicy, make_policy
from andes.policies.base import Snapshot, State, blocks_for
from andes.sim.engine import SimEngine
from andes.workload import make_workload

BENCH_PROFILE = "a100-opt13b"

ARRIVAL_SPAN_S = 20.0
"""The wanted requests arrive over about this long: far above the service rate of a profile's
worker for any count worth benchmarking, so the backlog builds up as in an overload burst."""

PLAN_INTERVAL_S = 0.05
"""Planning cadence while driving the engine: the simulator's default."""

OVERSUBSCRIPTION = 2.0
"""Few requests would fit in a whole accelerator's KV and leave the solver idle; the worker's
KV is then shrunk so their prompts alone need this many times what it holds."""


def overloaded_snapshot(
    num_requests: int, *, profile_name: str = BENCH_PROFILE, seed: int = 0
) -> Snapshot:
    """A worker of ``profile_name`` holding ``num_requests`` unfinished requests under overload."""
    if num_requests < 1:
        raise ValueError(f"need at least one request, got {num_requests}")
    profile = load_profile(profile_name)
    # Finished requests leave the worker: draw spares so the backlog can reach the target.
    workload = make_workload(
        "sharegpt",
        "reading",
        "poisson",
        max(num_requests / ARRIVAL_SPAN_S, 1.0),
        num_requests=2 * num_requests + 100,
        seed=seed,
    )
    prompt_blocks = int(blocks_for(workload.prompt_tokens[:num_requests], profile.block_size).sum())
    kv_blocks_total = min(profile.kv_blocks_total, math.ceil(prompt_blocks / OVERSUBSCRIPTION))
    engine = SimEngine(profile, kv_blocks_total=kv_blocks_total)
    # Lengths are clipped to the worker's KV as the simulator clips them to the profile's.
    kv_tokens = kv_blocks_total * profile.block_size
    prompt = np.minimum(workload.prompt_tokens, kv_tokens // 2)
    output = np.minimum(workload.output_tokens, kv_tokens - prompt - profile.block_size)
    policy = AndesPolicy()
    clock = 0.0
    last_plan = -math.inf
    arrived = 0
    while True:
        while arrived < len(workload) and workload.arrival_s[arrived] <= clock:
            engine.add(
                arrived,
                arrival_s=float(workload.arrival_s[arrived]),
                prompt_tokens=int(prompt[arrived]),
                output_tokens=int(output[arrived]),
                ttft_s=float(workload.ttft_s[arrived]),
                tds=float(workload.tds[arrived]),
                max_tokens=max(kv_tokens // 2, int(output[arrived])),
            )
            arrived += 1
            if len(engine) == num_requests:
                return engine.snapshot(clock)
        if arrived == len(workload):
            raise RuntimeError("the worker kept up with the arrivals: no backlog to snapshot")
        if clock - last_plan >= PLAN_INTERVAL_S:
            engine.apply(policy.plan(engine.snapshot(clock)))
            last_plan = clock
        if engine.has_work():
            clock = engine.step(clock).end_s
        else:
            clock = float(workload.arrival_s[arrived])


def time_planner(
    policy_name: str,
    num_requests: int,
    *,
    repeats: int = 50,
    warmups: int = 5,
    seed: int = 0,
) -> dict[str, object]:
    """Milliseconds ``policy_name`` takes to plan one overloaded snapshot, over ``repeats``."""
    if repeats < 1 or warmups < 0:
        raise ValueError(f"need repeats >= 1 and warmups >= 0, got {repeats} and {warmups}")
    policy = make_policy(policy_name)
    snapshot = overloaded_snapshot(num_requests, seed=seed)
    for _ in range(warmups):
        policy.plan(snapshot)
    elapsed_ms: list[float] = []
    solver_runs = 0
    for _ in range(repeats):
        started = time.perf_counter()
        plan = policy.plan(snapshot)
        elapsed_ms.append(1e3 * (time.perf_counter() - started))
        solver_runs += int(plan.solver_ran)
    states = np.bincount(snapshot.requests.state, minlength=len(State))
    return {
        "policy": policy_name,
        "requests": num_requests,
        "repeats": repeats,
        "median_ms": statistics.median(elapsed_ms),
        "p99_ms": float(np.percentile(elapsed_ms, 99)),
        "solver_ran": solver_runs / repeats,
        "kv_blocks_total": snapshot.kv_blocks_total,
        "kv_blocks_free": snapshot.kv_blocks_free,
        "states": {state.name.lower(): int(states[state]) for state in State},
    }
