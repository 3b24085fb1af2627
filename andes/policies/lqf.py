"""Least QoE first: serve the requests with the lowest predicted QoE, ignoring their memory.

The paper's QoE-ordered baseline: the same predictor as Andes, but requests are ranked by how
badly they would fare if not served, never by how much KV they take, there is no batch-size
search and no preemption control. It shows what the knapsack's memory weighting buys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from andes.policies.andes import _actions
from andes.policies.base import HOLDS_KV, Plan, PreemptionMode, Snapshot, blocks_for
from andes.policies.outlook import make_outlook


@dataclass(frozen=True)
class LeastQoeFirstPolicy:
    horizon_s: float = 10.0
    kv_reserve: float = 0.03
    preemption_mode: PreemptionMode = PreemptionMode.RECOMPUTE
    name: str = field(default="lqf")

    def plan(self, snapshot: Snapshot) -> Plan:
        table = snapshot.requests
        if len(table) == 0:
            return Plan()
        batch = np.array([min(len(table), snapshot.max_batch)], dtype=np.int64)
        outlook = make_outlook(snapshot, batch, self.horizon_s)
        priority = -outlook.q_wait
        order = np.argsort(-priority, kind="stable")
        weights = blocks_for(table.context_tokens, snapshot.block_size)
        capacity = int(snapshot.kv_blocks_total * (1.0 - self.kv_reserve))
        fits = np.cumsum(weights[order]) <= capacity
        fits &= np.arange(order.size) < snapshot.max_batch
        keep = np.zeros(len(table), dtype=bool)
        keep[order[fits]] = True
        holds = np.isin(table.state, HOLDS_KV)
        preempt = table.request_id[holds & ~keep]
        return _actions(snapshot, keep, pause=np.zeros(0, np.int64), preempt=preempt,
                        priority=priority, mode=self.preemption_mode, solver_ran=True)
