"""Discrete-event simulation of one or more workers at iteration granularity.

Each worker is a :class:`~andes.sim.engine.SimEngine` with its own clock. Requests arrive from
a :class:`~andes.workload.Workload`, are placed on the least-loaded worker (KV demand), and
each worker is planned by the same policy object the scheduler service runs, at the same
cadence: after an event (arrival, finish, forced preemption, or a plan that held starts back
for the next one), no more often than ``plan_interval_s`` (except for an arrival at a worker
with room for all its requests: :func:`~andes.policies.room_for_everyone`), and at least every
``replan_after_s``. (The scheduler service also replans after every delivery report, i.e.
about every ``plan_interval_s`` under load.) Tokens reach the client at the end
of the iteration that produced them; the client pacer and QoE are :mod:`andes.qoe`'s.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from andes.latency import LatencyProfile
from andes.metrics import RequestOutcomes, summarize
from andes.policies import FcfsPolicy, Policy
from andes.sim.engine import FinishedRequest, SimEngine
from andes.workload import Workload


@dataclass(frozen=True)
class SimConfig:
    profile: LatencyProfile
    num_workers: int = 1
    plan_interval_s: float = 0.05
    """Least simulated time between two plans of one worker."""
    replan_after_s: float = 1.0
    """Plan even without events this often: QoE predictions drift with time."""
    host_kv_blocks: int = 0
    """Host memory for swapped KV per worker, in blocks (0: swap falls back to recompute)."""
    max_tokens: int | None = None
    """The output cap the planner is told (it never sees true lengths); default: half a
    worker's KV capacity in tokens. Raised to a request's true length where that is longer."""


@dataclass
class SimResult:
    policy: str
    outcomes: RequestOutcomes
    iterations: int
    plans: int
    solver_runs: int
    planner_seconds: float
    wall_seconds: float
    preemptions_planned: int
    preemptions_forced: int
    simulated_seconds: float
    finished: list[FinishedRequest] = field(repr=False, default_factory=list)

    def summary(self) -> dict[str, object]:
        figures: dict[str, object] = {"policy": self.policy}
        figures.update(summarize(self.outcomes))
        figures.update(
            iterations=self.iterations,
            plans=self.plans,
            solver_runs=self.solver_runs,
            planner_ms_per_plan=1e3 * self.planner_seconds / max(self.plans, 1),
            preemptions_forced=self.preemptions_forced,
            wall_seconds=self.wall_seconds,
        )
        return figures


def _outcomes(finished: list[FinishedRequest]) -> RequestOutcomes:
    def col(name: str) -> np.ndarray:
        return np.array([getattr(f, name) for f in finished], dtype=np.float64)

    return RequestOutcomes(
        arrival_s=col("arrival_s"),
        first_token_s=col("first_token_s"),
        finish_s=col("finish_s"),
        output_tokens=col("output_tokens"),
        qoe=col("qoe"),
        preemptions=col("preemptions"),
    )


class _Worker:
    def __init__(self, config: SimConfig) -> None:
        self.engine = SimEngine(config.profile, host_kv_blocks=config.host_kv_blocks)
        self.clock = 0.0
        self.last_plan = -math.inf
        self.dirty = False
        self.arrival_fits = False
        """An arrival found room for everyone: plan before the next step, cadence or not."""
        self.prompt_tokens = 0
        """Prompt tokens of unfinished requests: with their count, the placement load."""

    def load(self) -> tuple[int, int]:
        return (len(self.engine), self.prompt_tokens)


def simulate(workload: Workload, policy: Policy, config: SimConfig) -> SimResult:
    """Run ``workload`` to completion (every request finishes) under ``policy``."""
    started = time.perf_counter()
    workers = [_Worker(config) for _ in range(config.num_workers)]
    fallback = FcfsPolicy()
    kv_tokens = config.profile.kv_capacity_tokens
    prompt = np.minimum(workload.prompt_tokens, kv_tokens // 2)
    output = np.minimum(workload.output_tokens, kv_tokens - prompt - config.profile.block_size)
    cap = config.max_tokens
    finished: list[FinishedRequest] = []
    placed_on: dict[int, _Worker] = {}
    next_arrival = 0
    total = len(workload)
    iterations = plans = solver_runs = 0
    planner_seconds = 0.0

    while len(finished) < total:
        busy = [w for w in workers if len(w.engine)]
        worker = min(busy, key=lambda w: w.clock) if busy else None
        arrival_at = float(workload.arrival_s[next_arrival]) if next_arrival < total else math.inf
        if worker is None or arrival_at <= worker.clock:
            i = next_arrival
            target = min(workers, key=_Worker.load)
            max_tokens = cap if cap is not None else int(kv_tokens // 2)
            target.engine.add(
                i,
                arrival_s=arrival_at,
                prompt_tokens=int(prompt[i]),
                output_tokens=int(output[i]),
                ttft_s=float(workload.ttft_s[i]),
                tds=float(workload.tds[i]),
                max_tokens=max(max_tokens, int(output[i])),
            )
            target.prompt_tokens += int(prompt[i])
            placed_on[i] = target
            target.clock = max(target.clock, arrival_at)
            target.dirty = True
            target.arrival_fits = target.engine.has_room_for_everyone()
            next_arrival += 1
            continue

        since_plan = worker.clock - worker.last_plan
        if (worker.dirty and (since_plan >= config.plan_interval_s or worker.arrival_fits)) or (
            since_plan >= config.replan_after_s
        ):
            t0 = time.perf_counter()
            plan = policy.plan(worker.engine.snapshot(worker.clock))
            planner_seconds += time.perf_counter() - t0
            worker.engine.apply(plan)
            plans += 1
            solver_runs += int(plan.solver_ran)
            worker.last_plan = worker.clock
            worker.arrival_fits = False
            # A plan that held work back (paced admissions) asks for the next one.
            worker.dirty = bool(plan.notes.get("deferred", 0.0))
        if not worker.engine.has_work():
            if worker.dirty:
                # Events are pending but the plan cadence is not due yet: wait for it.
                worker.clock = max(worker.clock, worker.last_plan + config.plan_interval_s)
                continue
            # A plan that leaves a worker idle while requests wait would stall it for good:
            # stay work-conserving and admit in arrival order.
            worker.engine.apply(fallback.plan(worker.engine.snapshot(worker.clock)))
        step = worker.engine.step(worker.clock)
        iterations += 1
        worker.clock = step.end_s
        if step.finished or step.forced_preemptions.size:
            worker.dirty = True
        for done in step.finished:
            owner = placed_on.pop(done.request_id)
            owner.prompt_tokens -= int(prompt[done.request_id])
        finished.extend(step.finished)

    finished.sort(key=lambda f: f.request_id)
    return SimResult(
        policy=policy.name,
        outcomes=_outcomes(finished),
        iterations=iterations,
        plans=plans,
        solver_runs=solver_runs,
        planner_seconds=planner_seconds,
        wall_seconds=time.perf_counter() - started,
        preemptions_planned=sum(w.engine.preemptions_planned for w in workers),
        preemptions_forced=sum(w.engine.preemptions_forced for w in workers),
        simulated_seconds=max((f.finish_s for f in finished), default=0.0),
        finished=finished,
    )
