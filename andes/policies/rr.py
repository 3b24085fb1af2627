"""Round robin with a token quantum: the paper's second baseline.

A running request that has produced ``quantum_tokens`` since it was (re)admitted yields its
KV to a request that is waiting, which joins the queue in the order requests were last
served (never-served ones first, then by arrival). Without anyone waiting it keeps running.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from andes.policies.base import (
    HOLDS_KV,
    Plan,
    PreemptionMode,
    Snapshot,
    State,
    blocks_for,
    in_states,
)


@dataclass(frozen=True)
class RoundRobinPolicy:
    quantum_tokens: int = 50
    preemption_mode: PreemptionMode = PreemptionMode.RECOMPUTE
    name: str = field(default="rr")

    def plan(self, snapshot: Snapshot) -> Plan:
        table = snapshot.requests
        if len(table) == 0:
            return Plan()
        state = table.state
        ids = table.request_id
        weights = blocks_for(table.context_tokens, snapshot.block_size)
        outside = in_states(state, (State.WAITING, State.PREEMPTED, State.SWAPPED))
        # Queue order: least recently served first (never served: -1), then arrival.
        queue = np.flatnonzero(outside)
        queue = queue[np.lexsort((table.arrival_s[queue], table.admitted_seq[queue]))]
        need = int(weights[queue].sum())
        free = snapshot.kv_blocks_free
        expired = np.flatnonzero(
            in_states(state, HOLDS_KV) & (table.served_since_admit >= self.quantum_tokens)
        )
        expired = expired[np.argsort(table.admitted_seq[expired], kind="stable")]
        preempt: list[int] = []
        for row in expired:
            if free >= need:
                break
            preempt.append(int(row))
            free += int(weights[row])
        resumable = in_states(state[queue], (State.PREEMPTED, State.SWAPPED))
        return Plan(
            preempt=tuple(int(ids[r]) for r in preempt),
            resume=tuple(int(i) for i in ids[queue[resumable]]),
            admit=tuple(int(i) for i in ids[queue[~resumable]]),
            preemption_mode=self.preemption_mode,
        )
