"""The Andes policy: serve the requests whose users would otherwise be disappointed.

Each planning step (paper, section 4):

1. *Selective triggering*: when KV memory has room for everyone and the token latency meets
   the tightest reading speed, there is nothing to optimize: admit and resume everyone.
2. *Candidates*: batch sizes B between B_min (the largest batch that still meets the tightest
   TDS: smaller batches gain nothing) and B_max (the most requests that fit in KV,
   shortest first).
3. *Knapsack*: for every B, value_i = Q_serve,i(B) - Q_wait,i over the horizon (objective
   ``avg``; ``min`` and ``perfect`` are the paper's alternatives), weight = KV blocks; the
   greedy picks by value density; the best B wins.
4. *Preemption control*: running requests not selected are preemption victims, but only as
   many as the selected admissions need memory for, never one already preempted
   ``max_preemptions`` times, and each admission is accepted only if its gain beats what its
   victims lose plus what the stall of their later recompute (or swap) costs every running
   request (the v2 overhead-aware refiner). The walk stops at the first rejection.
5. *Prefill pacing* (ours, beyond the paper): the admissions and recompute resumes of one plan
   start no more prefill than the iterations until the next plan hide under their
   memory-bound decode (at least one request per plan). The rest wait for the next plan; the
   plan says how many it held back (``notes["deferred"]``) so the caller plans again soon.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from andes.policies import knapsack
from andes.policies.base import (
    HOLDS_KV,
    FloatArray,
    IntArray,
    Plan,
    PreemptionMode,
    Snapshot,
    State,
    blocks_for,
    in_states,
)
from andes.policies.outlook import Outlook, make_outlook, token_latencies
from andes.qoe import predict_qoe

Objective = Literal["avg", "min", "perfect"]
Solver = Literal["greedy", "exact"]

_STALL_PROBE_S = 0.5
"""Stall used to measure how fast running requests lose QoE when the batch stalls."""


def candidate_batch_sizes(
    snapshot: Snapshot, capacity: int, max_candidates: int
) -> IntArray:
    """B_min..B_max, geometrically spaced (small B matter more), at most ``max_candidates``."""
    table = snapshot.requests
    weights = np.sort(blocks_for(table.context_tokens, snapshot.block_size))
    b_max = int(np.searchsorted(np.cumsum(weights), capacity, side="right"))
    b_max = max(1, min(b_max, snapshot.max_batch, len(table)))
    tightest = float(np.min(1.0 / table.tds)) if len(table) else np.inf
    sizes = np.arange(1, b_max + 1)
    meets = token_latencies(snapshot, sizes) <= tightest
    b_min = int(sizes[meets][-1]) if meets.any() else 1
    if b_min >= b_max:
        return np.array([b_max], dtype=np.int64)
    grid = np.geomspace(b_min, b_max, num=max_candidates)
    return np.unique(np.round(grid).astype(np.int64))


@dataclass(frozen=True)
class AndesPolicy:
    """The paper's greedy Andes scheduler with the v1 preemption cap and the v2 refiner."""

    horizon_s: float = 10.0
    """How far ahead QoE is predicted (the paper's Delta t)."""
    objective: Objective = "avg"
    solver: Solver = "greedy"
    memory_trigger: float = 0.9
    """Run the solver only when demand for KV exceeds this fraction of capacity ..."""
    latency_trigger: bool = True
    """... or when the batch's token latency would miss the tightest TDS."""
    max_preemptions: int = 1
    """Preemptions per request after which it is never preempted again (v1's cap P; the
    paper's default of 1). With prefill pacing (below) a recompute rides in iterations' spare
    compute, so preempting a request far ahead of its reader to start a new one pays off
    (docs/results.md, "preemption ablation"); 0 leaves running requests alone."""
    overhead_aware: bool = True
    """Accept a preemption only when its gain beats its stall cost (v2's refiner)."""
    preemption_mode: PreemptionMode = PreemptionMode.RECOMPUTE
    victim_horizon_s: float = 60.0
    """Horizon over which a preemption victim's loss is counted: a preempted request needs
    memory again to come back, so it pays for longer than the planning horizon."""
    kv_reserve: float = 0.03
    """Fraction of KV left free for decode growth until the next plan."""
    max_candidates: int = 8
    memory_aware: bool = True
    """Rank by QoE gain per KV block (Andes); False ranks by gain alone (the LQF baseline)."""
    pace_prefill: bool = True
    """Under pressure, start no more prefill (new prompts, recomputes) per plan than the
    iterations until the next plan hide under their memory-bound decode (at least one
    request): a bigger lump makes an iteration compute-bound and stalls every running
    request, which under overload is capacity lost for good. Requests held back stay waiting
    for the next plan."""
    plan_interval_s: float = 0.05
    """Least time between two plans of a worker (the scheduler service's and the simulator's
    default): pacing spreads a plan's prefill budget over the iterations it covers."""
    name: str = field(default="andes")

    def plan(self, snapshot: Snapshot) -> Plan:
        table = snapshot.requests
        if len(table) == 0:
            return Plan()
        state = table.state
        holds = in_states(state, HOLDS_KV)
        weights = blocks_for(table.context_tokens, snapshot.block_size)
        capacity = int(snapshot.kv_blocks_total * (1.0 - self.kv_reserve))
        demand = int(weights.sum())
        tightest = float(np.min(1.0 / table.tds))
        batch_now = min(len(table), snapshot.max_batch)
        latency_now = float(token_latencies(snapshot, np.array([batch_now]))[0])
        memory_pressure = demand > self.memory_trigger * snapshot.kv_blocks_total
        latency_pressure = self.latency_trigger and latency_now > tightest
        if not (memory_pressure or latency_pressure):
            return _serve_everyone(snapshot, self.preemption_mode)

        sizes = candidate_batch_sizes(snapshot, capacity, self.max_candidates)
        outlook = make_outlook(snapshot, sizes, self.horizon_s)
        values = self._values(outlook)
        # The preemption cap pins running requests under memory pressure; pausing (latency
        # pressure) frees no memory and costs no recompute, so it is not capped.
        protected = holds & (table.preemptions >= self.max_preemptions) & memory_pressure
        rank_weights = weights if self.memory_aware else np.ones_like(weights)
        if self.solver == "exact":
            choice = knapsack.exact(values, weights, capacity, sizes)
        else:
            choice = knapsack.greedy(
                values, weights, capacity, sizes, must=protected, rank_weights=rank_weights
            )
        selected = choice.selected | protected
        gain = values[choice.candidate]
        return self._refine(snapshot, outlook, choice.candidate, selected, gain, choice.priority,
                            pause_instead=not memory_pressure)

    def _values(self, outlook: Outlook) -> FloatArray:
        q_serve, q_wait = outlook.q_serve, outlook.q_wait[None, :]
        gain: FloatArray = np.maximum(q_serve - q_wait, 0.0)
        if self.objective == "avg":
            return gain
        if self.objective == "min":
            floor = q_serve.min(axis=1, keepdims=True)
            # Raise the floor first; the average gain breaks ties among those above it.
            lifted: FloatArray = np.maximum(floor - q_wait, 0.0) + 1e-3 * gain
            return lifted
        perfect_now = q_wait >= 1.0 - 1e-9
        served_perfect = q_serve >= 1.0 - 1e-9
        at_risk = ~perfect_now & served_perfect
        value = at_risk.astype(np.float64) + 1e-3 * np.maximum(q_serve - q_wait, 0.0)
        return np.asarray(value, dtype=np.float64)

    def _refine(
        self,
        snapshot: Snapshot,
        outlook: Outlook,
        candidate: int,
        selected: np.ndarray,
        gain: FloatArray,
        priority: FloatArray,
        *,
        pause_instead: bool,
    ) -> Plan:
        """Turn the selected set into plan actions under the preemption controls."""
        table = snapshot.requests
        state = table.state
        holds = in_states(state, HOLDS_KV)
        weights = outlook.kv_weight
        ids = table.request_id
        reserve = int(snapshot.kv_blocks_total * self.kv_reserve)
        free = snapshot.kv_blocks_free - reserve

        if pause_instead:
            # Latency-bound, not memory-bound: keep KV, skip the unselected this step.
            pause = holds & ~selected & (state == State.RUNNING)
            starts = np.flatnonzero(selected & ~holds)
            starts = starts[np.argsort(-priority[starts], kind="stable")]
            # The unselected are paused: only the selected holders decode.
            allowed = self._paced(snapshot, starts, selected & holds)
            keep = selected.copy()
            keep[starts[~allowed]] = False
            return _actions(snapshot, keep, pause=ids[pause], preempt=np.zeros(0, np.int64),
                            priority=priority, mode=self.preemption_mode, solver_ran=True,
                            deferred=int(np.count_nonzero(~allowed)))

        admissions = np.flatnonzero(selected & ~holds)
        admissions = admissions[np.argsort(-priority[admissions], kind="stable")]
        # Unselected holders keep running unless a victim below: all of them decode.
        decoding = (state == State.RUNNING) | (selected & holds)
        allowed = self._paced(snapshot, admissions, decoding)
        deferred = int(np.count_nonzero(~allowed))
        admissions = admissions[allowed]
        victims = np.flatnonzero(holds & ~selected & (table.preemptions < self.max_preemptions))
        victims = victims[np.argsort(priority[victims], kind="stable")]

        # The refiner's prices, computed once and only when an admission needs a victim.
        stall_rate: float | None = None
        victim_loss: FloatArray | None = None
        accepted = np.zeros(len(table), dtype=bool)
        chosen_victims: list[int] = []
        next_victim = 0
        for row in admissions:
            need = int(weights[row])
            taken: list[int] = []
            while free < need and next_victim < victims.size:
                victim = int(victims[next_victim])
                next_victim += 1
                taken.append(victim)
                free += int(weights[victim])
            if free < need:
                break
            if taken and self.overhead_aware:
                if stall_rate is None or victim_loss is None:
                    # A stall costs at least what the worker's time is worth under this
                    # plan: the QoE the selected batch gains per second (its opportunity
                    # cost), and at least the QoE everyone in the system loses meanwhile.
                    opportunity = float(gain[selected].sum()) / self.horizon_s
                    stall_rate = max(
                        opportunity,
                        self._stall_loss_rate(snapshot, outlook, candidate, selected),
                    )
                    victim_loss = self._victim_loss(snapshot, outlook, candidate, victims)
                context = table.context_tokens[taken].astype(np.float64)
                stall = float(np.sum(self._resume_cost(snapshot, context)))
                loss = float(victim_loss[taken].sum()) + stall * stall_rate
                if gain[row] <= loss:
                    break
            accepted[row] = True
            chosen_victims.extend(taken)
            free -= need
        keep = (selected & holds) | accepted
        preempt = np.asarray(chosen_victims, dtype=np.int64)
        return _actions(snapshot, keep, pause=np.zeros(0, np.int64), preempt=ids[preempt],
                        priority=priority, mode=self.preemption_mode, solver_ran=True,
                        deferred=deferred)

    def _paced(self, snapshot: Snapshot, starts: IntArray, decoding: np.ndarray) -> np.ndarray:
        """Which of ``starts`` (rows in priority order) may start now under prefill pacing.

        An iteration reads the weights and the KV of the ``decoding`` requests (memory time)
        and computes their tokens; prefill tokens up to the difference ride along for free.
        The budget is that slack times the iterations until the next plan (``plan_interval_s``
        over the current batch's iteration time, at least one). Requests already queued in the
        engine keep their place and their prefill counts first; new prefills (admissions,
        recompute resumes) follow in order while they fit the rest of the budget, stopping at
        the first that does not. The first always goes when nothing queued is waiting for a
        prefill, so the queue always moves.
        """
        allowed = np.ones(starts.size, dtype=bool)
        if not self.pace_prefill or starts.size == 0:
            return allowed
        table = snapshot.requests
        profile = snapshot.profile
        context = table.context_tokens.astype(np.float64)
        memory = profile.weights_read_s + profile.kv_read_s_per_token * float(
            context[decoding].sum()
        )
        compute = profile.compute_s_per_token * float(np.count_nonzero(decoding))
        slack = max(memory - compute, 0.0) / profile.prefill_per_token_s
        running = table.state == State.RUNNING
        iteration = profile.iteration_time(
            float(np.count_nonzero(running)), float(context[running].sum())
        )
        budget = slack * max(1.0, self.plan_interval_s / iteration)
        state = table.state[starts]
        queued = state == State.QUEUED
        pending = float(context[starts[queued]].sum())
        fresh = np.flatnonzero(~queued)
        prefill = np.where(
            in_states(state[fresh], (State.WAITING, State.PREEMPTED)),
            context[starts[fresh]],
            0.0,
        )
        total = pending + np.cumsum(prefill)
        fits = total <= budget
        if pending == 0.0:
            fits |= total == prefill  # the first prefill always goes
        if not fits.all():
            allowed[fresh[int(np.argmin(fits)) :]] = False
        return allowed

    def _victim_loss(
        self, snapshot: Snapshot, outlook: Outlook, candidate: int, victims: IntArray
    ) -> FloatArray:
        """QoE each possible victim loses if preempted, over ``victim_horizon_s``."""
        table = snapshot.requests
        loss = np.zeros(len(table))
        if victims.size == 0:
            return loss
        rows = victims
        common: dict[str, Any] = {
            "now": snapshot.now_s - table.arrival_s[rows],
            "horizon": self.victim_horizon_s,
            "ttft": table.ttft_s[rows],
            "tds": table.tds[rows],
            "count": table.generated_tokens[rows],
            "digest_max": table.digest_max[rows],
            "delay_sum": table.delay_sum[rows],
            "max_count": table.max_tokens[rows],
            "token_latency": outlook.token_latency[candidate],
        }
        served = predict_qoe(**common, start_delay=outlook.start_delay[rows])
        waiting = predict_qoe(**common, served=False)
        loss[rows] = np.maximum(served - waiting, 0.0)
        return loss

    def _resume_cost(self, snapshot: Snapshot, context: FloatArray) -> FloatArray:
        profile = snapshot.profile
        if self.preemption_mode == PreemptionMode.SWAP:
            return 2.0 * profile.swap_s_per_token * context
        return profile.prefill_per_token_s * context

    def _stall_loss_rate(
        self, snapshot: Snapshot, outlook: Outlook, candidate: int, selected: np.ndarray
    ) -> float:
        """Summed QoE every request loses per second that the worker stalls.

        A stall (the recompute or swap a preemption causes) delays all requests in the
        system: the selected ones' next tokens, and the service the others are waiting for.
        """
        table = snapshot.requests
        common: dict[str, Any] = {
            "now": snapshot.now_s - table.arrival_s,
            "ttft": table.ttft_s,
            "tds": table.tds,
            "count": table.generated_tokens,
            "digest_max": table.digest_max,
            "delay_sum": table.delay_sum,
            "max_count": table.max_tokens,
        }
        served_late = predict_qoe(
            **common,
            horizon=self.horizon_s,
            token_latency=outlook.token_latency[candidate],
            start_delay=outlook.start_delay + _STALL_PROBE_S,
        )
        waiting_late = predict_qoe(
            **common, horizon=self.horizon_s + _STALL_PROBE_S, token_latency=1.0, served=False
        )
        loss = np.where(
            selected,
            outlook.q_serve[candidate] - served_late,
            outlook.q_wait - waiting_late,
        )
        return float(np.maximum(loss, 0.0).sum() / _STALL_PROBE_S)


