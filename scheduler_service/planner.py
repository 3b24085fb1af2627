"""Computing one worker's plan: the shared policy, made work-conserving, timed.

The policy is the very object the simulator runs (``andes.policies.make_policy``). Like the
simulator, the planner never leaves a worker idle while requests wait on it: if a policy's
plan would stop everything, the FCFS plan replaces it. A policy that raises is logged and
replaced by FCFS too, so a planner bug degrades scheduling instead of stalling workers.
"""

from __future__ import annotations

import logging

import numpy as np

from andes.policies import FcfsPolicy, Plan, Policy, Snapshot, State
from andes.policies.base import in_states

log = logging.getLogger(__name__)


def has_actions(plan: Plan) -> bool:
    return bool(plan.preempt or plan.pause or plan.resume or plan.admit)


def leaves_idle(plan: Plan, snapshot: Snapshot) -> bool:
    """Whether, after ``plan``, nothing would run on the worker although requests wait."""
    table = snapshot.requests
    if plan.resume or plan.admit:
        return False
    active = in_states(table.state, (State.RUNNING, State.QUEUED))
    stopped = np.isin(table.request_id, np.asarray(plan.preempt + plan.pause, dtype=np.int64))
    if np.any(active & ~stopped):
        return False
    return bool(
        np.any(in_states(table.state, (State.WAITING, State.PREEMPTED, State.SWAPPED,
                                       State.PAUSED)))
        or np.any(active & stopped)
    )


class Planner:
    """Turns a snapshot into a plan with one policy (shared by every worker: policies are pure)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._fallback = FcfsPolicy()

    def plan(self, snapshot: Snapshot) -> Plan:
        try:
            plan = self.policy.plan(snapshot)
        except Exception:
            log.exception("policy %s failed; planning FCFS instead", self.policy.name)
            plan = self._fallback.plan(snapshot)
        if leaves_idle(plan, snapshot):
            plan = self._fallback.plan(snapshot)
        return plan
