"""Scheduling policies: pure functions from a worker snapshot to a plan.

The simulator and the scheduler service build policies through :func:`make_policy`, so both
run the very same objects.
"""

from __future__ import annotations

from andes.policies.andes import AndesPolicy
from andes.policies.base import (
    Plan,
    Policy,
    PreemptionMode,
    RequestTable,
    Snapshot,
    State,
    room_for_everyone,
)
from andes.policies.fcfs import FcfsPolicy
from andes.policies.lqf import least_qoe_first
from andes.policies.rr import RoundRobinPolicy

POLICY_NAMES = ("fcfs", "rr", "lqf", "andes", "andes-exact")

__all__ = [
    "POLICY_NAMES",
    "AndesPolicy",
    "FcfsPolicy",
    "Plan",
    "Policy",
    "PreemptionMode",
    "RequestTable",
    "RoundRobinPolicy",
    "Snapshot",
    "State",
    "least_qoe_first",
    "make_policy",
    "room_for_everyone",
]


def make_policy(
    name: str,
    *,
    preemption_mode: str = "recompute",
    max_preemptions: int | None = None,
    plan_interval_s: float | None = None,
) -> Policy:
    """The policy called ``name`` with its default configuration; ``max_preemptions``
    overrides the Andes planners' preemption cap and ``plan_interval_s`` tells them the plan
    cadence their prefill pacing spreads over (the caller's, where it is not the default)."""
    mode = PreemptionMode(preemption_mode)
    cap = AndesPolicy.max_preemptions if max_preemptions is None else max_preemptions
    interval = AndesPolicy.plan_interval_s if plan_interval_s is None else plan_interval_s
    if name == "fcfs":
        return FcfsPolicy()
    if name == "rr":
        return RoundRobinPolicy(preemption_mode=mode)
    if name == "lqf":
        return least_qoe_first(mode)
    if name == "andes":
        return AndesPolicy(preemption_mode=mode, max_preemptions=cap, plan_interval_s=interval)
    if name == "andes-exact":
        return AndesPolicy(solver="exact", name="andes-exact", preemption_mode=mode,
                           max_preemptions=cap, plan_interval_s=interval)
    raise ValueError(f"unknown policy {name!r}; expected one of {', '.join(POLICY_NAMES)}")
