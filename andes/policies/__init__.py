"""Scheduling policies: pure functions from a worker snapshot to a plan.

The simulator and the scheduler service build policies through :func:`make_policy`, so both
run the very same objects.
"""

from __future__ import annotations

from andes.policies.andes import AndesPolicy
from andes.policies.base import Plan, Policy, PreemptionMode, RequestTable, Snapshot, State
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
]


def make_policy(name: str, *, preemption_mode: str = "recompute") -> Policy:
    """The policy called ``name`` with its default configuration."""
    mode = PreemptionMode(preemption_mode)
    if name == "fcfs":
        return FcfsPolicy()
    if name == "rr":
        return RoundRobinPolicy(preemption_mode=mode)
    if name == "lqf":
        return least_qoe_first(mode)
    if name == "andes":
        return AndesPolicy(preemption_mode=mode)
    if name == "andes-exact":
        return AndesPolicy(solver="exact", preemption_mode=mode, name="andes-exact")
    raise ValueError(f"unknown policy {name!r}; expected one of {', '.join(POLICY_NAMES)}")
