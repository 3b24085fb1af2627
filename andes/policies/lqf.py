"""Least QoE first: the paper's QoE-ordered baseline, which ignores memory use.

The official implementation runs the Andes machinery with unit weights: the same predictor,
the same triggering and preemption control, but requests are ranked by their QoE gain alone,
never by how much KV they take. Comparing it with ``andes`` shows what the knapsack's memory
weighting buys.
"""

from __future__ import annotations

from andes.policies.andes import AndesPolicy
from andes.policies.base import PreemptionMode


def least_qoe_first(preemption_mode: PreemptionMode = PreemptionMode.RECOMPUTE) -> AndesPolicy:
    return AndesPolicy(memory_aware=False, preemption_mode=preemption_mode, name="lqf")
