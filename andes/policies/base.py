"""What every policy sees (a snapshot of one worker) and what it returns (a plan).

The snapshot is a struct of arrays so policies stay vectorized: row i of every array is one
request placed on the worker. The plan lists request ids per action, in the order the worker
should apply them; a worker ignores an action that no longer fits a request's state (plans
are sticky and may arrive a step late).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from andes.latency import LatencyProfile

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


class State(enum.IntEnum):
    """Where a request is on its worker."""

    WAITING = 0
    """Placed on the worker, never admitted: holds no KV."""
    QUEUED = 1
    """Admitted or resumed by a plan, waiting for the engine to give it KV and a prefill."""
    RUNNING = 2
    """Holds KV and is scheduled every iteration (prefilling or decoding)."""
    PAUSED = 3
    """Holds KV but is skipped: costs memory, no compute."""
    PREEMPTED = 4
    """KV freed; resuming recomputes prompt + generated tokens."""
    SWAPPED = 5
    """KV moved to host memory; resuming copies it back."""


HOLDS_KV = (State.RUNNING, State.PAUSED)


def in_states(state: npt.NDArray[np.int64], states: tuple[State, ...]) -> npt.NDArray[np.bool_]:
    """Mask of rows whose state is one of ``states`` (a table lookup: faster than isin)."""
    lookup = np.zeros(len(State), dtype=bool)
    lookup[list(states)] = True
    return lookup[state]


class PreemptionMode(enum.StrEnum):
    RECOMPUTE = "recompute"
    SWAP = "swap"


@dataclass(frozen=True)
class RequestTable:
    """The requests on one worker, one row each."""

    request_id: IntArray
    state: IntArray
    """A :class:`State` value per request."""
    arrival_s: FloatArray
    """Arrival at the gateway, on the snapshot's clock."""
    ttft_s: FloatArray
    tds: FloatArray
    prompt_tokens: IntArray
    generated_tokens: IntArray
    """Tokens produced so far (all delivered to the client)."""
    max_tokens: IntArray
    """The client's cap on output tokens: the true length is unknown to the planner."""
    digest_max: FloatArray
    """The pacer summary M_k of the delivered tokens (see :mod:`andes.qoe`); -inf when none."""
    delay_sum: FloatArray
    """The pacer summary S_k of the delivered tokens."""
    kv_blocks: IntArray
    """KV blocks held on the accelerator now (0 unless RUNNING or PAUSED)."""
    preemptions: IntArray
    admitted_seq: IntArray
    """Order of the latest admission or resume (larger = more recent); -1 if never."""
    served_since_admit: IntArray
    """Tokens generated since the latest admission or resume (round robin's quantum)."""

    def __len__(self) -> int:
        return int(self.request_id.size)

    @property
    def context_tokens(self) -> IntArray:
        return self.prompt_tokens + self.generated_tokens

    @staticmethod
    def empty() -> RequestTable:
        i = np.zeros(0, dtype=np.int64)
        f = np.zeros(0, dtype=np.float64)
        return RequestTable(i, i, f, f, f, i, i, i, f, f, i, i, i, i)


@dataclass(frozen=True)
class Snapshot:
    """One worker at one instant: its requests, its memory and its latency model."""

    now_s: float
    requests: RequestTable
    profile: LatencyProfile
    kv_blocks_total: int
    kv_blocks_free: int
    max_batch: int

    @property
    def block_size(self) -> int:
        return self.profile.block_size


@dataclass(frozen=True)
class Plan:
    """What the worker should change before its next iteration; ids in application order."""

    preempt: tuple[int, ...] = ()
    pause: tuple[int, ...] = ()
    resume: tuple[int, ...] = ()
    """PREEMPTED, SWAPPED or PAUSED requests to run again (before any admission)."""
    admit: tuple[int, ...] = ()
    """WAITING requests to admit."""
    preemption_mode: PreemptionMode = PreemptionMode.RECOMPUTE
    solver_ran: bool = False
    """Whether the full optimization ran (selective triggering skips it when unneeded)."""
    notes: dict[str, float] = field(default_factory=dict, compare=False)


class Policy(Protocol):
    """A pure function from a snapshot to a plan (with its configuration bound)."""

    @property
    def name(self) -> str: ...

    def plan(self, snapshot: Snapshot) -> Plan: ...


def blocks_for(tokens: IntArray | int, block_size: int) -> IntArray:
    """KV blocks that ``tokens`` context tokens (plus the next one) occupy."""
    return np.asarray((np.asarray(tokens) + block_size) // block_size, dtype=np.int64)


def room_for_everyone(requests: int, kv_demand: int, max_batch: int, kv_blocks_total: int) -> bool:
    """Whether a worker's requests all fit in one batch and in its KV as they are now.

    Then a plan has nothing to arbitrate (every policy runs them all), so an arrival need not
    wait for the plan cadence: the cadence bounds how often contended workers are re-planned,
    and holding an arrival back from idle capacity only adds to its time to first token (the
    ramp of a burst onto an idle worker ran part-empty batches for up to ``plan_interval_s``
    per wave of arrivals). ``kv_demand``: the blocks the requests' contexts occupy now
    (:func:`blocks_for`)."""
    return requests <= max_batch and kv_demand <= kv_blocks_total
