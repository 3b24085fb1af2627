"""vLLM V1's scheduler, made to execute external plans instead of deciding on its own.

Every use of vLLM's private scheduler API lives in this module (queues, ``_preempt_request``,
the KV block pool), which is why it refuses any vLLM version but the one it was written
against. vLLM keeps deciding *how* to run a step (token budget, chunked prefill, block
allocation); the plan decides *who* runs:

* a new request is **held** (out of every queue) until a plan admits it, else vLLM would admit
  it first-come-first-served by itself;
* **admit** appends a held request to vLLM's waiting queue, **resume** puts a parked one at its
  front (resumes first, both in plan order);
* **preempt** frees a request's KV (recompute: vLLM V1 has no swap; the prefix cache keeps the
  freed full blocks reusable until overwritten) and **parks** it out of every queue;
* **pause** keeps a request's KV but takes it out of ``running``, so the model runner skips it.

When KV runs out in the middle of a step vLLM still preempts by its own rule; such victims are
parked too (the planner stays in charge of when they come back) and reported as forced.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import vllm
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from andes.policies.base import State
from worker.engine import PlanSpec

SUPPORTED_VLLM = "0.32."
"""The vLLM minor version this adapter was written and tested against."""


def check_vllm_version(version: str = vllm.__version__) -> None:
    """Refuse a vLLM whose private scheduler API this adapter was not tested with."""
    if not version.startswith(SUPPORTED_VLLM):
        raise RuntimeError(
            f"vLLM {version} is not supported: the vllm backend drives vLLM's scheduler "
            f"internals and is tested with vLLM {SUPPORTED_VLLM}x only (install it with "
            "`make vllm`)"
        )


check_vllm_version()


@dataclass
class StepRecord:
    """What the last ``schedule()`` really did."""

    scheduled_tokens: dict[str, int] = field(default_factory=dict)
    """Tokens each request computes in this step (prefill chunk, or 1 for a decode)."""
    forced_preemptions: list[str] = field(default_factory=list)
    """Requests vLLM preempted by itself (KV ran out), now parked."""
    moved: bool = True
    """Some request changed queue or KV blocks: started, resumed, preempted, or given a
    new block."""


class PlanScheduler(Scheduler):  # type: ignore[misc]
    """A :class:`Scheduler` whose admissions and preemptions come from :meth:`apply_plan`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.held: dict[str, Request] = {}
        self.parked: dict[str, Request] = {}
        self.paused: dict[str, Request] = {}
        self._max_seqs: int = self.max_num_running_reqs
        self._max_admitted: int = self.max_num_active_reqs
        self._planned_preemptions: set[str] = set()
        self.last_step = StepRecord()
        self._moved: set[str] = set()
        """Requests that may have joined, left or changed a queue without KV since the last
        :meth:`take_moved`: added, named by a plan, started, resumed or preempted."""

    # -- what it holds -----------------------------------------------------------------

    def kv_blocks_of(self, request_id: str) -> int:
        # Counted where the KV managers keep them: ``get_block_ids`` builds every block id
        # list first, which over a full batch after every step cost more than the rest of
        # listing the held requests (0.15 ms for 64 requests).
        return sum(len(manager.req_to_blocks.get(request_id, ()))
                   for manager in self.kv_cache_manager.coordinator.single_type_managers)

    @property
    def kv_blocks_total(self) -> int:
        """Usable blocks: the pool less its one null block."""
        return int(self.kv_cache_manager.block_pool.num_gpu_blocks) - 1

    @property
    def kv_blocks_free(self) -> int:
        """Free blocks, counting prefix-cached ones nobody holds (they are evictable)."""
        return int(self.kv_cache_manager.block_pool.get_num_free_blocks())

    def take_moved(self) -> set[str]:
        moved, self._moved = self._moved, set()
        return moved

    def without_kv_state(self, request_id: str) -> State | None:
        """Where a request without KV waits: QUEUED in vLLM's queues, WAITING held for
        admission, PREEMPTED parked; None where it holds KV (runs, or is paused) or is not
        here."""
        request = self.requests.get(request_id)
        if (request is None or request.is_finished() or request_id in self.paused
                or request.status == RequestStatus.RUNNING):
            return None
        if request_id in self.held:
            return State.WAITING
        return State.PREEMPTED if request_id in self.parked else State.QUEUED

    def without_kv_count(self) -> int:
        return (len(self.waiting) + len(self.kv_holding_waiting) + len(self.held)
                + len(self.parked))

    def has_runnable(self) -> bool:
        """Whether a step would compute anything: something runs or is queued for KV."""
        return bool(self.running) or bool(self.waiting) or bool(self.kv_holding_waiting)

    # -- vLLM hooks ---------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        self._moved.add(request.request_id)
        super().add_request(request)
        if request.status == RequestStatus.WAITING and request in self.waiting:
            self.waiting.remove_request(request)
            self.held[request.request_id] = request

    def finish_requests(
        self, request_ids: str | Iterable[str] | None, finished_status: RequestStatus
    ) -> list[Request]:
        ids = (
            (request_ids,) if isinstance(request_ids, str)
            else tuple(self.requests) if request_ids is None else tuple(request_ids)
        )
        for rid in ids:
            self.held.pop(rid, None)
            self.parked.pop(rid, None)
            if (paused := self.paused.pop(rid, None)) is not None:
                self.running.append(paused)  # where super() looks for a RUNNING request
        return list(super().finish_requests(ids, finished_status))

    def get_num_unfinished_requests(self) -> int:
        # Held and parked requests are unfinished too, else the engine would think it idle.
        return int(super().get_num_unfinished_requests()) + len(self.held) + len(
            self.parked) + len(self.paused)

    def has_requests(self) -> bool:
        return bool(super().has_requests()) or bool(self.held or self.parked or self.paused)

    def schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
        # Paused requests keep their batch slots: vLLM may not fill them with others (it
        # admits into RUNNING up to its own limit, and checks the batch against the other).
        slots = max(0, self._max_seqs - len(self.paused))
        self.max_num_running_reqs = slots
        self.max_num_active_reqs = min(self._max_admitted, slots)
        output: SchedulerOutput = super().schedule(*args, **kwargs)
        preempted = set(output.preempted_req_ids or ())
        forced = [rid for rid in preempted - self._planned_preemptions if rid in self.requests]
        for rid in forced:
            request = self.requests[rid]
            if request.status == RequestStatus.PREEMPTED and request in self.waiting:
                self.waiting.remove_request(request)
                self._park(request)
        self._planned_preemptions.clear()
        cached = output.scheduled_cached_reqs
        self._moved.update(new.req_id for new in output.scheduled_new_reqs)
        self._moved.update(cached.resumed_req_ids)
        self._moved.update(preempted)
        self.last_step = StepRecord(
            scheduled_tokens=dict(output.num_scheduled_tokens), forced_preemptions=forced,
            moved=bool(output.scheduled_new_reqs or cached.resumed_req_ids or preempted
                       or any(blocks is not None for blocks in cached.new_block_ids)),
        )
        return output

    # -- plans --------------------------------------------------------------------------

    def apply_plan(self, plan: PlanSpec) -> None:
        """Apply a plan, in vLLM's internal request ids, at an iteration boundary; actions
        that no longer apply are skipped (preemption is always recompute: V1 has no swap)."""
        now = time.monotonic()
        self._moved.update(*(plan.preempt, plan.pause, plan.resume, plan.admit))
        for rid in plan.preempt:
            self._preempt(rid, now)
        for rid in plan.pause:
            request = self.requests.get(rid)
            if request is not None and rid not in self.paused and request in self.running:
                self.running.remove(request)
                self.paused[rid] = request
        for rid in reversed(plan.resume):  # prepending: reversed keeps the plan's order
            if (paused := self.paused.pop(rid, None)) is not None:
                self.running.append(paused)
            elif (parked := self.parked.pop(rid, None)) is not None:
                self.waiting.prepend_request(parked)
        for rid in plan.admit:
            if (held := self.held.pop(rid, None)) is not None:
                self.waiting.add_request(held)

    def _preempt(self, rid: str, now: float) -> None:
        request = self.requests.get(rid)
        if request is None:
            return
        if rid in self.paused:
            self.running.append(self.paused.pop(rid))
        if request.status == RequestStatus.RUNNING and request in self.running:
            self.running.remove(request)
            self._preempt_request(request, now)  # frees KV, prepends to waiting
            self._planned_preemptions.add(rid)
            self.waiting.remove_request(request)
            self._park(request)
        elif request in self.waiting:
            # Admitted or resumed but never given KV: back to where it came from.
            self.waiting.remove_request(request)
            self._park(request)

    def _park(self, request: Request) -> None:
        # Preempted before its first token: it needs admitting again, like a new request.
        if request.num_output_tokens == 0:
            self.held[request.request_id] = request
        else:
            self.parked[request.request_id] = request