def _actions(
    snapshot: Snapshot,
    keep: np.ndarray,
    *,
    pause: IntArray,
    preempt: IntArray,
    priority: FloatArray,
    mode: PreemptionMode,
    solver_ran: bool,
    deferred: int = 0,
) -> Plan:
    """Plan that runs ``keep`` (highest priority first) and stops everything else queued.

    ``deferred``: starts held back by pacing; the plan asks to be followed by another."""
    table = snapshot.requests
    state = table.state
    ids = table.request_id
    order = np.argsort(-priority, kind="stable")
    keep_sorted = order[keep[order]]
    resumable = in_states(state[keep_sorted], (State.PREEMPTED, State.SWAPPED, State.PAUSED))
    waiting = state[keep_sorted] == State.WAITING
    # Queued but no longer selected: take them out of the engine's queue.
    dequeue = ids[(state == State.QUEUED) & ~keep]
    return Plan(
        preempt=tuple(int(i) for i in np.concatenate([preempt, dequeue])),
        pause=tuple(int(i) for i in pause),
        resume=tuple(int(i) for i in ids[keep_sorted[resumable]]),
        admit=tuple(int(i) for i in ids[keep_sorted[waiting]]),
        preemption_mode=mode,
        solver_ran=solver_ran,
        notes={"deferred": float(deferred)} if deferred else {},
    )


def _serve_everyone(snapshot: Snapshot, mode: PreemptionMode) -> Plan:
    """No pressure: run everybody, earliest arrival first (what FCFS does when it fits)."""
    table = snapshot.requests
    priority = -table.arrival_s
    keep = np.ones(len(table), dtype=bool)
    return _actions(snapshot, keep, pause=np.zeros(0, np.int64), preempt=np.zeros(0, np.int64),
                    priority=priority, mode=mode, solver_ran=False)
