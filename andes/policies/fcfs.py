"""First come, first served: what vLLM does, the baseline everybody deploys.

Every request is admitted in arrival order; the engine starts them while KV fits and stops at
the first that does not (head-of-line). When decoding outgrows KV the engine itself preempts
the most recently admitted request by recompute; this policy resumes preempted requests
ahead of new ones, as vLLM puts them back at the front of its waiting queue.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from andes.policies.base import Plan, PreemptionMode, Snapshot, State, in_states


@dataclass(frozen=True)
class FcfsPolicy:
    name: str = field(default="fcfs")

    def plan(self, snapshot: Snapshot) -> Plan:
        table = snapshot.requests
        order = np.argsort(table.arrival_s, kind="stable")
        state = table.state[order]
        ids = table.request_id[order]
        back = in_states(state, (State.PREEMPTED, State.SWAPPED, State.PAUSED))
        return Plan(
            resume=tuple(int(i) for i in ids[back]),
            admit=tuple(int(i) for i in ids[state == State.WAITING]),
            preemption_mode=PreemptionMode.RECOMPUTE,
        )
